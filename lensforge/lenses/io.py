"""Save and load lenses as folders: config.json + lens.safetensors (never pickles).

Also reads and writes tuned-lens 0.2.0 folders (config.json + params.pt), so existing
lenses work here and ours can be compared with theirs.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lensforge.errors import CheckpointError, LensMismatchError
from lensforge.lenses.base import Lens, LensConfig
from lensforge.lenses.kinds import LENS_TYPES, LogitLens, LowRankLens, TunedLens
from lensforge.storage import atomic_dir

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
    adapter: object | None = None,
    *,
    allow_mismatch: bool = False,
) -> Lens:
    """Load a lens folder (ours or tuned-lens 0.2.0) and bind it to `adapter` if given.

    A lens whose unembedding hash or shapes differ from the model's is refused unless
    `allow_mismatch=True`.
    """
    folder = Path(folder)
    if folder.name == "logit" and not folder.exists() and adapter is not None:
        return LogitLens.from_model(adapter)
    if not (folder / CONFIG_FILE).exists():
        raise CheckpointError(f"no lens found at {folder} (expected {CONFIG_FILE})")
    if (folder / "params.pt").exists() and not (folder / WEIGHTS_FILE).exists():
        lens = import_tuned_lens(folder)
    else:
        try:
            config = LensConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
            cls = LENS_TYPES[config.lens_type]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder / CONFIG_FILE} is not a lensforge lens config") from exc
        lens = cls(config)
        if cls is not LogitLens:
            try:
                state = load_file(str(folder / WEIGHTS_FILE))
            except (OSError, RuntimeError, SafetensorError) as exc:
                raise CheckpointError(f"cannot read {folder / WEIGHTS_FILE}: {exc}") from exc
            if isinstance(lens, LowRankLens):  # shapes follow the saved rank
                if "up" not in state or state["up"].dim() != 3:
                    raise CheckpointError(f"{folder / WEIGHTS_FILE} has no low-rank 'up' tensor")
                lens = LowRankLens(config, rank=state["up"].shape[-1])
            _load_state(lens, state, folder)
    if adapter is not None:
        lens.to(adapter.device)
        lens.bind(adapter, allow_mismatch=allow_mismatch)
    return lens


def _load_state(lens: Lens, state: dict[str, torch.Tensor], folder: Path) -> None:
    expected = lens.state_dict()
    if set(state) != set(expected):
        raise CheckpointError(f"{folder}: tensors {sorted(state)} != expected {sorted(expected)}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise LensMismatchError(
                f"{folder}: '{key}' has shape {tuple(value.shape)}, config says "
                f"{tuple(expected[key].shape)}"
            )
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{folder}: '{key}' contains NaN/Inf")
    lens.load_state_dict(state)


# ------------------------------------------------------------ tuned-lens 0.2.0
def import_tuned_lens(folder: str | os.PathLike) -> TunedLens:
    """Read a tuned-lens 0.2.0 folder (config.json + params.pt of nn.Linear translators)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        state = torch.load(folder / "params.pt", map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot read tuned-lens checkpoint at {folder}: {exc}") from exc
    if "d_model" not in cfg or "num_hidden_layers" not in cfg:
        raise CheckpointError(f"{folder / CONFIG_FILE} lacks d_model/num_hidden_layers")
    L, H = int(cfg["num_hidden_layers"]), int(cfg["d_model"])
    bias = bool(cfg.get("bias", True))
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
            try:
                lens.weight[i].copy_(state[f"{i}.weight"])
                if bias:
                    lens.bias[i].copy_(state[f"{i}.bias"])
            except (KeyError, RuntimeError) as exc:
                raise CheckpointError(f"{folder}/params.pt: bad translator {i}: {exc}") from exc
    return lens


def export_tuned_lens(lens: Lens, folder: str | os.PathLike) -> Path:
    """Write `lens` as a tuned-lens 0.2.0 folder; a low-rank lens exports as A·B."""
    if isinstance(lens, LogitLens):
        raise CheckpointError("the logit lens has no translators to export")
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
