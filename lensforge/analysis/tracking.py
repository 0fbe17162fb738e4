"""Spectrum, held-out KL and RAF along training, per training recipe (issue 15).

The LoRA-Lens paper reads "lens maps are intrinsically low-rank" off lenses trained by
short SGD from zero. Whether that is a property of the map or of the recipe shows only
when the same metrics are followed along training for several recipes:

- ``tuned-lens``: tuned-lens 0.2.0's SGD with Nesterov momentum from zero (the logit
  lens), weight decay toward the identity;
- ``lora-lens``: the LoRA-Lens paper's AdamW from zero;
- ``lensforge``: the closed-form least-squares fit, then AdamW on the KL.

Each recipe trains the tuned lens and LoRA-Lenses (one per k) against one forward pass.
At step 0 and at the first optimizer step whose tokens reach each milestone, the live
lenses are saved (OUT/<recipe>/milestones/<tokens>/<lens>) and measured with the same
functions as ``lensforge eval`` (held-out KL, RAF against the recipe's tuned lens) and
``lensforge spectrum``; one row per lens goes to OUT/track.json and track.csv.

The learning rate decays linearly to zero over the whole ``tokens`` budget, so the lens at
milestone m of a long run is not the lens of a run of m tokens.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch

from lensforge.analysis.spectrum import SpectrumMetric, lens_spectrum
from lensforge.data import PackedTokenStream, iter_documents
from lensforge.errors import CheckpointError, ConfigError
from lensforge.evaluation import evaluate, raf_table
from lensforge.lenses import Lens, load_lens, save_lens
from lensforge.lenses.readout import Readout
from lensforge.models.adapter import ModelAdapter
from lensforge.storage import atomic_write_text, recover_dir
from lensforge.training import TrainConfig, train
from lensforge.training.loop import CHECKPOINT, StepEvent, StepPlan, lens_names

# TrainConfig fields each recipe sets; everything else is shared by all recipes.
RECIPES: dict[str, dict[str, Any]] = {  # TrainConfig fields per recipe
    "tuned-lens": {"init": "zero", "optimizer": "sgd"},
    "lora-lens": {"init": "zero", "optimizer": "adamw"},
    "lensforge": {"init": "closed-form", "optimizer": "adamw"},
}
# The paper's values (LoRA-Lens §2 and Fig. 2) that the figures draw as references.
class PaperTargets(TypedDict):
    effective_rank_over_h_max: float
    participation_ratio_over_h: float
    raf: tuple[float, float]


PAPER: PaperTargets = {"effective_rank_over_h_max": 0.03, "participation_ratio_over_h": 0.5,
         "raf": (0.12, 0.15)}
FORMAT = "lensforge.track/1"
CSV_FIELDS = ("recipe", "milestone", "step", "tokens", "lens", "lens_type", "rank", "k",
              "hidden_size", "kl", "kl_logit", "raf", "effective_rank", "effective_rank_over_h",
              "energy_top_half", "components_90", "participation_ratio",
              "participation_ratio_over_h", "eval_s")
SPECTRUM_MEANS: tuple[SpectrumMetric, ...] = ("effective_rank", "energy_top_half",
                                              "components_90", "participation_ratio")


class SpectrumPerLayer(TypedDict):
    """The per-layer spectrum metrics of one lens (`lens_spectrum`'s lists)."""

    effective_rank: list[float]
    energy_top_half: list[float]
    components_90: list[int]
    participation_ratio: list[float]


class LensMeasurement(TypedDict):
    """What `measure` records for one lens (keys in this order)."""

    lens: str
    lens_type: str
    rank: int | None
    k: int | None
    hidden_size: int
    kl: float | None  # mean held-out KL over layers (nats)
    kl_logit: float | None  # the logit lens's, for reference
    raf: float | None  # against "tuned"; None without a tuned lens
    effective_rank: float  # spectrum means over layers
    energy_top_half: float
    components_90: float
    participation_ratio: float
    effective_rank_over_h: float
    participation_ratio_over_h: float
    eval_s: float  # seconds the evaluation of all lenses took
    kl_per_layer: list[float | None]
    per_layer: SpectrumPerLayer


class _RowHead(TypedDict):
    recipe: str
    milestone: int  # the milestone tokens (0 for the initial state)
    step: int  # optimizer step
    tokens: int  # tokens trained at that step


class TrackRow(_RowHead, LensMeasurement):
    """One row of track.json/track.csv: recipe, milestone, step, tokens, then the lens's
    `LensMeasurement` (keys in that order)."""


# Options that may differ on --resume without changing a tracked number.
_RESUME_FREE = {"device", "checkpoint_every"}


@dataclass
class TrackConfig:
    """Every `lensforge track` option that shapes the numbers (stored in track.json)."""

    model: str = "smollm2"
    data: str = "stdlib"
    eval_data: str = "stdlib:heldout"
    text_field: str = "text"
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    ks: list[int] = field(default_factory=lambda: [4, 16, 32, 64])
    tokens: int = 32_768
    milestones: list[int] = field(default_factory=list)  # empty: powers of two from 4096
    eval_tokens: int = 4096
    loss: str = "subset"
    seq_len: int = 512
    batch_size: int = 4
    tokens_per_step: int = 2048
    init_tokens: int = 32_768
    lr: dict[str, float] = field(default_factory=dict)  # recipe -> learning rate override
    seed: int = 0
    dtype: str = "auto"
    device: str = "cpu"
    checkpoint_every: int = 10

    def train_config(self, recipe: str, out: Path) -> TrainConfig:
        return TrainConfig(
            model=self.model, data=self.data, text_field=self.text_field,
            lens_types=["tuned"], ranks_k=list(self.ks), tokens=self.tokens,
            tokens_per_step=self.tokens_per_step, seq_len=self.seq_len,
            batch_size=self.batch_size, init_tokens=self.init_tokens, lr=self.lr.get(recipe),
            seed=self.seed, dtype=self.dtype, device=self.device, loss=self.loss,
            checkpoint_every=self.checkpoint_every, out=str(out / recipe / "train"),
            **RECIPES[recipe])

    def validate(self) -> dict[int, int]:
        """Check everything (no model needed); returns {optimizer step: milestone tokens}."""
        if not self.recipes:
            raise ConfigError("--recipes: give at least one recipe")
        for recipe in self.recipes:
            if recipe not in RECIPES:
                raise ConfigError(f"--recipes: unknown recipe '{recipe}'; "
                                  f"choose from {', '.join(RECIPES)}")
        if len(set(self.recipes)) != len(self.recipes) or len(set(self.ks)) != len(self.ks):
            raise ConfigError("--recipes and -k must not repeat a value")
        if any(k < 1 for k in self.ks):
            raise ConfigError("-k values must be >= 1")
        for recipe in self.lr:
            if recipe not in self.recipes:
                raise ConfigError(f"--lr {recipe}=...: '{recipe}' is not among --recipes")
        if self.loss not in ("fused", "subset"):
            raise ConfigError("--loss must be 'fused' (exact) or 'subset'")
        if self.tokens < 1:
            raise ConfigError("--tokens must be >= 1 (tracking needs training steps)")
        if self.eval_tokens < 1:
            raise ConfigError("--eval-tokens must be >= 1")
        for recipe in self.recipes:
            self.train_config(recipe, Path("unused")).validate()
        return self.schedule()

    def schedule(self) -> dict[int, int]:
        """{optimizer step: milestone tokens}; step 0 (the initial state) always included.
        A milestone lands on the first step whose tokens reach it."""
        per_step = self.step_tokens()
        trained = self.tokens // per_step * per_step
        milestones = self.milestones or default_milestones(trained)
        steps: dict[int, int] = {0: 0}
        for m in milestones:
            if m < 1 or m > trained:
                raise ConfigError(f"--milestones {m}: must lie in 1..{trained:,} (the tokens "
                                  f"trained: {trained // per_step} steps of {per_step:,})")
            step = math.ceil(m / per_step)
            if step in steps:
                raise ConfigError(f"--milestones {steps[step]} and {m} fall on the same "
                                  f"optimizer step ({per_step:,} tokens per step)")
            steps[step] = m
        return dict(sorted(steps.items()))

    def step_tokens(self) -> int:
        """Tokens per optimizer step (one process; the same for every recipe)."""
        plan = StepPlan.of(self.train_config(self.recipes[0], Path("unused")))
        return plan.accumulation * self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)


