"""Several named adapters on one base: task switching on tiny BERT and Llama models built from configs."""

from __future__ import annotations

import logging

import lora_test_modules as shared
import pytest
import torch
from torch import nn

from lightning_lora import (
    LoRAConfig,
    active_adapter,
    adapter_state_dict,
    add_adapter,
    delete_adapter,
    get_adapter_config,
    get_adapter_state,
    inject_lora,
    list_adapters,
    lora_layers,
    merge_lora,
    set_active_adapter,
    set_adapter_state,
    unmerge_lora,
)
from lightning_lora.inject import lora_config_of

VOCAB = shared.VOCAB

# Different ranks, targets, scaling and modules_to_save, so switching must re-inject.
BERT_X = LoRAConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
BERT_Y = LoRAConfig(r=2, alpha=6, target_modules=["key", "output.dense"], use_rslora=True)
LLAMA_X = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
LLAMA_Y = LoRAConfig(r=8, alpha=4, target_modules="all-linear")


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))


def bert_out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def llama_out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def randomize(model: nn.Module, seed: int) -> None:
    """Non-zero values in every trained tensor of the active adapter (B included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in adapter_state_dict(model).values():
            value.copy_(torch.randn(value.shape, generator=g) * 0.3)


def only(build, config: LoRAConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """A separate model that has just this one adapter, loaded from ``state``."""
    model = inject_lora(build(), config)
    assert sorted(adapter_state_dict(model)) == sorted(state)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    return model


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model tensors by their plain (LoRA-free) names."""
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value.clone()
    return out


def two_adapter_bert() -> nn.Module:
    model = shared.tiny_bert(0, num_labels=3)
    add_adapter(model, "x", BERT_X)
    randomize(model, seed=1)
    add_adapter(model, "y", BERT_Y)
    set_active_adapter(model, "y")
    randomize(model, seed=2)
    return model


# -- adding and listing ----------------------------------------------------------------------
def test_add_adapter_on_plain_model_injects_it_active():
    model = shared.tiny_bert(0)
    assert active_adapter(model) is None and list_adapters(model) == []
    assert add_adapter(model, "x", BERT_X) is model
    assert active_adapter(model) == "x" and list_adapters(model) == ["x"]
    assert lora_config_of(model) is BERT_X and get_adapter_config(model, "x") is BERT_X
    assert len(lora_layers(model)) == 4  # query and value in 2 layers


def test_plain_inject_is_the_default_adapter():
    model = inject_lora(shared.tiny_bert(0), BERT_X)
    assert active_adapter(model) == "default" and list_adapters(model) == ["default"]
    add_adapter(model, "y", BERT_Y)
    assert list_adapters(model) == ["default", "y"] and active_adapter(model) == "default"


def test_adding_an_adapter_leaves_the_active_one_untouched_and_stores_a_fresh_one():
    model = shared.tiny_bert(0, num_labels=3)
    add_adapter(model, "x", BERT_X)
    randomize(model, seed=1)
    params = {n: p for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in params.items()}
    before = bert_out(model)

    add_adapter(model, "y", BERT_Y)

    assert {n: p for n, p in model.named_parameters()} == params  # the very same Parameter objects
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(bert_out(model), before)
    fresh = get_adapter_state(model, "y")
    b_keys = [k for k in fresh if k.endswith("lora_B.weight")]
    a_keys = [k for k in fresh if k.endswith("lora_A.weight")]
    assert len(b_keys) == len(a_keys) == 6  # key, attention.output.dense, output.dense in 2 layers
    assert all(fresh[k].shape[1] == 2 and not fresh[k].any() for k in b_keys)  # r=2, B starts at zero
    assert all(fresh[k].shape[0] == 2 and fresh[k].abs().sum() > 0 for k in a_keys)


