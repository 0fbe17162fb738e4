"""lensforge subspace: ablate W_U's output / internal SVD subspaces (research note H0/H1)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lensforge.analysis.subspace import (
    lens_subspace_ablation,
    output_basis,
    plot_subspace,
    residual_subspace_ablation,
)
from lensforge.cli.cmd_causal_basis import parse_layers, token_batches
from lensforge.cli.common import (
    HelpFormatter,
    add_data_args,
    add_model_args,
    load_model_from_args,
    parse_lens_specs,
    positive,
)
from lensforge.errors import ConfigError
from lensforge.lenses import load_lens


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "subspace", help="W_U output/internal subspace ablations per layer",
        description="SVD of W_U: output subspace = top-m right singular vectors, internal = "
                    "the rest. Per layer, KL(lens || lens with internal removed) and "
                    "KL(lens || lens with output removed) in lens-aligned space for each lens, "
                    "and the same two projections removed from h_l in the model's residual "
                    "stream (KL of the model's final output). Projections act before the final "
                    "norm. Writes OUT/subspace.json, subspace.csv and subspace.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("lenses", nargs="*", help="lens folders as PATH or NAME=PATH "
                                             "(default: the logit lens)")
    add_model_args(p)
    add_data_args(p, default="stdlib:heldout")
    size = p.add_mutually_exclusive_group()
    size.add_argument("-m", "--m", type=positive, help="output subspace size")
    size.add_argument("--energy", type=float, default=None,
                      help="choose m as the fewest singular directions holding this share of "
                           "sum(sigma^2) (default 0.5 when -m is not given)")
    p.add_argument("--tokens", type=positive, default=4096, help="evaluation tokens (lens space)")
    p.add_argument("--residual-tokens", type=positive, default=None,
                   help="tokens for the model-residual ablations")
    p.add_argument("--residual-layers", default="all",
                   help="layers for the residual-stream ablations: 'all', 'every:N' or a list; "
                        "'none' to skip")
    p.add_argument("--allow-mismatch", action="store_true")
    p.add_argument("--out", default="runs/subspace", help="output folder")
    p.set_defaults(func=run_subspace)


def run_subspace(args: argparse.Namespace) -> int:
    adapter = load_model_from_args(args)
    specs = parse_lens_specs(args.lenses or ["logit"])
    lenses = {name: load_lens(path, adapter, allow_mismatch=args.allow_mismatch)
              for name, path in specs.items()}
    energy = args.energy if args.m is None and args.energy is not None else None
    if args.m is None and energy is None:
        energy = 0.5
    q_out, q_int, sigma = output_basis(adapter.unembed.weight, m=args.m, energy=energy)
    m = q_out.shape[1]
    res_tokens = args.residual_tokens or args.tokens
    batches = token_batches(adapter, args.data, args.text_field, args.seq_len, args.batch_size,
                            max(args.tokens, res_tokens))
    lens_batches = _first_tokens(batches, args.tokens)
    results: dict = {"model_id": adapter.model_id, "hidden_size": adapter.hidden_size, "m": m,
                     "energy_threshold": energy,
                     "energy_share": float((sigma[:m] ** 2).sum() / (sigma**2).sum()),
                     "singular_values": sigma.tolist(),
                     "tokens": sum(b.numel() for b in lens_batches),
                     "lenses": {n: str(p) for n, p in specs.items()}, "lens": {}}
    for name, lens in lenses.items():
        results["lens"][name] = lens_subspace_ablation(adapter, lens, lens_batches, q_out, q_int)
        _print_table(f"lens {name}", list(range(adapter.n_layers)), results["lens"][name])
    if args.residual_layers != "none":
        layers = parse_layers(args.residual_layers, adapter.n_layers)
        res_batches = _first_tokens(batches, res_tokens)
        residual = residual_subspace_ablation(adapter, res_batches, q_out, q_int, layers)
        residual["layers"] = layers
        residual["tokens"] = sum(b.numel() for b in res_batches)
        results["residual"] = residual
        _print_table("model residual stream", layers, residual)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "subspace.json").write_text(json.dumps(results, indent=2))
    lines = ["where,layer,kl_remove_internal,kl_remove_output"]
    for name, res in results["lens"].items():
        lines += [f"lens:{name},{i},{a:.6g},{b:.6g}" for i, (a, b) in
                  enumerate(zip(res["remove_internal"], res["remove_output"], strict=True))]
    if "residual" in results:
        r = results["residual"]
        lines += [f"residual,{layer},{a:.6g},{b:.6g}" for layer, a, b in
                  zip(r["layers"], r["remove_internal"], r["remove_output"], strict=True)]
    (out / "subspace.csv").write_text("\n".join(lines) + "\n")
    plot_subspace(results, str(out / "subspace.png"))
    print(f"wrote {out / 'subspace.json'}, {out / 'subspace.csv'}, {out / 'subspace.png'}")
    return 0


def _first_tokens(batches: list, tokens: int) -> list:
    out, seen = [], 0
    for b in batches:
        if seen >= tokens:
            break
        out.append(b)
        seen += b.numel()
    if not out:
        raise ConfigError("no data")
    return out


def _print_table(title: str, layers: list[int], res: dict) -> None:
    print(f"{title}: layer  KL(remove internal)  KL(remove output)")
    for layer, a, b in zip(layers, res["remove_internal"], res["remove_output"], strict=True):
        print(f"  {layer:>5}  {a:>19.4f}  {b:>17.4f}")
