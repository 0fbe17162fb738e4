"""lensforge causal-basis: causal basis extraction and causal fidelity (Tuned Lens §4).

Per layer, k orthonormal directions of h_l whose ablation most increases the lens's KL (greedy,
Adam on the unit sphere), their energies, and each direction's influence on the model's final
output when ablated in the residual stream (Spearman per layer). Writes OUT/causal_basis.json,
causal_basis.csv, bases.safetensors and fidelity.png.
"""

from __future__ import annotations

import argparse

from safetensors.torch import save_file

from lensforge.analysis.causal_basis import ABLATIONS, causal_basis_report
from lensforge.cli.common import add_data_args, positive
from lensforge.cli.study import Report, Study, study_parser
from lensforge.cli.study_inputs import parse_layers, token_batches
from lensforge.errors import ConfigError
from lensforge.lenses import load_lens
from lensforge.viz.study_figures import plot_causal_fidelity


def register(sub: argparse._SubParsersAction) -> None:
    p = study_parser(sub, "causal-basis", run_causal_basis, __doc__, out="causal_basis",
                     lens_args=("lens",), check=_check,
                     help="causal basis extraction + causal fidelity per layer")
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


def _check(args: argparse.Namespace) -> None:
    if args.steps < 0:
        raise ConfigError("--steps must be >= 0")


def run_causal_basis(study: Study) -> Report:
    args, adapter = study.args, study.adapter
    lens = load_lens(args.lens, adapter, allow_mismatch=args.allow_mismatch)
    layers = parse_layers(args.layers, adapter.n_layers)
    if args.k > adapter.hidden_size:
        raise ConfigError(f"-k {args.k} exceeds the hidden size {adapter.hidden_size}")
    batches = token_batches(adapter, args.data, args.text_field, args.seq_len, args.batch_size,
                            args.tokens)
    result = causal_basis_report(
        adapter, lens, batches, layers, args.k, ablation=args.ablation, steps=args.steps,
        lr=args.lr, tokens_per_step=args.tokens_per_step, fidelity=not args.no_fidelity,
        vocab_subset=args.vocab_subset, seed=args.seed, progress=print)
    bases = result["bases"]
    output: dict[str, object] = {k: v for k, v in result.items() if k != "bases"}
    output["lens"] = str(args.lens)
    rows = []
    for row in result["layers"]:
        influence = row.get("model_influence", [float("nan")] * len(row["energies"]))
        rows += [(row["layer"], i, f"{e:.6g}", f"{m:.6g}")
                 for i, (e, m) in enumerate(zip(row["energies"], influence, strict=True))]
    report = Report()
    report.json("causal_basis.json", output)
    report.csv("causal_basis.csv", ("layer", "direction", "energy", "model_influence"), rows)
    report.file("bases.safetensors", lambda path: save_file(
        {f"layer_{layer}": d.contiguous() for layer, d in bases.items()}, str(path)))
    if not args.no_fidelity:
        report.figure("fidelity.png", plot_causal_fidelity, output)
    return report
