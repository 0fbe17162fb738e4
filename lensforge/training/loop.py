"""The training loop, top to bottom: closed-form init, then KL fine-tuning.

    model (frozen) -> hidden states h_0..h_L -> every lens -> KL(p_L || q_l) -> AdamW/SGD

Several lenses (e.g. tuned + LoRA at several ranks) train against the same forward
pass, so a rank sweep costs one pass of the model. Checkpoints are atomic folders
holding lenses, optimizer, data position and RNG; `resume=True` continues exactly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lensforge.data import PackedTokenStream, iter_documents
from lensforge.errors import CheckpointError, ConfigError, DataExhaustedError
from lensforge.lenses import Lens, LowRankLens, TunedLens, load_lens, resolve_rank, save_lens
from lensforge.lenses.readout import Readout
from lensforge.models.adapter import ModelAdapter, Unembed
from lensforge.storage import atomic_dir, recover_dir
from lensforge.training.closed_form import MomentAccumulator, closed_form_init
from lensforge.training.config import TrainConfig
from lensforge.training.fast_loss import fused_kl_loss_backward
from lensforge.training.loss import kl_loss_backward
from lensforge.training.subset_loss import subset_kl_loss_backward

if TYPE_CHECKING:
    from tqdm import tqdm

    from lensforge.training.distributed import DistContext

CHECKPOINT = "checkpoint"


@dataclass
class TrainResult:
    lenses: dict[str, Lens]
    out: Path
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def lens_names(cfg: TrainConfig, hidden_size: int) -> dict[str, tuple[str, int | None]]:
    """Name -> (lens type, rank) for every lens this run trains."""
    names: dict[str, tuple[str, int | None]] = {}
    for t in cfg.lens_types:
        if t == "tuned":
            names["tuned"] = ("tuned", None)
        elif cfg.rank is not None:
            names[f"lora_r{cfg.rank}"] = ("lowrank", resolve_rank(hidden_size, cfg.rank, None))
        else:
            names[f"lora_k{cfg.k}"] = ("lowrank", resolve_rank(hidden_size, None, cfg.k))
    for k in cfg.ranks_k:
        names[f"lora_k{k}"] = ("lowrank", resolve_rank(hidden_size, None, k))
    return names


def build_lenses(cfg: TrainConfig, adapter: ModelAdapter) -> dict[str, Lens]:
    lenses: dict[str, Lens] = {}
    for name, (kind, rank) in lens_names(cfg, adapter.hidden_size).items():
        if kind == "tuned":
            lenses[name] = TunedLens.from_model(adapter)
        else:
            lenses[name] = LowRankLens.from_model(adapter, rank=rank, seed=cfg.seed)
        lenses[name].float()
    return lenses


def make_stream(cfg: TrainConfig, adapter: ModelAdapter, *, rank: int = 0, world_size: int = 1,
                split: str = "train") -> PackedTokenStream:
    source, field_ = cfg.data, cfg.text_field
    iter_documents(source, text_field=field_, split=split)  # fail fast on a bad path
    return PackedTokenStream(
        lambda: iter_documents(source, text_field=field_, split=split),
        adapter.tokenizer,
        cfg.seq_len,
        rank=rank,
        world_size=world_size,
    )


def make_optimizer(cfg: TrainConfig, params: Sequence[Tensor]) -> torch.optim.Optimizer:
    s = cfg.optimizer_settings()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"], nesterov=True,
                               weight_decay=s["weight_decay"])
    return torch.optim.AdamW(params, lr=s["lr"], betas=s["betas"], weight_decay=s["weight_decay"])


@dataclass(frozen=True)
class StepPlan:
    """The schedule of a run on `world` data-parallel ranks.

    Token budgets (tokens, tokens_per_step, init_tokens) are global; batch_size is per rank.
    So an optimizer step sees the same global sequences on any world size, and a run
    resumes on a different world size as if nothing had changed.
    """

    accumulation: int  # micro-batches per rank per optimizer step
    total_steps: int
    init_batches: int  # closed-form micro-batches per rank

    @classmethod
    def of(cls, cfg: TrainConfig, world: int = 1) -> StepPlan:
        global_micro = cfg.micro_tokens * world
        if world > 1 and cfg.tokens_per_step < global_micro:
            raise ConfigError(
                f"--tokens-per-step {cfg.tokens_per_step} is less than one micro-batch on "
                f"{world} ranks ({world} x --batch-size x --seq-len = {global_micro}); "
                "lower --batch-size or raise --tokens-per-step"
            )
        accumulation = max(1, cfg.tokens_per_step // global_micro)
        per_step = accumulation * global_micro
        if 0 < cfg.tokens < per_step:
            raise ConfigError(
                f"--tokens {cfg.tokens} is less than one optimizer step ({per_step} tokens: "
                f"--tokens-per-step {cfg.tokens_per_step} over {world} rank(s)), so no KL "
                "step would run; lower --tokens-per-step or raise --tokens (0 = closed form only)"
            )
        return cls(accumulation=accumulation,
                   total_steps=cfg.tokens // per_step,
                   init_batches=max(1, math.ceil(cfg.init_tokens / global_micro)))


def lr_factor(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Linear warmup, then linear decay to zero at the last step."""
    total = max(1, cfg.total_steps if total_steps is None else total_steps)
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    return max(0.0, 1.0 - (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))


