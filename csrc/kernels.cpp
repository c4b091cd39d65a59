// fastmerge CPU kernels (C++17 + OpenMP). Semantics: fastmerge/reference.py; every sum over
// models runs in model order in fp32, exactly like the reference, so results agree bit for bit
// (or within an ulp where a norm ratio rounds differently).
//
// Passes of a merge (N elements, K inputs, base optional):
//   select_ranges : exact top-k thresholds by radix select on the fp32 bit patterns of |d|
//                   (a 16-bit histogram pass, a 16-bit pass restricted to the chosen bucket,
//                   and, only when ties at the threshold are split, a count pass that finds
//                   the index cutoff). No sort, no mask.
//   mask_norms    : only for norm-matching rescale: per-model norms before/after masking;
//                   random (DARE) masks are written as bits so the merge pass need not redraw.
//   della_bits    : per-row ranks by LSD radix sort (one sort, not mergekit's double argsort),
//                   DELLA keep decisions as bits, norms.
//   fused_merge   : reads base + K inputs once, writes the output once. Masks are evaluated
//                   on the fly from thresholds, Philox counters or bits. The per-block work is
//                   MergeBlock's, which quant.cpp's fused quantizers share; mask-free plans
//                   (task arithmetic, linear) take a register-resident path (run_plain).
#include "common.h"
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <functional>
#include <limits>
#include <stdexcept>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fm {

constexpr int64_t NORM_CHUNK = 64;  // blocks per partial norm (thread-count independent sums)
constexpr int64_t SENTINEL_NONE = (int64_t)1 << 32;  // threshold no key exceeds


enum MaskKind : int { M_NONE = 0, M_ZERO = 1, M_RANGE = 2, M_RANDOM = 3, M_BITS = 4 };
enum Consensus : int { C_NONE = 0, C_SUM = 1, C_COUNT = 2, C_GIVEN = 3 };
enum Divisor : int { D_NONE = 0, D_WEIGHT = 1, D_COUNT = 2, D_CONST = 3 };
enum Scale : int { S_NONE = 0, S_MUL = 1, S_DIV = 2 };
enum Norm : int { N_NONE = 0, N_L1 = 1, N_L2 = 2, N_LINF = 3 };

// A fresh output tensor is first touched by the merge; on a 64 MB output, 4 KiB page faults
// cost as much as the merge itself. Ask for transparent huge pages on the untouched buffer
// (a hint: ignored where THP is off, harmless where pages already exist).
void advise_huge(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t HP = (uintptr_t)2 << 20;
    if (bytes < (int64_t)(4 * HP)) return;
    const uintptr_t a = ((uintptr_t)p + HP - 1) & ~(HP - 1);
    const uintptr_t e = ((uintptr_t)p + (uintptr_t)bytes) & ~(HP - 1);
    if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);
#else
    (void)p; (void)bytes;
#endif
}

static int threads_for(int requested, int64_t n) {
    int t = requested > 0 ? requested : 1;
    const int64_t blocks = (n + BLK - 1) / BLK;
    if (blocks < t) t = (int)std::max<int64_t>(1, blocks);
    return t;
}

// Per model, the selection "top set of size k": key > T or (key == T and index <= J).
struct TopSet { int64_t T; int64_t J; };

// 1 if (key, index i) is in the top set: key > T, or key == T and i <= J. Branch-free.
static inline uint32_t in_top_bits(uint32_t key, int64_t i, const TopSet& s) {
    const int64_t k = (int64_t)key;
    return (uint32_t)(k > s.T) | ((uint32_t)(k == s.T) & (uint32_t)(i <= s.J));
}

// Fill d[0..n) with the fp32 delta of model m for elements i0..i0+n-1.
static inline void load_delta(const void* base, const void* x, int dt, int64_t i0, int n,
                              const float* __restrict bb, float* __restrict d) {
    load_block(x, dt, i0, n, d);
    if (base)
        for (int j = 0; j < n; ++j) d[j] = d[j] - bb[j];
}

// ---- fast path: bracket the k-th key from a sample, then one streaming pass -------------
// A sample of 2^17 keys (8192 runs of 16 contiguous elements) brackets the k-th largest key
// in [lo, hi] with a margin of 4 standard deviations of the sample quantile. One pass
// counts keys above hi and collects the few in [lo, hi] with their indices; nth_element on the
// candidates in (key desc, index asc) order gives the exact threshold and tie cutoff. If the
// bracket misses (the count check fails), the caller falls back to the histogram passes.
struct Cand { uint32_t key; int64_t idx; };

