"""RQ2/RQ3 along the trajectory: does training only the subnetwork recover full finetuning?

Every run (θ_full, θ_sub, the random-mask controls and the union-mask control) keeps a checkpoint every K
steps, and every checkpoint is evaluated on the same held-out problems, so the answer is a curve, not an
endpoint that may sit past a collapse. Verdicts are taken at stated points — θ_full's peak (chosen on θ_full's
own accuracy, which favours θ_full), the final step, and matched training progress (each run at the checkpoint
whose training loss, or reward for GRPO, is nearest θ_full's at its peak) — with intervals pooled over seeds
and problems, Holm's correction over every comparison drawn, and a null from θ_full against itself (its
seeds at the same step; with one seed, its flatter neighbouring checkpoint): a difference no larger than that
jitter is never called an effect (:func:`jitter_of`).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..analysis.naming import module_kind
from ..masks import Subnetwork, closeness
from ..training.config import PREFERENCE
from .results import RQ2, RQ2Point, RQ2Row, Trajectory, TrajectoryPoint, equal_at
from .stats import Comparison, holm, mean_sd, paired_bootstrap, pooled_bootstrap

TOLS = [0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4]


def _log(run_dir: str) -> list[dict]:
    try:
        return json.loads((Path(run_dir) / "train_log.json").read_text(encoding="utf-8")).get("steps", [])
    except (OSError, ValueError):
        return []


def _window(log: list[dict], key: str, lo: int, hi: int) -> float | None:
    v = [float(s[key]) for s in log if key in s and lo < int(s.get("step", 0)) <= hi and s[key] is not None]
    return sum(v) / len(v) if v else None


def progress_key(algo: str) -> str:
    """The training-progress measure a run's checkpoints are matched on: DPO-style loss, or the mean reward."""
    return "loss" if algo in PREFERENCE else "reward"


def trajectory(study, algo: str, variant: str, seed: int, run: str, run_dir: str, every: int) -> Trajectory:
    """Accuracy at step 0 (θ_init) and at every saved checkpoint of ``run``, with the progress since the last one."""
    log = _log(run_dir)
    init = study.results["accuracy"]["init"]
    pts = [TrajectoryPoint(0, init.accuracy, init.format_rate, "init", None, None)]
    saved = {int(Path(s).name[5:]): s for s in study.results["runs"][run].saved}
    saved.setdefault(study.b.steps, run_dir)
    pk = "rewards/margins" if algo in PREFERENCE else "reward"
    for step in sorted(saved):
        rec = f"{run}@{step}"
        study.accuracy(rec, saved[step])
        a = study.results["accuracy"][rec]
        pts.append(TrajectoryPoint(step, a.accuracy, a.format_rate, rec, _window(log, "loss", step - every, step),
                                   _window(log, pk, step - every, step)))
    return Trajectory(algo, variant, seed, run, pts)


def union_mask(study, name: str, full_dir: str) -> str | None:
    """θ_full's final mask united with every entry its tracker saw change at any step (entries that crossed a
    rounding boundary and came back): the mask an exact replay of the whole trajectory would need."""
    ever_p = Path(full_dir) / "tracking" / "ever_changed.safetensors"
    if not ever_p.exists():
        return None
    final, ever = Subnetwork.load(study.mask(name)), Subnetwork.load(ever_p)
    out = Path(study.mask(f"{name}_union"))
    bits = {n: (final.packed(n) | ever.packed(n)) if n in ever.shapes and ever.shapes[n] == final.shapes[n] else final.packed(n)
            for n in final.shapes}
    u = Subnetwork(final.shapes, bits, meta={"criterion": "bitwise, union over steps", "matched_to": final.digest(),
                                              "ever_digest": ever.digest()})
    return study.kept_mask(out, lambda: u, lambda m: m.digest() == u.digest())


def padded_mask(study, name: str, union_path: str, seed: int) -> str | None:
    """The union mask's partner: θ_full's final mask plus as many entries as the union adds, drawn at random
    among the entries that never changed, matched per tensor × |w0| exponent bin to the entries the union adds.
    Trained like θ_sub, it tells "the union recovers because of *which* entries it adds" from "because it trains
    more entries"."""
    from ..masks.overlap import matched_random_mask

    final, union = Subnetwork.load(study.mask(name)), Subnetwork.load(union_path)
    added = union - final
    if not added.count():
        return None
    seed = 3000 + seed

    def build() -> Subnetwork:
        extra = matched_random_mask(added, "magnitude", base=study.model, seed=seed, within=~union)
        m = final | extra
        m.meta = {"criterion": "final mask ∪ random never-changed entries, |w0|-matched to the union's added entries",
                  "matched_to": union.digest(), "seed": str(seed), "fill": extra.meta["fill"],
                  "shortfall": extra.meta["shortfall"], "moved": extra.meta["moved"]}
        return m

    # a cached mask is used only if it is drawn for this union by this rule (short bins filled from their
    # neighbours), and is the final mask plus none of the added entries
    return study.kept_mask(Path(study.mask(f"{name}_padded")), build,
                           lambda m: m.meta.get("matched_to") == union.digest() and m.meta.get("fill") == "nearest bin"
                           and m.meta.get("seed") == str(seed) and all(str(m.meta.get(k, "")).isdigit() for k in ("moved", "shortfall"))
                           and not (final - m).count() and not (m & added).count())


