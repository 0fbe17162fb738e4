"""Per-layer exit thresholds calibrated on the model's own outputs.

The CALM rule uses one confidence threshold for every layer. A lens's confidence is not
equally trustworthy at every depth: early-layer lenses are often confidently wrong (a
closed-form LoRA-Lens on SmolLM2 exits at layer 2-8 with ~50% precision at λ = 0.9), so
one threshold either lets those exits through or blocks good late exits. Calibration
fixes one threshold per exit layer from data:

1. `collect`: on calibration sequences (prompt + the model's own greedy continuation,
   teacher-forced: one forward pass each), record for every generated position and exit
   layer the lens's confidence Δ, its top-1, and the full model's top-1 — both for the
   full [V] distribution and for the screening shortlist (static ids ∪ prompt ∪ history
   and its top-8, as `ScreenedCheck` builds it).
2. `fit_thresholds`: walk the exit layers in order, over the tokens that have not exited
   yet, and pick for layer j the lowest threshold t_j such that the tokens exiting there
   (Δ_j > max(t_j, CALM threshold)) agree with the full model at rate ≥ `target`
   (at least `min_exits` of them, else the layer gets no threshold and is not checked).
   The rule in the decoder is then Δ_j > max(t_j, 0.9·λ + 0.1·exp(−4i/N)).

This is the "calibrated bound" variant of the CALM rule: the guarantee is empirical (on the
calibration set), not distribution-free like CALM's Learn-then-Test; the benchmark measures
agreement on held-out prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lensforge.early_exit.rule import calm_threshold
from lensforge.errors import ConfigError
from lensforge.lenses import Lens

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter


@dataclass
class CalibrationData:
    """Per generated token (rows) and exit layer (columns)."""

    layers: list[int]
    step: Tensor  # [n] generation step i (>= 1) of each token
    target: Tensor  # [n] the full model's top-1
    conf: dict[str, Tensor]  # mode ("full" / "shortlist") -> [n, J] confidence Δ
    top1: dict[str, Tensor]  # mode -> [n, J] the lens's top-1
    n_input: float  # average prompt length (the rule's N)


@torch.no_grad()
def collect(adapter: ModelAdapter, lens: Lens, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
            layers: Sequence[int], *, static: int = 1024, per_step: int = 8) -> CalibrationData:
    """Confidences and top-1s of `lens` at `layers` along (prompt ids, generated ids) pairs."""
    layers = sorted(set(int(j) for j in layers))
    if not layers or layers[0] < 1 or layers[-1] >= adapter.n_layers:
        raise ConfigError(f"calibration layers must lie in 1..{adapter.n_layers - 1}")
    steps, targets = [], []
    conf: dict[str, list[Tensor]] = {"full": [], "shortlist": []}
    top1: dict[str, list[Tensor]] = {"full": [], "shortlist": []}
    V = lens.unembed.weight.shape[0]
    for prompt, tokens in sequences:
        prompt, tokens = list(prompt), list(tokens)
        if len(tokens) < 2:
            continue
        seq = torch.tensor([prompt + tokens[:-1]], device=adapter.device)
        hs = adapter.hidden_states(seq, layers=[*layers, adapter.n_layers])[:, 0]  # [J+1, T, H]
        final = adapter.final_logits(hs[-1]).float()
        first = len(prompt) - 1  # position predicting tokens[0]
        fin = final[first:]  # [n_gen, V]
        # Shortlist membership before each generated token (as ScreenedCheck.observe builds it).
        member = torch.zeros(V, dtype=torch.bool)
        member[: min(static, V)] = True
        member[torch.tensor(prompt)] = True
        masks = []
        for i, t in enumerate(tokens):
            masks.append(member.clone())
            member[t] = True
            if per_step:
                member[fin[i].topk(per_step).indices] = True
        mask = torch.stack(masks[1:])  # tokens 1.. (token 0 comes from the prefill)
        steps.append(torch.arange(1, len(tokens)))
        targets.append(fin[1:].argmax(-1))
        cf, tf, cs, ts = [], [], [], []
        for k, j in enumerate(layers):
            z = lens(hs[k, first + 1 :], j).float()  # [n_gen - 1, V]
            top = torch.softmax(z, -1).topk(2, dim=-1)
            cf.append(top.values[:, 0] - top.values[:, 1])
            tf.append(top.indices[:, 0])
            zs = z.masked_fill(~mask, float("-inf"))
            top = torch.softmax(zs, -1).topk(2, dim=-1)
            cs.append(top.values[:, 0] - top.values[:, 1])
            ts.append(top.indices[:, 0])
        conf["full"].append(torch.stack(cf, 1))
        top1["full"].append(torch.stack(tf, 1))
        conf["shortlist"].append(torch.stack(cs, 1))
        top1["shortlist"].append(torch.stack(ts, 1))
    if not steps:
        raise ConfigError("no calibration sequence has 2 or more generated tokens")
    n_input = sum(len(p) for p, _ in sequences) / len(sequences)
    return CalibrationData(layers, torch.cat(steps), torch.cat(targets),
                           {m: torch.cat(v) for m, v in conf.items()},
                           {m: torch.cat(v) for m, v in top1.items()}, n_input)


def fit_thresholds(data: CalibrationData, target: float, *, mode: str = "shortlist",
                   lam: float = 0.0, min_exits: int = 10) -> dict[int, float]:
    """Per-layer thresholds t_j (see the module docstring); layers without one are left out."""
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target agreement must be in (0, 1], got {target}")
    if mode not in data.conf:
        raise ConfigError(f"unknown mode '{mode}'; use 'full' or 'shortlist'")
    conf, top1 = data.conf[mode], data.top1[mode]
    calm = torch.tensor([calm_threshold(lam, int(i), data.n_input) for i in data.step])
    remaining = torch.ones(conf.shape[0], dtype=torch.bool)
    out: dict[int, float] = {}
    for k, j in enumerate(data.layers):
        c = conf[:, k]
        ok = (top1[:, k] == data.target)
        eligible = remaining & (c > calm)
        cands = c[eligible]
        if cands.numel() < min_exits:
            continue
        order = torch.argsort(cands, descending=True)
        hits = torch.cumsum(ok[eligible][order].float(), 0)
        prec = hits / torch.arange(1, cands.numel() + 1)
        # largest exit set (highest-confidence first) whose precision still meets the target
        good = torch.nonzero(prec >= target).flatten()
        if good.numel() == 0 or int(good[-1]) + 1 < min_exits:
            continue
        n = int(good[-1]) + 1
        sorted_c = cands[order]
        # exit iff Δ > t: t just below the n-th confidence, above the (n+1)-th
        t = float(sorted_c[n]) if n < sorted_c.numel() else float(sorted_c[-1]) - 1e-6
        t = min(max(t, 0.0), float(sorted_c[n - 1]) - 1e-7)
        out[j] = t
        remaining &= ~(c > max(t, 0.0)) | ~(c > calm)
    return out


def simulate(data: CalibrationData, thresholds: dict[int, float], *, mode: str = "shortlist",
             lam: float = 0.0) -> dict[str, float]:
    """Exit rate, mean exit layer and token agreement of the calibrated rule on `data`
    (teacher-forced: ignores the drift that K/V propagation causes in later tokens)."""
    conf, top1 = data.conf[mode], data.top1[mode]
    n = conf.shape[0]
    L_out = torch.full((n,), -1)
    correct = torch.ones(n, dtype=torch.bool)
    calm = torch.tensor([calm_threshold(lam, int(i), data.n_input) for i in data.step])
    for k, j in enumerate(data.layers):
        if j not in thresholds:
            continue
        go = (L_out < 0) & (conf[:, k] > calm) & (conf[:, k] > thresholds[j])
        L_out[go] = j
        correct[go] = top1[go, k] == data.target[go]
    exited = L_out >= 0
    return {"tokens": n, "exit_rate": float(exited.float().mean()),
            "agreement": float(correct.float().mean()),
            "mean_exit_layer_of_exits": float(L_out[exited].float().mean()) if exited.any()
            else float("nan")}


def save_thresholds(path: str | Path, thresholds: dict[int, float], **meta: object) -> None:
    Path(path).write_text(json.dumps({"thresholds": {str(k): v for k, v in thresholds.items()},
                                      **meta}, indent=1))


def load_thresholds(path: str | Path) -> dict[int, float]:
    """{exit layer: threshold} from a file written by `save_thresholds`."""
    try:
        raw = json.loads(Path(path).read_text())["thresholds"]
        return {int(k): float(v) for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read exit thresholds from {path}: {exc}") from None


@torch.no_grad()
def greedy_references(adapter: ModelAdapter, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      batch_size: int = 8) -> list[tuple[list[int], list[int]]]:
    """(prompt, the model's greedy continuation up to EOS) for each prompt, batched with
    left padding through HF `generate`."""
    model: Any = adapter.model  # generate() and generation_config: HF's GenerationMixin
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    pad = getattr(model.generation_config, "pad_token_id", None)
    pad = pad if pad is not None else (min(eos_ids) if eos_ids else 0)
    out = []
    for b in range(0, len(prompts), batch_size):
        rows = [list(p) for p in prompts[b : b + batch_size]]
        T = max(map(len, rows))
        ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], device=adapter.device)
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows],
                            device=adapter.device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        for r, g in zip(rows, gen[:, T:].tolist(), strict=True):
            stop = next((k for k, t in enumerate(g) if t in eos_ids), None)
            out.append((r, g if stop is None else g[: stop + 1]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """python -m lensforge.early_exit.calibrate --lens LENS --out FILE [--target 0.9]:
    per-layer exit thresholds from greedy continuations of AlpacaEval instructions
    (by default 100..147, disjoint from the benchmark's first ones)."""
    import argparse

    from lensforge.data import alpaca_instructions, format_chat
    from lensforge.lenses import load_lens
    from lensforge.models import load_model

    ap = argparse.ArgumentParser(description=(main.__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lens", required=True)
    ap.add_argument("--out", required=True, help="thresholds JSON to write")
    ap.add_argument("--target", type=float, nargs="+", default=[0.9],
                    help="required agreement of the exits at each layer (several: several "
                         "files, OUT with the target appended)")
    ap.add_argument("--mode", choices=("shortlist", "full"), default="shortlist",
                    help="calibrate the confidence of this check")
    ap.add_argument("--layers", type=int, nargs="+", default=None,
                    help="candidate exit layers (default: every 2nd)")
    ap.add_argument("--first", type=int, default=100, help="first AlpacaEval instruction")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--refs", default=None, help="cache of the greedy references (JSON)")
    ap.add_argument("--min-exits", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = load_model(args.model, dtype=args.dtype)
    lens = load_lens(args.lens, adapter)
    refs = None
    if args.refs and Path(args.refs).is_file():
        refs = [(r["prompt"], r["tokens"]) for r in json.loads(Path(args.refs).read_text())]
    if refs is None:
        tok = adapter.tokenizer
        texts = alpaca_instructions()[args.first : args.first + args.prompts]
        prompts = [tok(format_chat(tok, s), add_special_tokens=False).input_ids for s in texts]
        refs = greedy_references(adapter, prompts, args.new_tokens)
        if args.refs:
            Path(args.refs).write_text(json.dumps([{"prompt": p, "tokens": t} for p, t in refs]))
    layers = args.layers or list(range(2, adapter.n_layers, 2))
    data = collect(adapter, lens, refs, layers)
    for target in args.target:
        th = fit_thresholds(data, target, mode=args.mode, min_exits=args.min_exits)
        out = args.out if len(args.target) == 1 else f"{args.out}.{target}"
        fit = simulate(data, th, mode=args.mode)
        save_thresholds(out, th, target=target, mode=args.mode, lens=str(args.lens),
                        prompts=f"AlpacaEval {args.first}..{args.first + args.prompts - 1}",
                        new_tokens=args.new_tokens, fit=fit)
        print(f"target {target}: {fit} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
