"""InstructionDataModule: formats, labels, too-long handling, packing, splits and clear errors on bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from lora_test_modules import alpaca_records, tiny_causal_lm_dir, tiny_tokenizer

from lightning_lora.data import InstructionDataModule, PromptFormatter
from lightning_lora.data.prompts import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT
from lightning_lora.models import load_tokenizer

TEMPLATE = "Q: {instruction}\nIn: {input}\nA: "
NO_INPUT = "Q: {instruction}\nA: "


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return str(path)


def make(tmp_path, records, name="data.json", chat_template=False, **kwargs):
    values = dict(prompt_template=TEMPLATE, prompt_template_no_input=NO_INPUT, max_length=64, val_split=0.0)
    dm = InstructionDataModule(
        tiny_tokenizer(chat_template), data_path=write(tmp_path, records, name), **{**values, **kwargs}
    )
    dm.setup("fit")
    return dm


def ids(text, special=True):
    return tiny_tokenizer()(text, add_special_tokens=special)["input_ids"]


def test_alpaca_labels_mask_the_prompt_and_padding(tmp_path):
    records = [
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Say hi.", "output": "hello there"},
    ]
    dm = make(tmp_path, records, name="data.jsonl")
    first, second = (
        (ids("Q: Add.\nIn: 1 2\nA: "), ids("3", False) + [2]),
        (ids("Q: Say hi.\nA: "), ids("hello there", False) + [2]),
    )
    assert dm.train_set == [{"input_ids": p + r, "labels": [-100] * len(p) + r} for p, r in (first, second)]
    batch = dm._collate(dm.train_set)  # dynamic padding to the longer example, pad = EOS (the tokenizer had none)
    width = max(len(first[0] + first[1]), len(second[0] + second[1]))
    assert batch["input_ids"].shape == (2, width)
    n = len(first[0] + first[1])
    assert (batch["input_ids"][0, n:] == 2).all() and (batch["labels"][0, n:] == -100).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)


def test_default_alpaca_prompt_and_dolly_context(tmp_path):
    formatter = PromptFormatter(tiny_tokenizer())
    record = {"instruction": "Sum.", "context": "1 2", "response": "3"}
    prompt, response, _ = formatter.render(record, "dolly", "x")
    assert (prompt, response) == (ALPACA_TEMPLATE.format(instruction="Sum.", input="1 2"), "3")
    assert formatter.prompt("Hi.") == ALPACA_TEMPLATE_NO_INPUT.format(instruction="Hi.")
    dm = make(tmp_path, [record, {"instruction": "Go.", "context": "", "response": "ok"}], format="dolly")
    assert dm.train_set[1]["input_ids"] == ids(NO_INPUT.format(instruction="Go.")) + ids("ok", False) + [2]


def test_chat_records_use_the_tokenizer_chat_template_and_learn_the_last_reply(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    dm = make(tmp_path, [{"messages": messages}], chat_template=True)
    (example,) = dm.train_set
    prompt_text, reply_text = "<s>user: hi</s>\n<s>assistant: ", "yo</s>\n"
    prompt, reply = ids(prompt_text, False), ids(reply_text, False)  # the template wrote BOS/EOS: none added
    assert example == {"input_ids": prompt + reply, "labels": [-100] * len(prompt) + reply}

    plain = make(tmp_path, [{"messages": messages}], chat_template=False)  # no chat template: "role: content" lines
    assert plain.train_set[0]["input_ids"] == ids("user: hi\nassistant: ") + ids("yo\n", False) + [2]


def test_alpaca_records_through_a_chat_template(tmp_path):
    dm = make(
        tmp_path, [{"instruction": "Add.", "input": "1 2", "output": "3"}], chat_template=True, prompt_template="chat"
    )
    prompt = ids("<s>user: Add.\n\n1 2</s>\n<s>assistant: ", False)
    assert dm.train_set[0]["labels"] == [-100] * len(prompt) + ids("3</s>\n", False)
    assert dm.formatter.encode_prompt(dm.formatter.prompt("Add.", "1 2")) == prompt  # generation sees the same ids


def test_plain_text_is_learned_in_full(tmp_path):
    dm = make(tmp_path, [{"text": "abc"}])
    assert dm.train_set == [{"input_ids": ids("abc") + [2], "labels": ids("abc") + [2]}]


def test_train_on_prompt(tmp_path):
    dm = make(tmp_path, alpaca_records(4), train_on_prompt=True)
    assert all(e["labels"] == e["input_ids"] for e in dm.train_set)


def test_too_long_examples_are_truncated_or_dropped_and_counted(tmp_path, caplog):
    records = [
        {"instruction": "A.", "output": "xxx"},  # prompt 10 tokens (with BOS) + 4: fits 16
        {"instruction": "B.", "output": "y" * 20},  # response truncated to 6
        {"instruction": "C" * 20, "output": "z"},  # prompt alone longer than 16: dropped either way
    ]
    with caplog.at_level(logging.INFO):
        dm = make(tmp_path, records, max_length=16)
    assert [len(e["input_ids"]) for e in dm.train_set] == [14, 16]
    assert dm.train_set[1]["input_ids"][-1] != 2  # the cut response has no EOS
    assert "2 of 3 examples are longer than max_length=16: 1 responses truncated, 1 dropped" in caplog.text
    dropped = make(tmp_path, records, max_length=16, too_long="drop")
    assert [len(e["input_ids"]) for e in dropped.train_set] == [14]
    with pytest.raises(ValueError, match=r"all 1 examples are longer than max_length=4 \(the longest prompt has 10"):
        make(tmp_path, records[:1], max_length=4)


def test_packing_keeps_examples_whole_and_their_labels(tmp_path):
    plain = make(tmp_path, alpaca_records(16), max_length=128)
    packed = make(tmp_path, alpaca_records(16), max_length=128, packing=True)
    assert len(packed.train_set) < len(plain.train_set)
    assert all(len(row["input_ids"]) <= 128 for row in packed.train_set)
    flat = [sum((e[k] for e in plain.train_set), []) for k in ("input_ids", "labels")]
    assert [sum((r[k] for r in packed.train_set), []) for k in ("input_ids", "labels")] == flat


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    records = alpaca_records(20)
    a, b = make(tmp_path, records, val_split=0.25), make(tmp_path, records, val_split=0.25)
    assert len(a.val_set) == 5 and len(a.train_set) == 15
    assert a.val_set == b.val_set and a.val_prompts(2) == b.val_prompts(2)
    assert not {tuple(e["input_ids"]) for e in a.val_set} & {tuple(e["input_ids"]) for e in a.train_set}
    other = make(tmp_path, records, val_split=0.25, seed=7)
    assert other.val_set != a.val_set
    from_file = make(tmp_path, records[:5], val_split=None, val_path=write(tmp_path, records[5:7], "val.json"))
    assert len(from_file.train_set) == 5 and len(from_file.val_set) == 2


def test_loader_shuffles_with_its_own_seed(tmp_path):
    dm = make(tmp_path, alpaca_records(16), batch_size=4)
    first = [b["input_ids"] for b in dm.train_dataloader()]
    torch.manual_seed(123)  # the global RNG does not matter
    second = [b["input_ids"] for b in dm.train_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize(
    ("content", "name", "kwargs", "message"),
    [
        (
            [{"instruction": "a", "output": "b"}, {"instruction": "c"}],
            "data.json",
            {},
            r"data.json, record 1: missing field `output` \(format 'alpaca'",
        ),
        ("", "data.jsonl", {}, r"data.jsonl is empty"),
        ("[]", "data.json", {}, r"data.json holds no records"),
        ('{"text": "a"}\nnot json\n', "data.jsonl", {}, r"data.jsonl, line 2: not valid JSON"),
        ([{"prompt": "a", "completion": "b"}], "data.json", {}, r"record 0: cannot tell the format from the fields"),
        ([{"text": "a"}], "data.json", {"format": "sharegpt"}, r"format='sharegpt' is unknown"),
        ([{"text": "a"}], "data.csv", {}, r"unknown file type '.csv'"),
        (
            [{"instruction": "a", "output": "b"}],
            "data.json",
            {"prompt_template_no_input": "{instruction} {topic}"},
            r"record 0: prompt template refers to field\(s\) \['topic'\]",
        ),
        (
            [{"instruction": "a", "input": "x", "output": "b"}],
            "data.json",
            {"prompt_template": "Q: {instruction}"},
            r"record 0: the record has an input .* no \{input\} field",
        ),
        ([{"instruction": "a", "output": 3}], "data.json", {}, r"record 0: field `output` must be a string, got int"),
        (
            [{"messages": [{"role": "user", "content": "a"}]}],
            "data.json",
            {},
            r"record 0: the last message has role 'user'",
        ),
        ([{"text": "a"}], "data.json", {"prompt_template": "chat"}, r"needs a tokenizer with a chat template"),
    ],
)
def test_bad_input_names_file_record_and_field(tmp_path, content, name, kwargs, message):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    values = {"prompt_template": None, "val_split": 0.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        InstructionDataModule(tiny_tokenizer(), data_path=str(path), **values).setup("fit")


def test_missing_pad_token_becomes_eos_and_is_said_once(tmp_path, caplog):
    folder = tiny_causal_lm_dir(tmp_path)
    with caplog.at_level(logging.INFO):
        first, second = load_tokenizer(folder), InstructionDataModule(folder, data_path="unused.json").tokenizer
    assert first.pad_token_id == second.pad_token_id == first.eos_token_id == 2
    assert caplog.text.count("has no pad token; using its EOS token '</s>'") == 1