static std::vector<int> select_bracket(const void* base, const std::vector<uint64_t>& models, int dt,
                                       int64_t n, const std::vector<int>& q_model,
                                       const std::vector<int64_t>& q_k, const std::vector<int>& todo,
                                       std::vector<int64_t>& out, int nt) {
    // RUNS runs of RUN consecutive keys, evenly spaced: 1/64 of the input, at most 2^17 keys
    // (the bracket's relative width shrinks as 1/sqrt(S); past 2^17 keys the sample's two
    // nth_elements cost more than the extra candidates they save)
    constexpr int RUN = 16;
    const int RUNS = (int)std::min<int64_t>(8192, std::max<int64_t>(1024, n >> 10));
    const int S = RUNS * RUN;
    const int TQ = (int)todo.size();
    std::vector<uint32_t> lo(TQ), hi(TQ);
    std::vector<int64_t> expect(TQ);
#pragma omp parallel for num_threads(std::min(nt, TQ)) schedule(dynamic)
    for (int tq = 0; tq < TQ; ++tq) {
        std::vector<uint32_t> sample(S);
        const int q = todo[tq];
        const void* x = (const void*)models[q_model[q]];
        const int64_t stride = n / RUNS;
        for (int r = 0; r < RUNS; ++r) {
            const int64_t i0 = std::min<int64_t>(r * stride, n - RUN);
            for (int t = 0; t < RUN; ++t) {
                float v = load_one(x, dt, i0 + t);
                if (base) v = v - load_one(base, dt, i0 + t);
                sample[r * RUN + t] = mag_key(v);
            }
        }
        const double f = (double)q_k[q] / (double)n;
        const double rank = f * S;
        const double margin = 4.0 * std::sqrt(S * f * (1.0 - f)) + 16.0;
        const int64_t rh = (int64_t)std::floor(rank - margin), rl = (int64_t)std::ceil(rank + margin);
        // two order statistics of the sample (descending), no full sort
        auto desc = std::greater<uint32_t>();
        if (rh > 0) { std::nth_element(sample.begin(), sample.begin() + rh, sample.end(), desc); hi[tq] = sample[rh]; }
        else hi[tq] = 0xffffffffu;
        if (rl < S - 1) {
            auto from = sample.begin() + std::max<int64_t>(rh, 0);
            std::nth_element(from, sample.begin() + rl, sample.end(), desc);
            lo[tq] = sample[rl];
        } else lo[tq] = 0u;
        expect[tq] = (int64_t)((double)(std::min<int64_t>(rl, S) - std::max<int64_t>(rh, 0) + 1) / S * n);
    }
    std::vector<int64_t> above(TQ, 0);
    std::vector<std::vector<Cand>> cands(TQ);
    const int64_t nblocks = (n + BLK - 1) / BLK;
#pragma omp parallel num_threads(nt)
    {
        std::vector<int64_t> ab(TQ, 0);
        uint32_t nf = 0;
        std::vector<std::vector<Cand>> cs(TQ);
        for (int tq = 0; tq < TQ; ++tq) cs[tq].reserve(expect[tq] / nt + BLK);
        alignas(64) float bb[BLK], d[BLK];
        alignas(64) uint32_t keys[BLK];
        Cand cbuf[BLK];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t i0 = b * BLK;
            const int len = (int)std::min<int64_t>(BLK, n - i0);
            if (base) load_block(base, dt, i0, len, bb);
            int loaded = -1;
            for (int tq = 0; tq < TQ; ++tq) {
                const int m = q_model[todo[tq]];
                if (m != loaded) {
                    load_delta(base, (const void*)models[m], dt, i0, len, bb, d);
                    for (int j = 0; j < len; ++j) keys[j] = mag_key(d[j]);
                    loaded = m;
                }
                // keys are < 2^31, so signed compares are exact; hi is clamped to 2^31 - 1
                const uint32_t l = lo[tq], h = std::min(hi[tq], 0x7fffffffu), w = h - l;
                int64_t c = 0;
                uint32_t f = 0;
                int nc = 0, j = 0;
#ifdef __AVX2__
                // 8 keys at a time; only the rare groups holding a candidate reach the scalar loop
                const __m256i vl = _mm256_set1_epi32((int)l), vh = _mm256_set1_epi32((int)h);
                const __m256i vinf = _mm256_set1_epi32(0x7f7fffff);
                __m256i acc = _mm256_setzero_si256(), nfv = _mm256_setzero_si256();
                for (; j + 8 <= len; j += 8) {
                    const __m256i kv = _mm256_load_si256((const __m256i*)(keys + j));
                    const __m256i gt = _mm256_cmpgt_epi32(kv, vh);
                    acc = _mm256_sub_epi32(acc, gt);
                    nfv = _mm256_or_si256(nfv, _mm256_cmpgt_epi32(kv, vinf));
                    const __m256i outside = _mm256_or_si256(_mm256_cmpgt_epi32(vl, kv), gt);
                    unsigned msk = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(outside)) & 0xffu;
                    while (msk) {
                        const int t = __builtin_ctz(msk);
                        cbuf[nc].key = keys[j + t];
                        cbuf[nc].idx = i0 + j + t;
                        ++nc;
                        msk &= msk - 1;
                    }
                }
                alignas(32) int32_t lanes[8];
                _mm256_store_si256((__m256i*)lanes, acc);
                for (int t = 0; t < 8; ++t) c += lanes[t];
                f |= (uint32_t)!_mm256_testz_si256(nfv, nfv);
#endif
                for (; j < len; ++j) {
                    c += keys[j] > h;
                    f |= (uint32_t)(keys[j] >= 0x7f800000u);
                    // branch-free compaction: write every element, advance only on a candidate
                    cbuf[nc].key = keys[j];
                    cbuf[nc].idx = i0 + j;
                    nc += (int)(keys[j] - l <= w);
                }
                nf |= f;
                ab[tq] += c;
                if (nc) cs[tq].insert(cs[tq].end(), cbuf, cbuf + nc);
            }
        }
#pragma omp critical
        for (int tq = 0; tq < TQ; ++tq) {
            if (nf) out.back() = 1;
            above[tq] += ab[tq];
            if (cands[tq].empty()) cands[tq].swap(cs[tq]);
            else cands[tq].insert(cands[tq].end(), cs[tq].begin(), cs[tq].end());
        }
    }
    std::vector<char> ok(TQ, 0);
#pragma omp parallel for num_threads(std::min(nt, TQ)) schedule(dynamic)
    for (int tq = 0; tq < TQ; ++tq) {
        const int q = todo[tq];
        std::vector<Cand>& v = cands[tq];
        const int64_t need = q_k[q] - above[tq];
        if (need < 1 || need > (int64_t)v.size()) continue;
        auto prio = [](const Cand& a, const Cand& b) { return a.key > b.key || (a.key == b.key && a.idx < b.idx); };
        std::nth_element(v.begin(), v.begin() + (need - 1), v.end(), prio);
        out[2 * q] = v[need - 1].key;
        out[2 * q + 1] = v[need - 1].idx;
        ok[tq] = 1;
    }
    std::vector<int> failed;
    for (int tq = 0; tq < TQ; ++tq)
        if (!ok[tq]) failed.push_back(todo[tq]);
    return failed;
}

// One histogram pass over the deltas of the models in `mods` (base read once per block):
// fill(h, slot, d, len) counts a block into per-thread uint32 histograms of `bins` counters,
// merged into 64-bit totals every 2^30 elements so the 32-bit counters cannot overflow.
template <class Fill>
static std::vector<uint64_t> hist_pass(const void* base, const std::vector<uint64_t>& models,
                                       const std::vector<int>& mods, int dt, int64_t n, size_t bins,
                                       int nt, Fill fill) {
    constexpr int64_t SUPER = (int64_t)1 << 30;
    const int64_t nblocks = (n + BLK - 1) / BLK;
    std::vector<uint64_t> total(bins, 0);
    for (int64_t b0 = 0; b0 < nblocks; b0 += SUPER / BLK) {
        const int64_t b1 = std::min(nblocks, b0 + SUPER / BLK);
#pragma omp parallel num_threads(nt)
        {
            std::vector<uint32_t> h(bins, 0);
            alignas(64) float bb[BLK], d[BLK];
#pragma omp for schedule(static)
            for (int64_t b = b0; b < b1; ++b) {
                const int64_t i0 = b * BLK;
                const int len = (int)std::min<int64_t>(BLK, n - i0);
                if (base) load_block(base, dt, i0, len, bb);
                for (int s = 0; s < (int)mods.size(); ++s) {
                    load_delta(base, (const void*)models[mods[s]], dt, i0, len, bb, d);
                    fill(h.data(), s, d, len);
                }
            }
#pragma omp critical
            for (size_t t = 0; t < bins; ++t) total[t] += h[t];
        }
    }
    return total;
}

