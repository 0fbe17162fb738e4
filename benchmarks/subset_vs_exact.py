"""Exact fused KL vs the subset KL (top-k + sampled tail): forward+backward tokens/s.

    python benchmarks/subset_vs_exact.py                  # SmolLM2 shapes, fp32 and bf16
    python benchmarks/subset_vs_exact.py --tokens 128 --dtypes float32   # quicker

Subset: default sampled cross term, and with `exact_cross` (one more GEMM per chunk).
Random inputs at SmolLM2-135M shapes (L=30, H=576, V=49152, tied head without bias,
RMSNorm), one full-rank tuned lens, N tokens per call. Times the whole loss call
(target pass, lens transform, loss, backward into the lens) and prints tokens/s of
each, their ratio, and both mean KLs (random inputs: the gap only hints at the bias;
held-out KL on real text is the real check). Prints the CPU and its bf16 flags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lensforge.lenses import LensConfig, TunedLens  # noqa: E402
from lensforge.lenses.readout import Readout  # noqa: E402
from lensforge.training.fast_loss import fused_kl_loss_backward  # noqa: E402
from lensforge.training.subset_loss import subset_kl_loss_backward  # noqa: E402


class RandomUnembed(nn.Module):
    """What the losses read: .norm, .weight [V, H], .bias, .logit_scale, .softcap."""

    def __init__(self, V: int, H: int, gen: torch.Generator) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(H, eps=1e-5)
        # Scaled so the target logits have std ~2-3, a peaked distribution like an LM's.
        self.weight = nn.Parameter(torch.randn(V, H, generator=gen) * 0.1, requires_grad=False)
        self.bias = None
        self.logit_scale, self.softcap = 1.0, None


def cpu_description() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "unknown CPU")
    flags = next((set(ln.split(":", 1)[1].split()) for ln in text.splitlines()
                  if ln.startswith("flags")), set())
    bf16 = ", ".join(f"{f}={'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16"))
    return f"{model} ({bf16}), torch threads {torch.get_num_threads()}, torch {torch.__version__}"


def time_call(fn, repeats: int) -> tuple[float, dict]:
    fn(warmup=True)  # one small call: workspaces, weight cast cache, allocator
    times, out = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--tail-samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per case (median)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()

    L, H, V, N = args.layers, args.hidden, args.vocab, args.tokens
    gen = torch.Generator().manual_seed(0)
    unembed = RandomUnembed(V, H, gen)
    lens = TunedLens(LensConfig(lens_type="tuned", n_layers=L, hidden_size=H, vocab_size=V))
    with torch.no_grad():
        lens.weight.copy_(torch.randn(lens.weight.shape, generator=gen) * 0.5 / H**0.5)
    hs = torch.randn(L, N, H, generator=gen)
    # The target is the last layer plus noise, so lens and target are related.
    final_h = hs[-1] + 0.5 * torch.randn(N, H, generator=gen)
    lenses = {"tuned": lens}

    print(f"CPU: {cpu_description()}")
    print(f"shapes: L={L} H={H} V={V} N={N}; subset k={args.k} m={args.tail_samples}")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        # As the training loop does: one readout owns the converted W_U and the buffers.
        readout = Readout(unembed, compute_dtype=dtype)

        def exact(dtype: torch.dtype = dtype, readout: Readout = readout,
                  warmup: bool = False) -> dict:
            lens.zero_grad(set_to_none=True)
            n = min(N, 64) if warmup else N
            return fused_kl_loss_backward(lenses, hs[:, :n], final_h[:n], unembed,
                                          compute_dtype=dtype, readout=readout)

        def subset(dtype: torch.dtype = dtype, readout: Readout = readout,
                   exact_cross: bool = False,
                   warmup: bool = False) -> dict:
            lens.zero_grad(set_to_none=True)
            n = min(N, 64) if warmup else N
            return subset_kl_loss_backward(lenses, hs[:, :n], final_h[:n], unembed,
                                           compute_dtype=dtype, readout=readout,
                                           k=args.k, tail_samples=args.tail_samples,
                                           exact_cross=exact_cross,
                                           generator=torch.Generator().manual_seed(1))

        t_exact, kl_exact = time_call(exact, args.repeats)
        ke = float(kl_exact["tuned"].mean())
        print(f"{name:>8} exact:                {N / t_exact:8.1f} tok/s ({t_exact:6.2f} s)  "
              f"mean KL {ke:.4f}")
        for exact_cross in (False, True):
            t_sub, kl_sub = time_call(
                lambda ec=exact_cross, **kw: subset(exact_cross=ec, **kw), args.repeats)
            ks = float(kl_sub["tuned"].mean())
            label = "subset exact-cross" if exact_cross else "subset sampled-cross"
            print(f"{name:>8} {label:<21} {N / t_sub:8.1f} tok/s ({t_sub:6.3f} s)  "
                  f"mean KL {ks:.4f} (diff {ks - ke:+.4f})  speed-up {t_exact / t_sub:5.1f}x")

if __name__ == "__main__":
    main()