def default_milestones(trained: int) -> list[int]:
    """2^12, 2^13, ... up to the tokens trained (and those tokens, when not a power of 2)."""
    out = [2**j for j in range(12, 64) if 2**j <= trained]
    if trained not in out:
        out.append(trained)
    return out


def heldout_batches(cfg: TrackConfig, adapter: ModelAdapter):  # noqa: ANN201 — an iterator
    """The held-out batches `lensforge eval` reads for the same --data/--seq-len/--batch-size."""
    stream = PackedTokenStream(lambda: iter_documents(cfg.eval_data, text_field=cfg.text_field,
                                                      split="heldout"),
                               adapter.tokenizer, cfg.seq_len)
    return stream.batches(cfg.batch_size)


def measure(cfg: TrackConfig, adapter: ModelAdapter, lenses: dict[str, Lens],
            readout: Readout | None = None, logit: dict | None = None
            ) -> dict[str, LensMeasurement]:
    """{lens: metrics}: held-out KL (mean and per layer), RAF against "tuned", spectrum.
    `logit`: the logit lens's results on the same tokens, when already known (it never
    changes along training, so `track` evaluates it once)."""
    t0 = time.perf_counter()
    # Tracking must not change the training it watches: keep the global RNG as it was.
    with torch.random.fork_rng(devices=[]):
        results = evaluate(adapter, lenses, heldout_batches(cfg, adapter),
                           max_tokens=cfg.eval_tokens, readout=readout, progress=False,
                           with_logit=logit is None)
    if logit is not None:
        results["logit"] = logit  # type: ignore[assignment]
    raf = raf_table(results, "tuned") if "tuned" in results else {}
    eval_s = time.perf_counter() - t0
    out: dict[str, LensMeasurement] = {}
    for name, lens in lenses.items():
        spec = lens_spectrum(lens)
        mean = spec["mean"]
        out[name] = {
            "lens": name, "lens_type": lens.config.lens_type, "rank": lens.config.rank,
            "k": int(name.split("_k")[1]) if name.startswith("lora_k") else None,
            "hidden_size": spec["hidden_size"], "kl": results[name]["mean"]["kl"],
            "kl_logit": results["logit"]["mean"]["kl"], "raf": raf.get(name),
            "effective_rank": mean["effective_rank"], "energy_top_half": mean["energy_top_half"],
            "components_90": mean["components_90"],
            "participation_ratio": mean["participation_ratio"],
            "effective_rank_over_h": spec["effective_rank_over_h"],
            "participation_ratio_over_h": spec["participation_ratio_over_h"],
            "eval_s": eval_s, "kl_per_layer": list(results[name]["kl"]),
            "per_layer": {"effective_rank": spec["effective_rank"],
                          "energy_top_half": spec["energy_top_half"],
                          "components_90": spec["components_90"],
                          "participation_ratio": spec["participation_ratio"]},
        }
    return out


