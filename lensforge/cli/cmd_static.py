"""lensforge static: read parameter vectors through a lens (paper Table 3 analogue)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from lensforge.analysis.static import static_study
from lensforge.cli.common import (
    HelpFormatter,
    add_model_args,
    load_model_from_args,
    parse_lens_specs,
    positive,
)
from lensforge.errors import ConfigError
from lensforge.lenses import LogitLens, load_lens

KINDS = ("mlp_out", "ov_out", "ov_in")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "static", help="top tokens of weight vectors through a lens, with coherence scores",
        description="T(W) = top-k tokens of unembed(lens_l(v)) for MLP output vectors and "
                    "per-head OV singular vectors; coherence = mean pairwise cosine of the "
                    "tokens' input embeddings, against random vectors, per lens. "
                    "Writes OUT/static.json, static.csv and static.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("lenses", nargs="*", help="lens folders, as PATH or NAME=PATH "
                                             "(the logit lens is always included)")
    add_model_args(p)
    p.add_argument("--layers", default=None,
                   help="comma-separated block indices")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    p.add_argument("--top-k", type=positive, default=10, help="tokens per list")
    p.add_argument("--singular", type=positive, default=4, help="singular vectors per head")
    p.add_argument("--max-vectors", type=positive, default=256,
                   help="random subsample of vectors per (layer, kind)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-mismatch", action="store_true")
    p.add_argument("--out", default="runs/static", help="output folder")
    p.set_defaults(func=run_static)


def run_static(args: argparse.Namespace) -> int:
    adapter = load_model_from_args(args)
    lenses = {"logit": LogitLens.from_model(adapter)}
    for name, path in parse_lens_specs(args.lenses).items():
        lenses[name] = load_lens(path, adapter, allow_mismatch=args.allow_mismatch)
    L = adapter.n_layers
    try:
        layers = ([int(x) for x in args.layers.split(",")] if args.layers else
                  sorted({round(i * (L - 1) / 3) for i in range(4)}))
    except ValueError as exc:
        raise ConfigError(f"--layers must be comma-separated integers, got '{args.layers}'") from exc
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"unknown kinds {bad}; choose from {', '.join(KINDS)}")
    result = static_study(adapter, lenses, layers, kinds=kinds, top_k=args.top_k,
                          n_singular=args.singular, max_vectors=args.max_vectors, seed=args.seed)
    result["info"] = {"model": adapter.model_id, "layers": layers, "kinds": kinds,
                      "top_k": args.top_k, "embedding": "model input embeddings (BPEmb offline: n/a)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "static.json").write_text(json.dumps(result, indent=2))
    with open(out / "static.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
        writer.writeheader()
        writer.writerows(result["rows"])
    plot_static(result, out / "static.png", title=f"{adapter.model_id}: coherence of T(W)")
    print(f"{'lens':<12}{'kind':<9}{'layer':>6}{'real':>8}{'random':>8}")
    for r in result["rows"]:
        print(f"{r['lens']:<12}{r['kind']:<9}{r['layer']:>6}{r['coherence_real']:>8.3f}"
              f"{r['coherence_random']:>8.3f}")
    print(f"wrote {out / 'static.json'}, {out / 'static.csv'}, {out / 'static.png'}")
    return 0


def plot_static(result: dict, path: Path, *, title: str) -> None:
    """One panel per kind: coherence vs layer, solid = real vectors, dashed = random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lensforge.viz.curves import lens_color

    kinds = result["info"]["kinds"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for lens in dict.fromkeys(r["lens"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["lens"] == lens and r["kind"] == kind]
            xs = [r["layer"] for r in rows]
            ax.plot(xs, [r["coherence_real"] for r in rows], "o-", color=lens_color(lens),
                    label=f"{lens} real")
            ax.plot(xs, [r["coherence_random"] for r in rows], "x--", color=lens_color(lens),
                    label=f"{lens} random")
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylabel("mean pairwise cosine")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
