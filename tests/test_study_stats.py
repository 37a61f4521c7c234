"""The study's inference, checked against brute force and hand-computed truth (fast tier): pooled intervals over
seeds × problems, Holm's correction, Welch without variance, the RQ2 points and the report's sentences."""

from __future__ import annotations

import numpy as np
import pytest

from rlsubnet.report.study_report import claim, half_ulp_bf16
from rlsubnet.study.rq2 import apply_jitter
from rlsubnet.study.stats import Comparison, holm, pooled_bootstrap, seed_difference


def test_pooled_bootstrap_counts_the_spread_between_seeds():
    """Defect: per-checkpoint intervals ignored training noise. Three seeds that disagree (+20, 0, −20 points)
    must give an interval far wider than one seed's paired bootstrap, centred on the pooled mean."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 200)
    seeds = []
    for shift in (0.2, 0.0, -0.2):
        b = a.copy()
        flip = rng.choice(200, int(abs(shift) * 200), replace=False)
        b[flip] = 1 if shift > 0 else 0
        b[flip] = np.where(shift > 0, 1, 0)
        seeds.append((a.tolist(), b.tolist()))
    truth = float(np.mean([np.mean(np.array(y) - np.array(x)) for x, y in seeds]))
    c = pooled_bootstrap(seeds, names=("full", "sub"), n_boot=4000, seed=1)
    assert abs(c.diff - truth) < 1e-12 and c.n == 600
    one = pooled_bootstrap(seeds[:1], names=("full", "sub"), n_boot=4000, seed=1)
    assert (c.hi - c.lo) > 2 * (one.hi - one.lo) and c.lo < 0 < c.hi and c.verdict == "inconclusive"
    assert one.verdict == "higher" and one.p < 0.01
    # identical seeds: the pooled interval equals the single-seed one up to resampling noise
    same = pooled_bootstrap([seeds[0]] * 3, n_boot=4000, seed=1)
    assert abs((same.hi - same.lo) - (one.hi - one.lo)) < 0.03


def test_pooled_bootstrap_refuses_unpaired_outcomes():
    c = pooled_bootstrap([([1, 0], [1, 0, 1])])
    assert c.lo is None and c.verdict == "inconclusive"


def test_holm_matches_hand_computation():
    """Holm: sorted p-values times (m − rank), running maximum; a claim survives only below 0.05."""
    ps = [0.01, 0.04, 0.03, 0.005]
    cs = [Comparison("accuracy", "a", str(i), 0.1, 0.05, 0.15, 100, "x", "higher", p=p) for i, p in enumerate(ps)]
    holm(cs)
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert [round(c.p_holm, 6) for c in cs] == [0.03, 0.06, 0.06, 0.02]
    assert [c.verdict for c in cs] == ["higher", "inconclusive", "inconclusive", "higher"]
    assert all(c.family == 4 for c in cs)


def test_welch_without_variance_has_no_interval():
    """Defect: zero variance on both sides gave a zero-width interval and a verdict."""
    c = seed_difference([0.5, 0.5, 0.5], [0.6, 0.6, 0.6], "accuracy", ("a", "b"))
    assert c.lo is None and c.verdict == "no interval"
    assert "no interval" in claim(c.to_dict(), "x", "accuracy")
    # one seed a side: the difference, named, and "no interval" said once
    one = claim(seed_difference([0.5], [0.6], "sparsity", ("sft", "grpo")).to_dict(), "SFT against GRPO", "sparsity")
    assert one == "SFT against GRPO: inconclusive — sparsity grpo − sft = +10.0 points, no interval (per-seed means (too few seeds))"


def test_claims_have_no_double_negative():
    """Defect: "θ_sub lower than θ_full by −5.5 points"."""
    c = Comparison("accuracy", "full", "sub", -0.055, -0.09, -0.02, 200, "x", "lower").to_dict()
    s = claim(c, "θ_sub against θ_full", "accuracy")
    assert "lower than full by 5.5 points" in s and "by -5.5" not in s and "by −5.5" not in s


def test_jitter_makes_a_small_effect_no_effect():
    from rlsubnet.study.rq2 import apply_jitter

    cs = [Comparison("accuracy", "full", "sub", -0.04, -0.07, -0.01, 600, "x", "lower", p=0.001, p_holm=0.01, family=9).to_dict(),
          Comparison("accuracy", "init", "full", 0.30, 0.2, 0.4, 600, "x", "higher", p=0.0001, p_holm=0.001, family=9).to_dict()]
    apply_jitter(cs, 0.06)
    assert [c["verdict"] for c in cs] == ["within jitter", "higher"]
    assert "not an effect" in claim(cs[0], "θ_sub against θ_full", "accuracy")


def test_jitter_is_seed_to_seed_or_the_flatter_neighbour():
    """One seed: Gemma-3-270m's θ_full (stop 30's run) peaked at step 8 (39.5%) from 16.5% at step 4 and fell to 32.5% at step 12; the
    climb (23 points) is the trajectory, not noise, so the jitter is the flatter side, 7 points. With a second seed,
    the seed-to-seed difference at the peak step is the noise, whatever the neighbours do."""
    from rlsubnet.study.rq2 import jitter_of

    null = lambda a, b, d: {"a": a, "b": b, "diff": d}
    one = [null("full s0@8", "full s0@4", 0.165 - 0.395), null("full s0@8", "full s0@12", 0.325 - 0.395)]
    assert jitter_of(one) == (pytest.approx(0.07), "neighbouring checkpoint")
    two = one + [null("full s1@8", "full s1@4", -0.30), null("full s1@8", "full s1@12", -0.20),
                 null("full s0@8", "full s1@8", -0.01), null("full s0@8", "full s2@8", 0.025)]
    assert jitter_of(two) == (pytest.approx(0.025), "seeds")
    final = [null("full s0@32", "full s0@28", 0.06)]  # the last step has one neighbour
    assert jitter_of(final) == (pytest.approx(0.06), "neighbouring checkpoint")
    assert jitter_of([]) == (None, None) and jitter_of([null("full", "sub", 0.3)]) == (None, None)
    cs = [Comparison("accuracy", "full", "sub", -0.05, -0.08, -0.02, 200, "x", "lower", p=0.001, p_holm=0.01, family=9).to_dict()]
    apply_jitter(cs, *jitter_of(one))
    assert cs[0]["verdict"] == "within jitter" and cs[0]["jitter_source"] == "neighbouring checkpoint"
    assert "7.0 points to its flatter neighbouring checkpoint, one seed only" in claim(cs[0], "θ_sub against θ_full", "accuracy")


def _traj(variant, seed, accs, losses):
    from rlsubnet.study.results import Trajectory, TrajectoryPoint

    pts = [TrajectoryPoint(0, 0.2, None, "init", None, None)]
    pts += [TrajectoryPoint(4 * (i + 1), a, None, f"{variant}{seed}@{4 * (i + 1)}", lo, None) for i, (a, lo) in enumerate(zip(accs, losses))]
    return Trajectory("dpo", variant, seed, f"{variant}{seed}", pts)


def test_points_are_the_peak_the_end_and_matched_progress():
    """The peak is θ_full's best mean over seeds (earliest on ties); matched progress picks, per run, the checkpoint
    whose loss is nearest θ_full's (same seed) at the peak."""
    from rlsubnet.study.rq2 import choose_points

    trajs = [_traj("full", 0, [0.5, 0.8, 0.3], [0.6, 0.3, 0.1]), _traj("full", 1, [0.4, 0.7, 0.35], [0.62, 0.28, 0.12]),
             _traj("random_uniform", 0, [0.3, 0.5, 0.8], [0.68, 0.5, 0.31]), _traj("random_uniform", 1, [0.3, 0.5, 0.7], [0.66, 0.55, 0.27])]
    pts = {p.name: p for p in choose_points(trajs, [4, 8, 12], "dpo")}
    assert pts["peak"].full_step == 8 and pts["final"].full_step == 12
    assert pts["matched"].steps["full"] == [8, 8] and pts["matched"].steps["random_uniform"] == [12, 12]


def test_half_ulp_of_bf16():
    import torch

    for e in (-12, -4, -3, -2, 0):
        w = torch.tensor(2.0**e * 1.25, dtype=torch.float32)
        up = torch.nextafter(w.to(torch.bfloat16), torch.tensor(10.0, dtype=torch.bfloat16)).float()
        assert half_ulp_bf16(e) == pytest.approx(float(up - w.to(torch.bfloat16).float()) / 2)


def test_schedule_sum_matches_transformers():
    """The Setup's Σlr under a schedule equals the sum of the learning rates transformers' scheduler gives."""
    import torch
    from transformers import get_scheduler

    from rlsubnet.report.study_report import schedule_sum

    for name, ratio, steps in (("linear", 0.1, 32), ("cosine", 0.1, 20), ("constant", 0.0, 10), ("linear", 0.0, 7)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=6.4e-5)
        w = int(np.ceil(steps * ratio))
        sched = get_scheduler(name if not (name == "constant" and w) else "constant_with_warmup", opt, num_warmup_steps=w,
                              num_training_steps=steps)
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert schedule_sum(steps, 6.4e-5, name, ratio) == pytest.approx(sum(lrs), rel=1e-9), name
