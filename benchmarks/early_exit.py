"""Early-exit generation on SmolLM2-135M-Instruct with AlpacaEval instructions as prompts.

For several λ and confidence checks: tokens/s against the same decoder with exits off
(and against HF `generate`), exit rate, mean exit layer, and agreement with full-model
greedy decoding: token-level (each emitted token against the full model's token for
the same prefix, by one teacher-forced forward pass), position-wise against the
free-running full greedy output, and whole-sequence exact match. Also the cost of one
lens check against one decoder layer. Configurations are interleaved per prompt, so a
shared machine's changing load hits them alike.

    .venv/bin/python benchmarks/early_exit.py --lens /tmp/lens_ee/lenses/lowrank_k32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_description, update_section  # noqa: E402

from lensforge.data import alpaca_instructions, format_chat  # noqa: E402
from lensforge.early_exit import KVPropagator, generate, make_check, propagated_kv  # noqa: E402
from lensforge.early_exit.calibrate import load_thresholds  # noqa: E402
from lensforge.early_exit.families import resolve  # noqa: E402
from lensforge.lenses import load_lens  # noqa: E402
from lensforge.models import load_model  # noqa: E402

# (label, generate kwargs); "off" is the reference decoder with exits switched off. A config
# may name its own "lens" folder and a "thresholds" file (lensforge.early_exit.calibrate).
# The docs/benchmarks.md run used these with --prompts 8 --new-tokens 48 --threads 1, the
# make-run lens as --lens, and (as --configs files) the calibrated and chat-lens variants:
#   python -m lensforge.early_exit.calibrate --lens LENS --out runs/ee_thresholds/th.json \
#       --target 0.75 0.8 0.9 --threads 1
CONFIGS: list[tuple[str, dict]] = [
    ("off", {"lam": None}),
    ("λ=0.9 screened, every 2nd", {"lam": 0.9, "check": "screened", "exit_every": 2}),
    ("λ=0.9 shortlist, every 2nd", {"lam": 0.9, "check": "shortlist", "exit_every": 2}),
    ("λ=0.8 shortlist, every 2nd", {"lam": 0.8, "check": "shortlist", "exit_every": 2}),
    ("λ=1.0 shortlist, 22..28/2", {"lam": 1.0, "check": "shortlist",
                                   "exit_layers": [22, 24, 26, 28]}),
]


def timed(fn, repeat: int) -> float:
    """Median CPU seconds of fn() over `repeat` runs (CPU time: the machine is shared)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def check_costs(adapter, lens, repeat: int = 10) -> dict[str, float]:
    """CPU milliseconds of one decoder layer (decode step, short cache), one full [1×V]
    lens check, one screen over the 1024-token static shortlist, and one skipped layer's
    K/V propagation."""
    from transformers import DynamicCache

    model = adapter.model
    ids = adapter.tokenizer("The capital of France is", return_tensors="pt").input_ids
    cache = DynamicCache(config=model.config)
    parts = resolve(adapter)  # the cache keywords of this transformers version
    model(input_ids=ids, use_cache=True, **{parts.model_cache_kw: cache})
    h = model.get_input_embeddings()(ids[:, -1:])
    pos = torch.tensor([[ids.shape[1]]])
    cos, sin = model.model.rotary_emb(h, pos)
    layer = adapter.layers[10]

    def run_layer() -> None:
        layer(h, attention_mask=None, position_ids=pos, use_cache=True,
              position_embeddings=(cos, sin), **{parts.layer_cache_kw: cache})
        cache.layers[10].keys = cache.layers[10].keys[:, :, :-1]  # keep the cache length fixed
        cache.layers[10].values = cache.layers[10].values[:, :, :-1]

    full, screen = make_check(lens, "full"), make_check(lens, "screened")
    screen.reset(ids[0].tolist())
    L = adapter.n_layers
    fused = KVPropagator(adapter.layers, 1)

    def run_fused(start: int) -> None:
        scratch = DynamicCache(config=model.config)
        fused(scratch, h, start, cos, sin)

    return {
        "decoder layer": 1e3 * timed(run_layer, repeat),
        "full check [1×V]": 1e3 * timed(lambda: full(h[0, 0], 10, 0.0), repeat),
        f"screen over {screen.size} tokens (no exit)": 1e3 * timed(
            lambda: screen(h[0, 0], 10, 2.0), repeat),
        "K/V propagation, one skipped layer": 1e3 * timed(
            lambda: propagated_kv(layer, h, cos, sin), repeat),
        f"fused K/V propagation, {L // 2} skipped layers (incl. cache appends)": 1e3 * timed(
            lambda: run_fused(L - L // 2), repeat),
    }


@torch.no_grad()
def teacher_forced_tokens(adapter, prompt_ids: list[int], tokens: list[int]) -> list[int]:
    """The full model's greedy token at each generated position, given the same prefix."""
    seq = torch.tensor([prompt_ids + tokens[:-1]])
    logits = adapter.model(input_ids=seq, use_cache=False).logits[0]
    return logits[len(prompt_ids) - 1 :].argmax(-1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", required=True, help="trained lens folder")
    ap.add_argument("--lens-desc", default="", help="how the lens was trained (for the report)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-offset", type=int, default=0,
                    help="first AlpacaEval instruction (tune on an offset, report on 0)")
    ap.add_argument("--configs", default=None,
                    help="JSON file with [[label, generate kwargs], ...] (default: CONFIGS)")
    ap.add_argument("--load-note", default="", help="machine load while measuring")
    ap.add_argument("--append-md", default=None, help="markdown file appended to the section")
    ap.add_argument("--json-out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    adapter = load_model("smollm2", dtype=args.dtype)
    lens = load_lens(args.lens, adapter)
    tok = adapter.tokenizer
    instructions = alpaca_instructions()[args.prompt_offset : args.prompt_offset + args.prompts]
    configs = CONFIGS
    if args.configs:
        configs = [(str(label), dict(kw)) for label, kw in json.loads(Path(args.configs).read_text())]
        if configs[0][1] != {"lam": None}:
            configs.insert(0, ("off", {"lam": None}))
    prompts = [tok(format_chat(tok, s), return_tensors="pt", add_special_tokens=False).input_ids
               for s in instructions]
    N = sum(p.shape[1] for p in prompts) / len(prompts)  # the rule's average input length
    # a config may name its own lens folder: {"lens": PATH, ...}
    lenses = {kw["lens"]: load_lens(kw["lens"], adapter) for _, kw in configs if "lens" in kw}
    costs = check_costs(adapter, lens)
    print(json.dumps(costs, indent=2), flush=True)

    generate(adapter, lens, prompts[0], 4, lam=0.9)  # warm-up
    labels = [c[0] for c in configs] + ["HF generate"]
    hist: dict[str, dict[int, int]] = {lab: {} for lab in labels}
    agg = {lab: {"seconds": 0.0, "cpu": 0.0, "decode_s": 0.0, "tokens": 0, "exits": 0,
                 "layer_sum": 0, "agree": 0,
                 "exit_agree": 0, "pos_agree": 0, "exact": 0, "ref_len": 0} for lab in labels}
    for n, ids in enumerate(prompts):
        ref = None
        for label, kwargs in configs:
            c = time.process_time()
            kwargs = dict(kwargs)
            use = lenses[kwargs.pop("lens")] if "lens" in kwargs else lens
            if "thresholds" in kwargs:  # a calibration file (lensforge.early_exit.calibrate)
                kwargs["layer_thresholds"] = load_thresholds(kwargs.pop("thresholds"))
            res = generate(adapter, use, ids, args.new_tokens, avg_input_len=N, **kwargs)
            a = agg[label]
            a["cpu"] += time.process_time() - c
            a["seconds"] += res.prefill_seconds + res.decode_seconds
            a["decode_s"] += res.decode_seconds
            for j in res.exit_layers[1:]:
                hist[label][j] = hist[label].get(j, 0) + 1
            a["tokens"] += len(res.tokens)
            a["exits"] += sum(j < adapter.n_layers for j in res.exit_layers)
            a["layer_sum"] += sum(res.exit_layers)
            if ref is None:
                ref = res.tokens
            truth = teacher_forced_tokens(adapter, res.prompt_ids, res.tokens)
            a["agree"] += sum(t == u for t, u in zip(res.tokens, truth, strict=True))
            a["exit_agree"] += sum(t == u for t, u, j in zip(res.tokens, truth, res.exit_layers,
                                                             strict=True) if j < adapter.n_layers)
            a["pos_agree"] += sum(t == u for t, u in zip(res.tokens, ref, strict=False))
            a["ref_len"] += len(ref)
            a["exact"] += int(res.tokens == ref)
        t, c = time.perf_counter(), time.process_time()
        out = adapter.model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
        hf = agg["HF generate"]
        hf["seconds"] += time.perf_counter() - t
        hf["cpu"] += time.process_time() - c
        hf_tokens = out[0, ids.shape[1]:].tolist()
        hf["tokens"] += len(hf_tokens)
        hf["layer_sum"] += adapter.n_layers * len(hf_tokens)
        hf["pos_agree"] += sum(x == y for x, y in zip(hf_tokens, ref, strict=False))
        hf["ref_len"] += len(ref)
        hf["exact"] += int(hf_tokens == ref)
        print(f"prompt {n + 1}/{len(prompts)} done", flush=True)

    base = agg["off"]["tokens"] / agg["off"]["seconds"]
    base_cpu = agg["off"]["tokens"] / agg["off"]["cpu"]
    n_prompts = len(prompts)
    base_dec = (agg["off"]["tokens"] - n_prompts) / agg["off"]["decode_s"]
    rows = []
    for label in labels:
        a = agg[label]
        tps, cpu_tps = a["tokens"] / a["seconds"], a["tokens"] / a["cpu"]
        is_hf = label == "HF generate"
        rows.append({
            "config": label, "tokens_per_s": tps, "speedup_vs_off": tps / base,
            "decode_speedup_vs_off": None if is_hf else (
                (a["tokens"] - n_prompts) / a["decode_s"] / base_dec),
            "tokens_per_cpu_s": cpu_tps, "cpu_speedup_vs_off": cpu_tps / base_cpu,
            "exit_rate": a["exits"] / a["tokens"],
            "mean_exit_layer": a["layer_sum"] / a["tokens"],
            "token_agreement": None if is_hf else a["agree"] / a["tokens"],
            "exit_precision": None if is_hf or not a["exits"] else a["exit_agree"] / a["exits"],
            "position_agreement": a["pos_agree"] / a["ref_len"],
            "exact_match": a["exact"] / len(prompts),
        })
        print(json.dumps(rows[-1]), flush=True)
        if hist[label]:
            print("  exit layers (decode steps):", dict(sorted(hist[label].items())), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "costs": costs,
                                                   "hist": hist}, indent=1))
    if not args.no_report:
        write_report(args, rows, costs, N, adapter.n_layers)


def write_report(args, rows: list[dict], costs: dict, N: float, L: int) -> None:
    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}%"

    def times(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}×"

    lines = [
        "## Early-exit generation (`benchmarks/early_exit.py`)",
        "",
        f"SmolLM2-135M-Instruct ({args.dtype}, L = {L}), {args.prompts} AlpacaEval instructions "
        f"in the chat template (N = {N:.1f} tokens on average), greedy, up to {args.new_tokens} "
        f"new tokens (EOS stops), batch 1, {args.threads} torch thread(s). Lens: {args.lens_desc}.",
        f"Machine: {machine_description()}. {args.load_note} No GPU in this session.",
        "",
        "Token agreement: each emitted token against the full model's greedy token for the "
        "same prefix (teacher-forced); exit precision: the same over exited tokens only; "
        "position agreement and exact match: against the free-running full greedy output "
        "(exits off).",
        "",
        "Speed-up (wall) is over prefill + decode, as tokens/s; speed-up (decode) leaves the "
        "prefill (the same full-model pass for every config) out.",
        "",
        "| config | tokens/s (wall) | speed-up (wall) | speed-up (decode) | tokens per CPU-s "
        "| speed-up (CPU) | exit rate | mean exit layer | token agreement | exit precision "
        "| position agreement | exact match |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_off']:.2f}× | "
            f"{times(r['decode_speedup_vs_off'])} | {r['tokens_per_cpu_s']:.1f} | {r['cpu_speedup_vs_off']:.2f}× | "
            f"{pct(r['exit_rate'])} | {r['mean_exit_layer']:.1f} | {pct(r['token_agreement'])} | "
            f"{pct(r['exit_precision'])} | {pct(r['position_agreement'])} | "
            f"{pct(r['exact_match'])} |")
    lines += ["", "Cost of one operation at batch 1 (median CPU ms):", "",
              "| operation | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in costs.items()]
    if args.append_md:
        lines += ["", Path(args.append_md).read_text().strip()]
    update_section("early_exit", "\n".join(lines))


if __name__ == "__main__":
    main()