def split_hidden(hs: Tensor, n_layers: int) -> tuple[Tensor, Tensor]:
    """[L+1, B, T, H] -> ([L, B*T, H], [B*T, H])."""
    return hs[:n_layers].flatten(1, 2), hs[n_layers].flatten(0, 1)


def train(
    cfg: TrainConfig,
    adapter: ModelAdapter,
    *,
    resume: bool = False,
    progress: bool = True,
    dist: DistContext | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
) -> TrainResult:
    """Train lenses per `cfg` on `adapter`'s model; returns the trained lenses.

    `dist` (optional) supplies rank/world_size and gradient all-reduce for torchrun.
    `on_step` (optional) is called on every rank with a `StepEvent` after the initial
    state (step 0, closed form done; not on resume) and after each optimizer step, once
    that step's checkpoint (if any) is on disk: for tracking metrics along training,
    pacing or fault injection in tests.
    """
    cfg.validate()
    out = Path(cfg.out)
    rank = 0 if dist is None else dist.rank
    world = 1 if dist is None else dist.world_size
    is_main = rank == 0
    plan = StepPlan.of(cfg, world)
    torch.manual_seed(cfg.seed)  # same seed on every rank: identical lens init
    stream = make_stream(cfg, adapter, rank=rank, world_size=world)
    lenses = build_lenses(cfg, adapter)
    params = [p for lens in lenses.values() for p in lens.parameters()]
    optimizer = make_optimizer(cfg, params)
    timings: dict[str, float] = {}
    history: list[dict] = []
    start_step = 0
    if is_main:  # rank 0 alone repairs a checkpoint left mid-swap, then all ranks read it
        recover_dir(out / CHECKPOINT)
    _barrier(dist)
    ckpt = recover_dir(out / CHECKPOINT)
    resumed = resume and ckpt is not None
    if resumed and ckpt is not None:  # (resumed implies a checkpoint)
        start_step, history, timings = _load_checkpoint(ckpt, cfg, adapter, lenses, optimizer,
                                                        stream)
        if is_main:
            print(f"resumed from {ckpt} at step {start_step}/{plan.total_steps}"
                  + (f" on {world} ranks" if world > 1 else ""))
    elif ckpt is not None:
        raise CheckpointError(
            f"{out} already holds a checkpoint; pass --resume to continue it or choose "
            "another --out"
        )
    rows = iter(stream)  # one iterator for the whole run: the stream's state follows it
    if not resumed:
        if cfg.init == "closed-form" and cfg.init_tokens > 0:
            t0 = time.perf_counter()
            _closed_form_phase(cfg, adapter, lenses, rows, dist, progress and is_main,
                               n_batches=plan.init_batches)
            timings["closed_form_s"] = time.perf_counter() - t0
        if is_main:
            _save_checkpoint(out / CHECKPOINT, cfg, lenses, optimizer, stream, 0, history,
                             timings)
        if on_step is not None:
            on_step(StepEvent(0, 0, lenses, True, rank))

    t_train = time.perf_counter()
    readout = Readout(adapter.unembed)  # owns the loss's W_U copy and reused buffers
    bar = _progress(cfg, start_step, progress and is_main, total=plan.total_steps)
    tokens_done = start_step * plan.accumulation * cfg.micro_tokens * world
    for step in range(start_step, plan.total_steps):
        t_step = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.optimizer_settings()["lr"] * lr_factor(step, cfg, plan.total_steps)
        step_kl = {name: torch.zeros(adapter.n_layers) for name in lenses}
        for micro in range(plan.accumulation):
            batch = _next_batch(rows, cfg, tokens_done)
            hs = adapter.hidden_states(batch)
            layer_h, final_h = split_hidden(hs, adapter.n_layers)
            kls = _loss(cfg, lenses, layer_h, final_h, adapter.unembed, readout,
                        scale=1.0 / plan.accumulation, draw=(step, micro, rank))
            for name, kl in kls.items():
                step_kl[name] += kl / plan.accumulation
            tokens_done += batch.numel() * world
        if dist is not None:  # once per step, after accumulation: micro-batches never sync
            dist.all_reduce_grads(params)
            step_kl = {name: dist.average(kl) for name, kl in step_kl.items()}  # for the log
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t_step
        record = {
            "step": step + 1,
            "tokens": tokens_done,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": dt,
            "kl_mean": {name: float(kl.mean()) for name, kl in step_kl.items()},
        }
        history.append(record)
        if bar is not None:
            first = next(iter(step_kl))
            bar.set_postfix(
                loss=f"{record['kl_mean'][first]:.3f}",
                tok_s=f"{plan.accumulation * cfg.micro_tokens * world / dt:.0f}",
            )
            bar.update(1)
        if is_main and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == plan.total_steps):
            timings["kl_train_s"] = timings.get("kl_train_s", 0.0) + (
                time.perf_counter() - t_train)
            t_train = time.perf_counter()
            _save_checkpoint(out / CHECKPOINT, cfg, lenses, optimizer, stream, step + 1,
                             history, timings)
        if on_step is not None:
            saved = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == plan.total_steps
            on_step(StepEvent(step + 1, tokens_done, lenses, saved, rank))
    if bar is not None:
        bar.close()
    if is_main:
        for name, lens in lenses.items():
            save_lens(lens, out / "lenses" / name)
        (out / "train_history.json").write_text(json.dumps(
            {"config": cfg.to_dict(), "history": history, "timings": timings}, indent=2))
    _barrier(dist)  # every rank returns only once rank 0's lenses are on disk
    return TrainResult(lenses=lenses, out=out, history=history, timings=timings)


