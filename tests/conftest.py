"""Shared helpers for fastmerge's tests.

* ``BACKENDS``: every backend that runs on CPU tensors and ``fastmerge.backends()`` reports
  as available (``torch`` always; ``cpu`` once the native module is built). The GPU backends
  are tested on CUDA tensors in ``test_gpu.py``, and the Triton kernels also in Triton's
  interpreter on CPU tensors (``test_triton_interpreter.py``).
* On a machine without CUDA this file sets ``TRITON_INTERPRET=1`` before anything imports
  Triton, so the ``triton`` backend runs its kernels in the interpreter (slow: only the
  interpreter tests use it).
* ``DTYPES``: ``(dtype, atol, rtol)`` used when comparing against libraries that compute in the
  input dtype (mergekit, PEFT) while fastmerge accumulates in fp32 and rounds once.
* ``make_models``: a base tensor and K fine-tuned-like models (base + small random deltas).
* ``mergekit_merge``: the real mergekit 0.1.5 ``merge_tensors`` with fastmerge-style arguments.
* ``assert_close_frac``: allclose that tolerates a bounded fraction of mismatching positions
  (used only where a documented by-design difference can flip a few top-k decisions).
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is defined (fastmerge imports its kernels lazily, so
    # setting it here, first thing, is early enough).
    os.environ.setdefault("TRITON_INTERPRET", "1")

with warnings.catch_warnings():
    # The "native module missing" RuntimeWarning is expected until the cpu backend is built.
    warnings.simplefilter("ignore", RuntimeWarning)
    import fastmerge

from fastmerge import _transfer, philox

CPU_BACKENDS = ("torch", "cpu")
BACKENDS = [name for name, info in fastmerge.backends().items()
            if info["available"] and name in CPU_BACKENDS]

# (dtype, atol, rtol) for results of O(1) magnitude computed by a library working in `dtype`
# versus fastmerge's fp32 accumulation with a single final rounding: about two ulps.
DTYPES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.bfloat16, 2e-2, 2 ** -6),
    (torch.float16, 2e-3, 2 ** -9),
]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each available fastmerge backend by name."""
    return request.param


@pytest.fixture(params=DTYPES, ids=DTYPE_IDS)
def dtype_tol(request):
    return request.param


def make_models(shape=(37, 53), K=3, dtype=torch.float32, *, seed=0, scale=0.05,
                base_scale=1.0):
    """``(base, [m_1..m_K])``: ``base ~ N(0, base_scale)`` and ``m_k = base + N(0, s_k)`` with
    per-model scales spread over ``[scale/5, 2*scale]`` (~0.01..0.1 by default), built in fp32
    and then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    base = torch.randn(shape, generator=g) * base_scale
    models = []
    for k in range(K):
        s = scale * (0.2 + 1.8 * k / max(1, K - 1)) if K > 1 else scale
        m = base + s * torch.randn(shape, generator=g)
        if dtype == torch.float32:
            m = _distinct_deltas(base, m)
        models.append(m.to(dtype))
    return base.to(dtype), models


def _distinct_deltas(base, m):
    """Nudge ``m`` by ulps until the magnitudes ``|m - base|`` are pairwise distinct, so that
    fp32 comparisons with libraries whose top-k / rank tie-breaking is unspecified (mergekit's
    unstable argsort) are not at the mercy of rounding coincidences."""
    m = m.clone()
    flat = m.reshape(-1)
    for _ in range(100):
        a = (m - base).abs().reshape(-1)
        s, order = a.sort(stable=True)
        dup = torch.zeros_like(a, dtype=torch.bool)
        dup[order[1:][s[1:] == s[:-1]]] = True
        if not dup.any():
            return m
        flat[dup] = torch.nextafter(flat[dup], torch.full_like(flat[dup], float("inf")))
    raise AssertionError("could not make deltas distinct")


def make_tasks(shape=(37, 53), K=3, dtype=torch.float32, *, seed=0, scale=0.05):
    """K task tensors (deltas) for PEFT-style functions."""
    g = torch.Generator().manual_seed(seed)
    return [(scale * (1 + k % 3) * torch.randn(tuple(shape), generator=g)).to(dtype)
            for k in range(K)]


def make_tie_free_tasks(shape, K, dtype, seed):
    """Tasks whose magnitudes are pairwise distinct and exact in bf16/fp16 (unique top-k)."""
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    mags = torch.tensor([(1 + j / 128) * 2.0 ** -e for e in range(2, 12) for j in range(128)])
    out = []
    for _ in range(K):
        pick = mags[torch.randperm(mags.numel(), generator=g)[:n]]
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        out.append((pick * sign).reshape(shape).to(dtype))
    return out


def mergekit_merge(name, base, models, **params):
    """mergekit 0.1.5's own ``merge_tensors`` on ``[base, *models]`` (base index 0).

    Per-model parameters (weight, density, gamma, epsilon) are lists of K values for the
    non-base models; shared ones: normalize, rescale, lambda, int8_mask. ``base=None`` merges
    the models alone (``linear``)."""
    from mergekit.merge_methods import merge_tensors

    with torch.no_grad():
        if base is None:
            return merge_tensors(list(models), name, parameters=params)
        return merge_tensors([base, *models], name, parameters=params, base_index=0)


def assert_close_frac(actual, expected, *, atol, rtol, max_frac=0.0, msg=""):
    """``|a - e| <= atol + rtol*|e|`` everywhere except at most ``max_frac`` of positions.

    NaN never matches. Shapes and dtypes must agree."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    a, e = actual.double(), expected.double()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    nbad = int(bad.sum())
    allowed = math.floor(max_frac * a.numel())
    if nbad > allowed:
        idx = bad.reshape(-1).nonzero()[:5].reshape(-1).tolist()
        worst = float((a - e).abs().max())
        raise AssertionError(
            f"{msg} {nbad}/{a.numel()} positions differ (allowed {allowed}); max |diff| {worst:g}; "
            f"first at flat {idx}: actual {a.reshape(-1)[idx].tolist()} "
            f"expected {e.reshape(-1)[idx].tolist()}"
        )


