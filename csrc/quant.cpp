// Weight quantizers and the fused merge -> quantize (C++17 + OpenMP, no libtorch).
//
// Formats and the torch reference that defines them: fastmerge/quant.py. In short, for a
// weight [rows = out features, cols = in features]:
//   INT4 GPTQ v1   : groups of G along cols; fp16 scale; integer zero stored as zero - 1;
//                    q = clamp(round(x / s) + z, 0, 15); qweight packs 8 codes of one row
//                    (consecutive k) into an int32 of column n, element k at bits 4 (k % 8).
//   INT4 torchao   : torchao's plain Int4Tensor (mslk's int4_row_quantize_zp + pack_int4):
//                    q = clamp(round((x - min) / s), 0, 15) - 8, float zero = min + 8 s,
//                    two codes per byte along cols, the even element in the low nibble.
//   FP8            : s = amax / fmax (in the weight's dtype, stored fp32), q = fp8(clamp(x / s,
//                    -fmax, fmax)), per tensor, row or block.
// Rounding is round-half-to-even everywhere, and every float operation is the reference's,
// in the same order (no FMA: -ffp-contract=off), so the codes and scales agree bit for bit.
//
// The quantizers walk the weight in tiles whose values come from a producer: a Loader reads
// them from a tensor (quantize), a Merger computes them with the fused merge of kernels.cpp
// (fused_merge_quantize), so the merged tensor is never written and read back.
#include "common.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>

