"""Join RQ2 records of one study whose seeds ran apart (``rlsubnet study --only rq2 --only-seeds K`` on several
machines or sessions) into the study that would have run them together: its verdicts pooled over every seed.

A record is trusted only after it is checked against the others: the same model (its content key; for records
written before it existed, its name and bf16 fingerprint), budget, learning rate, task, precision, test problems
(their digest), preference pairs (their sha256, or their counts for records written before the digest existed),
checkpoint interval and mask order, and no seed twice. θ_init is evaluated again by each record, on its own
machine: greedy decoding under bf16 autocast is not bit-identical across CPU models and kernels (Gemma-3-270m's
θ_init: 20 of 200 completions differed between two sessions), so where a record's θ_init differs from the first's,
its seeds are compared with their own θ_init and the merged record says by how much (``meta.merge_notes``). Points,
verdicts and nulls are then decided again by :func:`rlsubnet.study.rq2.decide` from the trajectories and
per-problem outcomes — the very function a study runs — so a merge of seeds run apart equals one study of the
same seeds.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..io.errors import InputError
from .results import StudyResults
from .rq2 import across_seeds, decide

# budget settings every record must share (the number of seeds is what the merge changes)
_META_SAME = ("budget", "lr", "lr_scale", "seed", "task", "level", "precision", "n_eval", "test_problems")
_DATA_SAME = ("steps", "lr", "lr_schedule", "warmup_ratio", "every", "pairs", "distinct_prompts", "examples", "epochs", "min_pairs")


def _where(path: str) -> str:
    """A record named by its folder (a report carries no home paths)."""
    p = Path(path)
    return p.parent.name if p.name == "results.json" else p.name


def _hw(meta: dict) -> str:
    h = meta.get("hardware")
    if not h:
        return "hardware not recorded"
    return f"{h.get('gpu') or h.get('cpu')}, torch {h.get('torch')}"


def _seeds_of(d: dict) -> list[int]:
    return sorted({t["seed"] for t in d["rq2"]["trajectories"] if t["variant"] == "full"})


def _check_one(path: str, d: dict) -> None:
    others = [rq for rq in ("rq1", "rq4", "rq5") if d.get(rq) is not None]
    if others:
        raise InputError(f"{path}: has {', '.join(others)}; study-merge joins records of RQ2 alone "
                         "(`rlsubnet study --only rq2 --only-seeds K`).")
    rq2 = d.get("rq2")
    if not rq2 or not rq2.get("trajectories") or not rq2.get("every"):
        raise InputError(f"{path}: no RQ2 trajectories (a study of another version, or RQ2 did not run).")
    if "init" not in d["accuracy"] or not d["accuracy"]["init"].get("outcomes"):
        raise InputError(f"{path}: no per-problem outcomes of θ_init, against which the records are checked.")


def _same(what: str, a, b, pa: str, pb: str) -> None:
    if a != b:
        raise InputError(f"{pb}: {what} is {b!r}, but {a!r} in {pa}: not seeds of one study.")


def merge_records(records: list[tuple[str, dict]]) -> StudyResults:
    """One study's results from ``[(path, results.json as a dict)]``, each a disjoint set of RQ2's seeds."""
    if len(records) < 2:
        raise InputError("study-merge: give at least two records to join.")
    for path, d in records:
        _check_one(path, d)
    records = sorted(records, key=lambda r: _seeds_of(r[1])[0])
    (p0, d0), notes = records[0], []
    m0 = d0["meta"]
    seen: dict[int, str] = {}
    for path, d in records:
        m = d["meta"]
        for k in _META_SAME:
            _same(f"meta.{k}", m0.get(k), m.get(k), p0, path)
        _same("the model", Path(m0["model"]).name, Path(m["model"]).name, p0, path)
        b0 = {k: v for k, v in m0["budget_settings"].items() if k != "seeds"}
        _same("the budget's settings", b0, {k: v for k, v in m["budget_settings"].items() if k != "seeds"}, p0, path)
        if m0.get("model_digest") and m.get("model_digest"):
            _same("the model's content key", m0["model_digest"], m["model_digest"], p0, path)
        elif path != p0:
            _same("the model's bf16 fingerprint (quantized_source)", m0.get("quantized_source"), m.get("quantized_source"), p0, path)
            notes.append(f"{' and '.join(dict.fromkeys(_where(p) for p, x in ((p0, m0), (path, m)) if not x.get('model_digest')))} "
                         "carry no content key of the model (an earlier version): the model is compared by its name"
                         + (" and bf16 fingerprint" if m0.get("quantized_source") else ""))
        i0, i = d0["accuracy"]["init"], d["accuracy"]["init"]
        _same("the test problems' digest", i0.get("problems_digest"), i.get("problems_digest"), p0, path)
        _same("the number of test problems", len(i0["outcomes"]), len(i["outcomes"]), p0, path)
        _same("rq2.every", d0["rq2"]["every"], d["rq2"]["every"], p0, path)
        _same("the mask order", (d0["rq2"].get("replay") or {}).get("mask_order"), (d["rq2"].get("replay") or {}).get("mask_order"), p0, path)
        da, db = d0["rq2"].get("data") or {}, d["rq2"].get("data") or {}
        for k in _DATA_SAME:
            _same(f"rq2.data.{k}", da.get(k), db.get(k), p0, path)
        fa, fb = d0.get("preferences") or {}, d.get("preferences") or {}
        if fa.get("pairs_digest") and fb.get("pairs_digest"):
            _same("the preference pairs' sha256", fa["pairs_digest"], fb["pairs_digest"], p0, path)
        elif fa or fb:
            for k in ("in_distribution_pairs", "distinct_prompts", "prompts_sampled"):
                _same(f"preferences.{k}", fa.get(k), fb.get(k), p0, path)
            lacking = list(dict.fromkeys(_where(p) for p, f in ((p0, fa), (path, fb)) if not f.get("pairs_digest")))
            notes.append(f"the preference pairs of {' and '.join(lacking)} carry no sha256 (written by an earlier version): "
                         "the records' pairs are compared by their counts only")
        for s in _seeds_of(d):
            if s in seen:
                raise InputError(f"{path}: seed {s} is in {seen[s]} too; each seed is merged once.")
            seen[s] = path
    out = copy.deepcopy(d0)
    for path, d in records[1:]:
        d = copy.deepcopy(d)
        i0, i = d0["accuracy"]["init"], d["accuracy"]["init"]
        if i["completions"] != i0["completions"] or i["outcomes"] != i0["outcomes"]:
            # θ_init evaluated again where these seeds ran, and not bit for bit the same (greedy decoding under bf16
            # autocast differs across CPU models and kernels): these seeds are compared with their own θ_init
            own = f"init@{_where(path)}"
            d["accuracy"][own] = d["accuracy"].pop("init")
            for t in d["rq2"]["trajectories"]:
                for pt in t["points"]:
                    if pt["record"] == "init":
                        pt["record"] = own
            diff_c = sum(x != y for x, y in zip(i["completions"], i0["completions"]))
            diff_o = sum(x != y for x, y in zip(i["outcomes"], i0["outcomes"]))
            notes.append(f"θ_init as evaluated with `{_where(path)}` differs from `{_where(p0)}`'s in {diff_c} of "
                         f"{len(i0['outcomes'])} completions and {diff_o} outcomes (accuracy {100 * i['accuracy']:.1f}% "
                         f"against {100 * i0['accuracy']:.1f}%; {_hw(d['meta'])} against {_hw(m0)}): each seed is "
                         "compared with the θ_init of its own record")
        for part in ("runs", "diffs", "accuracy"):
            for name, v in d[part].items():
                if name in out[part] and out[part][name] != v:
                    raise InputError(f"{path}: {part}.{name} differs from the same entry in {p0}.")
                out[part].setdefault(name, v)
        r, o = d["rq2"], out["rq2"]
        o["rows"] += r["rows"]
        o["trajectories"] += r["trajectories"]
        if r.get("replay") and o.get("replay"):
            o["replay"]["runs"].update(r["replay"].get("runs") or {})
        if r.get("data") and o.get("data"):
            o["data"]["final"].update(r["data"].get("final") or {})
    algos = tuple(dict.fromkeys(t["algo"] for t in out["rq2"]["trajectories"]))
    o = out["rq2"]
    o["trajectories"].sort(key=lambda t: (algos.index(t["algo"]), t["seed"]))  # stable: a seed's variants keep their order
    o["rows"].sort(key=lambda r: (algos.index(r["algo"]), r["seed"]))
    res = StudyResults.from_dict(out, "merged results")
    points, verdicts, nulls = decide(res.accuracy, res.rq2.trajectories, algos, res.rq2.every)
    res.rq2.points, res.rq2.verdicts, res.rq2.nulls = points, verdicts, nulls
    res.rq2.across_seeds = across_seeds(res.rq2.rows, algos)
    base = m0.get("seed", 0)
    meta = res.meta
    meta["seeds_run"] = [s - base for s in sorted(seen)]
    meta["budget_settings"] = dict(meta["budget_settings"], seeds=len(seen))
    meta["runs"] = sum(d["meta"]["runs"] for _, d in records)
    meta["elapsed_s"] = sum(d["meta"]["elapsed_s"] for _, d in records)
    meta["merged_from"] = [{"record": _where(p), "seeds": _seeds_of(d), "runs": d["meta"]["runs"], "elapsed_s": d["meta"]["elapsed_s"],
                            "pairs_digest": (d.get("preferences") or {}).get("pairs_digest"), "hardware": d["meta"].get("hardware")}
                           for p, d in records]
    digests_m = {d["meta"].get("model_digest") for _, d in records}
    meta["model_digest"] = digests_m.pop() if len(digests_m) == 1 else None
    meta["merge_notes"] = list(dict.fromkeys(notes))
    digests = {f["pairs_digest"] for f in meta["merged_from"]}
    if res.preferences is not None:  # the merged pairs have a digest only where every record's pairs had it
        res.preferences["pairs_digest"] = digests.pop() if len(digests) == 1 else None
    return res
