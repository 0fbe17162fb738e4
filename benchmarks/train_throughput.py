"""Lens-training throughput: lensforge against tuned-lens 0.2.0, side by side, one run.

    python benchmarks/train_throughput.py            # full settings (long on a CPU)
    python benchmarks/train_throughput.py --quick    # small settings, minutes

Parts (each can be skipped): `throughput` (tokens/s and peak RSS of a full-rank tuned
lens, batch 1 x seq, fp32 model, SGD defaults, each side in its own subprocess),
`flops` (achieved FLOP/s against a measured torch.mm peak), `closed-form` (wall time of
the closed-form init and its held-out KL against both trained lenses), `lora` (LoRA-Lens
k=32 and the tuned lens, closed form then KL fine-tuning, within a stated budget).
tuned-lens runs in its own venv (.bench-venv), installed here with the DEVELOPERS.md pins.
Results are printed and written to docs/benchmarks.md (section "train_throughput").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BENCH_VENV = ROOT / ".bench-venv"
PINS = ["tuned-lens==0.2.0", "torch==2.13.0", "torchdata==0.9.0", "transformers<5", "datasets<4"]
MODEL_DIR = Path.home() / ".cache" / "lensforge" / "models" / "smollm2"

# The reference's inner loop (tuned_lens/scripts/train_loop.py, Train.execute, v0.2.0),
# transcribed with the library's own TunedLens and Optimizer ingredient; its CLI adds
# dataset plumbing and logging we do not time.
TUNED_LENS_CHILD = r'''
import json, resource, sys, time
import numpy as np, torch as th
from transformers import AutoModelForCausalLM
from tuned_lens import TunedLens
from tuned_lens.scripts.ingredients import Optimizer
model_dir, ids_path, out = sys.argv[1:4]
ids = th.from_numpy(np.load(ids_path))
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=th.float32).eval()
for p in model.parameters():
    p.requires_grad_(False)
with th.no_grad():
    np.save(out + "/logits.npy", model(input_ids=ids[:1, :64]).logits.float().numpy())
lens = TunedLens.from_model(model)
params = [p for p in lens.parameters() if p.requires_grad]
ingredient = Optimizer()
opt = ingredient.create_optim(params)
sched = ingredient.create_scheduler(opt, len(ids))
times = []
for row in ids:
    t0 = time.perf_counter()
    with th.no_grad():
        output = model(input_ids=row[None], output_hidden_states=True)
    labels = output.logits.float().log_softmax(dim=-1)
    for i, h in enumerate(output.hidden_states[:-1]):
        with th.autocast("cpu", dtype=th.bfloat16):
            logits = lens(h, idx=i)
            loss = th.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
        loss.backward()
    th.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=False); sched.step()
    times.append(time.perf_counter() - t0)
lens.save(out + "/lens")
json.dump({"step_seconds": times, "tokens_per_step": int(ids.shape[1]),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
          open(out + "/result.json", "w"))
'''


# ---------------------------------------------------------------- reference venv
def ensure_bench_venv() -> Path:
    py = BENCH_VENV / "bin" / "python"
    ok = py.exists() and subprocess.run(
        [str(py), "-c", "import tuned_lens, transformers"], capture_output=True).returncode == 0
    if not ok:
        print(f"installing {' '.join(PINS)} into {BENCH_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS], check=True)
    return py


def tuned_lens_model_dir(src: Path, dst: Path) -> Path:
    """A copy of a transformers-5 model folder that transformers 4 reads identically:
    top-level rope_theta and a tokenizer class it knows (weights are symlinked)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        if name not in ("config.json", "tokenizer_config.json") and not (dst / name).exists():
            (dst / name).symlink_to(src / name)
    config = json.loads((src / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 100000.0))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    if (src / "tokenizer_config.json").exists():
        tok = json.loads((src / "tokenizer_config.json").read_text())
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return dst


