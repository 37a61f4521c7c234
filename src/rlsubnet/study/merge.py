"""Join the parts of one study that ran apart — its questions (``rlsubnet study --only rq1``, ``--only rq5``, …) and
their seeds (``--only-seeds K``), on several machines or sessions — into the study that would have run them
together: every question's seed figures computed again over every seed.

A record is trusted only after it is checked against the others: the same model (its content key; for records
written before it existed, its name and bf16 fingerprint), budget, learning rate, task, precision, test problems
(their digest), preference pairs (their sha256, or their counts for records written before the digest existed),
RQ2's checkpoint interval and mask order, and no seed of a question twice (RQ4 and RQ5's single-run ablations run
once, with seed 0). θ_init is evaluated again by each RQ2 record, on its own machine: greedy decoding under bf16
autocast is not bit-identical across CPU models and kernels (Gemma-3-270m's θ_init: 20 of 200 completions differed
between two sessions), so where a record's θ_init differs from the first's, its seeds are compared with their own
θ_init and the merged record says by how much (``meta.merge_notes``). A run of one configuration trained again for
another question (RQ1's DPO seed 1 is RQ2's θ_full seed 1) is kept under its own name, ``NAME@RECORD``, when it
differs. RQ2's points, verdicts and nulls are then decided again by :func:`rlsubnet.study.rq2.decide`, RQ1's rows
and comparisons by :func:`rlsubnet.study.questions.rq1_row` and ``rq1_comparisons``, RQ5's in- vs off-distribution
comparisons by ``distribution_comparisons`` — the very functions a study runs — so a merge of parts run apart
equals one study of the same seeds.
"""

from __future__ import annotations

import copy
import dataclasses
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


_RQS = ("rq1", "rq2", "rq4", "rq5")


def _seeds_by_rq(d: dict) -> dict[str, list[int]]:
    """The seeds (absolute, as the runs were trained) each research question of a record holds."""
    base, out = d["meta"].get("seed", 0), {}
    if d.get("rq1") is not None:
        out["rq1"] = sorted({x["seed"] for r in d["rq1"]["rows"] for x in r.get("seeds") or []})
    if d.get("rq2") is not None:
        out["rq2"] = sorted({t["seed"] for t in d["rq2"].get("trajectories") or [] if t["variant"] == "full"})
    if d.get("rq4") is not None:
        out["rq4"] = [base]
    if d.get("rq5") is not None:
        f = d["rq5"]
        out["rq5"] = sorted({x["seed"] for r in f.get("distribution") or [] for x in r.get("seeds") or []}
                            | ({base} if f.get("kl") is not None else set()))
    return out


def _seeds_of(d: dict) -> list[int]:
    return sorted({s for ss in _seeds_by_rq(d).values() for s in ss})


def _check_one(path: str, d: dict) -> None:
    if not any(d.get(rq) is not None for rq in _RQS):
        raise InputError(f"{path}: holds no research question to merge.")
    for rq in ("rq1", "rq5"):
        rows = (d.get(rq) or {}).get("rows" if rq == "rq1" else "distribution") or []
        if any(not r.get("seeds") for r in rows):
            raise InputError(f"{path}: {rq.upper()}'s rows carry no per-seed figures (written by an earlier version); they cannot be merged.")
    if d.get("rq2") is None:
        return
    rq2 = d["rq2"]
    if not rq2.get("trajectories") or not rq2.get("every"):
        raise InputError(f"{path}: no RQ2 trajectories (a study of another version, or RQ2 did not run).")
    if "init" not in d["accuracy"] or not d["accuracy"]["init"].get("outcomes"):
        raise InputError(f"{path}: no per-problem outcomes of θ_init, against which the records are checked.")


def _rq2_names(d: dict) -> set[str]:
    """Every run and accuracy entry a record's RQ2 refers to (by name, or by a name derived from one)."""
    if d.get("rq2") is None:
        return set()
    r = d["rq2"]
    return ({t["run"] for t in r["trajectories"]} | {p["record"] for t in r["trajectories"] for p in t["points"]}
            | {x["run"] for x in r["rows"]} | set(d["accuracy"]))


def _rename_refs(obj, old: str, new: str, keys: tuple = ("run",)) -> None:
    """Rewrite the run names a question's rows refer to (RQ1's and RQ5's ``run``, RQ4's ``a`` and ``b``) from ``old``
    to ``new``. Comparisons (whose ``a`` and ``b`` name algorithms) are computed again after the merge."""
    if isinstance(obj, dict):
        for k in keys:
            if obj.get(k) == old:
                obj[k] = new
        for v in obj.values():
            _rename_refs(v, old, new, keys)
    elif isinstance(obj, list):
        for v in obj:
            _rename_refs(v, old, new, keys)