// Highest bucket b such that the counts of buckets >= b reach `need`; `above` gets the count
// strictly above b.
static int top_bucket(const uint64_t* hs, int64_t need, int64_t& above) {
    int b = 65535;
    for (; b > 0; --b) {
        if (above + (int64_t)hs[b] >= need) break;
        above += (int64_t)hs[b];
    }
    return b;
}

// ======================= exact top-k selection (radix select) ============================
// queries: (model index, k). Returns T and J per query, then a non-finite flag.
// Small inputs (LoRA factors, norms, biases): the keys fit in cache, and one nth_element per
// query costs microseconds where two 64K-bin histogram passes cost milliseconds of zeroing.
// Same result as the radix path: T = k-th largest key, J = index of the last tie kept.
static constexpr int64_t SMALL_SELECT = (int64_t)1 << 16;

static void select_small(const void* base, const std::vector<uint64_t>& models, int dt, int64_t n,
                         const std::vector<int>& q_model, const std::vector<int64_t>& q_k,
                         const std::vector<int>& todo, std::vector<int64_t>& out) {
    std::vector<uint32_t> keys((size_t)n), work((size_t)n);
    int loaded = -1;
    for (int q : todo) {
        const int m = q_model[q];
        if (m != loaded) {
            alignas(64) float bb[BLK], d[BLK];
            for (int64_t i0 = 0; i0 < n; i0 += BLK) {
                const int len = (int)std::min<int64_t>(BLK, n - i0);
                if (base) load_block(base, dt, i0, len, bb);
                load_delta(base, (const void*)models[m], dt, i0, len, bb, d);
                for (int j = 0; j < len; ++j) keys[i0 + j] = mag_key(d[j]);
            }
            for (int64_t i = 0; i < n; ++i)
                if (keys[i] >= 0x7f800000u) { out.back() = 1; break; }
            loaded = m;
        }
        const int64_t k = q_k[q];
        work = keys;
        std::nth_element(work.begin(), work.begin() + (k - 1), work.end(), std::greater<uint32_t>());
        const uint32_t T = work[k - 1];
        int64_t above = 0, eq = 0;
        for (int64_t i = 0; i < n; ++i) { above += keys[i] > T; eq += keys[i] == T; }
        const int64_t keep_eq = k - above;
        int64_t J = n;
        if (keep_eq < eq) {
            int64_t seen = 0;
            for (int64_t i = 0; i < n; ++i)
                if (keys[i] == T && ++seen == keep_eq) { J = i; break; }
        }
        out[2 * q] = T;
        out[2 * q + 1] = J;
    }
}

std::vector<int64_t> select_ranges(uint64_t base_ptr, const std::vector<uint64_t>& models, int dt,
                                   int64_t n, const std::vector<int>& q_model,
                                   const std::vector<int64_t>& q_k, int nthreads) {
    const void* base = (const void*)base_ptr;
    const int Q = (int)q_model.size();
    // 2 values (T, J) per query, then one flag: a non-finite key was seen in a scanned input
    std::vector<int64_t> out(2 * (size_t)Q + 1, 0);
    std::vector<int> todo;
    for (int q = 0; q < Q; ++q) {
        const int64_t k = q_k[q];
        if (k <= 0) { out[2 * q] = SENTINEL_NONE; out[2 * q + 1] = -1; }
        else if (k >= n) { out[2 * q] = 0; out[2 * q + 1] = n; }
        else todo.push_back(q);
    }
    if (todo.empty()) return out;
    if (n <= SMALL_SELECT) {
        select_small(base, models, dt, n, q_model, q_k, todo, out);
        return out;
    }
    const int nt = threads_for(nthreads, n);
    if (n >= ((int64_t)1 << 20)) {
        todo = select_bracket(base, models, dt, n, q_model, q_k, todo, out, nt);
        if (todo.empty()) return out;
    }
    // distinct models taking part
    std::vector<int> mods;
    for (int q : todo) if (std::find(mods.begin(), mods.end(), q_model[q]) == mods.end()) mods.push_back(q_model[q]);
    const int M = (int)mods.size();
    std::vector<int> slot(models.size(), -1);
    for (int s = 0; s < M; ++s) slot[mods[s]] = s;
    const int64_t nblocks = (n + BLK - 1) / BLK;

    // ---- pass 1: histogram of the high 16 bits of every key, per model ----
    const std::vector<uint64_t> h1 = hist_pass(base, models, mods, dt, n, (size_t)M * 65536, nt,
        [&](uint32_t* h, int s, const float* d, int len) {
            uint32_t* hs = h + (size_t)s * 65536;
            for (int j = 0; j < len; ++j) hs[mag_key(d[j]) >> 16]++;
        });
    for (int s = 0; s < M; ++s)
        for (int b = 0x7f80; b < 65536; ++b)
            if (h1[(size_t)s * 65536 + b]) out.back() = 1;
    // per query: bucket h and the rank still needed inside it
    std::vector<uint32_t> qh(Q);
    std::vector<int64_t> qrem(Q);
    for (int q : todo) {
        int64_t above = 0;
        qh[q] = (uint32_t)top_bucket(h1.data() + (size_t)slot[q_model[q]] * 65536, q_k[q], above);
        qrem[q] = q_k[q] - above;
    }
    // ---- pass 2: histogram of the low 16 bits inside the chosen bucket, per query ----
    const int TQ = (int)todo.size();
    const std::vector<uint64_t> h2 = hist_pass(base, models, mods, dt, n, (size_t)TQ * 65536, nt,
        [&](uint32_t* h, int s, const float* d, int len) {
            for (int tq = 0; tq < TQ; ++tq) {
                const int q = todo[tq];
                if (q_model[q] != mods[s]) continue;
                const uint32_t want = qh[q];
                uint32_t* hs = h + (size_t)tq * 65536;
                for (int j = 0; j < len; ++j) {
                    const uint32_t key = mag_key(d[j]);
                    if ((key >> 16) == want) hs[key & 0xffffu]++;
                }
            }
        });
    std::vector<int> split;  // queries whose threshold ties are only partly kept
    std::vector<int64_t> need(Q, 0);
    for (int tq = 0; tq < TQ; ++tq) {
        const int q = todo[tq];
        const uint64_t* hs = h2.data() + (size_t)tq * 65536;
        int64_t above = 0;
        const int b = top_bucket(hs, qrem[q], above);
        const int64_t T = ((int64_t)qh[q] << 16) | b;
        const int64_t keep_eq = qrem[q] - above;  // equal keys to keep, lowest index first
        out[2 * q] = T;
        if (keep_eq >= (int64_t)hs[b]) out[2 * q + 1] = n;
        else { need[q] = keep_eq; split.push_back(q); }
    }
    // ---- pass 3 (rare): index of the keep_eq-th key equal to T ----
    for (int q : split) {
        const int64_t T = out[2 * q];
        const void* x = (const void*)models[q_model[q]];
        std::vector<int64_t> cnt(nblocks, 0);
#pragma omp parallel num_threads(nt)
        {
            alignas(64) float bb[BLK], d[BLK];
#pragma omp for schedule(static)
            for (int64_t b = 0; b < nblocks; ++b) {
                const int64_t i0 = b * BLK;
                const int len = (int)std::min<int64_t>(BLK, n - i0);
                if (base) load_block(base, dt, i0, len, bb);
                load_delta(base, x, dt, i0, len, bb, d);
                int64_t c = 0;
                for (int j = 0; j < len; ++j) c += (int64_t)mag_key(d[j]) == T;
                cnt[b] = c;
            }
        }
        int64_t seen = 0, J = n;
        for (int64_t b = 0; b < nblocks; ++b) {
            if (seen + cnt[b] >= need[q]) {
                alignas(64) float bb[BLK], d[BLK];
                const int64_t i0 = b * BLK;
                const int len = (int)std::min<int64_t>(BLK, n - i0);
                if (base) load_block(base, dt, i0, len, bb);
                load_delta(base, x, dt, i0, len, bb, d);
                for (int j = 0; j < len; ++j)
                    if ((int64_t)mag_key(d[j]) == T && ++seen == need[q]) { J = i0 + j; break; }
                break;
            }
            seen += cnt[b];
        }
        out[2 * q + 1] = J;
    }
    return out;
}

