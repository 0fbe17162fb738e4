"""lensforge detect: prompt-injection detection from lens trajectories (paper §5.2)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from lensforge.analysis.injection import (
    detect_injections,
    instruction_pairs,
    multiple_choice_pairs,
)
from lensforge.cli.common import (
    HelpFormatter,
    add_model_args,
    load_model_from_args,
    parse_lens_specs,
    positive,
)
from lensforge.lenses import LogitLens, load_lens


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect", help="detect prompt injections from lens trajectories",
        description="Builds clean/injected prompt pairs, takes each lens's per-layer "
                    "prediction at the answer position, fits Isolation Forest and LOF on "
                    "clean prompts only and reports AUROC (bootstrap CI) on held-out clean vs "
                    "injected prompts, against a Mahalanobis baseline on the final hidden "
                    "state. Writes OUT/detect.json, detect.csv and detect.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("lenses", nargs="*", help="lens folders, as PATH or NAME=PATH "
                                             "(the logit lens is always included)")
    add_model_args(p)
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
    p.add_argument("--allow-mismatch", action="store_true")
    p.add_argument("--out", default="runs/detect", help="output folder")
    p.set_defaults(func=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    adapter = load_model_from_args(args)
    lenses = {"logit": LogitLens.from_model(adapter)}
    for name, path in parse_lens_specs(args.lenses).items():
        lenses[name] = load_lens(path, adapter, allow_mismatch=args.allow_mismatch)
    if args.prompts == "mc":
        pairs = multiple_choice_pairs(args.n, seed=args.seed)
    else:
        from lensforge.data import alpaca_instructions

        pairs = instruction_pairs(alpaca_instructions(), adapter.tokenizer, args.n, seed=args.seed)
    features = args.features or ("answer" if args.prompts == "mc" else "kl")
    result = detect_injections(adapter, lenses, pairs, features=features,
                               train_fraction=args.train_fraction, n_boot=args.bootstrap,
                               seed=args.seed, batch_size=args.batch_size)
    result["info"].update({"model": adapter.model_id, "prompts": args.prompts,
                           "example_clean": pairs[0].clean, "example_injected": pairs[0].injected})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "detect.json").write_text(json.dumps(result, indent=2))
    with open(out / "detect.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
        writer.writeheader()
        writer.writerows(result["rows"])
    plot_roc(result, out / "detect.png", title=f"{adapter.model_id}: injection detection "
                                               f"({args.prompts}, {features} features)")
    print(f"{'features':<16}{'detector':<13}{'AUROC':>7}  95% CI")
    for row in result["rows"]:
        print(f"{row['features']:<16}{row['detector']:<13}{row['auroc']:>7.3f}  "
              f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
    print(f"wrote {out / 'detect.json'}, {out / 'detect.csv'}, {out / 'detect.png'}")
    return 0


def plot_roc(result: dict, path: Path, *, title: str) -> None:
    """ROC curve per (features, detector), with the AUROC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import roc_curve

    from lensforge.viz.curves import lens_color

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for row in result["rows"]:
        s = result["scores"][f"{row['features']}/{row['detector']}"]
        labels = np.r_[np.zeros(len(s["clean"])), np.ones(len(s["injected"]))]
        fpr, tpr, _ = roc_curve(labels, np.r_[s["clean"], s["injected"]])
        style = {"iforest": "-", "lof": "--", "mahalanobis": ":"}[row["detector"]]
        color = "black" if row["features"] == "final_hidden" else lens_color(row["features"])
        ax.plot(fpr, tpr, style, color=color,
                label=f"{row['features']} {row['detector']} ({row['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], color="#cccccc", lw=0.8)
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (injected flagged)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