def _same(what: str, a, b, pa: str, pb: str) -> None:
    if a != b:
        raise InputError(f"{pb}: {what} is {b!r}, but {a!r} in {pa}: not seeds of one study.")


def _check_pair(p0: str, d0: dict, path: str, d: dict, notes: list) -> None:
    """Is ``d`` (at ``path``) a part of the same study as ``d0``? Raises naming the first difference."""
    m0, m = d0["meta"], d["meta"]
    for k in _META_SAME:
        _same(f"meta.{k}", m0.get(k), m.get(k), p0, path)
    _same("the model", Path(m0["model"]).name, Path(m["model"]).name, p0, path)
    b0 = {k: v for k, v in m0["budget_settings"].items() if k != "seeds"}
    _same("the budget's settings", b0, {k: v for k, v in m["budget_settings"].items() if k != "seeds"}, p0, path)
    if m0.get("model_digest") and m.get("model_digest"):
        _same("the model's content key", m0["model_digest"], m["model_digest"], p0, path)
    elif path != p0:  # a record of an earlier version: by the model's name and bf16 fingerprint (said once, below)
        _same("the model's bf16 fingerprint (quantized_source)", m0.get("quantized_source"), m.get("quantized_source"), p0, path)
    i0, i = d0["accuracy"].get("init"), d["accuracy"].get("init")
    if i0 and i:
        _same("the test problems' digest", i0.get("problems_digest"), i.get("problems_digest"), p0, path)
        _same("the number of test problems", len(i0["outcomes"]), len(i["outcomes"]), p0, path)
    fa, fb = d0.get("preferences") or {}, d.get("preferences") or {}
    if fa.get("pairs_digest") and fb.get("pairs_digest"):
        _same("the preference pairs' sha256", fa["pairs_digest"], fb["pairs_digest"], p0, path)
    elif fa and fb:  # a record of an earlier version: by the pairs' counts (said once, below)
        for k in ("in_distribution_pairs", "distinct_prompts", "prompts_sampled"):
            _same(f"preferences.{k}", fa.get(k), fb.get(k), p0, path)


def _version_notes(records: list[tuple[str, dict]]) -> list[str]:
    """What records written by earlier versions could not be checked by, said once for all of them."""
    out = []
    no_key = [_where(p) for p, d in records if not d["meta"].get("model_digest")]
    if no_key:
        out.append(f"{' and '.join(no_key)} {'carries' if len(no_key) == 1 else 'carry'} no content key of the model (an earlier "
                   "version): the model is compared by its name"
                   + (" and bf16 fingerprint" if records[0][1]["meta"].get("quantized_source") else ""))
    prefs = [(p, d["preferences"]) for p, d in records if d.get("preferences")]
    lacking = [_where(p) for p, f in prefs if not f.get("pairs_digest")]
    if lacking and len(prefs) > 1:
        out.append(f"the preference pairs of {' and '.join(lacking)} carry no sha256 (written by an earlier version): "
                   "the records' pairs are compared by their counts only")
    return out


def _check_rq2_pair(p0: str, d0: dict, path: str, d: dict) -> None:
    _same("rq2.every", d0["rq2"]["every"], d["rq2"]["every"], p0, path)
    _same("the mask order", (d0["rq2"].get("replay") or {}).get("mask_order"), (d["rq2"].get("replay") or {}).get("mask_order"), p0, path)
    da, db = d0["rq2"].get("data") or {}, d["rq2"].get("data") or {}
    for k in _DATA_SAME:
        _same(f"rq2.data.{k}", da.get(k), db.get(k), p0, path)


def _check_seeds(records: list[tuple[str, dict]]) -> None:
    """Each seed of each question is in one record only (what runs once, RQ4 and RQ5's ablations, in one record)."""
    seen: dict = {}

    def once(key, path: str, what: str):
        if key in seen:
            raise InputError(f"{path}: {what} is in {seen[key]} too; each seed is merged once.")
        seen[key] = path

    for path, d in records:
        base = d["meta"].get("seed", 0)
        for r in (d.get("rq1") or {}).get("rows") or []:
            for x in r["seeds"]:
                once(("rq1", r["algo"], x["seed"]), path, f"RQ1's {r['algo'].upper()} seed {x['seed'] - base}")
        for s in _seeds_by_rq(d).get("rq2", []):
            once(("rq2", s), path, f"seed {s - base}")
        if d.get("rq4") is not None:
            once(("rq4",), path, "RQ4 (it runs once, with seed 0)")
        f = d.get("rq5")
        if f is not None:
            if f.get("kl") is not None:
                once(("rq5",), path, "RQ5's single-run ablations (they run once, with seed 0)")
            for r in f.get("distribution") or []:
                for x in r["seeds"]:
                    once(("rq5", r["name"], x["seed"]), path, f"RQ5's {r['name']} seed {x['seed'] - base}")