// ============================ per-model mask description =================================

// keep[j] = all ones (kept) or 0 (dropped) for model m on elements i0..i0+len-1; d holds the
// delta (for keys). Bit masks rather than bools so every consumer stays branch-free.
static inline void eval_mask(const MaskArgs& a, const PhiloxKey& key, int m, int64_t i0, int len,
                             const float* __restrict d, uint32_t* __restrict keep, float* __restrict tmp) {
    switch (a.kind[m]) {
        case M_NONE:
            for (int j = 0; j < len; ++j) keep[j] = ~0u;
            break;
        case M_ZERO:
            for (int j = 0; j < len; ++j) keep[j] = 0u;
            break;
        case M_RANGE: {
            const TopSet stop{a.ranges[4 * m], a.ranges[4 * m + 1]};
            const TopSet start{a.ranges[4 * m + 2], a.ranges[4 * m + 3]};
            if (start.T >= SENTINEL_NONE) {  // plain top-k (TIES)
                const int64_t last = i0 + len - 1;
                if (stop.J >= last || stop.J < i0) {
                    // The tie cut J is outside this block (every block but one): the ties at T
                    // are all kept (key >= T) or all dropped (key > T), so one 32-bit compare
                    // per element decides, which vectorises; keys are < 2^31.
                    const int64_t tb = stop.J >= last ? stop.T - 1 : stop.T;
                    const int32_t t32 = (int32_t)std::min<int64_t>(tb, INT32_MAX);
                    for (int j = 0; j < len; ++j)
                        keep[j] = 0u - (uint32_t)((int32_t)mag_key(d[j]) > t32);
                } else {
                    for (int j = 0; j < len; ++j)
                        keep[j] = 0u - in_top_bits(mag_key(d[j]), i0 + j, stop);
                }
                break;
            }
            for (int j = 0; j < len; ++j) {
                const uint32_t k = mag_key(d[j]);
                const int64_t i = i0 + j;
                keep[j] = 0u - (in_top_bits(k, i, stop) & (in_top_bits(k, i, start) ^ 1u));
            }
            break;
        }
        case M_RANDOM: {
            // Philox draws 4 uniforms per counter: start at the counter holding i0 (blocks of the
            // merge start at multiples of 4; rows of the fused quantizers may start anywhere)
            const int off = (int)(i0 & 3);
            philox_uniform_block(key, i0 - off, len + off, (uint32_t)m, tmp);
            const float p = a.p[m];
            const float* u = tmp + off;
            for (int j = 0; j < len; ++j) keep[j] = 0u - (uint32_t)(u[j] < p);
            break;
        }
        case M_BITS: {
            const uint64_t* w = (const uint64_t*)a.bits[m] + (i0 >> 6);
            if (i0 & 63) {  // a row that starts inside a word (fused quantizers only)
                const int s = (int)(i0 & 63);
                for (int j = 0; j < len; ++j)
                    keep[j] = 0u - (uint32_t)((w[(s + j) >> 6] >> ((s + j) & 63)) & 1u);
                break;
            }
            for (int wj = 0; wj * 64 < len; ++wj) {
                const uint64_t word = w[wj];
                const int jmax = std::min(64, len - wj * 64);
                uint32_t* kk = keep + wj * 64;
                for (int t = 0; t < jmax; ++t) kk[t] = 0u - (uint32_t)((word >> t) & 1u);
            }
            break;
        }
    }
}

