"""The Ray engine (issue 19): a real cluster the test starts (`ray start --head`, 2 CPUs), reached by address;
every command's answer equals the local engine's to the last count and byte, and failures are one sentence."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import bump_ulps, run, save_folder

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = _free_port()
    tmp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([RAY, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                        "--temp-dir", str(tmp), "--disable-usage-stats"], capture_output=True, text=True, timeout=180, env=env)
    if r.returncode != 0:
        pytest.skip("ray start failed: " + r.stderr[-500:])
    yield f"127.0.0.1:{port}"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=env)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("raypair")
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(128, 96, generator=g).bfloat16() for i in range(4)}
    base["model.norm.weight"] = torch.ones(96, dtype=torch.bfloat16)
    tuned = {k: v.clone() for k, v in base.items()}
    for i, k in enumerate(list(tuned)[:4]):
        bump_ulps(tuned[k], torch.arange(0, 128 * 96, 3 + i), 1 + i)
    return save_folder(d / "a", base, shards=2), save_folder(d / "b", tuned, shards=2)


def _strip(d):
    return {k: v for k, v in d.items() if k not in ("elapsed_s", "base", "tuned")}


def test_ray_engine_equals_local(cluster, pair, tmp_path):
    a, b = pair
    local = run("diff", a, b, "--json", "-", "-q", "--lr-sum", "1e-4", "--mask-out", tmp_path / "l.safetensors")
    ray = run("diff", a, b, "--json", "-", "-q", "--lr-sum", "1e-4", "--mask-out", tmp_path / "r.safetensors",
              "--engine", "ray", "--ray-address", cluster, timeout=600)
    assert ray.returncode == 0, ray.stderr[-2000:]
    assert _strip(json.loads(ray.stdout)) == _strip(json.loads(local.stdout))
    from rlsubnet.masks import Subnetwork

    ml, mr = Subnetwork.load(tmp_path / "l.safetensors"), Subnetwork.load(tmp_path / "r.safetensors")
    assert ml.digest() == mr.digest() and ml.meta == mr.meta  # same bits, same metadata (safetensors orders it freely)
    r = run("verify-frozen", a, b, tmp_path / "r.safetensors", "--engine", "ray", "--ray-address", cluster, "--json", "-", "-q", timeout=600)
    assert r.returncode == 0 and json.loads(r.stdout)["frozen_moved"] == 0, r.stderr[-2000:]
    rc = run("closeness", a, a, b, "--engine", "ray", "--ray-address", cluster, "--json", "-", "-q", timeout=600)
    lc = run("closeness", a, a, b, "--json", "-", "-q")
    assert rc.returncode == 0 and _strip(json.loads(rc.stdout)) == _strip(json.loads(lc.stdout))
    # patch create: one Ray task per tensor, encoded and hashed where it runs; the same file byte for byte
    rp = run("patch", "create", a, b, "-o", tmp_path / "r.rlpatch", "-q", "--engine", "ray", "--ray-address", cluster, timeout=600)
    lp = run("patch", "create", a, b, "-o", tmp_path / "l.rlpatch", "-q")
    assert rp.returncode == 0 and lp.returncode == 0, rp.stderr[-2000:]
    assert (tmp_path / "r.rlpatch").read_bytes() == (tmp_path / "l.rlpatch").read_bytes()
    # a sharded mask: each Ray task writes its part where it runs; the folder holds the file mask's bits
    rs = run("mask", a, b, "-o", tmp_path / "rs", "--sharded", "-q", "--engine", "ray", "--ray-address", cluster, timeout=600)
    assert rs.returncode == 0, rs.stderr[-2000:]
    sharded = Subnetwork.load(tmp_path / "rs")
    assert sharded.digest() == ml.digest() and sharded.count() == ml.count() and (tmp_path / "rs" / "index.json").is_file()
    assert {k: sharded.meta[k] for k in ("criterion", "base_fingerprint", "tuned_fingerprint")} == \
        {k: ml.meta[k] for k in ("criterion", "base_fingerprint", "tuned_fingerprint")}
    ov = run("overlap", tmp_path / "rs", tmp_path / "l.safetensors", "--json", "-")
    assert ov.returncode == 0 and json.loads(ov.stdout)["pairs"][0]["jaccard"] == 1.0, ov.stderr[-2000:]
    # rank: one Ray task per matrix, read and decomposed where it runs; every matrix's figures equal the local ones
    rr = run("rank", a, b, "--engine", "ray", "--ray-address", cluster, "--json", "-", "-q", timeout=600)
    lr = run("rank", a, b, "--json", "-", "-q")
    assert rr.returncode == 0, rr.stderr[-2000:]
    got, want = json.loads(rr.stdout), json.loads(lr.stdout)
    assert got["matrices"] == want["matrices"] and len(got["matrices"]) == 4 and got["excluded"] == want["excluded"]
    assert (got["mean_rank_ratio"], got["by_kind"]) == (want["mean_rank_ratio"], want["by_kind"])
    rd = run("diff", a, b, "--rank", "--engine", "ray", "--ray-address", cluster, "--json", "-", "-q", timeout=600)
    assert rd.returncode == 0 and json.loads(rd.stdout)["rank"]["matrices"] == want["matrices"], rd.stderr[-2000:]


def test_ray_failures_are_one_sentence(cluster, pair, tmp_path):
    a, b = pair
    r = run("diff", a, b, "--engine", "ray", "--ray-address", "127.0.0.1:1", "-q", timeout=300)
    assert r.returncode == 2 and "--ray-address" in r.stderr and "Traceback" not in r.stderr
    # a shard truncated after the command checked it: the tensor is named, nothing half-written
    c = tmp_path / "c"
    shutil.copytree(b, c)
    shard = sorted(c.glob("model-*.safetensors"))[0]
    # in a process of its own: a driver connected to the cluster must not be this test process, which outlives it
    code = ("import sys\nfrom pathlib import Path\nfrom rlsubnet.analysis import diff\nfrom rlsubnet.io import InputError, open_checkpoint\n"
            f"shard = Path({str(shard)!r})\n"
            f"with open_checkpoint({str(a)!r}) as ca, open_checkpoint({str(c)!r}) as cc:\n"
            "    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])\n"
            "    try:\n"
            f"        diff(ca, cc, engine='ray', ray_address={cluster!r})\n"
            "    except InputError as e:\n"
            "        print('REFUSED', e.message)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "REFUSED" in r.stdout and "truncated" in r.stdout, r.stdout + r.stderr[-2000:]


def test_bad_engine_name(pair):
    r = run("diff", *pair, "--engine", "spark", "-q")
    assert r.returncode == 2 and "--engine" in r.stderr


def test_a_worker_deserializes_the_run_once_not_per_task(cluster, pair, monkeypatch):
    """Every Ray task used to deserialize the run's function and job list, both holding the checkpoints' indexes:
    O(model) per task, O(model²) per run (a 4.3 GB DeepSeek-layout pair took 59 s on one CPU against 6.9 s for
    1.1 GB). Each worker process now deserializes them once per run: over many small tasks, the function is
    rebuilt at most once per worker process, and the answer is the local engine's."""
    import ray

    import rlsubnet.analysis.engine as E
    from rlsubnet.io import open_checkpoint

    class Marker:  # a fresh token each time it is unpickled
        def __getstate__(self):
            return {"made": True}

        def __setstate__(self, state):
            self.token = os.urandom(8).hex()

    marker = Marker()
    marker.token = "driver"

    def fn(job, start, raws):
        return marker.token, os.getpid(), int(raws[0].sum(dtype="uint64"))

    monkeypatch.setattr(E, "UNIT_BYTES", 4096)  # many tasks for this small pair
    a, _ = pair
    try:
        with open_checkpoint(a) as ck:
            jobs = [E.Job(n, [(ck, n)], ck.tensors[n].numel) for n in sorted(ck.tensors)]
            units = len(E._units(jobs, 1024))
            got = {job.name: res for job, res in E.map_chunks(jobs, fn, chunk=1024, progress=False, engine="ray", ray_address=cluster)}
            want = {job.name: res for job, res in E.map_chunks(jobs, fn, chunk=1024, progress=False, workers=1)}
    finally:
        ray.shutdown()
    assert units >= 20
    assert {n: [r[2] for r in v] for n, v in got.items()} == {n: [r[2] for r in v] for n, v in want.items()}
    tokens = {r[0] for v in got.values() for r in v}
    pids = {r[1] for v in got.values() for r in v}
    assert len(tokens) <= len(pids) <= 4, (len(tokens), len(pids), units)