# ------------------------------------------------------------------- lensforge child
def lensforge_child(args: argparse.Namespace) -> None:
    from lensforge.models.loading import load_model
    from lensforge.training import TrainConfig, train

    adapter = load_model("smollm2", dtype="float32")
    cfg = TrainConfig(lens_types=["tuned"], init="zero", optimizer="sgd",
                      tokens=args.steps * args.seq_len, tokens_per_step=args.seq_len,
                      batch_size=1, seq_len=args.seq_len, dtype="float32",
                      checkpoint_every=10**6, loss=args.loss, out=str(Path(args.child_out) / "run"))
    result = train(cfg, adapter, progress=False)
    out = {"step_seconds": [h["seconds"] for h in result.history],
           "tokens_per_step": args.seq_len,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (Path(args.child_out) / "result.json").write_text(json.dumps(out))


def run_child(cmd: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "result.json").read_text())
    steps = res["step_seconds"]
    timed = steps[1:] if len(steps) > 1 else steps  # first step warms up
    res["tokens_per_s"] = res["tokens_per_step"] * len(timed) / sum(timed)
    res["process_s"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------ parts
def matmul_peak(dtype_name: str, seconds: float = 3.0) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(512, 576, dtype=dtype), torch.randn(576, 49152, dtype=dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 512 * 576 * 49152 * n / (time.perf_counter() - t0)


def floor_flops_per_token(adapter: object, seq_len: int) -> float:
    """Model forward (2 x block parameters + causal attention) + lens logits and
    translators x3 (forward + backward), per token."""
    L, H, V = adapter.n_layers, adapter.hidden_size, adapter.vocab_size
    blocks = sum(p.numel() for p in adapter.layers.parameters())
    model = 2 * blocks + 2 * L * seq_len * H  # QKᵀ and AV at mean causal length T/2
    return model + 3 * (2 * L * H * V + 2 * L * H * H)


def heldout_kl(adapter: object, lenses: dict, tokens: int, seq_len: int) -> dict[str, float]:
    from lensforge.data import PackedTokenStream, iter_documents
    from lensforge.evaluation import evaluate

    stream = PackedTokenStream(lambda: iter_documents("stdlib:heldout"), adapter.tokenizer,
                               seq_len)
    res = evaluate(adapter, lenses, stream.batches(1), max_tokens=tokens)
    return {name: float(r["mean"]["kl"]) for name, r in res.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small settings (minutes)")
    p.add_argument("--steps", type=int, help="training steps per side (default 6; quick 2)")
    p.add_argument("--seq-len", type=int, help="tokens per step (default 512; quick 128)")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens (default 4096; quick 512)")
    p.add_argument("--init-tokens", type=int,
                   help="closed-form statistics tokens (default 16384; quick 1024)")
    p.add_argument("--finetune-tokens", type=int,
                   help="LoRA/tuned KL fine-tuning tokens (default 8192; quick 256)")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["reference", "throughput", "flops", "closed-form", "lora"])
    p.add_argument("--loss", default="fused", choices=["fused", "reference"])
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--child", choices=["lensforge"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    q = args.quick
    args.steps = args.steps or (2 if q else 6)
    args.seq_len = args.seq_len or (128 if q else 512)
    args.eval_tokens = args.eval_tokens or (512 if q else 4096)
    args.init_tokens = args.init_tokens or (1024 if q else 16384)
    args.finetune_tokens = args.finetune_tokens or (256 if q else 8192)
    if args.child:
        lensforge_child(args)
        return

    import numpy as np
    import torch
    from _report import machine_description, update_section

    from lensforge.data import PackedTokenStream, iter_documents
    from lensforge.lenses import LogitLens, load_lens
    from lensforge.models.loading import load_model
    from lensforge.training import TrainConfig, train

    t_start = time.perf_counter()
    load1 = os.getloadavg()[0]
    print(f"machine: {machine_description()}; load average {load1:.1f}", flush=True)
    adapter = load_model("smollm2", dtype="float32")
    work = Path(tempfile.mkdtemp(prefix="lf-bench-"))
    stream = PackedTokenStream(lambda: iter_documents("stdlib", split="train"),
                               adapter.tokenizer, args.seq_len)
    ids = torch.stack([row for _, row in zip(range(args.steps), stream, strict=False)])
    np.save(work / "ids.npy", ids.numpy())
    res: dict = {"settings": {k: getattr(args, k) for k in (
        "quick", "steps", "seq_len", "eval_tokens", "init_tokens", "finetune_tokens", "loss")}}
    lines = []

    if "throughput" not in args.skip:
        (work / "lf").mkdir()
        lf = run_child([sys.executable, __file__, "--child", "lensforge", "--child-out",
                        str(work / "lf"), "--steps", str(args.steps), "--seq-len",
                        str(args.seq_len), "--loss", args.loss], work / "lf")
        res["lensforge"] = lf
        print(f"lensforge: {lf['tokens_per_s']:.2f} tok/s, peak RSS {lf['peak_rss_mb']:.0f} MB",
              flush=True)
    if "reference" not in args.skip:
        py = ensure_bench_venv()
        model_dir = tuned_lens_model_dir(MODEL_DIR, work / "model-tl")
        (work / "tl").mkdir()
        (work / "tl_child.py").write_text(TUNED_LENS_CHILD)
        tl = run_child([str(py), str(work / "tl_child.py"), str(model_dir),
                        str(work / "ids.npy"), str(work / "tl")], work / "tl")
        ours = adapter.model_logits(ids[:1, :64]).float().numpy()
        tl["logit_max_abs_diff"] = float(np.abs(np.load(work / "tl" / "logits.npy") - ours).max())
        res["tuned_lens"] = tl
        print(f"tuned-lens 0.2.0: {tl['tokens_per_s']:.2f} tok/s, peak RSS "
              f"{tl['peak_rss_mb']:.0f} MB; logits max |diff| {tl['logit_max_abs_diff']:.2e}",
              flush=True)
    if "lensforge" in res and "tuned_lens" in res:
        lf, tl = res["lensforge"], res["tuned_lens"]
        res["speedup"] = lf["tokens_per_s"] / tl["tokens_per_s"]
        res["memory_ratio"] = lf["peak_rss_mb"] / tl["peak_rss_mb"]

    if "flops" not in args.skip:
        peak32, peak16 = matmul_peak("float32"), matmul_peak("bfloat16")
        per_tok = floor_flops_per_token(adapter, args.seq_len)
        res["flops"] = {"peak_fp32": peak32, "peak_bf16": peak16, "floor_per_token": per_tok}
        for side in ("lensforge", "tuned_lens"):
            if side in res:
                achieved = per_tok * res[side]["tokens_per_s"]
                res["flops"][side] = {"achieved": achieved, "fraction_fp32": achieved / peak32}
        print(json.dumps(res["flops"], indent=1), flush=True)

    if "closed-form" not in args.skip:
        cfg = TrainConfig(lens_types=["tuned"], init="closed-form", init_tokens=args.init_tokens,
                          tokens=0, batch_size=1, seq_len=args.seq_len, dtype="float32",
                          out=str(work / "cf"))
        t0 = time.perf_counter()
        cf = train(cfg, adapter, progress=False)
        cf_s = time.perf_counter() - t0
        lenses = {"logit": LogitLens.from_model(adapter), "closed_form": cf.lenses["tuned"]}
        if (work / "tl" / "lens").exists():
            lenses["tuned_lens_sgd"] = load_lens(work / "tl" / "lens", adapter)
        if (work / "lf" / "run" / "lenses" / "tuned").exists():
            lenses["lensforge_sgd"] = load_lens(work / "lf" / "run" / "lenses" / "tuned", adapter)
        kls = heldout_kl(adapter, lenses, args.eval_tokens, args.seq_len)
        res["closed_form"] = {"seconds": cf_s, "heldout_kl": kls}
        if "tuned_lens" in res:
            tl = res["tuned_lens"]
            res["closed_form"]["tuned_lens_seconds"] = sum(tl["step_seconds"])
        print(json.dumps(res["closed_form"], indent=1), flush=True)

    if "lora" not in args.skip:
        cfg = TrainConfig(lens_types=["tuned", "lowrank"], k=32, init="closed-form",
                          init_tokens=args.init_tokens, tokens=args.finetune_tokens,
                          tokens_per_step=min(args.finetune_tokens, 4 * args.seq_len),
                          batch_size=1, seq_len=args.seq_len, dtype="float32",
                          checkpoint_every=10**6, out=str(work / "lora"))
        t0 = time.perf_counter()
        run = train(cfg, adapter, progress=False)
        lora_s = time.perf_counter() - t0
        kls = heldout_kl(adapter, run.lenses, args.eval_tokens, args.seq_len)
        res["lora"] = {"seconds": lora_s, "heldout_kl": kls, "timings": run.timings}
        print(json.dumps(res["lora"], indent=1), flush=True)

    res["wall_s"] = time.perf_counter() - t_start
    res["load_average"] = [load1, os.getloadavg()[0]]
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1, default=str))
    if not args.no_write:
        lines = report(res)
        update_section("train_throughput", "\n".join(lines))
        print("wrote docs/benchmarks.md (train_throughput)")


