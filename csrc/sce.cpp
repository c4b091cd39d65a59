// sce (fastmerge/methods/sce.py): with d_k = m_k - base,
//   select: keep the k = int(nonzero * select_topk) elements of largest var_k(d_k) (population
//           variance, torch's: Welford in double, rounded to fp32), ties to the lowest index;
//   weights: w_k = mean(d_k^2 keep) / sum_j (...) (on the host, from the sums returned here);
//   merge:   out = base + sum_k d_k kw_k / max(sum_k kw_k, 1e-6), kw_k = [sign d_k = elected] w_k.
//
// Passes over the inputs: sce_energy (select_topk >= 1) or sce_select, then sce_merge.
// sce_select finds the exact top k in one reduction pass: a fixed sample of the variances
// (4096 chunks of 64 elements) brackets the threshold [lo, hi]; the pass counts the elements
// above hi (kept), sums their energies per block and writes their keep bits, and stores the
// few candidates in [lo, hi] (index, variance, d_k^2), among which the threshold is selected
// exactly. Should the bracket miss (or the candidates overflow), two histogram passes over the
// variance bits find the threshold T exactly and the pass reruns with lo = hi = T (the
// candidates are then the ties at T, resolved per block without storing them).
// Every sum is per block of EW_BLOCK elements, the blocks summed in order: no result depends
// on the thread count.
#pragma GCC optimize("no-trapping-math")
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <tuple>

#include "elementwise.h"
#include "selection.h"

namespace fm {

namespace {

struct SceIn {
    const void* base;
    const std::vector<uint64_t>& models;
    int dt;
    int K;
};

// scratch: bb | var | D_0 .. D_{K-1} (floats) | mean, m2 (doubles)
int64_t sce_floats(int K) { return (int64_t)(K + 2) * EW_BLOCK + 4 * EW_BLOCK; }

// The block's base and deltas (D row k: m_k - base, fp32); flags[k] |= non-finite model k,
// flags[K] |= non-finite base.
void sce_load(const SceIn& in, int64_t i0, int len, float* s, int64_t* flags) {
    float* __restrict bb = s;
    load_block(in.base, in.dt, i0, len, bb);
    if (flags) flags[in.K] |= ew_nonfinite(bb, len);
    for (int k = 0; k < in.K; ++k) {
        float* __restrict d = s + (int64_t)(k + 2) * EW_BLOCK;
        load_block((const void*)in.models[k], in.dt, i0, len, d);
        if (flags) flags[k] |= ew_nonfinite(d, len);
        for (int j = 0; j < len; ++j) d[j] = d[j] - bb[j];
    }
}

// torch.var(stack(D), dim=0, unbiased=False) as torch's CPU kernel computes it: Welford in
// double in model order (mean += delta / n; m2 += delta * (x - mean)), m2 / K rounded to fp32.
void sce_variance(float* s, int K, int len) {
    float* __restrict var = s + EW_BLOCK;
    double* __restrict mean = (double*)(s + (int64_t)(K + 2) * EW_BLOCK);
    double* __restrict m2 = mean + EW_BLOCK;
    const float* __restrict d0 = s + 2 * EW_BLOCK;
    for (int j = 0; j < len; ++j) { mean[j] = (double)d0[j]; m2[j] = 0.0; }
    for (int k = 1; k < K; ++k) {
        const float* __restrict d = s + (int64_t)(k + 2) * EW_BLOCK;
        const double nf = (double)(k + 1);
        for (int j = 0; j < len; ++j) {
            const double x = (double)d[j];
            const double delta = x - mean[j];
            const double nm = mean[j] + delta / nf;
            m2[j] = m2[j] + delta * (x - nm);
            mean[j] = nm;
        }
    }
    const double kf = (double)K;
    for (int j = 0; j < len; ++j) var[j] = (float)(m2[j] / kf);
}

// sum_j (d_j * d_j) [* w_j] in double over 8 lanes, combined in a fixed order
double sumsq(const float* __restrict d, const float* __restrict w, int len) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int j = 0;
    if (w) {
        for (; j + 8 <= len; j += 8)
            for (int l = 0; l < 8; ++l) acc[l] += (double)((d[j + l] * d[j + l]) * w[j + l]);
        for (; j < len; ++j) acc[j & 7] += (double)((d[j] * d[j]) * w[j]);
    } else {
        for (; j + 8 <= len; j += 8)
            for (int l = 0; l < 8; ++l) acc[l] += (double)(d[j + l] * d[j + l]);
        for (; j < len; ++j) acc[j & 7] += (double)(d[j] * d[j]);
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// bit l of the result: v[l] != 0, for l < cnt (cnt <= 64)
inline uint64_t pack64(const float* __restrict v, int cnt) {
    uint64_t r = 0;
    int l = 0;
#ifdef __AVX2__
    for (; l + 8 <= cnt; l += 8)
        r |= (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + l), _mm256_setzero_ps(), _CMP_NEQ_UQ)) << l;
#endif
    for (; l < cnt; ++l) r |= (uint64_t)(v[l] != 0.0f) << l;
    return r;
}

int nthreads_for(int requested, int64_t n) { return ew_threads(requested, n); }

int64_t nblocks_of(int64_t n) { return (n + EW_BLOCK - 1) / EW_BLOCK; }

// body(b, i0, len, scratch, thread) for every block, static contiguous ranges in thread order
template <class Body>
void for_blocks(int64_t n, int nthreads, int64_t scratch_floats, Body&& body) {
    const int64_t nb = nblocks_of(n);
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> buf((size_t)scratch_floats + 16);
        float* s = (float*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        const int64_t b0 = nb * t / nt, b1 = nb * (t + 1) / nt;
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t i0 = b * EW_BLOCK;
            body(b, i0, (int)std::min<int64_t>(EW_BLOCK, n - i0), s, t);
        }
    }
}

