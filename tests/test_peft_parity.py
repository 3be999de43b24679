"""Same targets, same parameters, same outputs as PEFT (the file format we promise to share)."""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import BertForSequenceClassification

import lora_test_modules as shared

from lightning_lora import LoRAConfig, adapter_state_dict, find_lora_targets, inject_lora, lora_layers, merge_lora

VOCAB = shared.VOCAB
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    return shared.tiny_bert(seed, num_labels=3)


tiny_gpt2 = shared.tiny_gpt2
tiny_llama = shared.tiny_llama


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def token_ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(4)


def _mlp():
    torch.manual_seed(0)
    return MLP().eval()


def _cnn():
    torch.manual_seed(0)
    return CNN().eval()


CASES = {
    "linear_mlp": (_mlp, ["fc1", "fc2", "out"], lambda: torch.randn(3, 8, generator=_gen())),
    "conv1d_gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], token_ids),
    "embedding_bert": (tiny_bert, ["word_embeddings", "query", "value"], token_ids),
    "conv2d_cnn": (_cnn, ["conv1", "conv2"], lambda: torch.randn(2, 3, 8, 8, generator=_gen())),
}


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def to_peft_key(key: str) -> str:
    """Ours `X.lora_A.weight` -> PEFT `base_model.model.X.lora_A.default.weight`; embedding A/B likewise."""
    key = re.sub(r"\.(lora_A|lora_B)\.weight$", r".\1.default.weight", key)
    key = re.sub(r"\.(lora_embedding_A|lora_embedding_B)$", r".\1.default", key)
    return "base_model.model." + key


def peft_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_peft(case, use_rslora):
    make, targets, make_input = CASES[case]
    x = make_input()
    ours = make()
    theirs = peft.get_peft_model(
        copy.deepcopy(ours),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora, init_lora_weights=True),
    ).eval()
    inject_lora(ours, target_modules=targets, r=4, alpha=8.0, use_rslora=use_rslora)

    # Same modules adapted, same scaling.
    prefix = "base_model.model."
    peft_layers = {n.removeprefix(prefix): m for n, m in theirs.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(lora_layers(ours)) == sorted(peft_layers)
    for name, layer in lora_layers(ours).items():
        assert layer.scaling == peft_layers[name].scaling["default"], name

    # Same adapter tensors under the mapped names, with the same shapes.
    mapped = {to_peft_key(k): v for k, v in adapter_state_dict(ours).items()}
    their_state = peft_lora_state(theirs)
    assert sorted(mapped) == sorted(their_state)
    for key, value in mapped.items():
        assert value.shape == their_state[key].shape, key

    # Both start at the base model's output.
    torch.testing.assert_close(run(ours, x), run(theirs, x), **TOL)

    # Non-zero B (and A for embeddings), copied into PEFT.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            for pname, p in layer.adapter_parameters():
                if pname in ("lora_B.weight", "lora_embedding_A"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    result = theirs.load_state_dict({to_peft_key(k): v for k, v in adapter_state_dict(ours).items()}, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    their_state = peft_lora_state(theirs)
    for key, value in adapter_state_dict(ours).items():
        assert torch.equal(their_state[to_peft_key(key)], value), key

    out, expected = run(ours, x), run(theirs, x)
    with theirs.disable_adapter():
        base_out = run(theirs, x)
    assert (out - base_out).abs().max() > 1e-3  # the adapters changed the output
    torch.testing.assert_close(out, expected, **TOL)

    # Merging agrees too: plain modules, same weights.
    merged_ours = merge_lora(ours, unload=True)
    merged_theirs = theirs.merge_and_unload()
    ours_sd, theirs_sd = merged_ours.state_dict(), merged_theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], atol=1e-6, rtol=1e-6, msg=key)
    torch.testing.assert_close(run(merged_ours, x), expected, **TOL)


def peft_all_linear(model: nn.Module, **kwargs) -> list[str]:
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules="all-linear", **kwargs))
    return [n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize(
    "make",
    [tiny_bert, tiny_gpt2, lambda: tiny_llama(tie=False), lambda: tiny_llama(tie=True)],
    ids=["bert", "gpt2", "llama", "llama_tied"],
)
def test_all_linear_selects_what_peft_wraps(make):
    model = make()
    ours = find_lora_targets(model, LoRAConfig(target_modules="all-linear"))
    theirs = peft_all_linear(model)
    assert ours == theirs
    assert "lm_head" not in ours
    assert len(ours) == {"BertForSequenceClassification": 14, "GPT2LMHeadModel": 8, "LlamaForCausalLM": 14}[
        type(model).__name__
    ]


def test_all_linear_seq_cls_matches_peft_with_classifier_saved():
    # PEFT's SEQ_CLS task type trains `classifier` in full; ours says so with modules_to_save.
    model = tiny_bert()
    ours = find_lora_targets(model, LoRAConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    theirs = peft_all_linear(model, task_type="SEQ_CLS")
    assert "classifier" not in ours and "bert.pooler.dense" in ours
    assert ours == theirs
