"""lensforge run: the main job — train a LoRA-Lens on the default model and corpus,
evaluate it against the logit lens on held-out text, write results and a plot.

Train a LoRA-Lens (k=32) on the built-in model and corpus, evaluate it against the logit lens
on held-out text, write lenses, metrics, plot and an HTML report into OUT.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lensforge.cli.common import add_model_args, load_model_from_args, positive
from lensforge.cli.outdir import claim_out_dir
from lensforge.cli.study import command_parser, evaluate_to_folder
from lensforge.data.sources import check_source
from lensforge.training import TrainConfig, train

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter


def register(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "run", run_main, __doc__,
                       help="the main job: train + evaluate a LoRA-Lens on the default model")
    add_model_args(p)
    p.add_argument("--data", default="general",
                   help="training text: 'general' mixes the Python corpus with AlpacaEval "
                        "instructions and replies; 'stdlib' is the Python corpus alone")
    p.add_argument("--eval-data", nargs="+", default=["stdlib:heldout", "alpaca:heldout"],
                   help="held-out sources; the first writes OUT/metrics.json, each other "
                        "OUT/eval_<name>/metrics.json")
    p.add_argument("--text-field", default="text")
    p.add_argument("-k", type=positive, default=32, help="LoRA rank divisor")
    p.add_argument("--init-tokens", type=int, default=65_536, help="closed-form statistics tokens")
    p.add_argument("--tokens", type=int, default=98_304, help="KL fine-tuning tokens")
    p.add_argument("--tokens-per-step", type=positive, default=2048,
                   help="tokens per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="AdamW learning rate of the KL phase (after the closed form, small steps)")
    p.add_argument("--loss", choices=("fused", "subset"), default="subset",
                   help="KL loss: exact fused, or the sparse subset estimate")
    p.add_argument("--eval-tokens", type=positive, default=4096,
                   help="held-out tokens per --eval-data source")
    p.add_argument("--seq-len", type=positive, default=512)
    p.add_argument("--batch-size", type=positive, default=4)
    p.add_argument("--out", default="runs/main", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in OUT (only files lensforge wrote there)")


def run_main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    cfg = TrainConfig(model=args.model, data=args.data, text_field=args.text_field,
                      lens_types=["lowrank"], k=args.k, init_tokens=args.init_tokens,
                      tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                      tokens_per_step=max(args.tokens_per_step, args.seq_len * args.batch_size),
                      dtype=args.dtype, lr=args.lr, loss=args.loss,
                      out=str(out / "train"))
    cfg.validate()  # every check before the model loads
    for source in (args.data, *args.eval_data):
        check_source(source, text_field=args.text_field)
    claim = claim_out_dir(out, command="run", overwrite=args.overwrite, resume=args.resume)
    try:
        return _run(args, cfg, out, t0)
    finally:
        claim.finish()


def _run(args: argparse.Namespace, cfg: TrainConfig, out: Path, t0: float) -> int:
    adapter = load_model_from_args(args)
    t_load = time.perf_counter() - t0
    result = train(cfg, adapter, resume=args.resume)
    t_train = time.perf_counter() - t0 - t_load
    per_source = {}
    for i, source in enumerate(args.eval_data):
        folder = out if i == 0 else out / f"eval_{source.split(':')[0]}"
        print(f"held-out: {source}")
        per_source[source] = evaluate_to_folder(
            adapter, result.lenses, source, args.text_field, args.seq_len, args.batch_size,
            args.eval_tokens, folder, None)
    results = per_source[args.eval_data[0]]
    timings = {"load_s": t_load, "train_s": t_train, **result.timings,
               "eval_s": time.perf_counter() - t0 - t_load - t_train,
               "total_s": time.perf_counter() - t0}
    lora = next(name for name in results if name.startswith("lora"))
    summary = {
        "model": adapter.describe(),
        "train_config": cfg.to_dict(),
        "timings": timings,
        "mean_kl": {name: res["mean"]["kl"] for name, res in results.items()},
        "mean_kl_by_source": {src: {name: res["mean"]["kl"] for name, res in r.items()}
                              for src, r in per_source.items()},
        "kl_ratio_lora_over_logit": results[lora]["mean"]["kl"] / results["logit"]["mean"]["kl"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_report(out, adapter)
    for src, kl in summary["mean_kl_by_source"].items():
        print(f"mean held-out KL on {src}: logit {kl['logit']:.3f} nats, {lora} {kl[lora]:.3f} nats")
    print(f"phases: load {t_load:.0f} s, train {t_train:.0f} s (closed form "
          f"{timings.get('closed_form_s', 0):.0f} s), eval {timings['eval_s']:.0f} s; "
          f"total {timings['total_s'] / 60:.1f} min")
    return 0


def _write_report(out: Path, adapter: ModelAdapter) -> None:
    """The self-contained HTML report (reuses the loaded model for trajectory samples)."""
    from lensforge.viz.report import write_run_report

    path = write_run_report(out, adapter=adapter)
    print(f"report: {path}")
