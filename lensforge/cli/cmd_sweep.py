"""lensforge sweep: LoRA-Lens rank sweep vs the tuned lens (paper Figs. 2 and 3).

Trains the tuned lens and one LoRA-Lens per k (r = floor(H/k)) against one forward pass,
evaluates all on the same held-out text and reports RAF against the tuned lens and parameter
counts. Writes OUT/sweep.json, sweep.csv, metrics.json/csv, raf_vs_params.png (Fig. 2),
kl_per_layer.png (Fig. 3) and the lenses under OUT/train/lenses/.
"""

from __future__ import annotations

import argparse

from lensforge.analysis.sweep import DEFAULT_KS, run_sweep
from lensforge.cli.common import add_data_args, positive
from lensforge.cli.study import Column, Report, Study, Table, study_parser
from lensforge.training import OPTIMIZER_DEFAULTS, TrainConfig
from lensforge.viz.curves import plot_layer_curves
from lensforge.viz.paper_figures import plot_raf_vs_params

CSV_FIELDS = ("lens", "lens_type", "rank", "k", "parameters", "percent_of_tuned", "mean_kl",
              "raf")


def register(sub: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    p = study_parser(sub, "sweep", run_sweep_cmd, __doc__, out="sweep",
                     help="train LoRA-Lenses at several k plus the tuned lens; RAF vs parameters")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_sweep_cmd(study: Study) -> Report:
    args = study.args
    cfg = TrainConfig(
        model=args.model, data=args.data, text_field=args.text_field,
        init="closed-form" if args.init_tokens > 0 else "zero", init_tokens=args.init_tokens,
        optimizer=args.optimizer, lr=args.lr, tokens=args.tokens,
        tokens_per_step=max(args.tokens_per_step, args.batch_size * args.seq_len),
        batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, dtype=args.dtype,
        device=args.device, out=str(study.out / "train"),
    )
    adapter = study.adapter
    sweep = run_sweep(adapter, cfg, args.ks, eval_data=args.eval_data,
                      eval_tokens=args.eval_tokens, text_field=args.text_field,
                      progress=not args.no_progress, eval_seq_len=args.eval_seq_len,
                      resume=args.resume)
    summary = {k: sweep[k] for k in ("rows", "timings", "lens_dir", "config")}
    summary["model"] = adapter.describe()
    report = Report()
    report.layer_metrics(sweep["results"], listed=())
    report.json("sweep.json", summary)
    report.records("sweep.csv", sweep["rows"], CSV_FIELDS)
    report.figure("raf_vs_params.png", plot_raf_vs_params, sweep["rows"],
                  title=f"{adapter.model_id}: RAF vs parameters")
    report.figure("kl_per_layer.png", plot_layer_curves, sweep["results"], metrics=("kl",),
                  title=f"{adapter.model_id}: per-layer KL")
    report.print(Table(
        [Column("lens", "<12"), Column("rank", ">6"), Column("params", ">12,"),
         Column("% tuned", ">9"), Column("mean KL", ">9.3f"), Column("RAF", ">8")],
        [(r["lens"], r["rank"] or "", r["parameters"],
          "" if r["percent_of_tuned"] is None else f"{r['percent_of_tuned']:.1f}",
          r["mean_kl"], "" if r["raf"] is None else f"{r['raf']:.3f}") for r in sweep["rows"]]))
    return report
