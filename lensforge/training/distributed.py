"""Data-parallel lens training under torchrun, plus optional FSDP2 sharding of the frozen model.

    torchrun --nproc-per-node N -m lensforge train ...

Every rank runs the frozen model on its own shard of the token stream (rank r reads global
sequences r, r+N, ...) and holds a full fp32 copy of the lenses -- they are small, which is
the point of LoRA-Lens. Lens gradients are averaged across ranks once per optimizer step,
after gradient accumulation (so accumulation never communicates). Token budgets
(`--tokens`, `--tokens-per-step`, `--init-tokens`) are global, so a run gives the same
lenses, and resumes, on any world size.

Models too big for one device: `shard_model` wraps each transformer block with FSDP2
`fully_shard` (optionally offloading the shards to CPU). The embedding, final norm and
unembedding stay replicated, because every lens evaluation calls the unembedding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from lensforge.errors import ConfigError

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter
    from lensforge.training.closed_form import MomentAccumulator

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
FSDP_NEEDS_TORCHRUN = (
    "--fsdp needs a torch.distributed job: launch with `torchrun --nproc-per-node N -m "
    "lensforge train ... --fsdp` (N=1 is fine, with --cpu-offload)"
)


def launch_rank() -> int:
    """This process's rank as torchrun set it (RANK); 0 outside torchrun. Readable before
    any process group exists, e.g. so that rank 0 alone prepares the output folder."""
    return int(os.environ.get("RANK", "0"))


def under_torchrun() -> bool:
    """True when torchrun (or any launcher setting RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class DistContext:
    """This process's place in a data-parallel job, and the few collectives training needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | None = None) -> DistContext | None:
        """Join the torchrun job described by the environment; None outside torchrun.

        `device`: "cpu" forces gloo on CPU; "cuda" (or None with CUDA available) uses
        cuda:LOCAL_RANK and nccl.
        """
        if not under_torchrun():
            return None
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        want_cuda = (device or "").startswith("cuda") or (device is None
                                                           and torch.cuda.is_available())
        if want_cuda:
            if not torch.cuda.is_available():
                raise ConfigError(f"--device {device} but this torch build sees no CUDA device")
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are "
                    "visible; lower --nproc-per-node"
                )
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
            backend = "nccl"
        else:
            dev, backend = torch.device("cpu"), "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(backend=backend,
                                     device_id=dev if dev.type == "cuda" else None)
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=dev,
                   backend=backend)

    # ------------------------------------------------------------- collectives
    def all_reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Average gradients over ranks in one collective (flattened into one buffer).

        Each rank's loss is a mean over its own tokens; ranks see equal token counts, so
        the average of their gradients is the gradient of the mean over all tokens.
        """
        if self.world_size == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]).to(self.device)
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.device, g.dtype)
            offset += n

    def average(self, t: Tensor) -> Tensor:
        """Mean of `t` over ranks (for logging rank-local losses as global ones)."""
        if self.world_size == 1:
            return t
        return self._sum(t.clone()) / self.world_size

    def all_reduce_moments(self, moments: MomentAccumulator) -> None:
        """Sum a MomentAccumulator's statistics (n, sum_x, sum_y, xx, xy) over ranks."""
        if self.world_size == 1:
            return
        n = torch.tensor([moments.n], dtype=torch.int64)
        moments.n = int(self._sum(n)[0])
        for name in ("sum_x", "sum_y", "xx", "xy"):
            setattr(moments, name, self._sum(getattr(moments, name)))

    def _sum(self, t: Tensor) -> Tensor:
        # One tensor at a time (xx, xy are [L, H, H] fp64: no concatenated copy); nccl
        # needs the tensor on this rank's GPU.
        work = t.to(self.device)
        tdist.all_reduce(work, op=tdist.ReduceOp.SUM)
        return work.to(t.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            if self.backend == "nccl":
                tdist.barrier(device_ids=[self.device.index])
            else:
                tdist.barrier()

    def close(self) -> None:
        if tdist.is_initialized():
            tdist.destroy_process_group()


# ------------------------------------------------------------------ model sharding
def shard_model(adapter: ModelAdapter, ctx: DistContext | None, *,
                cpu_offload: bool = False) -> dict[str, int]:
    """Shard the frozen model's blocks across ranks with FSDP2 `fully_shard`.

    Returns {"blocks", "block_params", "local_block_params"} (this rank's share).

    Each block's parameters are split N ways and all-gathered just for that block's forward
    (then freed again), so a rank holds 1/N of the blocks plus one gathered block at a time.
    With `cpu_offload` the shards live in CPU memory and are copied in per block. The
    embedding, final norm and unembedding stay whole on every rank: the lens calls the
    unembedding L times per batch, and gathering it each time would cost more than keeping it.
    Load the model on CPU first (`--device cpu` is implied); blocks are moved to the device here.
    """
    if ctx is None:
        raise ConfigError(FSDP_NEEDS_TORCHRUN)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    except ImportError as exc:  # pragma: no cover - torch < 2.6
        raise ConfigError(f"--fsdp needs torch >= 2.6 with FSDP2 (fully_shard): {exc}") from exc
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    kwargs: dict = {"mesh": mesh}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda")
    blocks = list(adapter.layers)
    total = sum(p.numel() for block in blocks for p in block.parameters())
    for block in blocks:
        fully_shard(block, **kwargs)
    _move_unsharded(adapter.model, blocks, ctx.device)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                for block in blocks for p in block.parameters())
    return {"blocks": len(blocks), "block_params": total, "local_block_params": local}


def _move_unsharded(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> None:
    """Move every parameter and buffer outside the sharded blocks to `device`, in place."""
    inside = {id(m) for block in blocks for m in block.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for p in module.parameters(recurse=False):
            if p.device != device:
                p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)
