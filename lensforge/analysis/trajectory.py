"""Prediction trajectories: what every layer's lens predicts at every position of a text.

A `PredictionTrajectory` holds, for one token sequence and one or more lenses, a grid of
R = L + 1 rows × T positions: rows 0..L-1 are the lens applied to h_l (the residual entering
block l), row L is the model's own output. Per cell it keeps the top-k tokens and
probabilities and the statistics of the tuned-lens paper's Figure 1:

- `entropy`     H(q_l) in nats;
- `kl`          KL(p_L ‖ q_l) to the model's final distribution, in nats (0 on row L);
- `max_prob`    the top-1 probability;
- `ce`          −log q_l(true next token) in nats (NaN at the last position);
- `rank`        rank of the true next token, 0 = top-1 (−1 at the last position).

Data flows one way: ids → `ModelAdapter.hidden_states` → lens → per-layer log-probs →
statistics. This module holds the trajectory (builders, views, JSON I/O); the per-lens grid
and its computation live in `trajectory_grid`, long-text windowing in `windows`, and token
display text in `lensforge.viz.tokens`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lensforge.analysis.trajectory_grid import STATS, LensTrajectory, lens_grids, slice_grid
from lensforge.analysis.windows import (
    next_tokens,
    pad_id,
    padded_batches,
    plan_pieces,
    window_and_stride,
)
from lensforge.errors import ConfigError, DataError, NonFiniteError, ShapeError
from lensforge.viz.tokens import short_token, token_decoder, visible_token

if TYPE_CHECKING:
    from lensforge.lenses import Lens
    from lensforge.models.adapter import ModelAdapter, Unembed

# STATS, LensTrajectory and the token display helpers lived here before the split into
# trajectory_grid / viz.tokens; they stay importable from here.
__all__ = ["STATS", "LensTrajectory", "PredictionTrajectory", "short_token", "token_decoder",
           "visible_token"]


@dataclass
class PredictionTrajectory:
    """Layer × position predictions of several lenses on one token sequence.

    `tokens[t]` is the decoded text of input token t; `token_text[id]` the decoded text of
    every id that appears (inputs, targets and top-k predictions). `targets[t]` is the
    true next token (input_ids[t+1]), -1 at the last position.
    """

    input_ids: Tensor  # [T] long
    targets: Tensor  # [T] long
    lenses: dict[str, LensTrajectory]
    token_text: dict[int, str] = field(default_factory=dict)
    model_id: str = "unknown"
    source: str = ""

    # -------------------------------------------------------------- views
    @property
    def n_positions(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_rows(self) -> int:
        return int(next(iter(self.lenses.values())).entropy.shape[0])

    @property
    def layer_labels(self) -> list[str]:
        """Row labels: '0'..'L-1' for the lens on h_l, 'out' for the model output."""
        return [str(i) for i in range(self.n_rows - 1)] + ["out"]

    @property
    def tokens(self) -> list[str]:
        return [self.text_of(int(i)) for i in self.input_ids]

    def text_of(self, token_id: int) -> str:
        return self.token_text.get(token_id, f"#{token_id}")

    def top1(self, lens: str) -> list[list[str]]:
        """[R][T] decoded top-1 token of every cell."""
        ids = self.lenses[lens].top_ids[..., 0].tolist()
        return [[self.text_of(i) for i in row] for row in ids]

    def stat_range(self, stat: str, lenses: Iterable[str] | None = None) -> tuple[float, float]:
        """A color range (in the statistic's own units) shared by `lenses` (default all), so
        grids compare. KL and CE top out at the 99th percentile, so one outlier does not
        wash out the grid; entropy and rank at their maximum; max_prob is [0, 1]."""
        names = list(self.lenses) if lenses is None else list(lenses)
        if stat == "max_prob":
            return 0.0, 1.0
        values = torch.cat([self.lenses[n].stat(stat).flatten() for n in names])
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            return 0.0, 1.0
        top = float(torch.quantile(values.double(), 0.99)) if stat in ("kl", "ce") else float(
            values.max())
        return 0.0, max(top, 1e-6 if stat != "rank" else 1.0)

    # ---------------------------------------------------------- builders
    @classmethod
    def from_text(
        cls,
        adapter: ModelAdapter,
        text: str,
        lenses: Mapping[str, Lens] | Sequence[Lens] | None = None,
        **kwargs: Any,
    ) -> PredictionTrajectory:
        """Tokenize `text` with the adapter's tokenizer and build its trajectory.

        Keyword arguments are those of `from_ids` (top_k, max_tokens, window, stride,
        batch_size)."""
        return cls.from_texts(adapter, [text], lenses, **kwargs)[0]

    @classmethod
    def from_texts(
        cls,
        adapter: ModelAdapter,
        texts: Sequence[str],
        lenses: Mapping[str, Lens] | Sequence[Lens] | None = None,
        **kwargs: Any,
    ) -> list[PredictionTrajectory]:
        """Batched `from_text` for several texts (padded windows share forward passes)."""
        tokenizer = getattr(adapter, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError("this model has no tokenizer: pass token ids (from_ids) instead")
        seqs = []
        for text in texts:
            if not text or not text.strip():
                raise DataError("empty text: nothing to show")
            seqs.append(torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long))
        trajs = cls.from_ids(adapter, seqs, lenses, **kwargs)
        assert isinstance(trajs, list)  # a list of sequences in, a list out
        for traj, text in zip(trajs, texts, strict=True):
            traj.source = text
        return trajs

    @classmethod
    def from_ids(
        cls,
        adapter: ModelAdapter,
        input_ids: Tensor | Sequence[int] | Sequence[Tensor],
        lenses: Mapping[str, Lens] | Sequence[Lens] | None = None,
        *,
        top_k: int = 5,
        max_tokens: int | None = None,
        window: int | None = None,
        stride: int | None = None,
        batch_size: int = 4,
    ) -> PredictionTrajectory | list[PredictionTrajectory]:
        """Trajectory of a token sequence ([T] ids) or a list of them (a list in, a list out).

        Args:
            adapter: a ModelAdapter (its tokenizer, if any, decodes tokens).
            input_ids: [T] ids, or a list of [T_i] sequences, or a [B, T] tensor.
            lenses: name -> lens (or a list, named by lens type); default the logit lens.
            top_k: tokens kept per cell.
            max_tokens: clip each sequence to its first `max_tokens` tokens.
            window: longest context per forward pass (default: the model's position limit,
                at most 1024). Longer sequences run as overlapping windows: each later window
                re-reads `window - stride` tokens of context and contributes its last
                `stride` positions, so every position keeps at least that much context.
            stride: new positions per window (default window // 2).
            batch_size: windows per forward pass.
        """
        if isinstance(input_ids, Tensor):
            single = input_ids.dim() == 1
        else:
            single = len(input_ids) > 0 and isinstance(input_ids[0], int)
        if isinstance(input_ids, Tensor):
            seqs = [input_ids] if input_ids.dim() == 1 else list(input_ids)
        elif single:
            seqs = [torch.tensor(list(input_ids), dtype=torch.long)]
        else:
            seqs = [torch.as_tensor(s, dtype=torch.long) for s in input_ids]
        if max_tokens is not None:
            if max_tokens < 1:
                raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
            seqs = [s[:max_tokens] for s in seqs]
        if not seqs or any(s.numel() == 0 for s in seqs):
            raise DataError("empty token sequence: nothing to show")
        named = _name_lenses(adapter, lenses)
        window, stride = window_and_stride(adapter, window, stride)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")

        # Every (sequence, window) piece; pieces of similar length share a padded batch.
        pieces = plan_pieces(seqs, window, stride)
        results: dict[int, dict[str, LensTrajectory]] = {}
        for indices, ids, mask, targets in padded_batches(seqs, pieces, batch_size,
                                                          pad_id(adapter)):
            hs = adapter.hidden_states(ids, attention_mask=mask)  # [L+1, B, W, H]
            grids = lens_grids(hs, named, adapter.unembed, targets, top_k)
            for row, j in enumerate(indices):
                lo, hi = pieces[j].keep_from - pieces[j].start, pieces[j].end - pieces[j].start
                results[j] = {name: slice_grid(grid, row, lo, hi) for name, grid in grids.items()}

        trajs = []
        tokenizer = getattr(adapter, "tokenizer", None)
        for i, seq in enumerate(seqs):
            mine = [j for j, piece in enumerate(pieces) if piece.seq == i]
            per_lens = {name: LensTrajectory.concat([results[j][name] for j in mine])
                        for name in named}
            trajs.append(cls._assemble(seq, per_lens, tokenizer,
                                       getattr(adapter, "model_id", "unknown")))
        return trajs[0] if single else trajs

    @classmethod
    def from_hidden_states(
        cls,
        hidden_states: Tensor,
        lenses: Mapping[str, Lens] | Sequence[Lens],
        *,
        input_ids: Tensor | Sequence[int] | None = None,
        unembed: Unembed | None = None,
        tokenizer: Any = None,
        top_k: int = 5,
        model_id: str = "unknown",
    ) -> PredictionTrajectory | list[PredictionTrajectory]:
        """Trajectory from residual streams computed elsewhere (e.g. another toolkit's cache).

        Args:
            hidden_states: [L+1, T, H] or [L+1, B, T, H] in lensforge's convention: index
                l < L is the residual entering block l, index L the final residual *before*
                the final norm (Hugging Face's `hidden_states[-1]` is usually already normed;
                use the input of the final norm instead).
            lenses: bound lenses (name -> lens, or a list).
            input_ids: [T] or [B, T] ids, for the true-next-token statistics and labels.
            unembed: the model's unembedding (default: the first lens's).
            tokenizer: decodes token ids for display (optional).
        """
        named = _name_lenses(None, lenses)
        first = next(iter(named.values()))
        unembed = unembed if unembed is not None else first.unembed
        n_layers, width = first.config.n_layers, first.config.hidden_size
        single = hidden_states.dim() == 3
        hs = hidden_states[:, None] if single else hidden_states
        if hs.dim() != 4 or hs.shape[0] != n_layers + 1 or hs.shape[-1] != width:
            raise ShapeError(
                f"expected hidden states [{n_layers + 1}, (B,) T, {width}] (L+1 residual "
                f"streams: entering blocks 0..L-1, then the pre-norm final one), got "
                f"{tuple(hidden_states.shape)}")
        if not torch.isfinite(hs).all():
            raise NonFiniteError("NaN/Inf in the supplied hidden states")
        B, T = hs.shape[1], hs.shape[2]
        if input_ids is None:
            ids = torch.full((B, T), -1, dtype=torch.long)
        else:
            ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1, T) if not isinstance(
                input_ids, Tensor) else input_ids.long().reshape(-1, T)
            if ids.shape[0] != B:
                raise ShapeError(f"input_ids {tuple(ids.shape)} do not match hidden states "
                                 f"with batch {B} and {T} positions")
        targets = torch.stack([next_tokens(row) for row in ids])
        dev = next((p.device for p in unembed.parameters()), torch.device("cpu"))
        grids = lens_grids(hs.to(dev), named, unembed, targets, top_k)
        trajs = [cls._assemble(ids[b], {n: slice_grid(g, b, 0, T) for n, g in grids.items()},
                               tokenizer, model_id) for b in range(B)]
        return trajs[0] if single else trajs

    @classmethod
    def _assemble(cls, ids: Tensor, grids: dict[str, LensTrajectory], tokenizer: Any,
                  model_id: str) -> PredictionTrajectory:
        ids = ids.cpu().long()
        used = set(ids.tolist())
        for grid in grids.values():
            used.update(grid.top_ids.flatten().tolist())
        used.discard(-1)
        decode = token_decoder(tokenizer)
        return cls(input_ids=ids, targets=next_tokens(ids), lenses=grids,
                   token_text={i: decode(i) for i in sorted(used)}, model_id=model_id)

    # ------------------------------------------------------------- export
    def to_dict(self, *, digits: int = 4) -> dict:
        """JSON-able dict (NaN -> None); probabilities and statistics rounded to `digits`."""
        def rounded(t: Tensor) -> Any:  # nested lists of float | None
            return _nan_to_none(torch.round(t.float(), decimals=digits).tolist())

        return {
            "model_id": self.model_id,
            "source": self.source,
            "layers": self.layer_labels,
            "input_ids": self.input_ids.tolist(),
            "targets": self.targets.tolist(),
            "token_text": {str(k): v for k, v in self.token_text.items()},
            "lenses": {
                name: {"top_ids": g.top_ids.tolist(), "top_probs": rounded(g.top_probs),
                       **{s: (g.rank.tolist() if s == "rank" else rounded(g.stat(s)))
                          for s in STATS}}
                for name, g in self.lenses.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> PredictionTrajectory:
        """Inverse of `to_dict` (statistics come back at the saved precision)."""
        def grid(values: list, dtype: torch.dtype) -> Tensor:
            return torch.tensor(_none_to_nan(values), dtype=dtype)

        lenses = {
            name: LensTrajectory(
                top_ids=grid(g["top_ids"], torch.long), top_probs=grid(g["top_probs"],
                                                                       torch.float32),
                rank=grid(g["rank"], torch.long),
                **{s: grid(g[s], torch.float32) for s in STATS if s != "rank"})
            for name, g in data["lenses"].items()
        }
        return cls(input_ids=torch.tensor(data["input_ids"]), targets=torch.tensor(
            data["targets"]), lenses=lenses, token_text={int(k): v for k, v in
                                                         data["token_text"].items()},
            model_id=data.get("model_id", "unknown"), source=data.get("source", ""))

    @classmethod
    def load_json(cls, path: str | Path) -> PredictionTrajectory:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def save_json(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), ensure_ascii=False))
        return out


# ------------------------------------------------------------------- helpers
def _name_lenses(adapter: ModelAdapter | None,
                 lenses: Mapping[str, Lens] | Sequence[Lens] | Lens | None) -> dict[str, Lens]:
    if lenses is None:
        if adapter is None:
            raise ConfigError("no lenses given")
        from lensforge.lenses import LogitLens

        return {"logit": LogitLens.from_model(adapter)}
    if isinstance(lenses, Mapping):
        named = dict(lenses)
    else:
        seq = [lenses] if isinstance(lenses, torch.nn.Module) else list(lenses)
        named = {}
        for lens in seq:
            base = getattr(lens, "lens_type", "lens")
            name, n = base, 2
            while name in named:
                name, n = f"{base}{n}", n + 1
            named[name] = lens
    if not named:
        raise ConfigError("no lenses given")
    return named


def _none_to_nan(x: object) -> object:
    if x is None:
        return math.nan
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return x


def _nan_to_none(x: object) -> object:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x