// ============================ norms before/after masking =================================
// For flat masks (range / random). Random masks are also written as bits when bits[m] != 0.
// Returns 2 doubles per model: norm of d, norm of mask * d (L1, L2 or Linf).
std::vector<double> mask_norms(uint64_t base_ptr, const std::vector<uint64_t>& models, int dt, int64_t n,
                               const MaskArgs& a, const std::vector<uint64_t>& bits_out, int norm,
                               int nthreads) {
    const void* base = (const void*)base_ptr;
    const int K = (int)models.size();
    std::vector<double> out(2 * (size_t)K, 0.0);
    const int nt = threads_for(nthreads, n);
    const int64_t nblocks = (n + BLK - 1) / BLK;
    const PhiloxKey key = philox_key(a.seed);
    // Partial norms per fixed chunk of blocks, added in chunk order afterwards: the result does
    // not depend on the thread count (a merge split over processes with fewer threads each must
    // give the same bytes as one process).
    const int64_t nchunks = (nblocks + NORM_CHUNK - 1) / NORM_CHUNK;
    std::vector<double> part((size_t)nchunks * 2 * K, 0.0);
#pragma omp parallel num_threads(nt)
    {
        alignas(64) float bb[BLK], d[BLK], tmp[BLK + 4];
        alignas(64) uint32_t keep[BLK];
#pragma omp for schedule(static)
        for (int64_t c = 0; c < nchunks; ++c) {
          double* acc = part.data() + (size_t)c * 2 * K;
          for (int64_t b = c * NORM_CHUNK; b < std::min(nblocks, (c + 1) * NORM_CHUNK); ++b) {
            const int64_t i0 = b * BLK;
            const int len = (int)std::min<int64_t>(BLK, n - i0);
            if (base) load_block(base, dt, i0, len, bb);
            for (int m = 0; m < K; ++m) {
                if (a.kind[m] != M_RANGE && a.kind[m] != M_RANDOM) continue;
                load_delta(base, (const void*)models[m], dt, i0, len, bb, d);
                eval_mask(a, key, m, i0, len, d, keep, tmp);
                double before = 0, after = 0;
                if (norm == N_L1) {
                    for (int j = 0; j < len; ++j) { const double v = std::fabs(d[j]); before += v; after += keep[j] ? v : 0.0; }
                } else if (norm == N_L2) {
                    for (int j = 0; j < len; ++j) { const double v = (double)d[j] * d[j]; before += v; after += keep[j] ? v : 0.0; }
                } else if (norm == N_LINF) {
                    for (int j = 0; j < len; ++j) { const double v = std::fabs(d[j]); before = std::max(before, v); after = std::max(after, keep[j] ? v : 0.0); }
                }
                if (norm == N_LINF) { acc[2 * m] = std::max(acc[2 * m], before); acc[2 * m + 1] = std::max(acc[2 * m + 1], after); }
                else { acc[2 * m] += before; acc[2 * m + 1] += after; }
                if (a.kind[m] == M_RANDOM && bits_out[m]) {
                    uint64_t* w = (uint64_t*)bits_out[m] + (i0 >> 6);
                    for (int wj = 0; wj < (len + 63) / 64; ++wj) {
                        uint64_t word = 0;
                        const int jmax = std::min(64, len - wj * 64);
                        for (int t = 0; t < jmax; ++t) word |= (uint64_t)(keep[wj * 64 + t] & 1u) << t;
                        w[wj] = word;
                    }
                }
            }
          }
        }
    }
    for (int64_t c = 0; c < nchunks; ++c) {
        const double* acc = part.data() + (size_t)c * 2 * K;
        for (int m = 0; m < 2 * K; ++m) out[m] = norm == N_LINF ? std::max(out[m], acc[m]) : out[m] + acc[m];
    }
    if (norm == N_L2)
        for (auto& v : out) v = std::sqrt(v);
    return out;
}

