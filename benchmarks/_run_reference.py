"""The reference approach (check_sparsity.py of arXiv 2505.11711): load both models whole with
transformers in bf16, take every delta in bf16, concatenate, and count isclose(delta, 0, atol=tol)."""
import json
import sys
import time


def _hwm_mb() -> float:
    """Peak RSS of this process (VmHWM): ru_maxrss would carry the parent's peak across exec on Linux."""
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 1024


t0 = time.perf_counter()
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sft = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cpu")
rl = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16, device_map="cpu")
rl_sd = rl.state_dict()
deltas = []
for name, p in sft.named_parameters():
    deltas.append((rl_sd[name] - p.data).reshape(-1))
delta = torch.cat(deltas)
n = delta.numel()
counts = [int(n - torch.isclose(delta, torch.zeros_like(delta), rtol=0, atol=t).sum().item())
          for t in [0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4]]
changed = int((delta != 0).sum().item())
el = time.perf_counter() - t0
print(json.dumps({"seconds": el, "peak_rss_mb": _hwm_mb(),
                  "numel": n, "changed": changed, "atol": counts}))
