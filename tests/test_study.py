"""The study's wiring on a tiny random model (seconds), and the real SmolLM2 model from its package."""

from __future__ import annotations

import json
import re

import pytest

from rlsubnet.report.study_report import write_report
from rlsubnet.study.pipeline import Study

from tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    model = write_tiny_checkpoint(d / "model", seed=0, dtype="bfloat16", hidden=32, layers=2, heads=2, inter=64)
    res = Study(str(d / "out"), model=model, budget="tiny", reward="digits", lr_scale=100).run()
    write_report(res, d / "out")
    return d, model, res


def test_every_pipeline_runs(tiny_study):
    d, _, res = tiny_study
    for rq in ("rq1", "rq2", "rq4", "rq5"):
        assert rq in res
    assert [r["algo"] for r in res["rq1"]["rows"]] == ["sft", "grpo", "dpo", "kto", "rloo", "ppo", "orpo", "simpo"]
    for r in res["rq1"]["rows"]:
        assert 0 <= r["sparsity"] <= 1 and r["rank_mean"] is not None
    r2 = res["rq2"]["rows"][0]
    assert {x["atol"] for x in r2["closeness"]} >= {1e-5, 1e-4}
    assert r2["outside_mask"][0]["equal_fraction"] == 1.0  # θ_sub never moves outside the mask
    assert len(res["rq4"]["rows"]) == 3 and {r["axis"] for r in res["rq4"]["rows"]} == {"seed", "data", "algorithm"}
    f = res["rq5"]
    assert f["steps"] and [s["step"] for s in f["steps"]] == [1, 2]
    assert f["precision"]["fp32"]["sparsity"] <= f["precision"]["bf16"]["sparsity"]
    saved = json.loads((d / "out" / "results.json").read_text())
    assert saved["meta"]["budget"] == "tiny"


def test_report_is_self_contained(tiny_study):
    d, _, _ = tiny_study
    page = (d / "out" / "report.html").read_text()
    srcs = re.findall(r"src='([^']*)'", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<table>" in page and "RQ4" in page and "paper" in page
    md = (d / "out" / "report.md").read_text()
    assert "Table 4 analogue" in md and "What this shows" in md


def test_rerun_resumes_from_cache(tiny_study, capsys):
    d, model, res = tiny_study
    from rich.console import Console

    con = Console(record=True)
    again = Study(str(d / "out"), model=model, budget="tiny", reward="digits", lr_scale=100, console=con).run()
    text = con.export_text()
    assert text.count("cached") >= 20 and "steps, lr" not in text  # nothing retrained
    assert again["rq1"]["rows"] == res["rq1"]["rows"] and again["rq4"] == res["rq4"]


@pytest.mark.slow
def test_real_smollm2_generates_and_trains(tmp_path):
    from rlsubnet.io.gguf import convert_gguf, packaged_smollm2
    from rlsubnet.training import tasks as T
    from rlsubnet.training.evaluate import accuracy
    from rlsubnet.training.recipes import TrainConfig, run_training

    model = convert_gguf(packaged_smollm2(), tmp_path / "smollm2")
    cfg = json.loads((tmp_path / "smollm2" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and "quantization_config" not in cfg
    acc = accuracy(model, T.generate("add", 4, split="test"), max_new_tokens=8)
    assert acc["n"] == 4 and acc["samples"][0]["completion"]
    r = run_training(TrainConfig(algo="grpo", model=model, out=str(tmp_path / "run"), steps=2, batch_size=4, num_generations=4,
                                 max_new_tokens=8, n_train=8, lr=1e-5), progress=False)
    assert len(r.step_times) == 2
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_study_measures_delta_sync_bytes(tiny_study):
    """Issue 10: the main GRPO run records, per step, the bytes a delta weight sync would send; the report shows them."""
    d, _, res = tiny_study
    sync = res["runs"]["grpo"]["delta_sync"]
    assert [x["step"] for x in sync] == list(range(1, len(sync) + 1)) and len(sync) >= 2
    assert all(x["delta_plain_bytes"] == 0 or x["delta_bytes"] > 0 for x in sync)
    assert "Delta weight sync" in (d / "out" / "report.md").read_text()


def test_study_reports_the_floor(tiny_study):
    """Issue 9 (part): every RQ1 run carries Σlr, its floor and the sparsity above it; the report shows them."""
    d, _, res = tiny_study
    for r in res["rq1"]["rows"]:
        assert r["lr_sum"] > 0 and 0 <= r["floor"]["fraction"] <= 1
        assert r["sparsity_above_floor"] is None or 0 <= r["sparsity_above_floor"] <= 1
    assert "sparsity above the floor" in (d / "out" / "report.md").read_text()


def test_rq4_rows_carry_the_magnitude_matched_baseline(tiny_study):
    d, _, res = tiny_study
    for r in res["rq4"]["rows"]:
        m = r["matched"]
        assert m["kind"] == "magnitude" and m["strata"] >= 1 and m["expected_intersection"] >= 0
    assert "magnitude-matched" in (d / "out" / "report.md").read_text()