std::vector<int> flags_of(const std::vector<int64_t>& f) {
    std::vector<int> r(f.size());
    for (size_t i = 0; i < f.size(); ++i) r[i] = f[i] != 0;
    return r;
}

// per-thread flag rows merged by OR
struct Flags {
    int K;
    std::vector<int64_t> v;
    Flags(int K_, int nt) : K(K_), v((size_t)(K_ + 1) * nt, 0) {}
    int64_t* row(int t) { return v.data() + (size_t)(K + 1) * t; }
    std::vector<int> merged() const {
        std::vector<int64_t> f(K + 1, 0);
        for (size_t i = 0; i < v.size(); ++i) f[i % (K + 1)] |= v[i];
        return flags_of(f);
    }
};

struct Cand {
    int64_t idx;
    float var;
};

struct Pass1 {
    // per block
    std::vector<int64_t> nz, above, cand;
    std::vector<double> ea, ec;  // [block][K]
    // stored candidates (lo < hi), concatenated in index order; their d_k^2 [cand][K]
    std::vector<Cand> cands;
    std::vector<float> csq;
    bool overflow = false;
    std::vector<int> flags;
};

// The reduction pass with bracket [lo, hi] (lo > 0): keep bits of var > hi into bits (and of
// lo <= var <= hi into tie_bits when lo == hi).
Pass1 pass1(const SceIn& in, int64_t n, float lo, float hi, uint64_t* bits, uint64_t* tie_bits, int nthreads) {
    const int K = in.K;
    const int64_t nb = nblocks_of(n);
    const bool store = lo < hi;
    const int64_t cap = std::max<int64_t>((int64_t)1 << 20, n / 8);
    Pass1 r;
    r.nz.assign(nb, 0); r.above.assign(nb, 0); r.cand.assign(nb, 0);
    r.ea.assign((size_t)nb * K, 0.0); r.ec.assign((size_t)nb * K, 0.0);
    const int nt = nthreads_for(nthreads, n);
    Flags fl(K, nt);
    std::vector<std::vector<Cand>> tc(nt);
    std::vector<std::vector<float>> tsq(nt);
    for_blocks(n, nt, sce_floats(K) + 2 * EW_BLOCK, [&](int64_t b, int64_t i0, int len, float* s, int t) {
        sce_load(in, i0, len, s, fl.row(t));
        sce_variance(s, K, len);
        const float* __restrict var = s + EW_BLOCK;
        float* __restrict wa = s + sce_floats(K);
        float* __restrict wc = wa + EW_BLOCK;
        int64_t nz = 0, na = 0, nc = 0;
        for (int j = 0; j < len; ++j) {
            const float v = var[j];
            const int a = v > hi, c = (v >= lo) & (v <= hi);
            nz += v > 0.0f;
            na += a;
            nc += c;
            wa[j] = (float)a;
            wc[j] = (float)c;
        }
        r.nz[b] = nz; r.above[b] = na; r.cand[b] = nc;
        for (int k = 0; k < K; ++k) {
            const float* d = s + (int64_t)(k + 2) * EW_BLOCK;
            r.ea[(size_t)b * K + k] = na ? sumsq(d, wa, len) : 0.0;
            if (!store) r.ec[(size_t)b * K + k] = nc ? sumsq(d, wc, len) : 0.0;
        }
        for (int w = 0; w < (len + 63) / 64; ++w) {  // i0 is a multiple of 64
            const int cnt = std::min(64, len - w * 64);
            bits[i0 / 64 + w] = pack64(wa + w * 64, cnt);
            if (tie_bits) tie_bits[i0 / 64 + w] = pack64(wc + w * 64, cnt);
        }
        if (store && nc) {
            if ((int64_t)tc[t].size() + nc > cap) return;  // the total is over cap too
            for (int j = 0; j < len; ++j)
                if (wc[j] != 0.0f) {
                    tc[t].push_back(Cand{i0 + j, var[j]});
                    for (int k = 0; k < K; ++k) {
                        const float dv = s[(int64_t)(k + 2) * EW_BLOCK + j];
                        tsq[t].push_back(dv * dv);
                    }
                }
        }
    });
    r.flags = fl.merged();
    int64_t total = 0;
    for (int64_t c : r.cand) total += c;
    r.overflow = store && total > cap;  // the same on every thread count (a thread stops at cap)
    for (int t = 0; t < nt && !r.overflow; ++t) {
        r.cands.insert(r.cands.end(), tc[t].begin(), tc[t].end());
        r.csq.insert(r.csq.end(), tsq[t].begin(), tsq[t].end());
    }
    return r;
}

