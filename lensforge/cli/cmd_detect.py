"""lensforge detect: prompt-injection detection from lens trajectories (paper §5.2).

Builds clean/injected prompt pairs, takes each lens's per-layer prediction at the answer
position, fits Isolation Forest and LOF on clean prompts only and reports AUROC (bootstrap CI)
on held-out clean vs injected prompts, against a Mahalanobis baseline on the final hidden
state. Writes OUT/detect.json, detect.csv and detect.png.
"""

from __future__ import annotations

import argparse

from lensforge.analysis.injection import (
    detect_injections,
    instruction_pairs,
    multiple_choice_pairs,
)
from lensforge.cli.common import positive
from lensforge.cli.study import Column, Report, Study, Table, study_parser
from lensforge.viz.study_figures import plot_roc


def register(sub: argparse._SubParsersAction) -> None:
    p = study_parser(sub, "detect", run_detect, __doc__, out="detect", lenses="*", mismatch=True,
                     help="detect prompt injections from lens trajectories")
    p.add_argument("--prompts", choices=("mc", "alpaca"), default="mc",
                   help="templated multiple-choice questions, or AlpacaEval instructions")
    p.add_argument("--n", type=positive, default=200, help="prompt pairs")
    p.add_argument("--features", choices=("answer", "kl", "both"), default=None,
                   help="per-layer features")
    p.add_argument("--train-fraction", type=float, default=0.5,
                   help="share of clean prompts used to fit the detectors")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CI")
    p.add_argument("--batch-size", type=positive, default=16)
    p.add_argument("--seed", type=int, default=0)


def run_detect(study: Study) -> Report:
    args, adapter = study.args, study.adapter
    lenses = study.lenses()
    if args.prompts == "mc":
        pairs = multiple_choice_pairs(args.n, seed=args.seed)
    else:
        from lensforge.data import alpaca_instructions

        pairs = instruction_pairs(alpaca_instructions(), adapter.tokenizer, args.n, seed=args.seed)
    features = args.features or ("answer" if args.prompts == "mc" else "kl")
    result = detect_injections(adapter, lenses, pairs, features=features,
                               train_fraction=args.train_fraction, n_boot=args.bootstrap,
                               seed=args.seed, batch_size=args.batch_size)
    info = {**result["info"], "model": adapter.model_id, "prompts": args.prompts,
            "example_clean": pairs[0].clean, "example_injected": pairs[0].injected}
    report = Report()
    report.json("detect.json", {**result, "info": info})
    report.records("detect.csv", result["rows"], crlf=True)
    report.figure("detect.png", plot_roc, result, title=f"{adapter.model_id}: injection "
                  f"detection ({args.prompts}, {features} features)")
    report.print(Table(
        [Column("features", "<16"), Column("detector", "<13"), Column("AUROC", ">7.3f"),
         Column("95% CI", gap="  ")],
        [(r["features"], r["detector"], r["auroc"], f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
         for r in result["rows"]]))
    return report
