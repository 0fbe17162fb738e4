"""Evaluation throughput: the fused readout against the per-layer reference, one run.

    python benchmarks/eval_throughput.py            # 1,024 held-out tokens x 2 lenses
    python benchmarks/eval_throughput.py --tokens 256

For each model dtype (the one `--dtype auto` picks here, and the other of fp32/bf16)
it loads SmolLM2-135M-Instruct, then times `lensforge.evaluation.evaluate` (fused,
chunked, reused workspaces) and the reference path it replaced (per layer: unembed,
log_softmax, `LayerMetricAccumulator.update`), on the same tokens and lenses (logit +
a LoRA-Lens k=32), and checks they agree. Lens-tokens/s count every (token, lens)
pair; "% of peak" is lens-tokens/s x 2·L·H·V against the best measured GEMM rate of
the matmul dtype. Results go to docs/benchmarks.md (section "eval_throughput").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import bf16_flags, machine_description, update_section  # noqa: E402


def gemm_peak(dtype: torch.dtype, H: int, V: int, seconds: float = 2.0) -> float:
    """Best FLOP/s of the lens-shaped GEMM [M x H] x [H x V] over a few row counts."""
    best = 0.0
    w = torch.randn(V, H, dtype=dtype)
    for M in (256, 512):
        x, z = torch.randn(M, H, dtype=dtype), torch.empty(M, V, dtype=dtype)
        torch.mm(x, w.T, out=z)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(x, w.T, out=z)
            n += 1
        best = max(best, 2 * M * H * V * n / (time.perf_counter() - t0))
    return best


@torch.no_grad()
def reference_evaluate(adapter, lenses, batches) -> dict:
    """The path `evaluate` replaced: per layer, unembed + log_softmax + accumulator."""
    from lensforge.evaluation import next_token_targets
    from lensforge.metrics import LayerMetricAccumulator

    L = adapter.n_layers
    accs = {name: LayerMetricAccumulator(L) for name in lenses}
    for batch in batches:
        hs = adapter.hidden_states(batch)
        targets = next_token_targets(batch).flatten()
        final_lp = torch.log_softmax(adapter.unembed(hs[L].flatten(0, 1)).float(), -1)
        for name, lens in lenses.items():
            accs[name].update_final(targets=targets, final_logprobs=final_lp)
            for layer in range(L):
                h = lens.transform_hidden(hs[layer].flatten(0, 1).float(), layer)
                logits = adapter.unembed(h.to(adapter.dtype))
                accs[name].update(layer, logits, targets=targets, final_logprobs=final_lp)
    return {name: acc.result() for name, acc in accs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args()

    from lensforge.data import PackedTokenStream, iter_documents
    from lensforge.evaluation import evaluate
    from lensforge.lenses import LogitLens, LowRankLens
    from lensforge.lenses.readout import Readout
    from lensforge.models import load_model
    from lensforge.models.loading import parse_dtype

    auto = parse_dtype("auto")
    dtypes = [auto] + [d for d in (torch.float32, torch.bfloat16) if d != auto]
    load0 = os.getloadavg()[0]
    print(f"machine: {machine_description()}; load average {load0:.1f}")
    rows, peaks = [], {}
    for dtype in dtypes:
        adapter = load_model("smollm2", dtype=dtype)
        L, H, V = adapter.n_layers, adapter.hidden_size, adapter.vocab_size
        readout = Readout(adapter.unembed)
        mm = readout.dtype
        if mm not in peaks:
            peaks[mm] = gemm_peak(mm, H, V)
            print(f"GEMM peak {mm}: {peaks[mm] / 1e9:.0f} GFLOP/s")
        torch.manual_seed(0)
        lenses = {"logit": LogitLens.from_model(adapter),
                  "lora_k32": LowRankLens.from_model(adapter, rank=18)}
        with torch.no_grad():
            for prm in lenses["lora_k32"].parameters():
                prm.normal_(0, 0.02)
        stream = PackedTokenStream(lambda: iter_documents("stdlib:heldout"), adapter.tokenizer,
                                   args.seq_len)
        batches = []
        for row in stream:
            batches.append(row[None])
            if len(batches) * args.seq_len >= args.tokens:
                break
        n_tok = sum(b.numel() for b in batches)
        timings, results = {}, {}
        t0 = time.perf_counter()
        results["fused readout"] = evaluate(adapter, lenses, batches, readout=readout,
                                            progress=False)
        timings["fused readout"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results["per-layer reference"] = reference_evaluate(adapter, lenses, batches)
        timings["per-layer reference"] = time.perf_counter() - t0
        a, b = results["fused readout"], results["per-layer reference"]
        diff = max(abs(x - y) for n in a for x, y in zip(a[n]["kl"], b[n]["kl"], strict=True))
        for name, secs in timings.items():
            lts = n_tok * len(lenses) / secs
            pct = 100 * lts * 2 * L * H * V / peaks[mm]
            rows.append((str(dtype).replace("torch.", ""), str(mm).replace("torch.", ""), name,
                         n_tok, secs, lts, pct, diff))
            print(f"{dtype} model, {mm} matmul, {name}: {secs:.1f} s, {lts:.1f} lens-tokens/s, "
                  f"{pct:.0f}% of peak; max |ΔKL| vs reference {diff:.2e} nats")
    md = [f"Machine: {machine_description()}. bf16 flags: {bf16_flags()}. GEMM peak "
          + ", ".join(f"{str(k).replace('torch.', '')} {v / 1e9:.0f} GFLOP/s"
                      for k, v in peaks.items())
          + f". Load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (2 cores; other jobs "
            f"may have run). SmolLM2-135M-Instruct, {args.tokens} held-out tokens (stdlib:heldout, "
            f"{args.seq_len}-token windows) x 2 lenses (logit, LoRA k=32), model forward "
            "included. `% of peak` = lens-tokens/s x 2·L·H·V / GEMM peak of the matmul "
            "dtype. `auto` picks "
          + str(auto).replace("torch.", "") + " on this machine.", "",
          "| model dtype | matmul | path | tokens | wall (s) | lens-tokens/s | % of peak "
          "| max abs KL diff (nats) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    md += [f"| {d} | {m} | {n} | {t} | {s:.1f} | {r:.1f} | {pc:.0f}% | {df:.1e} |"
           for d, m, n, t, s, r, pc, df in rows]
    text = "## Evaluation throughput (`benchmarks/eval_throughput.py`)\n\n" + "\n".join(md)
    print(text)
    if not args.no_write:
        update_section("eval_throughput", text)


if __name__ == "__main__":
    main()
