"""lensforge import: turn a tuned-lens 0.2.0 folder into a lensforge lens bound to a model.

Read the tuned-lens 0.2.0 folder TUNED_LENS_DIR (config.json + params.pt; the tensors are
read as plain data, never as code), check its shapes against --model and write OUT as a
lensforge lens (config.json + lens.safetensors) carrying the model's unembedding hash, so
later commands refuse it on another model. OUT must not exist, or be an empty folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lensforge.cli.common import add_model_args, check_new_out, load_model_from_args
from lensforge.cli.study import command_parser
from lensforge.errors import CheckpointError, LensMismatchError
from lensforge.lenses import import_tuned_lens, save_lens
from lensforge.lenses.io import CONFIG_FILE, WEIGHTS_FILE, read_tuned_lens_config
from lensforge.models.loading import resolve_model_source


def register(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "import", run_import, __doc__,
                       help="turn a tuned-lens folder into a lensforge lens for a model")
    p.add_argument("source", metavar="TUNED_LENS_DIR", help="a tuned-lens 0.2.0 lens folder")
    p.add_argument("out_dir", metavar="OUT", help="the lens folder to write")
    add_model_args(p)
    # Binding a lens to a model is the point of import: never to the default model by chance.
    model = next(a for a in p._actions if a.dest == "model")
    model.required, model.default = True, None
    model.help = "the model the lens belongs to: " + (model.help or "").replace(
        " (default: %(default)s)", "")


def model_shape(spec: str, *, online: bool = False) -> tuple[int | None, int | None]:
    """(layers, hidden size) from a model folder's config.json without loading weights, or
    None for what it cannot tell (GGUF, a hub id not yet downloaded, an unusual config); the
    loaded model is checked again either way."""
    source, gguf = resolve_model_source(spec, online=online)
    path = Path(source) / "config.json"
    if gguf or not path.is_file():
        return None, None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None  # the model load reports it properly
    if not isinstance(cfg, dict):
        return None, None
    text = cfg.get("text_config")  # multimodal checkpoints nest the language model's config
    cfg = text if isinstance(text, dict) else cfg

    def first(keys: tuple[str, ...]) -> int | None:
        for key in keys:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    return (first(("num_hidden_layers", "n_layer", "num_layers")),
            first(("hidden_size", "n_embd", "d_model")))


def run_import(args: argparse.Namespace) -> int:
    # Cheap checks first (OUT, the folder, its config, the model's config), so a mistake
    # fails in a second, before reading the tensors or loading the model.
    out = check_new_out(args.out_dir)
    source = Path(args.source)
    if not source.is_dir():
        raise CheckpointError(f"no tuned-lens folder at {source}")
    if (source / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{source} is already a lensforge lens ({WEIGHTS_FILE}); use it "
                              "as it is (import reads tuned-lens folders: config.json + params.pt)")
    if not (source / CONFIG_FILE).is_file() or not (source / "params.pt").is_file():
        raise CheckpointError(f"{source} is not a tuned-lens folder (expected {CONFIG_FILE} "
                              "and params.pt)")
    tl_cfg = read_tuned_lens_config(source)
    L, H = tl_cfg["num_hidden_layers"], tl_cfg["d_model"]
    if not args.layers_path:  # a hand-picked block list may differ from the config's count
        n_layers, hidden = model_shape(args.model, online=args.online)
        if (n_layers is not None and n_layers != L) or (hidden is not None and hidden != H):
            raise LensMismatchError(f"the tuned lens in {source} is for L={L}, H={H}; "
                                    f"model {args.model} has L={n_layers or '?'}, "
                                    f"H={hidden or '?'}")
    lens = import_tuned_lens(source)
    adapter = load_model_from_args(args)
    lens.bind(adapter)  # the authoritative shape check, on the loaded model
    cfg = lens.config
    cfg.extra["tuned_lens_base_model"] = tl_cfg.get("base_model_name_or_path")
    cfg.model_id, cfg.family = adapter.model_id, adapter.family
    cfg.vocab_size = adapter.vocab_size
    # The hash binds the lens to this model: eval/show/... refuse it on another one.
    cfg.unembed_hash = adapter.unembedding_hash()
    save_lens(lens, out)
    print(f"wrote {out} (tuned lens, {L} layers, H={H}, bound to {adapter.model_id}, "
          f"unembedding {cfg.unembed_hash})")
    return 0
