"""inject_lora and friends on plain modules and tiny transformers models built from configs."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification, T5Config, T5Model
from transformers.pytorch_utils import Conv1D

import lora_test_modules as shared

from lightning_lora import (
    LoRAConfig,
    ModulesToSave,
    adapter_state_dict,
    adapter_state_keys,
    build_optimizer,
    check_adapter_state,
    find_lora_targets,
    inject_lora,
    lora_layers,
    lora_param_groups,
    merge_lora,
    plan_lora,
    summarize_lora,
    unload_lora,
    unmerge_lora,
)
from lightning_lora.inject import lora_config_of
from lightning_lora.layers import LoRAConv1D, LoRAEmbedding, LoRALinear

VOCAB = shared.VOCAB


# -- tiny models ---------------------------------------------------------------------------
def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    return shared.tiny_bert(seed, num_labels=3)


tiny_gpt2 = shared.tiny_gpt2
tiny_llama = shared.tiny_llama


def tiny_t5() -> T5Model:
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)
    return T5Model(config).eval()


def ids(batch: int = 2, seq: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


class Net(nn.Module):
    """emb -> fc1 -> relu -> norm -> fc2 -> head, every parameter counted by hand below."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)  # 160
        self.fc1 = nn.Linear(8, 16)  # 128 + 16
        self.norm = nn.LayerNorm(16)  # 16 + 16
        self.fc2 = nn.Linear(16, 8)  # 128 + 8
        self.head = nn.Linear(8, 3)  # 24 + 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.norm(torch.relu(self.fc1(self.emb(x))))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def randomize_b(model: nn.Module, std: float = 0.5, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name, p in layer.adapter_parameters():
                if name in ("lora_B.weight", "lora_embedding_A"):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# -- target matching -----------------------------------------------------------------------
def test_suffix_match_has_a_dot_boundary_t5():
    model = tiny_t5()
    targets = find_lora_targets(model, LoRAConfig(target_modules=["o"]))
    # 2 encoder self-attention + 2 decoder self-attention + 2 decoder cross-attention.
    assert len(targets) == 6
    assert all(t.endswith(".SelfAttention.o") or t.endswith(".EncDecAttention.o") for t in targets)
    assert not any(t.endswith("wo") for t in targets)
    wo = find_lora_targets(model, LoRAConfig(target_modules=["wo"]))
    assert len(wo) == 4 and all(t.endswith("DenseReluDense.wo") for t in wo)


def test_suffix_match_exact_name_and_multi_part_suffix():
    model = tiny_bert()
    assert find_lora_targets(model, LoRAConfig(target_modules=["classifier"])) == ["classifier"]
    assert find_lora_targets(model, LoRAConfig(target_modules=["self.query"])) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
    ]
    # "ery" is a suffix of the string but not of a dotted name.
    with pytest.raises(ValueError, match="matched no module"):
        find_lora_targets(model, LoRAConfig(target_modules=["ery"]))


def test_regex_string_is_a_full_match():
    model = tiny_bert()
    assert find_lora_targets(model, LoRAConfig(target_modules=r".*\.1\.attention\.self\.(query|value)")) == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]
    # re.search would find "query" inside every query name; fullmatch does not.
    with pytest.raises(ValueError, match=r"target_modules='query' matched no module"):
        find_lora_targets(model, LoRAConfig(target_modules="query"))


def test_all_linear_on_plain_module_includes_last_linear():
    assert find_lora_targets(net(), LoRAConfig(target_modules="all-linear")) == ["fc1", "fc2", "head"]


def test_all_linear_excludes_gpt2_lm_head():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    targets = find_lora_targets(model, LoRAConfig(target_modules="all-linear"))
    assert "lm_head" not in targets
    layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    expected = [f"transformer.h.{i}.{n}" for i in range(2) for n in layers]
    assert targets == expected