def philox_mask(shape, seed, stream, p):
    """The keep mask fastmerge's counter layout defines: ``uniform(seed, stream) < fp32(p)``,
    where ``p`` is a float or an fp32 tensor of per-element probabilities."""
    n = math.prod(shape)
    u = philox.uniform(n, seed, stream=stream).reshape(shape)
    if not isinstance(p, torch.Tensor):
        p = torch.tensor(p, dtype=torch.float32)
    return u < p.to(torch.float32)


@contextlib.contextmanager
def bernoulli_from_philox(monkeypatch, seed, streams, shape, *, p=None, check_p=None):
    """Temporarily replace ``torch.bernoulli`` (the global one mergekit and PEFT call) with
    fastmerge's Philox mask for the given streams, consumed one per call in order.

    ``p=None`` uses the probability tensor the library passes in (mergekit's DELLA probs);
    otherwise ``p`` (a float, compared in fp32). ``check_p(prob_tensor)`` may assert on what
    the library passed. Yields the list of masks handed out."""
    streams = list(streams)
    handed = []
    real = torch.bernoulli

    def fake(input, *args, **kwargs):
        assert not args and not kwargs.get("generator"), "unexpected bernoulli call"
        assert streams, "more bernoulli calls than expected"
        assert tuple(input.shape) == tuple(shape) or input.numel() == math.prod(shape), input.shape
        if check_p is not None:
            check_p(input)
        k = streams.pop(0)
        prob = input.float() if p is None else p
        mask = philox_mask(tuple(input.shape), seed, k, prob)
        handed.append(mask)
        return mask.to(input.dtype)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "bernoulli", fake)
        yield handed
    assert torch.bernoulli is real
    assert not streams, f"bernoulli called fewer times than expected; left {streams}"


@contextlib.contextmanager
def bernoulli_as_fastmerge(monkeypatch, k):
    """Make a library's ``torch.bernoulli`` draw exactly the masks fastmerge's seeded path
    draws when ``seed=None``: one fused merge of ``k`` tensors takes ONE seed from torch's
    default generator (``philox.resolve_seed``) and gives tensor ``i`` stream ``i``, while the
    library calls ``torch.bernoulli`` once per tensor. So the fake takes a fresh seed from the
    same generator every ``k`` calls and hands out stream ``call % k`` with the probabilities
    the library passed (compared in fp32). Yields the number of calls made so far (a list)."""
    calls = [0]
    state = {}

    def fake(input, *args, **kwargs):
        assert not args and not kwargs.get("generator"), "unexpected bernoulli call"
        i = calls[0] % k
        if i == 0:
            state["seed"] = philox.resolve_seed(None)
        calls[0] += 1
        return philox_mask(tuple(input.shape), state["seed"], i, input.float()).to(input.dtype)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "bernoulli", fake)
        yield calls
    assert calls[0] % k == 0, f"{calls[0]} bernoulli calls is not a multiple of {k}"


# ---------------------------------------------------------------- tiny Llama checkpoints

