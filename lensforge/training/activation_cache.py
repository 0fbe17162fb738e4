"""Hidden states written once to disk in bf16 and replayed, memory-mapped, for repeated
epochs and rank sweeps (the model's forward pass is then paid only once).

Layout of a cache folder:
    meta.json                 n_layers, hidden_size, model_id, unembed hash, shards
    shard_00000.bin           bf16 hidden states [L+1, n, H] (layer-major), raw bytes
    shard_00000.ids.bin       int32 token ids [n] (for next-token targets)

Disk cost: (L+1)·H·2 bytes of states + 4 bytes of ids per token; for SmolLM2-135M
(L = 30, H = 576) that is 35,716 + 4 bytes per token, i.e. ~35.7 GB per million tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lensforge.errors import DataError, LensMismatchError, ShapeError

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter

META = "meta.json"


def bytes_per_token(n_layers: int, hidden_size: int) -> int:
    """Disk bytes per cached token: bf16 states of L+1 residuals plus an int32 id."""
    return (n_layers + 1) * hidden_size * 2 + 4


@dataclass
class CacheInfo:
    n_layers: int
    hidden_size: int
    model_id: str
    unembed_hash: str | None
    shards: list[dict]

    @property
    def n_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


class ActivationCacheWriter:
    """Append hidden states [L+1, B, T, H] (and ids [B, T]) as bf16 shards; `close()` seals."""

    def __init__(self, folder: str | Path, *, n_layers: int, hidden_size: int,
                 model_id: str = "unknown", unembed_hash: str | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if (self.folder / META).exists():
            raise DataError(f"{self.folder} already holds an activation cache; choose another")
        self.info = CacheInfo(n_layers, hidden_size, model_id, unembed_hash, [])

    @classmethod
    def for_adapter(cls, folder: str | Path, adapter: ModelAdapter) -> ActivationCacheWriter:
        return cls(folder, n_layers=adapter.n_layers, hidden_size=adapter.hidden_size,
                   model_id=adapter.model_id, unembed_hash=adapter.unembedding_hash())

    def append(self, hs: Tensor, ids: Tensor) -> None:
        L1, H = self.info.n_layers + 1, self.info.hidden_size
        if hs.dim() != 4 or hs.shape[0] != L1 or hs.shape[-1] != H:
            raise ShapeError(f"expected hidden states [{L1}, B, T, {H}], got {tuple(hs.shape)}")
        if tuple(ids.shape) != tuple(hs.shape[1:3]):
            raise ShapeError(f"ids {tuple(ids.shape)} do not match states {tuple(hs.shape)}")
        name = f"shard_{len(self.info.shards):05d}"
        flat = hs.flatten(1, 2).to("cpu", torch.bfloat16).contiguous()
        # numpy has no bf16: store the raw 16-bit patterns.
        flat.view(torch.int16).numpy().tofile(self.folder / f"{name}.bin")
        ids.flatten().to(torch.int32).numpy().tofile(self.folder / f"{name}.ids.bin")
        self.info.shards.append({"name": name, "tokens": int(flat.shape[1]),
                                 "seq_len": int(hs.shape[2])})

    def close(self) -> CacheInfo:
        tmp = self.folder / (META + ".tmp")
        tmp.write_text(json.dumps(vars(self.info), indent=2))
        tmp.replace(self.folder / META)
        return self.info


def write_cache(folder: str | Path, adapter: ModelAdapter, batches: Iterable[Tensor], *,
                max_tokens: int) -> CacheInfo:
    """Run the model over `batches` ([B, T] ids) until `max_tokens`, caching every state."""
    writer = ActivationCacheWriter.for_adapter(folder, adapter)
    seen = 0
    for batch in batches:
        if seen >= max_tokens:
            break
        writer.append(adapter.hidden_states(batch), batch)
        seen += batch.numel()
    if seen == 0:
        raise DataError("no data to cache: the source produced no full sequence")
    return writer.close()


class ActivationCache:
    """Read side: memory-mapped shards, replayed as (layer_h [L, n, H], final_h [n, H], ids)."""

    def __init__(self, folder: str | Path, adapter: ModelAdapter | None = None) -> None:
        self.folder = Path(folder)
        try:
            meta = json.loads((self.folder / META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{self.folder} is not a finished activation cache: {exc}") from exc
        self.info = CacheInfo(**meta)
        if adapter is not None and (
            adapter.n_layers != self.info.n_layers or adapter.hidden_size != self.info.hidden_size
            or (self.info.unembed_hash and self.info.unembed_hash != adapter.unembedding_hash())
        ):
            raise LensMismatchError(
                f"activation cache {self.folder} was written for {self.info.model_id}, "
                f"not for {adapter.model_id}; write a new cache for this model"
            )

    def __len__(self) -> int:
        return self.info.n_tokens

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("shard_*.bin"))

    def _shard(self, shard: dict) -> tuple[Tensor, Tensor]:
        L1, H, n = self.info.n_layers + 1, self.info.hidden_size, shard["tokens"]
        states = np.memmap(self.folder / f"{shard['name']}.bin", dtype=np.int16, mode="c",
                           shape=(L1, n, H))
        ids = np.fromfile(self.folder / f"{shard['name']}.ids.bin", dtype=np.int32)
        return torch.from_numpy(np.asarray(states)).view(torch.bfloat16), torch.from_numpy(ids)

    def batches(self, tokens_per_batch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """One epoch: (layer_h [L, n, H], final_h [n, H], ids [n]) bf16 blocks of up to
        `tokens_per_batch` tokens (never crossing a shard, so sequences stay whole)."""
        L = self.info.n_layers
        for shard in self.info.shards:
            states, ids = self._shard(shard)
            for start in range(0, shard["tokens"], tokens_per_batch):
                sl = slice(start, start + tokens_per_batch)
                block = states[:, sl]
                yield block[:L], block[L], ids[sl].long()