@pytest.mark.parametrize("tie", [True, False])
def test_all_linear_excludes_llama_lm_head(tie):
    model = tiny_llama(tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    targets = find_lora_targets(model, LoRAConfig(target_modules="all-linear"))
    assert "lm_head" not in targets
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert sorted(targets) == sorted(
        f"model.layers.{i}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{n}"
        for i in range(2)
        for n in names
    )


def test_exclude_modules_list_and_regex():
    model = tiny_bert()
    all_q = LoRAConfig(target_modules=["query", "value"], exclude_modules=["layer.0.attention.self.query"])
    assert find_lora_targets(model, all_q) == [
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]
    regex = LoRAConfig(target_modules="all-linear", exclude_modules=r".*\.layer\.0\..*|classifier|.*pooler.*")
    targets = find_lora_targets(model, regex)
    assert targets and all(t.startswith("bert.encoder.layer.1.") for t in targets)
    assert len(targets) == 6  # query, key, value, attention.output.dense, intermediate.dense, output.dense


def test_all_excluded_error_mentions_exclusion():
    with pytest.raises(ValueError, match=r"after exclude_modules=\['fc1'\]"):
        find_lora_targets(net(), LoRAConfig(target_modules=["fc1"], exclude_modules=["fc1"]))


def test_no_match_error_lists_candidates():
    match = r"target_modules=\['q', 'v'\] matched no module of BertForSequenceClassification"
    with pytest.raises(ValueError, match=match) as e:
        inject_lora(tiny_bert(), target_modules=["q", "v"])
    message = str(e.value)
    for name in ("query (Linear x2)", "value (Linear x2)", "key (Linear x2)", "dense (Linear x7)", "word_embeddings"):
        assert name in message


def test_unsupported_type_error_names_type_and_supported_types():
    with pytest.raises(TypeError, match=r"`bert.embeddings.LayerNorm` .* is a LayerNorm, which LoRA cannot adapt") as e:
        find_lora_targets(tiny_bert(), LoRAConfig(target_modules=["LayerNorm"]))
    assert "Supported types: nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d" in str(e.value)
    with pytest.raises(TypeError, match=r"is a BertSelfAttention.*e\.g\. one of: query \(Linear x1\)"):
        find_lora_targets(tiny_bert(), LoRAConfig(target_modules=["attention.self"]))


def test_double_injection_error():
    model = inject_lora(net(), target_modules=["fc1"])
    with pytest.raises(ValueError, match=r"Net already holds LoRA layers \(fc1, \.\.\.\).*unload_lora"):
        inject_lora(model, target_modules=["fc2"])


def test_model_without_parameters_error():
    with pytest.raises(ValueError, match=r"Sequential has no parameters to adapt.*configure_model"):
        inject_lora(nn.Sequential(nn.ReLU()), target_modules="all-linear")


def test_inject_rejects_config_plus_kwargs():
    with pytest.raises(TypeError, match=r"not both \(got \['r'\]\)"):
        inject_lora(net(), LoRAConfig(), r=4)


def test_layer_types_chosen_per_module():
    model = inject_lora(tiny_gpt2(), target_modules=["c_attn", "wte", "wpe"])
    assert isinstance(model.transformer.h[0].attn.c_attn, LoRAConv1D)
    assert isinstance(model.transformer.wte, LoRAEmbedding)
    # c_attn is (32 -> 96): A and B use the true in/out sizes.
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A.weight.shape == (8, 32) and layer.lora_B.weight.shape == (96, 8)
    assert isinstance(layer.base_layer, Conv1D)


def test_adapters_follow_the_model_training_mode():
    model = net().eval()
    inject_lora(model, target_modules=["fc1"], dropout=0.5)
    assert not model.fc1.training and not model.fc1.lora_dropout.training
    model.train()
    assert model.fc1.lora_dropout.training


# -- freezing and modules_to_save --------------------------------------------------------------
ADAPTERS = ["fc1.lora_A.weight", "fc1.lora_B.weight", "fc2.lora_A.weight", "fc2.lora_B.weight"]
SAVED = ["head.modules_to_save.weight", "head.modules_to_save.bias"]


@pytest.mark.parametrize(
    ("bias", "names", "count"),
    [
        ("none", ADAPTERS + SAVED, 16 + 32 + 32 + 16 + 27),
        (
            "lora_only",
            ADAPTERS[:2] + ["fc1.base_layer.bias"] + ADAPTERS[2:] + ["fc2.base_layer.bias"] + SAVED,
            123 + 24,
        ),
        (
            "all",
            ["fc1.base_layer.bias"] + ADAPTERS[:2] + ["norm.bias", "fc2.base_layer.bias"] + ADAPTERS[2:] + SAVED,
            123 + 24 + 16,
        ),
    ],
)
def test_freezing_and_bias_modes_count_exactly(bias, names, count):
    model = inject_lora(net(), target_modules=["fc1", "fc2"], modules_to_save=["head"], r=2, bias=bias)
    assert sorted(trainable(model)) == sorted(names)
    summary = summarize_lora(model)
    assert summary.trainable_params == count
    assert summary.adapter_params == 96
    assert summary.total_params == 160 + 144 + 32 + 136 + 27 * 2 + 96
    assert summary.adapted == {"fc1": "Linear", "fc2": "Linear"}
    assert summary.modules_to_save == ["head"]
    # The untouched original head never trains, whatever the bias mode.
    assert not any(p.requires_grad for p in model.head.original_module.parameters())


def test_modules_to_save_copy_trains_original_untouched():
    model = inject_lora(net(), target_modules=["fc1"], modules_to_save=["head"])
    assert isinstance(model.head, ModulesToSave)
    original = {k: v.clone() for k, v in model.head.original_module.state_dict().items()}
    randomize_b(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randint(0, 20, (4, 5))
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    for k, v in model.head.original_module.state_dict().items():
        assert torch.equal(v, original[k]), k
        assert getattr(model.head.original_module, k).grad is None
    assert not torch.equal(model.head.modules_to_save.weight, original["weight"])
    # The forward uses the trained copy.
    h = model.fc2(model.norm(torch.relu(model.fc1(model.emb(x)))))
    assert torch.equal(model(x), model.head.modules_to_save(h))


def test_targets_inside_modules_to_save_are_not_adapted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    inject_lora(model, target_modules="all-linear", modules_to_save=["1"])
    assert list(lora_layers(model)) == ["0"]
    assert type(model[1].modules_to_save[0]) is nn.Linear
    assert trainable(model) == [
        "0.lora_A.weight",
        "0.lora_B.weight",
        "1.modules_to_save.0.weight",
        "1.modules_to_save.0.bias",
        "1.modules_to_save.2.weight",
        "1.modules_to_save.2.bias",
    ]


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a  # one module at two paths
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


def test_shared_module_wrapped_once_at_every_path():
    torch.manual_seed(0)
    model = Shared()
    base = model.a
    x = torch.randn(3, 4)
    with torch.no_grad():
        before = model(x)
    inject_lora(model, target_modules=["a", "b"])
    assert isinstance(model.a, LoRALinear) and model.b is model.a
    assert model.a.base_layer is base
    assert list(lora_layers(model)) == ["a"]
    assert summarize_lora(model).adapter_params == 8 * 4 + 4 * 8  # counted once
    randomize_b(model)
    with torch.no_grad():
        adapted = model(x)
        # Both applications carry the update.
        a = model.a
        h = a(torch.relu(a(x)))
        assert torch.equal(adapted, model.c(h))
        assert (adapted - before).abs().max() > 1e-2
    unload_lora(model)
    assert model.a is base and model.b is base
    with torch.no_grad():
        assert torch.equal(model(x), before)


# -- adapter state -------------------------------------------------------------------------
BERT_ADAPTER_KEYS = [
    f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight"
    for i in range(2)
    for m in ("query", "value")
    for ab in ("A", "B")
] + ["classifier.modules_to_save.weight", "classifier.modules_to_save.bias"]


def lora_bert(**kwargs) -> BertForSequenceClassification:
    return inject_lora(tiny_bert(), target_modules=["query", "value"], modules_to_save=["classifier"], r=4, **kwargs)


def test_adapter_state_dict_keys_exact_for_bert():
    model = lora_bert()
    state = adapter_state_dict(model)
    assert list(state) == BERT_ADAPTER_KEYS
    assert adapter_state_keys(model) == BERT_ADAPTER_KEYS
    assert state["bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (4, 32)
    assert state["bert.encoder.layer.0.attention.self.query.lora_B.weight"].shape == (32, 4)
    assert state["classifier.modules_to_save.weight"].shape == (3, 32)
    assert not any(t.requires_grad for t in state.values())
    check_adapter_state(model, state)  # its own state fits


def test_adapter_state_includes_trainable_biases():
    keys = adapter_state_keys(lora_bert(bias="lora_only"))
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    assert len(keys) == len(BERT_ADAPTER_KEYS) + 4


def test_check_adapter_state_missing_key():
    model = lora_bert()
    state = adapter_state_dict(model)
    del state["bert.encoder.layer.1.attention.self.value.lora_B.weight"]
    key = r"bert\.encoder\.layer\.1\.attention\.self\.value\.lora_B\.weight"
    with pytest.raises(ValueError, match=rf"missing `{key}` \(model shape \(32, 4\)\)"):
        check_adapter_state(model, state)


def test_check_adapter_state_wrong_shape_names_both_shapes():
    model = lora_bert()
    rank8 = inject_lora(tiny_bert(), target_modules=["query", "value"], modules_to_save=["classifier"], r=8)
    state = adapter_state_dict(rank8)
    with pytest.raises(ValueError, match=r"\(8 problems\)") as e:
        check_adapter_state(model, state, source="adapter file")
    key = "bert.encoder.layer.0.attention.self.query.lora_A.weight"
    assert f"`{key}` has shape (8, 32) in the adapter file but (4, 32) in the model" in str(e.value)


def test_check_adapter_state_unexpected_lora_key():
    model = lora_bert()
    state = adapter_state_dict(model)
    state["bert.encoder.layer.0.attention.self.key.lora_A.weight"] = torch.zeros(4, 32)
    state["bert.pooler.dense.weight"] = torch.zeros(32, 32)  # a base weight: not an adapter problem
    with pytest.raises(ValueError, match=r"\(1 problems\)") as e:
        check_adapter_state(model, state)
    assert "unexpected `bert.encoder.layer.0.attention.self.key.lora_A.weight` (shape (4, 32))" in str(e.value)


# -- merge, unmerge, unload -------------------------------------------------------------------
def test_merge_unmerge_unload_plain_module():
    model = net()
    x = torch.randint(0, 20, (4, 5))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, target_modules=["emb", "fc1", "fc2"], modules_to_save=["head"])
    randomize_b(model)
    with torch.no_grad():
        model.head.modules_to_save.weight.add_(0.5)
        adapted = model(x)
        assert (adapted - net()(x)).abs().max() > 1e-2

        merge_lora(model)
        assert all(layer.merged for layer in lora_layers(model).values())
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
        merge_lora(model)  # idempotent
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)

        unmerge_lora(model)
        torch.testing.assert_close(model.fc1.base_layer.weight, original["fc1.weight"], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)

        merged = unload_lora(copy.deepcopy(model), merge=True)
        assert type(merged.fc1) is nn.Linear and type(merged.emb) is nn.Embedding and type(merged.head) is nn.Linear
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=0)
        assert torch.equal(merged.head.weight, model.head.modules_to_save.weight)

        restored = unload_lora(model, merge=False)
        assert restored is model
        assert [type(m) for m in model.children()] == [nn.Embedding, nn.Linear, nn.LayerNorm, nn.Linear, nn.Linear]
        assert list(model.state_dict()) == list(original)
        for k, v in model.state_dict().items():  # merged and unmerged once: float rounding only
            torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)
        assert lora_config_of(model) is None


