// arcee_fusion (fastmerge/methods/arcee_fusion.py), m = the model, b = the base, rows along the
// last dimension:
//   p = softmax(m) + 1e-8, q = softmax(b) + 1e-8, kl_row = sum_row p log(p / q),
//   s = |m - b| kl_row, thr = median(s) + 1.5 (q3(s) - q1(s)) (exact order statistics),
//   out = b + (m - b) [s >= thr].
// arcee_select: one pass over the inputs, row by row (a row's max, sums of exp and KL while it
// stays in cache), writing kl_row, the top 16 bits of each s's order key and their histogram;
// then one scan of those 16-bit keys recomputes s where the key is in a bin holding one of the
// three order statistics, and selects them exactly among those few. arcee_merge: one pass.
// Sums are per chunk of EW_BLOCK elements in double, chunks in order, one thread per row: no
// result depends on the thread count. (Rows are spread over the threads, so a 1-D tensor, one
// row, runs on one thread; its exps are recomputed past ROW_BUFFER elements.) Where every s
// falls into one 16-bit bin (identical tensors: all 0), the scan keeps all n keys. exp and log are polynomial (Cephes' expf/logf, about 1
// ulp), so s differs from torch's by round-off, not more.
#pragma GCC optimize("no-trapping-math")
#include <algorithm>
#include <cmath>
#include <memory>
#include <tuple>

#include "elementwise.h"
#include "fmath.h"
#include "selection.h"

