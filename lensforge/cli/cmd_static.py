"""lensforge static: read parameter vectors through a lens (paper Table 3 analogue).

T(W) = top-k tokens of unembed(lens_l(v)) for MLP output vectors and per-head OV singular
vectors; coherence = mean pairwise cosine of the tokens' input embeddings, against random
vectors, per lens. Writes OUT/static.json, static.csv and static.png.
"""

from __future__ import annotations

import argparse

from lensforge.analysis.static import static_study
from lensforge.cli.common import positive
from lensforge.cli.study import Column, Report, Study, Table, study_parser
from lensforge.errors import ConfigError
from lensforge.viz.study_figures import plot_static

KINDS = ("mlp_out", "ov_out", "ov_in")


def register(sub: argparse._SubParsersAction) -> None:
    p = study_parser(sub, "static", run_static, __doc__, out="static", lenses="*", mismatch=True,
                     check=_kinds,
                     help="top tokens of weight vectors through a lens, with coherence scores")
    p.add_argument("--layers", default=None,
                   help="comma-separated block indices")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    p.add_argument("--top-k", type=positive, default=10, help="tokens per list")
    p.add_argument("--singular", type=positive, default=4, help="singular vectors per head")
    p.add_argument("--max-vectors", type=positive, default=256,
                   help="random subsample of vectors per (layer, kind)")
    p.add_argument("--seed", type=int, default=0)


def _kinds(args: argparse.Namespace) -> list[str]:
    """--kinds as a list; ConfigError for an unknown kind (checked before the model loads)."""
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"unknown kinds {bad}; choose from {', '.join(KINDS)}")
    return kinds


def run_static(study: Study) -> Report:
    args, adapter = study.args, study.adapter
    lenses = study.lenses()
    L = adapter.n_layers
    try:
        layers = ([int(x) for x in args.layers.split(",")] if args.layers else
                  sorted({round(i * (L - 1) / 3) for i in range(4)}))
    except ValueError as exc:
        raise ConfigError(f"--layers must be comma-separated integers, got '{args.layers}'") from exc
    kinds = _kinds(args)
    result = static_study(adapter, lenses, layers, kinds=kinds, top_k=args.top_k,
                          n_singular=args.singular, max_vectors=args.max_vectors, seed=args.seed)
    info = {"model": adapter.model_id, "layers": layers, "kinds": kinds,
            "top_k": args.top_k, "embedding": "model input embeddings (BPEmb offline: n/a)"}
    output = {**result, "info": info}
    report = Report()
    report.json("static.json", output)
    report.records("static.csv", result["rows"], crlf=True)
    report.figure("static.png", plot_static, output,
                  title=f"{adapter.model_id}: coherence of T(W)")
    report.print(Table(
        [Column("lens", "<12"), Column("kind", "<9"), Column("layer", ">6"),
         Column("real", ">8.3f"), Column("random", ">8.3f")],
        [(r["lens"], r["kind"], r["layer"], r["coherence_real"], r["coherence_random"])
         for r in result["rows"]]))
    return report