namespace fm {
namespace {

// round half to even for |v| < 2^22 (every quantizer argument here lies within +-16.5)
constexpr float RNE_MAGIC = 12582912.0f;  // 1.5 * 2^23
inline float rne(float v) { return (v + RNE_MAGIC) - RNE_MAGIC; }

inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Round fp32 values to dtype dt and back (the merge's output rounding, kept in registers).
inline void round_to(int dt, float* __restrict v, int n) {
    if (dt == BF16) {
        for (int j = 0; j < n; ++j) v[j] = bf16_to_float(float_to_bf16(v[j]));
    } else if (dt == F16) {
        int j = 0;
#ifdef __F16C__
        for (; j + 8 <= n; j += 8)
            _mm256_storeu_ps(v + j, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(v + j), _MM_FROUND_TO_NEAREST_INT)));
#endif
        for (; j < n; ++j) v[j] = half_to_float(float_to_half(v[j]));
    }
}

inline void store_one(uint64_t p, int dt, int64_t i, float v) {
    if (dt == F32) ((float*)p)[i] = v;
    else if (dt == BF16) ((uint16_t*)p)[i] = float_to_bf16(v);
    else ((uint16_t*)p)[i] = float_to_half(v);
}

inline uint32_t nonfinite_any(const float* v, int n) {
    uint32_t f = 0;
    for (int j = 0; j < n; ++j) f |= nonfinite_bits(v[j]);
    return f;
}

inline void min_max(const float* __restrict x, int n, float& mn, float& mx) {
    float a = x[0], b = x[0];
    for (int j = 1; j < n; ++j) {
        a = x[j] < a ? x[j] : a;
        b = x[j] > b ? x[j] : b;
    }
    mn = a;
    mx = b;
}

// ---- producers: fill dst[0..len) with the weight's values at row r, columns c0.. ----------
struct Loader {
    const void* src;
    int dt;
    int64_t cols;
    uint32_t nonfinite = 0;
    void operator()(int64_t r, int64_t c0, int len, float* dst) {
        load_block(src, dt, r * cols + c0, len, dst);
        nonfinite |= nonfinite_any(dst, len);
    }
    void flags_into(std::vector<int>& f) const { f[0] |= (int)nonfinite; }
};

struct Merger {
    MergeBlock mb;
    int out_dt;  // the merge's output dtype: merge(...) then quantize gives the same codes
    int64_t cols;
    uint32_t nonfinite = 0;
    void operator()(int64_t r, int64_t c0, int len, float* dst) {
        mb.run(r * cols + c0, len, dst);
        round_to(out_dt, dst, len);
        nonfinite |= nonfinite_any(dst, len);
    }
    void flags_into(std::vector<int>& f) const {
        for (size_t m = 0; m < mb.bad.size(); ++m) f[m] |= mb.bad[m];
        f[mb.bad.size()] |= (int)nonfinite;
    }
};

// ---- INT4 groups -------------------------------------------------------------------------
// fp16 scale bits: 0 becomes the smallest subnormal (a group of tiny values must not divide
// by zero); inf is reported (values beyond 15 * 65504 do not fit GPTQ's fp16 scales).
inline uint16_t half_scale(float s, uint32_t& overflow) {
    uint16_t h = float_to_half(s);
    if ((h & 0x7fffu) == 0) h = 1;
    overflow |= (uint32_t)((h & 0x7c00u) == 0x7c00u);
    return h;
}

// GPTQ v1 (AutoGPTQ's quantizer with min <= 0 <= max): codes c in 0..15, returns zero z (1..15).
inline int gptq_group(const float* __restrict x, int G, bool sym, uint8_t* __restrict c, uint16_t& sh,
                      uint32_t& overflow) {
    float mn, mx;
    min_max(x, G, mn, mx);
    float sf, zf;
    if (sym) {
        float amax = std::max(std::fabs(mn), std::fabs(mx));
        if (amax == 0.0f) amax = 1.0f;
        sh = half_scale((amax + amax) / 15.0f, overflow);
        sf = half_to_float(sh);
        zf = 8.0f;
    } else {
        float lo = mn < 0.0f ? mn : 0.0f, hi = mx > 0.0f ? mx : 0.0f;
        if (lo == hi) { lo = -1.0f; hi = 1.0f; }
        sh = half_scale((hi - lo) / 15.0f, overflow);
        sf = half_to_float(sh);
        zf = std::min(rne(-lo / sf), 15.0f);
        if (zf == 0.0f) {  // v1 stores zero - 1: zero 0 is not representable
            sh = half_scale(hi / 14.0f, overflow);
            sf = half_to_float(sh);
            zf = 1.0f;
        }
    }
    for (int j = 0; j < G; ++j) c[j] = (uint8_t)(int)clampf(rne(x[j] / sf) + zf, 0.0f, 15.0f);
    return (int)zf;
}

// torchao plain int4: codes c = q + 8 in 0..15 (stored as the nibble of q, i.e. c ^ 8).
inline void torchao_group(const float* __restrict x, int G, bool sym, uint8_t* __restrict c, float& s,
                          float& zp) {
    float mn, mx;
    min_max(x, G, mn, mx);
    if (sym) {
        const float amax = std::max(std::fabs(mn), std::fabs(mx));
        s = (amax < 1e-6f ? 1e-6f : amax) / 8.0f;
        zp = 0.0f;
        for (int j = 0; j < G; ++j) c[j] = (uint8_t)((int)clampf(rne(x[j] / s), -8.0f, 7.0f) + 8);
    } else {
        const float range = mx - mn;
        s = (range < 1e-6f ? 1e-6f : range) / 15.0f;
        zp = mn + s * 8.0f;
        for (int j = 0; j < G; ++j) c[j] = (uint8_t)(int)clampf(rne((x[j] - mn) / s), 0.0f, 15.0f);
    }
}

// Tiles of 8 rows x BLK columns: the transposed outputs (GPTQ's qweight, every scale) are
// written 8 consecutive entries at a time.
constexpr int TR = 8;

template <class Make>
void int4_run(const QuantArgs& q, int nt, Make make, std::vector<int>& flags) {
    const int64_t R = q.rows, C = q.cols;
    const int G = q.group;
    const int64_t tiles = (R + TR - 1) / TR;
    nt = (int)std::max<int64_t>(1, std::min<int64_t>(nt, tiles));
    const bool gptq = q.kind == Q_INT4_GPTQ;
#pragma omp parallel num_threads(nt)
    {
        auto prod = make();
        alignas(64) float buf[TR][BLK];
        alignas(64) uint8_t code[TR][BLK];
        uint32_t overflow = 0;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t r0 = t * TR;
            const int tr = (int)std::min<int64_t>(TR, R - r0);
            for (int64_t c0 = 0; c0 < C; c0 += BLK) {
                const int len = (int)std::min<int64_t>(BLK, C - c0);  // a multiple of G
                for (int r = 0; r < tr; ++r) prod(r0 + r, c0, len, buf[r]);
                for (int gi = 0; gi < len / G; ++gi) {
                    const int64_t g = c0 / G + gi;
                    uint32_t zword = 0;
                    for (int r = 0; r < tr; ++r) {
                        const float* x = buf[r] + gi * G;
                        uint8_t* c = code[r] + gi * G;
                        if (gptq) {
                            uint16_t sh;
                            const int z = gptq_group(x, G, q.sym, c, sh, overflow);
                            ((uint16_t*)q.out2)[g * R + r0 + r] = sh;
                            zword |= (uint32_t)((z - 1) & 0xF) << (4 * r);
                        } else {
                            float s, zp;
                            torchao_group(x, G, q.sym, c, s, zp);
                            store_one(q.out1, q.value_dt, g * R + r0 + r, s);
                            store_one(q.out2, q.value_dt, g * R + r0 + r, zp);
                        }
                    }
                    if (gptq) ((uint32_t*)q.out1)[g * (R / 8) + r0 / 8] = zword;
                }
                if (gptq) {
                    uint32_t* qw = (uint32_t*)q.out0;
                    for (int k8 = 0; k8 < len / 8; ++k8) {
                        uint32_t* dst = qw + (c0 / 8 + k8) * R + r0;
                        for (int r = 0; r < tr; ++r) {
                            const uint8_t* c = code[r] + 8 * k8;
                            dst[r] = (uint32_t)c[0] | (uint32_t)c[1] << 4 | (uint32_t)c[2] << 8 |
                                     (uint32_t)c[3] << 12 | (uint32_t)c[4] << 16 | (uint32_t)c[5] << 20 |
                                     (uint32_t)c[6] << 24 | (uint32_t)c[7] << 28;
                        }
                    }
                } else {
                    for (int r = 0; r < tr; ++r) {
                        uint8_t* dst = (uint8_t*)q.out0 + (r0 + r) * (C / 2) + c0 / 2;
                        const uint8_t* c = code[r];
                        for (int k2 = 0; k2 < len / 2; ++k2)
                            dst[k2] = (uint8_t)((c[2 * k2] ^ 8u) | ((c[2 * k2 + 1] ^ 8u) << 4));
                    }
                }
            }
        }
#pragma omp critical
        {
            prod.flags_into(flags);
            flags.back() |= (int)overflow;
        }
    }
}