// ================================ DELLA keep bits ========================================
// Rows along dim 1: element (o, t, j) at flat (o*len + t)*inner + j. Within each row, rank by
// (|d| descending, index ascending) with a stable LSD radix sort of the 31-bit keys; ascending
// rank a = len-1-pos; keep iff u < c1 + (a / (len-1)) * c2. Bits are ORed into zeroed buffers.
std::vector<double> della_bits(uint64_t base_ptr, const std::vector<uint64_t>& models, int dt,
                               int64_t outer, int64_t len, int64_t inner,
                               const std::vector<int>& which, const std::vector<float>& c1,
                               const std::vector<float>& c2, uint64_t seed,
                               const std::vector<uint64_t>& bits_out, int norm, int nthreads) {
    const void* base = (const void*)base_ptr;
    const int K = (int)models.size();
    std::vector<double> out(2 * (size_t)K, 0.0);
    const int64_t rows = outer * inner;
    const int64_t n = rows * len;
    if (n == 0) return out;
    const PhiloxKey key = philox_key(seed);
    int nt = nthreads > 0 ? nthreads : 1;
    if (rows < nt) nt = (int)rows;
    for (int m : which) {
        const void* x = (const void*)models[m];
        uint64_t* bits = (uint64_t*)bits_out[m];
        std::vector<double> part(2 * (size_t)rows, 0.0);  // per row, summed in row order below
#pragma omp parallel num_threads(nt)
        {
            std::vector<float> d(len), u(len + 12);
            std::vector<uint32_t> keys(len), ia(len), ib(len);
            std::vector<uint64_t> rowbits(len / 64 + 2);
            std::vector<uint32_t> cnt(2048);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; ++r) {
                const int64_t o = r / inner, jj = r % inner;
                const int64_t first = o * len * inner + jj;  // flat index of t = 0
                for (int64_t t = 0; t < len; ++t) {
                    const int64_t i = first + t * inner;
                    float v = load_one(x, dt, i);
                    if (base) v = v - load_one(base, dt, i);
                    d[t] = v;
                    keys[t] = 0x7fffffffu - mag_key(v);  // ascending order = descending |d|
                    ia[t] = (uint32_t)t;
                }
                // stable LSD radix sort of indices by keys: digits of 11, 10, 10 bits
                const int shifts[3] = {0, 11, 21}, widths[3] = {11, 10, 10};
                uint32_t* src = ia.data();
                uint32_t* dst = ib.data();
                for (int pass = 0; pass < 3; ++pass) {
                    const int nb = 1 << widths[pass];
                    const uint32_t mask = (uint32_t)nb - 1;
                    std::fill(cnt.begin(), cnt.begin() + nb, 0u);
                    for (int64_t t = 0; t < len; ++t) cnt[(keys[src[t]] >> shifts[pass]) & mask]++;
                    if (cnt[(keys[src[0]] >> shifts[pass]) & mask] == (uint32_t)len) continue;  // one digit
                    uint32_t sum = 0;
                    for (int b = 0; b < nb; ++b) { const uint32_t c = cnt[b]; cnt[b] = sum; sum += c; }
                    for (int64_t t = 0; t < len; ++t) { const uint32_t e = src[t]; dst[cnt[(keys[e] >> shifts[pass]) & mask]++] = e; }
                    std::swap(src, dst);
                }
                // uniforms of the row's elements (contiguous rows: the vectorised block generator)
                const float* uf = u.data();
                if (inner == 1) {
                    const int64_t a0 = first & ~(int64_t)3;
                    const int off = (int)(first - a0);
                    philox_uniform_block(key, a0, (int)(len + off), (uint32_t)m, u.data());
                    uf = u.data() + off;
                } else {
                    for (int64_t t = 0; t < len; ++t) {
                        const int64_t i = first + t * inner;
                        uint32_t w[4];
                        philox(key, (uint64_t)i >> 2, (uint32_t)m, w);
                        u[t] = (float)(w[i & 3] >> 8) * UNIFORM_SCALE;
                    }
                }
                std::fill(rowbits.begin(), rowbits.end(), 0ull);
                const float den = (float)(len - 1);
                const int shift0 = inner == 1 ? (int)(first & 63) : 0;
                double before = 0, after = 0;
                for (int64_t pos = 0; pos < len; ++pos) {
                    const uint32_t t = src[pos];
                    const float rn = len > 1 ? (float)(len - 1 - pos) / den : 0.0f;
                    const float prod = rn * c2[m];
                    const float p = c1[m] + prod;
                    const bool keep = uf[t] < p;
                    const double v = norm == N_L2 ? (double)d[t] * d[t] : std::fabs((double)d[t]);
                    if (norm == N_LINF) { before = std::max(before, v); if (keep) after = std::max(after, v); }
                    else { before += v; if (keep) after += v; }
                    if (keep) {
                        if (inner == 1) rowbits[(t + shift0) >> 6] |= 1ull << ((t + shift0) & 63);
                        else {
                            const int64_t i = first + (int64_t)t * inner;
                            __atomic_fetch_or(bits + (i >> 6), 1ull << (i & 63), __ATOMIC_RELAXED);
                        }
                    }
                }
                if (inner == 1) {
                    const int64_t w0 = first >> 6;
                    const int64_t nw = (shift0 + len + 63) / 64;
                    for (int64_t w = 0; w < nw; ++w)
                        if (rowbits[w]) __atomic_fetch_or(bits + w0 + w, rowbits[w], __ATOMIC_RELAXED);
                }
                part[2 * r] = before;
                part[2 * r + 1] = after;
            }
        }
        double before_all = 0, after_all = 0;
        for (int64_t r = 0; r < rows; ++r) {
            if (norm == N_LINF) { before_all = std::max(before_all, part[2 * r]); after_all = std::max(after_all, part[2 * r + 1]); }
            else { before_all += part[2 * r]; after_all += part[2 * r + 1]; }
        }
        if (norm == N_L2) { before_all = std::sqrt(before_all); after_all = std::sqrt(after_all); }
        out[2 * m] = before_all;
        out[2 * m + 1] = after_all;
    }
    return out;
}

// ================================= the fused merge =======================================

MergeBlock::MergeBlock(uint64_t base_ptr, const std::vector<uint64_t>& models, int dt, const MaskArgs& ma,
                       const MergeArgs& a, uint64_t sign_ptr)
    : bad(models.size() + 2, 0), base_((const void*)base_ptr), models_(models), dt_(dt), K_((int)models.size()),
      ma_(ma), a_(a), sign_((int8_t*)sign_ptr), key_(philox_key(ma.seed)),
      need_s_(a.consensus != C_NONE && !a.elect_weighted),
      plain_(a.consensus == C_NONE && a.scale_mode == S_NONE &&
             std::all_of(ma.kind.begin(), ma.kind.end(), [](int k) { return k == M_NONE; })),
      V_((size_t)K_ * BLK), S_(need_s_ ? (size_t)K_ * BLK : 0) {}

bool MergeBlock::run(int64_t i0, int len, float* __restrict mixed) {
    const int K = K_;
    const MaskArgs& ma = ma_;
    const MergeArgs& a = a_;
    float* __restrict bb = bb_;
    float* __restrict d = d_;
    float* __restrict total = total_;
    float* __restrict div = div_;
    if (plain_) {
        run_plain(i0, len, mixed);
        return true;
    }
    if (base_) {
        load_block(base_, dt_, i0, len, bb);
        int f = 0;
        for (int j = 0; j < len; ++j) f |= nonfinite_bits(bb[j]);
        bad[K] |= f;
    }
    for (int m = 0; m < K; ++m) {
        load_block((const void*)models_[m], dt_, i0, len, d);
        int f = 0;
        for (int j = 0; j < len; ++j) f |= nonfinite_bits(d[j]);
        bad[m] |= f;
        if (base_)
            for (int j = 0; j < len; ++j) d[j] = d[j] - bb[j];
        float* v = V_.data() + (size_t)m * BLK;
        if (ma.kind[m] != M_NONE) {
            eval_mask(ma, key_, m, i0, len, d, keep_, tmp_);
            for (int j = 0; j < len; ++j) d[j] = u2f(f2u(d[j]) & keep_[j]);  // dropped -> +0
        }
        if (a.scale_mode == S_MUL) {
            const float s = a.scale[m];
            for (int j = 0; j < len; ++j) d[j] = d[j] * s;
        } else if (a.scale_mode == S_DIV) {
            const float s = a.scale[m];
            for (int j = 0; j < len; ++j) d[j] = d[j] / s;
        }
        if (need_s_) std::memcpy(S_.data() + (size_t)m * BLK, d, sizeof(float) * len);
        const float w = a.weights[m];
        for (int j = 0; j < len; ++j) v[j] = d[j] * w;
    }
    for (int j = 0; j < len; ++j) mixed[j] = 0.0f;
    bool have_div = false;
    if (a.consensus == C_NONE) {
        for (int m = 0; m < K; ++m) {
            const float* v = V_.data() + (size_t)m * BLK;
            for (int j = 0; j < len; ++j) mixed[j] = mixed[j] + v[j];
        }
    } else {
        const float* E = a.elect_weighted ? V_.data() : S_.data();
        if (a.consensus == C_GIVEN) {
            for (int j = 0; j < len; ++j) total[j] = sign_[i0 + j] > 0 ? 1.0f : -1.0f;
        } else {
            for (int j = 0; j < len; ++j) total[j] = 0.0f;
            for (int m = 0; m < K; ++m) {
                const float* e = E + (size_t)m * BLK;
                if (a.consensus == C_SUM)
                    for (int j = 0; j < len; ++j) total[j] = total[j] + e[j];
                else
                    for (int j = 0; j < len; ++j) total[j] = total[j] + (float)((e[j] > 0.0f) - (e[j] < 0.0f));
            }
        }
        if (a.sign_only) {
            for (int j = 0; j < len; ++j) sign_[i0 + j] = total[j] >= 0.0f ? 1 : -1;
            return false;
        }
        for (int j = 0; j < len; ++j) div[j] = 0.0f;
        for (int m = 0; m < K; ++m) {
            const float* e = E + (size_t)m * BLK;
            const float* v = V_.data() + (size_t)m * BLK;
            const float w = a.divisor == D_COUNT ? 1.0f : a.weights[m];
            const uint32_t wb = f2u(w);
            for (int j = 0; j < len; ++j) {
                // branch-free so it vectorises: agree iff sign(e) == elected sign;
                // a disagreeing input adds +0 exactly like the reference's where(.., 0)
                const uint32_t pos = (uint32_t)(total[j] >= 0.0f);
                const uint32_t agree = (pos & (uint32_t)(e[j] > 0.0f)) | ((pos ^ 1u) & (uint32_t)(e[j] < 0.0f));
                const uint32_t mk = 0u - agree;
                mixed[j] = mixed[j] + u2f(f2u(v[j]) & mk);
                div[j] = div[j] + u2f(wb & mk);
            }
        }
        if (a.divisor == D_COUNT)
            for (int j = 0; j < len; ++j) div[j] = div[j] < 1.0f ? 1.0f : div[j];
        else
            for (int j = 0; j < len; ++j) div[j] = div[j] == 0.0f ? 1.0f : div[j];
        have_div = true;
    }
    finish(len, mixed, have_div);
    round_to(round_dt_, mixed, len);
    return true;
}

