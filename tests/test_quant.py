"""fastmerge.quant: INT4 (GPTQ v1, torchao plain), FP8, fused merge->quantize, delta compression.

Every format is checked three ways: the ``cpu`` kernels against the ``torch`` reference bit for
bit; both against an independent reference written here from the format's own code (AutoGPTQ's
v1 packing and unpacking, mslk's ``int4_row_quantize_zp`` + ``pack_int4`` behind torchao's
``Int4Tensor``, torch's own fp8 casts); and against torchao itself where it runs on a CPU
(``Float8Tensor.from_hp``, ``_dequantize_affine_tinygemm``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastmerge
from fastmerge import quant as Q
from fastmerge.backends import cpu as fm_cpu
from fastmerge import _semantics as sem

from conftest import BACKENDS, make_models

FAST = [b for b in BACKENDS if b != "torch"]
# The Triton quantizers, in Triton's interpreter on CPU tensors where it runs (CI; on a GPU
# machine test_gpu.py runs them compiled): every check below that loops over QB / QFAST.
TRITON = ["triton"] if fastmerge.backends()["triton"].get("interpreter") else []
QB = BACKENDS + TRITON
QFAST = FAST + TRITON
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]


def weights(shape, dtype=torch.float32, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def assert_same(a, b):
    """Bit-identical quantizer outputs: Int4 dataclasses, (q, scale) pairs or tensors."""
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            assert_same(x, y)
        return
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), f"{(a != b).sum()} of {a.numel()} differ"
        return
    assert type(a) is type(b) and a.shape == b.shape
    for k in a.tensors():
        assert_same(a.tensors()[k], b.tensors()[k])


# ------------------------------------------------------------ references written from the spec

def spec_gptq_v1(w: torch.Tensor, G: int, sym: bool):
    """One group at a time, as documented: AutoGPTQ's Quantizer (min <= 0 <= max, all-zero group
    -> [-1, 1]), the scale rounded to fp16 before it is used, zero 0 -> (max / 14, 1) because v1
    stores zero - 1; then AutoGPTQ's pack: qweight[k // 8, n] |= q << 4 (k % 8), qzeros[g, n // 8]
    |= (zero - 1) << 4 (n % 8)."""
    out_f, in_f = w.shape
    x = w.float()
    q = np.zeros((out_f, in_f), dtype=np.int64)
    zeros = np.zeros((in_f // G, out_f), dtype=np.int64)
    scales = torch.zeros(in_f // G, out_f, dtype=torch.float16)

    def half(v):
        h = v.float().to(torch.float16)
        return torch.tensor(2.0 ** -24, dtype=torch.float16) if h == 0 else h

    for n in range(out_f):
        for g in range(in_f // G):
            grp = x[n, g * G:(g + 1) * G]
            mn, mx = grp.min(), grp.max()
            if sym:
                amax = torch.maximum(mn.abs(), mx.abs())
                if amax == 0:
                    amax = torch.tensor(1.0)
                s = half((amax + amax) / 15)
                z = 8.0
            else:
                lo, hi = torch.clamp(mn, max=0), torch.clamp(mx, min=0)
                if lo == hi:
                    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
                s = half((hi - lo) / 15)
                z = min(float(torch.round(-lo / s.float())), 15.0)
                if z == 0:
                    s, z = half(hi / 14), 1.0
            scales[g, n] = s
            zeros[g, n] = int(z)
            q[n, g * G:(g + 1) * G] = torch.clamp(torch.round(grp / s.float()) + z, 0, 15).numpy()
    qweight = np.zeros((in_f // 8, out_f), dtype=np.uint32)
    for k in range(in_f):
        qweight[k // 8] |= (q[:, k].astype(np.uint32) << np.uint32(4 * (k % 8)))
    qzeros = np.zeros((in_f // G, out_f // 8), dtype=np.uint32)
    for n in range(out_f):
        qzeros[:, n // 8] |= ((zeros[:, n] - 1).astype(np.uint32) & 0xF) << np.uint32(4 * (n % 8))
    return (torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32)), scales)


def gptq_v1_unpack(qweight, qzeros, scales, G):
    """AutoGPTQ / exllama v1 dequantization: w[n, k] = scale * (q - (stored zero + 1))."""
    qw = qweight.numpy().view(np.uint32)
    qz = qzeros.numpy().view(np.uint32)
    in_f, out_f = qw.shape[0] * 8, qw.shape[1]
    q = np.stack([(qw >> np.uint32(4 * j)) & 0xF for j in range(8)], axis=1).reshape(in_f, out_f)
    z = np.stack([(qz >> np.uint32(4 * j)) & 0xF for j in range(8)], axis=2).reshape(in_f // G, out_f) + 1
    g = np.arange(in_f) // G
    w = scales.float().numpy()[g] * (q.astype(np.float32) - z[g].astype(np.float32))
    return torch.from_numpy(w.T.copy())


def spec_torchao_int4(w: torch.Tensor, G: int, sym: bool):
    """mslk's int4_row_quantize_zp / int4_row_quantize and pack_int4 (torchao 0.18's
    Int4Tensor.from_hp), transcribed; scale and zero point cast to w's dtype."""
    to_quant = w.reshape(-1, G).to(torch.float)
    if sym:
        max_val = torch.abs(to_quant).amax(dim=-1, keepdim=True)
        scales = max_val.clamp(min=1e-6) / 8
        out = to_quant.div(scales).round().clamp_(-8, 7).to(torch.int8).reshape(w.shape)
        zeros = torch.zeros_like(scales)
    else:
        max_val = to_quant.amax(dim=1, keepdim=True)
        min_val = to_quant.amin(dim=1, keepdim=True)
        scales = (max_val - min_val).clamp(min=1e-6) / 15
        zeros = min_val + scales * 8
        out = to_quant.sub(min_val).div(scales).round().clamp_(0, 15)
        out = (out - 8).to(dtype=torch.int8).reshape(w.shape)
    scales = scales.view(w.shape[0], -1).t().contiguous()
    zeros = zeros.view(w.shape[0], -1).t().contiguous()
    low_x, high_x = out[:, ::2], out[:, 1::2]
    packed = torch.bitwise_or(torch.bitwise_and(low_x, 0xF), torch.bitwise_left_shift(high_x, 4))
    return packed.contiguous(), scales.to(w.dtype), zeros.to(w.dtype)


