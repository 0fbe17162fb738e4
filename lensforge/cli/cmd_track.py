"""lensforge track: spectrum, held-out KL and RAF along training, per recipe (issue 15).

Trains the tuned lens and LoRA-Lenses (one per k) with each recipe — tuned-lens (SGD,
Nesterov, from zero), lora-lens (AdamW from zero), lensforge (closed form, then AdamW) — and
at step 0 and each milestone saves the lenses and records held-out KL, RAF against the
recipe's tuned lens and the spectrum metrics of `lensforge spectrum`. Writes OUT/track.json,
track.csv, tracking.png and OUT/RECIPE/milestones/TOKENS/LENS.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from lensforge.analysis.tracking import (
    RECIPES,
    TrackConfig,
    TrackRow,
    check_resume,
    read_track,
    track,
)
from lensforge.cli.common import add_model_args, load_model_from_args, positive
from lensforge.cli.outdir import claim_out_dir
from lensforge.cli.study import command_parser
from lensforge.data.sources import check_source
from lensforge.errors import ConfigError

_D = TrackConfig()


def register(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "track", run_track, __doc__,
                       help="spectrum, KL and RAF along training for several training recipes")
    add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=_D.data, help="training text (same forms as train --data)")
    g.add_argument("--eval-data", default=_D.eval_data,
                   help="held-out text, read as `lensforge eval --data` reads it")
    g.add_argument("--text-field", default=_D.text_field, help="jsonl/parquet field")
    g.add_argument("--seq-len", type=positive, default=_D.seq_len, help="tokens per sequence")
    g.add_argument("--batch-size", type=positive, default=_D.batch_size,
                   help="sequences per batch (training and evaluation)")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                   help="training recipes")
    p.add_argument("-k", dest="ks", type=positive, nargs="+", default=_D.ks,
                   help="LoRA rank divisors k (r = floor(H/k)); the tuned lens always trains")
    p.add_argument("--tokens", type=positive, default=_D.tokens,
                   help="training tokens per recipe (KL steps; the closed form's statistics "
                        "come on top, see --init-tokens)")
    p.add_argument("--milestones", type=positive, nargs="+",
                   help="token counts to measure at (step 0 always); default: 4096, 8192, "
                        "... up to --tokens")
    p.add_argument("--eval-tokens", type=positive, default=_D.eval_tokens,
                   help="held-out tokens per measurement")
    p.add_argument("--loss", choices=("subset", "fused"), default=_D.loss,
                   help="KL loss: subset (top-k + sampled tail estimate) or fused (exact)")
    p.add_argument("--tokens-per-step", type=positive, default=_D.tokens_per_step,
                   help="tokens per optimizer step")
    p.add_argument("--init-tokens", type=positive, default=_D.init_tokens,
                   help="closed-form statistics tokens (lensforge recipe)")
    p.add_argument("--lr", nargs="+", default=[], metavar="RECIPE=LR",
                   help="learning rate of a recipe (unset: the optimizer's, adamw 1e-3, sgd 0.1)")
    p.add_argument("--seed", type=int, default=_D.seed, help="random seed")
    p.add_argument("--checkpoint-every", type=positive, default=_D.checkpoint_every,
                   help="steps between training checkpoints")
    p.add_argument("--out", default="runs/track", help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run; tracked milestones are kept")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in OUT (only files lensforge wrote there)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_lr(specs: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for spec in specs:
        recipe, sep, value = spec.partition("=")
        try:
            lr = float(value) if sep else math.nan
        except ValueError:
            lr = math.nan
        if not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"--lr {spec}: expected RECIPE=LR with a finite LR > 0, "
                              "e.g. tuned-lens=0.1")
        out[recipe] = lr
    return out


def run_track(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    cfg = TrackConfig(
        model=args.model, data=args.data, eval_data=args.eval_data, text_field=args.text_field,
        recipes=list(args.recipes), ks=list(args.ks), tokens=args.tokens,
        milestones=list(args.milestones or []), eval_tokens=args.eval_tokens, loss=args.loss,
        seq_len=args.seq_len, batch_size=args.batch_size, tokens_per_step=args.tokens_per_step,
        init_tokens=args.init_tokens, lr=parse_lr(args.lr), seed=args.seed, dtype=args.dtype,
        device=args.device, checkpoint_every=args.checkpoint_every)
    schedule = cfg.validate()  # every check before the model loads
    check_source(cfg.data, text_field=cfg.text_field)
    check_source(cfg.eval_data, text_field=cfg.text_field, split="heldout")
    rows: list[TrackRow] = []
    if args.resume and not args.overwrite:
        previous = read_track(out) if out.is_dir() else None
        rows = check_resume(previous, cfg) if previous else []
    claim = claim_out_dir(out, command="track", overwrite=args.overwrite, resume=args.resume)
    try:
        print(f"milestones (tokens): {', '.join(f'{m:,}' for m in schedule.values())}; "
              f"{cfg.step_tokens():,} tokens per step")
        adapter = load_model_from_args(args)
        rows = track(cfg, adapter, out, resume=args.resume, progress=not args.no_progress,
                     rows=rows)
        from lensforge.viz.tracking_figures import plot_tracking

        png = plot_tracking(rows, out / "tracking.png", title=f"{adapter.model_id}: "
                            "lens spectrum and RAF along training")
    finally:
        claim.finish()
    print(f"wrote {out / 'track.json'}, {out / 'track.csv'}, {png} "
          f"in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0