def test_merge_unmerge_unload_bert():
    model = tiny_bert()
    x = ids()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_logits = model(input_ids=x).logits
    config = LoRAConfig(target_modules="all-linear", modules_to_save=["classifier"], r=4)
    inject_lora(model, config)
    assert lora_config_of(model) is config
    randomize_b(model, std=0.2)
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        assert (adapted - base_logits).abs().max() > 1e-3
        merge_lora(model)
        torch.testing.assert_close(model(input_ids=x).logits, adapted, atol=1e-5, rtol=0)
        unmerge_lora(model)
        torch.testing.assert_close(model(input_ids=x).logits, adapted, atol=1e-5, rtol=0)

        merged = merge_lora(copy.deepcopy(model), unload=True)
        assert not lora_layers(merged) and not any(isinstance(m, ModulesToSave) for m in merged.modules())
        assert type(merged.bert.encoder.layer[0].attention.self.query) is nn.Linear
        assert type(merged.bert.pooler.dense) is nn.Linear and type(merged.classifier) is nn.Linear
        assert list(merged.state_dict()) == list(original)
        torch.testing.assert_close(merged(input_ids=x).logits, adapted, atol=1e-5, rtol=0)

        unload_lora(model, merge=False)
        assert type(model.bert.encoder.layer[1].output.dense) is nn.Linear
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(input_ids=x).logits, base_logits, atol=1e-5, rtol=0)


