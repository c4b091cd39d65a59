"""Vector global accesses in the streaming Triton kernels' PTX, compiled for sm_90 without a GPU.

Every streaming kernel is compiled (``tests/triton_compile_check.py``'s stand-in driver: each
launch is a compile-only warmup) with exactly the arguments fastmerge's driver passes for
contiguous, aligned inputs whose element count is a multiple of 16, and its PTX must hold
vector loads (``ld.global.v*``) and, where the kernel writes a stream, vector stores
(``st.global.v*``); bf16 streams must be read 16 bytes at a time (``ld.global.v4.b32``) where
the kernel's tile gives each thread 8 consecutive elements. Prints one JSON line
``{kernel: [{"ld": {...}, "st": {...}}, ...]}`` (counts of each global access form per launch)
and exits 0 when every kernel passes, 1 with the failures listed. ``tests/test_triton_ptx.py``
runs it in a subprocess (it patches Triton's JIT). Exit 3: the Triton internals are missing.
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_compile_check as tcc  # noqa: E402  (patches the JIT: compile-only launches)

import torch  # noqa: E402

# kernel -> (needs vector loads, needs vector stores, needs 16-byte bf16 loads)
EXPECT = {
    "_fused_merge_kernel": (True, True, True),
    "_mask_norms_kernel": (True, False, True),
    "_bracket_kernel": (True, False, True),
    "_radix_hist_kernel": (True, False, True),
    "_tie_count_kernel": (True, False, True),
    "_tie_find_kernel": (True, False, True),
    "_della_keep_kernel": (True, False, False),  # the rank order (int64); x is gathered by rank
    "_int4_kernel": (True, True, False),
    # its outputs are 4-bit codes (an eighth of the bytes of one input) on tiles too small to
    # give a thread more than one packed word: only its K + 1 input streams must be vectors
    "_merge_int4_kernel": (True, False, False),
    "_fp8_cell_kernel": (True, True, False),
    # the research methods' passes; consensus's TALL-masks-only launch writes mask bytes only
    "_consensus_kernel": (True, False, True),
    "_emr_kernel": (True, True, True),
    "_fisher_sumsq_kernel": (True, False, True),
    "_fisher_merge_kernel": (True, True, True),
    "_pcb_scores_kernel": (True, True, True),
    "_pcb_merge_kernel": (True, True, True),
}


def workload():
    import fastmerge
    from fastmerge import quant as Q
    from fastmerge.backends import _gpu as gpu
    from fastmerge.backends.triton import kernels

    g = torch.Generator().manual_seed(0)
    shape = (64, 256)  # n = 16384: a multiple of 16, aligned
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    ms = [(base.float() + torch.randn(shape, generator=g)).to(torch.bfloat16) for _ in range(4)]
    fastmerge.ties(base, ms, density=0.3)                                   # bracket + merge
    fastmerge.merge("ties", base, ms, density=0.3, rescale="l1")            # mask_norms
    fastmerge.della(base, ms[:2], density=0.4, epsilon=0.1, seed=1)         # della_keep
    ms_ = kernels().magnitude_select
    _, bst, xs, sts, C, strided = gpu.layout(base, ms)
    n = base.numel()
    flag = torch.zeros(1, dtype=torch.int32)
    common = dict(BLK=ms_.BLOCK, num_warps=8, HAS_BASE=True, STRIDED=False, enable_fp_fusion=False)
    hist = torch.zeros(2048, dtype=torch.int64)
    ms_._radix_hist_kernel[(1,)](base, xs[0], hist, flag, 0, *bst, *sts[0], n, C, SHIFT=20,
                                 PSHIFT=31, NB=2048, **common)
    counts = torch.zeros(4, dtype=torch.int64)
    ms_._tie_count_kernel[(1,)](base, xs[0], counts, 5, *bst, *sts[0], n, C, **common)
    ms_._tie_find_kernel[(1,)](base, xs[0], counts, 5, 0, 3, *bst, *sts[0], n, C, **common)
    w = ms[0][:, :128].contiguous()
    for layout in Q.LAYOUTS:
        Q.quantize_int4(w, 128, False, layout)
        fastmerge.ties(base[:, :128].contiguous(), [m[:, :128].contiguous() for m in ms[:3]],
                       density=0.3, quantize=Q.Int4Config(128, layout=layout))
    wide = torch.randn(8, 2048, generator=g).to(torch.bfloat16)  # rows of 2048: 16 per thread
    for gran in ("row", "tensor"):
        Q.quantize_fp8(wide, gran, next(iter(Q.FP8_DTYPES)))
    research_workload(base, ms)


def research_workload(base, ms):
    """consensus (merge, TALL masks), EMR, Fisher and PCB on the bf16 K = 4 inputs."""
    from fastmerge.backends import method_ops

    T = method_ops("triton")
    K = len(ms)
    T.consensus(base, ms, k=2, tall_lambda=[0.6] * K, lam=1.0, out_dtype=torch.bfloat16)
    T.tall_masks(base, ms, [0.6] * K)
    T.emr(base, ms)
    fs = [m.abs() for m in ms]
    names = [f"models[{k}]" for k in range(K)] + [f"fishers[{k}]" for k in range(K)]
    T.sum_squares(fs, names)
    T.fisher(ms, fs, [1.0 / K] * K, 1e-6, out_dtype=torch.bfloat16, names=names)
    n = base.numel()
    T.pcb(base, ms, ranks=(1, n - 2, n - n // 10), weights=[1.0] * K, lam=1.0, out_dtype=torch.bfloat16)


def forms(text, op):
    return dict(collections.Counter(re.findall(rf"\b{op}\.global(?:\.[\w]+)*", text)))


def main() -> int:
    warnings.simplefilter("ignore")
    tcc.driver.set_active(tcc.StandInDriver(90))
    workload()
    report, failures = {}, []
    for name, (need_ld, need_st, need_16) in EXPECT.items():
        texts = tcc.ptx_of.get(name, [])
        if not texts:
            failures.append(f"{name}: not compiled by the workload")
            continue
        report[name] = []
        for text in texts:
            ld, st = forms(text, "ld"), forms(text, "st")
            report[name].append({"ld": ld, "st": st})
            if need_ld and not any(".v" in f for f in ld):
                failures.append(f"{name}: no vector global load: {ld}")
            amax_only = name == "_fp8_cell_kernel" and "atom.global" in text  # writes no codes
            if need_st and not amax_only and not any(".v" in f for f in st):
                failures.append(f"{name}: no vector global store: {st}")
            if need_16 and "ld.global.v4.b32" not in ld:
                failures.append(f"{name}: bf16 not loaded 16 bytes at a time: {ld}")
    print(json.dumps(report))
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
