"""Masked training with every TRL trainer: frozen entries stay bit-identical, the mask is what trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rlsubnet.io import InputError
from rlsubnet.masks import Subnetwork
from rlsubnet.training.masked import MaskedOptimizer
from rlsubnet.training.recipes import ALGOS, TrainConfig, run_training

from conftest import TRAIN, clean_error, run
from tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    path = write_tiny_checkpoint(d / "model", seed=0, dtype="float32", hidden=32, layers=2, heads=2, inter=64)
    sd = load_file(str(d / "model" / "model.safetensors"))
    rs = np.random.default_rng(0)
    mask = Subnetwork.from_bool({n: rs.random(tuple(t.shape)) < 0.3 for n, t in sd.items()})
    mask.save(d / "mask.safetensors")
    return path, str(d / "mask.safetensors"), sd, mask


_RUNS: dict[tuple, tuple[dict, Path]] = {}  # runs shared by the tests that need the same one (trained once)


def _key(algo, mask, steps, kw) -> tuple:
    return (algo, mask, steps, tuple(sorted(kw.items())))


def _run(tiny, algo, out, mask=None, steps=3, **kw):
    """The weights of one training run; a run with the same settings is trained once per module."""
    key = _key(algo, mask, steps, kw)
    if key not in _RUNS:
        cfg = TrainConfig(algo=algo, model=tiny[0], out=str(out), mask=mask, steps=steps, lr=5e-3, batch_size=4,
                          num_generations=4, max_new_tokens=6, n_train=16, weight_decay=0.1, max_grad_norm=0.5,
                          reward="digits", seed=1, **kw)
        run_training(cfg, progress=False)
        _RUNS[key] = (load_file(str(out / "model.safetensors")), Path(out))
    return _RUNS[key][0]


def _out(algo, mask=None, steps=3, **kw) -> Path:
    """Where the shared run was written."""
    return _RUNS[_key(algo, mask, steps, kw)][1]


@pytest.mark.parametrize("algo", ALGOS)
def test_masked_training_freezes_exactly(tiny, tmp_path, algo):
    _, mask_path, init, mask = tiny
    masked = _run(tiny, algo, tmp_path / "m", mask=mask_path)
    free = _run(tiny, algo, tmp_path / "f")
    moved_frozen_free = changed_train = n_train = 0
    for name, t0 in init.items():
        m = torch.from_numpy(mask.array(name))
        assert torch.equal(masked[name][~m], t0[~m]), f"{algo}: frozen entries of {name} moved"
        changed_train += int((masked[name][m] != t0[m]).sum())
        n_train += int(m.sum())
        moved_frozen_free += int((free[name][~m] != t0[~m]).sum())
    assert changed_train > 0.5 * n_train, f"{algo}: only {changed_train} of {n_train} trainable entries changed"
    assert moved_frozen_free > 0, f"{algo}: the unmasked run did not move frozen-to-be entries (test could not fail)"


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_full_mask_equals_no_mask(tiny, tmp_path, algo):
    _, _, init, _ = tiny
    full = Subnetwork.full({n: tuple(t.shape) for n, t in init.items()})
    full.save(tmp_path / "full.safetensors")
    a = _run(tiny, algo, tmp_path / "a", mask=str(tmp_path / "full.safetensors"))
    b = _run(tiny, algo, tmp_path / "b")
    for n in a:
        assert torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)), n


def test_bf16_params_and_changing_masks():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16).to(torch.bfloat16)
    masks = [{p: torch.rand(p.shape) < 0.5 for p in lin.parameters()} for _ in range(2)]
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.1)
    for ms in masks:  # train with one mask, then keep the optimizer state under another
        mo = MaskedOptimizer(opt, ms)
        before = {n: p.detach().clone() for n, p in lin.named_parameters()}
        for _ in range(3):
            for _ in range(2):  # gradient accumulation
                lin(torch.randn(4, 16, dtype=torch.bfloat16)).pow(2).sum().backward()
            torch.nn.utils.clip_grad_norm_(lin.parameters(), 0.1)
            mo.step()
            mo.zero_grad()
        for (n, p), m in zip(lin.named_parameters(), ms.values()):
            assert torch.equal(p[~m], before[n][~m])
            assert (p[m] != before[n][m]).float().mean() > 0.5
        mo.remove_hooks()
        opt = mo.optimizer


def test_train_cli_and_verify_frozen(tiny, tmp_path):
    path, mask_path, init, mask = tiny
    cli = [sys.executable, "-m", "rlsubnet.cli"]
    out = tmp_path / "run"
    r = subprocess.run([*cli, "train", "--algo", "grpo", "--model", path, "--task", "add", "--out", out, "--mask", mask_path,
                        "--steps", "2", "--lr", "1e-2", "--weight-decay", "0.1", "--save-every", "1", "--reward", "digits",
                        "--batch-size", "4", "--num-generations", "4", "--max-new-tokens", "6"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] and (out / "step-1" / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    v = subprocess.run([*cli, "verify-frozen", path, out, mask_path], capture_output=True, text=True)
    assert v.returncode == 0 and "0 of" in v.stdout
    # a deliberately broken run: move frozen entries by hand
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(out, broken)
    sd = load_file(str(broken / "model.safetensors"))
    name = next(iter(sd))
    m = torch.from_numpy(mask.array(name))
    idx = torch.nonzero(~m.reshape(-1))[:7, 0]
    sd[name].view(-1)[idx] += 1.0

    save_file(sd, str(broken / "model.safetensors"))
    v = subprocess.run([*cli, "verify-frozen", path, broken, mask_path, "--json", tmp_path / "v.json"], capture_output=True, text=True)
    assert v.returncode == 1
    assert json.loads((tmp_path / "v.json").read_text())["frozen_moved"] == 7
    bad = subprocess.run([*cli, "train", "--algo", "nope", "--model", path, "--out", tmp_path / "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--algo" in bad.stderr


def test_sparsity_tracker(tiny, tmp_path):
    path, _, _, _ = tiny
    cfg = TrainConfig(algo="sft", model=path, out=str(tmp_path / "t"), steps=4, lr=1e-2, batch_size=4, n_train=16, track_every=2,
                      save_every=2)
    res = run_training(cfg)
    assert [r["step"] for r in res.tracking] == [2, 4]
    # the bytes a delta sync would send between records are those of the patch between the saved checkpoints
    from rlsubnet.deltas import create

    st = create(tmp_path / "t" / "step-2", tmp_path / "t" / "step-4", tmp_path / "p")
    assert res.tracking[1]["delta_stream_bytes"] == st.positions + st.values
    assert res.tracking[1]["delta_plain_bytes"] == st.plain and res.tracking[1]["delta_entries"] == st.changed
    assert res.tracking[0]["changed_vs_init"] == res.tracking[0]["changed_vs_prev"]
    assert res.tracking[1]["ever_changed"] >= res.tracking[1]["changed_vs_init"]


@pytest.mark.parametrize("algo", ALGOS)
def test_sparse_state_bit_identical_to_dense_masked(tiny, tmp_path, algo):
    """Issue 11: optimizer state for the masked entries only gives the same checkpoint bit for bit (AdamW with
    weight decay, clipping, a scheduler; every trainer), with state proportional to the mask."""
    _, mask_path, init, mask = tiny
    dense = _run(tiny, algo, tmp_path / "d", mask=mask_path)
    sparse = _run(tiny, algo, tmp_path / "s", mask=mask_path, sparse_state=True)
    for name in init:
        assert torch.equal(dense[name].view(torch.int32), sparse[name].view(torch.int32)), f"{algo}: {name} differs"
    ld = json.loads((_out(algo, mask_path) / "train_log.json").read_text())["optimizer_state_bytes"]
    ls = json.loads((_out(algo, mask_path, sparse_state=True) / "train_log.json").read_text())["optimizer_state_bytes"]
    if algo != "ppo":  # PPO's value model trains fully in both
        assert ls < 0.5 * ld, (ls, ld)


def test_sparse_state_resume_and_sgd():
    """state_dict()/load_state_dict() round-trip continues bit-identically; SGD momentum and Adam (L2) too;
    grad accumulation over two backwards."""
    from rlsubnet.training.masked import MaskedOptimizer
    from rlsubnet.training.sparse import SparseMaskedOptimizer, sparse_from

    def make(kind, sparse, seed=0):
        torch.manual_seed(seed)
        lin = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 3))
        g = torch.Generator().manual_seed(5)
        masks = {p: torch.rand(p.shape, generator=g) < 0.3 for p in lin.parameters()}
        ps = list(lin.parameters())
        inner = {"adamw": lambda: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
                 "adam": lambda: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.05),
                 "sgd": lambda: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01)}[kind]()
        return lin, masks, (sparse_from(inner, masks) if sparse else MaskedOptimizer(inner, masks))

    def steps(lin, opt, n, start=0):
        for i in range(start, start + n):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(i))
            for half in (x[:4], x[4:]):  # accumulate two backwards
                lin(half).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(lin.parameters(), 0.5)
            opt.step()
            opt.zero_grad()

    for kind in ("adamw", "adam", "sgd"):
        ld, _, od = make(kind, False)
        ls, masks, os_ = make(kind, True)
        steps(ld, od, 4)
        steps(ls, os_, 2)
        saved = os_.state_dict()
        ls2, _, os2 = make(kind, True)
        ls2.load_state_dict(ls.state_dict())
        os2.load_state_dict(saved)
        steps(ls2, os2, 2, start=2)
        for a, b, p0 in zip(ld.parameters(), ls2.parameters(), make(kind, False)[0].parameters()):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), kind
            m = masks[next(q for q in masks if q.shape == a.shape)]  # same seed, same shapes → same masks
            assert torch.equal(b[~m], p0[~m]), f"{kind}: frozen entries moved"
        assert isinstance(os2, SparseMaskedOptimizer)


def test_bf16_params_with_fp32_master_in_mask_only():
    """Issue 11, part 2: bf16 parameters, an fp32 master copy and moments for the masked entries only; the same
    bits as a dense reference that keeps fp32 master weights for every entry and masks the gradient, and
    untouched bits outside the mask."""
    from rlsubnet.training.sparse import sparse_from

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(torch.bfloat16)

    g = torch.Generator().manual_seed(3)
    ref, sp = model(), model()
    init = [p.detach().clone() for p in ref.parameters()]
    masks_r = {p: torch.rand(p.shape, generator=g) < 0.25 for p in ref.parameters()}
    masks_s = {q: masks_r[p] for p, q in zip(ref.parameters(), sp.parameters())}
    master = [torch.nn.Parameter(p.detach().float().clone()) for p in ref.parameters()]
    ref_opt = MaskedOptimizer(torch.optim.AdamW(master, lr=3e-3, weight_decay=0.1),
                              {m: masks_r[p] for m, p in zip(master, ref.parameters())})
    sp_opt = sparse_from(torch.optim.AdamW(list(sp.parameters()), lr=3e-3, weight_decay=0.1), masks_s, master_dtype=torch.float32)
    for step in range(6):
        x = torch.randn(8, 24, generator=torch.Generator().manual_seed(step)).bfloat16()
        ref(x).float().pow(2).mean().backward()
        sp(x).float().pow(2).mean().backward()
        for m, p in zip(master, ref.parameters()):
            m.grad = p.grad.float() * masks_r[p]
            p.grad = None
        ref_opt.step()
        ref_opt.zero_grad()
        with torch.no_grad():
            for m, p in zip(master, ref.parameters()):
                p.copy_(m.to(torch.bfloat16))
        sp_opt.step()
        sp_opt.zero_grad()
    moved = 0
    for p, q, p0 in zip(ref.parameters(), sp.parameters(), init):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
        m = masks_r[p]
        assert torch.equal(q[~m].view(torch.int16), p0[~m].view(torch.int16))
        moved += int((q[m] != p0[m]).sum())
    k = sum(int(m.sum()) for m in masks_s.values())
    assert moved > 0.5 * k
    steps = 4 * len(sp_opt.state)  # one float32 step counter per parameter
    assert sp_opt.state_bytes() == 16 * k + steps  # fp32 master + two fp32 moments + int32 positions


def test_train_cli_master_in_mask(tiny, tmp_path):
    """`train --precision bf16 --mask M --sparse-state --master-in-mask` trains only the mask, in bf16, with fp32
    masters for the masked entries: state = 16 bytes per masked entry (+ step counters)."""
    path, mask_path, init, mask = tiny
    cfg = TrainConfig(algo="sft", model=path, out=str(tmp_path / "o"), mask=mask_path, sparse_state=True, master_in_mask=True,
                      precision="bf16", steps=3, lr=1e-2, batch_size=4, n_train=16)
    res = run_training(cfg, progress=False)
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    k = mask.count()
    assert 16 * k <= res.optimizer_state_bytes <= 16 * k + 4 * len(init)
    for name, t0 in init.items():  # the fp32 checkpoint was loaded in bf16: frozen entries are its bf16 values
        m = torch.from_numpy(mask.array(name))
        assert torch.equal(out[name][~m], t0.bfloat16().float()[~m])
    with pytest.raises(Exception, match="master_in_mask"):
        run_training(TrainConfig(algo="sft", model=path, out=str(tmp_path / "p"), master_in_mask=True), progress=False)


@pytest.mark.parametrize("opts,needle", [
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--beta", "nan"], "--beta"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-2"], "--batch-size"),
    (["--level", "0"], "--level"), (["--level", "-1"], "--level"), (["--level", "1000"], "--level"),
    (["--algo", "grpo", "--num-generations", "0"], "--num-generations"),
    (["--algo", "grpo", "--num-generations", "1"], "--num-generations"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--algo", "grpo", "--batch-size", "6", "--num-generations", "4"], "not a multiple"),
])
def test_train_options_validated(tiny_model, tmp_path, opts, needle):
    """Defect: unvalidated train options gave tracebacks, or an all-NaN checkpoint with exit 0."""
    from rlsubnet.training.recipes import TrainConfig, run_training

    kw = {"algo": "sft", "model": str(tiny_model), "out": str(tmp_path / "o")}
    names = {"--lr": "lr", "--weight-decay": "weight_decay", "--beta": "beta", "--batch-size": "batch_size",
             "--level": "level", "--num-generations": "num_generations", "--max-new-tokens": "max_new_tokens", "--algo": "algo"}
    for k, v in zip(opts[::2], opts[1::2]):
        kw[names[k]] = v if k == "--algo" else (float(v) if k in ("--lr", "--weight-decay", "--beta") else int(v))
    with pytest.raises(InputError, match=names.get(needle, needle)):  # the Python API names the argument
        run_training(TrainConfig(**kw), progress=False)
    assert not (tmp_path / "o").exists()
    r = run(*TRAIN, *opts, "--model", tiny_model, "--out", tmp_path / "o")  # a repeated option: the last one counts
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr  # the command line names its flag


def test_train_cli_bad_models_one_sentence(tmp_path, tiny_model):
    """Defects: a config.json that is not JSON or lacks model_type, and a malicious .bin given to
    `train --model` (safely refused, but with a traceback)."""
    import shutil

    bad = tmp_path / "notjson"
    shutil.copytree(tiny_model, bad)
    (bad / "config.json").write_text("{nope")
    clean_error(run(*TRAIN, "--model", bad, "--out", tmp_path / "o"), "not valid JSON")
    nomt = tmp_path / "nomt"
    shutil.copytree(tiny_model, nomt)
    cfg = json.loads((nomt / "config.json").read_text())
    cfg.pop("model_type")
    (nomt / "config.json").write_text(json.dumps(cfg))
    clean_error(run(*TRAIN, "--model", nomt, "--out", tmp_path / "o"), "model_type")
    evil = tmp_path / "evil"
    shutil.copytree(tiny_model, evil)
    (evil / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"w": Evil()}, evil / "pytorch_model.bin")
    clean_error(run(*TRAIN, "--model", evil, "--out", tmp_path / "o"), "refused to unpickle")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_divergence_is_not_saved():
    """Defect: a run whose weights became NaN was written with exit 0; the guard finds the parameter."""
    from rlsubnet.training.recipes import _nonfinite_params

    m = torch.nn.Linear(3, 3)
    assert _nonfinite_params(m) is None
    with torch.no_grad():
        m.bias[1] = float("nan")
    assert _nonfinite_params(m) == "bias"


@pytest.mark.slow
def test_epoch_based_schedule_is_sized_by_the_trainer(tmp_path, tiny_model):
    """Defect: `build_masked_optimizer(..., num_training_steps=args.max_steps)` with an epoch-based config
    (max_steps = -1) built a schedule whose learning rate was 0 at every step: nothing changed."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from rlsubnet.training.masked import build_masked_optimizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    mask = Subnetwork.from_bool({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()})
    args = TrainingArguments(output_dir=str(tmp_path / "t"), num_train_epochs=1, per_device_train_batch_size=2,
                             learning_rate=1e-2, lr_scheduler_type="linear", report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    assert args.max_steps == -1
    with pytest.raises(ValueError, match="positive number of steps"):
        build_masked_optimizer(model, args, mask, num_training_steps=args.max_steps)
    opt, sched = build_masked_optimizer(model, args, mask)
    assert sched is None
    ids = torch.randint(3, 100, (8, 12))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched)).train()
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    assert moved > 0.5 * sum(p.numel() for p in before.values()), names[:2]


def test_masked_optimizer_hooks_work():
    """Defect: MaskedOptimizer did not initialise its base class, so register_step_pre_hook failed."""
    from rlsubnet.training.masked import MaskedOptimizer

    p = torch.nn.Parameter(torch.ones(4))
    opt = MaskedOptimizer(torch.optim.AdamW([p], lr=0.1, weight_decay=0.0), {p: torch.tensor([True, False, True, False])})
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    (p * torch.arange(4.0)).sum().backward()
    opt.step()
    assert seen == ["pre", "post"]
    assert p[1] == 1 and p[3] == 1 and p[2] != 1
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state