def _content(v: dict) -> dict:
    """An entry without where it lies and how long it took (folders and timings differ between two trainings of
    the same run that are otherwise bit for bit the same)."""
    return {k: x for k, x in v.items() if k not in ("dir", "mask", "saved", "model", "elapsed_s", "step_time_s")}


def _equal_where_both(a, b) -> bool:
    """Two entries equal on every key both hold, at every depth: a record written by an earlier version lacks the
    keys added since (``delta_entries`` in each delta-sync step, say), and one that did not measure something (RQ5
    analyses DPO without its rank: ``None``) holds the same run as one that did."""
    if a is None or b is None:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return all(_equal_where_both(a[k], b[k]) for k in a.keys() & b.keys())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal_where_both(x, y) for x, y in zip(a, b))
    return a == b


_PARTS = ("runs", "diffs", "accuracy")


def _unify_names(records: list[tuple[str, dict]], notes: list) -> None:
    """Make the records' run, diff and accuracy tables joinable. A name two records hold with different contents
    (in any of the tables) is a run of the same configuration trained again elsewhere (RQ1's DPO seed 1 and RQ2's
    θ_full seed 1 are one configuration): the later record's entries are kept as ``NAME@RECORD`` and its RQ1/RQ4/RQ5
    rows refer to them so. θ_init evaluated again where RQ2's seeds ran is kept as ``init@RECORD`` and those seeds
    are compared with it. A name RQ2 refers to in two records with different contents is refused (RQ2's names are
    derived from each other)."""
    owner: dict = {}  # name -> (path, record) that holds it under that name in the merge
    kept_as: dict = {}  # name -> the NAME@RECORD entries made of it (RQ2's checkpoints are named NAME@STEP: not these)

    def same(x: dict, a: str, y: dict, b: str) -> bool:  # entry a of record x holds what entry b of record y holds
        return all(_equal_where_both(_content(x[part][a]), _content(y[part][b])) for part in _PARTS if a in x[part] and b in y[part])

    def fill(x: dict, a: str, y: dict, b: str) -> None:  # entry a of x keeps what either measured of it
        for part in _PARTS:
            if a in x[part] and b in y[part]:
                for k, v in y[part][b].items():
                    if x[part][a].get(k) is None and v is not None:
                        x[part][a][k] = v

    def rename(path: str, d: dict, name: str, other: str) -> None:
        # the same run a third record already brought under NAME@RECORD (RQ1's DPO found in the cache by RQ5's
        # invocation into the same --out) is that entry, not another one
        twin = next((n for n in kept_as.get(name, []) if same(owner[n][1], n, d, name)), None)
        new = twin or f"{name}@{_where(path)}"
        _rename_refs((d.get("rq1") or {}).get("rows"), name, new)
        _rename_refs((d.get("rq5") or {}).get("distribution"), name, new)
        _rename_refs((d.get("rq4") or {}).get("rows"), name, new, ("a", "b"))
        for part in _PARTS:
            if name in d[part]:
                d[part][new] = d[part].pop(name)
        if twin:
            fill(owner[twin][1], twin, d, twin)
            notes.append(f"`{name}` of `{_where(path)}` differs from `{_where(other)}`'s and is `{twin}` bit for bit: kept "
                         f"once, as `{twin}`, which `{_where(path)}`'s rows use")
            return
        owner[new] = (path, d)
        kept_as.setdefault(name, []).append(new)
        notes.append(f"`{name}` ran again for `{_where(path)}` (the configuration of `{_where(other)}`'s) and differs from "
                     f"it: kept as `{new}`, which `{_where(path)}`'s rows use")

    for path, d in records:
        for name in list(dict.fromkeys(n for part in _PARTS for n in d[part])):
            if name not in owner:
                owner[name] = (path, d)
                continue
            po, do = owner[name]
            if same(do, name, d, name):
                fill(do, name, d, name)  # kept once, with what either record measured of it
                continue  # the same entries (a cached run copied, or one reproduced bit for bit)
            used, used_o = name in _rq2_names(d), name in _rq2_names(do)
            if name == "init" and d.get("rq2") is not None:
                # θ_init evaluated again where these seeds ran, and not bit for bit the same (greedy decoding under
                # bf16 autocast differs across CPU models and kernels): these seeds are compared with their own
                new = f"init@{_where(path)}"
                i, i0 = d["accuracy"].pop("init"), do["accuracy"]["init"]
                d["accuracy"][new] = i
                owner[new] = (path, d)
                for t in d["rq2"]["trajectories"]:
                    for pt in t["points"]:
                        if pt["record"] == "init":
                            pt["record"] = new
                diff_c = sum(x != y for x, y in zip(i["completions"], i0["completions"]))
                diff_o = sum(x != y for x, y in zip(i["outcomes"], i0["outcomes"]))
                twins = [n.split("@", 1)[1] for n, (_, x) in owner.items() if n.startswith("init@") and n != new
                         and _equal_where_both(_content(x["accuracy"][n]), _content(i))]
                notes.append(f"θ_init as evaluated with `{_where(path)}` differs from `{_where(po)}`'s in {diff_c} of "
                             f"{len(i0['outcomes'])} completions and {diff_o} outcomes (accuracy {100 * i['accuracy']:.1f}% "
                             f"against {100 * i0['accuracy']:.1f}%; {_hw(d['meta'])} against {_hw(do['meta'])})"
                             + (f", and is the same as `{'`, `'.join(twins)}`'s" if twins else "")
                             + ": each seed is compared with the θ_init of its own record")
            elif used and used_o:
                part = next(p for p in _PARTS if name in do[p] and name in d[p] and not _equal_where_both(_content(do[p][name]), _content(d[p][name])))
                raise InputError(f"{path}: {part}.{name} differs from the same entry in {po}.")
            elif used:  # RQ2 keeps the name (its names are derived from each other); the earlier record's entry moves
                rename(po, do, name, path)
                owner[name] = (path, d)
            else:
                rename(path, d, name, po)


