"""Seeded randomness: the Philox4x32-10 counter layout documented in ``fastmerge/philox.py`` is
the contract every backend reproduces bit for bit.

* ``philox4x32`` reproduces the Random123 known-answer vectors and an independent pure-Python
  (int arithmetic) Philox4x32-10 written here from the documented layout;
* every random op's mask is exactly ``uniform(numel, seed, stream=k) < p`` on the logical
  (row-major) flat index, for every backend and dtype, whatever the global RNG state;
* all backends give bit-identical results for the same seed;
* ``seed=None`` is governed by ``torch.manual_seed``.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import fastmerge
import fastmerge.peft as FP
from fastmerge import ops, philox
from conftest import BACKENDS, make_models

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
LOWP = [torch.float32, torch.bfloat16, torch.float16]
SEEDS = [0, 1, 2**32 - 1, 2**32 + 5, 2**40 + 12345, 2**63 + 99, 2**64 - 1]


# ---- an independent Philox4x32-10, pure Python ------------------------------------------

def _mulhilo(a, b):
    p = a * b
    return (p >> 32) & M32, p & M32


def philox_py(ctr, key, rounds=10):
    """Philox4x32-R (Salmon et al. SC'11) on Python ints: ctr = 4 words, key = 2 words."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def word_py(i, seed, stream):
    """The documented layout: key = (lo32(seed), hi32(seed)); element i uses word i & 3 of
    Philox(counter = (lo32(i >> 2), hi32(i >> 2), stream, 0))."""
    g = i >> 2
    words = philox_py((g & M32, (g >> 32) & M32, stream, 0), (seed & M32, (seed >> 32) & M32))
    return words[i & 3]


def uniform_py(i, seed, stream):
    return (word_py(i, seed, stream) >> 8) * 2.0 ** -24


KAT = [
    # Random123 kat_vectors: philox4x32 10 rounds, (counter, key) -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    seed = key[0] | (key[1] << 32)
    got = philox.philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in ctr), seed)
    assert [int(w.item()) for w in got] == list(expected)
    assert philox_py(ctr, key) == expected  # the pure-Python spec is right too


def test_philox_tensor_batch_matches_python():
    """Random counters and keys, batched in one int64 tensor call."""
    g = torch.Generator().manual_seed(0)
    ctrs = torch.randint(0, 2**32, (64, 4), generator=g, dtype=torch.int64)
    for seed in (0, 7, 2**33 + 1, 2**64 - 1):
        got = torch.stack(philox.philox4x32(*ctrs.unbind(1), seed), dim=1)
        for row, out in zip(ctrs.tolist(), got.tolist()):
            assert tuple(out) == philox_py(row, (seed & M32, seed >> 32))


@pytest.mark.parametrize("stream", [0, 1, 7, 2**31, 2**32 - 1])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_words_follow_the_counter_layout(seed, stream):
    numel = 103  # not a multiple of 4: the last group is partly used
    got = philox.random_words(numel, seed, stream).tolist()
    assert got == [word_py(i, seed, stream) for i in range(numel)]
    u = philox.uniform(numel, seed, stream)
    assert u.dtype == torch.float32
    assert u.tolist() == [uniform_py(i, seed, stream) for i in range(numel)]
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0


@pytest.mark.parametrize("i", [2**32 - 1, 2**32, 2**32 + 3, 2**34 - 1, 2**34, 2**34 + 7,
                               2**40 + 3, 2**62 + 1, 2**63 - 1])
def test_counter_layout_for_indices_beyond_32_bits(i):
    """Element indices >= 2**32 (tensors > 4 Gi elements): the counter's second word carries
    hi32(i >> 2). Checked through ``philox4x32`` with the documented counters (a tensor this
    large is not materialised)."""
    for seed, stream in ((2**32 + 5, 3), (2**64 - 1, 2**32 - 1), (0, 0)):
        g = i >> 2
        ctr = [torch.tensor([v], dtype=torch.int64) for v in (g & M32, g >> 32, stream, 0)]
        words = philox.philox4x32(*ctr, seed)
        assert int(words[i & 3].item()) == word_py(i, seed, stream)


