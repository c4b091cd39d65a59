// Weight quantizers and the fused merge -> quantize (C++17 + OpenMP, no libtorch); the
// formats' arithmetic is quant.h's. Triton's counterpart: triton_kernels/quant.py.
//
// The quantizers walk the weight in tiles whose values come from a producer: a Loader reads
// them from a tensor (quantize), a Merger computes them with the fused merge's MergeBlock
// (fused_merge.cpp; fused_merge_quantize), so the merged tensor is never written and read back.
#include "common.h"
#include "kernels.h"
#include "quant.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fm {
namespace {

// ---- producers: fill dst[0..len) with the weight's values at row r, columns c0.. ----------
struct Loader {
    static constexpr int SEG = 2048;  // INT4: row segment quantized at a time (measured best)
    const void* src;
    int dt;
    int64_t cols;
    void operator()(int64_t r, int64_t c0, int len, float* dst) { load_block(src, dt, r * cols + c0, len, dst); }
    void prefetch(int64_t i, int len) const {
        const int esz = dt == DTYPE_F32 ? 4 : 2;
        const char* p = (const char*)src + i * esz;
        for (int off = 0; off < len * esz; off += 64) __builtin_prefetch(p + off);
    }
    void flags_into(std::vector<int>&) const {}
};

struct Merger {
    // INT4: row segment merged, then quantized, at a time: small, so that the prefetched next
    // segment and this one share L1 (measured best at 512)
    static constexpr int SEG = 512;
    MergeBlock mb;  // rounds to the merge's output dtype: merge(...) then quantize gives the same codes
    int64_t cols;
    void operator()(int64_t r, int64_t c0, int len, float* dst) { mb.run(r * cols + c0, len, dst); }
    void prefetch(int64_t i, int len) const { mb.prefetch(i, len); }
    void flags_into(std::vector<int>& f) const {
        for (size_t m = 0; m < mb.bad.size(); ++m) f[m] |= mb.bad[m];
    }
};

// Tiles of 64 rows, each row streamed whole (its inputs read front to back) and quantized group
// by group into a per-thread buffer; the transposed outputs (GPTQ's qweight and qzeros, every
// scale) are written once per tile, 64 consecutive entries at a time. (GPTQ's qweight column
// of a row spans the whole 8 MB of a 4096^2 qweight; short tiles would touch every page of it
// per few rows and thrash the TLB the input streams need.)
constexpr int TR = 64;

template <class Make>
void int4_run(const QuantArgs& q, int nt, Make make, std::vector<int>& flags) {
    const int64_t R = q.rows, C = q.cols;
    const int G = q.group;
    const int64_t ng = C / G;
    const int64_t tiles = (R + TR - 1) / TR;
    nt = (int)std::max<int64_t>(1, std::min<int64_t>(nt, tiles));
    const bool gptq = q.kind == QUANT_INT4_GPTQ;
    advise_huge((void*)q.out0, R * C / 2);
#pragma omp parallel num_threads(nt)
    {
        auto prod = make();
        constexpr int SEG = std::decay_t<decltype(prod)>::SEG;     // elements of a row at a time
        alignas(64) float seg[SEG];
        // per group of the segment; at least 8 entries, so the parameters always run as full
        // vectors (the lanes past the segment's groups hold a harmless [-1, 1] group)
        constexpr int NG = SEG / 32 > 8 ? SEG / 32 : 8;
        float mn[NG], mx[NG], gs[NG], gz[NG];
        uint16_t gh[NG];
        std::vector<uint8_t> pk(gptq ? (size_t)(TR * C / 2) : 0);  // packed codes of the tile's rows
        std::vector<float> sc((size_t)(TR * ng)), zp((size_t)(TR * ng));  // [group][row of tile]
        std::vector<uint16_t> sh(gptq ? (size_t)(TR * ng) : 0);
        uint32_t overflow = 0, nonfinite = 0;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t r0 = t * TR;
            const int tr = (int)std::min<int64_t>(TR, R - r0);
            for (int r = 0; r < tr; ++r) {
                uint8_t* dst = gptq ? pk.data() + (size_t)r * (C / 2) : (uint8_t*)q.out0 + (r0 + r) * (C / 2);
                for (int64_t s0 = 0; s0 < C; s0 += SEG) {
                    const int len = (int)std::min<int64_t>(SEG, C - s0);  // a multiple of G
                    const int n = len / G;
                    for (int c = 0; c < len; c += BLK) prod(r0 + r, s0 + c, std::min(BLK, len - c), seg + c);
                    // the segment this thread merges next (static schedule: the rows of its tiles
                    // follow each other), asked for a piece per group below (measured: farther
                    // ahead is no faster)
                    const int64_t pf0 = std::min((r0 + r) * C + s0 + SEG, R * C);
                    const int pflen = (int)std::min<int64_t>(SEG, R * C - pf0), step = (pflen + n - 1) / n;
                    for (int g = 0; g < n; g += 8)
                        groups_min_max8(seg + g * G, std::min(8, n - g), G, mn + g, mx + g, nonfinite);
                    const int nv = (n + 7) & ~7;
                    if (gptq) gptq_params(mn, mx, nv, q.sym, gh, gs, gz, overflow);
                    else torchao_params(mn, mx, nv, q.sym, gs, gz);
                    for (int g = 0; g < n; ++g) {
                        if (g * step < pflen) prod.prefetch(pf0 + g * step, std::min(step, pflen - g * step));
                        const int64_t k = (s0 / G + g) * TR + r;
                        if (gptq) {
                            group_codes(seg + g * G, G, gs[g], 0.0f, gz[g], 0, dst + (s0 + g * G) / 2);
                            sh[k] = gh[g];
                        } else {
                            group_codes(seg + g * G, G, gs[g], q.sym ? 0.0f : mn[g], q.sym ? 8.0f : 0.0f, 0x88,
                                        dst + (s0 + g * G) / 2);
                            sc[k] = gs[g];
                        }
                        zp[k] = gz[g];
                    }
                }
            }
            for (int64_t g = 0; g < ng; ++g) {
                const int64_t k = g * TR;
                if (gptq) {
                    std::memcpy((uint16_t*)q.out2 + g * R + r0, sh.data() + k, 2 * (size_t)tr);
                    for (int r8 = 0; r8 < tr; r8 += 8) {
                        uint32_t zword = 0;
                        for (int r = 0; r < 8; ++r)
                            zword |= (uint32_t)(((int)zp[k + r8 + r] - 1) & 0xF) << (4 * r);
                        ((uint32_t*)q.out1)[g * (R / 8) + (r0 + r8) / 8] = zword;
                    }
                } else {
                    for (int r = 0; r < tr; ++r) {
                        store_one(q.out1, q.value_dt, g * R + r0 + r, sc[k + r]);
                        store_one(q.out2, q.value_dt, g * R + r0 + r, zp[k + r]);
                    }
                }
            }
            if (gptq) store_transposed(pk.data(), C / 2, tr, C / 8, (uint32_t*)q.out0 + r0, R);
        }
#pragma omp critical
        {
            prod.flags_into(flags);
            flags[flags.size() - 2] |= (int)nonfinite;
            flags.back() |= (int)overflow;
        }
    }
}

