"""lensforge surgery: identity-block losses and update/gradient alignment (Appendix C).

The model's next-token CE with each block replaced by the identity, and the cosine between each
block's residual update h_{l+1} - h_l and the loss gradient at h_l, with a random-vector
baseline (Tuned Lens Appendix C, Fig. 19). Writes OUT/surgery.json, surgery.csv and
surgery.png.
"""

from __future__ import annotations

import argparse

from lensforge.analysis.surgery import gradient_alignment, identity_ablation_losses
from lensforge.cli.common import add_data_args, positive
from lensforge.cli.study import Column, Report, Study, Table, study_parser
from lensforge.cli.study_inputs import token_batches
from lensforge.viz.study_figures import plot_surgery

CSV_HEADER = ("layer", "loss_identity", "cos_seq_mean", "cos_seq_p05", "cos_seq_p95",
              "cos_seq_frac_negative", "cos_tok_mean", "cos_tok_frac_negative")


def register(sub: argparse._SubParsersAction) -> None:
    p = study_parser(sub, "surgery", run_surgery, __doc__, out="surgery",
                     help="loss with each block replaced by the identity; update/gradient cosine")
    add_data_args(p, default="stdlib:heldout")
    p.add_argument("--tokens", type=positive, default=2048, help="evaluation tokens")


def run_surgery(study: Study) -> Report:
    args, adapter = study.args, study.adapter
    batches = token_batches(adapter, args.data, args.text_field, args.seq_len, args.batch_size,
                            args.tokens)
    identity = identity_ablation_losses(adapter, batches)
    alignment = gradient_alignment(adapter, batches)
    result = {"model_id": adapter.model_id, "tokens": sum(b.numel() for b in batches),
              "seq_len": args.seq_len, "identity": identity, "alignment": alignment}
    per_layer = [(layer, loss, alignment["per_sequence"][layer], alignment["per_token"][layer])
                 for layer, loss in zip(identity["layers"], identity["loss"], strict=True)]
    random = alignment["random_baseline_sequence"]
    report = Report()
    report.json("surgery.json", result)
    report.csv("surgery.csv", CSV_HEADER, [
        (layer, f"{loss:.6g}", f"{s['mean']:.6g}", f"{s['p05']:.6g}", f"{s['p95']:.6g}",
         f"{s['frac_negative']:.4g}", f"{t['mean']:.6g}", f"{t['frac_negative']:.4g}")
        for layer, loss, s, t in per_layer])
    report.figure("surgery.png", plot_surgery, result)
    report.print(
        f"intact model CE {identity['baseline']:.4f} nats; random 5th pct cosine "
        f"(dim {random['dim']}): {random['p05']:.2e}",
        Table([Column("layer", ">5"), Column("CE(block=identity)", ">18.4f", "  "),
               Column("cos mean", ">8.4f", "  "), Column("frac<0", ">6.2f", "  ")],
              [(layer, loss, s["mean"], s["frac_negative"]) for layer, loss, s, _ in per_layer]))
    return report