#ifdef __AVX2__
static inline __m256 load8(const void* p, int dt, int64_t i) {
    if (dt == F32) return _mm256_loadu_ps((const float*)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
    if (dt == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}
#endif

#ifdef __AVX2__
template <class F>
static inline void with_bool(bool b, F&& f) {
    if (b) f(std::true_type{});
    else f(std::false_type{});
}

// The tail of one merged vector of a plain merge: normalize by the constant divisor, lambda,
// + base, non-finite check, rounding to the output dtype. The options are template parameters,
// so the hot loops below carry no per-vector branches (measured: the branchy tail cost more
// than the merge arithmetic).
template <bool DIV, bool LAM, bool BASE, bool CHECK, int RDT>
struct PlainTail {
    static constexpr bool base = BASE;
    __m256 cd, lam;
    __m256 operator()(__m256 acc, __m256 b, __m256i& nf) const {
        if (DIV) acc = _mm256_div_ps(acc, cd);
        if (LAM) acc = _mm256_mul_ps(acc, lam);
        if (BASE) acc = _mm256_add_ps(b, acc);
        if (CHECK) {
            const __m256i em = _mm256_set1_epi32(0x7f800000);
            nf = _mm256_or_si256(nf, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(acc), em), em));
        }
        return round8(RDT, acc);
    }
};

// run_plain's vector loops for one Tail; returns the index of the first element left to the
// scalar loop. bf16: 16 bf16 -> two fp32 vectors by interleaving with zeros, which yields
// elements 0-3, 8-11 and 4-7, 12-15 (per 128-bit lane); every input shares the order and the
// store restores it (cheaper than widening 8 at a time). (x - base) * w skips the multiply
// when every weight is 1: the same value, exactly. Two vectors per step: independent add
// chains hide the add latency across the K inputs.
template <bool UNIT, class Tail>
static int plain_vectors(const Tail& tail, const void* base, const uint64_t* models, const float* weights, int K,
                         int dt, int64_t i0, int len, float* __restrict mixed, __m256i& nf) {
    constexpr bool B = Tail::base;
    int j = 0;
    if (dt == BF16) {
        const __m256i z = _mm256_setzero_si256();
        auto lo = [&](__m256i h) { return _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, h)); };
        auto hi = [&](__m256i h) { return _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, h)); };
        for (; j + 16 <= len; j += 16) {
            __m256 b0 = _mm256_setzero_ps(), b1 = b0;
            if (B) {
                const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)base + i0 + j));
                b0 = lo(h);
                b1 = hi(h);
            }
            __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
            for (int m = 0; m < K; ++m) {
                const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)models[m] + i0 + j));
                __m256 t0 = B ? _mm256_sub_ps(lo(h), b0) : lo(h), t1 = B ? _mm256_sub_ps(hi(h), b1) : hi(h);
                if (!UNIT) {
                    const __m256 w = _mm256_set1_ps(weights[m]);
                    t0 = _mm256_mul_ps(t0, w);
                    t1 = _mm256_mul_ps(t1, w);
                }
                acc0 = _mm256_add_ps(acc0, t0);
                acc1 = _mm256_add_ps(acc1, t1);
            }
            acc0 = tail(acc0, b0, nf);
            acc1 = tail(acc1, b1, nf);
            _mm256_storeu_ps(mixed + j, _mm256_permute2f128_ps(acc0, acc1, 0x20));
            _mm256_storeu_ps(mixed + j + 8, _mm256_permute2f128_ps(acc0, acc1, 0x31));
        }
    }
    for (; j + 16 <= len; j += 16) {
        const __m256 b0 = B ? load8(base, dt, i0 + j) : _mm256_setzero_ps();
        const __m256 b1 = B ? load8(base, dt, i0 + j + 8) : _mm256_setzero_ps();
        __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
        for (int m = 0; m < K; ++m) {
            const __m256 w = _mm256_set1_ps(weights[m]);
            const __m256 x0 = load8((const void*)models[m], dt, i0 + j);
            const __m256 x1 = load8((const void*)models[m], dt, i0 + j + 8);
            acc0 = _mm256_add_ps(acc0, _mm256_mul_ps(B ? _mm256_sub_ps(x0, b0) : x0, w));
            acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(B ? _mm256_sub_ps(x1, b1) : x1, w));
        }
        _mm256_storeu_ps(mixed + j, tail(acc0, b0, nf));
        _mm256_storeu_ps(mixed + j + 8, tail(acc1, b1, nf));
    }
    for (; j + 8 <= len; j += 8) {
        const __m256 b = B ? load8(base, dt, i0 + j) : _mm256_setzero_ps();
        __m256 acc = _mm256_setzero_ps();
        for (int m = 0; m < K; ++m) {
            const __m256 x = load8((const void*)models[m], dt, i0 + j);
            acc = _mm256_add_ps(acc, _mm256_mul_ps(B ? _mm256_sub_ps(x, b) : x, _mm256_set1_ps(weights[m])));
        }
        _mm256_storeu_ps(mixed + j, tail(acc, b, nf));
    }
    return j;
}
#endif