def replay_numbers(study, name: str, full_dir: str, close_sub) -> dict:
    """What the final mask cannot replay: entries changed at some step but outside it (in all and by tensor kind),
    and θ_sub's agreement with θ_full inside the mask by tensor kind."""
    out: dict = {}
    ever_p = Path(full_dir) / "tracking" / "ever_changed.safetensors"
    final = Subnetwork.load(study.mask(name))
    if ever_p.exists():
        ever = Subnetwork.load(ever_p)
        n_ever = ever.count()
        # entries that changed at some step but not at the end, counted once per tensor and summed by kind
        by: dict = {}
        for n in ever.shapes:
            if n in final.shapes:
                k = by.setdefault(module_kind(n), {"outside": 0, "numel": 0})
                k["outside"] += int(np.bitwise_count(ever.packed(n) & ~final.packed(n)).sum())
                k["numel"] += int(np.prod(ever.shapes[n]))
        outside = sum(v["outside"] for v in by.values())
        out.update(ever_changed=n_ever, final_mask=final.count(), ever_outside_final=outside,
                   ever_outside_share=outside / n_ever if n_ever else 0.0,
                   outside_by_kind={k: {**v, "share": v["outside"] / v["numel"] if v["numel"] else 0.0} for k, v in sorted(by.items())})
    kinds: dict = {}
    for t in close_sub.tensors:
        if not t.get("mask_numel"):
            continue
        k = kinds.setdefault(module_kind(t["name"]), {"inside": 0, "bits_equal": 0, "equal_1e-5": 0, "equal_1e-4": 0})
        k["inside"] += t["mask_numel"]
        for tol, key in ((0, "bits_equal"), (1e-5, "equal_1e-5"), (1e-4, "equal_1e-4")):
            k[key] += next((x["equal"] for x in t["inside_mask"] if x["atol"] == tol), 0)
    out["inside_by_kind"] = {k: {"inside": v["inside"], **{key: v[key] / v["inside"] for key in ("bits_equal", "equal_1e-5", "equal_1e-4")}}
                             for k, v in sorted(kinds.items())}
    return out


def _outcomes(acc: dict, traj: Trajectory, step: int) -> list | None:
    p = traj.at(step)
    return acc[p.record].outcomes if p is not None else None


def choose_points(trajs: list[Trajectory], steps: list[int], algo: str) -> list[RQ2Point]:
    """θ_full's peak (mean accuracy over seeds, earliest on ties), the final step, and matched progress."""
    full = [t for t in trajs if t.variant == "full"]
    mean = {s: sum(t.at(s).accuracy for t in full if t.at(s)) / max(1, sum(1 for t in full if t.at(s))) for s in steps}
    peak = max(steps, key=lambda s: (mean[s], -s))
    variants = sorted({t.variant for t in trajs}, key=lambda v: (v != "full", v))
    same = lambda s: {v: [s for t in trajs if t.variant == v] for v in variants}
    pts = [RQ2Point("peak", f"θ_full's highest mean accuracy over seeds (step {peak}); chosen on θ_full, so it favours θ_full", peak, same(peak))]
    final = max(steps)
    if final != peak:
        pts.append(RQ2Point("final", f"the last step ({final})", final, same(final)))
    key = progress_key(algo)
    attr = "loss" if key == "loss" else "progress"  # TrajectoryPoint.progress holds the mean reward for GRPO
    matched: dict = {}
    ok = True
    for v in variants:
        matched[v] = []
        for t in (x for x in trajs if x.variant == v):
            ref = next((f for f in full if f.seed == t.seed), full[0])
            target = getattr(ref.at(peak), attr, None)
            cand = [(abs(getattr(p, attr) - target), p.step) for p in t.points
                    if p.step > 0 and target is not None and getattr(p, attr) is not None]
            if not cand:
                ok = False
                break
            matched[v].append(min(cand)[1])
    if ok and any(s != peak for ss in matched.values() for s in ss):
        what = "training loss" if key == "loss" else "mean training reward"
        pts.append(RQ2Point("matched", f"each run at the checkpoint whose {what} is nearest θ_full's at its peak", peak, matched))
    return pts


