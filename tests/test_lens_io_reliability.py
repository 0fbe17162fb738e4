"""Lens folders from disk are untrusted: every bad one is a one-line LensforgeError.

Covers lensforge folders (config.json + lens.safetensors) and tuned-lens 0.2.0 folders
(config.json + params.pt): NaN weights, wrong types, config/tensor disagreements, pickles
with code in them, interrupted renames, and a seeded fuzz of both formats.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lensforge.errors import CheckpointError, LensforgeError
from lensforge.lenses import (
    LensConfig,
    LowRankLens,
    TunedLens,
    export_tuned_lens,
    load_lens,
    save_lens,
)
from lensforge.lenses.kinds import LENS_TYPES, LogitLens
from lensforge.storage import _host

pytestmark = pytest.mark.unit  # library code on tiny models and plain data

L, H, R = 2, 8, 3


def _lens(kind: str, seed: int = 0, rank: int = R) -> TunedLens | LowRankLens | LogitLens:
    config = LensConfig(lens_type=kind, n_layers=L, hidden_size=H, vocab_size=16,
                        model_id="tiny", unembed_hash="0123abcd")
    lens = LowRankLens(config, rank=rank) if kind == "lowrank" else LENS_TYPES[kind](config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return lens


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_line_error(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, LensforgeError)
    assert "\n" not in msg and msg.strip()
    return msg


# ------------------------------------------------------------- row 1: NaN
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_tuned_lens_folder_with_nonfinite_weight_is_refused(tmp_path: Path, bad: float) -> None:
    folder = export_tuned_lens(_lens("tuned"), tmp_path / "tl")
    state = torch.load(folder / "params.pt", weights_only=True)
    state["0.weight"][1, 2] = bad
    torch.save(state, folder / "params.pt")
    with pytest.raises(CheckpointError) as exc:
        load_lens(folder)
    assert "NaN/Inf" in _one_line_error(exc) and "0.weight" in str(exc.value)


# ------------------------------------------------------- row 6: wrong types
@pytest.mark.parametrize("params", ["list", "tensor", "int_keys", "non_tensor_value"])
def test_tuned_lens_params_of_wrong_type_is_refused(tmp_path: Path, params: str) -> None:
    folder = export_tuned_lens(_lens("tuned"), tmp_path / "tl")
    state = torch.load(folder / "params.pt", weights_only=True)
    bad = {
        "list": list(state.values()),
        "tensor": state["0.weight"],
        "int_keys": {i: v for i, v in enumerate(state.values())},
        "non_tensor_value": dict(state, **{"0.bias": [0.0] * H}),
    }[params]
    torch.save(bad, folder / "params.pt")
    with pytest.raises(CheckpointError) as exc:
        load_lens(folder)
    _one_line_error(exc)


@pytest.mark.parametrize(
    "key,value",
    [("d_model", "abc"), ("d_model", 8.5), ("d_model", True), ("d_model", -8),
     ("num_hidden_layers", "2"), ("num_hidden_layers", 0), ("num_hidden_layers", None),
     ("bias", "yes")],
)
def test_tuned_lens_config_of_wrong_type_is_refused(tmp_path: Path, key: str, value: object
                                                     ) -> None:
    folder = export_tuned_lens(_lens("tuned"), tmp_path / "tl")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as exc:
        load_lens(folder)
    assert key in _one_line_error(exc)


def test_tuned_lens_config_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    folder = export_tuned_lens(_lens("tuned"), tmp_path / "tl")
    (folder / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError) as exc:
        load_lens(folder)
    _one_line_error(exc)


@pytest.mark.parametrize(
    "key,value",
    [("n_layers", "abc"), ("n_layers", 2.0), ("hidden_size", None), ("hidden_size", -1),
     ("rank", "3"), ("bias", "no"), ("extra", []), ("lens_type", 3), ("unembed_hash", 5),
     ("vocab_size", "16"), ("model_id", ["x"])],
)
def test_lensforge_config_of_wrong_type_is_refused(tmp_path: Path, key: str, value: object
                                                    ) -> None:
    folder = save_lens(_lens("lowrank"), tmp_path / "lens")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as exc:
        load_lens(folder)
    assert key in _one_line_error(exc)


# ------------------------------------------- row 7: config vs tensor shapes
def test_lowrank_config_rank_disagreeing_with_tensors_is_refused(tmp_path: Path) -> None:
    folder = save_lens(_lens("lowrank", rank=3), tmp_path / "lens")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["rank"] == 3
    (folder / "config.json").write_text(json.dumps(dict(cfg, rank=6)))
    with pytest.raises(CheckpointError) as exc:
        load_lens(folder)
    msg = _one_line_error(exc)
    assert "disagree" in msg and "'up'" in msg


@pytest.mark.parametrize("change", [{"n_layers": 3}, {"hidden_size": 9}, {"bias": False},
                                    {"rank": 9}, {"lens_type": "tuned"}])
def test_lowrank_config_disagreeing_with_tensors_is_refused(tmp_path: Path, change: dict
                                                            ) -> None:
    folder = save_lens(_lens("lowrank"), tmp_path / "lens")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, **change)))
    with pytest.raises(LensforgeError) as exc:
        load_lens(folder)
    _one_line_error(exc)


def test_huge_config_sizes_are_refused_without_allocating(tmp_path: Path) -> None:
    folder = save_lens(_lens("tuned"), tmp_path / "lens")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, n_layers=10**6, hidden_size=10**6)))
    with pytest.raises(CheckpointError) as exc:  # an [L, H, H] zeros would be 4 EB
        load_lens(folder)
    _one_line_error(exc)
    tl = export_tuned_lens(_lens("tuned"), tmp_path / "tl")
    cfg = json.loads((tl / "config.json").read_text())
    (tl / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=10**12)))
    with pytest.raises(CheckpointError) as exc:
        load_lens(tl)
    _one_line_error(exc)


def test_integer_weights_are_refused(tmp_path: Path) -> None:
    folder = save_lens(_lens("tuned"), tmp_path / "lens")
    state = load_file(str(folder / "lens.safetensors"))
    state["weight"] = state["weight"].to(torch.int32)
    save_file(state, str(folder / "lens.safetensors"))
    with pytest.raises(CheckpointError) as exc:
        load_lens(folder)
    _one_line_error(exc)


def test_valid_folders_still_load(tmp_path: Path) -> None:
    for kind in ("tuned", "lowrank", "logit"):
        lens = _lens(kind, seed=3)
        assert _same(load_lens(save_lens(lens, tmp_path / kind)), lens)
    tuned = _lens("tuned", seed=4)
    assert _same(load_lens(export_tuned_lens(tuned, tmp_path / "tl")), tuned)
    # half precision is a legitimate way to ship a lens; it is widened on load
    folder = save_lens(_lens("lowrank"), tmp_path / "half")
    state = {k: v.half() for k, v in load_file(str(folder / "lens.safetensors")).items()}
    save_file(state, str(folder / "lens.safetensors"), metadata={"lens_type": "lowrank"})
    assert load_lens(folder).up.dtype == torch.float32


# ------------------------------------------------ row 8: pickle with code
class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_with_code_is_refused_in_one_line_without_unsafe_advice(tmp_path: Path) -> None:
    folder = export_tuned_lens(_lens("tuned"), tmp_path / "tl")
    state = torch.load(folder / "params.pt", weights_only=True)
    state["0.weight"] = _Evil()
    torch.save(state, folder / "params.pt")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(CheckpointError) as exc:
            load_lens(folder)
    finally:
        os.chdir(cwd)
    msg = _one_line_error(exc)
    assert not (tmp_path / "pwned.txt").exists()
    assert "weights_only" not in msg and "can still be loaded" not in msg
    assert "code" in msg and "system" in msg  # names what it refused to run
    assert len(msg) < 400


# ------------------------------------------- row 9: interrupted rename
def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_load_lens_recovers_a_lens_whose_swap_was_killed(tmp_path: Path) -> None:
    lens = _lens("lowrank", seed=5)
    folder = save_lens(lens, tmp_path / "lens")
    pid = _dead_pid()
    # killed after old -> trash and before new -> target: only the old copy exists
    os.replace(folder, tmp_path / f".lens.old-{pid}-{_host()}-abc123")
    half = tmp_path / f".lens.tmp-{pid}-{_host()}-def456"
    half.mkdir()
    (half / "config.json").write_text("{half")
    loaded = load_lens(folder)
    assert _same(loaded, lens)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]


def test_load_lens_during_a_live_swap_says_what_to_do(tmp_path: Path) -> None:
    folder = save_lens(_lens("tuned"), tmp_path / "lens")
    held = tmp_path / f".lens.old-{os.getpid()}-{_host()}-abc123"
    os.replace(folder, held)
    with pytest.raises(CheckpointError) as exc:
        load_lens(folder)
    msg = _one_line_error(exc)
    assert str(os.getpid()) in msg and "retry" in msg
    assert held.is_dir()  # a live writer's copy is never touched


# ------------------------------------------------------------------ fuzz
def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


_WEIRD = ["abc", None, [], {}, 1.5, True, -1, 0, 10**30, 1e308, "ü\u202e\u0000",
          [[[[[]]]]], "NaN", 2**63]


def _mutate_config(rng: random.Random, path: Path) -> str:
    text = path.read_bytes().decode("utf-8", errors="replace")
    op = rng.choice(["delete", "type", "invalid", "unicode", "not_object", "bytes"])
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError):  # an earlier mutation already broke it
        cfg = None
    if op in ("delete", "type") and isinstance(cfg, dict) and cfg:
        key = rng.choice(sorted(cfg))
        if op == "delete":
            del cfg[key]
        else:
            cfg[key] = rng.choice(_WEIRD)
        path.write_text(json.dumps(cfg))
        return f"config {op} {key}"
    if op == "invalid":
        path.write_text(text[: rng.randrange(max(1, len(text)))])
    elif op == "unicode":
        path.write_bytes(rng.choice([b"\xff\xfe\x00{", "{\"n\u00e4me\": 1}".encode("utf-16"),
                                     b"\xef\xbb\xbf" + text.encode(), b"\x80abc"]))
    elif op == "not_object":
        path.write_text(rng.choice(["[]", "null", "3", "\"lens\"", "[" * 5000]))
    else:
        data = bytearray(path.read_bytes() or b"{}")
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    return f"config {op}"


def _mutate_state(rng: random.Random, state: dict[str, torch.Tensor]) -> tuple[object, str]:
    op = rng.choice(["dtype", "shape", "extra", "missing", "nan", "not_dict"])
    key = rng.choice(sorted(state))
    state = dict(state)
    if op == "dtype":
        state[key] = state[key].to(rng.choice([torch.int32, torch.float16, torch.bool,
                                               torch.float64, torch.int8, torch.bfloat16]))
    elif op == "shape":
        t = state[key]
        state[key] = rng.choice([t.reshape(-1), t[..., :-1].contiguous(), t.unsqueeze(0),
                                 torch.zeros(*t.shape, 2), torch.zeros(())])
    elif op == "extra":
        state["extra.weight"] = torch.zeros(3)
    elif op == "missing":
        del state[key]
    elif op == "nan":
        flat = state[key].clone().reshape(-1)
        flat[rng.randrange(flat.numel())] = float("nan")
        state[key] = flat.reshape(state[key].shape)
    else:
        return rng.choice([[1, 2], torch.zeros(2), 7]), f"state {op}"
    return state, f"state {op} {key}"


def _mutate_weights(rng: random.Random, path: Path, tuned_lens: bool) -> str:
    op = rng.choice(["truncate", "flip", "empty", "tensors", "tensors"])
    data = path.read_bytes()
    if len(data) < 2:
        op = "empty"
    if op == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif op == "flip":
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(buf))
    elif op == "empty":
        path.write_bytes(b"")
    else:
        try:
            state = torch.load(path, weights_only=True) if tuned_lens else load_file(str(path))
        except Exception:  # noqa: BLE001 — already broken by an earlier mutation
            return "weights already broken"
        if not isinstance(state, dict) or not state:
            return "weights already broken"
        state, what = _mutate_state(rng, state)
        if tuned_lens:
            torch.save(state, path)
        elif isinstance(state, dict):
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            path.write_bytes(b"not a safetensors file")
        return f"weights {what}"
    return f"weights {op}"


def test_fuzzed_lens_folders_fail_cleanly_and_are_never_modified(tmp_path: Path) -> None:
    rng = random.Random(1234)
    bases = {
        "tuned": save_lens(_lens("tuned"), tmp_path / "base" / "tuned"),
        "lowrank": save_lens(_lens("lowrank"), tmp_path / "base" / "lowrank"),
        "logit": save_lens(_lens("logit"), tmp_path / "base" / "logit"),
        "tuned-lens": export_tuned_lens(_lens("tuned"), tmp_path / "base" / "tl"),
    }
    outcomes = {"ok": 0, "refused": 0}
    for case in range(320):
        kind = rng.choice(sorted(bases))
        parent = tmp_path / f"case{case}"
        folder = parent / "lens"
        shutil.copytree(bases[kind], folder)
        what = []
        for _ in range(rng.choice([1, 1, 2])):
            if kind != "logit" and rng.random() < 0.5:
                weights = "params.pt" if kind == "tuned-lens" else "lens.safetensors"
                what.append(_mutate_weights(rng, folder / weights, kind == "tuned-lens"))
            else:
                what.append(_mutate_config(rng, folder / "config.json"))
        before = _tree_hash(parent)
        try:
            load_lens(folder)
            outcomes["ok"] += 1
        except LensforgeError as exc:
            assert "\n" not in str(exc), (kind, what, str(exc))
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 — the point of the test
            pytest.fail(f"case {case} ({kind}: {what}) raised {type(exc).__name__}: {exc}")
        assert _tree_hash(parent) == before, (case, kind, what)
        shutil.rmtree(parent)
    assert outcomes["refused"] > 200 and outcomes["ok"] > 0, outcomes