// Task arithmetic / linear (no masks, rescale or consensus): mixed = sum_m (x_m - base) * w_m,
// normalized, times lambda, plus base: the general path's float operations in its order, but
// each input is loaded and accumulated in registers (the buffer round trips of the general path
// cost more than the arithmetic). Without masks a non-finite input always makes the fp32
// result non-finite (inf - inf, inf * 0 and nan all propagate), so the result is checked once
// instead of every input: bad[K + 1] says "some input" and the caller names it (a rescan, on
// the error path only).
void MergeBlock::run_plain(int64_t i0, int len, float* __restrict mixed) {
    const MergeArgs& a = a_;
    const int K = K_;
    const bool div_const = a.normalize && a.divisor == D_CONST, scale = a.lam != 1.0f;
    int j = 0;
    uint32_t f = 0;
#ifdef __AVX2__
    __m256i nf = _mm256_setzero_si256();
    const bool unit = std::all_of(a.weights.begin(), a.weights.end(), [](float w) { return w == 1.0f; });
    const uint64_t* models = models_.data();
    const float* weights = a.weights.data();
    with_bool(div_const, [&](auto DIV) {
    with_bool(scale, [&](auto LAM) {
    with_bool(base_ != nullptr, [&](auto BASE) {
    with_bool(check_result_, [&](auto CHECK) {
    with_bool(unit, [&](auto UNIT) {
        auto go = [&](auto tail) {
            j = plain_vectors<decltype(UNIT)::value>(tail, base_, models, weights, K, dt_, i0, len, mixed, nf);
        };
        const __m256 cd = _mm256_set1_ps(a.const_div), lam = _mm256_set1_ps(a.lam);
        constexpr bool D = decltype(DIV)::value, L = decltype(LAM)::value, B = decltype(BASE)::value,
                       C = decltype(CHECK)::value;
        if (round_dt_ == BF16) go(PlainTail<D, L, B, C, BF16>{cd, lam});
        else if (round_dt_ == F16) go(PlainTail<D, L, B, C, F16>{cd, lam});
        else go(PlainTail<D, L, B, C, F32>{cd, lam});
    }); }); }); }); });
    f = (uint32_t)!_mm256_testz_si256(nf, nf);
#endif
    for (; j < len; ++j) {
        const float b = base_ ? load_one(base_, dt_, i0 + j) : 0.0f;
        float acc = 0.0f;
        for (int m = 0; m < K; ++m) {
            const float x = load_one((const void*)models_[m], dt_, i0 + j);
            acc = acc + (base_ ? x - b : x) * a.weights[m];
        }
        if (div_const) acc = acc / a.const_div;
        if (scale) acc = acc * a.lam;
        if (base_) acc = b + acc;
        if (check_result_) f |= nonfinite_bits(acc);
        round_to(round_dt_, &acc, 1);
        mixed[j] = acc;
    }
    bad[K + 1] |= (int)f;
}

// Prefetch elements i0 .. i0+len-1 of every input (see MergeBlock in kernels.h).
void MergeBlock::prefetch(int64_t i0, int len) const {
    const int esz = dt_ == F32 ? 4 : 2;
    const int64_t a = i0 * esz, e = (i0 + len) * esz;
    for (int m = -1; m < K_; ++m) {
        const char* p = (const char*)(m < 0 ? base_ : (const void*)models_[m]);
        if (!p) continue;
        // prefetcht1 (into L2): measured faster than prefetcht0 here, the fills no longer
        // compete with the demand loads for L1's miss buffers
        for (int64_t off = a; off < e; off += 64) __builtin_prefetch(p + off, 0, 2);
    }
}

// normalize, lambda, + base
void MergeBlock::finish(int len, float* __restrict mixed, bool have_div) {
    const MergeArgs& a = a_;
    const float* __restrict div = div_;
    const float* __restrict bb = bb_;
    if (a.normalize) {
        if (have_div) for (int j = 0; j < len; ++j) mixed[j] = mixed[j] / div[j];
        else if (a.divisor == D_CONST) for (int j = 0; j < len; ++j) mixed[j] = mixed[j] / a.const_div;
    }
    if (a.lam != 1.0f)
        for (int j = 0; j < len; ++j) mixed[j] = mixed[j] * a.lam;
    if (base_)
        for (int j = 0; j < len; ++j) mixed[j] = bb[j] + mixed[j];
}

// Returns K+2 flags: non-finite values seen in input m, in base, and (mask-free plans, which check
// the result instead of each input) in some input.
std::vector<int> fused_merge(uint64_t base_ptr, const std::vector<uint64_t>& models, int dt,
                             uint64_t out_ptr, int out_dt, int64_t n, const MaskArgs& ma,
                             const MergeArgs& a, uint64_t sign_ptr, int nthreads) {
    const int K = (int)models.size();
    const int nt = threads_for(nthreads, n);
    const int64_t nblocks = (n + BLK - 1) / BLK;
    std::vector<int> flags(K + 2, 0);
    advise_huge((void*)out_ptr, n * (out_dt == F32 ? 4 : 2));
#pragma omp parallel num_threads(nt)
    {
        MergeBlock mb(base_ptr, models, dt, ma, a, sign_ptr);
        alignas(64) float mixed[BLK];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t i0 = b * BLK;
            const int len = (int)std::min<int64_t>(BLK, n - i0);
            if (mb.run(i0, len, mixed)) store_block((void*)out_ptr, out_dt, i0, len, mixed);
        }
#pragma omp critical
        for (int m = 0; m < K + 2; ++m) flags[m] |= mb.bad[m];
    }
    return flags;
}

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace fm