// ---- FP8 -------------------------------------------------------------------------------------
// fp32 -> fp8 with MB mantissa bits and exponent bias BIAS, round to nearest even; |x| must not
// exceed the format's max (the caller clamps: eager casts do not saturate). Bit-exact with
// torch's cast (c10's fp8 conversions).
template <int MB, int BIAS>
inline uint8_t fp8_encode(float x) {
    uint32_t u = f2u(x);
    const uint32_t sign = (u >> 24) & 0x80u;
    u &= 0x7fffffffu;
    uint32_t code;
    if (u < ((uint32_t)(127 + 1 - BIAS) << 23)) {
        // zero or subnormal: a multiple of 2^(1 - BIAS - MB); scale by the inverse (exact) and
        // let the FPU round to an integer
        constexpr float up = (float)(1u << (BIAS - 1 + MB));
        code = (uint32_t)rne(u2f(u) * up);
    } else {
        const uint32_t odd = (u >> (23 - MB)) & 1u;
        code = ((u + ((1u << (22 - MB)) - 1u) + odd) >> (23 - MB)) - ((uint32_t)(127 - BIAS) << MB);
    }
    return (uint8_t)(sign | code);
}

inline float fp8_max(int fmt) { return fmt == 0 ? 448.0f : 57344.0f; }

// A dequant scale amax / fmax evaluated in the weight's dtype dt (torchao and compressed-tensors
// divide in the weight's dtype: a bf16 weight gets a bf16-valued scale), stored as fp32. 0 (an
// all-zero tile) becomes fp32 epsilon, as compressed-tensors does, so the codes are zeros, not 0/0.
inline float fp8_scale(float amax, float fmax, int dt) {
    float s = amax / fmax;
    round_to(dt, &s, 1);
    return s == 0.0f ? 1.1920928955078125e-07f : s;
}

inline void fp8_encode_block(const float* __restrict x, int n, float s, int fmt, uint8_t* __restrict out) {
    const float fmax = fp8_max(fmt);
    if (fmt == 0)
        for (int j = 0; j < n; ++j) out[j] = fp8_encode<3, 7>(clampf(x[j] / s, -fmax, fmax));
    else
        for (int j = 0; j < n; ++j) out[j] = fp8_encode<2, 15>(clampf(x[j] / s, -fmax, fmax));
}

inline float amax_of(const float* __restrict x, int n) {
    float a = 0.0f;
    for (int j = 0; j < n; ++j) {
        const float v = std::fabs(x[j]);
        a = v > a ? v : a;
    }
    return a;
}