def tiny_llamas(root, num_layers: int = 2):
    """``root/base`` and ``root/m0..m2``: tiny random Llama checkpoints (fp32 safetensors) of
    ``num_layers`` layers, the fine-tunes ``base + 0.01 (k+1) N(0, 1)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    sd = base.state_dict()
    for k in range(3):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict({n: t + 0.01 * (k + 1) * torch.randn_like(t) for n, t in sd.items()})
        m.save_pretrained(root / f"m{k}")
    return root


def llama_config(root, method, dtype, out_dtype=None):
    """A mergekit YAML for ``method`` over :func:`tiny_llamas`' checkpoints; returns its path."""
    params = {
        "ties": "{weight: 1.0, density: 0.3}|{weight: 0.5, density: 0.5}|{weight: 0.7, density: 0.2}",
        "task_arithmetic": "{weight: 0.5}|{weight: 0.3}|{weight: 0.2}",
        "breadcrumbs_ties": "{weight: 1.0, density: 0.4, gamma: 0.02}|{weight: 0.6, density: 0.5, gamma: 0.01}|"
                            "{weight: 0.3, density: 0.7, gamma: 0.05}",
        "dare_ties": "{weight: 1.0, density: 0.4}|{weight: 0.5, density: 0.6}|{weight: 0.5, density: 0.3}",
        "della": "{weight: 1.0, density: 0.5, epsilon: 0.1}|{weight: 0.5, density: 0.4, epsilon: 0.2}|"
                 "{weight: 0.8, density: 0.6, epsilon: 0.1}",
        "linear": "{weight: 0.5}|{weight: 0.3}|{weight: 0.2}",
    }[method].split("|")
    lines = [f"merge_method: {method}", f"dtype: {dtype}"]
    if method != "linear":
        lines.append(f"base_model: {root / 'base'}")
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    lines.append("models:")
    for k, p in enumerate(params):
        lines += [f"  - model: {root / f'm{k}'}", f"    parameters: {p}"]
    path = root / f"{method}-{dtype}-{out_dtype}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def load_folder(folder):
    """Every tensor of every ``*.safetensors`` file in ``folder``, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def assert_folders_match_mergekit(expected_dir, actual_dir, method, dtype, out_dtype=None):
    """The tensors of two merged checkpoint folders agree to the output dtype's rounding, except
    bf16 TIES: mergekit's bf16 deltas (1 ulp = 2^-7 near the layer norms' 1.0) tie in magnitude
    at the top-k cut, where its argsort order is unspecified and fastmerge keeps the lowest
    index; at most 5% of a tensor and 0.2% overall may differ there."""
    assert_tensors_match_mergekit(load_folder(expected_dir), load_folder(actual_dir), method, dtype, out_dtype)


def expect_merge_error(capsys, args, *needles):
    """``fastmerge merge ARGS`` fails with one line (no traceback) holding every needle."""
    from fastmerge.cli import main as cli

    assert cli(["merge", *map(str, args), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err, err
    for n in needles:
        assert n in err, (n, err)


def assert_tensors_match_mergekit(expected, actual, method, dtype, out_dtype=None):
    """:func:`assert_folders_match_mergekit` on two dicts of tensors by name."""
    assert expected.keys() == actual.keys() and len(actual) > 10
    tol = {"float32": 1e-6, "bfloat16": 2e-2, "float16": 2e-3}[out_dtype or dtype]
    off = total = 0
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        if dtype == "bfloat16" and method == "ties":
            bad = (actual[name].float() - expected[name].float()).abs() > tol
            assert bad.float().mean() <= 0.05, name
            off, total = off + int(bad.sum()), total + bad.numel()
        else:
            torch.testing.assert_close(actual[name], expected[name], atol=tol, rtol=tol, msg=name)
    assert off <= 0.002 * max(total, 1), (off, total)
def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two same-dtype float tensors."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.numel() == 0:
        return 0
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    ia, ib = a.contiguous().view(bits).long(), b.contiguous().view(bits).long()
    # map sign-magnitude to a monotone integer line so -0 and +0 coincide
    top = 1 << (8 * a.element_size() - 1)
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return int((ia - ib).abs().max())


def assert_match(fused, ref, what=""):
    assert fused.dtype == ref.dtype and fused.shape == ref.shape, what
    assert torch.equal(torch.isnan(fused), torch.isnan(ref)), what
    assert ulp_diff(fused, ref) <= 1, f"{what}: {ulp_diff(fused, ref)} ulps"


def models_for(shape, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    ms = [(base + 0.05 * (k + 1) * torch.randn(shape, generator=g)).to(dtype) for k in range(K)]
    return base.to(dtype), ms


def reads_of(fn):
    """``(fn(), host reads)``; a read that bypasses the helper (``tolist``, ``item``) counts too."""
    raw = [0]
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "item")}

    def counting(name):
        def read(self, *args, **kwargs):
            raw[0] += 1
            return saved[name](self, *args, **kwargs)
        return read

    before = _transfer.reads
    try:
        for name in saved:
            setattr(torch.Tensor, name, counting(name))
        out = fn()
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)
    via_helper = _transfer.reads - before
    return out, max(via_helper, raw[0])