# -- outputs equal a model that only has the active adapter ------------------------------------
def test_active_adapter_outputs_equal_single_adapter_model_bert():
    model = two_adapter_bert()
    for name, config in (("y", BERT_Y), ("x", BERT_X), ("y", BERT_Y)):
        set_active_adapter(model, name)
        assert active_adapter(model) == name and lora_config_of(model) is get_adapter_config(model, name)
        reference = only(lambda: shared.tiny_bert(0, num_labels=3), config, get_adapter_state(model, name))
        assert sorted(adapter_state_dict(model)) == sorted(get_adapter_state(model, name))
        assert torch.equal(bert_out(model), bert_out(reference))
    # The two adapters really differ from each other and from the base model.
    base = bert_out(shared.tiny_bert(0, num_labels=3))
    set_active_adapter(model, "x")
    out_x = bert_out(model)
    set_active_adapter(model, "y")
    out_y = bert_out(model)
    assert (out_x - out_y).abs().max() > 1e-3 and (out_x - base).abs().max() > 1e-3


def test_active_adapter_outputs_equal_single_adapter_model_llama():
    model = shared.tiny_llama()
    add_adapter(model, "x", LLAMA_X)
    randomize(model, seed=3)
    add_adapter(model, "y", LLAMA_Y)
    set_active_adapter(model, "y")
    randomize(model, seed=4)
    assert len(lora_layers(model)) == 14  # 7 linear layers per block, lm_head excluded
    for name, config in (("x", LLAMA_X), ("y", LLAMA_Y)):
        set_active_adapter(model, name)
        reference = only(shared.tiny_llama, config, get_adapter_state(model, name))
        assert torch.equal(llama_out(model), llama_out(reference))


def test_switching_restores_the_base_exactly():
    model = two_adapter_bert()
    original = base_weights(shared.tiny_bert(0, num_labels=3))
    for name in ("x", "y", "x"):
        set_active_adapter(model, name)
        current = base_weights(model)
        assert current.keys() == original.keys()
        assert all(torch.equal(current[k], original[k]) for k in original)


# -- trained values survive switching ---------------------------------------------------------
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(input_ids=ids(), labels=torch.tensor([0, 2])).loss.backward()
    optimizer.step()