namespace fm {

namespace {

// log(x) for a positive normal x (p / q lies within [1e-8, 1e8])
inline float log_pos(float x) {
    const uint32_t u = f2u(x);
    int32_t e = (int32_t)((u >> 23) & 0xffu) - 127;
    float m = u2f((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
    const bool big = m > 1.41421356f;
    m = big ? m * 0.5f : m;
    e = big ? e + 1 : e;
    const float f = m - 1.0f, z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f + -1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f + -1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f + -1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f + -2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = (y * f) * z;
    const float ef = (float)e;
    y = y + ef * -2.12194440e-4f;
    y = y - 0.5f * z;
    return (f + y) + ef * 0.693359375f;
}

// sum of v[0..len) over 16 fp32 lanes, combined in a fixed order (torch's own row sums are fp32)
inline float lane_sum(const float* __restrict v, int len) {
    float a[16];
    for (int l = 0; l < 16; ++l) a[l] = 0.0f;
    int j = 0;
    for (; j + 16 <= len; j += 16)
        for (int l = 0; l < 16; ++l) a[l] += v[j + l];
    for (; j < len; ++j) a[j & 15] += v[j];
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) a[l] += a[l + w];
    return a[0];
}

struct Row {
    const void* base;
    const void* model;
    int dt;
    int64_t L;
};

// kl of the row starting at element r0 (its chunks loaded into x = m, y = b); flags {model, base}
float row_kl(const Row& in, int64_t r0, float* __restrict x, float* __restrict y, float* __restrict ex,
             float* __restrict ey, float* __restrict term, int64_t* flags) {
    const int64_t L = in.L;
    float mx = -INFINITY, my = -INFINITY;
    for (int64_t c = 0; c < L; c += EW_BLOCK) {
        const int len = (int)std::min<int64_t>(EW_BLOCK, L - c);
        load_block(in.model, in.dt, r0 + c, len, x);
        load_block(in.base, in.dt, r0 + c, len, y);
        flags[0] |= ew_nonfinite(x, len);
        flags[1] |= ew_nonfinite(y, len);
        float lx[8], ly[8];
        for (int l = 0; l < 8; ++l) { lx[l] = mx; ly[l] = my; }
        int j = 0;
        for (; j + 8 <= len; j += 8)
            for (int l = 0; l < 8; ++l) {
                lx[l] = x[j + l] > lx[l] ? x[j + l] : lx[l];
                ly[l] = y[j + l] > ly[l] ? y[j + l] : ly[l];
            }
        for (; j < len; ++j) {
            lx[0] = x[j] > lx[0] ? x[j] : lx[0];
            ly[0] = y[j] > ly[0] ? y[j] : ly[0];
        }
        for (int l = 0; l < 8; ++l) {
            mx = lx[l] > mx ? lx[l] : mx;
            my = ly[l] > my ? ly[l] : my;
        }
    }
    if (flags[0] | flags[1]) return 0.0f;
    double sx = 0.0, sy = 0.0;
    for (int64_t c = 0; c < L; c += EW_BLOCK) {
        const int len = (int)std::min<int64_t>(EW_BLOCK, L - c);
        load_block(in.model, in.dt, r0 + c, len, x);
        load_block(in.base, in.dt, r0 + c, len, y);
        float* __restrict px = ex ? ex + c : x;
        float* __restrict py = ey ? ey + c : y;
        for (int j = 0; j < len; ++j) {
            px[j] = exp_f(x[j] - mx);
            py[j] = exp_f(y[j] - my);
        }
        sx += lane_sum(px, len);
        sy += lane_sum(py, len);
    }
    const float fx = 1.0f / (float)sx, fy = 1.0f / (float)sy;  // softmax: exps times 1 / sum
    double kl = 0.0;
    for (int64_t c = 0; c < L; c += EW_BLOCK) {
        const int len = (int)std::min<int64_t>(EW_BLOCK, L - c);
        const float* px = ex ? ex + c : x;
        const float* py = ey ? ey + c : y;
        if (!ex) {  // no row buffer: recompute the exps
            load_block(in.model, in.dt, r0 + c, len, x);
            load_block(in.base, in.dt, r0 + c, len, y);
            for (int j = 0; j < len; ++j) { x[j] = exp_f(x[j] - mx); y[j] = exp_f(y[j] - my); }
        }
        for (int j = 0; j < len; ++j) {
            const float p = px[j] * fx + 1e-8f, q = py[j] * fy + 1e-8f;
            term[j] = p * log_pos(p / q);
        }
        kl += lane_sum(term, len);
    }
    return (float)kl;
}

constexpr int64_t ROW_BUFFER = (int64_t)1 << 16;  // rows up to this long keep their exps

}  // namespace

// values: the order statistics ranks[i] (0-based, ascending) of s; kl: per row, written;
// flags {model, base}.
std::tuple<std::vector<float>, std::vector<int>> arcee_select(uint64_t base, uint64_t model, int dt, int64_t rows,
                                                              int64_t L, const std::vector<int64_t>& ranks,
                                                              uint64_t kl_ptr, int nthreads) {
    const int64_t n = rows * L;
    const Row in{(const void*)base, (const void*)model, dt, L};
    float* klp = (float*)kl_ptr;
    std::unique_ptr<uint16_t[]> key16_buf(new uint16_t[(size_t)n]);  // every entry written below
    uint16_t* key16 = key16_buf.get();
    advise_huge(key16, n * 2);
    const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(ew_threads(nthreads, n), rows));
    std::vector<int64_t> hist((size_t)65536 * nt, 0), fl((size_t)2 * nt, 0);
#pragma omp parallel num_threads(nt)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        std::vector<float> buf(3 * EW_BLOCK + (L <= ROW_BUFFER ? 2 * L : 0) + 16);
        float* x = buf.data();
        float* y = x + EW_BLOCK;
        float* term = y + EW_BLOCK;
        float* ex = L <= ROW_BUFFER ? term + EW_BLOCK : nullptr;
        float* ey = ex ? ex + L : nullptr;
        std::vector<uint32_t> h(65536, 0);
        int64_t counted = 0;
        int64_t* f = fl.data() + 2 * t;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const float kl = row_kl(in, r * L, x, y, ex, ey, term, f);
            klp[r] = kl;
            if (f[0] | f[1]) continue;
            for (int64_t c = 0; c < L; c += EW_BLOCK) {
                const int len = (int)std::min<int64_t>(EW_BLOCK, L - c);
                load_block(in.model, dt, r * L + c, len, x);
                load_block(in.base, dt, r * L + c, len, y);
                uint16_t* __restrict k16 = key16 + r * L + c;
                for (int j = 0; j < len; ++j) k16[j] = (uint16_t)(order_key(std::fabs(x[j] - y[j]) * kl) >> 16);
                for (int j = 0; j < len; ++j) h[k16[j]]++;
                counted += len;
            }
            if (counted > ((int64_t)1 << 31)) {  // keep the 32-bit counts from wrapping
                for (int b = 0; b < 65536; ++b) { hist[(size_t)65536 * t + b] += h[b]; h[b] = 0; }
                counted = 0;
            }
        }
        for (int b = 0; b < 65536; ++b) hist[(size_t)65536 * t + b] += h[b];
    }
    std::vector<int> flags(2, 0);
    for (int t = 0; t < nt; ++t) { flags[0] |= fl[2 * t] != 0; flags[1] |= fl[2 * t + 1] != 0; }
    const int nq = (int)ranks.size();
    std::vector<float> values(nq, 0.0f);
    if (flags[0] | flags[1]) return {values, flags};
    // the bin of each order statistic and its rank inside the bin
    std::vector<int> bin(nq);
    std::vector<int64_t> inner(nq);
    for (int q = 0; q < nq; ++q) {
        int64_t below = 0;
        int b = 0;
        for (; b < 65536; ++b) {
            int64_t c = 0;
            for (int t = 0; t < nt; ++t) c += hist[(size_t)65536 * t + b];
            if (below + c > ranks[q]) break;
            below += c;
        }
        bin[q] = b;
        inner[q] = ranks[q] - below;
    }
    // the exact keys of the elements in those bins
    const int snt = ew_threads(nthreads, n);
    std::vector<std::vector<std::vector<uint32_t>>> found(snt, std::vector<std::vector<uint32_t>>(nq));
    const int64_t nb = (n + EW_BLOCK - 1) / EW_BLOCK;
    const uint16_t b0 = (uint16_t)bin[0], b1 = (uint16_t)bin[nq > 1 ? 1 : 0], b2 = (uint16_t)bin[nq > 2 ? 2 : 0];