def compare_at(acc: dict, trajs: list[Trajectory], point: RQ2Point, controls: list[str], seed: int = 0) -> list[Comparison]:
    """Pooled comparisons at one point: each model against θ_init and θ_full, and θ_sub against each control
    (``acc``: the study's accuracy records by name, with their per-problem outcomes)."""
    by = {(t.variant, t.seed): t for t in trajs}
    seeds = sorted({t.seed for t in trajs if t.variant == "full"})

    def outs(v: str, k: int):
        if v == "init":  # θ_init as evaluated where seed k ran (its θ_full's step 0; one record in one study)
            p0 = by[("full", k)].at(0) if ("full", k) in by else None
            return acc[p0.record if p0 is not None else "init"].outcomes
        t = by.get((v, k))
        if t is None:
            return None
        ss = point.steps.get(v) or []
        vs = [x.seed for x in trajs if x.variant == v]
        return _outcomes(acc, t, ss[vs.index(k)] if k in vs and vs.index(k) < len(ss) else point.full_step)

    # at matched progress θ_full sits at its peak: θ_full − θ_init is the peak's comparison, not drawn twice
    pairs_of = [("full", "sub"), ("init", "sub")] if point.name == "matched" else [("init", "full"), ("full", "sub"), ("init", "sub")]
    for c in controls:
        pairs_of += [("full", c), ("init", c), (c, "sub")]
    if "union" in controls and "padded" in controls:  # the same size: which entries the union adds, not how many
        pairs_of.append(("padded", "union"))
    out = []
    for a, b in pairs_of:
        pairs = [(outs(a, k), outs(b, k)) for k in seeds]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if pairs:
            out.append(pooled_bootstrap(pairs, "accuracy", (a, b), seed=seed))
    return out


def nulls_at(acc: dict, trajs: list[Trajectory], point: RQ2Point, every: int, seed: int = 0) -> list[Comparison]:
    """θ_full against θ_full', run by run: each seed's θ_full one checkpoint before and after the point, and every
    pair of seeds at the point (paired over problems; pooling would let opposite signs cancel, and a cycle of seed
    pairs sums to zero by construction)."""
    full = sorted((t for t in trajs if t.variant == "full"), key=lambda t: t.seed)
    s = point.full_step
    out = []
    for t in full:
        for other in (s - every, s + every):
            if other > 0 and t.at(other) is not None and t.at(s) is not None:
                out.append(paired_bootstrap(_outcomes(acc, t, s), _outcomes(acc, t, other), "accuracy",
                                            (f"full s{t.seed}@{s}", f"full s{t.seed}@{other}"), seed=seed))
    for i in range(len(full)):
        for j in range(i + 1, len(full)):
            if full[i].at(s) is not None and full[j].at(s) is not None:
                out.append(paired_bootstrap(_outcomes(acc, full[i], s), _outcomes(acc, full[j], s), "accuracy",
                                            (f"full s{full[i].seed}@{s}", f"full s{full[j].seed}@{s}"), seed=seed))
    return out


_NULL_LABEL = re.compile(r"s(-?\d+)@(\d+)$")


def jitter_of(nulls: list[dict]) -> tuple[float | None, str | None]:
    """θ_full's own jitter at a point, from its nulls (labels ``full s{seed}@{step}``), and where it came from.

    Training noise is what another seed does at the same step: with two or more seeds the jitter is the largest
    seed-to-seed difference there (``"seeds"``). One seed has only its neighbouring checkpoints, whose difference
    holds the trajectory's own trend as well as noise (at a peak reached in 4 steps from 16.5% to 39.5% it is the
    climb, not noise): the jitter is then the smaller of the two sides, the flatter one (``"neighbouring
    checkpoint"``), still an upper bound on the noise, which the report says."""
    seed_pairs, sides = [], {}
    for n in nulls:
        ma, mb = _NULL_LABEL.search(str(n.get("a", ""))), _NULL_LABEL.search(str(n.get("b", "")))
        if not (ma and mb):
            continue
        (sa, ta), (sb, tb) = ma.groups(), mb.groups()
        if ta == tb and sa != sb:
            seed_pairs.append(abs(n["diff"]))
        elif sa == sb and ta != tb:
            sides.setdefault(sa, []).append(abs(n["diff"]))
    if seed_pairs:
        return max(seed_pairs), "seeds"
    if sides:
        return max(min(v) for v in sides.values()), "neighbouring checkpoint"
    return None, None


