"""Masked training on one process, under DDP or under FSDP2 (``fully_shard``), with torch's own loop.

Run as ``python dist_train_worker.py single ...`` or under ``torchrun --nproc_per_node 2`` with ``ddp`` or
``fsdp``. Every mode sees the same global batches (``torchrun`` ranks take equal halves, so the mean of
their mean losses is the global mean loss); rank 0 writes the trained weights (full tensors) to ``out``.
``emulate`` is one process doing what two ranks do: each half's gradient accumulated on its own, then
halved and summed (the order of DDP's all-reduce), to show that the 2-process run differs from ``single``
only by that order of reduction.
"""
import os
import sys

import torch
import torch.distributed as dist

mode, state, model_path, mask_path, out = sys.argv[1:6]
dist_mode = mode in ("ddp", "fsdp")
if dist_mode:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if dist_mode else (0, 1)
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, TrainingArguments, get_scheduler

from rlsubnet.training.masked import build_masked_optimizer

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
if mode == "fsdp":
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
args = TrainingArguments(output_dir=out + ".t", learning_rate=3e-3, weight_decay=0.1, optim="adamw_torch", report_to=[], use_cpu=True)
opt, _ = build_masked_optimizer(model, args, mask_path, sparse_state=(state == "sparse"))  # after sharding
sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=4)
net = torch.nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model

g = torch.Generator().manual_seed(1)
STEPS, ACCUM, BATCH, LEN = 4, 2, 8, 24
for _step in range(STEPS):
    batches = [torch.randint(3, 100, (BATCH, LEN), generator=g) for _ in range(ACCUM)]
    if mode == "emulate":  # DDP: each rank accumulates its micro-batches, then (g0 / 2) + (g1 / 2) once
        parts = []
        for r in range(2):
            opt.zero_grad(set_to_none=True)
            for ids in batches:
                part = ids.chunk(2)[r]
                (net(input_ids=part, labels=part).loss / ACCUM).backward()
            parts.append({p: p.grad.clone() for p in model.parameters() if p.grad is not None})
        for p in parts[0]:
            p.grad = parts[0][p].div(2) + parts[1][p].div(2)
    if mode == "emulate_fsdp":  # FSDP2: every micro-batch is reduce-scattered, (g0 / 2) + (g1 / 2), then accumulated
        acc = {}
        for ids in batches:
            parts = []
            for r in range(2):
                opt.zero_grad(set_to_none=True)
                part = ids.chunk(2)[r]
                (net(input_ids=part, labels=part).loss / ACCUM).backward()
                parts.append({p: p.grad.clone() for p in model.parameters() if p.grad is not None})
            for p in parts[0]:
                red = parts[0][p].div(2) + parts[1][p].div(2)
                acc[p] = red if p not in acc else acc[p] + red
        for p, v in acc.items():
            p.grad = v
    for micro, ids in enumerate(batches if not mode.startswith("emulate") else []):
        part = ids.chunk(world)[rank]
        ctx = net.no_sync() if mode == "ddp" and micro < ACCUM - 1 else torch.enable_grad()
        with ctx:
            loss = net(input_ids=part, labels=part).loss / ACCUM
            loss.backward()
    if os.environ.get("CLIP", "1") == "1":
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)

full = {}
for name, p in model.state_dict().items():
    t = p.full_tensor() if hasattr(p, "full_tensor") else p
    full[name] = t.detach().contiguous().clone()
if rank == 0:
    save_file(full, out)
if dist_mode:
    dist.barrier()
    dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # skip C++ static teardown: gloo's threads can abort the process at interpreter exit ("terminate called"), as dist_sync_worker does
