"""lensforge sweep: LoRA-Lens rank sweep vs the tuned lens (paper Figs. 2 and 3)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from lensforge.analysis.sweep import DEFAULT_KS, run_sweep
from lensforge.cli.common import (
    HelpFormatter,
    add_data_args,
    add_model_args,
    load_model_from_args,
    positive,
)
from lensforge.metrics import write_layer_metrics
from lensforge.training import OPTIMIZER_DEFAULTS, TrainConfig
from lensforge.viz.curves import plot_layer_curves
from lensforge.viz.paper_figures import plot_raf_vs_params


def register(sub: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    p = sub.add_parser(
        "sweep", help="train LoRA-Lenses at several k plus the tuned lens; RAF vs parameters",
        description="Trains the tuned lens and one LoRA-Lens per k (r = floor(H/k)) against "
                    "one forward pass, evaluates all on the same held-out text and reports "
                    "RAF against the tuned lens and parameter counts. Writes OUT/sweep.json, "
                    "sweep.csv, metrics.json/csv, raf_vs_params.png (Fig. 2), "
                    "kl_per_layer.png (Fig. 3) and the lenses under OUT/train/lenses/.",
        formatter_class=HelpFormatter,
    )
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--ks", type=positive, nargs="+", default=list(DEFAULT_KS),
                   help="LoRA rank divisors k")
    p.add_argument("--eval-data", default="stdlib:heldout",
                   help="held-out text for the evaluation (same forms as --data)")
    p.add_argument("--eval-tokens", type=positive, default=8192, help="evaluation tokens")
    p.add_argument("--eval-seq-len", type=positive,
                   help="tokens per evaluation sequence")
    p.add_argument("--resume", action="store_true",
                   help="continue (or reuse, once finished) the training run in OUT/train")
    p.add_argument("--init-tokens", type=int, default=d.init_tokens,
                   help="tokens of statistics for the closed-form init (0: zero init)")
    p.add_argument("--tokens", type=int, default=d.tokens,
                   help="KL fine-tuning tokens (0: closed form only)")
    p.add_argument("--tokens-per-step", type=positive, default=d.tokens_per_step)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZER_DEFAULTS), default=d.optimizer)
    p.add_argument("--lr", type=float, help="learning rate (unset: the optimizer's, adamw 1e-3, sgd 0.1)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default="runs/sweep", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_sweep_cmd)


def run_sweep_cmd(args: argparse.Namespace) -> int:
    out = Path(args.out)
    cfg = TrainConfig(
        model=args.model, data=args.data, text_field=args.text_field,
        init="closed-form" if args.init_tokens > 0 else "zero", init_tokens=args.init_tokens,
        optimizer=args.optimizer, lr=args.lr, tokens=args.tokens,
        tokens_per_step=max(args.tokens_per_step, args.batch_size * args.seq_len),
        batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, dtype=args.dtype,
        device=args.device, out=str(out / "train"),
    )
    adapter = load_model_from_args(args)
    sweep = run_sweep(adapter, cfg, args.ks, eval_data=args.eval_data,
                      eval_tokens=args.eval_tokens, text_field=args.text_field,
                      progress=not args.no_progress, eval_seq_len=args.eval_seq_len,
                      resume=args.resume)
    out.mkdir(parents=True, exist_ok=True)
    write_layer_metrics(sweep["results"], out)
    summary = {k: sweep[k] for k in ("rows", "timings", "lens_dir", "config")}
    summary["model"] = adapter.describe()
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    fields = ("lens", "lens_type", "rank", "k", "parameters", "percent_of_tuned", "mean_kl",
              "raf")
    with (out / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fields, lineterminator="\n")
        w.writeheader()
        w.writerows(sweep["rows"])
    fig2 = plot_raf_vs_params(sweep["rows"], out / "raf_vs_params.png",
                              title=f"{adapter.model_id}: RAF vs parameters")
    fig3 = plot_layer_curves(sweep["results"], out / "kl_per_layer.png", metrics=("kl",),
                             title=f"{adapter.model_id}: per-layer KL")
    print(f"{'lens':<12}{'rank':>6}{'params':>12}{'% tuned':>9}{'mean KL':>9}{'RAF':>8}")
    for r in sweep["rows"]:
        pct = "" if r["percent_of_tuned"] is None else f"{r['percent_of_tuned']:.1f}"
        raf = "" if r["raf"] is None else f"{r['raf']:.3f}"
        print(f"{r['lens']:<12}{r['rank'] or '':>6}{r['parameters']:>12,}{pct:>9}"
              f"{r['mean_kl']:>9.3f}{raf:>8}")
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.csv'}, {fig2}, {fig3}")
    return 0