def _merge_rq1(parts: list[dict], algos: tuple) -> dict:
    from .questions import rq1_comparisons, rq1_row

    per: dict = {}
    for f in parts:
        for r in f["rows"]:
            per.setdefault(r["algo"], []).extend(r["seeds"])
    order = [a for a in algos if a in per] + [a for a in per if a not in algos]
    try:
        rows = [rq1_row(a, per[a]) for a in order]
    except TypeError:
        raise InputError("rq1: a record's per-seed rows do not have this version's fields (written by another version).") from None
    out = dict(parts[0])
    out.update(rows=[dataclasses.asdict(r) for r in rows], comparisons=rq1_comparisons(rows),
               failed=[x for f in parts for x in f.get("failed") or []])
    return out


def _merge_rq5(parts: list[tuple[str, dict]]) -> dict:
    from .questions import distribution_comparisons
    from .results import DistributionRow
    from .stats import mean_sd

    abl = next((f for _, f in parts if f.get("kl") is not None), None)
    out = dict(abl) if abl is not None else {k: v for k, v in parts[0][1].items() if k in ("distribution", "distribution_comparisons")}
    by: dict = {}  # name -> [(path, row)] from every record
    for path, f in parts:
        for r in f.get("distribution") or []:
            p0, r0 = by.setdefault(r["name"], [(path, r)])[0]
            if r0["examples"] != r["examples"]:
                raise InputError(f"{path}: RQ5's {r['name']} trained on {r['examples']} examples, but {r0['examples']} "
                                 f"in {p0}: not seeds of one study.")
            if r is not r0:
                by[r["name"]].append((path, r))
    order = ("sft_in", "sft_off", "dpo", "dpo_off")
    rows = []
    for name in [n for n in order if n in by] + [n for n in by if n not in order]:
        # the first seed's figures come from the record of the lowest seed; every seed's after them
        seeds = sorted((x for _, r in by[name] for x in r["seeds"]), key=lambda x: x["seed"])
        base = min((r for _, r in by[name]), key=lambda r: min(x["seed"] for x in r["seeds"]))
        rows.append(DistributionRow.from_dict(dict(base, seeds=seeds, sparsity_mean_sd=mean_sd([x["sparsity"] for x in seeds])),
                                              f"rq5.distribution {name}"))
    out["distribution"] = [dataclasses.asdict(r) for r in rows]
    out["distribution_comparisons"] = distribution_comparisons(rows)
    return out