def test_switching_back_and_forth_preserves_trained_values():
    model = two_adapter_bert()
    set_active_adapter(model, "x")
    train_step(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    trained_x = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    out_x = bert_out(model)

    set_active_adapter(model, "y")
    train_step(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    trained_y = {k: v.clone() for k, v in adapter_state_dict(model).items()}

    set_active_adapter(model, "x")
    assert all(torch.equal(v, trained_x[k]) for k, v in adapter_state_dict(model).items())
    assert torch.equal(bert_out(model), out_x)
    stored_y = get_adapter_state(model, "y")
    assert stored_y.keys() == trained_y.keys() and all(torch.equal(stored_y[k], trained_y[k]) for k in trained_y)


def test_same_config_switch_keeps_parameters_so_the_optimizer_stays_valid():
    model = shared.tiny_llama()
    add_adapter(model, "a", LLAMA_X)
    randomize(model, seed=5)
    add_adapter(model, "b", LLAMA_X)
    params = {n: p for n, p in model.named_parameters()}
    state_a = {k: v.clone() for k, v in adapter_state_dict(model).items()}

    set_active_adapter(model, "b")
    assert {n: p for n, p in model.named_parameters()} == params
    assert lora_config_of(model) is get_adapter_config(model, "b")
    assert not any(v.any() for k, v in adapter_state_dict(model).items() if k.endswith("lora_B.weight"))
    assert torch.equal(llama_out(model), llama_out(shared.tiny_llama()))  # fresh B = 0: the base model

    set_active_adapter(model, "a")
    assert all(torch.equal(v, state_a[k]) for k, v in adapter_state_dict(model).items())


# -- merging ------------------------------------------------------------------------------------
def test_merge_then_unmerge_restores_base_weights_fp32():
    model = two_adapter_bert()
    original = base_weights(shared.tiny_bert(0, num_labels=3))
    set_active_adapter(model, "x")
    unmerged_out = bert_out(model)
    merge_lora(model)
    assert (bert_out(model) - unmerged_out).abs().max() <= 1e-5
    merged = base_weights(model)
    assert (merged["bert.encoder.layer.0.attention.self.query.weight"] - original["bert.encoder.layer.0.attention.self.query.weight"]).abs().max() > 1e-3  # fmt: skip
    unmerge_lora(model)
    restored = base_weights(model)
    assert max((restored[k] - original[k]).abs().max().item() for k in original) <= 1e-6


def test_switching_while_merged_unmerges_first():
    model = two_adapter_bert()
    original = base_weights(shared.tiny_bert(0, num_labels=3))
    set_active_adapter(model, "x")
    merge_lora(model)
    set_active_adapter(model, "y")
    assert not any(layer.merged for layer in lora_layers(model).values())
    restored = base_weights(model)
    assert max((restored[k] - original[k]).abs().max().item() for k in original) <= 1e-6
    reference = only(lambda: shared.tiny_bert(0, num_labels=3), BERT_Y, get_adapter_state(model, "y"))
    assert (bert_out(model) - bert_out(reference)).abs().max() <= 1e-6


# -- deleting -----------------------------------------------------------------------------------
def test_delete_inactive_adapter():
    model = two_adapter_bert()
    before = bert_out(model)
    delete_adapter(model, "x")
    assert list_adapters(model) == ["y"] and active_adapter(model) == "y"
    assert torch.equal(bert_out(model), before)


def test_delete_active_adapter_gives_the_original_model_back():
    model = two_adapter_bert()
    state_x = get_adapter_state(model, "x")
    delete_adapter(model, "y")
    assert active_adapter(model) is None and list_adapters(model) == ["x"]
    assert not lora_layers(model) and lora_config_of(model) is None
    assert torch.equal(bert_out(model), bert_out(shared.tiny_bert(0, num_labels=3)))
    set_active_adapter(model, "x")
    reference = only(lambda: shared.tiny_bert(0, num_labels=3), BERT_X, state_x)
    assert torch.equal(bert_out(model), bert_out(reference))


# -- adapter state ------------------------------------------------------------------------------
def test_get_and_set_adapter_state_round_trip_active_and_inactive():
    model = two_adapter_bert()  # y active
    new_x = {k: torch.full_like(v, 0.01) for k, v in get_adapter_state(model, "x").items()}
    set_adapter_state(model, "x", new_x)
    new_y = {k: v * 2 for k, v in get_adapter_state(model, "y").items()}
    set_adapter_state(model, "y", new_y)
    assert all(torch.equal(v, new_y[k]) for k, v in adapter_state_dict(model).items())
    set_active_adapter(model, "x")
    assert adapter_state_dict(model).keys() == new_x.keys()
    assert all(torch.equal(v, new_x[k]) for k, v in adapter_state_dict(model).items())
    # get_adapter_state of an inactive adapter is a copy: editing it changes nothing.
    copy_y = get_adapter_state(model, "y")
    next(iter(copy_y.values())).zero_()
    assert all(torch.equal(v, new_y[k]) for k, v in get_adapter_state(model, "y").items())


def test_set_adapter_state_is_strict_and_writes_nothing_on_error():
    model = two_adapter_bert()
    good = get_adapter_state(model, "x")
    key = "bert.encoder.layer.0.attention.self.query.lora_A.weight"
    missing = {k: v for k, v in good.items() if k != key}
    with pytest.raises(ValueError, match=r"missing `bert\.encoder\.layer\.0\.attention\.self\.query\.lora_A\.weight`"):
        set_adapter_state(model, "x", missing)
    with pytest.raises(ValueError, match=r"unexpected `extra\.lora_A\.weight` \(shape \(2, 3\)\)"):
        set_adapter_state(model, "x", {**good, "extra.lora_A.weight": torch.zeros(2, 3)})
    bad = {**{k: v * 0 for k, v in good.items()}, key: torch.zeros(8, 32)}
    with pytest.raises(ValueError, match=r"has shape \(8, 32\) in the state but \(4, 32\) in adapter 'x'"):
        set_adapter_state(model, "x", bad)
    assert all(torch.equal(v, good[k]) for k, v in get_adapter_state(model, "x").items())
    # The active adapter is checked the same way.
    active_key = next(iter(get_adapter_state(model, "y")))
    with pytest.raises(ValueError, match=r"The state does not fit adapter 'y' \(1 problems\)"):
        set_adapter_state(model, "y", {k: v for k, v in get_adapter_state(model, "y").items() if k != active_key})


# -- errors -------------------------------------------------------------------------------------
def test_unknown_duplicate_and_invalid_names():
    model = two_adapter_bert()
    with pytest.raises(KeyError, match=r"No adapter called 'z'; known adapters: \['x', 'y'\]"):
        set_active_adapter(model, "z")
    with pytest.raises(KeyError, match=r"known adapters: \['x', 'y'\]"):
        delete_adapter(model, "z")
    with pytest.raises(KeyError, match="No adapter called 'z'"):
        get_adapter_state(model, "z")
    with pytest.raises(ValueError, match=r"adapter called 'x' already exists; known adapters: \['x', 'y'\]"):
        add_adapter(model, "x", BERT_Y)
    for name in ("", "a.b", "a b", 3):
        with pytest.raises(ValueError, match="Invalid adapter name"):
            add_adapter(model, name, BERT_Y)
    with pytest.raises(TypeError, match="`config` must be a LoRAConfig"):
        add_adapter(model, "z", {"r": 4})


def test_biases_cannot_be_shared_between_adapters():
    model = shared.tiny_bert(0)
    add_adapter(model, "x", LoRAConfig(r=4, target_modules=["query"], bias="lora_only"))
    with pytest.raises(ValueError, match=r"Adapter 'x' trains biases \(bias='lora_only'\).*bias='none'"):
        add_adapter(model, "y", BERT_Y)
    assert list_adapters(model) == ["x"]


def test_bad_targets_leave_the_model_as_it_was():
    model = two_adapter_bert()
    before = bert_out(model)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="matched no module"):
        add_adapter(model, "z", LoRAConfig(target_modules=["nope"]))
    assert list_adapters(model) == ["x", "y"] and active_adapter(model) == "y"
    assert {n: p for n, p in model.named_parameters()} == params and torch.equal(bert_out(model), before)


def test_unloading_outside_the_api_forgets_the_active_adapter(caplog):
    model = two_adapter_bert()
    merge_lora(model, unload=True)
    with caplog.at_level(logging.WARNING, logger="lightning_lora.adapters"):
        assert active_adapter(model) is None
    assert "Adapter 'y' was unloaded outside" in caplog.text
    assert list_adapters(model) == ["x"]


def test_same_config_switch_while_merged_unmerges_the_old_delta():
    model = shared.tiny_llama()
    add_adapter(model, "a", LLAMA_X)
    randomize(model, seed=6)
    add_adapter(model, "b", LLAMA_X)
    set_active_adapter(model, "b")
    randomize(model, seed=7)
    set_active_adapter(model, "a")
    merge_lora(model)
    set_active_adapter(model, "b")  # same layers: a's ΔW must leave the base weights first
    reference = only(shared.tiny_llama, LLAMA_X, get_adapter_state(model, "b"))
    assert (llama_out(model) - llama_out(reference)).abs().max() <= 1e-6
    original = base_weights(shared.tiny_llama())
    restored = base_weights(model)
    assert max((restored[k] - original[k]).abs().max().item() for k in original) <= 1e-6
