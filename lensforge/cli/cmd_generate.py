"""lensforge generate: early-exit decoding from a trained lens (CALM rule, blocks skipped).

Decode with a KV cache, checking the lens at the exit layers with the CALM rule (exit when
p(top1) - p(top2) > 0.9*lambda + 0.1*exp(-4i/N)); exited tokens skip the remaining blocks,
whose KV cache is filled from the exit state. Prints the text and exit/speed statistics.
"""

from __future__ import annotations

import argparse
import json

from lensforge.cli.common import add_model_args, load_model_from_args, positive
from lensforge.cli.study import command_parser
from lensforge.early_exit import GenerationResult, generate
from lensforge.early_exit.rule import check_lambda
from lensforge.errors import ConfigError
from lensforge.lenses import load_lens


def register(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "generate", run_generate, __doc__,
                       help="early-exit text generation from a lens")
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--lens", help="lens folder (or 'logit'); required unless --lambda off")
    p.add_argument("--lambda", dest="lam", default="0.9",
                   help="CALM λ in [0, 1] (higher = stricter, fewer exits), or 'off'")
    p.add_argument("--exit-every", type=positive, default=None,
                   help="check the lens only after every m-th block")
    p.add_argument("--exit-layers", type=positive, nargs="+", default=None,
                   help="residual indices j (exit after block j-1) to check, instead of "
                        "--exit-every")
    p.add_argument("--min-layer", type=positive, default=1,
                   help="first residual index at which a token may exit")
    p.add_argument("--check", choices=("full", "screened", "shortlist"), default="screened",
                   help="full: a [1 x V] lens unembedding per check; screened: score a token "
                        "shortlist first and confirm exits with a full check (same exits, "
                        "except ones whose lens top-1 is outside the shortlist); shortlist: "
                        "the shortlist alone decides and picks the token (no [1 x V] "
                        "unembedding on exit; approximate)")
    p.add_argument("--screen-static", type=positive, default=1024,
                   help="screened check: the shortlist's most frequent token ids")
    p.add_argument("--patience", type=int, default=0,
                   help="also require the same lens top-1 at this and the previous N checks "
                        "before exiting (0: the plain CALM rule)")
    p.add_argument("--thresholds", default=None,
                   help="per-layer exit thresholds (JSON from python -m "
                        "lensforge.early_exit.calibrate): only those layers are checked, and a "
                        "token exits at j iff confidence > max(t_j, CALM threshold)")
    p.add_argument("--max-new-tokens", type=positive, default=64, help="tokens to generate")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=positive, default=None, help="sample from the top-k tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use a lens trained for another model")
    p.add_argument("--json", action="store_true", help="print statistics as JSON")
    add_model_args(p)


def parse_lambda(value: str) -> float | None:
    if str(value).lower() in ("off", "none"):
        return None
    try:
        return check_lambda(float(value))
    except ValueError:
        raise ConfigError(f"--lambda must be a number in [0, 1] or 'off', got '{value}'") from None


def run_generate(args: argparse.Namespace) -> int:
    lam = parse_lambda(args.lam)
    if lam is not None and not args.lens:
        raise ConfigError("--lens is required for early exit (or pass --lambda off)")
    thresholds = None
    if args.thresholds:
        from lensforge.early_exit.calibrate import load_thresholds

        thresholds = load_thresholds(args.thresholds)
    adapter = load_model_from_args(args)
    lens = load_lens(args.lens, adapter, allow_mismatch=args.allow_mismatch) if args.lens else None
    tok = adapter.tokenizer
    if tok is None:
        raise ConfigError("this model has no tokenizer; use the Python API with token ids")
    prompt = args.prompt
    if args.chat:
        from lensforge.data import format_chat

        prompt = format_chat(tok, prompt)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=not args.chat).input_ids
    result = generate(adapter, lens, ids, args.max_new_tokens, lam, exit_every=args.exit_every,
                      exit_layers=args.exit_layers,
                      min_layer=args.min_layer, check=args.check,
                      screen_static=args.screen_static, patience=args.patience,
                      layer_thresholds=thresholds,
                      do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                      seed=args.seed)
    assert isinstance(result, GenerationResult)  # return_cache is off
    stats = result.summary()
    if args.json:
        print(json.dumps({"text": result.text, **stats, "exit_layers": result.exit_layers,
                          "settings": result.settings}, indent=2))
        return 0
    print(result.text)
    print("---")
    print(f"{stats['new_tokens']} tokens, exit rate {stats['exit_rate']:.1%}, mean exit layer "
          f"{stats['mean_exit_layer']:.1f}/{adapter.n_layers}, {stats['lens_checks']} lens checks "
          f"({stats['full_lens_checks']} full), "
          f"{stats['tokens_per_second']:.1f} tokens/s (prefill {stats['prefill_seconds']:.2f}s, "
          f"decode {stats['decode_seconds']:.2f}s)")
    return 0