# ------------------------------------------------------------------ the track file
def read_track(out: Path) -> dict | None:
    path = out / "track.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); use --overwrite") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lensforge track file; use --overwrite")
    return data


def write_track(out: Path, config: dict, rows: list[TrackRow]) -> None:
    """track.json (everything) and track.csv (one line per recipe, milestone and lens),
    each replaced atomically so a kill leaves the old or the new file."""
    atomic_write_text(out / "track.json",
                      json.dumps({"format": FORMAT, "config": config, "rows": rows}, indent=1))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "track.csv", buf.getvalue())


def check_resume(previous: dict, cfg: TrackConfig) -> list[TrackRow]:
    """The rows to keep; ConfigError when an option that shapes them has changed."""
    saved, now = previous.get("config", {}), cfg.to_dict()
    changed = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k])
    if changed:
        raise ConfigError(f"cannot resume: options changed since the tracked run: {changed}; "
                          "use the same options, --overwrite, or another --out")
    return list(previous.get("rows", []))


# ------------------------------------------------------------------ the driver
def track(cfg: TrackConfig, adapter: ModelAdapter, out: Path, *, resume: bool = False,
          progress: bool = True, on_row: Callable[[list[TrackRow]], None] | None = None,
          rows: list[TrackRow] | None = None) -> list[TrackRow]:
    """Train every recipe, measuring at each milestone; returns all rows (also on disk).
    `rows`: rows kept from an interrupted run (their milestones are skipped)."""
    schedule = cfg.validate()
    rows = list(rows or [])
    readout = Readout(adapter.unembed)
    logit: dict = {}  # the logit lens's results, once measured
    for recipe in cfg.recipes:
        done = {r["step"] for r in rows if r["recipe"] == recipe}
        if all(step in done for step in schedule):
            print(f"{recipe}: all {len(schedule)} milestones already tracked")
            continue
        tcfg = cfg.train_config(recipe, out)

        def record(step: int, lenses: dict[str, Lens], recipe: str = recipe,
                   done: set[int] = done) -> None:
            if step not in schedule or step in done:
                return
            tokens = step * cfg.step_tokens()
            folder = out / recipe / "milestones" / str(tokens)
            for name, lens in lenses.items():  # first, so a kill mid-eval keeps the state
                save_lens(lens, folder / name)
            if not logit:
                with torch.random.fork_rng(devices=[]):
                    logit.update(evaluate(adapter, {}, heldout_batches(cfg, adapter),
                                          max_tokens=cfg.eval_tokens, readout=readout,
                                          progress=False)["logit"])
            for metrics in measure(cfg, adapter, lenses, readout, logit).values():
                rows.append({"recipe": recipe, "milestone": schedule[step], "step": step,
                             "tokens": tokens, **metrics})
            done.add(step)
            write_track(out, cfg.to_dict(), rows)
            if on_row is not None:
                on_row(rows)
            _print_rows(rows, recipe, step)

        if resume:
            _catch_up(tcfg, adapter, schedule, done, record)

        def on_step(event: StepEvent, record: Callable = record) -> None:
            if event.rank == 0:
                record(event.step, event.lenses)

        train(tcfg, adapter, resume=resume, progress=progress, on_step=on_step)
    return rows


