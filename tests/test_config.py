"""LoRAConfig: validation messages, scaling, and the dict round trip used by checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_lora.config import LoRAConfig


@pytest.mark.parametrize("r", [0, -1, 2.0, "8", None])
def test_rank_must_be_a_positive_int(r):
    with pytest.raises(ValueError, match=r"rank `r` must be a positive integer, got r="):
        LoRAConfig(r=r)


@pytest.mark.parametrize("r", [True, False])
def test_rank_rejects_bool(r):
    # bool is an int subclass: True would otherwise silently mean r=1.
    with pytest.raises(ValueError, match=rf"got r={r}"):
        LoRAConfig(r=r)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), True, "16"])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match=r"`alpha` must be a positive number"):
        LoRAConfig(alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, "0.1", None])
def test_dropout_must_be_in_unit_interval(dropout):
    with pytest.raises(ValueError, match=r"`dropout` must be in \[0, 1\)"):
        LoRAConfig(dropout=dropout)


@pytest.mark.parametrize("dropout", [0.0, 0, 0.5, 0.999])
def test_dropout_accepts_valid_values(dropout):
    assert LoRAConfig(dropout=dropout).dropout == dropout


@pytest.mark.parametrize("bias", ["None", "lora", "ALL", None])
def test_bias_mode_is_checked(bias):
    with pytest.raises(ValueError, match=r"`bias` must be one of \('none', 'lora_only', 'all'\)"):
        LoRAConfig(bias=bias)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(target_modules=3), TypeError, r"`target_modules` must be a list of module names.*got int"),
        (dict(target_modules={"q": 1}), TypeError, r"`target_modules` .*got dict"),
        (dict(target_modules=""), ValueError, r"`target_modules` must not be an empty string"),
        (dict(target_modules=[]), ValueError, r"`target_modules` must be a non-empty list"),
        (dict(target_modules=["q", 1]), ValueError, r"`target_modules` must be a non-empty list"),
        (dict(target_modules=["q", ""]), ValueError, r"`target_modules` must be a non-empty list"),
        (dict(exclude_modules=5), TypeError, r"`exclude_modules` must be a list"),
        (dict(exclude_modules=[]), ValueError, r"`exclude_modules` must be a non-empty list"),
        (dict(modules_to_save=[None]), ValueError, r"`modules_to_save` must be a non-empty list"),
        (dict(modules_to_save=7), TypeError, r"`modules_to_save` must be a list of module names.*got int: 7"),
    ],
)
def test_bad_target_specs(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRAConfig(**kwargs)


def test_target_specs_are_normalized():
    config = LoRAConfig(target_modules=("query", "value"), exclude_modules=("x",), modules_to_save="classifier")
    assert config.target_modules == ["query", "value"]
    assert config.exclude_modules == ["x"]
    assert config.modules_to_save == ["classifier"]
    # A string stays a string: it is a full-match regex (or "all-linear").
    assert LoRAConfig(target_modules=r".*\.(q|v)").target_modules == r".*\.(q|v)"
    assert LoRAConfig().target_modules == "all-linear"


@pytest.mark.parametrize(
    ("dtype", "error", "match"),
    [
        (torch.int8, TypeError, r"`adapter_dtype` must be a floating-point torch.dtype.*torch.int8"),
        ("int64", TypeError, r"`adapter_dtype` must be a floating-point.*torch.int64"),
        ("float33", TypeError, r"Unknown dtype name 'float33'"),
        ("Tensor", TypeError, r"Unknown dtype name 'Tensor'"),
        (32, TypeError, r"`adapter_dtype` must be a floating-point torch.dtype .* got 32"),
    ],
)
def test_bad_adapter_dtype(dtype, error, match):
    with pytest.raises(error, match=match):
        LoRAConfig(adapter_dtype=dtype)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("float32", torch.float32), ("torch.bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_adapter_dtype_from_string(name, dtype):
    assert LoRAConfig(adapter_dtype=name).adapter_dtype is dtype


def test_adapter_dtype_none_is_allowed():
    assert LoRAConfig(adapter_dtype=None).adapter_dtype is None


@pytest.mark.parametrize(("r", "alpha"), [(1, 1.0), (3, 7.0), (8, 16), (7, 0.1), (64, 3.3)])
def test_scaling_is_alpha_over_r_exactly(r, alpha):
    assert LoRAConfig(r=r, alpha=alpha).scaling == alpha / r
    assert LoRAConfig(r=r, alpha=alpha, use_rslora=True).scaling == alpha / math.sqrt(r)


def test_scaling_known_values():
    assert LoRAConfig(r=8, alpha=16).scaling == 2.0
    assert LoRAConfig(r=16, alpha=8, use_rslora=True).scaling == 2.0
    assert LoRAConfig(r=4, alpha=4, use_rslora=True).scaling == 2.0


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16, None])
def test_to_dict_from_dict_round_trip(adapter_dtype):
    config = LoRAConfig(
        r=4,
        alpha=8.0,
        dropout=0.1,
        target_modules=("query", "value"),
        exclude_modules=r".*\.0\..*",
        modules_to_save=["classifier"],
        bias="lora_only",
        use_rslora=True,
        adapter_dtype=adapter_dtype,
    )
    data = config.to_dict()
    # JSON-safe: survives a dump/load unchanged (dtype as a plain name, lists not tuples).
    assert json.loads(json.dumps(data)) == data
    assert data["adapter_dtype"] == (None if adapter_dtype is None else str(adapter_dtype).removeprefix("torch."))
    assert data["target_modules"] == ["query", "value"]
    rebuilt = LoRAConfig.from_dict(json.loads(json.dumps(data)))
    assert rebuilt == config
    assert rebuilt.adapter_dtype is adapter_dtype
    assert config.differences(rebuilt) == {}


def test_to_dict_is_torch_load_safe(tmp_path):
    data = LoRAConfig(adapter_dtype=torch.bfloat16).to_dict()
    torch.save(data, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True) == data


def test_from_dict_rejects_unknown_keys():
    data = LoRAConfig().to_dict()
    data["lora_alpha"] = 32
    data["zzz"] = 1
    with pytest.raises(ValueError, match=r"Unknown LoRA config keys \['lora_alpha', 'zzz'\]; known keys are \["):
        LoRAConfig.from_dict(data)


def test_from_dict_validates():
    data = LoRAConfig().to_dict()
    data["r"] = 0
    with pytest.raises(ValueError, match="got r=0"):
        LoRAConfig.from_dict(data)


def test_differences_names_changed_fields():
    assert LoRAConfig(r=4).differences(LoRAConfig(r=8, bias="all")) == {"r": (4, 8), "bias": ("none", "all")}