def merge_records(records: list[tuple[str, dict]]) -> StudyResults:
    """One study's results from ``[(path, results.json as a dict)]``: parts of one study (its questions, or seeds of
    them) that ran apart. Each question's seed figures are computed again over every seed by the study's own functions."""
    if len(records) < 2:
        raise InputError("study-merge: give at least two records to join.")
    for path, d in records:
        _check_one(path, d)
    # RQ2's records first (their seeds in order): the merged tables keep their names, which RQ2 derives from each other
    records = sorted(((p, copy.deepcopy(d)) for p, d in records),
                     key=lambda r: (r[1].get("rq2") is None, (_seeds_by_rq(r[1]).get("rq2") or _seeds_of(r[1]) or [0])[0]))
    (p0, d0), notes = records[0], []
    for path, d in records:
        _check_pair(p0, d0, path, d, notes)
    rq2_recs = [(p, d) for p, d in records if d.get("rq2") is not None]
    for path, d in rq2_recs[1:]:
        _check_rq2_pair(rq2_recs[0][0], rq2_recs[0][1], path, d)
    _check_seeds(records)
    notes += _version_notes(records)
    _unify_names(records, notes)
    out = copy.deepcopy(d0)
    for _, d in records[1:]:
        for part in ("runs", "diffs", "accuracy"):
            for name, v in d[part].items():
                out[part].setdefault(name, v)
        if out.get("preferences") is None and d.get("preferences") is not None:
            out["preferences"] = d["preferences"]
    present = [rq for rq in _RQS if any(d.get(rq) is not None for _, d in records)]
    if "rq1" in present:
        out["rq1"] = _merge_rq1([d["rq1"] for _, d in records if d.get("rq1") is not None], tuple(d0["meta"]["budget_settings"].get("rq1_algos") or ()))
    if "rq4" in present:
        out["rq4"] = next(d["rq4"] for _, d in records if d.get("rq4") is not None)
    if "rq5" in present:
        out["rq5"] = _merge_rq5([(p, d["rq5"]) for p, d in records if d.get("rq5") is not None])
    if "rq2" in present:
        o = out["rq2"]
        for _, d in rq2_recs[1:]:
            r = d["rq2"]
            o["rows"] += r["rows"]
            o["trajectories"] += r["trajectories"]
            if r.get("replay") and o.get("replay"):
                o["replay"]["runs"].update(r["replay"].get("runs") or {})
            if r.get("data") and o.get("data"):
                o["data"]["final"].update(r["data"].get("final") or {})
        algos = tuple(dict.fromkeys(t["algo"] for t in o["trajectories"]))
        o["trajectories"].sort(key=lambda t: (algos.index(t["algo"]), t["seed"]))  # stable: a seed's variants keep their order
        o["rows"].sort(key=lambda r: (algos.index(r["algo"]), r["seed"]))
    res = StudyResults.from_dict(out, "merged results")
    if "rq2" in present:
        algos = tuple(dict.fromkeys(t.algo for t in res.rq2.trajectories))
        points, verdicts, nulls = decide(res.accuracy, res.rq2.trajectories, algos, res.rq2.every)
        res.rq2.points, res.rq2.verdicts, res.rq2.nulls = points, verdicts, nulls
        res.rq2.across_seeds = across_seeds(res.rq2.rows, algos)
    base = d0["meta"].get("seed", 0)
    by_rq: dict = {}
    for _, d in records:
        for rq, ss in _seeds_by_rq(d).items():
            by_rq.setdefault(rq, set()).update(ss)
    seeds_all = sorted({s for ss in by_rq.values() for s in ss})
    meta = res.meta
    meta["seeds_run"] = [s - base for s in seeds_all]
    meta["seeds_by_rq"] = {rq: [s - base for s in sorted(by_rq[rq])] for rq in _RQS if rq in by_rq}
    meta["rqs"] = present
    meta["budget_settings"] = dict(meta["budget_settings"], seeds=len(seeds_all))
    meta["runs"] = sum(d["meta"]["runs"] for _, d in records)
    meta["elapsed_s"] = sum(d["meta"]["elapsed_s"] for _, d in records)
    meta["merged_from"] = [{"record": _where(p), "seeds": _seeds_of(d), "rqs": _seeds_by_rq(d), "runs": d["meta"]["runs"],
                            "elapsed_s": d["meta"]["elapsed_s"], "pairs_digest": (d.get("preferences") or {}).get("pairs_digest"),
                            "hardware": d["meta"].get("hardware")}
                           for p, d in records]
    digests_m = {d["meta"].get("model_digest") for _, d in records}
    meta["model_digest"] = digests_m.pop() if len(digests_m) == 1 else None
    meta["merge_notes"] = list(dict.fromkeys(notes))
    digests = {f["pairs_digest"] for f, (_, d) in zip(meta["merged_from"], records) if d.get("preferences") is not None}
    if res.preferences is not None:  # the merged pairs have a digest only where every record's pairs had it
        res.preferences["pairs_digest"] = digests.pop() if len(digests) == 1 else None
    return res
