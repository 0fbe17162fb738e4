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
statistics. Only one layer's [B, T, V] log-probs are alive at a time, so a 50k vocabulary
and a few thousand positions fit in memory.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lensforge.errors import ConfigError, DataError, NonFiniteError, ShapeError
from lensforge.lenses.readout import Readout
from lensforge.metrics import entropy_from_logprobs, kl_from_logprobs, target_rank

# Statistic keys, in display order: a label, whether lower means "closer to the model", and
# the color scale. KL, CE and rank are heavy-tailed (early layers of the logit lens reach
# tens of nats), so they are colored on log10(1 + x) to keep the later layers readable.
STATS: dict[str, dict[str, object]] = {
    "entropy": {"label": "entropy H(q) [nats]", "lower_is_better": True, "scale": "linear"},
    "kl": {"label": "KL(p_L ‖ q) to final [nats]", "lower_is_better": True, "scale": "log"},
    "max_prob": {"label": "top-1 probability", "lower_is_better": False, "scale": "linear"},
    "ce": {"label": "cross-entropy of true next token [nats]", "lower_is_better": True,
           "scale": "log"},
    "rank": {"label": "rank of true next token (0 = top-1)", "lower_is_better": True,
             "scale": "log"},
}


@dataclass
class LensTrajectory:
    """One lens's grid. Shapes: R = n_layers + 1 rows (last = model output), T positions."""

    top_ids: Tensor  # [R, T, k] long
    top_probs: Tensor  # [R, T, k] float32
    entropy: Tensor  # [R, T] nats
    kl: Tensor  # [R, T] nats, KL(p_L ‖ q_l)
    max_prob: Tensor  # [R, T]
    ce: Tensor  # [R, T] nats, NaN where there is no next token
    rank: Tensor  # [R, T] long, -1 where there is no next token

    def stat(self, name: str) -> Tensor:
        """[R, T] float grid of statistic `name` (one of STATS); rank -1 becomes NaN."""
        if name not in STATS:
            raise ConfigError(f"unknown statistic '{name}'; choose from {', '.join(STATS)}")
        value = getattr(self, name).float()
        if name == "rank":
            value = torch.where(self.rank < 0, torch.nan, value)
        return value

    @staticmethod
    def concat(parts: Sequence[LensTrajectory]) -> LensTrajectory:
        """Join trajectories of consecutive position ranges along T."""
        return LensTrajectory(**{
            name: torch.cat([getattr(p, name) for p in parts], dim=1)
            for name in LensTrajectory.__dataclass_fields__
        })


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
        adapter: object,
        text: str,
        lenses: Mapping[str, torch.nn.Module] | Sequence[torch.nn.Module] | None = None,
        **kwargs: object,
    ) -> PredictionTrajectory:
        """Tokenize `text` with the adapter's tokenizer and build its trajectory.

        Keyword arguments are those of `from_ids` (top_k, max_tokens, window, stride,
        batch_size)."""
        return cls.from_texts(adapter, [text], lenses, **kwargs)[0]

    @classmethod
    def from_texts(
        cls,
        adapter: object,
        texts: Sequence[str],
        lenses: Mapping[str, torch.nn.Module] | Sequence[torch.nn.Module] | None = None,
        **kwargs: object,
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
        for traj, text in zip(trajs, texts, strict=True):
            traj.source = text
        return trajs

    @classmethod
    def from_ids(
        cls,
        adapter: object,
        input_ids: Tensor | Sequence[int] | Sequence[Tensor],
        lenses: Mapping[str, torch.nn.Module] | Sequence[torch.nn.Module] | None = None,
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
        window, stride = _window_and_stride(adapter, window, stride)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")

        # Every (sequence, window) piece; pieces of similar length share a padded batch.
        pieces = []
        for i, seq in enumerate(seqs):
            for start, keep_from, end in _windows(int(seq.numel()), window, stride):
                pieces.append((i, start, keep_from, end))
        order = sorted(range(len(pieces)), key=lambda j: pieces[j][3] - pieces[j][1])
        results: dict[int, dict[str, LensTrajectory]] = {}
        pad = _pad_id(adapter)
        for b0 in range(0, len(order), batch_size):
            batch = [pieces[j] for j in order[b0:b0 + batch_size]]
            width = max(end - start for _, start, _, end in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            targets = torch.full((len(batch), width), -1, dtype=torch.long)
            for row, (i, start, _, end) in enumerate(batch):
                n = end - start
                ids[row, :n] = seqs[i][start:end]
                mask[row, :n] = 1
                targets[row, :n] = _next_tokens(seqs[i])[start:end]
            hs = adapter.hidden_states(ids, attention_mask=mask)  # [L+1, B, W, H]
            grids = _lens_grids(hs, named, adapter.unembed, targets, top_k)
            for row, (_, start, keep_from, end) in enumerate(batch):
                lo, hi = keep_from - start, end - start
                results[order[b0 + row]] = {
                    name: _slice(grid, row, lo, hi) for name, grid in grids.items()}

        trajs = []
        tokenizer = getattr(adapter, "tokenizer", None)
        for i, seq in enumerate(seqs):
            mine = [j for j in range(len(pieces)) if pieces[j][0] == i]
            lens_grids = {name: LensTrajectory.concat([results[j][name] for j in mine])
                          for name in named}
            trajs.append(cls._assemble(seq, lens_grids, tokenizer,
                                       getattr(adapter, "model_id", "unknown")))
        return trajs[0] if single else trajs

    @classmethod
    def from_hidden_states(
        cls,
        hidden_states: Tensor,
        lenses: Mapping[str, torch.nn.Module] | Sequence[torch.nn.Module],
        *,
        input_ids: Tensor | Sequence[int] | None = None,
        unembed: torch.nn.Module | None = None,
        tokenizer: object | None = None,
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
        targets = torch.stack([_next_tokens(row) for row in ids])
        dev = next((p.device for p in unembed.parameters()), torch.device("cpu"))
        grids = _lens_grids(hs.to(dev), named, unembed, targets, top_k)
        trajs = [cls._assemble(ids[b], {n: _slice(g, b, 0, T) for n, g in grids.items()},
                               tokenizer, model_id) for b in range(B)]
        return trajs[0] if single else trajs

    @classmethod
    def _assemble(cls, ids: Tensor, grids: dict[str, LensTrajectory], tokenizer: object | None,
                  model_id: str) -> PredictionTrajectory:
        ids = ids.cpu().long()
        used = set(ids.tolist())
        for grid in grids.values():
            used.update(grid.top_ids.flatten().tolist())
        used.discard(-1)
        decode = token_decoder(tokenizer)
        return cls(input_ids=ids, targets=_next_tokens(ids), lenses=grids,
                   token_text={i: decode(i) for i in sorted(used)}, model_id=model_id)

    # ------------------------------------------------------------- export
    def to_dict(self, *, digits: int = 4) -> dict:
        """JSON-able dict (NaN -> None); probabilities and statistics rounded to `digits`."""
        def rounded(t: Tensor) -> list:
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


# ------------------------------------------------------------------- compute
@torch.no_grad()
def _lens_grids(hs: Tensor, lenses: Mapping[str, torch.nn.Module], unembed: torch.nn.Module,
                targets: Tensor, top_k: int) -> dict[str, LensTrajectory]:
    """hs [L+1, B, T, H], targets [B, T] (-1 = none) -> name -> LensTrajectory with
    [R, B, T(, k)] tensors (sliced per sequence by the caller)."""
    n_layers = hs.shape[0] - 1
    readout = Readout(unembed)
    final_lp = readout.final_logprobs(hs[n_layers])  # [B, T, V] fp32
    vocab = final_lp.shape[-1]
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"top_k must be in [1, {vocab}], got {top_k}")
    if not torch.isfinite(final_lp).all():
        raise NonFiniteError("NaN/Inf in the model's output logits")
    valid = targets >= 0
    safe_targets = targets.clamp(min=0).to(final_lp.device)
    if int(safe_targets.max()) >= vocab:
        raise ShapeError("a token id is outside the model's vocabulary")
    final_row = _row_stats(final_lp, final_lp, safe_targets, valid, top_k)
    out = {}
    for name, lens in lenses.items():
        rows = [_row_stats(lp, final_lp, safe_targets, valid, top_k)
                for _, lp in readout.layer_logprobs(lens, hs[:n_layers])]
        rows.append(final_row)
        out[name] = LensTrajectory(**{
            key: torch.stack([row[key] for row in rows]).cpu() for key in rows[0]})
    return out


def _row_stats(lp: Tensor, final_lp: Tensor, targets: Tensor, valid: Tensor,
               top_k: int) -> dict[str, Tensor]:
    """One layer: log-probs [B, T, V] -> per-cell statistics [B, T(, k)]."""
    top = lp.topk(top_k, dim=-1)
    valid = valid.to(lp.device)
    ce = -lp.gather(-1, targets[..., None])[..., 0]
    rank = target_rank(lp, targets)
    probs = top.values.exp()
    return {
        "top_ids": top.indices,
        "top_probs": probs,
        "entropy": entropy_from_logprobs(lp),
        "kl": kl_from_logprobs(final_lp, lp),
        "max_prob": probs[..., 0],
        "ce": torch.where(valid, ce, torch.nan),
        "rank": torch.where(valid, rank, -1),
    }


def _slice(grid: LensTrajectory, b: int, lo: int, hi: int) -> LensTrajectory:
    return LensTrajectory(**{name: getattr(grid, name)[:, b, lo:hi]
                             for name in LensTrajectory.__dataclass_fields__})


def _next_tokens(ids: Tensor) -> Tensor:
    """[T] -> [T]: ids shifted left, -1 at the end."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    return torch.cat([ids[1:], torch.full((1,), -1, dtype=torch.long)])


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, keep_from, end) per window covering positions 0..n-1 exactly once."""
    out, start, covered = [], 0, 0
    while covered < n:
        end = min(start + window, n)
        out.append((start, covered, end))
        covered = end
        start += stride
    return out


def _window_and_stride(adapter: object, window: int | None, stride: int | None) -> tuple[int, int]:
    if window is None:
        limit = getattr(getattr(adapter, "config", None), "max_position_embeddings", None)
        window = min(int(limit), 1024) if limit else 1024
    if stride is None:
        stride = max(1, window // 2)
    if window < 1 or not 1 <= stride <= window:
        raise ConfigError(f"need window >= 1 and 1 <= stride <= window, got {window}, {stride}")
    return window, stride


def _pad_id(adapter: object) -> int:
    tok = getattr(adapter, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    if pad is None:
        pad = getattr(tok, "eos_token_id", None) if tok is not None else None
    return int(pad) if pad is not None and pad < adapter.vocab_size else 0


def _name_lenses(adapter: object | None, lenses: object) -> dict[str, torch.nn.Module]:
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


# ------------------------------------------------------------------- tokens
@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character -> byte ('Ġ' -> 0x20)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_decoder(tokenizer: object | None):  # noqa: ANN201 - returns a cached callable
    """id -> the token's text as the model would print it.

    Byte-level BPE pieces ('Ġthe') and SentencePiece pieces ('▁the') become ' the'. A token
    holding part of a UTF-8 character cannot be printed alone; its bytes are shown as
    `\\xe2\\x80` escapes instead of a replacement character."""
    if tokenizer is None:
        return lambda i: f"#{i}"

    @functools.cache
    def decode(token_id: int) -> str:
        try:
            text = tokenizer.decode([token_id], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
        except Exception:  # noqa: BLE001 - a broken id shows as its number, not a crash
            return f"#{token_id}"
        if "\ufffd" not in text:
            return text
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            byte_map = _byte_level_decoder()
            match = _SP_BYTE.match(piece)
            if match:
                raw = bytes([int(match.group(1), 16)])
            elif piece and all(c in byte_map for c in piece):
                raw = bytes(byte_map[c] for c in piece)
            else:
                return text
            return raw.decode("utf-8", errors="backslashreplace")
        return text

    return decode


VISIBLE_WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍", "\u00a0": "⍽"}


def visible_token(text: str) -> str:
    """Token text with whitespace made visible (␣ ↵ ⇥) and control characters escaped;
    other characters, non-ASCII included, are kept as they are. '' becomes '∅'."""
    if not text:
        return "∅"
    out = []
    for ch in text:
        if ch in VISIBLE_WHITESPACE:
            out.append(VISIBLE_WHITESPACE[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
    return "".join(out)


def short_token(text: str, max_chars: int = 8) -> str:
    """`visible_token`, cut to `max_chars` characters with a trailing '…'."""
    vis = visible_token(text)
    return vis if len(vis) <= max_chars else vis[: max_chars - 1] + "…"