def test_unload_without_merge_returns_original_weights_exactly():
    model = tiny_bert()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"])
    randomize_b(model)
    with torch.no_grad():
        model.classifier.modules_to_save.weight.mul_(3)
    unload_lora(model)
    assert list(model.state_dict()) == list(original)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_merge_functions_need_lora_layers():
    for fn in (merge_lora, unmerge_lora, unload_lora):
        with pytest.raises(ValueError, match=rf"`{fn.__name__}`: Net holds no LoRA layers; call `inject_lora` first"):
            fn(net())


# -- nn.TransformerEncoder fast path ----------------------------------------------------------
def test_transformer_encoder_eval_uses_adapters():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        base_out = encoder(x)
    inject_lora(encoder, target_modules=["linear1", "linear2"])
    assert len(lora_layers(encoder)) == 4
    randomize_b(encoder, std=0.5)
    with torch.no_grad():
        eval_out = encoder(x)
        encoder.train()  # dropout is 0: the unfused reference path
        train_out = encoder(x)
        encoder.eval()
    assert (eval_out - base_out).abs().max() > 0.1  # the adapters really act at inference
    torch.testing.assert_close(eval_out, train_out, atol=1e-4, rtol=1e-5)


# -- plan_lora ------------------------------------------------------------------------------
def test_plan_lora_matches_summary_and_leaves_model_unchanged():
    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)  # flags that are not all-True must come back as they were
    types = [(n, type(m)) for n, m in model.named_modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    config = LoRAConfig(target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"], r=4)
    rng = torch.get_rng_state()

    plan = plan_lora(model, config)

    assert torch.equal(torch.get_rng_state(), rng)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert lora_config_of(model) is None

    injected = inject_lora(copy.deepcopy(model), config)
    assert plan == summarize_lora(injected)
    assert plan.by_type == {"Linear": 4, "Embedding": 1}
    assert plan.adapter_params == 4 * (4 * 32 + 32 * 4) + (4 * VOCAB + 32 * 4)
    assert plan.trainable_params == plan.adapter_params + 3 * 32 + 3
    assert str(plan).startswith("LoRA adapts 5 modules (1 Embedding, 4 Linear)")


# -- optimizer groups -------------------------------------------------------------------------
def test_lora_param_groups_and_build_optimizer():
    model = inject_lora(net(), target_modules=["emb", "fc1", "fc2"], modules_to_save=["head"], bias="lora_only", r=2)
    model.norm.weight.requires_grad_(True)  # something else left trainable: 1-D -> no_decay
    extra = nn.Parameter(torch.zeros(2, 2))
    model.register_parameter("extra", extra)  # a trainable matrix outside the adapters -> other
    groups = lora_param_groups(model, lora_b_lr_ratio=4.0)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["lora_A", "lora_B", "modules_to_save", "no_decay", "other"]
    ident = {id(p): n for n, p in model.named_parameters()}
    names = {k: [ident[id(p)] for p in g["params"]] for k, g in by_name.items()}
    assert names == {
        "lora_A": ["emb.lora_embedding_A", "fc1.lora_A.weight", "fc2.lora_A.weight"],
        "lora_B": ["emb.lora_embedding_B", "fc1.lora_B.weight", "fc2.lora_B.weight"],
        "modules_to_save": ["head.modules_to_save.weight"],
        "no_decay": ["fc1.base_layer.bias", "norm.weight", "fc2.base_layer.bias", "head.modules_to_save.bias"],
        "other": ["extra"],
    }
    assert by_name["lora_B"]["lr_ratio"] == 4.0 and by_name["no_decay"]["weight_decay"] == 0.0

    opt = build_optimizer(model, functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), lora_b_lr_ratio=4.0)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"lora_A": 1e-3, "lora_B": 4e-3, "modules_to_save": 1e-3, "no_decay": 1e-3, "other": 1e-3}
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"lora_A": 0.1, "lora_B": 0.1, "modules_to_save": 0.1, "no_decay": 0.0, "other": 0.1}
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_groups) == p.requires_grad, name
    assert id(model.fc1.base_layer.weight) not in in_groups
    assert id(model.head.original_module.weight) not in in_groups


def test_param_groups_leave_out_empty_groups_and_check_ratio():
    model = inject_lora(net(), target_modules=["fc1"])
    assert [g["name"] for g in lora_param_groups(model)] == ["lora_A", "lora_B"]
    with pytest.raises(ValueError, match=r"`lora_b_lr_ratio` must be positive, got 0"):
        lora_param_groups(model, lora_b_lr_ratio=0)
