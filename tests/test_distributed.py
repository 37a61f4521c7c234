"""Masked training on two processes (gloo): DDP and FSDP2 against one process, bit for bit where they must be."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlsubnet.masks.subnetwork import Subnetwork

from tiny import write_tiny_checkpoint

WORKER = Path(__file__).with_name("dist_train_worker.py")


def _run(mode, state, model, mask, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if mode in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        cmd = [sys.executable]
    r = subprocess.run([*cmd, str(WORKER), mode, state, model, mask, out], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    model = write_tiny_checkpoint(d / "m", dtype="float32", layers=2)
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(model).state_dict()
    rng = np.random.default_rng(0)
    sub = Subnetwork.from_bool({n: rng.random(tuple(t.shape)) < 0.1 for n, t in init.items()})
    sub.save(d / "mask.safetensors")
    out = {"init": init, "sub": sub}
    for mode, state in [("single", "dense"), ("emulate", "dense"), ("emulate_fsdp", "dense"), ("ddp", "dense"),
                        ("ddp", "sparse"), ("fsdp", "dense"), ("fsdp", "sparse")]:
        out[mode, state] = _run(mode, state, model, str(d / "mask.safetensors"), str(d / f"{mode}-{state}.safetensors"))
    return out


def _frozen_moved(run, init, sub):
    return sum(int(((run[n] != init[n]) & ~sub.bool_tensor(n)).sum()) for n in sub.names)


def test_two_processes_never_move_a_frozen_entry(runs):
    init, sub = runs["init"], runs["sub"]
    for key in [("single", "dense"), ("ddp", "dense"), ("ddp", "sparse"), ("fsdp", "dense"), ("fsdp", "sparse")]:
        assert _frozen_moved(runs[key], init, sub) == 0, key
    inside = sum(int(((runs["ddp", "dense"][n] != init[n]) & sub.bool_tensor(n)).sum()) for n in sub.names)
    assert inside > 0.9 * sub.count()  # it trained


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def test_sparse_state_is_bit_identical_to_dense_under_ddp_and_fsdp2(runs):
    assert _same(runs["ddp", "sparse"], runs["ddp", "dense"])
    assert _same(runs["fsdp", "sparse"], runs["fsdp", "dense"])


def test_two_processes_differ_from_one_only_by_reduction_order(runs):
    # one process doing the two ranks' halves and reducing them in DDP's (FSDP2's) order gives the same bits
    assert _same(runs["ddp", "dense"], runs["emulate", "dense"])
    assert _same(runs["fsdp", "dense"], runs["emulate_fsdp", "dense"])
    # and against one process with the whole batch, the difference is rounding: tiny next to the update
    init, sub, one, two = runs["init"], runs["sub"], runs["single", "dense"], runs["ddp", "dense"]
    for n in sub.names:
        m = sub.bool_tensor(n)
        upd = (one[n] - init[n]).abs()[m].max()
        assert float((two[n] - one[n]).abs()[m].max()) <= 1e-4 * float(upd), n


def _train(tmp, name, model, mask, batch, procs=1, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m"] if procs > 1 else [sys.executable, "-m"]
    r = subprocess.run([*launch, "rlsubnet.cli", "train", "--algo", "dpo", "--model", model, "--mask", mask, "--out", str(tmp / name),
                        "--steps", "3", "--batch-size", str(batch), "--lr", "1e-3", "--weight-decay", "0.1", *extra],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
    return r


def test_rlsubnet_train_under_torchrun_is_ddp_and_writes_once(tmp_path):
    import json

    model = write_tiny_checkpoint(tmp_path / "m", dtype="float32", layers=2)
    init = load_file(f"{model}/model.safetensors")
    rng = np.random.default_rng(1)
    sub = Subnetwork.from_bool({n: rng.random(tuple(t.shape)) < 0.1 for n, t in init.items()})
    mask = str(tmp_path / "mask.safetensors")
    sub.save(mask)
    one = _train(tmp_path, "one", model, mask, 8)
    two = _train(tmp_path, "two", model, mask, 4, procs=2)
    two_sparse = _train(tmp_path, "two-sparse", model, mask, 4, procs=2, extra=["--sparse-state"])
    for r in (one, two, two_sparse):
        assert r.returncode == 0, r.stderr[-3000:]
    assert two.stdout.count("wrote") == 1  # one process reports, one process writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "mask.safetensors", "one", "two", "two-sparse"]  # no leftovers
    assert json.loads((tmp_path / "two" / "train_log.json").read_text())["config"]["world_size"] == 2
    w1, w2, w2s = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two", "two-sparse"))
    assert all(torch.equal(w2[n], w2s[n]) for n in w2)  # sparse state = dense state, under DDP too
    same = inside = 0
    for n in sub.names:
        m = sub.bool_tensor(n)
        assert torch.equal(w2[n][~m], init[n][~m]), n  # frozen entries: the same bits
        upd = (w1[n] - init[n]).abs()[m].max()
        # global batch 8 = 2 x 4: the same data; per-half padding and the average of two means round differently
        assert float((w2[n] - w1[n]).abs()[m].max()) <= 0.02 * float(upd), n
        same += int((w2[n] == w1[n])[m].sum())
        inside += int(m.sum())
    assert same > 0.2 * inside


def test_fsdp_needs_processes_and_an_accelerator(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "m", dtype="float32", layers=1)
    r = subprocess.run([sys.executable, "-m", "rlsubnet.cli", "train", "--algo", "dpo", "--model", model, "--out", str(tmp_path / "o"),
                        "--fsdp", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "torchrun" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_live_publishing_from_a_sharded_trainer(tmp_path, mode):
    """Issue 18: DeltaPublisher under DDP (rank 0 publishes, once) and FSDP2 (each rank diffs its own shard, rank 0
    assembles one payload per step); a receiver applying the payloads to the initial stored view holds the final
    one bit for bit."""
    from safetensors.torch import load_file

    from rlsubnet.deltas import apply_delta

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + (mode == "fsdp")),
                        str(Path(__file__).parent / "dist_publish_worker.py"), mode, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    target = load_file(str(tmp_path / "initial.safetensors"))
    for k in range(3):
        assert apply_delta(target, (tmp_path / f"step-{k}.rlspatch").read_bytes()) > 0
    final = load_file(str(tmp_path / "final.safetensors"))
    assert all(torch.equal(target[n].view(torch.int16), final[n].view(torch.int16)) for n in final)