template <class Make>
void fp8_run(const QuantArgs& q, int nt, Make make, std::vector<int>& flags) {
    const int64_t R = q.rows, C = q.cols;
    const float fmax = fp8_max(q.fmt);
    uint8_t* out = (uint8_t*)q.out0;
    float* scales = (float*)q.out1;
    if (q.gran == G_TENSOR) {
        // two passes: the amax of everything, then the codes (a Merger merges twice)
        const int64_t cpr = (C + BLK - 1) / BLK;  // chunks per row
        const int64_t chunks = R * cpr;
        nt = (int)std::max<int64_t>(1, std::min<int64_t>(nt, chunks));
        float amax = 0.0f;
#pragma omp parallel num_threads(nt)
        {
            auto prod = make();
            alignas(64) float buf[BLK];
            float a = 0.0f;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < chunks; ++t) {
                const int64_t r = t / cpr, c0 = (t % cpr) * BLK;
                const int len = (int)std::min<int64_t>(BLK, C - c0);
                prod(r, c0, len, buf);
                a = std::max(a, amax_of(buf, len));
            }
#pragma omp critical
            {
                amax = std::max(amax, a);
                prod.flags_into(flags);
            }
        }
        const float s = fp8_scale(amax, fmax, q.value_dt);
        scales[0] = s;
#pragma omp parallel num_threads(nt)
        {
            auto prod = make();
            alignas(64) float buf[BLK];
#pragma omp for schedule(static)
            for (int64_t t = 0; t < chunks; ++t) {
                const int64_t r = t / cpr, c0 = (t % cpr) * BLK;
                const int len = (int)std::min<int64_t>(BLK, C - c0);
                prod(r, c0, len, buf);
                fp8_encode_block(buf, len, s, q.fmt, out + r * C + c0);
            }
        }
        return;
    }
    // one scale per tile: a row, or a br x bc block (partial at the edges)
    const int64_t th = q.gran == G_ROW ? 1 : q.br, tw = q.gran == G_ROW ? C : q.bc;
    const int64_t nbr = (R + th - 1) / th, nbc = (C + tw - 1) / tw;
    const int64_t tiles = nbr * nbc;
    nt = (int)std::max<int64_t>(1, std::min<int64_t>(nt, tiles));
#pragma omp parallel num_threads(nt)
    {
        auto prod = make();
        std::vector<float> buf((size_t)(th * tw));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t r0 = (t / nbc) * th, c0 = (t % nbc) * tw;
            const int64_t h = std::min(th, R - r0), w = std::min(tw, C - c0);
            float a = 0.0f;
            for (int64_t r = 0; r < h; ++r) {
                float* row = buf.data() + r * w;
                for (int64_t cc = 0; cc < w; cc += BLK) {
                    const int len = (int)std::min<int64_t>(BLK, w - cc);
                    prod(r0 + r, c0 + cc, len, row + cc);
                    a = std::max(a, amax_of(row + cc, len));
                }
            }
            const float s = fp8_scale(a, fmax, q.value_dt);
            scales[t] = s;
            for (int64_t r = 0; r < h; ++r)
                fp8_encode_block(buf.data() + r * w, (int)w, s, q.fmt, out + (r0 + r) * C + c0);
        }
#pragma omp critical
        prod.flags_into(flags);
    }
}

template <class Make>
void run_quant(const QuantArgs& q, int nt, Make make, std::vector<int>& flags) {
    if (q.rows == 0 || q.cols == 0) return;
    if (q.kind == Q_FP8) fp8_run(q, nt, make, flags);
    else int4_run(q, nt, make, flags);
}

}  // namespace

std::vector<int> quantize(uint64_t src, int dt, const QuantArgs& q, int nthreads) {
    std::vector<int> flags(2, 0);
    run_quant(q, nthreads, [&]() { return Loader{(const void*)src, dt, q.cols}; }, flags);
    return flags;
}

std::vector<int> fused_merge_quantize(uint64_t base, const std::vector<uint64_t>& models, int dt,
                                      const MaskArgs& ma, const MergeArgs& a, const QuantArgs& q,
                                      int nthreads) {
    std::vector<int> flags(models.size() + 3, 0);
    run_quant(q, nthreads, [&]() { return Merger{MergeBlock(base, models, dt, ma, a, 0), q.value_dt, q.cols}; },
              flags);
    return flags;
}

}  // namespace fm
