"""The Python API as a TRL or transformers user calls it (issue 18): transformers' defaults work, and errors
name Python arguments, not command-line flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlsubnet.io import InputError
from rlsubnet.masks import Subnetwork


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))


def _steps(model, opt, sched, n=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(4, 8, generator=g)
        model(x).square().sum().backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def test_sparse_state_with_transformers_default_optim(tmp_path):
    """Defect: TrainingArguments' default optim='adamw_torch_fused' made build_masked_optimizer(sparse_state=True)
    raise an error naming a CLI flag the Python user never passed."""
    from transformers import TrainingArguments

    from rlsubnet.training.masked import build_masked_optimizer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=3, weight_decay=0.1)
    assert args.optim.value == "adamw_torch_fused"
    rs = np.random.default_rng(0)
    mask = Subnetwork.from_bool({n: rs.random(tuple(p.shape)) < 0.4 for n, p in _model().named_parameters()})
    sparse = _model()
    with pytest.warns(UserWarning, match="single-tensor"):
        opt, sched = build_masked_optimizer(sparse, args, mask, sparse_state=True)
    _steps(sparse, opt, sched)
    dense = _model()
    args_t = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=3, weight_decay=0.1, optim="adamw_torch")
    opt, sched = build_masked_optimizer(dense, args_t, mask)
    _steps(dense, opt, sched)
    for (n, p), q in zip(sparse.named_parameters(), dense.parameters()):
        assert torch.equal(p.view(torch.int32), q.view(torch.int32)), n


def test_python_errors_name_arguments(tmp_path):
    from transformers import TrainingArguments

    from rlsubnet.training.config import TrainConfig, validate_config
    from rlsubnet.training.masked import build_masked_optimizer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=3)
    with pytest.raises(InputError) as e:
        build_masked_optimizer(_model(), args, None, sparse_state=True)
    assert "sparse_state=True" in e.value.message and "--" not in e.value.message
    with pytest.raises(InputError) as e:
        validate_config(TrainConfig(algo="sft", model="m", lr=-1.0))
    assert e.value.message.startswith("lr: ") and "--" not in e.value.message
    with pytest.raises(InputError, match="max_grad_norm"):  # no clipping is spelled None, not 0
        validate_config(TrainConfig(algo="sft", model="m", max_grad_norm=0.0))


def test_study_results_round_trip_through_json(tmp_path):
    """results.json is the dataclass in both directions; a missing field is named, not a KeyError in the report."""
    import json

    from rlsubnet.study.results import RQ4, OverlapRow, StudyResults

    row = OverlapRow("seed", "seed", "grpo", "grpo_s1", 0.5, 0.4, 0.1, 0.1, 0.3, 0.05, 5.0, 12.0, 0.9, 0.9,
                     {"o1_random": 0.2, "ratio": 2.5, "z": 7.0})
    res = StudyResults(meta={"model": "m"}, paper={}, runs={}, diffs={}, accuracy={}, rq4=RQ4([row]))
    (tmp_path / "results.json").write_text(json.dumps(res.to_dict()))
    back = StudyResults.from_json(tmp_path / "results.json")
    assert back == res and isinstance(back.rq4.rows[0], OverlapRow)
    d = res.to_dict()
    del d["rq4"]["rows"][0]["ratio"]
    with pytest.raises(InputError, match=r"rq4\.rows\[0\]\.ratio: missing"):
        StudyResults.from_dict(d)