def spec_fp8(w: torch.Tensor, granularity: str, fmt: str, block=(128, 128)):
    """torchao's _choose_scale_float8 (amax / fmax in w's dtype, as fp32) with compressed-tensors'
    0 -> eps, and _quantize_affine_float8 (clamp, then torch's cast)."""
    dt = Q.FP8_DTYPES[fmt]
    fmax = torch.finfo(dt).max
    if granularity == "tensor":
        scale = (w.abs().amax() / fmax).float().reshape([1] * w.dim())
        full = scale
    elif granularity == "row":
        scale = (w.abs().amax(-1, keepdim=True) / fmax).float()
        full = scale
    else:
        br, bc = block
        nr, nc = -(-w.shape[0] // br), -(-w.shape[1] // bc)
        scale = torch.empty(nr, nc)
        full = torch.empty(w.shape)
        for i in range(nr):
            for j in range(nc):
                tile = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
                scale[i, j] = (tile.abs().amax() / fmax).float()
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(torch.float32).eps), scale)
    if granularity == "block":
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                full[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = scale[i, j]
    else:
        full = scale
    return (w.float() / full).clamp(-fmax, fmax).to(dt), scale


# ------------------------------------------------------------------------------------- INT4

INT4_SHAPES = [(8, 128), (24, 256), (64, 384), (136, 1024)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("layout", Q.LAYOUTS)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("G", Q.GROUP_SIZES)
def test_int4_backends_agree_bit_for_bit(dtype, layout, sym, G):
    for i, shape in enumerate(INT4_SHAPES):
        w = weights(shape, dtype, seed=i)
        ref = Q.quantize_int4(w, G, sym, layout, backend="torch")
        for b in QFAST:
            assert_same(Q.quantize_int4(w, G, sym, layout, backend=b), ref)


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("G", [32, 128])
def test_gptq_matches_the_spec_and_v1_unpack(sym, G):
    w = weights((16, 256), torch.float16, seed=3)
    w[0, :G] = 0  # an all-zero group: GPTQ's [-1, 1]
    w[1, :G] = w[1, :G].abs() + 0.01  # no negatives: zero 0, stored as (max / 14, zero 1)
    w[2, G:2 * G] = -w[2, G:2 * G].abs()  # no positives
    qweight, qzeros, scales = spec_gptq_v1(w, G, sym)
    for b in BACKENDS:
        p = Q.quantize_int4(w, G, sym, "gptq", backend=b)
        assert_same(p.qweight, qweight)
        assert_same(p.qzeros, qzeros)
        assert_same(p.scales, scales)
        assert p.qweight.shape == (256 // 8, 16) and p.qzeros.shape == (256 // G, 2)
        assert torch.equal(gptq_v1_unpack(p.qweight, p.qzeros, p.scales, G), p.dequantize(torch.float32))
    assert not torch.isnan(p.dequantize()).any()
    assert torch.equal(p.g_idx, torch.arange(256, dtype=torch.int32) // G)
    assert set(p.state_dict("layer.").keys()) == {"layer.qweight", "layer.qzeros", "layer.scales", "layer.g_idx"}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_torchao_layout_matches_mslk_quantizer(dtype, sym):
    w = weights((40, 256), dtype, seed=4)
    w[3, :64] = 0.0  # a constant group: scale clamps at 1e-6 / 15
    qdata, scale, zero = spec_torchao_int4(w, 64, sym)
    for b in BACKENDS:
        p = Q.quantize_int4(w, 64, sym, "torchao", backend=b)
        assert_same(p.qdata, qdata)
        assert_same(p.scale, scale)
        assert_same(p.zero_point, zero)


def test_torchao_dequantizes_our_int4_to_our_values():
    ao = pytest.importorskip("torchao.quantization.quant_primitives")
    from torchao.quantization import Int4Tensor

    for dtype in (torch.bfloat16, torch.float32):
        w = weights((32, 512), dtype, seed=5)
        p = Q.quantize_int4(w, 128, False, "torchao")
        t = p.to_torchao()
        assert isinstance(t, Int4Tensor) and t.shape == w.shape and t.block_size == [1, 128]
        # the nibbles as int4 values (even element low), then torchao's float-zero-point
        # dequantization (q - mid) * scale + zero with mid = 0 for the range [-8, 7]
        q = torch.stack([(p.qdata << 4) >> 4, p.qdata >> 4], -1).reshape(w.shape)
        ref = ao._dequantize_affine_tinygemm(q, [1, 128], p.scale.T.contiguous(), p.zero_point.T.contiguous(),
                                             torch.int8, -8, 7, output_dtype=torch.float32)
        assert torch.equal(ref, p.dequantize(torch.float32))


def test_int4_dtypes_shapes_and_round_trip_error():
    for dtype in DTYPES:
        w = weights((24, 256), dtype, seed=6)
        for layout in Q.LAYOUTS:
            p = Q.quantize_int4(w, 64, layout=layout)
            assert p.dtype == dtype and p.dequantize().dtype == dtype and p.dequantize().shape == w.shape
        p = Q.quantize_int4(w, 64, layout="gptq")
        assert (p.qweight.dtype, p.qzeros.dtype, p.scales.dtype) == (torch.int32, torch.int32, torch.float16)
        p = Q.quantize_int4(w, 64, layout="torchao")
        assert (p.qdata.dtype, p.scale.dtype, p.zero_point.dtype) == (torch.int8, dtype, dtype)
        assert p.qdata.shape == (24, 128) and p.scale.shape == (4, 24)
    # fp32 torchao: scale and zero exact, so every value is within half a step (no clamping:
    # min and max of each group are representable ends)
    w = weights((16, 256), seed=7)
    p = Q.quantize_int4(w, 32, layout="torchao")
    step = p.scale.T.repeat_interleave(32, 1)
    assert ((p.dequantize() - w).abs() <= step * (0.5 + 1e-5)).all()


SQNR_INT4 = {(32, False): 21.0, (64, False): 20.0, (128, False): 19.0,
             (32, True): 19.5, (64, True): 19.0, (128, True): 18.5}


@pytest.mark.parametrize("layout", Q.LAYOUTS)
def test_int4_sqnr_bounds(layout):
    w = weights((256, 1024), seed=8)
    for (G, sym), bound in SQNR_INT4.items():
        s = Q.sqnr(w, Q.quantize_int4(w, G, sym, layout).dequantize())
        assert bound <= s < bound + 3, (G, sym, s)


def test_int4_ties_with_the_reciprocal_shortcut():
    """The kernels multiply by 1/s and divide only near a rounding tie: values placed exactly on
    (and one ulp around) the ties k + 0.5 must still round as the division does."""
    g = torch.Generator().manual_seed(9)
    rows = []
    for _ in range(64):
        lo, hi = -float(torch.rand(1, generator=g)) * 0.1, float(torch.rand(1, generator=g)) * 0.1
        s = torch.tensor((hi - lo) / 15, dtype=torch.float32)
        k = torch.randint(0, 15, (126,), generator=g).float()
        x = torch.tensor(lo) + (k + 0.5) * s
        x = torch.where(torch.rand(126, generator=g) < 0.3, torch.nextafter(x, torch.tensor(1.0)), x)
        x = torch.where(torch.rand(126, generator=g) < 0.3, torch.nextafter(x, torch.tensor(-1.0)), x)
        rows.append(torch.cat([torch.tensor([lo, hi]), x]))
    w = torch.stack(rows)
    for layout in Q.LAYOUTS:
        for sym in (False, True):
            ref = Q.quantize_int4(w, 128, sym, layout, backend="torch")
            for b in QFAST:
                assert_same(Q.quantize_int4(w, 128, sym, layout, backend=b), ref)


def test_int4_edge_groups_on_every_backend():
    """Groups at the edges of each rule: all zero (GPTQ's [-1, 1]), no negatives (v1's zero of 0
    -> (max / 14, 1)), all negative, constant, -0.0, ranges below torchao's 1e-6 clamp, fp16
    scales that are subnormal or round to 0 (-> 2**-24), and one outlier per group."""
    g = torch.Generator().manual_seed(12)
    r = torch.randn(16, 32, generator=g)
    groups = [torch.zeros(32), r[0].abs(), -r[1].abs(), torch.full((32,), 0.37), torch.full((32,), -0.0),
              r[2] * 1e-8, r[3] * 3e-7, r[4] * 1e-5, r[5].abs() * 1e-7, torch.full((32,), -2.5e-8),
              torch.cat([torch.zeros(31), torch.tensor([5.0])]), torch.cat([r[6, :31] * 1e-3, torch.tensor([-900.0])]),
              r[7], r[8] * 100, r[9].clamp(min=0) - 0.001, r[10] * 1e4]
    w = torch.stack(groups)  # [16, 32]: every row one group of 32, or four rows' worth of 128
    w = torch.cat([w, w.flip(0)], 1).repeat(1, 2)  # [16, 128]
    for dtype in DTYPES:
        x = w.to(dtype)
        for layout in Q.LAYOUTS:
            for sym in (False, True):
                for G in (32, 128):
                    ref = Q.quantize_int4(x, G, sym, layout, backend="torch")
                    for b in QFAST:
                        assert_same(Q.quantize_int4(x, G, sym, layout, backend=b), ref)


def test_int4_noncontiguous_and_empty():
    w = weights((256, 64), torch.bfloat16, seed=10).T  # [64, 256], a transposed view
    assert not w.is_contiguous()
    for layout in Q.LAYOUTS:
        for b in QB:
            assert_same(Q.quantize_int4(w, 32, layout=layout, backend=b),
                        Q.quantize_int4(w.contiguous(), 32, layout=layout, backend="torch"))
    for shape in [(0, 128), (8, 0)]:
        for b in QB:
            p = Q.quantize_int4(torch.zeros(shape), 32, backend=b)
            assert p.qweight.shape == (shape[1] // 8, shape[0]) and p.dequantize().shape == shape


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in Triton's interpreter, on the inf/nan inputs
def test_int4_errors_name_the_argument():
    w = weights((16, 256))
    for bad in (48, 256, 0, -1, "128", 128.0, True):
        with pytest.raises(ValueError, match="group_size"):
            Q.quantize_int4(w, bad)
    with pytest.raises(ValueError, match="layout"):
        Q.quantize_int4(w, layout="awq")
    with pytest.raises(TypeError, match="symmetric"):
        Q.quantize_int4(w, symmetric=1)
    for bad in (w.double(), w.to(torch.int32), w.half().to(torch.float8_e4m3fn)):
        with pytest.raises(TypeError, match="w has dtype"):
            Q.quantize_int4(bad)
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        Q.quantize_int4(w.numpy())
    for shape in [(256,), (2, 16, 256), ()]:
        with pytest.raises(ValueError, match="w must be a 2-D weight"):
            Q.quantize_int4(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"w.shape\[1\] \(in_features\) = 200 is not a multiple of group_size=64"):
        Q.quantize_int4(torch.zeros(16, 200), 64)
    with pytest.raises(ValueError, match=r"w.shape\[0\] \(out_features\) = 12 is not a multiple of 8"):
        Q.quantize_int4(torch.zeros(12, 128), layout="gptq")
    Q.quantize_int4(torch.zeros(12, 128), layout="torchao")  # torchao has no such constraint
    for b in QB:
        for value in (float("inf"), float("-inf"), float("nan")):
            # first / last element, and each of the two interleaved vectors of a group's scan
            for pos in [(0, 0), (15, 255), (7, 100), (5, 137), (9, 250)]:
                x = w.clone()
                x[pos] = value
                for layout in Q.LAYOUTS:
                    for gs in (32, 128):
                        with pytest.raises(fastmerge.NonFiniteError, match="^w contains non-finite"):
                            Q.quantize_int4(x, gs, layout=layout, backend=b)
        with pytest.raises(ValueError, match="fp16 scale"):
            Q.quantize_int4(torch.full((8, 128), 2e6).index_fill_(1, torch.tensor([0]), -2e6), backend=b)


# -------------------------------------------------------------------------------------- FP8

FP8_CASES = [("tensor", (7, 13)), ("tensor", (300,)), ("tensor", (2, 3, 40)), ("row", (1, 1)),
             ("row", (33, 257)), ("row", (5, 2, 70)), ("row", (129,)), ("block", (130, 257)),
             ("block", (256, 128)), ("block", (1, 5)),
             # several per-tensor cells (16384 values each in Triton), rows and blocks in several chunks
             ("tensor", (3, 7001)), ("row", (2, 3001)), ("block", (40, 300))]


@pytest.mark.parametrize("fmt", list(Q.FP8_DTYPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_fp8_matches_spec_on_every_backend(fmt, dtype):
    for i, (gran, shape) in enumerate(FP8_CASES):
        w = weights(shape, dtype, seed=20 + i)
        ref = spec_fp8(w, gran, fmt)
        for b in QB:
            q, s = Q.quantize_fp8(w, gran, fmt, backend=b)
            assert_same((q, s), ref)
            assert s.shape == Q.fp8_scale_shape(tuple(shape), gran)
            assert Q.dequantize_fp8(q, s, dtype).shape == w.shape


@pytest.mark.parametrize("fmt", list(Q.FP8_DTYPES))
def test_fp8_encoder_at_every_rounding_tie_and_subnormal(fmt):
    """scale = amax / fmax = 1 exactly: the codes are torch's casts of the inputs themselves, at
    every midpoint between neighbouring fp8 values, one ulp either side, and the subnormals."""
    dt = Q.FP8_DTYPES[fmt]
    fmax = torch.finfo(dt).max
    vals = torch.arange(256, dtype=torch.uint8).view(dt).float()
    vals = vals[torch.isfinite(vals)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([vals, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                   torch.tensor([-0.0, 1e-30, -1e-30])])
    x = x[x.abs() <= fmax]
    w = torch.cat([x, torch.tensor([fmax])]).reshape(1, -1)  # amax = fmax: scale 1
    for b in QB:
        q, s = Q.quantize_fp8(w, "row", fmt, backend=b)
        assert s.item() == 1.0
        assert_same(q, w.to(dt))


@pytest.mark.parametrize("gran", ["tensor", "row", "block"])
def test_torchao_float8_tensor_gives_our_codes_and_values(gran):
    pytest.importorskip("torchao")
    from torchao.quantization import Float8Tensor, PerBlock, PerRow, PerTensor

    granularity = {"tensor": PerTensor(), "row": PerRow(), "block": PerBlock([128, 128])}[gran]
    for dtype in (torch.bfloat16, torch.float32):
        w = weights((256, 384), dtype, seed=30)
        t = Float8Tensor.from_hp(w, granularity=granularity)
        q, s = Q.quantize_fp8(w, gran)
        assert_same((q, s), (t.qdata, t.scale.reshape(s.shape)))
        ours = Float8Tensor(q, s, block_size=t.block_size, dtype=dtype)
        assert torch.equal(ours.dequantize(torch.float32), Q.dequantize_fp8(q, s))


def test_fp8_sqnr_zero_tiles_and_saturation():
    w = weights((256, 512), seed=31)
    for gran in Q.GRANULARITIES:
        assert Q.sqnr(w, Q.dequantize_fp8(*Q.quantize_fp8(w, gran, "e4m3fn"))) > 30
        assert Q.sqnr(w, Q.dequantize_fp8(*Q.quantize_fp8(w, gran, "e5m2"))) > 24
    z = torch.zeros(4, 256)
    for b in QB:
        q, s = Q.quantize_fp8(z, "row", backend=b)
        assert torch.equal(s, torch.full((4, 1), torch.finfo(torch.float32).eps))
        assert torch.equal(Q.dequantize_fp8(q, s), z)
    big = torch.tensor([[1.0, -448.0, 447.9]])
    for b in QB:  # x / s just above fmax must saturate, never become nan
        q, s = Q.quantize_fp8(big * 1.0000001, "tensor", backend=b)
        assert torch.isfinite(q.float()).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in Triton's interpreter, on the inf/nan inputs
def test_fp8_errors_name_the_argument():
    w = weights((8, 8))
    with pytest.raises(ValueError, match="granularity"):
        Q.quantize_fp8(w, "col")
    with pytest.raises(ValueError, match="fmt"):
        Q.quantize_fp8(w, fmt="e4m3")
    for blk in [(128,), (0, 128), (1.5, 2), "128"]:
        with pytest.raises(ValueError, match="block"):
            Q.quantize_fp8(w, "block", block=blk)
    with pytest.raises(ValueError, match="w is 0-d"):
        Q.quantize_fp8(torch.tensor(1.0))
    with pytest.raises(ValueError, match="2-D for granularity='block'"):
        Q.quantize_fp8(torch.zeros(8), "block")
    with pytest.raises(TypeError, match="w has dtype"):
        Q.quantize_fp8(w.double())
    for b in QB:
        for gran in Q.GRANULARITIES:
            x = w.clone()
            x[3, 4] = float("nan")
            with pytest.raises(fastmerge.NonFiniteError, match="^w contains"):
                Q.quantize_fp8(x, gran, backend=b)
    q, s = Q.quantize_fp8(w, "row")
    with pytest.raises(ValueError, match="scale has shape"):
        Q.dequantize_fp8(q, torch.ones(3, 1))
    with pytest.raises(TypeError, match="q must be"):
        Q.dequantize_fp8(w, s)


def test_fp8_empty():
    for shape, gran in [((0, 5), "row"), ((5, 0), "row"), ((0, 5), "block"), ((0,), "tensor")]:
        for b in QB:
            q, s = Q.quantize_fp8(torch.zeros(shape), gran, backend=b)
            assert q.shape == shape and s.shape == Q.fp8_scale_shape(shape, gran)


# ---------------------------------------------------------------------- fused merge->quantize

FP8_FUSED = [Q.FP8Config("row"), Q.FP8Config("row", "e5m2"), Q.FP8Config("block", block=(16, 96)),
             Q.FP8Config("tensor")]
# rows of 416 columns start inside the 64-element words of bit masks, rows of 331 inside the
# 4-element Philox counters: the fused kernels' masks must cope with both
FUSED_CASES = [((48, 416), [Q.Int4Config(32), Q.Int4Config(32, True, "torchao")] + FP8_FUSED),
               ((40, 331), FP8_FUSED[:2]),
               ((64, 384), [Q.Int4Config(64), Q.Int4Config(128, True), Q.Int4Config(128, False, "torchao")])]
FUSED_METHODS = [("task_arithmetic", {}), ("linear", {}), ("ties", dict(density=0.3)),
                 ("dare_ties", dict(density=0.4, seed=3)), ("dare_linear", dict(density=0.5, seed=1)),
                 ("della", dict(density=0.4, epsilon=0.1, seed=2)), ("breadcrumbs", dict(density=0.5, gamma=0.05)),
                 ("task_arithmetic", dict(weights=[0.5, 1.0, -0.25], lam=0.7))]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_fused_equals_merge_then_quantize(dtype):
    for shape, configs in FUSED_CASES:
        base, models = make_models(shape, K=3, dtype=dtype, seed=40, scale=0.01)
        for method, kw in FUSED_METHODS:
            b = None if method == "linear" else base
            merged = fastmerge.merge(method, b, models, backend="torch", **kw)
            for cfg in configs:
                want = Q.quantize(merged, cfg, backend="torch")
                for be in BACKENDS:
                    assert_same(fastmerge.merge(method, b, models, quantize=cfg, backend=be, **kw), want)


@pytest.mark.skipif(not TRITON, reason="Triton's interpreter runs only without CUDA (test_gpu.py covers GPUs)")
def test_triton_fused_int4_equals_merge_then_quantize():
    """The Triton merge->INT4 kernel (the merged tile never stored) against the reference merge
    quantized; the interpreter is slow, so the dtypes, configs and shapes rotate over the
    methods. Rows past the last full tile, inputs read with strides, and K = 5."""
    cases = [((48, 416), Q.Int4Config(32)), ((40, 384), Q.Int4Config(128, True)),
             ((24, 256), Q.Int4Config(64, False, "torchao")), ((13, 128), Q.Int4Config(32, True, "torchao"))]
    for j, (method, kw) in enumerate(FUSED_METHODS + [("ties", dict(density=0.5, rescale="l2")),
                                                      ("dare_linear", dict(density=0.3, seed=4, lam=0.5))]):
        dtype = DTYPES[j % 3]
        shape, cfg = cases[j % len(cases)]
        base, models = make_models(shape, K=3, dtype=dtype, seed=50 + j, scale=0.01)
        b = None if method == "linear" else base
        for out in (dtype, torch.float32 if dtype != torch.float32 else torch.bfloat16):
            want = Q.quantize(fastmerge.merge(method, b, models, backend="torch", out_dtype=out, **kw), cfg,
                              backend="torch")
            got = fastmerge.merge(method, b, models, quantize=cfg, backend="triton", out_dtype=out, **kw)
            assert_same(got, want)
    base, models = make_models((128, 64), K=5, dtype=torch.bfloat16, seed=60, scale=0.01)
    base, models = base.T, [m.T for m in models]  # [64, 128] views: read in place with strides
    for cfg in (Q.Int4Config(32), Q.Int4Config(64, False, "torchao")):
        want = Q.quantize(fastmerge.ties(base, models, density=0.4, backend="torch"), cfg, backend="torch")
        assert_same(fastmerge.ties(base, models, density=0.4, quantize=cfg, backend="triton"), want)
    # FP8 on the GPU backends: merge, then the Triton quantizer
    want = Q.quantize(fastmerge.task_arithmetic(base, models, backend="torch"), Q.FP8Config("row"), backend="torch")
    assert_same(fastmerge.task_arithmetic(base, models, quantize=Q.FP8Config("row"), backend="triton"), want)


@pytest.mark.skipif(not TRITON, reason="Triton's interpreter runs only without CUDA (test_gpu.py covers GPUs)")
def test_gpu_bench_rows_time_what_quantize_computes():
    """bench/quant.py on a GPU times the Triton launches alone (no flag sync): those launches
    must produce the quantizer's output, and the rows must carry GB/s and % of copy."""
    from fastmerge.cli import _bench_module

    bq = _bench_module("quant")
    w = weights((16, 256), torch.bfloat16, seed=70)
    for _, _, cfg in bq.QUANTIZERS:
        got = bq.kernel_launch(w, cfg)()
        want = Q.quantize(w, cfg, backend="torch")
        assert_same(tuple(got.values()) if isinstance(got, dict) else tuple(got),
                    tuple(want.tensors().values()) if isinstance(want, Q.GPTQInt4 | Q.TorchAOInt4) else want)
    b = bq.Bench("cpu", True, api="quant", log=lambda *_: None)

    def once(fn, slow):  # every timed function runs (and must not fail); 1 ms per call
        fn()
        return [1e-3]

    b.time = once
    bq.bench_quantizers(b, w, fast="triton")
    assert [r["backend"] for r in b.rows[:3]] == ["torch (gptq g128)", "triton (gptq g128)",
                                                  "triton kernel (gptq g128)"]
    assert all(r["pct_of_copy_bw"] > 0 and r["bytes"] > w.numel() * 2 for r in b.rows)


def test_fused_out_dtype_aliases_and_native_paths():
    base, models = make_models((64, 256), K=2, dtype=torch.bfloat16, seed=41)
    for out in (torch.float32, torch.float16):
        cfg = Q.Int4Config(64, layout="torchao")
        want = Q.quantize(fastmerge.task_arithmetic(base, models, out_dtype=out), cfg)
        got = Q.merge_quantize("task_arithmetic", base, models, quantize=cfg, out_dtype=out)
        assert_same(got, want)
        assert got.scale.dtype == out
    assert_same(fastmerge.ties(base, models, density=0.5, quantize="int4"),
                Q.quantize(fastmerge.ties(base, models, density=0.5), Q.Int4Config()))
    assert_same(fastmerge.merge("tsv", base, models, quantize="fp8", seed=0),
                Q.quantize(fastmerge.merge("tsv", base, models, seed=0), Q.FP8Config()))
    # the native fused kernel also takes per-tensor and block FP8 (run unfused by default)
    plan = sem.Plan(masks=[sem.MaskSpec("none")] * 2, weights=[1.0, 0.5])
    for cfg in (Q.FP8Config("tensor"), Q.FP8Config("block", block=(16, 100))):
        if "cpu" in FAST:
            got = fm_cpu.fused_merge_quantize(plan, base, models, torch.bfloat16, cfg)
            assert_same(got, Q.quantize(fm_cpu.run_plan(plan, base, models, torch.bfloat16), cfg))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in Triton's interpreter, on the inf/nan inputs
def test_fused_errors():
    base, models = make_models((16, 256), K=2, seed=42)
    with pytest.raises(ValueError, match="quantize must be"):
        fastmerge.merge("ties", base, models, quantize="int8")
    b0, m0 = make_models((12, 256), K=2, seed=45)
    with pytest.raises(ValueError, match=r"base.shape\[0\] \(out_features\) = 12 is not a multiple of 8"):
        fastmerge.merge("ties", b0, m0, quantize="int4")
    b1, m1 = make_models((300,), K=2, seed=43)
    with pytest.raises(ValueError, match="base must be a 2-D weight"):
        fastmerge.merge("task_arithmetic", b1, m1, quantize="int4")
    with pytest.raises(ValueError, match=r"models\[0\].shape\[1\] \(in_features\) = 300"):
        fastmerge.merge("linear", None, [x.reshape(1, 300) for x in m1], quantize="int4")
    for be in QB:
        for method in ("task_arithmetic", "ties"):
            bad = [m.clone() for m in models]
            bad[1][5, 7] = float("inf")
            with pytest.raises(fastmerge.NonFiniteError, match=r"^models\[1\]"):
                fastmerge.merge(method, base, bad, quantize="int4", backend=be)
            nb = base.clone()
            nb[0, 0] = float("nan")
            with pytest.raises(fastmerge.NonFiniteError, match="^base"):
                fastmerge.merge(method, nb, models, quantize=Q.FP8Config("row"), backend=be)
        # finite inputs whose merge overflows the fp16 output
        big = [torch.full((8, 128), 40000.0), torch.full((8, 128), 40000.0)]
        with pytest.raises(fastmerge.NonFiniteError, match="merged tensor"):
            fastmerge.linear(None, big, normalize=False, out_dtype=torch.float16, quantize="int4", backend=be)


def test_merge_without_quantize_still_checks_every_input():
    """The mask-free merge checks its result, not each input, and names the input on error."""
    base, models = make_models((40, 70), K=3, seed=44)
    for be in BACKENDS:
        for who in range(4):
            bad = [m.clone() for m in models]
            b = base.clone()
            (b if who == 3 else bad[who])[1, 2] = float("nan") if who % 2 else float("-inf")
            name = "base" if who == 3 else f"models\\[{who}\\]"
            with pytest.raises(fastmerge.NonFiniteError, match=f"^{name}"):
                fastmerge.task_arithmetic(b, bad, weights=[1.0, 0.0, 2.0], backend=be)
        big = [torch.full((3, 3), 3e38), torch.full((3, 3), 3e38)]
        with pytest.raises(fastmerge.NonFiniteError, match="overflows"):  # finite inputs, inf sum (issue 16)
            fastmerge.linear(None, big, normalize=False, backend=be)


# ------------------------------------------------------------------------- delta compression

def test_pack_bits_is_numpy_little_endian():
    g = torch.Generator().manual_seed(50)
    for n in (1, 7, 8, 9, 1000):
        b = torch.rand(n, generator=g) < 0.5
        p = Q.pack_bits(b)
        assert np.array_equal(p.numpy(), np.packbits(b.numpy(), bitorder="little"))
        assert torch.equal(Q.unpack_bits(p, n), b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_delta_compression_round_trips(dtype):
    base, (ft,) = make_models((128, 512), K=1, dtype=dtype, seed=51, scale=0.01)
    delta = ft.float() - base.float()
    bits = 16 if dtype == torch.bfloat16 else 32
    expect = {"bitdelta": (4.0, 5.0, bits * 0.99), "ternary": (2.0, 4.0, bits / 1.1 * 0.99),
              "int4": (18.5, 21.5, bits / 4.5), "fp8": (24.0, 33.0, bits / 8.1)}
    for method, (lo, hi, min_ratio) in expect.items():
        for be in BACKENDS:
            c = Q.compress_delta(base, ft, method, backend=be)
            assert c.method == method and c.shape == tuple(base.shape) and c.dtype == dtype
            d = Q.decompress_delta(c, torch.float32)
            assert lo < Q.sqnr(delta, d) < hi, (method, Q.sqnr(delta, d))
            assert c.ratio >= min_ratio, (method, c.ratio)
            assert torch.equal(Q.apply_delta(base, c), (base.float() + d).to(dtype))
    c = Q.compress_delta(base, ft, "bitdelta")
    assert torch.equal(Q.decompress_delta(c, torch.float32),
                       torch.where(delta >= 0, 1.0, -1.0) * delta.abs().mean())
    c = Q.compress_delta(base, ft, "int4", group_size=64)
    assert_same(Q.TorchAOInt4(**c.data, shape=c.shape, group_size=64, dtype=dtype),
                Q.quantize_int4((ft.float() - base.float()).to(dtype), 64, layout="torchao"))
    q, s = Q.quantize_fp8((ft.float() - base.float()).to(dtype), "row")
    c = Q.compress_delta(base, ft, "fp8")
    assert_same((c.data["q"], c.data["scale"]), (q, s))


def test_ternary_keeps_exactly_k_with_ties_to_lowest_index():
    base = torch.zeros(100)
    ft = torch.zeros(100)
    ft[[3, 10, 20, 30, 40]] = torch.tensor([0.5, -0.2, 0.2, -0.2, 0.1])
    for be in BACKENDS:
        c = Q.compress_delta(base, ft, "ternary", density=0.03, backend=be)  # k = 3
        d = Q.decompress_delta(c)
        assert c.params["k"] == 3
        assert torch.nonzero(d).flatten().tolist() == [3, 10, 20]
        s = (0.5 + 0.2 + 0.2) / 3
        assert torch.allclose(d[[3, 10, 20]], torch.tensor([s, -s, s]))
    assert Q.compress_delta(base, ft, "ternary", density=0.0).params["k"] == 0
    assert torch.equal(Q.decompress_delta(Q.compress_delta(base, ft, "ternary", density=0.0)), base)


def test_delta_errors_and_shapes():
    base, (ft,) = make_models((16, 96), K=1, seed=52)
    with pytest.raises(ValueError, match="method"):
        Q.compress_delta(base, ft, "svd")
    with pytest.raises(ValueError, match="finetuned has shape"):
        Q.compress_delta(base, ft[:8])
    with pytest.raises(TypeError, match="finetuned has dtype"):
        Q.compress_delta(base, ft.half())
    with pytest.raises(ValueError, match=r"finetuned.shape\[1\] \(in_features\) = 96 is not a multiple of group_size=64"):
        Q.compress_delta(base, ft, "int4", group_size=64)
    with pytest.raises(ValueError, match="density"):
        Q.compress_delta(base, ft, "ternary", density=1.5)
    for be in BACKENDS:
        bad = ft.clone()
        bad[2, 3] = float("nan")
        for method in Q.DELTA_METHODS:
            with pytest.raises(fastmerge.NonFiniteError, match="^finetuned"):
                Q.compress_delta(base, bad, method, group_size=32, backend=be)
    for shape in [(7,), (3, 5, 2), (0, 4)]:  # bitdelta / ternary / fp8 take any shape
        b0 = torch.zeros(shape)
        f0 = torch.randn(shape) if b0.numel() else b0
        for method, kw in (("bitdelta", {}), ("ternary", {}), ("fp8", {"granularity": "tensor"})):
            c = Q.compress_delta(b0, f0, method, **kw)
            assert Q.apply_delta(b0, c).shape == b0.shape
    with pytest.raises(ValueError, match="base has shape"):
        Q.apply_delta(torch.zeros(3), Q.compress_delta(base, ft))