template <class Make>
void fp8_run(const QuantArgs& q, int nt, Make make, std::vector<int>& flags) {
    const int64_t R = q.rows, C = q.cols;
    const float fmax = fp8_max(q.fmt);
    uint8_t* out = (uint8_t*)q.out0;
    float* scales = (float*)q.out1;
    advise_huge(out, R * C);
    if (q.gran == GRANULARITY_TENSOR) {
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
            uint32_t nonfinite = 0;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < chunks; ++t) {
                const int64_t r = t / cpr, c0 = (t % cpr) * BLK;
                const int len = (int)std::min<int64_t>(BLK, C - c0);
                prod(r, c0, len, buf);
                a = std::max(a, amax_of(buf, len, nonfinite));
            }
#pragma omp critical
            {
                amax = std::max(amax, a);
                prod.flags_into(flags);
                flags[flags.size() - 2] |= (int)nonfinite;
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
    const int64_t th = q.gran == GRANULARITY_ROW ? 1 : q.br, tw = q.gran == GRANULARITY_ROW ? C : q.bc;
    const int64_t nbr = (R + th - 1) / th, nbc = (C + tw - 1) / tw;
    const int64_t tiles = nbr * nbc;
    nt = (int)std::max<int64_t>(1, std::min<int64_t>(nt, tiles));
#pragma omp parallel num_threads(nt)
    {
        auto prod = make();
        std::vector<float> buf((size_t)(th * tw));
        uint32_t nonfinite = 0;
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
                    a = std::max(a, amax_of(row + cc, len, nonfinite));
                }
            }
            const float s = fp8_scale(a, fmax, q.value_dt);
            scales[t] = s;
            for (int64_t r = 0; r < h; ++r)
                fp8_encode_block(buf.data() + r * w, (int)w, s, q.fmt, out + (r0 + r) * C + c0);
        }
#pragma omp critical
        {
            prod.flags_into(flags);
            flags[flags.size() - 2] |= (int)nonfinite;
        }
    }
}

template <class Make>
void run_quant(const QuantArgs& q, int nt, Make make, std::vector<int>& flags) {
    if (q.rows == 0 || q.cols == 0) return;
    if (q.kind == QUANT_FP8) fp8_run(q, nt, make, flags);
    else int4_run(q, nt, make, flags);
}

}  // namespace

std::vector<int> quantize(uint64_t src, int dt, const QuantArgs& q, int nthreads) {
    std::vector<int> flags(2, 0);  // non-finite values, fp16 scale overflow
    run_quant(q, nthreads, [&]() { return Loader{(const void*)src, dt, q.cols}; }, flags);
    return flags;
}

std::vector<int> fused_merge_quantize(uint64_t base, const std::vector<uint64_t>& models, int dt,
                                      const MaskArgs& ma, const MergeArgs& a, const QuantArgs& q,
                                      int nthreads) {
    std::vector<int> flags(models.size() + 4, 0);  // as fused_merge's, then as quantize()
    run_quant(q, nthreads, [&]() {
        Merger m{MergeBlock(base, models, dt, ma, a, 0), q.cols};
        m.mb.round_dt_ = q.value_dt;
        m.mb.check_result_ = false;  // the quantizers' min/max pass checks the same values
        return m;
    }, flags);
    return flags;
}

}  // namespace fm
