"""GPU throughput of the readout and the lens losses (run by benchmarks/gpu_check.sh).

For SmolLM2-135M-Instruct and Gemma 3 270M (bf16): evaluation lens-tokens/s and exact /
subset KL training tokens/s at batch sizes that fill the card, each as % of the bf16
floor (2·L·H·V FLOP per lens-token for evaluation, 2x that for a training step), against
a measured bf16 GEMM peak. Then lens training on a randomly initialized model with a
Llama-3-8B config: tokens/s and peak memory (throughput only: random weights say
nothing about lens quality). Prints JSON lines and a markdown table to $OUT (or stdout).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def gemm_peak(H: int, V: int) -> float:
    w = torch.randn(V, H, device="cuda", dtype=torch.bfloat16)
    best = 0.0
    for M in (4096, 16384):
        x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        torch.mm(x, w.T)
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 2.0:
            torch.mm(x, w.T)
            n += 1
        torch.cuda.synchronize()
        best = max(best, 2 * M * H * V * n / (time.perf_counter() - t0))
    return best


def timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_model(spec: str, rows: list[dict]) -> None:
    from lensforge.evaluation import evaluate
    from lensforge.lenses import LowRankLens, TunedLens
    from lensforge.lenses.readout import Readout
    from lensforge.models import load_model
    from lensforge.training.fast_loss import fused_kl_loss_backward
    from lensforge.training.subset_loss import subset_kl_loss_backward

    adapter = load_model(spec, dtype="bfloat16", device="cuda")
    L, H, V = adapter.n_layers, adapter.hidden_size, adapter.vocab_size
    peak = gemm_peak(H, V)
    lenses = {"tuned": TunedLens.from_model(adapter).cuda(),
              "lora_k32": LowRankLens.from_model(adapter, k=32).cuda()}
    readout = Readout(adapter.unembed)
    for batch in (8, 32):
        ids = torch.randint(0, V, (batch, 512), device="cuda")
        secs = timed(lambda ids=ids, a=adapter: evaluate(a, lenses, [ids], readout=readout,
                                                         progress=False))
        lts = ids.numel() * (len(lenses) + 1) / secs
        rows.append({"model": spec, "what": "eval", "batch": batch, "tokens_per_s": lts,
                     "pct_floor": 100 * lts * 2 * L * H * V / peak,
                     "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30})
        hs = adapter.hidden_states(ids)
        layer_h, final_h = hs[:L].flatten(1, 2), hs[L].flatten(0, 1)
        for name, fn in (("train exact", fused_kl_loss_backward),
                         ("train subset", subset_kl_loss_backward)):
            secs = timed(lambda fn=fn, x=layer_h, f=final_h, u=adapter.unembed: fn(lenses, x, f,
                                                                                 u))
            tps = ids.numel() / secs
            rows.append({"model": spec, "what": name, "batch": batch, "tokens_per_s": tps,
                         "pct_floor": 100 * tps * len(lenses) * 4 * L * H * V / peak,
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30})
        print(json.dumps(rows[-3:]), flush=True)
    torch.cuda.empty_cache()


def bench_llama8b(rows: list[dict]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lensforge.lenses import LowRankLens
    from lensforge.models.adapter import ModelAdapter
    from lensforge.training.fast_loss import fused_kl_loss_backward
    from lensforge.training.subset_loss import subset_kl_loss_backward

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = ModelAdapter(model, model_id="llama3-8b-config-random")
    L = adapter.n_layers
    lenses = {"lora_k32": LowRankLens.from_model(adapter, k=32).cuda()}
    for batch in (2, 8):
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, cfg.vocab_size, (batch, 512), device="cuda")

        def step(fn, ids=ids):
            hs = adapter.hidden_states(ids)
            fn(lenses, hs[:L].flatten(1, 2), hs[L].flatten(0, 1), adapter.unembed)

        for name, fn in (("8B train exact", fused_kl_loss_backward),
                         ("8B train subset", subset_kl_loss_backward)):
            secs = timed(lambda fn=fn: step(fn), repeats=2)
            rows.append({"model": "llama3-8b (random)", "what": name, "batch": batch,
                         "tokens_per_s": ids.numel() / secs, "pct_floor": None,
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30})
            print(json.dumps(rows[-1]), flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA GPU")
    rows: list[dict] = []
    for spec in ("smollm2", "gemma3-270m"):
        bench_model(spec, rows)
    bench_llama8b(rows)
    md = [f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", "",
          "| model | what | batch x 512 | tokens/s (lens-tokens/s for eval) | % of bf16 floor "
          "| peak GPU memory (GB) |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        pct = "" if r["pct_floor"] is None else f"{r['pct_floor']:.0f}%"
        md.append(f"| {r['model']} | {r['what']} | {r['batch']} | {r['tokens_per_s']:,.0f} "
                  f"| {pct} | {r['peak_mem_gb']:.1f} |")
    text = "\n".join(md)
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_bench.md").write_text(text + "\n")
        Path(out, "gpu_bench.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
