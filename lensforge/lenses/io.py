"""Save and load lenses as folders: config.json + lens.safetensors (never pickles).

Also reads and writes tuned-lens 0.2.0 folders (config.json + params.pt), so existing
lenses work here and ours can be compared with theirs.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lensforge.errors import CheckpointError, ConfigError
from lensforge.lenses.base import Lens, LensConfig
from lensforge.lenses.kinds import LENS_TYPES, LogitLens, LowRankLens, TunedLens
from lensforge.storage import atomic_dir, recover_dir

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "lens.safetensors"


def save_lens(lens: Lens, folder: str | os.PathLike) -> Path:
    """Write `lens` atomically to `folder`; returns the folder."""
    with atomic_dir(folder) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(lens.config.to_dict(), indent=2))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in lens.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"lens_type": lens.lens_type})
    return Path(folder)


def load_lens(
    folder: str | os.PathLike,
    adapter: ModelAdapter | None = None,
    *,
    allow_mismatch: bool = False,
) -> Lens:
    """Load a lens folder (ours or tuned-lens 0.2.0) and bind it to `adapter` if given.

    The folder is untrusted input: anything wrong with it (bad JSON or types, unreadable or
    non-finite tensors, tensors that disagree with the config) is a one-line CheckpointError.
    A folder left mid-swap by a killed save is restored first (see storage.recover_dir).
    A lens whose unembedding hash or shapes differ from the model's is refused unless
    `allow_mismatch=True`.
    """
    folder = Path(folder)
    recover_dir(folder)
    if folder.name == "logit" and not folder.exists() and adapter is not None:
        return LogitLens.from_model(adapter)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"no lens found at {folder} (expected {CONFIG_FILE})")
    if (folder / "params.pt").exists() and not (folder / WEIGHTS_FILE).exists():
        lens: Lens = import_tuned_lens(folder)
    else:
        lens = _load_lensforge_folder(folder)
    if adapter is not None:
        lens.to(adapter.device)
        lens.bind(adapter, allow_mismatch=allow_mismatch)
    return lens


def _load_lensforge_folder(folder: Path) -> Lens:
    try:
        config = LensConfig.from_dict(_read_json(folder / CONFIG_FILE))
    except ConfigError as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a valid lens config: {exc}") from exc
    cls = LENS_TYPES.get(config.lens_type)
    if cls is None:
        raise CheckpointError(f"{folder / CONFIG_FILE}: unknown lens_type {config.lens_type!r:.40}"
                              f" (known: {', '.join(LENS_TYPES)})")
    expected = _expected_shapes(config, folder)
    if not expected:  # the logit lens has no tensors
        return cls(config)
    path = folder / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {path}: {_first_line(exc)}") from exc
    _check_tensors(state, expected, path)
    lens = cls(config)
    lens.load_state_dict(state)
    return lens


def _expected_shapes(config: LensConfig, folder: Path) -> dict[str, tuple[int, ...]]:
    """The tensors a lensforge folder must hold, from its config alone (nothing allocated)."""
    L, H = config.n_layers, config.hidden_size
    bias = {"bias": (L, H)} if config.bias else {}
    if config.lens_type == "tuned":
        return {"weight": (L, H, H), **bias}
    if config.lens_type == "lowrank":
        r = config.rank
        if r is None or r > H:
            raise CheckpointError(f"{folder / CONFIG_FILE}: a low-rank lens needs 1 <= rank <= "
                                  f"hidden_size ({H}), got rank={r}")
        return {"up": (L, H, r), "down": (L, r, H), **bias}
    return {}


def _check_tensors(state: dict, expected: dict[str, tuple[int, ...]], path: Path) -> None:
    """Refuse tensors that are missing, extra, mis-shaped, non-float or non-finite."""
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise CheckpointError(f"{path}: the config and the tensors disagree (missing "
                              f"{missing[:4]}, unexpected {extra[:4]!r:.80})")
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: '{key}' is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{path}: the config and the tensors disagree: '{key}' has "
                                  f"shape {tuple(value.shape)}, the config implies {shape}")
        if not value.is_floating_point():
            raise CheckpointError(f"{path}: '{key}' has dtype {value.dtype}, expected floats")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: '{key}' contains NaN/Inf")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or encoding
        raise CheckpointError(f"cannot read {path} as JSON: {_first_line(exc)}") from exc


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------ tuned-lens 0.2.0
def read_tuned_lens_config(folder: str | os.PathLike) -> dict:
    """The checked config.json of a tuned-lens 0.2.0 folder, without reading its tensors
    (cheap: `lensforge import` compares the shapes with the model's before any big read)."""
    folder = Path(folder)
    cfg = _read_json(folder / CONFIG_FILE)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a JSON object")
    for key in ("d_model", "num_hidden_layers"):
        value = cfg.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise CheckpointError(f"{folder / CONFIG_FILE}: '{key}' must be an integer >= 1, "
                                  f"got {value!r:.40}")
    bias = cfg.get("bias", True)
    if not isinstance(bias, bool):
        raise CheckpointError(f"{folder / CONFIG_FILE}: 'bias' must be true or false, "
                              f"got {bias!r:.40}")
    return cfg


def import_tuned_lens(folder: str | os.PathLike) -> TunedLens:
    """Read a tuned-lens 0.2.0 folder (config.json + params.pt of nn.Linear translators)."""
    folder = Path(folder)
    cfg = read_tuned_lens_config(folder)
    bias = cfg.get("bias", True)
    L, H = cfg["num_hidden_layers"], cfg["d_model"]
    path = folder / "params.pt"
    state = _load_plain_tensors(path)
    per_layer = 2 if bias else 1
    if len(state) != L * per_layer:  # checked first: L may be huge, nothing is allocated
        raise CheckpointError(f"{path}: the config and the tensors disagree ({len(state)} "
                              f"tensors, {L} layers with{'' if bias else 'out'} bias imply "
                              f"{L * per_layer})")
    expected: dict[str, tuple[int, ...]] = {f"{i}.weight": (H, H) for i in range(L)}
    if bias:
        expected.update({f"{i}.bias": (H,) for i in range(L)})
    _check_tensors(state, expected, path)
    config = LensConfig(
        lens_type="tuned",
        n_layers=L,
        hidden_size=H,
        bias=bias,
        model_id=str(cfg.get("base_model_name_or_path", "unknown")),
        unembed_hash=None,  # tuned-lens hashes differ from ours; shapes are still checked
        extra={"imported_from": "tuned-lens", "tuned_lens_unembed_hash": cfg.get("unembed_hash")},
    )
    lens = TunedLens(config)
    with torch.no_grad():
        for i in range(L):
            lens.weight[i].copy_(state[f"{i}.weight"])
            if lens.bias is not None:  # exists iff bias
                lens.bias[i].copy_(state[f"{i}.bias"])
    return lens


def _load_plain_tensors(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True, with every failure as one CheckpointError line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message spans lines and advises retrying with weights_only=False, which
        # would run the code in the file; name what was refused and nothing more.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it calls {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} holds pickled code or objects, not plain tensors{what}; lensforge never "
            "runs code from a lens file: re-export the lens from a trusted source"
        ) from exc
    except Exception as exc:  # noqa: BLE001 — torch.load of arbitrary bytes can raise anything
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path} is not a dict of named tensors "
                              f"(found {type(state).__name__})")
    return state


def export_tuned_lens(lens: Lens, folder: str | os.PathLike) -> Path:
    """Write `lens` as a tuned-lens 0.2.0 folder; a low-rank lens exports as A·B."""
    if isinstance(lens, LogitLens):
        raise CheckpointError("the logit lens has no translators to export")
    if not isinstance(lens, (TunedLens, LowRankLens)):
        raise CheckpointError(f"a {lens.lens_type} lens has no translators to export")
    cfg = lens.config
    state: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        state[f"{i}.weight"] = lens.translator_matrix(i).float().cpu().clone()
        b = lens.bias[i] if lens.bias is not None else torch.zeros(cfg.hidden_size)
        state[f"{i}.bias"] = b.detach().float().cpu().clone()
    with atomic_dir(folder) as tmp:
        torch.save(state, tmp / "params.pt")
        tl_cfg = {
            "base_model_name_or_path": cfg.model_id,
            "d_model": cfg.hidden_size,
            "num_hidden_layers": cfg.n_layers,
            "bias": True,
            "base_model_revision": None,
            "unembed_hash": None,
            "lens_type": "linear_tuned_lens",
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(tl_cfg, indent=2))
    return Path(folder)
