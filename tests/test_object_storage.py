"""Checkpoints in object storage (issue 19): an S3-protocol server started here (moto), s3fs as the client,
read by byte ranges; every command's answer equals the local one to the last count."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from conftest import bump_ulps, run, save_folder

pytest.importorskip("moto")
pytest.importorskip("s3fs")
pytestmark = pytest.mark.slow  # starts an S3-protocol server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="ckpts")
    yield client
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _upload(client, folder: Path, prefix: str) -> str:
    for f in sorted(folder.iterdir()):
        client.upload_file(str(f), "ckpts", f"{prefix}/{f.name}")
    return f"s3://ckpts/{prefix}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("s3pair")
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(64, 48, generator=g).bfloat16() for i in range(3)}
    base["model.embed_tokens.weight"] = torch.randn(100, 48, generator=g).bfloat16()
    tuned = {k: v.clone() for k, v in base.items()}
    bump_ulps(tuned["model.layers.1.mlp.up_proj.weight"], torch.arange(0, 3000, 7), 1)
    a = save_folder(d / "a", base, config={"model_type": "llama"}, shards=2)
    b = save_folder(d / "b", tuned, config={"model_type": "llama"}, shards=2)
    (b / "tokenizer_config.json").write_text("{}")
    return a, b


def _strip(d: dict) -> dict:
    d = dict(d)
    for k in ("base", "tuned", "elapsed_s"):
        d.pop(k, None)
    return d


def test_diff_mask_and_patch_from_s3_equal_the_local_ones(s3, pair, tmp_path):
    a, b = pair
    ua, ub = _upload(s3, a, "run/base"), _upload(s3, b, "run/step-100")
    local = json.loads(run("diff", a, b, "--json", "-", "-q", "--lr-sum", "1e-4").stdout)
    r = run("diff", ua, ub, "--json", "-", "-q", "--lr-sum", "1e-4")
    assert r.returncode == 0, r.stderr
    assert _strip(json.loads(r.stdout)) == _strip(local)
    assert run("mask", ua, ub, "-o", tmp_path / "m.safetensors", "-q").returncode == 0
    assert run("mask", a, b, "-o", tmp_path / "l.safetensors", "-q").returncode == 0
    from rlsubnet.masks import Subnetwork

    assert Subnetwork.load(tmp_path / "m.safetensors").digest() == Subnetwork.load(tmp_path / "l.safetensors").digest()
    r = run("verify-frozen", ua, ub, tmp_path / "m.safetensors", "-q")
    assert r.returncode == 0, r.stderr
    r = run("patch", "create", ua, ub, "-o", tmp_path / "p", "-q")
    assert r.returncode == 0, r.stderr
    assert run("patch", "apply", a, tmp_path / "p", "-o", tmp_path / "out", "-q").returncode == 0
    for f in b.iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


def test_s3_errors_are_one_sentence(s3, pair, tmp_path):
    a, _ = pair
    r = run("diff", "s3://ckpts/nothing-here", a, "-q")
    assert r.returncode == 2 and "s3://ckpts/nothing-here" in r.stderr and "Traceback" not in r.stderr
    s3.put_object(Bucket="ckpts", Key="evil/model.safetensors.index.json", Body=json.dumps({"weight_map": {"w": "../run/base/model-00001-of-00002.safetensors"}}))
    r = run("diff", "s3://ckpts/evil", a, "-q")
    assert r.returncode == 2 and "outside the checkpoint prefix" in r.stderr
    s3.put_object(Bucket="ckpts", Key="bin/model.safetensors.index.json", Body=json.dumps({"weight_map": {"w": "pytorch_model.bin"}}))
    r = run("diff", "s3://ckpts/bin", a, "-q")
    assert r.returncode == 2 and "safetensors" in r.stderr


def test_reads_are_ranges_not_downloads(s3, pair):
    """A chunk is one range request of its bytes: reading one tensor fetches that tensor, not its shard."""
    from rlsubnet.io import open_checkpoint

    a, _ = pair
    ua = "s3://ckpts/run/base"
    with open_checkpoint(ua) as ck:
        fs = ck._remote.fs
        calls = []
        real = fs.cat_file

        def counting(path, start=None, end=None, **kw):
            calls.append((end or 0) - (start or 0))
            return real(path, start=start, end=end, **kw)

        fs.cat_file = counting
        name = "model.layers.0.mlp.up_proj.weight"
        ck.read(name)
        assert calls == [64 * 48 * 2]
