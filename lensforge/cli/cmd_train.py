"""lensforge train: closed-form init then KL fine-tuning of one or more lenses."""

from __future__ import annotations

import argparse

from lensforge.cli.common import (
    HelpFormatter,
    add_data_args,
    add_model_args,
    load_model_from_args,
    positive,
)
from lensforge.cli.outdir import claim_out_dir
from lensforge.data.sources import check_source
from lensforge.errors import ConfigError
from lensforge.training import OPTIMIZER_DEFAULTS, TrainConfig, train
from lensforge.training.distributed import (
    FSDP_NEEDS_TORCHRUN,
    DistContext,
    shard_model,
    under_torchrun,
)

# What train writes in OUT; anything else there (an eval folder, notes) is left alone.
TRAIN_OUTPUTS = ("checkpoint", "lenses", "train_history.json")


def register(sub: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train tuned / LoRA lenses",
        description="Train lenses against the model's final distribution (KL), starting from "
                    "the closed-form least-squares fit. Writes OUT/lenses/<name>/ and "
                    "OUT/checkpoint/ (resumable).",
        formatter_class=HelpFormatter,
    )
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("lenses")
    g.add_argument("--lens", dest="lens_types", nargs="+", default=d.lens_types,
                   choices=["lowrank", "tuned"], help="lens types to train (one forward pass)")
    g.add_argument("--rank", type=positive, help="LoRA rank r (overrides -k)")
    g.add_argument("-k", type=positive, default=d.k, help="LoRA rank divisor: r = floor(H/k)")
    g.add_argument("--extra-k", dest="ranks_k", type=positive, nargs="*", default=[],
                   help="also train LoRA lenses with these divisors k")
    g = p.add_argument_group("optimization")
    g.add_argument("--init", choices=["closed-form", "zero"], default=d.init)
    g.add_argument("--init-tokens", type=int, default=d.init_tokens,
                   help="tokens of statistics for the closed-form init")
    g.add_argument("--ridge", type=float, default=d.ridge, help="relative ridge penalty")
    g.add_argument("--optimizer", choices=sorted(OPTIMIZER_DEFAULTS), default=d.optimizer,
                   help=f"defaults: {OPTIMIZER_DEFAULTS}")
    g.add_argument("--lr", type=float, help="learning rate (unset: the optimizer's, adamw 1e-3, sgd 0.1)")
    g.add_argument("--weight-decay", type=float, help="weight decay (unset: the optimizer's, adamw 0, sgd 1e-3)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD Nesterov momentum")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--tokens", type=int, default=d.tokens,
                   help="KL fine-tuning token budget (0: closed form only)")
    g.add_argument("--tokens-per-step", type=positive, default=d.tokens_per_step,
                   help="tokens per optimizer step (gradient accumulation)")
    g.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip (0: off)")
    g.add_argument("--token-chunk", type=positive, default=d.token_chunk,
                   help="tokens per logits block (memory bound)")
    g.add_argument("--loss", choices=("fused", "subset", "reference"), default=d.loss,
                   help="KL implementation: fused (exact, batched layers), subset (target "
                        "top-k + sampled tail, an estimate; see docs/subset_kl.md) or "
                        "reference (the slow oracle)")
    g.add_argument("--subset-k", type=positive, default=d.subset_k,
                   help="subset loss: target top-k tokens per token")
    g.add_argument("--subset-tail", type=positive, default=d.subset_tail,
                   help="subset loss: sampled tail ids per token chunk")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, help="output folder")
    g.add_argument("--checkpoint-every", type=positive, default=d.checkpoint_every,
                   help="steps between atomic checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in OUT (only files lensforge wrote there)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group(
        "scale-out", "under `torchrun --nproc-per-node N -m lensforge train ...` the data is "
        "sharded over ranks; --batch-size is per rank, token budgets are global")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the frozen model's blocks over ranks (FSDP2 fully_shard)")
    g.add_argument("--cpu-offload", action="store_true",
                   help="with --fsdp: keep the block shards in CPU memory")
    p.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.validate()
    if args.cpu_offload and not args.fsdp:
        raise ConfigError("--cpu-offload only applies with --fsdp")
    if args.fsdp and not under_torchrun():
        raise ConfigError(FSDP_NEEDS_TORCHRUN)
    check_source(cfg.data, text_field=cfg.text_field)  # bad data fails before the model loads
    claim = claim_out_dir(cfg.out, command="train", overwrite=args.overwrite, resume=args.resume,
                          scope=TRAIN_OUTPUTS)
    ctx = DistContext.from_env(device=args.device)  # None unless launched by torchrun
    try:
        if ctx is not None:
            # one device per rank (cuda:LOCAL_RANK); with --fsdp load on CPU first and let
            # the sharding place each block's shard on the device
            args.device = "cpu" if args.fsdp else str(ctx.device)
        adapter = load_model_from_args(args)
        if args.fsdp:
            info = shard_model(adapter, ctx, cpu_offload=args.cpu_offload)
            if ctx.is_main:
                print(f"fsdp: {info['blocks']} blocks sharded over {ctx.world_size} ranks; rank 0 "
                      f"holds {info['local_block_params']:,} of {info['block_params']:,} block "
                      f"parameters{' (in CPU memory)' if args.cpu_offload else ''}")
        result = train(cfg, adapter, resume=args.resume,
                       progress=not args.no_progress, dist=ctx)
    finally:
        claim.finish()
        if ctx is not None:
            ctx.close()
    if ctx is None or ctx.is_main:
        for name in result.lenses:
            print(f"wrote {result.out / 'lenses' / name}")
    return 0
