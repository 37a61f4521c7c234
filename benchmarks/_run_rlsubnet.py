"""One measured rlsubnet diff (run in its own process so its peak RSS is its own)."""
import json
import resource
import sys
import time


def _hwm_mb() -> float:
    """Peak RSS of this process (VmHWM): ru_maxrss would carry the parent's peak across exec on Linux."""
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 1024


t0 = time.perf_counter()
import rlsubnet  # noqa: E402

r = rlsubnet.diff(sys.argv[1], sys.argv[2], atol=[0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4])
el = time.perf_counter() - t0
workers = 2  # the default on this 2-core machine: the parent plus at most two forked workers at once
self_mb = _hwm_mb()
child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": el, "peak_rss_mb": self_mb + workers * child_mb, "parent_mb": self_mb, "worker_mb": child_mb,
                  "numel": r.numel, "changed": r.changed, "atol": [a["changed"] for a in r.atol]}))