// Variances of a fixed sample: 4096 chunks of 64 elements spread over the tensor.
std::vector<float> sample_variances(const SceIn& in, int64_t n, int nthreads) {
    constexpr int NCH = 4096, CH = 64;
    std::vector<float> out((size_t)NCH * CH);
    const int nt = std::max(1, std::min(nthreads, 8));
#pragma omp parallel num_threads(nt)
    {
        std::vector<float> buf((size_t)sce_floats(in.K) + 16);
        float* s = (float*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
#pragma omp for schedule(static)
        for (int c = 0; c < NCH; ++c) {
            const int64_t i0 = (int64_t)c * ((n - CH) / (NCH - 1));
            sce_load(in, i0, CH, s, nullptr);
            sce_variance(s, in.K, CH);
            std::copy(s + EW_BLOCK, s + EW_BLOCK + CH, out.begin() + (int64_t)c * CH);
        }
    }
    return out;
}

// The exact k-th largest variance (k >= 1) by two histogram passes over the variance bits.
float exact_threshold(const SceIn& in, int64_t n, int64_t k, int nthreads) {
    const int nt = nthreads_for(nthreads, n);
    uint32_t prefix = 0;
    int64_t rank = k;  // wanted: the rank-th largest among the elements matching the prefix
    for (int level = 0; level < 2; ++level) {
        const int nbins = level == 0 ? 32768 : 65536;
        std::vector<std::vector<int64_t>> th(nt, std::vector<int64_t>(nbins, 0));
        for_blocks(n, nt, sce_floats(in.K), [&](int64_t, int64_t i0, int len, float* s, int t) {
            sce_load(in, i0, len, s, nullptr);
            sce_variance(s, in.K, len);
            const float* var = s + EW_BLOCK;
            int64_t* h = th[t].data();
            for (int j = 0; j < len; ++j) {
                const float v = var[j];
                if (!(v > 0.0f)) continue;
                const uint32_t u = f2u(v);
                if (level == 0) h[u >> 16]++;
                else if ((u >> 16) == prefix) h[u & 0xffffu]++;
            }
        });
        int64_t acc = 0;
        int bin = nbins - 1;
        for (; bin >= 0; --bin) {
            int64_t c = 0;
            for (int t = 0; t < nt; ++t) c += th[t][bin];
            if (acc + c >= rank) break;
            acc += c;
        }
        rank -= acc;
        prefix = level == 0 ? (uint32_t)bin : (prefix << 16) | (uint32_t)bin;
    }
    return u2f(prefix);
}

}  // namespace

