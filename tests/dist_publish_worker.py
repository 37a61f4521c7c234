"""Live delta publishing from a sharded trainer: run under ``torchrun --nproc_per_node 2`` with ``ddp`` or ``fsdp``.

Every rank builds the model, shards it (FSDP2 ``fully_shard``) or wraps it (DDP), constructs the publisher
(collective under FSDP2), trains 3 steps of AdamW and calls ``delta()`` after each. Rank 0 writes each payload
to ``OUT/step-K.rlspatch``, the initial stored view to ``OUT/initial.safetensors`` and the final one (full tensors,
bf16) to ``OUT/final.safetensors``; other ranks check that they got ``None``.
"""
import os
import sys

import torch
import torch.distributed as dist

mode, out = sys.argv[1:3]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
from safetensors.torch import save_file

from rlsubnet.deltas import DeltaPublisher

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def full_bf16():
    sd = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        sd[n] = t.detach().to(torch.bfloat16).contiguous()
    return sd


if mode == "fsdp":
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    net = model
else:
    net = torch.nn.parallel.DistributedDataParallel(model)
initial = full_bf16()
pub = DeltaPublisher(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
g = torch.Generator().manual_seed(rank)
for step in range(3):
    x = torch.randn(8, 16, generator=g)
    net(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    payload = pub.delta()
    if rank == 0:
        assert payload is not None
        with open(os.path.join(out, f"step-{step}.rlspatch"), "wb") as fh:
            fh.write(payload)
    else:
        assert payload is None, "only rank 0 publishes"
final = full_bf16()
if rank == 0:
    save_file(initial, os.path.join(out, "initial.safetensors"))
    save_file(final, os.path.join(out, "final.safetensors"))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # skip C++ static teardown: gloo's threads can abort the process at interpreter exit ("terminate called"), as dist_sync_worker does