def test_uniform_resolution():
    """u = (word >> 8) * 2**-24: a multiple of 2**-24 in [0, 1), exact in fp32."""
    u = philox.uniform(4096, 123, 0).double()
    scaled = u * 2**24
    assert torch.equal(scaled, scaled.round())
    assert 0.45 < float(u.mean()) < 0.55


# ---- masks of the random ops: exact against the layout, every backend ---------------------

def _tie_free_delta(shape, dtype, seed):
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    # distinct magnitudes, exact (and normal) in bf16 and fp16: 1280 values
    mags = torch.tensor([(1 + j / 128) * 2.0 ** -e for e in range(2, 12) for j in range(128)])
    pick = mags[torch.randperm(mags.numel(), generator=g)[:n]]
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (pick * sign).reshape(shape).to(dtype)


def _dare_mask(shape, seed, stream, density):
    u = torch.tensor([uniform_py(i, seed, stream) for i in range(math.prod(shape))],
                     dtype=torch.float32).reshape(shape)
    return u < torch.tensor(density, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("seed", [0, 2**32 + 5, 2**64 - 1])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_random_drop_mask_is_the_layout(density, seed, dtype, backend):
    """ops.random_drop keeps x[i] iff uniform(i, seed, stream 0) < fp32(density) (pure-Python
    uniforms), then divides by density; rescale=False keeps values unchanged."""
    shape = (9, 13)
    x = _tie_free_delta(shape, dtype, seed=1)
    mask = _dare_mask(shape, seed, 0, density)
    kept = ops.random_drop(x, density, seed=seed, rescale=False, backend=backend)
    assert kept.dtype == dtype
    assert torch.equal(kept, torch.where(mask, x, torch.zeros_like(x)))
    scaled = ops.random_drop(x, density, seed=seed, backend=backend)
    expected = (torch.where(mask, x.float(), 0.0) / torch.tensor(density, dtype=torch.float32)).to(dtype)
    assert torch.equal(scaled, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_model_k_uses_stream_k(method, dtype, backend):
    """With one-hot weights and base 0 the merge returns model k's masked delta exactly, and
    its mask is stream k of the layout; different models get different masks."""
    shape, K, seed, d = (11, 17), 4, 2**33 + 7, [0.3, 0.5, 0.7, 0.5]
    models = [_tie_free_delta(shape, dtype, seed=10 + k) for k in range(K)]
    base = torch.zeros(shape, dtype=dtype)
    masks = []
    for k in range(K):
        w = [0.0] * K
        w[k] = 1.0
        out = fastmerge.merge(method, base, models, weights=w, density=d, rescale=False, seed=seed,
                              backend=backend)
        mask = _dare_mask(shape, seed, k, d[k])
        assert torch.equal(out, torch.where(mask, models[k], torch.zeros_like(models[k]))), k
        masks.append(mask)
    for a, b in itertools.combinations(masks, 2):
        assert not torch.equal(a, b)


def _della_probs(delta, density, eps):
    """DELLA's keep probability from the documented recipe: ascending magnitude rank a along
    dim 1 (1-D: one row), rn = fp32(a) / fp32(n - 1), p = fp32(d - eps) + rn * fp32(2 eps), each
    operation rounded to fp32."""
    d = delta.float()
    if d.dim() == 1:
        d = d.unsqueeze(0)
    a = d.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    n = d.shape[1]
    rn = a / torch.tensor(float(n - 1), dtype=torch.float32) if n > 1 else torch.zeros_like(a)
    prod = rn * torch.tensor(2 * eps, dtype=torch.float32)
    p = torch.tensor(density - eps, dtype=torch.float32) + prod
    return p.reshape(delta.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(9, 13), (101,), (3, 6, 5), (4, 1), (1,)], ids=str)
def test_della_mask_is_the_layout(shape, dtype, backend):
    """della_linear (no rescale, weight 1, base 0) returns delta * [u < p] exactly, with p from
    the row ranks (rows along dim 1; rows of length 1 get rn = 0)."""
    density, eps, seed = 0.45, 0.3, 2**40 + 1
    delta = _tie_free_delta(shape, dtype, seed=3)
    base = torch.zeros(shape, dtype=dtype)
    u = torch.tensor([uniform_py(i, seed, 0) for i in range(math.prod(shape))]).reshape(shape)
    keep = u.float() < _della_probs(delta, density, eps)
    out = fastmerge.merge("della_linear", base, [delta], density=density, epsilon=eps, rescale=False,
                          seed=seed, backend=backend)
    assert torch.equal(out, torch.where(keep, delta, torch.zeros_like(delta)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_peft_dare_task_k_uses_stream_k(method, backend):
    """fastmerge.peft.dare_linear / dare_ties: task k is dropped with stream k and rescaled by
    1/density (PEFT semantics written out: dare_ties elects on the unweighted tasks and divides
    by the number of agreeing tasks)."""
    shape, K, seed, density = (7, 19), 3, 77, 0.4
    tasks = [_tie_free_delta(shape, torch.float32, seed=20 + k) for k in range(K)]
    p = torch.tensor(density, dtype=torch.float32)
    s = [torch.where(_dare_mask(shape, seed, k, density), tasks[k], 0.0) / p for k in range(K)]
    w = torch.tensor([0.7, -1.2, 0.4])
    linear = s[0] * w[0] + s[1] * w[1] + s[2] * w[2]
    assert torch.equal(FP.dare_linear(tasks, w, density, seed=seed, backend=backend), linear)
    e = s if method == "total" else [x.sign() for x in s]
    positive = (e[0] + e[1] + e[2]) >= 0
    agree = [torch.where(positive, x > 0, x < 0) for x in s]
    mixed = sum(torch.where(a, x * wk, 0.0) for a, x, wk in zip(agree, s, w))
    count = torch.clamp(sum(a.float() for a in agree), min=1.0)
    out = FP.dare_ties(tasks, w, density, method, seed=seed, backend=backend)
    torch.testing.assert_close(out, mixed / count, atol=1e-7, rtol=1e-6)
    assert torch.equal(out != 0, mixed != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_follows_logical_not_memory_order(backend):
    """The flat index is the logical row-major one: a transposed (non-contiguous) input gets the
    same result as its contiguous copy."""
    x = _tie_free_delta((13, 9), torch.float32, seed=4).T
    assert not x.is_contiguous()
    a = ops.random_drop(x, 0.5, seed=5, backend=backend)
    b = ops.random_drop(x.contiguous(), 0.5, seed=5, backend=backend)
    assert torch.equal(a, b)
    base, models = torch.zeros(9, 13), [x, x.contiguous()]
    m1 = fastmerge.merge("della_linear", base, models, weights=[1.0, 0.0], density=0.5, epsilon=0.2,
                         seed=6, backend=backend)
    m2 = fastmerge.merge("della_linear", base, [x.contiguous(), x.contiguous()], weights=[1.0, 0.0],
                         density=0.5, epsilon=0.2, seed=6, backend=backend)
    assert torch.equal(m1, m2)


# ---- global RNG independence, seed=None ----------------------------------------------------

RANDOM_CALLS = {
    "dare_ties": lambda b, ms, **kw: fastmerge.dare_ties(b, ms, weights=[1.0, 0.5, -0.3], density=0.4, **kw),
    "dare_linear": lambda b, ms, **kw: fastmerge.dare_linear(b, ms, density=[0.2, 0.5, 0.8], **kw),
    "della": lambda b, ms, **kw: fastmerge.della(b, ms, density=0.5, epsilon=0.2, **kw),
    "della_linear": lambda b, ms, **kw: fastmerge.della_linear(b, ms, density=0.3, epsilon=0.1, **kw),
    "random_drop": lambda b, ms, **kw: ops.random_drop(ms[0], 0.3, **kw),
    "peft_dare_ties": lambda b, ms, **kw: FP.dare_ties(ms, torch.tensor([1.0, 0.5, 0.2]), 0.3, **kw),
    "peft_random_pruning": lambda b, ms, **kw: FP.random_pruning(ms[1], 0.6, True, **kw),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(RANDOM_CALLS))
def test_seeded_result_ignores_global_rng(name, backend):
    """A given seed fixes the result whatever torch's global generator state (so it cannot be
    drawing from it), and two seeds give different results."""
    base, models = make_models((23, 29), 3, seed=1)
    call = RANDOM_CALLS[name]
    torch.manual_seed(1)
    a = call(base, models, seed=2**35 + 3, backend=backend)
    torch.manual_seed(2)
    torch.rand(100)
    b = call(base, models, seed=2**35 + 3, backend=backend)
    assert torch.equal(a, b)
    c = call(base, models, seed=2**35 + 4, backend=backend)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(RANDOM_CALLS))
def test_seed_none_follows_torch_manual_seed(name, backend):
    base, models = make_models((23, 29), 3, seed=2)
    call = RANDOM_CALLS[name]
    torch.manual_seed(123)
    a = call(base, models, seed=None, backend=backend)
    a2 = call(base, models, seed=None, backend=backend)  # the generator moved on
    torch.manual_seed(123)
    b = call(base, models, seed=None, backend=backend)
    torch.manual_seed(124)
    c = call(base, models, seed=None, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, a2)
    # and it is the seed that resolve_seed draws from the same generator state
    torch.manual_seed(123)
    s = philox.resolve_seed(None)
    assert torch.equal(a, call(base, models, seed=s, backend=backend))


# ---- bit-identical across backends -------------------------------------------------------

needs_two = pytest.mark.skipif(len(BACKENDS) < 2, reason="only one backend available here")


@needs_two
@pytest.mark.parametrize("dtype", LOWP, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(31, 37), (101,), (1,), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("name", list(RANDOM_CALLS))
def test_backends_bit_identical_random_ops(name, shape, dtype):
    base, models = make_models(shape, 3, dtype, seed=len(shape))
    call = RANDOM_CALLS[name]
    outs = {be: call(base, models, seed=2**50 + 11, backend=be) for be in BACKENDS}
    ref = outs["torch"]
    for be, out in outs.items():
        assert out.dtype == ref.dtype
        assert torch.equal(out, ref), f"{be} differs from torch: {(out.float() - ref.float()).abs().max()}"


@needs_two
@pytest.mark.parametrize("dtype", LOWP, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rescale", [None, False, "l2", "linf", "density"])
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_backends_bit_identical_full_merges(method, rescale, dtype):
    """K=5 with per-model densities, negative weights, lambda and every rescale mode."""
    base, models = make_models((29, 41), 5, dtype, seed=9)
    kw = dict(weights=[1.0, -0.5, 0.7, 0.3, 1.2], density=[0.2, 0.4, 0.5, 0.6, 0.8], epsilon=0.15,
              rescale=rescale, lam=0.9, seed=31337)
    outs = {be: fastmerge.merge(method, base, models, backend=be, **kw) for be in BACKENDS}
    for be, out in outs.items():
        assert torch.equal(out, outs["torch"]), be


# ---- deterministic ops: every backend matches the reference within 1 ulp -------------------

def _ulp(x):
    """One unit in the last place of ``x`` in its own dtype (as fp64)."""
    fi = torch.finfo(x.dtype)
    a = x.double().abs()
    e = torch.floor(torch.log2(torch.clamp(a, min=fi.tiny)))
    return torch.clamp(torch.exp2(e) * fi.eps, min=fi.tiny * fi.eps)


@needs_two
@pytest.mark.parametrize("dtype", LOWP, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method,rescale", [
    (m, r) for m in ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]
    for r in [None, True, False, "l2", "linf", "density"]
] + [("linear", None)])
def test_backends_match_reference_deterministic(method, rescale, dtype):
    """Correctness contract: deterministic ops match the torch reference within 1 ulp of the
    output dtype, for every rescale mode fastmerge offers (not only mergekit's L1)."""
    base, models = make_models((29, 41), 5, dtype, seed=17)
    kw = dict(weights=[1.0, -0.5, 0.7, 0.3, 1.2], density=[0.0, 0.2, 0.5, 0.9, 1.0], lam=0.9,
              gamma=0.05)
    if method != "linear":
        kw["rescale"] = rescale
    b = None if method == "linear" else base
    ref = fastmerge.merge(method, b, models, backend="torch", **kw)
    for be in BACKENDS:
        out = fastmerge.merge(method, b, models, backend=be, **kw)
        assert out.dtype == ref.dtype
        diff = (out.double() - ref.double()).abs()
        assert torch.all(diff <= _ulp(ref)), f"{be}: max diff {float(diff.max())}"



def test_norm_sums_do_not_depend_on_thread_count():
    """Rescaling sums |delta| over the whole tensor (in double). Those sums are added per fixed
    chunk, in chunk order, so a merge split over processes with fewer threads each (``torchrun
    ... fastmerge merge``) writes the same bytes as one process with more threads. Checked on
    the native sums themselves (doubles), where a thread-dependent order would show."""
    from fastmerge import _semantics as sem
    from fastmerge import abi
    from fastmerge.backends import cpu

    if not fastmerge.backends()["cpu"]["available"]:
        pytest.skip("cpu backend not built")
    torch.manual_seed(0)
    n = 3_000_001
    base = torch.randn(n)
    models = [base + torch.randn(n) * 10.0 ** -i for i in range(3)]
    masks = [sem.random_mask(0.3), sem.magnitude_mask(0.2, n), sem.random_mask(0.6)]
    lib = cpu._lib()
    ranges = cpu._thresholds(base, models, masks, n)
    kinds = [abi.MASK_OF_SPEC[m.kind] for m in masks]
    for norm in ("l1", "l2"):
        sums = [lib.mask_norms(base.data_ptr(), cpu._ptrs(models), abi.dtype_code(torch.float32), n, kinds,
                               ranges, [m.p for m in masks], 5, [0, 0, 0], abi.NORM_OF_PLAN[norm], nt)
                for nt in (1, 2, 3, 7)]
        assert all(s == sums[0] for s in sums[1:]), (norm, sums)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "breadcrumbs"])
def test_rescaled_norms_do_not_depend_on_thread_count(method):
    """Rescaling sums |delta| over the whole tensor: those sums are added per fixed chunk, in
    chunk order, so a merge split over processes with fewer threads each (``torchrun ...
    fastmerge merge``) writes the same bytes as one process with more threads."""
    if not fastmerge.backends()["cpu"]["available"]:
        pytest.skip("cpu backend not built")
    torch.manual_seed(0)
    base = torch.randn(600, 1111)
    models = [base + 0.01 * torch.randn_like(base) for _ in range(3)]
    kw = dict(weights=[0.5, 1.0, 0.7], density=[0.3, 0.5, 0.4], seed=7, backend="cpu",
              rescale="l2" if method == "breadcrumbs" else True)
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(fastmerge.merge(method, base, models, **kw))
    finally:
        torch.set_num_threads(before)
    for o in outs[1:]:
        assert torch.equal(o.view(torch.int32), outs[0].view(torch.int32))


@pytest.mark.parametrize("single", [False, True], ids=["groups_of_4", "one_element"])
def test_cuda_source_draws_the_counter_layout(single):
    """The CUDA kernels' Philox and keep decision (csrc/philox_mask.h, shared by the device code
    and this host build) give ``uniform(seed, stream) < p`` bit for bit: the cuda backend's
    seeded DARE/DELLA masks are the cpu and triton backends', checked without a GPU. Seeds
    and streams cover both key words and the high counter word's carry; p covers 0 and 1."""
    from fastmerge.backends._native import lib as native

    lib = native()
    if lib is None:
        pytest.skip("native CPU extension not built")
    n = 4 * 257 + 3  # odd, ends inside a group of four
    for seed, stream, p in itertools.product((0, 1, 2**32 - 1, 2**40 + 123, 2**63 + 5, M64),
                                             (0, 1, 7, 2**31 + 3), (0.0, 0.3, 0.5, 0.9, 1.0)):
        got = torch.frombuffer(bytearray(lib.cuda_random_keep_host(seed, stream, n, p, single)), dtype=torch.uint8)
        ref = philox.uniform(n, seed, stream=stream) < torch.tensor(p, dtype=torch.float32)
        assert torch.equal(got.bool(), ref), (seed, stream, p)
    # and the cpu backend's DARE drop (density = keep probability) on the same stream
    x = torch.randn(37, 29) + 5.0  # no zeros: the kept set is where the output is non-zero
    out = ops.random_drop(x, 0.35, seed=2**40 + 7, rescale=False, backend="cpu")
    keep = lib.cuda_random_keep_host(2**40 + 7, 0, x.numel(), 0.35, single)
    assert torch.equal(out.ne(0).flatten(), torch.frombuffer(bytearray(keep), dtype=torch.uint8).bool())