def _catch_up(tcfg: TrainConfig, adapter: ModelAdapter, schedule: dict[int, int],
              done: set[int], record: Callable[[int, dict[str, Lens]], None]) -> None:
    """Measure a milestone whose step the checkpoint holds but whose rows are missing.

    train() calls on_step after a step's checkpoint is written, so a run killed while it
    measured milestone step s resumes *after* s and would never call back for it; the
    checkpoint's lenses are exactly the state at s (every earlier milestone was measured
    before any later checkpoint was written)."""
    ckpt = recover_dir(Path(tcfg.out) / CHECKPOINT)
    if ckpt is None:
        return
    try:
        step = int(json.loads((ckpt / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} is unreadable: {exc}") from exc
    missing = [s for s in schedule if s <= step and s not in done]
    if missing and missing != [step]:
        raise CheckpointError(f"{tcfg.out}: milestone steps {missing} were never measured and "
                              f"the checkpoint is at step {step}; use --overwrite")
    if missing:
        names = lens_names(tcfg, adapter.hidden_size)  # the order train() builds them in
        record(step, {name: load_lens(ckpt / "lenses" / name, adapter) for name in names})


def _print_rows(rows: list[TrackRow], recipe: str, step: int) -> None:
    for r in rows:
        if r["recipe"] == recipe and r["step"] == step:
            raf = "" if r["raf"] is None else f"  RAF {r['raf']:.3f}"
            print(f"{recipe:<11}{r['tokens']:>9,} tok  {r['lens']:<9} KL {r['kl']:.3f}  "
                  f"eff.rank {r['effective_rank']:.1f} ({100 * r['effective_rank_over_h']:.1f}"
                  f"% H)  c90 {r['components_90']:.1f}  PR {r['participation_ratio']:.1f}{raf}")