def apply_jitter(comps: list[dict], jitter: float | None, source: str | None = None) -> None:
    """A difference no larger than θ_full's own seed-to-seed (or, with one seed, checkpoint-to-checkpoint) jitter
    is not an effect; every comparison records the jitter and, given one, its ``jitter_source``."""
    if jitter is None:
        return
    for c in comps:
        c["jitter"] = jitter
        if source:
            c["jitter_source"] = source
        if c["verdict"] in ("higher", "lower") and abs(c["diff"]) <= jitter:
            c["verdict"] = "within jitter"


def run_rq2(study) -> RQ2:
    b = study.b
    every = b.every
    study.accuracy("init", study.model)
    init_acc = study.results["accuracy"]["init"]
    rows, trajs, replay = [], [], {}
    for algo in b.rq2_algos:
        for k in study.seed_ks:
            name = study.run_name(algo, k)
            cfg = study.main_config(algo, k)
            full = study.train(name, cfg)
            study.analyze(name, full, rank=b.rank and not k)
            variants = {"sub": study.mask(name)}
            for kind in b.controls:
                variants[f"random_{kind}"] = study.control_mask(name, kind, cfg.seed)
            if b.union_control:  # every seed, so its verdicts pool over seeds like θ_sub's
                u = union_mask(study, name, full)
                if u:
                    variants["union"] = u
                    p = padded_mask(study, name, u, cfg.seed)
                    if p:
                        variants["padded"] = p
            models, close, close_raw = {"init": study.model, "full": full}, {}, {}
            trajs.append(trajectory(study, algo, "full", cfg.seed, name, full, every))
            for v, mask in variants.items():
                # the same run restarted from θ_init: same seed, data, schedule and hyperparameters, only the mask trained
                vcfg = replace(cfg, mask=mask, save_every=every, fp32_copy=False, track_every=0, mask_order=b.mask_order)
                models[v] = study.train(f"{name}_{v}", vcfg)
                c = closeness(study.model, full, models[v], mask=mask, atol=TOLS)
                close_raw[v] = c
                close[v] = {"all": c.atol, "inside_mask": c.inside_mask, "outside_mask": c.outside_mask, "rel_l2": c.rel_l2,
                            "mask_density": Subnetwork.load(mask).density()}
                trajs.append(trajectory(study, algo, v, cfg.seed, f"{name}_{v}", models[v], every))
            replay[name] = replay_numbers(study, name, full, close_raw["sub"])
            if "padded" in variants:  # counted from the masks' bits, not their metadata
                n_pad, n_final, n_union = (Subnetwork.load(variants[v] if v != "final" else study.mask(name)).count()
                                           for v in ("padded", "final", "union"))
                replay[name].update(padded_added=n_pad - n_final, padded_shortfall=n_union - n_pad,
                                    # drawn from a neighbouring |w0| bin of the same tensor: the draw's own count
                                    padded_moved=int(Subnetwork.load(variants["padded"]).meta.get("moved", 0)))
            rows.append(_endpoint_row(study, algo, k, cfg, name, models, variants, close, init_acc))
    points, verdicts, nulls = decide(study.results["accuracy"], trajs, b.rq2_algos, every)
    agg = across_seeds(rows, b.rq2_algos)
    return RQ2(rows=rows, across_seeds=agg, every=every, trajectories=trajs, points=points, verdicts=verdicts, nulls=nulls,
               replay={"mask_order": b.mask_order, "runs": replay}, data=_data_summary(study, trajs))


def decide(acc: dict, trajs: list[Trajectory], algos, every: int) -> tuple[list[RQ2Point], list[dict], list[dict]]:
    """RQ2's points, verdicts and nulls from the trajectories and their accuracy records alone (so that seeds run
    on different machines and joined by ``rlsubnet study-merge`` are decided exactly as one study decides them):
    at stated points, pooled over seeds, Holm over every comparison drawn, jitter from θ_full against itself."""
    verdicts, nulls, points = [], [], []
    controls = [v for v in dict.fromkeys(t.variant for t in trajs) if v.startswith("random_") or v in ("union", "padded")]
    for algo in algos:
        at = [t for t in trajs if t.algo == algo]
        steps = sorted({p.step for t in at for p in t.points if p.step > 0})
        if not steps:
            continue
        for pt in choose_points(at, steps, algo):
            points.append(pt)
            ns = [dict(n.to_dict(), point=pt.name, algo=algo) for n in nulls_at(acc, at, pt, every)]
            nulls += ns
            cs = compare_at(acc, at, pt, [c for c in controls if any(t.variant == c for t in at)])
            verdicts.append((pt, algo, cs, jitter_of(ns)))
    holm([c for _, _, cs, _ in verdicts for c in cs])
    out = []
    for pt, algo, cs, (jitter, source) in verdicts:
        ds = [dict(c.to_dict(), point=pt.name, algo=algo) for c in cs]
        apply_jitter(ds, jitter, source)
        out += ds
    return points, out, nulls


