"""lensforge train: closed-form init then KL fine-tuning of one or more lenses.

Train lenses against the model's final distribution (KL), starting from the closed-form
least-squares fit. Writes OUT/lenses/<name>/ and OUT/checkpoint/ (resumable).
"""

from __future__ import annotations

import argparse
from typing import Any

from lensforge.cli.common import (
    add_data_args,
    add_model_args,
    load_model_from_args,
    positive,
)
from lensforge.cli.outdir import claim_out_dir
from lensforge.cli.study import command_parser
from lensforge.data.sources import check_source
from lensforge.errors import ConfigError
from lensforge.training import OPTIMIZER_DEFAULTS, TrainConfig, train
from lensforge.training.config import field_help
from lensforge.training.distributed import (
    FSDP_NEEDS_TORCHRUN,
    DistContext,
    shard_model,
    under_torchrun,
)

# What train writes in OUT; anything else there (an eval folder, notes) is left alone.
TRAIN_OUTPUTS = ("checkpoint", "lenses", "train_history.json")


def _field_option(g: argparse._ArgumentGroup, *flags: str, name: str, **kwargs: Any) -> None:
    """Add the option of TrainConfig field `name`; its default and help come from the field."""
    g.add_argument(*flags, dest=name, default=getattr(_DEFAULTS, name), help=field_help(name),
                   **kwargs)


_DEFAULTS = TrainConfig()


def register(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "train", run_train, __doc__,
                       help="train tuned / LoRA lenses")
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("lenses")
    _field_option(g, "--lens", name="lens_types", nargs="+", choices=["lowrank", "tuned"])
    _field_option(g, "--rank", name="rank", type=positive)
    _field_option(g, "-k", name="k", type=positive)
    _field_option(g, "--extra-k", name="ranks_k", type=positive, nargs="*")
    g = p.add_argument_group("optimization")
    _field_option(g, "--init", name="init", choices=["closed-form", "zero"])
    _field_option(g, "--init-tokens", name="init_tokens", type=int)
    _field_option(g, "--ridge", name="ridge", type=float)
    _field_option(g, "--optimizer", name="optimizer", choices=sorted(OPTIMIZER_DEFAULTS))
    _field_option(g, "--lr", name="lr", type=float)
    _field_option(g, "--weight-decay", name="weight_decay", type=float)
    _field_option(g, "--momentum", name="momentum", type=float)
    _field_option(g, "--warmup-steps", name="warmup_steps", type=int)
    _field_option(g, "--tokens", name="tokens", type=int)
    _field_option(g, "--tokens-per-step", name="tokens_per_step", type=positive)
    _field_option(g, "--clip", name="clip", type=float)
    _field_option(g, "--token-chunk", name="token_chunk", type=positive)
    _field_option(g, "--loss", name="loss", choices=("fused", "subset", "reference"))
    _field_option(g, "--subset-k", name="subset_k", type=positive)
    _field_option(g, "--subset-tail", name="subset_tail", type=positive)
    _field_option(g, "--seed", name="seed", type=int)
    g = p.add_argument_group("output")
    _field_option(g, "--out", name="out")
    _field_option(g, "--checkpoint-every", name="checkpoint_every", type=positive)
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
    # The model and data options are shared with other commands (cli/common.py); here their
    # help, like every option that sets a TrainConfig field, is the field's documentation.
    for action in p._actions:
        if action.dest in TrainConfig.__dataclass_fields__:
            action.help = field_help(action.dest)


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
            assert ctx is not None  # shard_model refuses a run outside torchrun
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
