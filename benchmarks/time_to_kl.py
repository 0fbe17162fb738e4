"""Held-out KL after closed form -> exact KL vs closed form -> subset KL, side by side.

    python benchmarks/time_to_kl.py [--init-tokens 16384] [--exact-tokens 4096]
                                    [--subset-tokens 32768] [--eval-tokens 2048]

Both runs train LoRA-Lens k=32 and the full-rank tuned lens in one pass on the same
text (`general`), from the same closed form, with AdamW (lr 3e-4), in the dtype `auto`
picks; the subset run gets more tokens for about the same KL wall time. Held-out KL is
always exact (`lensforge.evaluation.evaluate`), on stdlib:heldout and alpaca:heldout.
Results go to docs/benchmarks.md (section "time_to_kl").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import machine_description, update_section  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init-tokens", type=int, default=16_384)
    p.add_argument("--exact-tokens", type=int, default=4096)
    p.add_argument("--subset-tokens", type=int, default=32_768)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--data", default="general", help="training text")
    p.add_argument("--losses", nargs="+", default=["fused", "subset"])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    from lensforge.data import PackedTokenStream, iter_documents
    from lensforge.evaluation import evaluate
    from lensforge.models import load_model
    from lensforge.training import TrainConfig, train

    adapter = load_model("smollm2", dtype="auto")
    print(f"machine: {machine_description()}; model dtype {adapter.dtype}")
    rows = []
    snapshots = {}
    budgets = {"fused": args.exact_tokens, "subset": args.subset_tokens}
    for loss, tokens in ((name, budgets[name]) for name in args.losses):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(model="smollm2", data=args.data, lens_types=["lowrank", "tuned"],
                              k=32, init_tokens=args.init_tokens, tokens=tokens,
                              tokens_per_step=2048, batch_size=4, seq_len=512, lr=3e-4,
                              loss=loss, checkpoint_every=1000, out=tmp)
            t0 = time.perf_counter()
            result = train(cfg, adapter, progress=False)
            wall = time.perf_counter() - t0
        res = {}
        for source in ("stdlib:heldout", "alpaca:heldout"):
            stream = PackedTokenStream(lambda s=source: iter_documents(s), adapter.tokenizer, 512)
            res[source] = evaluate(adapter, result.lenses, stream.batches(4),
                                   max_tokens=args.eval_tokens, progress=False)
        snapshots[loss] = res
        t = result.timings
        for name in result.lenses:
            rows.append((loss, tokens, name, t.get("closed_form_s", 0.0), t.get("kl_train_s", 0.0),
                         wall, res["stdlib:heldout"][name]["mean"]["kl"],
                         res["alpaca:heldout"][name]["mean"]["kl"]))
            print(rows[-1])
    md = [f"Machine: {machine_description()}. SmolLM2-135M-Instruct in {str(adapter.dtype)[6:]}"
          f" (`--dtype auto`). Every run: closed form on {args.init_tokens:,} tokens of "
          f"`{args.data}` text, then AdamW lr 3e-4, 2,048 tokens per step, LoRA-Lens k=32 and the "
          "full-rank lens trained together. Held-out KL is exact, mean over the 30 layers, "
          f"on {args.eval_tokens:,} tokens of each source.", "",
          "| KL loss | KL tokens | lens | closed form (s) | KL phase (s) | train wall (s) "
          "| held-out KL, stdlib docs | held-out KL, AlpacaEval |",
          "|---|---:|---|---:|---:|---:|---:|---:|"]
    md += [f"| {loss} | {tok:,} | {name} | {cf:.0f} | {kl:.0f} | {w:.0f} | {a:.3f} | {b:.3f} |"
           for loss, tok, name, cf, kl, w, a, b in rows]
    what = "exact vs subset" if len(args.losses) > 1 else f"{args.losses[0]} only"
    title = f"## Time to held-out KL: {what}, `{args.data}` text (`benchmarks/time_to_kl.py`)"
    text = title + "\n\n" + "\n".join(md)
    print(text)
    if not args.no_write:
        both = sorted(args.losses) == ["fused", "subset"]
        update_section(f"time_to_kl_{args.data}" + ("" if both else "_" + "_".join(args.losses)),
                       text)


if __name__ == "__main__":
    main()