@dataclass
class StepEvent:
    """What `train(on_step=...)` sees after a step: the optimizer step count (0 = the
    initial state), global tokens trained so far, the live lenses (do not modify them),
    whether this step's checkpoint was written, and this process's rank."""

    step: int
    tokens: int
    lenses: dict[str, Lens]
    checkpointed: bool
    rank: int


def _loss(cfg: TrainConfig, lenses: dict, layer_h: Tensor, final_h: Tensor,
          unembed: Unembed, readout: Readout, *, scale: float,
          draw: tuple[int, int, int] = (0, 0, 0)) -> dict[str, Tensor]:
    """One micro-batch of the configured KL loss, gradients accumulated into the lenses.

    `draw` (step, micro-batch, rank) seeds the subset loss's tail samples, so a resumed
    run draws exactly what the uninterrupted one would have."""
    if cfg.loss == "reference":
        return kl_loss_backward(lenses, layer_h, final_h, unembed, scale=scale,
                                token_chunk=cfg.token_chunk)
    if cfg.loss == "subset":
        step, micro, rank = draw
        gen = torch.Generator(device=layer_h.device).manual_seed(
            hash((cfg.seed, step, micro, rank)) % 2**63)
        return subset_kl_loss_backward(lenses, layer_h, final_h, unembed, scale=scale,
                                       token_chunk=cfg.token_chunk, k=cfg.subset_k,
                                       tail_samples=cfg.subset_tail, generator=gen,
                                       workspace=readout.workspace)
    return fused_kl_loss_backward(lenses, layer_h, final_h, unembed, scale=scale,
                                  token_chunk=cfg.token_chunk, readout=readout)