def across_seeds(rows: list[RQ2Row], algos) -> dict:
    """Mean ± sd over seeds of each model's final accuracy and closeness to θ_full, per algorithm."""
    agg = {}
    for algo in algos:
        rs = [r for r in rows if r.algo == algo]
        if not rs:
            continue
        agg[algo] = {v: {"accuracy": mean_sd([r.accuracy[v]["accuracy"] for r in rs if v in r.accuracy]),
                         "rel_l2": mean_sd([r.closeness_to_full[v]["rel_l2"] for r in rs if v in r.closeness_to_full]) if v not in ("init", "full") else None,
                         "inside_1e-5": mean_sd([equal_at(r.closeness_to_full[v]["inside_mask"], 1e-5) for r in rs if v in r.closeness_to_full])
                         if v not in ("init", "full") else None}
                     for v in rs[0].accuracy}
    return agg


def _data_summary(study, trajs: list[Trajectory]) -> dict:
    """The training data and how far training went: pairs, epochs, final loss and margin (θ_full, per seed)."""
    b = study.b
    d: dict = {"steps": b.steps, "lr": study.lr, "lr_schedule": b.lr_schedule, "warmup_ratio": b.warmup_ratio, "every": b.every}
    pref = study.results.get("preferences") or {}
    if any(t.algo in PREFERENCE for t in trajs) and pref:
        pairs = pref.get("in_distribution_pairs") or 0
        d.update(pairs=pairs, distinct_prompts=pref.get("distinct_prompts"), examples=b.steps * b.pref_batch,
                 epochs=(b.steps * b.pref_batch / pairs) if pairs else None, min_pairs=b.min_pairs)
    finals = {}
    for t in trajs:
        if t.variant == "full":
            log = _log(study.results["runs"][t.run].dir)
            finals[t.run] = {"loss": _window(log, "loss", b.steps - b.every, b.steps),
                             "margin": _window(log, "rewards/margins", b.steps - b.every, b.steps),
                             "reward": _window(log, "reward", b.steps - b.every, b.steps),
                             "first_loss": _window(log, "loss", 0, 1)}
    d["final"] = finals
    return d


def _endpoint_row(study, algo, k, cfg, name, models, variants, close, init_acc) -> RQ2Row:
    """The final checkpoints of one seed, compared problem by problem (kept as data; verdicts come from the points)."""
    acc = {"init": init_acc}
    for v, path in models.items():
        if v != "init":
            rec = f"{name}_{v}" if v != "full" else name
            study.accuracy(rec, path)
            acc[v] = study.results["accuracy"][rec]
    summary = {v: {"accuracy": a.accuracy, "format_rate": a.format_rate, "strict_accuracy": a.strict_accuracy}
               for v, a in acc.items()}
    comps = []
    for a_, b_ in [("init", "full"), ("full", "sub")] + [(v, "sub") for v in variants if v != "sub"]:
        if a_ in acc and b_ in acc and acc[a_].outcomes and acc[b_].outcomes:
            comps.append(paired_bootstrap(acc[a_].outcomes, acc[b_].outcomes, "accuracy", (a_, b_), seed=k).to_dict())
    runs = study.results["runs"]
    return RQ2Row(
        algo=algo, seed=cfg.seed, run=name, n_eval=init_acc.n, accuracy=summary, comparisons=comps, closeness_to_full=close,
        random_control={v[len("random_"):]: {"accuracy": summary[v]["accuracy"], "closeness": close[v]} for v in variants if v.startswith("random_")},
        reward={v: runs[f"{name}_{v}" if v != "full" else name].reward for v in models if v != "init"},
        acc_init=summary["init"]["accuracy"], acc_full=summary["full"]["accuracy"], acc_sub=summary["sub"]["accuracy"],
        closeness=close["sub"]["all"], inside_mask=close["sub"]["inside_mask"], outside_mask=close["sub"]["outside_mask"],
        rel_l2=close["sub"]["rel_l2"], mask_density=close["sub"]["mask_density"],
        loss_full=runs[name].loss, loss_sub=runs[f"{name}_sub"].loss,
        reward_full=runs[name].reward, reward_sub=runs[f"{name}_sub"].reward)
