"""lensforge subspace: ablate W_U's output / internal SVD subspaces (research note H0/H1).

SVD of W_U: output subspace = top-m right singular vectors, internal = the rest. Per layer,
KL(lens || lens with internal removed) and KL(lens || lens with output removed) in lens-aligned
space for each lens, and the same two projections removed from h_l in the model's residual
stream (KL of the model's final output). Projections act before the final norm. Writes
OUT/subspace.json, subspace.csv and subspace.png.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from lensforge.analysis.subspace import (
    lens_subspace_ablation,
    output_basis,
    residual_subspace_ablation,
)
from lensforge.cli.common import add_data_args, parse_lens_specs, positive
from lensforge.cli.study import Column, Report, Study, Table, study_parser
from lensforge.cli.study_inputs import first_tokens, parse_layers, token_batches
from lensforge.viz.study_figures import plot_subspace


def register(sub: argparse._SubParsersAction) -> None:
    p = study_parser(sub, "subspace", run_subspace, __doc__, out="subspace", lenses="*",
                     lens_help="lens folders as PATH or NAME=PATH (default: the logit lens)",
                     help="W_U output/internal subspace ablations per layer")
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


def _table(title: str, layers: list[int], res: Mapping[str, Any]) -> Table:
    return Table([Column("layer", ">5", "  "), Column("", ">19.4f", "  "),
                  Column("", ">17.4f", "  ")],
                 zip(layers, res["remove_internal"], res["remove_output"], strict=True),
                 header=f"{title}: layer  KL(remove internal)  KL(remove output)")


def run_subspace(study: Study) -> Report:
    args, adapter = study.args, study.adapter
    specs = parse_lens_specs(args.lenses or ["logit"])
    lenses = study.lenses(specs, logit=False)
    energy = args.energy if args.m is None and args.energy is not None else None
    if args.m is None and energy is None:
        energy = 0.5
    q_out, q_int, sigma = output_basis(adapter.unembed.weight, m=args.m, energy=energy)
    m = q_out.shape[1]
    res_tokens = args.residual_tokens or args.tokens
    batches = token_batches(adapter, args.data, args.text_field, args.seq_len, args.batch_size,
                            max(args.tokens, res_tokens))
    lens_batches = first_tokens(batches, args.tokens)
    results: dict = {"model_id": adapter.model_id, "hidden_size": adapter.hidden_size, "m": m,
                     "energy_threshold": energy,
                     "energy_share": float((sigma[:m] ** 2).sum() / (sigma**2).sum()),
                     "singular_values": sigma.tolist(),
                     "tokens": sum(b.numel() for b in lens_batches),
                     "lenses": {n: str(p) for n, p in specs.items()}, "lens": {}}
    report = Report()
    rows = []
    for name, lens in lenses.items():
        res = results["lens"][name] = lens_subspace_ablation(adapter, lens, lens_batches, q_out,
                                                             q_int)
        report.print(_table(f"lens {name}", list(range(adapter.n_layers)), res))
        rows += [(f"lens:{name}", i, f"{a:.6g}", f"{b:.6g}") for i, (a, b) in
                 enumerate(zip(res["remove_internal"], res["remove_output"], strict=True))]
    if args.residual_layers != "none":
        layers = parse_layers(args.residual_layers, adapter.n_layers)
        res_batches = first_tokens(batches, res_tokens)
        residual: dict[str, Any] = {
            **residual_subspace_ablation(adapter, res_batches, q_out, q_int, layers),
            "layers": layers, "tokens": sum(b.numel() for b in res_batches)}
        results["residual"] = residual
        report.print(_table("model residual stream", layers, residual))
        rows += [("residual", layer, f"{a:.6g}", f"{b:.6g}") for layer, a, b in
                 zip(layers, residual["remove_internal"], residual["remove_output"], strict=True)]
    report.json("subspace.json", results)
    report.csv("subspace.csv", ("where", "layer", "kl_remove_internal", "kl_remove_output"), rows)
    report.figure("subspace.png", plot_subspace, results)
    return report