def _next_batch(rows: Iterator[Tensor], cfg: TrainConfig, tokens_done: int) -> Tensor:
    batch = []
    for _ in range(cfg.batch_size):
        try:
            batch.append(next(rows))
        except StopIteration:
            raise DataExhaustedError(
                f"data ran out after {tokens_done:,} training tokens of the requested "
                f"{cfg.tokens:,}; add data (--data) or lower --tokens"
            ) from None
    return torch.stack(batch)


def _closed_form_phase(cfg: TrainConfig, adapter: ModelAdapter, lenses: dict[str, Lens],
                       rows: Iterator[Tensor], dist: DistContext | None, progress: bool,
                       n_batches: int | None = None) -> None:
    moments = MomentAccumulator(adapter.n_layers, adapter.hidden_size, device=adapter.device)
    if n_batches is None:
        n_batches = max(1, math.ceil(cfg.init_tokens / cfg.micro_tokens))
    bar = _bar(n_batches, "closed-form statistics", progress)
    for _ in range(n_batches):
        batch = _next_batch(rows, cfg, moments.n)
        layer_h, final_h = split_hidden(adapter.hidden_states(batch), adapter.n_layers)
        moments.update(layer_h.float(), final_h.float())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if dist is not None:
        dist.all_reduce_moments(moments)
    closed_form_init(lenses.values(), moments, ridge=cfg.ridge)


def _bar(total: int, desc: str, enabled: bool) -> tqdm | None:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True)


def _progress(cfg: TrainConfig, start: int, enabled: bool,
              total: int | None = None) -> tqdm | None:
    total = cfg.total_steps if total is None else total
    bar = _bar(total, "KL fine-tuning", enabled and total > 0)
    if bar is not None:
        bar.update(start)
    return bar


def _barrier(dist: DistContext | None) -> None:
    if dist is not None:
        dist.barrier()


# ------------------------------------------------------------------ checkpoints
def _save_checkpoint(folder: Path, cfg: TrainConfig, lenses: dict[str, Lens],
                     optimizer: torch.optim.Optimizer, stream: PackedTokenStream, step: int,
                     history: list[dict], timings: dict[str, float]) -> None:
    with atomic_dir(folder) as tmp:
        for name, lens in lenses.items():
            save_lens(lens, tmp / "lenses" / name)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        state = {"step": step, "config": cfg.to_dict(), "stream": stream.state_dict(),
                 "history": history, "timings": timings}
        (tmp / "state.json").write_text(json.dumps(state))


# Options that may differ on resume without changing the result.
_RESUME_FREE = {"out", "checkpoint_every", "device", "loss"}


def _load_checkpoint(folder: Path, cfg: TrainConfig, adapter: ModelAdapter,
                     lenses: dict[str, Lens], optimizer: torch.optim.Optimizer,
                     stream: PackedTokenStream) -> tuple[int, list[dict], dict[str, float]]:
    try:
        state = json.loads((folder / "state.json").read_text())
        saved = state["config"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {exc}") from exc
    changed = sorted(k for k, v in cfg.to_dict().items()
                     if k not in _RESUME_FREE and saved.get(k) != v and not (
                         isinstance(v, list) and saved.get(k) == list(v)))
    if changed:
        raise ConfigError(f"cannot resume: options changed since the checkpoint: {changed}")
    for name, lens in lenses.items():
        loaded = load_lens(folder / "lenses" / name, adapter)
        lens.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True)["torch"])
    stream.load_state_dict(state["stream"])
    return int(state["step"]), list(state["history"]), dict(state.get("timings", {}))
