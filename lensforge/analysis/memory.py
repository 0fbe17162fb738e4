"""Training memory of full-rank vs low-rank lenses (LoRA-Lens paper Fig. 4).

Computed from a model's shape alone (hidden size H, layer count L):

    tuned lens:  L·(H² + H) parameters        LoRA-Lens: L·(2·H·r + H), r = ⌊H/k⌋

and bytes = parameters + gradients (same size) + optimizer state: AdamW keeps two fp32
moments per parameter, SGD with momentum one. `measure_training_memory` checks the
arithmetic against a real training step on the model at hand.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch

from lensforge.errors import ConfigError
from lensforge.lenses import LowRankLens, TunedLens, resolve_rank

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter

# Optimizer state tensors per parameter (fp32 moments).
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}

# Published (hidden_size, num_hidden_layers) of the configs on the Hugging Face hub.
PUBLISHED_CONFIGS: dict[str, tuple[int, int]] = {
    "OLMo-2-1B": (2048, 16),
    "OLMo-2-7B": (4096, 32),
    "OLMo-2-13B": (5120, 40),
    "OLMo-2-32B": (5120, 64),
    "Qwen2.5-1.5B": (1536, 28),
    "Qwen2.5-7B": (3584, 28),
    "Qwen2.5-14B": (5120, 48),
    "Qwen2.5-32B": (5120, 64),
    "Gemma-2-2B": (2304, 26),
    "Gemma-2-9B": (3584, 42),
    "Gemma-2-27B": (4608, 46),
    "Llama-3-70B": (8192, 80),
    "Llama-3.1-405B": (16384, 126),
    "SmolLM2-135M": (576, 30),
    "Gemma-3-270M": (640, 18),
}

MemoryPart = Literal["param_bytes", "grad_bytes", "optimizer_bytes", "total_bytes"]


class LensMemory(TypedDict):
    """`lens_memory`: computed training memory of one lens (keys in this order)."""

    lens_type: str
    rank: int | None  # lowrank only
    optimizer: str
    parameters: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    total_bytes: int


class MemoryReduction(TypedDict):
    """Percent by which the LoRA-Lens is smaller than the tuned lens, per part."""

    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    total_bytes: float


class MemoryRow(TypedDict):
    """One row of `memory_table`: one model and optimizer (keys in this order)."""

    model: str
    hidden_size: int
    n_layers: int
    k: int
    rank: int | None
    optimizer: str
    tuned: LensMemory
    lowrank: LensMemory
    reduction_percent: MemoryReduction


class MeasuredMemory(TypedDict):
    """`measure_training_memory`: one measured training step (keys in this order)."""

    lens_type: str
    rank: int | None  # lowrank only
    optimizer: str
    parameters: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    state_bytes: int  # parameters + gradients + optimizer state
    peak_delta_bytes: int | None  # None where the peak cannot be measured
    peak_method: str
    tokens: int


_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def lens_parameter_count(hidden: int, n_layers: int, lens_type: str, rank: int | None = None,
                         *, bias: bool = True) -> int:
    """Trainable parameters of one lens: L·(H²+H) (tuned) or L·(2Hr+H) (lowrank)."""
    b = hidden if bias else 0
    if lens_type == "tuned":
        return n_layers * (hidden * hidden + b)
    if lens_type == "lowrank":
        if rank is None:
            raise ConfigError("a low-rank lens needs its rank")
        return n_layers * (2 * hidden * rank + b)
    raise ConfigError(f"unknown lens type '{lens_type}'; use tuned or lowrank")


def lens_memory(hidden: int, n_layers: int, lens_type: str, *, rank: int | None = None,
                k: int = 32, optimizer: str = "adamw", bytes_per_param: int = 4,
                bias: bool = True) -> LensMemory:
    """Bytes of parameters, gradients and optimizer state for training one lens.

    `rank` defaults to ⌊H/k⌋ for lowrank. Master weights, gradients and moments are fp32
    (4 bytes) by default, as lensforge trains them.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ConfigError(f"unknown optimizer '{optimizer}'; use one of {sorted(OPTIMIZER_STATES)}")
    if lens_type == "lowrank":
        rank = resolve_rank(hidden, rank, k)
    n = lens_parameter_count(hidden, n_layers, lens_type, rank, bias=bias)
    param_bytes = n * bytes_per_param
    state_bytes = OPTIMIZER_STATES[optimizer] * n * 4
    return {
        "lens_type": lens_type,
        "rank": rank if lens_type == "lowrank" else None,
        "optimizer": optimizer,
        "parameters": n,
        "param_bytes": param_bytes,
        "grad_bytes": param_bytes,
        "optimizer_bytes": state_bytes,
        "total_bytes": 2 * param_bytes + state_bytes,
    }


def reduction_percent(full: int | float, low: int | float) -> float:
    """How much smaller `low` is than `full`, in percent."""
    return 100.0 * (1.0 - low / full) if full else 0.0


