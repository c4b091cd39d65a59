"""Peak extra memory of one merge, measured as the process's peak RSS growth (Linux).

    python -m fastmerge.bench.memory [--shape 4096x4096] [--k 3] [--dtype float32]

Each case runs in a fresh subprocess: inputs are allocated and touched, the kernel's peak-RSS
counter is reset (``/proc/self/clear_refs`` = 5), the merge runs once, and ``VmHWM - VmRSS``
before the call is the extra memory it needed. The contract: at most one output tensor plus
small buffers (K*N/8 bytes of bit masks for DARE with norm rescale and DELLA).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, sys, torch, fastmerge
method, api, backend, rows, cols, K, dtype = sys.argv[1:8]
rows, cols, K, dtype = int(rows), int(cols), int(K), getattr(torch, dtype)
torch.manual_seed(0)
base = torch.randn(rows, cols).to(dtype)
models = [(base.float() + 0.01 * torch.randn(rows, cols)).to(dtype) for _ in range(K)]
tasks = [m - base for m in models] if api == "peft" else None
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def call():
    if api == "peft":
        import peft.utils.merge_utils as pm
        w = torch.ones(K)
        fn = getattr(pm, method) if backend == "peft" else getattr(fastmerge.peft, method)
        kw = {} if backend == "peft" else {"backend": backend}
        return fn(tasks, w, 0.2, **kw)
    if backend == "mergekit":
        from mergekit.merge_methods import merge_tensors
        return merge_tensors([base, *models], method, parameters=dict(weight=[1.0] * K, density=[0.2] * K), base_index=0)
    return fastmerge.merge(method, base, models, density=0.2, seed=0, backend=backend)
call()  # warm-up: libraries, thread pools, allocator caches
import gc; gc.collect()
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
out = call()
peak = status("VmHWM")
print(json.dumps({"extra_bytes": peak - before, "out_bytes": out.numel() * out.element_size()}))
"""


def measure(method, api, backend, shape, k, dtype):
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, method, api, backend, str(shape[0]), str(shape[1]), str(k), dtype],
        capture_output=True, text=True, check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--refs", action="store_true", help="also measure PEFT and mergekit")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    shape = tuple(int(s) for s in a.shape.split("x"))
    cases = [(m, "mergekit", "cpu") for m in ("task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs_ties")]
    cases += [(m, "peft", "cpu") for m in ("ties", "dare_ties")]
    if a.refs:
        cases += [("ties", "mergekit", "mergekit"), ("ties", "peft", "peft")]
    rows = []
    print(f"{'op':18} {'api':9} {'backend':9} {'extra MB':>9} {'output MB':>9} {'extra/output':>12}")
    for method, api, backend in cases:
        r = measure(method, api, backend, shape, a.k, a.dtype)
        ratio = r["extra_bytes"] / r["out_bytes"]
        rows.append(dict(op=method, api=api, backend=backend, shape=list(shape), k=a.k, dtype=a.dtype,
                         extra_bytes=r["extra_bytes"], out_bytes=r["out_bytes"], extra_over_output=ratio))
        print(f"{method:18} {api:9} {backend:9} {r['extra_bytes'] / 1e6:9.1f} {r['out_bytes'] / 1e6:9.1f} {ratio:12.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