#pragma omp parallel num_threads(snt)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nb; ++blk) {
            const int64_t i0 = blk * EW_BLOCK;
            const int len = (int)std::min<int64_t>(EW_BLOCK, n - i0);
            const uint16_t* __restrict k16 = key16 + i0;
            for_matching(k16, len, [&](uint16_t v) { return (v == b0) | (v == b1) | (v == b2); }, [&](int j) {
                const int64_t i = i0 + j;
                const float s = std::fabs(load_one(in.model, dt, i) - load_one(in.base, dt, i)) * klp[i / L];
                const uint32_t k = order_key(s);
                for (int q = 0; q < nq; ++q)
                    if ((k >> 16) == (uint32_t)bin[q]) found[t][q].push_back(k);
            });
        }
    }
    for (int q = 0; q < nq; ++q) values[q] = nth_found(found, q, inner[q]);
    return {values, flags};
}

void arcee_merge(uint64_t base, uint64_t model, int dt, uint64_t out, int out_dt, int64_t rows, int64_t L,
                 uint64_t kl_ptr, float thr, int nthreads) {
    const int64_t n = rows * L;
    const float* klp = (const float*)kl_ptr;
    const void* pm = (const void*)model;
    const void* pb = (const void*)base;
    advise_huge((void*)out, n * (out_dt == DTYPE_F32 ? 4 : 2));
    ew_parallel(n, nthreads, 0, 3 * EW_BLOCK, [&](int64_t i0, int len, float* x, int64_t*) {
        float* __restrict y = x + EW_BLOCK;
        float* __restrict kv = y + EW_BLOCK;
        load_block(pm, dt, i0, len, x);
        load_block(pb, dt, i0, len, y);
        int64_t r = i0 / L, pos = i0 - r * L;
        for (int j = 0; j < len; ++r, pos = 0) {  // each element's row kl
            const int seg = (int)std::min<int64_t>(len - j, L - pos);
            const float k = klp[r];
            for (int q = 0; q < seg; ++q) kv[j + q] = k;
            j += seg;
        }
        for (int j = 0; j < len; ++j) {
            const float d = x[j] - y[j];
            const float keep = std::fabs(d) * kv[j] >= thr ? 1.0f : 0.0f;
            x[j] = y[j] + d * keep;
        }
        store_block((void*)out, out_dt, i0, len, x);
    });
}

}  // namespace fm
