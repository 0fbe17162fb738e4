"""lensforge surgery: identity-block losses and update/gradient alignment (Appendix C)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lensforge.analysis.surgery import gradient_alignment, identity_ablation_losses, plot_surgery
from lensforge.cli.cmd_causal_basis import token_batches
from lensforge.cli.common import (
    HelpFormatter,
    add_data_args,
    add_model_args,
    load_model_from_args,
    positive,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "surgery", help="loss with each block replaced by the identity; update/gradient cosine",
        description="The model's next-token CE with each block replaced by the identity, and "
                    "the cosine between each block's residual update h_{l+1} - h_l and the loss "
                    "gradient at h_l, with a random-vector baseline (Tuned Lens Appendix C, "
                    "Fig. 19). Writes OUT/surgery.json, surgery.csv and surgery.png.",
        formatter_class=HelpFormatter,
    )
    add_model_args(p)
    add_data_args(p, default="stdlib:heldout")
    p.add_argument("--tokens", type=positive, default=2048, help="evaluation tokens")
    p.add_argument("--out", default="runs/surgery", help="output folder")
    p.set_defaults(func=run_surgery)


def run_surgery(args: argparse.Namespace) -> int:
    adapter = load_model_from_args(args)
    batches = token_batches(adapter, args.data, args.text_field, args.seq_len, args.batch_size,
                            args.tokens)
    identity = identity_ablation_losses(adapter, batches)
    alignment = gradient_alignment(adapter, batches)
    report = {"model_id": adapter.model_id, "tokens": sum(b.numel() for b in batches),
              "seq_len": args.seq_len, "identity": identity, "alignment": alignment}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "surgery.json").write_text(json.dumps(report, indent=2))
    lines = ["layer,loss_identity,cos_seq_mean,cos_seq_p05,cos_seq_p95,cos_seq_frac_negative,"
             "cos_tok_mean,cos_tok_frac_negative"]
    print(f"intact model CE {identity['baseline']:.4f} nats; random 5th pct cosine "
          f"(dim {alignment['random_baseline_sequence']['dim']}): "
          f"{alignment['random_baseline_sequence']['p05']:.2e}")
    print("layer  CE(block=identity)  cos mean  frac<0")
    for layer, loss in zip(identity["layers"], identity["loss"], strict=True):
        s, t = alignment["per_sequence"][layer], alignment["per_token"][layer]
        lines.append(f"{layer},{loss:.6g},{s['mean']:.6g},{s['p05']:.6g},{s['p95']:.6g},"
                     f"{s['frac_negative']:.4g},{t['mean']:.6g},{t['frac_negative']:.4g}")
        print(f"{layer:>5}  {loss:>18.4f}  {s['mean']:>8.4f}  {s['frac_negative']:>6.2f}")
    (out / "surgery.csv").write_text("\n".join(lines) + "\n")
    plot_surgery(report, str(out / "surgery.png"))
    print(f"wrote {out / 'surgery.json'}, {out / 'surgery.csv'}, {out / 'surgery.png'}")
    return 0