def report(res: dict) -> list[str]:
    from _report import machine_description

    s = res["settings"]
    out = ["## Lens training throughput (`benchmarks/train_throughput.py`)", "",
           f"Machine: {machine_description()}. No GPU in this session. Load average during "
           f"the run: {res['load_average'][0]:.1f} -> {res['load_average'][1]:.1f} (shared "
           f"machine: absolute numbers are depressed, the side-by-side ratios are the point).",
           f"Settings: {'--quick, ' if s['quick'] else ''}{s['steps']} steps x 1 x {s['seq_len']}"
           f" tokens per side (first step excluded as warm-up), fp32 SmolLM2-135M, full-rank "
           f"tuned lens, SGD defaults, stdlib corpus; loss path `{s['loss']}`.", ""]
    if "lensforge" in res or "tuned_lens" in res:
        out += ["| | tokens/s | peak RSS (MB) |", "|---|---:|---:|"]
        for side, label in (("lensforge", "lensforge"), ("tuned_lens", "tuned-lens 0.2.0")):
            if side in res:
                out.append(f"| {label} | {res[side]['tokens_per_s']:.2f} | "
                           f"{res[side]['peak_rss_mb']:.0f} |")
        if "speedup" in res:
            out += ["", f"Speed-up {res['speedup']:.1f}x (target >= 5x); memory ratio "
                        f"{res['memory_ratio']:.2f} (target <= 0.5). Final logits of the two "
                        f"loads differ by at most {res['tuned_lens']['logit_max_abs_diff']:.1e}."]
    if "flops" in res:
        f = res["flops"]
        out += ["", f"Matmul peak ([512x576]x[576x49152], torch.mm): fp32 "
                    f"{f['peak_fp32'] / 1e9:.1f} GFLOP/s, bf16 {f['peak_bf16'] / 1e9:.1f} GFLOP/s. "
                    f"Floor FLOPs per token: {f['floor_per_token'] / 1e9:.2f} GFLOP."]
        for side in ("lensforge", "tuned_lens"):
            if side in f:
                out.append(f"- {side}: {f[side]['achieved'] / 1e9:.1f} GFLOP/s = "
                           f"{100 * f[side]['fraction_fp32']:.0f}% of the fp32 peak")
    if "closed_form" in res:
        c = res["closed_form"]
        out += ["", f"Closed-form init ({s['init_tokens']} tokens of statistics): "
                    f"{c['seconds']:.0f} s wall. Held-out mean KL over layers "
                    f"({s['eval_tokens']} tokens, nats):", ""]
        out += [f"- {k}: {v:.2f}" for k, v in c["heldout_kl"].items()]
        if "tuned_lens_seconds" in c:
            out.append(f"- tuned-lens SGD above took {c['tuned_lens_seconds']:.0f} s for "
                       f"{s['steps'] * s['seq_len']} tokens")
    if "lora" in res:
        r = res["lora"]
        out += ["", f"LoRA-Lens k=32 and tuned lens in one pass: closed form, then "
                    f"{s['finetune_tokens']} tokens of AdamW KL fine-tuning: "
                    f"{r['seconds']:.0f} s wall (budget: this run only). Held-out mean KL:", ""]
        out += [f"- {k}: {v:.2f}" for k, v in r["heldout_kl"].items()]
    return out


if __name__ == "__main__":
    main()
