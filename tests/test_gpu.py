"""The GPU backends (``triton``, ``cuda``) on CUDA tensors: every method, primitive and PEFT
function against the torch reference on the same GPU (at most 1 ulp) and the ``cpu`` backend
(bit for bit where no norm ratio is involved); seeded DARE/DELLA masks identical on cpu, triton
and cuda; both Triton selection paths and the CUDA radix select with split ties; strided
inputs; K = 16 and 64; more than 2**31 elements; ``auto`` on the GPU; ``torch.compile``.

Skipped without a CUDA device (CI has none: there the Triton kernels run in the interpreter,
test_triton_interpreter.py, and .ci/run compiles the CUDA sources for sm_80 and sm_90).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastmerge
from conftest import assert_match, models_for, philox_mask
from fastmerge import ops
from fastmerge import peft as FP

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device visible to torch: the triton and cuda backends' GPU tests need one")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]
SHAPES = [(37, 53), (101,), (1,), (0,), (3, 5, 7), (257, 1031), ((1 << 17) + 3,)]
RESCALED = ("dare_ties", "dare_linear", "della", "della_linear")
CPU_REF = "cpu" if fastmerge.backends()["cpu"]["available"] else "torch"


@pytest.fixture(params=["triton", "cuda"])
def gpu(request):
    info = fastmerge.backends()[request.param]
    if not info["available"]:
        pytest.skip(f"{request.param}: {info['reason']}")
    return request.param


def cuda(ts):
    return [t.cuda() for t in ts] if isinstance(ts, (list, tuple)) else ts.cuda()


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", fastmerge._registry.names("gta") + fastmerge._registry.names("linear"))
def test_methods_match_reference_and_cpu(gpu, method, shape, dtype):
    base, ms = models_for(shape, 3, dtype)
    dens = [0.3, 0.45, 0.2] if method.startswith("della") else [0.3, 0.0, 1.0]
    kw = dict(weights=[1.0, -0.5, 0.7], density=dens, seed=11)
    if method == "linear":
        kw.pop("seed")
    out = quiet(fastmerge.merge, method, cuda(base), cuda(ms), backend=gpu, **kw)
    assert out.device.type == "cuda"
    ref = quiet(fastmerge.merge, method, cuda(base), cuda(ms), backend="torch", **kw)
    assert_match(out, ref, f"{gpu} {method} {shape} {dtype} vs reference")
    on_cpu = quiet(fastmerge.merge, method, base, ms, backend=CPU_REF, **kw)
    if method in RESCALED:
        assert_match(out.cpu(), on_cpu, "vs cpu")
    else:
        assert torch.equal(out.cpu(), on_cpu), f"{gpu} {method} {shape} {dtype} vs {CPU_REF}"


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_seeded_masks_identical_on_every_backend(method):
    base, ms = models_for((129, 77), 3, torch.bfloat16, seed=7)
    kw = dict(density=[0.5, 0.35, 0.4], seed=2**40 + 123, rescale=False)
    if method.startswith("della"):
        kw["epsilon"] = 0.2
    outs = {CPU_REF: fastmerge.merge(method, base, ms, backend=CPU_REF, **kw)}
    for name in ("triton", "cuda"):
        if fastmerge.backends()[name]["available"]:
            outs[name] = quiet(fastmerge.merge, method, cuda(base), cuda(ms), backend=name, **kw).cpu()
    for name, out in outs.items():
        assert torch.equal(out, outs[CPU_REF]), name


def test_random_drop_is_the_counter_layout(gpu):
    x = torch.randn(333, 257)
    for seed in (0, 2**63 + 5):
        out = ops.random_drop(x.cuda(), 0.4, seed=seed, rescale=False, backend=gpu).cpu()
        assert torch.equal(out, torch.where(philox_mask(x.shape, seed, 0, 0.4), x, torch.zeros(())))


def test_primitives_and_peft(gpu):
    base, ms = models_for((61, 67), 3, torch.float32, seed=2)
    x = ms[0] - base
    for k in (0, 1, 17, x.numel() - 1, x.numel()):
        assert torch.equal(ops.magnitude_threshold(x.cuda(), k=k, backend=gpu).cpu(),
                           ops.magnitude_threshold(x, k=k, backend=CPU_REF))
    for rescale in (None, "l1", "l2", "linf"):
        assert_match(ops.magnitude_prune(x.cuda(), 0.25, rescale=rescale, backend=gpu).cpu(),
                     ops.magnitude_prune(x, 0.25, rescale=rescale, backend=CPU_REF))
    for method in ("sum", "count"):
        assert torch.equal(ops.elect_sign(cuda(ms), [1.0, -0.5, 2.0], method=method, backend=gpu).cpu(),
                           ops.elect_sign(ms, [1.0, -0.5, 2.0], method=method, backend=CPU_REF))
    sign = ops.elect_sign(ms, backend=CPU_REF)
    for divisor in ("count", "weight"):
        assert torch.equal(
            ops.disjoint_merge(cuda(ms), sign.cuda(), [1.0, 0.5, 0.25], divisor=divisor, backend=gpu).cpu(),
            ops.disjoint_merge(ms, sign, [1.0, 0.5, 0.25], divisor=divisor, backend=CPU_REF))
    tasks = [m - base for m in ms]
    w = torch.tensor([1.0, 0.5, -0.7])
    for name in ("ties", "dare_ties", "dare_linear", "magnitude_prune"):
        kw = dict(seed=4) if name.startswith("dare") else {}
        got = quiet(getattr(FP, name), cuda(tasks), w.cuda(), 0.3, backend=gpu, **kw)
        want = quiet(getattr(FP, name), tasks, w, 0.3, backend=CPU_REF, **kw)
        assert torch.equal(got.cpu(), want), name
    assert torch.equal(FP.task_arithmetic(cuda(tasks), w.cuda(), backend=gpu).cpu(),
                       FP.task_arithmetic(tasks, w, backend=CPU_REF))


@pytest.mark.parametrize("case", ["distinct", "bf16_ties", "zeros_split"])
def test_selection_exact_with_split_ties(gpu, case):
    """Exactly k kept, ties to the lowest index: Triton's bracket and (forced) radix paths, the
    CUDA radix select and its tie scan, on inputs large enough for several blocks."""
    g = torch.Generator().manual_seed(0)
    n = (1 << 20) + 77
    x = torch.randn(n, generator=g)
    if case == "bf16_ties":
        x = x.to(torch.bfloat16)
    elif case == "zeros_split":
        x[torch.rand(n, generator=g) < 0.7] = 0.0
    for k in (1, n // 5, n // 2, n - 1):
        got = ops.magnitude_prune(x.cuda(), k=k, backend=gpu).cpu()
        want = ops.magnitude_prune(x, k=k, backend=CPU_REF)
        assert torch.equal(got, want), (case, k)
        assert int((got != 0).sum()) <= k
    if gpu == "triton":
        from fastmerge.backends import _gpu as G
        from fastmerge.backends.triton import kernels

        xc = x.cuda()
        _, bst, xs, sts, C, strided = G.layout(None, [xc])
        for force in (False, True):
            tj = kernels().select(None, xs, qm=[0], qk=[n // 2], n=n, C=C, strides=sts, base_strides=bst,
                                  strided=strided, force_radix=force)
            T, J = tj[0].tolist()
            key = xc.float().view(torch.int32).long() & 0x7FFFFFFF
            kept = (key > T) | ((key == T) & (torch.arange(n, device="cuda") <= J))
            assert int(kept.sum()) == n // 2


def test_strided_inputs(gpu):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(530, 370, generator=g)
    ms = [base + 0.05 * torch.randn(530, 370, generator=g) for _ in range(3)]
    views = [ms[0].cuda().t().contiguous().t(), torch.empty(530, 800, device="cuda")[:, 5:375], ms[2].cuda()]
    views[1].copy_(ms[1])
    for method in ("ties", "dare_ties", "della", "breadcrumbs", "task_arithmetic"):
        got = quiet(fastmerge.merge, method, base.cuda(), views, density=0.4, seed=1, backend=gpu)
        want = quiet(fastmerge.merge, method, base, ms, density=0.4, seed=1, backend=CPU_REF)
        assert_match(got.cpu(), want, method)


@pytest.mark.parametrize("K", [16, 64])
def test_many_inputs(gpu, K):
    base, ms = models_for((67, 129), K, torch.bfloat16, seed=8)
    w = [((-1) ** k) * (0.2 + 0.01 * k) for k in range(K)]
    for method in ("ties", "dare_ties", "task_arithmetic"):
        kw = dict(weights=w) if method == "task_arithmetic" else dict(weights=w, density=0.3, seed=3, rescale=False)
        got = quiet(fastmerge.merge, method, base.cuda(), cuda(ms), backend=gpu, **kw)
        assert torch.equal(got.cpu(), fastmerge.merge(method, base, ms, backend=CPU_REF, **kw)), method


def test_cuda_rejects_more_than_64_inputs():
    if not fastmerge.backends()["cuda"]["available"]:
        pytest.skip(fastmerge.backends()["cuda"]["reason"])
    base = torch.zeros(8, device="cuda")
    with pytest.raises(ValueError, match="triton"):
        fastmerge.task_arithmetic(base, [base + 1] * 65, backend="cuda")


def test_more_than_2_31_elements(gpu):
    """64-bit indexing: a 2**31 + 5 element bf16 merge, checked on the tail (past 2**31)."""
    n = (1 << 31) + 5
    need = 10 * n * 2 + (4 << 30)  # base, 2 models, outputs, a delta, temporaries, candidates
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16)
    ms = [base + torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16) * 0.01 for _ in range(2)]
    tail = slice(n - 4096, n)
    out = fastmerge.task_arithmetic(base, ms, weights=[0.5, 0.25], backend=gpu)
    want = fastmerge.task_arithmetic(base[tail].cpu(), [m[tail].cpu() for m in ms], weights=[0.5, 0.25],
                                     backend=CPU_REF)
    assert torch.equal(out[tail].cpu(), want)
    del out
    drop = ops.random_drop(ms[0], 0.5, seed=77, rescale=False, backend=gpu)
    from fastmerge import philox

    idx = torch.arange(tail.start, n, dtype=torch.int64)
    grp = idx >> 2
    words = philox.philox4x32(grp & 0xFFFFFFFF, grp >> 32, torch.zeros_like(grp), torch.zeros_like(grp), 77)
    w = torch.stack(words, 1).gather(1, (idx & 3)[:, None])[:, 0]
    keep = (w >> 8).to(torch.float32) * philox.UNIFORM_SCALE < 0.5
    assert torch.equal(drop[tail].cpu(), torch.where(keep, ms[0][tail].cpu(), torch.zeros((), dtype=torch.bfloat16)))
    del drop
    k = n // 3
    pruned = ops.magnitude_prune(ms[1] - base, k=k, backend=gpu)
    assert int((pruned != 0).sum()) <= k


def test_auto_on_gpu_stays_on_gpu():
    from fastmerge import dispatch
    from fastmerge.integrations._patch import fused_can_take

    base, ms = models_for((33, 65), 3, torch.float32)
    name = dispatch.resolve("auto", torch.device("cuda"), "ties")
    assert name in ("triton", "cuda", "torch")
    out = fastmerge.ties(base.cuda(), cuda(ms), density=0.3)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), fastmerge.ties(base, ms, density=0.3, backend=CPU_REF))
    assert fused_can_take([base.cuda()]) == (name != "torch")


def test_device_mismatch_raises(gpu):
    base, ms = models_for((8, 8), 2, torch.float32)
    with pytest.raises(ValueError, match="device|cuda"):
        fastmerge.ties(base.cuda(), ms, density=0.5, backend=gpu)
    with pytest.raises(ValueError, match="CPU tensors"):
        fastmerge.ties(base.cuda(), cuda(ms), density=0.5, backend="cpu")


def test_nonfinite_detected(gpu):
    base, ms = models_for((100, 100), 3, torch.float32)
    ms[2][3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"models\[2\].*non-finite"):
        fastmerge.ties(base.cuda(), cuda(ms), density=0.5, backend=gpu)
    with pytest.raises(ValueError, match="non-finite"):
        ops.magnitude_threshold(ms[2].cuda(), 0.5, backend=gpu)


def test_compile_on_gpu(gpu):
    torch._dynamo.reset()
    base, ms = models_for((64, 48), 3, torch.bfloat16)

    def f(base, a, b, c):
        return fastmerge.ties(base, [a, b, c], density=0.2, backend=gpu) * 2

    got = torch.compile(f, fullgraph=True)(base.cuda(), *cuda(ms))
    assert torch.equal(got, f(base.cuda(), *cuda(ms)))


# ---- quantizers (fastmerge.quant): the Triton kernels compiled, against the CPU reference ----

def _same_quant(a, b):
    from test_quant import assert_same

    if isinstance(a, tuple):
        assert_same(tuple(t.cpu() for t in a), b)
    else:
        assert_same(type(a)(**{k: v.cpu() for k, v in a.tensors().items()}, shape=a.shape,
                            group_size=a.group_size, symmetric=a.symmetric, dtype=a.dtype), b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_quantizers_bit_identical_to_reference(gpu, dtype):
    from fastmerge import quant as Q
    from test_quant import FP8_CASES, weights

    for i, shape in enumerate([(8, 128), (136, 1024), (1032, 4096)]):
        w = weights(shape, dtype, seed=i)
        for G in Q.GROUP_SIZES:
            for layout in Q.LAYOUTS:
                for sym in (False, True):
                    ref = Q.quantize_int4(w, G, sym, layout, backend="torch")
                    _same_quant(Q.quantize_int4(w.cuda(), G, sym, layout, backend=gpu), ref)
    for i, (gran, shape) in enumerate(FP8_CASES + [("tensor", (4096, 4096)), ("row", (3, 20000))]):
        w = weights(shape, dtype, seed=20 + i)
        for fmt in Q.FP8_DTYPES:
            ref = Q.quantize_fp8(w, gran, fmt, backend="torch")
            _same_quant(Q.quantize_fp8(w.cuda(), gran, fmt, backend=gpu), ref)


def test_quantizer_edges_on_gpu(gpu):
    import test_quant
    from fastmerge import quant as Q

    monkey = pytest.MonkeyPatch()
    try:  # the CPU tests' edge cases, with every quantize call moved to the GPU
        real = Q.quantize

        def on_gpu(w, cfg, *, backend=None):
            if backend in (None, "torch") or w.device.type == "cuda":
                return real(w, cfg, backend=backend)
            out = real(w.cuda(), cfg, backend=gpu)
            if isinstance(out, tuple):
                return tuple(t.cpu() for t in out)
            return type(out)(**{k: v.cpu() for k, v in out.tensors().items()}, shape=out.shape,
                             group_size=out.group_size, symmetric=out.symmetric, dtype=out.dtype)

        monkey.setattr(Q, "quantize", on_gpu)
        monkey.setattr(test_quant, "QFAST", ["gpu"])
        monkey.setattr(test_quant, "QB", ["torch", "gpu"])
        test_quant.test_int4_edge_groups_on_every_backend()
        test_quant.test_int4_ties_with_the_reciprocal_shortcut()
        for fmt in Q.FP8_DTYPES:
            test_quant.test_fp8_encoder_at_every_rounding_tie_and_subnormal(fmt)
        test_quant.test_fp8_sqnr_zero_tiles_and_saturation()
    finally:
        monkey.undo()


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {}), ("ties", dict(density=0.3)),
                                       ("dare_ties", dict(density=0.4, seed=3)),
                                       ("della", dict(density=0.4, epsilon=0.1, seed=2)),
                                       ("linear", {})])
def test_fused_merge_quantize(gpu, method, kw):
    from fastmerge import quant as Q

    for dtype in DTYPES:
        base, ms = models_for((264, 1024), 3, dtype)
        b = None if method == "linear" else base
        merged = fastmerge.merge(method, b, ms, backend=CPU_REF, **kw)
        for cfg in (Q.Int4Config(32), Q.Int4Config(128, True), Q.Int4Config(64, layout="torchao"),
                    Q.FP8Config("row"), Q.FP8Config("tensor", "e5m2")):
            want = Q.quantize(merged, cfg, backend="torch")
            got = quiet(fastmerge.merge, method, cuda(b) if b is not None else None, cuda(ms),
                        quantize=cfg, backend=gpu, **kw)
            _same_quant(got, want)


def test_quantizer_errors_on_gpu(gpu):
    from fastmerge import quant as Q

    base, ms = models_for((64, 256), 2, torch.float32)
    x = ms[1].clone()
    x[5, 100] = float("nan")
    for cfg in (Q.Int4Config(), Q.FP8Config("tensor"), Q.FP8Config("row"), Q.FP8Config("block")):
        with pytest.raises(fastmerge.NonFiniteError, match="^w contains"):
            Q.quantize(x.cuda(), cfg, backend=gpu)
        with pytest.raises(fastmerge.NonFiniteError, match=r"^models\[1\]"):
            fastmerge.task_arithmetic(base.cuda(), cuda([ms[0], x]), quantize=cfg, backend=gpu)
    with pytest.raises(ValueError, match="fp16 scale"):
        Q.quantize_int4(torch.full((8, 128), 2e6).index_fill_(1, torch.tensor([0]), -2e6).cuda(), backend=gpu)
    big = cuda([torch.full((8, 128), 40000.0), torch.full((8, 128), 40000.0)])
    with pytest.raises(fastmerge.NonFiniteError, match="merged tensor"):
        fastmerge.linear(None, big, normalize=False, out_dtype=torch.float16, quantize="int4", backend=gpu)