def config_dims(config: str | os.PathLike | dict) -> tuple[int, int]:
    """(H, L) from a Hugging Face config.json (file, folder or dict); looks inside
    `text_config` for multimodal configs (Gemma 3, Llava, ...)."""
    cfg: dict[str, Any]
    if isinstance(config, dict):
        cfg = config
    else:
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    scopes = [cfg.get("text_config") or {}, cfg]
    hidden = next((s[k] for s in scopes for k in _HIDDEN_KEYS if isinstance(s.get(k), int)), None)
    layers = next((s[k] for s in scopes for k in _LAYER_KEYS if isinstance(s.get(k), int)), None)
    if hidden is None or layers is None:
        raise ConfigError(
            f"config has no hidden size ({'/'.join(_HIDDEN_KEYS)}) or layer count "
            f"({'/'.join(_LAYER_KEYS)})"
        )
    return hidden, layers


def memory_table(models: dict[str, tuple[int, int]], *, k: int = 32,
                 optimizers: tuple[str, ...] = ("adamw", "sgd")) -> list[MemoryRow]:
    """One row per (model, optimizer): computed bytes of the tuned lens and LoRA-Lens
    (rank ⌊H/k⌋) and the reduction in percent, for parameters, gradients, optimizer
    state and the total."""
    rows: list[MemoryRow] = []
    for name, (hidden, n_layers) in models.items():
        for opt in optimizers:
            full = lens_memory(hidden, n_layers, "tuned", optimizer=opt)
            low = lens_memory(hidden, n_layers, "lowrank", k=k, optimizer=opt)
            rows.append({
                "model": name, "hidden_size": hidden, "n_layers": n_layers, "k": k,
                "rank": low["rank"], "optimizer": opt,
                "tuned": full, "lowrank": low,
                "reduction_percent": {
                    "param_bytes": reduction_percent(full["param_bytes"], low["param_bytes"]),
                    "grad_bytes": reduction_percent(full["grad_bytes"], low["grad_bytes"]),
                    "optimizer_bytes": reduction_percent(full["optimizer_bytes"],
                                                         low["optimizer_bytes"]),
                    "total_bytes": reduction_percent(full["total_bytes"], low["total_bytes"]),
                },
            })
    return rows


# ----------------------------------------------------------------- measured
def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process, from /proc."""
    current = peak = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return current, peak


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to VmRSS
        return True
    except OSError:
        return False


def measure_training_memory(adapter: ModelAdapter, batch: torch.Tensor, lens_type: str, *,
                            rank: int | None = None, k: int = 32,
                            optimizer: str = "adamw", token_chunk: int = 512) -> MeasuredMemory:
    """Train one lens for one optimizer step on `batch` and measure its memory.

    Returns the exact bytes held by the lens's parameters, gradients and optimizer state
    after the step (`state_bytes`, to compare with `lens_memory`) and the process's
    peak memory increase during the step (`peak_delta_bytes`: CUDA allocator on GPU,
    peak RSS on CPU), which also counts activations such as the V-wide logits.
    """
    from lensforge.training.loop import split_hidden
    from lensforge.training.loss import kl_loss_backward

    hs = adapter.hidden_states(batch)
    layer_h, final_h = split_hidden(hs, adapter.n_layers)
    del hs
    gc.collect()
    cuda = adapter.device.type == "cuda"
    peak_delta: int | None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        peak_resettable = _reset_peak_rss()
        base, _ = _rss_bytes()
    if lens_type == "tuned":
        lens = TunedLens.from_model(adapter)
    else:
        lens = LowRankLens.from_model(adapter, rank=resolve_rank(adapter.hidden_size, rank, k))
    lens.float()
    params = list(lens.parameters())
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
    kl_loss_backward({"lens": lens}, layer_h, final_h, adapter.unembed, token_chunk=token_chunk)
    opt.step()
    param_bytes = sum(_tensor_bytes(p) for p in params)
    grad_bytes = sum(_tensor_bytes(p.grad) for p in params)
    opt_bytes = sum(_tensor_bytes(v) for st in opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor))
    if cuda:
        torch.cuda.synchronize()
        peak_delta = torch.cuda.max_memory_allocated() - base
        method = "torch.cuda.max_memory_allocated"
    else:
        _, peak = _rss_bytes()
        peak_delta = max(0, peak - base) if peak_resettable else None
        method = "peak RSS (VmHWM) increase" if peak_resettable else "unavailable"
    result: MeasuredMemory = {
        "lens_type": lens_type,
        "rank": lens.config.rank if lens_type == "lowrank" else None,
        "optimizer": optimizer,
        "parameters": sum(p.numel() for p in params),
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optimizer_bytes": opt_bytes,
        "state_bytes": param_bytes + grad_bytes + opt_bytes,
        "peak_delta_bytes": peak_delta,
        "peak_method": method,
        "tokens": int(batch.numel()),
    }
    del lens, opt, params
    gc.collect()
    return result
