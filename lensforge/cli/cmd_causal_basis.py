"""lensforge causal-basis: causal basis extraction and causal fidelity (Tuned Lens §4)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lensforge.analysis.causal_basis import ABLATIONS, causal_basis_report, plot_causal_fidelity
from lensforge.cli.common import (
    HelpFormatter,
    add_data_args,
    add_model_args,
    load_model_from_args,
    positive,
)
from lensforge.data import PackedTokenStream, iter_documents
from lensforge.errors import ConfigError
from lensforge.lenses import load_lens


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "causal-basis", help="causal basis extraction + causal fidelity per layer",
        description="Per layer, k orthonormal directions of h_l whose ablation most increases "
                    "the lens's KL (greedy, Adam on the unit sphere), their energies, and each "
                    "direction's influence on the model's final output when ablated in the "
                    "residual stream (Spearman per layer). Writes OUT/causal_basis.json, "
                    "causal_basis.csv, bases.safetensors and fidelity.png.",
        formatter_class=HelpFormatter,
    )
    add_model_args(p)
    add_data_args(p, default="stdlib:heldout")
    p.add_argument("--lens", default="logit", help="lens folder, or 'logit'")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use a lens trained for another model")
    p.add_argument("--tokens", type=positive, default=2048, help="tokens of cached h_l")
    p.add_argument("--layers", default=None,
                   help="comma-separated layers, or 'every:N'")
    p.add_argument("-k", "--k", type=positive, default=8, help="directions per layer")
    p.add_argument("--ablation", choices=ABLATIONS, default="mean")
    p.add_argument("--steps", type=int, default=200, help="Adam steps per direction")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    p.add_argument("--tokens-per-step", type=positive, default=256,
                   help="random token minibatch per step")
    p.add_argument("--vocab-subset", type=positive, default=None,
                   help="optimize on the N most probable tokens only (cheaper surrogate); "
                        "energies always use the full vocabulary")
    p.add_argument("--no-fidelity", action="store_true",
                   help="skip the model-side ablations (causal fidelity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/causal_basis", help="output folder")
    p.set_defaults(func=run_causal_basis)


def token_batches(adapter, data: str, text_field: str, seq_len: int, batch_size: int,
                  tokens: int) -> list[torch.Tensor]:
    """Held-out token batches [B, T] totalling at least `tokens` tokens."""
    stream = PackedTokenStream(
        lambda: iter_documents(data, text_field=text_field, split="heldout"),
        adapter.tokenizer, seq_len)
    return list(stream.take_tokens(tokens, batch_size))


def parse_layers(spec: str | None, n_layers: int, default_every: int = 5) -> list[int]:
    """'3,7,11' or 'every:N' or 'all' -> sorted layer list in 0..n_layers-1."""
    if spec is None:
        spec = f"every:{default_every}"
    try:
        if spec == "all":
            layers = list(range(n_layers))
        elif spec.startswith("every:"):
            step = int(spec.split(":", 1)[1])
            if step < 1:
                raise ValueError
            layers = list(range(0, n_layers, step))
        else:
            layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError as exc:
        raise ConfigError(f"--layers must be 'all', 'every:N' or a list like 0,5,10; got "
                          f"'{spec}'") from exc
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise ConfigError(f"layers {bad or spec} out of range 0..{n_layers - 1}")
    return layers


def run_causal_basis(args: argparse.Namespace) -> int:
    if args.steps < 0:
        raise ConfigError("--steps must be >= 0")
    adapter = load_model_from_args(args)
    lens = load_lens(args.lens, adapter, allow_mismatch=args.allow_mismatch)
    layers = parse_layers(args.layers, adapter.n_layers)
    if args.k > adapter.hidden_size:
        raise ConfigError(f"-k {args.k} exceeds the hidden size {adapter.hidden_size}")
    batches = token_batches(adapter, args.data, args.text_field, args.seq_len, args.batch_size,
                            args.tokens)
    report = causal_basis_report(
        adapter, lens, batches, layers, args.k, ablation=args.ablation, steps=args.steps,
        lr=args.lr, tokens_per_step=args.tokens_per_step, fidelity=not args.no_fidelity,
        vocab_subset=args.vocab_subset, seed=args.seed, progress=print)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bases = report.pop("bases")
    report["lens"] = str(args.lens)
    save_file({f"layer_{layer}": d.contiguous() for layer, d in bases.items()},
              str(out / "bases.safetensors"))
    (out / "causal_basis.json").write_text(json.dumps(report, indent=2))
    lines = ["layer,direction,energy,model_influence"]
    for row in report["layers"]:
        infl = row.get("model_influence", [float("nan")] * len(row["energies"]))
        lines += [f"{row['layer']},{i},{e:.6g},{m:.6g}"
                  for i, (e, m) in enumerate(zip(row["energies"], infl, strict=True))]
    (out / "causal_basis.csv").write_text("\n".join(lines) + "\n")
    written = [out / "causal_basis.json", out / "causal_basis.csv", out / "bases.safetensors"]
    if not args.no_fidelity:
        plot_causal_fidelity(report, str(out / "fidelity.png"))
        written.append(out / "fidelity.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
