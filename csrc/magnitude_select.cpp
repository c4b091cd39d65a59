// Exact top-k thresholds (select_ranges): per query, the top set key > T or (key == T and
// index <= J) over the fp32 bit patterns of |d| (mag_key). No sort, no mask. By input size:
//   n <= 2^16 : nth_element on the keys, which fit in cache (select_small);
//   n >= 2^20 : a sample brackets the k-th key and one streaming pass collects the few
//               candidates (select_bracket); a query whose bracket misses goes on to
//   the rest  : radix select: a 16-bit histogram pass, a 16-bit pass restricted to the chosen
//               bucket, and, only when ties at the threshold are split, a count pass that
//               finds the index cutoff.
// Triton's counterpart: triton_kernels/magnitude_select.py.
#include "common.h"
#include "bracket.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

namespace fm {

// ---- fast path: bracket the k-th key from a sample, then one streaming pass -------------
// A sample of 2^17 keys (8192 runs of 16 contiguous elements) brackets the k-th largest key
// in [lo, hi] with a margin of 4 standard deviations of the sample quantile. One pass
// counts keys above hi and collects the few in [lo, hi] with their indices; nth_element on the
// candidates in (key desc, index asc) order gives the exact threshold and tie cutoff. If the
// bracket misses (the count check fails), the caller falls back to the histogram passes.
// Brackets [lo[tq], hi[tq]] of the k-th largest key of the queries todo[tq] from a sample, and
// the expected number of keys inside each (bracket.h).
void sample_brackets(const void* base, const std::vector<uint64_t>& models, int dt, int64_t n,
                     const std::vector<int>& q_model, const std::vector<int64_t>& q_k, const std::vector<int>& todo,
                     std::vector<uint32_t>& lo, std::vector<uint32_t>& hi, std::vector<int64_t>& expect, int nt) {
    // RUNS runs of RUN consecutive keys, evenly spaced: 1/64 of the input, at most 2^17 keys
    // (the bracket's relative width shrinks as 1/sqrt(S); past 2^17 keys the sample's two
    // nth_elements cost more than the extra candidates they save)
    constexpr int RUN = 16;
    const int RUNS = (int)std::min<int64_t>(8192, std::max<int64_t>(1024, n >> 10));
    const int S = RUNS * RUN;
    const int TQ = (int)todo.size();
    lo.assign(TQ, 0);
    hi.assign(TQ, 0);
    expect.assign(TQ, 0);
#pragma omp parallel for num_threads(std::max(1, std::min(nt, TQ))) schedule(dynamic)
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
        // two order statistics of the sample (descending), no full sort: the second selection
        // runs on the side of the first that holds it, so select the rank nearer the middle
        // first (the other side is then the short one: about f * S or (1 - f) * S keys)
        auto desc = std::greater<uint32_t>();
        const bool has_hi = rh > 0, has_lo = rl < S - 1;
        if (has_lo && (!has_hi || rl <= S - rh)) {
            std::nth_element(sample.begin(), sample.begin() + rl, sample.end(), desc);
            lo[tq] = sample[rl];
            if (has_hi) { std::nth_element(sample.begin(), sample.begin() + rh, sample.begin() + rl, desc); hi[tq] = sample[rh]; }
            else hi[tq] = 0xffffffffu;
        } else {
            if (has_hi) { std::nth_element(sample.begin(), sample.begin() + rh, sample.end(), desc); hi[tq] = sample[rh]; }
            else hi[tq] = 0xffffffffu;
            if (has_lo) {
                std::nth_element(sample.begin() + std::max<int64_t>(rh, 0), sample.begin() + rl, sample.end(), desc);
                lo[tq] = sample[rl];
            } else lo[tq] = 0u;
        }
        expect[tq] = (int64_t)((double)(std::min<int64_t>(rl, S) - std::max<int64_t>(rh, 0) + 1) / S * n);
    }
}

// The exact (T, J) of a query from the count of keys above its bracket and the candidates
// inside it; false when the bracket missed the k-th key (bracket.h).
bool resolve_bracket(std::vector<Cand>& v, int64_t k, int64_t above, int64_t& T, int64_t& J) {
    const int64_t need = k - above;
    if (need < 1 || need > (int64_t)v.size()) return false;
    auto prio = [](const Cand& a, const Cand& b) { return a.key > b.key || (a.key == b.key && a.idx < b.idx); };
    std::nth_element(v.begin(), v.begin() + (need - 1), v.end(), prio);
    T = v[need - 1].key;
    J = v[need - 1].idx;
    return true;
}

static std::vector<int> select_bracket(const void* base, const std::vector<uint64_t>& models, int dt,
                                       int64_t n, const std::vector<int>& q_model,
                                       const std::vector<int64_t>& q_k, const std::vector<int>& todo,
                                       std::vector<int64_t>& out, int nt) {
    const int TQ = (int)todo.size();
    std::vector<uint32_t> lo, hi;
    std::vector<int64_t> expect;
    sample_brackets(base, models, dt, n, q_model, q_k, todo, lo, hi, expect, nt);
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
        ok[tq] = resolve_bracket(cands[tq], q_k[q], above[tq], out[2 * q], out[2 * q + 1]);
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
        if (k <= 0) { out[2 * q] = NONE_T; out[2 * q + 1] = -1; }
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

}  // namespace fm
