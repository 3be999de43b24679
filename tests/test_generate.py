"""Generation: merged == unmerged greedy tokens, the three adapter sources agree, sampling seeds, the command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lora_test_modules import alpaca_records, fit_kwargs, tiny_causal_lm_dir

from lightning_lora import LoRACallback, LoRAConfig, inject_lora, lora_layers, merge_lora, save_merged
from lightning_lora.cli import main as cli_main
from lightning_lora.commands.generate import main as generate_main
from lightning_lora.data import InstructionDataModule
from lightning_lora.generation import (
    formatter_for,
    generate,
    generate_ids,
    generation_kwargs,
    load_for_generation,
    stream,
)
from lightning_lora.models import SMOLLM2, CausalLMModule, load_causal_lm, load_tokenizer

PROMPT = "Reverse abc."


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_is_token_identical_before_and_after_merge(tmp_path, arch):
    folder = tiny_causal_lm_dir(tmp_path, arch=arch)
    model, tokenizer = load_causal_lm(folder).eval(), load_tokenizer(folder)
    prompt = formatter_for(tokenizer, "none").encode_prompt("Hi there")
    kwargs = generation_kwargs(tokenizer, max_new_tokens=16)
    base = generate_ids(model, tokenizer, prompt, **kwargs)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    unmerged = generate_ids(model, tokenizer, prompt, **kwargs)
    merge_lora(model, unload=True)
    assert not lora_layers(model)
    merged = generate_ids(model, tokenizer, prompt, **kwargs)
    assert len(unmerged) == 16 and merged == unmerged
    assert unmerged != base  # the adapter changes what is generated


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama with a chat template, LoRA-tuned a few steps: its checkpoint, PEFT dir and merged dir."""
    root = tmp_path_factory.mktemp("trained")
    folder = tiny_causal_lm_dir(root / "base", chat_template=True)
    (root / "data.json").write_text(json.dumps(alpaca_records(16)))
    data = InstructionDataModule(
        folder, data_path=str(root / "data.json"), prompt_template="chat", batch_size=4, val_split=0
    )
    module = CausalLMModule(folder, learning_rate=5e-2)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", filename="last")
    callback = LoRACallback(r=4, alpha=8, save_peft_dir=str(root / "peft"), merge_on_fit_end=False)
    pl.Trainer(callbacks=[callback, checkpoint], **fit_kwargs(root, max_steps=4)).fit(module, data)
    save_merged(module, root / "merged", tokenizer=data.tokenizer)
    return {
        "base": folder,
        "ckpt": str(root / "ckpt" / "last.ckpt"),
        "peft": str(root / "peft"),
        "merged": str(root / "merged"),
    }


def test_checkpoint_peft_dir_and_merged_model_generate_the_same(trained):
    base_model, tokenizer = load_for_generation(trained["base"])
    reference = generate(base_model, tokenizer, PROMPT, max_new_tokens=12)
    outputs = [
        generate(*load_for_generation(adapter=trained["ckpt"]), PROMPT, max_new_tokens=12),  # base from the checkpoint
        generate(
            *load_for_generation(trained["base"], adapter=trained["ckpt"], merge=False), PROMPT, max_new_tokens=12
        ),
        generate(*load_for_generation(trained["base"], adapter=trained["peft"]), PROMPT, max_new_tokens=12),
        generate(*load_for_generation(trained["merged"]), PROMPT, max_new_tokens=12),
    ]
    assert outputs == [outputs[0]] * 4
    assert outputs[0] != reference  # trained adapters change the reply


def test_sampling_is_repeatable_with_a_seed_and_leaves_the_global_rng(trained):
    model, tokenizer = load_for_generation(trained["base"])
    options = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95)
    state = torch.get_rng_state()
    first = generate(model, tokenizer, PROMPT, seed=1, **options)
    assert generate(model, tokenizer, PROMPT, seed=1, **options) == first
    assert torch.equal(torch.get_rng_state(), state)
    assert any(generate(model, tokenizer, PROMPT, seed=s, **options) != first for s in (2, 3, 4))
    greedy = generate(model, tokenizer, PROMPT, max_new_tokens=12)
    assert "".join(stream(model, tokenizer, PROMPT, max_new_tokens=12)) == greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(top_p=0.9), "top_p and top_k only apply to sampling"),
        (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
        (dict(temperature=1.0, top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be at least 1"),
    ],
)
def test_bad_decoding_options_are_errors(trained, kwargs, message):
    model, tokenizer = load_for_generation(trained["base"])
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, PROMPT, **kwargs)


def test_command_streams_replies_for_a_prompt_or_a_file(trained, tmp_path, capsys):
    expected = generate(*load_for_generation(adapter=trained["ckpt"]), PROMPT, max_new_tokens=8)
    assert generate_main(["--adapter", trained["ckpt"], "--prompt", PROMPT, "--max_new_tokens", "8"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": PROMPT}) + "\n" + json.dumps("Reverse xyz.") + "\n")
    argv = ["--model", trained["merged"], "--prompts_file", str(prompts), "--max_new_tokens", "8", "--stream", "false"]
    assert generate_main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"### [1/2] {PROMPT}\n{expected}\n### [2/2] Reverse xyz.\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "a"], "no model given"),
        (["--model", "m", "--prompt", "a", "--prompts_file", "p.txt"], "exactly one of --prompt and --prompts_file"),
        (["--model", "m", "--prompt", "a", "--top_k", "5"], "top_p and top_k only apply to sampling"),
        (["--model", "m", "--prompts_file", "missing.txt"], "prompts file missing.txt does not exist"),
        (["--model", "m", "--prompt", "a", "--adapter", "nowhere"], "neither a Lightning checkpoint file nor a PEFT"),
    ],
)
def test_command_errors_name_the_problem(argv, message, capsys):
    assert generate_main(argv) == 2
    assert message in capsys.readouterr().err


CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "generation").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_generation_configs_parse_in_the_cli(path, capsys):
    assert cli_main(["fit", "--config", str(path), "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "lightning_lora.models.CausalLMModule"
    assert config["data"]["class_path"] == "lightning_lora.data.InstructionDataModule"
    assert config["model"]["init_args"]["model_name_or_path"] == config["data"]["init_args"]["tokenizer"]
    assert (Path(__file__).parents[1] / config["data"]["init_args"]["data_path"]).is_file()


def test_generate_is_a_subcommand_of_lightning_lora(capsys):
    assert len(CONFIGS) >= 2
    assert cli_main(["generate", "--prompt", "a"]) == 2
    assert "no model given" in capsys.readouterr().err


@pytest.mark.skipif(
    not os.environ.get("LIGHTNING_LORA_TEST_SMOLLM2"), reason="set LIGHTNING_LORA_TEST_SMOLLM2=1 (loads SmolLM2)"
)
def test_smollm2_offline_default_prompts_like_its_chat_template():
    model, tokenizer = load_for_generation(SMOLLM2)
    formatter = formatter_for(tokenizer, "auto")
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert formatter.encode_prompt(formatter.prompt("What is 2+2?")) == list(expected)
    assert "4" in generate(model, tokenizer, "What is 2+2?", max_new_tokens=16)