std::tuple<std::vector<double>, std::vector<int>> sce_energy(uint64_t base, const std::vector<uint64_t>& models,
                                                             int dt, int64_t n, int nthreads) {
    const int K = (int)models.size();
    const SceIn in{(const void*)base, models, dt, K};
    const int nt = nthreads_for(nthreads, n);
    std::vector<double> pb((size_t)nblocks_of(n) * K, 0.0);
    Flags fl(K, nt);
    for_blocks(n, nt, sce_floats(K), [&](int64_t b, int64_t i0, int len, float* s, int t) {
        sce_load(in, i0, len, s, fl.row(t));
        for (int k = 0; k < K; ++k) pb[(size_t)b * K + k] = sumsq(s + (int64_t)(k + 2) * EW_BLOCK, nullptr, len);
    });
    std::vector<double> e(K, 0.0);
    for (size_t i = 0; i < pb.size(); ++i) e[i % K] += pb[i];
    return {e, fl.merged()};
}

// Returns (k, energy sums sum_j d_k^2 keep, flags); keep bits in bits[ceil(n/64)].
std::tuple<int64_t, std::vector<double>, std::vector<int>> sce_select(uint64_t base, const std::vector<uint64_t>& models,
                                                                      int dt, int64_t n, float topk, uint64_t bits_ptr,
                                                                      int nthreads) {
    const int K = (int)models.size();
    const SceIn in{(const void*)base, models, dt, K};
    uint64_t* bits = (uint64_t*)bits_ptr;
    const float minpos = u2f(1u), inf = std::numeric_limits<float>::infinity();
    float lo = minpos, hi = inf;
    if (n >= ((int64_t)1 << 19)) {  // bracket the threshold from a sample
        std::vector<float> sv = sample_variances(in, n, nthreads);
        sv.erase(std::remove_if(sv.begin(), sv.end(), [](float v) { return !(v > 0.0f); }), sv.end());
        const double z = (double)sv.size(), p = topk;
        if (z >= 1024) {
            const double t = p * z, m = 6.0 * std::sqrt(z * p * (1 - p)) + 0.005 * z + 16;
            const int64_t hr = (int64_t)std::floor(t - m), lr = (int64_t)std::ceil(t + m);
            auto desc = [](float a, float b) { return a > b; };
            if (hr >= 0) { std::nth_element(sv.begin(), sv.begin() + hr, sv.end(), desc); hi = sv[hr]; }
            if (lr < (int64_t)sv.size()) { std::nth_element(sv.begin(), sv.begin() + lr, sv.end(), desc); lo = sv[lr]; }
        }
    }
    std::vector<uint64_t> ties;
    for (int attempt = 0; attempt < 2; ++attempt) {
        const bool exact = lo == hi;
        if (exact) ties.assign((size_t)((n + 63) / 64), 0);
        Pass1 r = pass1(in, n, lo, hi, bits, exact ? ties.data() : nullptr, nthreads);
        std::vector<double> e(K, 0.0);
        for (int v : r.flags)
            if (v) return {0, e, r.flags};
        int64_t nz = 0, above = 0, cand = 0;
        for (size_t b = 0; b < r.nz.size(); ++b) { nz += r.nz[b]; above += r.above[b]; cand += r.cand[b]; }
        const int64_t k = (int64_t)((float)nz * topk);  // torch: int(count_nonzero(var) * select_topk)
        if (k == 0) return {0, e, r.flags};
        if (above <= k && k <= above + cand && !r.overflow) {
            for (size_t i = 0; i < r.ea.size(); ++i) e[i % K] += r.ea[i];
            int64_t rem = k - above;  // candidates to keep
            if (rem > 0 && !exact) {
                std::vector<float> vals(r.cands.size());
                for (size_t c = 0; c < vals.size(); ++c) vals[c] = r.cands[c].var;
                std::nth_element(vals.begin(), vals.begin() + (rem - 1), vals.end(), [](float a, float b) { return a > b; });
                const float T = vals[rem - 1];
                int64_t gt = 0;
                for (const Cand& c : r.cands) gt += c.var > T;
                int64_t tie_left = rem - gt;
                std::vector<double> ek(K, 0.0);
                for (size_t c = 0; c < r.cands.size(); ++c) {
                    const Cand& cd = r.cands[c];
                    const bool keep = cd.var > T || (cd.var == T && tie_left-- > 0);
                    if (!keep) continue;
                    bits[cd.idx >> 6] |= (uint64_t)1 << (cd.idx & 63);
                    for (int q = 0; q < K; ++q) ek[q] += (double)r.csq[c * K + q];
                }
                for (int q = 0; q < K; ++q) e[q] += ek[q];
            } else if (rem > 0) {  // ties at T = lo = hi, the lowest indices first
                const int64_t nb = (int64_t)r.cand.size();
                std::vector<double> ek(K, 0.0);
                for (int64_t b = 0; b < nb && rem > 0; ++b) {
                    const int64_t i0 = b * EW_BLOCK;
                    const int len = (int)std::min<int64_t>(EW_BLOCK, n - i0);
                    if (r.cand[b] <= rem) {
                        rem -= r.cand[b];
                        for (int q = 0; q < K; ++q) ek[q] += r.ec[(size_t)b * K + q];
                        for (int w = 0; w < (len + 63) / 64; ++w) bits[i0 / 64 + w] |= ties[i0 / 64 + w];
                        continue;
                    }
                    std::vector<float> buf((size_t)sce_floats(K) + 16);  // the block where the ties end
                    float* s = (float*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
                    sce_load(in, i0, len, s, nullptr);
                    std::vector<float> w(len, 0.0f);
                    for (int j = 0; j < len && rem > 0; ++j)
                        if ((ties[(i0 + j) >> 6] >> ((i0 + j) & 63)) & 1) {
                            w[j] = 1.0f;
                            bits[(i0 + j) >> 6] |= (uint64_t)1 << ((i0 + j) & 63);
                            --rem;
                        }
                    for (int q = 0; q < K; ++q) ek[q] += sumsq(s + (int64_t)(q + 2) * EW_BLOCK, w.data(), len);
                }
                for (int q = 0; q < K; ++q) e[q] += ek[q];
            }
            return {k, e, r.flags};
        }
        lo = hi = exact_threshold(in, n, k, nthreads);  // the bracket missed: the exact threshold
    }
    throw std::runtime_error("sce_select: the exact threshold did not bracket the k-th variance");
}

// mode 0: every element kept (select_topk >= 1); 1: the keep bits; 2: none kept.
void sce_merge(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t out, int out_dt, int64_t n,
               const std::vector<float>& w, int mode, uint64_t bits_ptr, int nthreads) {
    const int K = (int)models.size();
    const SceIn in{(const void*)base, models, dt, K};
    const uint64_t* bits = (const uint64_t*)bits_ptr;
    advise_huge((void*)out, n * (out_dt == DTYPE_F32 ? 4 : 2));
    const int nt = nthreads_for(nthreads, n);
    for_blocks(n, nt, sce_floats(K) + 3 * EW_BLOCK, [&](int64_t, int64_t i0, int len, float* s, int) {
        sce_load(in, i0, len, s, nullptr);
        const float* __restrict bb = s;
        float* __restrict sum = s + EW_BLOCK;
        float* __restrict keep = s + sce_floats(K);
        float* __restrict mg = keep + EW_BLOCK;
        float* __restrict den = mg + EW_BLOCK;
        if (mode != 0) {
            for (int j = 0; j < len; ++j)
                keep[j] = mode == 1 ? (float)((bits[(i0 + j) >> 6] >> ((i0 + j) & 63)) & 1) : 0.0f;
            for (int k = 0; k < K; ++k) {
                float* __restrict d = s + (int64_t)(k + 2) * EW_BLOCK;
                for (int j = 0; j < len; ++j) d[j] = d[j] * keep[j];
            }
        }
        for (int j = 0; j < len; ++j) { sum[j] = 0.0f; mg[j] = 0.0f; den[j] = 0.0f; }
        for (int k = 0; k < K; ++k) {  // Python's sum(deltas): 0 + d_0 + d_1 + ...
            const float* __restrict d = s + (int64_t)(k + 2) * EW_BLOCK;
            for (int j = 0; j < len; ++j) sum[j] = sum[j] + d[j];
        }
        for (int k = 0; k < K; ++k) {
            const float* __restrict d = s + (int64_t)(k + 2) * EW_BLOCK;
            const float wk = w[k];
            for (int j = 0; j < len; ++j) {
                const bool agree = sum[j] >= 0.0f ? d[j] > 0.0f : d[j] < 0.0f;  // sign(d) == elected
                const float kw = agree ? wk : 0.0f;
                mg[j] = mg[j] + d[j] * kw;
                den[j] = den[j] + kw;
            }
        }
        for (int j = 0; j < len; ++j) {
            const float dn = den[j] < 1e-6f ? 1e-6f : den[j];  // clamp(min=1e-6)
            mg[j] = bb[j] + mg[j] / dn;
        }
        store_block((void*)out, out_dt, i0, len, mg);
    });
}

}  // namespace fm
