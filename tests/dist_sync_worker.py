"""Two processes over gloo: rank 0 trains with a TRL trainer and publishes; rank 1 receives and checks."""
import json
import os
import sys

import torch
import torch.distributed as dist

rank, port, model_path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
from transformers import AutoModelForCausalLM

from rlsubnet.deltas import DistributedSink, receive_distributed
from rlsubnet.io.bits import torch_raw
from rlsubnet.training.sync import DeltaSyncCallback

if rank == 0:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_path)
    data = Dataset.from_dict({"prompt": [f"Q: {i}+1\nA:" for i in range(16)], "completion": [f" {i + 1}" for i in range(16)]})
    args = SFTConfig(output_dir=out + "/t", max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                     use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False, logging_steps=1)
    sink = DistributedSink(src=0)

    class SendView(TrainerCallback):  # after each sync, send the published view's digest for the receiver to compare
        def on_step_end(self, args, state, control, model=None, **kw):
            import hashlib
            h = hashlib.sha256()
            for _, p in model.named_parameters():
                h.update(torch_raw(p.detach().to(torch.bfloat16)).tobytes())
            obj = [h.hexdigest()]
            dist.broadcast_object_list(obj, src=0)

    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=[DeltaSyncCallback(sink, every=1), SendView()])
    trainer.train()
    sink.close()
else:
    import hashlib
    receiver = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    seen = []

    def check(step, target):
        obj = [None]
        dist.broadcast_object_list(obj, src=0)
        h = hashlib.sha256()
        for _, p in target.named_parameters():
            h.update(torch_raw(p.detach()).tobytes())
        seen.append({"step": step, "equal": h.hexdigest() == obj[0]})

    receive_distributed(receiver, src=0, on_step=check)
    with open(out + "/received.json", "w") as f:
        json.dump(seen, f)
dist.barrier()  # both ranks are done before the group goes away
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # skip C++ static teardown: gloo's threads can abort the process at interpreter exit ("terminate called")
