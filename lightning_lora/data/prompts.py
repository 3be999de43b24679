"""Instruction records to (prompt, response) text, and prompts to token ids, the same way for training and generation.

Record formats (one JSON object per example):

* ``alpaca``: ``instruction``, ``output``, optional ``input`` (Stanford Alpaca, Code Alpaca);
* ``dolly``: ``instruction``, ``response``, optional ``context`` (Databricks Dolly); ``context`` plays
  the role of Alpaca's ``input``;
* ``chat``: ``messages``, a list of ``{"role", "content"}`` ending with an ``assistant`` message, the one
  that is learned; rendered with the tokenizer's chat template, or ``"role: content"`` lines without one;
* ``text``: ``text``, learned in full (no prompt).

``prompt_template`` decides how ``alpaca``/``dolly`` records become a prompt: ``None`` or ``"alpaca"`` (the
Alpaca prompt, with its no-input variant when ``input`` is empty), ``"chat"`` (instruction and input as one
user message in the tokenizer's chat template: what an instruct model such as SmolLM2 expects), ``"none"``
(the instruction itself), or a ``str.format`` template over the record's fields such as
``"Q: {instruction}\\nA: "`` (``prompt_template_no_input`` for records without input).
"""

from __future__ import annotations

import string
from typing import Any

#: The Stanford Alpaca prompt (with an input section) and its no-input variant.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FORMATS = ("alpaca", "dolly", "chat", "text")
TEMPLATE_STYLES = ("alpaca", "chat", "none")
# format -> (required fields, optional input field, response field)
_FIELDS: dict[str, tuple[tuple[str, ...], str | None, str | None]] = {
    "alpaca": (("instruction", "output"), "input", "output"),
    "dolly": (("instruction", "response"), "context", "response"),
    "chat": (("messages",), None, None),
    "text": (("text",), None, None),
}


def detect_format(record: dict[str, Any], source: str) -> str:
    """The format of a record, from its fields (``source`` names the file and record in the error)."""
    keys = set(record)
    for name in ("chat", "text", "dolly", "alpaca"):
        if set(_FIELDS[name][0]) <= keys:
            return name
    expected = "; ".join(f"{n}: {list(_FIELDS[n][0])}" for n in FORMATS)
    raise ValueError(f"{source}: cannot tell the format from the fields {sorted(keys)}; expected one of {expected}.")


def _template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


class PromptFormatter:
    """Renders records and free-text instructions into prompt text and token ids for one tokenizer.

    Training (:meth:`render`, :meth:`encode_prompt`) and generation (:meth:`prompt`, :meth:`encode_prompt`)
    share this object, so a model is prompted exactly as it was trained.
    """

    def __init__(self, tokenizer: Any, prompt_template: str | None = None, prompt_template_no_input: str | None = None):
        self.tokenizer = tokenizer
        style = prompt_template or "alpaca"
        if style not in TEMPLATE_STYLES and not _template_fields(style):
            raise ValueError(
                f"prompt_template={prompt_template!r} is neither one of {list(TEMPLATE_STYLES)} nor a template with "
                "fields such as '{instruction}'."
            )
        if style == "chat" and not self.has_chat_template:
            raise ValueError(
                f"prompt_template='chat' needs a tokenizer with a chat template; {tokenizer.name_or_path!r} has none. "
                "Use 'alpaca' or a template string."
            )
        self.style = style if style in TEMPLATE_STYLES else "custom"
        self.template = ALPACA_TEMPLATE if self.style == "alpaca" else style
        self.template_no_input = prompt_template_no_input or (
            ALPACA_TEMPLATE_NO_INPUT if self.style == "alpaca" else self.template
        )

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    # -- text -------------------------------------------------------------------------------
    def prompt(self, instruction: str, input: str = "", extra: dict[str, Any] | None = None, source: str = "") -> str:
        """The prompt text for an instruction (and optional input): what generation feeds the model."""
        if self.style == "chat":
            content = f"{instruction}\n\n{input}" if input else instruction
            return self._chat([{"role": "user", "content": content}], add_generation_prompt=True)
        if self.style == "none":
            return f"{instruction}\n\n{input}" if input else instruction
        template = self.template if input else self.template_no_input
        fields = {**(extra or {}), "instruction": instruction, "input": input}
        missing = [f for f in _template_fields(template) if f not in fields]
        where = f"{source}: " if source else ""
        if input and "input" not in _template_fields(template):
            raise ValueError(
                f"{where}the record has an input (`input`/`context`) but the prompt template has no {{input}} field, "
                "so the input would be lost; add {input} to `prompt_template` (and use `prompt_template_no_input` "
                "for records without one)."
            )
        if missing:
            raise ValueError(
                f"{where}prompt template refers to field(s) {missing} that the record does not have "
                f"(it has {sorted(fields)}); fix the template or the data."
            )
        return template.format(**fields)

    def render(self, record: dict[str, Any], fmt: str, source: str) -> tuple[str, str, bool]:
        """``(prompt, response, special_tokens_in_text)`` for one record of format ``fmt``.

        ``special_tokens_in_text`` is True when a chat template wrote the special tokens (BOS, end of turn)
        into the text, so tokenizing must not add them again and no EOS is appended.
        """
        required, input_field, response_field = _FIELDS[fmt]
        for field in required:
            if field not in record:
                raise ValueError(f"{source}: missing field `{field}` (format {fmt!r} needs {list(required)}).")
        if fmt == "text":
            return "", _string(record, "text", source), False
        if fmt == "chat":
            return self._render_chat(record["messages"], source)
        instruction = _string(record, "instruction", source)
        input = _string(record, input_field, source) if record.get(input_field) is not None else ""
        response = _string(record, response_field, source)
        if self.style == "chat":
            user = f"{instruction}\n\n{input}" if input else instruction
            return self._render_chat(
                [{"role": "user", "content": user}, {"role": "assistant", "content": response}], source
            )
        extra = {k: v for k, v in record.items() if isinstance(v, str)}
        return self.prompt(instruction, input, extra, source), response, False

    def _render_chat(self, messages: Any, source: str) -> tuple[str, str, bool]:
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{source}: field `messages` must be a non-empty list of {{'role', 'content'}} objects.")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not {"role", "content"} <= set(message):
                raise ValueError(f"{source}: `messages[{i}]` must be an object with `role` and `content`.")
        if messages[-1]["role"] != "assistant":
            raise ValueError(
                f"{source}: the last message has role {messages[-1]['role']!r}; it must be 'assistant' "
                "(the learned reply)."
            )
        prompt = self._chat(messages[:-1], add_generation_prompt=True)
        full = self._chat(messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError(
                f"{source}: the chat template renders the conversation without the reply as text that is not a prefix "
                "of the full conversation, so prompt and reply cannot be separated."
            )
        return prompt, full[len(prompt) :], self.has_chat_template

    def _chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    # -- tokens -----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, special_tokens_in_text: bool | None = None) -> list[int]:
        """Token ids of a prompt, with the tokenizer's special tokens unless a chat template wrote them."""
        in_text = self.style == "chat" if special_tokens_in_text is None else special_tokens_in_text
        if not prompt:
            return []
        return list(self.tokenizer(prompt, add_special_tokens=not in_text)["input_ids"])

    def encode_response(self, response: str, special_tokens_in_text: bool) -> list[int]:
        """Token ids of a response, with EOS so the model learns to stop (chat templates end turns themselves)."""
        ids = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        if not special_tokens_in_text and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids


def _string(record: dict[str, Any], field: str, source: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{source}: field `{field}` must be a string, got {type(value).__name__}.")
    return value
