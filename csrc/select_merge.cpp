// The TIES family (ties, breadcrumbs, breadcrumbs_ties, magnitude-pruned task arithmetic) in
// one streaming pass: exact top-k masks without a pass that only selects.
//
// A sample brackets each top-k threshold (bracket.h). The pass then reads base + K inputs
// once and, per element and model, knows from the bracket alone whether |d| is surely in the
// top set (key > hi), surely out (key < lo) or undecided (lo <= key <= hi, about 1% of the
// elements). It counts the sure keys, collects the undecided ones as candidates, merges every
// element with the sure keep decisions and writes the output once; an element with any
// undecided model is also recorded (its index, base and K deltas, a few % of the elements).
// Afterwards the candidates give the exact thresholds and tie cuts (resolve_bracket), and
// only the recorded elements are merged again, from their records, with the exact masks. Sign
// election and the disjoint mean are per element, so no other element can change.
//
// Same float operations in the same order as MergeBlock::run (fused_merge.cpp): results are
// bit-identical to select_ranges + fused_merge. A bracket that misses (a sample off by more
// than 4 standard deviations) returns status 1 and the caller runs those two passes instead.
// Triton's counterpart: triton_kernels/magnitude_select.py + triton_kernels/fused_merge.py.
#include "bracket.h"
#include "common.h"
#include "kernels.h"
#include "masks.h"

#include <algorithm>
#include <climits>
#include <vector>

namespace fm {

namespace {

constexpr int KMAX = SELECT_MERGE_KMAX;

// One cut of a model's mask (its stop or start query): key > hi is surely in the query's top
// set; lo <= key <= hi is undecided, a candidate of bracketed query tq. tq < 0: the set is
// known exactly (nothing, everything), and nothing is undecided. T, J: the exact set, once
// known (in_top_bits).
struct Cut {
    int32_t lo, hi;
    int tq;
    TopSet exact;
};

// An exact cut: everything (k >= n) or nothing (k <= 0) is in the top set.
Cut exact_cut(bool all, int64_t n) {
    if (all) return Cut{0, -1, -1, TopSet{0, n}};
    return Cut{INT32_MAX, INT32_MAX, -1, TopSet{NONE_T, -1}};
}

inline uint32_t in_top(uint32_t key, int64_t i, const Cut& c) { return in_top_bits(key, i, c.exact); }

// MergeBlock::run's float operations for one element: base b, deltas d[m], keep bits.
inline float merge_one(float b, bool has_base, const float* d, const uint32_t* keep, int K, const MergeArgs& a) {
    float v[KMAX], e[KMAX];
    for (int m = 0; m < K; ++m) {
        const float dm = u2f(f2u(d[m]) & keep[m]);
        v[m] = dm * a.weights[m];
        e[m] = a.elect_weighted ? v[m] : dm;
    }
    float mixed = 0.0f;
    if (a.consensus == CONSENSUS_NONE) {
        for (int m = 0; m < K; ++m) mixed = mixed + v[m];
        if (a.normalize && a.divisor == DIVISOR_CONST) mixed = mixed / a.const_div;
    } else {
        float total = 0.0f;
        for (int m = 0; m < K; ++m)
            total = total + (a.consensus == CONSENSUS_SUM ? e[m] : (float)((e[m] > 0.0f) - (e[m] < 0.0f)));
        float div = 0.0f;
        const uint32_t pos = (uint32_t)(total >= 0.0f);
        for (int m = 0; m < K; ++m) {
            const uint32_t agree = (pos & (uint32_t)(e[m] > 0.0f)) | ((pos ^ 1u) & (uint32_t)(e[m] < 0.0f));
            const uint32_t mk = 0u - agree;
            const float w = a.divisor == DIVISOR_COUNT ? 1.0f : a.weights[m];
            mixed = mixed + u2f(f2u(v[m]) & mk);
            div = div + u2f(f2u(w) & mk);
        }
        if (a.divisor == DIVISOR_COUNT) div = div < 1.0f ? 1.0f : div;
        else div = div == 0.0f ? 1.0f : div;
        if (a.normalize) mixed = mixed / div;
    }
    if (a.lam != 1.0f) mixed = mixed * a.lam;
    if (has_base) mixed = b + mixed;
    return mixed;
}

// Per-thread state of the pass.
struct Worker {
    std::vector<int64_t> above;             // per bracketed query: keys > hi
    std::vector<std::vector<Cand>> cands;   // per bracketed query: keys in [lo, hi]
    std::vector<int64_t> rec_idx;           // recorded elements
    std::vector<float> rec_val;             // (base, d_0 .. d_{K-1}) per recorded element
    std::vector<int> bad;                   // non-finite: per model, base, result
};

struct Pass {
    const void* base;
    const std::vector<uint64_t>& models;
    int dt, K;
    void* out;
    int out_dt;
    const MergeArgs& a;
    const std::vector<Cut>& stop;
    const std::vector<Cut>& start;
    bool stream;  // non-temporal stores of the output

    // one element, scalar: classify, count, collect, merge with the sure decisions
    void element(Worker& w, int64_t i) const {
        const int K_ = K;
        const float b = base ? load_one(base, dt, i) : 0.0f;
        float d[KMAX];
        uint32_t keep[KMAX];
        bool undecided = false;
        if (base) w.bad[K_] |= nonfinite_bits(b);
        for (int m = 0; m < K_; ++m) {
            const float x = load_one((const void*)models[m], dt, i);
            d[m] = base ? x - b : x;
            const uint32_t key = mag_key(d[m]);
            w.bad[m] |= nonfinite_bits(x);
            const int32_t k = (int32_t)key;
            uint32_t kp = 1;
            for (const Cut* c : {&stop[m], &start[m]}) {
                const bool gt = k > c->hi, unk = c->tq >= 0 && !gt && k >= c->lo;
                if (c->tq >= 0) {
                    w.above[c->tq] += gt;
                    if (unk) w.cands[c->tq].push_back(Cand{key, i});
                    undecided |= unk;
                }
                kp &= c == &stop[m] ? (uint32_t)gt : (uint32_t)!(gt || unk);
            }
            keep[m] = 0u - kp;
        }
        float r = merge_one(b, base != nullptr, d, keep, K_, a);
        round_to(out_dt, &r, 1);
        w.bad[K_ + 1] |= !undecided && nonfinite_bits(r);
        store_block(out, out_dt, i, 1, &r);
        if (undecided) {
            w.rec_idx.push_back(i);
            w.rec_val.push_back(b);
            w.rec_val.insert(w.rec_val.end(), d, d + K_);
        }
    }

#ifdef __AVX2__
    static inline __m256 load8(const void* p, int dt, int64_t i) {
        if (dt == DTYPE_F32) return _mm256_loadu_ps((const float*)p + i);
        const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
        if (dt == DTYPE_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        return _mm256_cvtph_ps(h);
    }

    inline void store8(int64_t i, __m256 r) const {
        if (out_dt == DTYPE_F32) {
            float* p = (float*)out + i;
            if (stream) _mm256_stream_ps(p, r);
            else _mm256_storeu_ps(p, r);
            return;
        }
        __m128i h;
        if (out_dt == DTYPE_BF16) {
            const __m256i s = _mm256_srli_epi32(_mm256_castps_si256(r), 16);
            h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(s, s), 0x08));
        } else {
            h = _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT);
        }
        __m128i* p = (__m128i*)((uint16_t*)out + i);
        if (stream) _mm_stream_si128(p, h);
        else _mm_storeu_si128(p, h);
    }

    // 8 elements from i: the vector form of element() (same decisions, same float operations)
    template <int CONS>
    inline void vec8(Worker& w, int64_t i, __m256i* cnt, __m256i& nfv) const {
        const int K_ = K;
        const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
        const __m256i absmask = _mm256_set1_epi32(0x7fffffff), finmax = _mm256_set1_epi32(0x7f7fffff);
        const __m256 b = base ? load8(base, dt, i) : zero;
        if (base) nfv = _mm256_or_si256(nfv, _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_castps_si256(b), absmask), finmax));
        __m256 D[KMAX], V[KMAX], E[KMAX];
        __m256i undecided = _mm256_setzero_si256();
        for (int m = 0; m < K_; ++m) {
            const __m256 x = load8((const void*)models[m], dt, i);
            D[m] = base ? _mm256_sub_ps(x, b) : x;
            const __m256i key = _mm256_and_si256(_mm256_castps_si256(D[m]), absmask);
            // the input itself, not its delta (an inf delta of finite inputs is an overflow)
            nfv = _mm256_or_si256(nfv, _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_castps_si256(x), absmask), finmax));
            const Cut& cs = stop[m];
            const Cut& ct = start[m];
            const __m256i gs = _mm256_cmpgt_epi32(key, _mm256_set1_epi32(cs.hi));
            __m256i keep = gs;
            if (cs.tq >= 0) {
                const __m256i us = _mm256_andnot_si256(_mm256_or_si256(gs, _mm256_cmpgt_epi32(_mm256_set1_epi32(cs.lo), key)),
                                                       _mm256_set1_epi32(-1));
                cnt[cs.tq] = _mm256_sub_epi32(cnt[cs.tq], gs);
                collect(w, cs.tq, i, key, us);
                undecided = _mm256_or_si256(undecided, us);
            }
            if (ct.tq >= 0 || ct.hi < 0) {
                const __m256i gt = _mm256_cmpgt_epi32(key, _mm256_set1_epi32(ct.hi));
                const __m256i lo_t = _mm256_cmpgt_epi32(_mm256_set1_epi32(ct.lo), key);  // surely not in start's set
                keep = _mm256_and_si256(keep, lo_t);
                if (ct.tq >= 0) {
                    const __m256i ut = _mm256_andnot_si256(_mm256_or_si256(gt, lo_t), _mm256_set1_epi32(-1));
                    cnt[ct.tq] = _mm256_sub_epi32(cnt[ct.tq], gt);
                    collect(w, ct.tq, i, key, ut);
                    undecided = _mm256_or_si256(undecided, ut);
                }
            }
            const __m256 dm = _mm256_and_ps(D[m], _mm256_castsi256_ps(keep));
            V[m] = _mm256_mul_ps(dm, _mm256_set1_ps(a.weights[m]));
            E[m] = a.elect_weighted ? V[m] : dm;
        }
        __m256 mixed = zero;
        if (CONS == CONSENSUS_NONE) {
            for (int m = 0; m < K_; ++m) mixed = _mm256_add_ps(mixed, V[m]);
            if (a.normalize && a.divisor == DIVISOR_CONST) mixed = _mm256_div_ps(mixed, _mm256_set1_ps(a.const_div));
        } else {
            __m256 total = zero;
            for (int m = 0; m < K_; ++m) {
                if (CONS == CONSENSUS_SUM) total = _mm256_add_ps(total, E[m]);
                else
                    total = _mm256_add_ps(total, _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(E[m], zero, _CMP_GT_OQ), one),
                                                               _mm256_and_ps(_mm256_cmp_ps(E[m], zero, _CMP_LT_OQ), one)));
            }
            const __m256 pos = _mm256_cmp_ps(total, zero, _CMP_GE_OQ);
            __m256 div = zero;
            for (int m = 0; m < K_; ++m) {
                const __m256 agree = _mm256_or_ps(_mm256_and_ps(pos, _mm256_cmp_ps(E[m], zero, _CMP_GT_OQ)),
                                                  _mm256_andnot_ps(pos, _mm256_cmp_ps(E[m], zero, _CMP_LT_OQ)));
                const float wd = a.divisor == DIVISOR_COUNT ? 1.0f : a.weights[m];
                mixed = _mm256_add_ps(mixed, _mm256_and_ps(V[m], agree));
                div = _mm256_add_ps(div, _mm256_and_ps(_mm256_set1_ps(wd), agree));
            }
            if (a.divisor == DIVISOR_COUNT) div = _mm256_blendv_ps(div, one, _mm256_cmp_ps(div, one, _CMP_LT_OQ));
            else div = _mm256_blendv_ps(div, one, _mm256_cmp_ps(div, zero, _CMP_EQ_OQ));
            if (a.normalize) mixed = _mm256_div_ps(mixed, div);
        }
        if (a.lam != 1.0f) mixed = _mm256_mul_ps(mixed, _mm256_set1_ps(a.lam));
        if (base) mixed = _mm256_add_ps(b, mixed);
        const __m256 r = round8(out_dt, mixed);
        // an undecided element's value is provisional: its record is checked once merged again
        const __m256i rnf = _mm256_castps_si256(
            _mm256_cmp_ps(_mm256_and_ps(r, _mm256_castsi256_ps(absmask)), _mm256_set1_ps(3.40282347e38f), _CMP_NLE_UQ));
        w.bad[K_ + 1] |= !_mm256_testz_si256(rnf, _mm256_xor_si256(undecided, _mm256_set1_epi32(-1)));
        store8(i, r);
        unsigned um = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(undecided));
        if (um) {
            alignas(32) float lanes[KMAX + 1][8];
            _mm256_store_ps(lanes[0], b);
            for (int m = 0; m < K_; ++m) _mm256_store_ps(lanes[m + 1], D[m]);
            while (um) {
                const int t = __builtin_ctz(um);
                um &= um - 1;
                w.rec_idx.push_back(i + t);
                for (int m = 0; m <= K_; ++m) w.rec_val.push_back(lanes[m][t]);
            }
        }
    }

    static inline void collect(Worker& w, int tq, int64_t i, __m256i key, __m256i und) {
        unsigned mk = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(und));
        if (!mk) return;
        alignas(32) uint32_t k[8];
        _mm256_store_si256((__m256i*)k, key);
        while (mk) {
            const int t = __builtin_ctz(mk);
            mk &= mk - 1;
            w.cands[tq].push_back(Cand{k[t], i + t});
        }
    }
#endif

    // elements i0 .. i0+len-1
    void block(Worker& w, int64_t i0, int len, int TQ) const {
        int j = 0;
#ifdef __AVX2__
        __m256i cnt[2 * KMAX];
        for (int q = 0; q < TQ; ++q) cnt[q] = _mm256_setzero_si256();
        __m256i nfv = _mm256_setzero_si256();
        auto run = [&](auto cons) {
            for (; j + 8 <= len; j += 8) vec8<decltype(cons)::value>(w, i0 + j, cnt, nfv);
        };
        if (a.consensus == CONSENSUS_SUM) run(std::integral_constant<int, CONSENSUS_SUM>{});
        else if (a.consensus == CONSENSUS_COUNT) run(std::integral_constant<int, CONSENSUS_COUNT>{});
        else run(std::integral_constant<int, CONSENSUS_NONE>{});
        for (int q = 0; q < TQ; ++q) {
            alignas(32) int32_t c[8];
            _mm256_store_si256((__m256i*)c, cnt[q]);
            for (int t = 0; t < 8; ++t) w.above[q] += c[t];
        }
        // some input holds inf/nan: the caller rescans to name it (bad[0] stands for "an input")
        if (!_mm256_testz_si256(nfv, nfv)) w.bad[0] = 1;
#endif
        for (; j < len; ++j) element(w, i0 + j);
    }
};

}  // namespace

// Returns {status, then the K+2 flags of fused_merge}: status 0: merged; 1: a bracket missed
// (nothing usable was written; run select_ranges + fused_merge); 2: not supported here
// (no AVX2, or K > KMAX). Flags: some input non-finite is flagged on input 0 (the caller
// rescans), the result's inf/nan on K+1.
std::vector<int> select_merge(uint64_t base_ptr, const std::vector<uint64_t>& models, int dt, uint64_t out_ptr,
                              int out_dt, int64_t n, const std::vector<int64_t>& k_stop,
                              const std::vector<int64_t>& k_start, const MergeArgs& a, int nthreads) {
    const int K = (int)models.size();
    std::vector<int> res(K + 3, 0);
#ifndef __AVX2__
    res[0] = 2;
    return res;
#endif
    if (K < 1 || K > KMAX || n < ((int64_t)1 << 20)) { res[0] = 2; return res; }
    const void* base = (const void*)base_ptr;
    const int nt = threads_for(nthreads, n);
    // the bracketed queries: model, k
    std::vector<int> q_model, todo;
    std::vector<int64_t> q_k;
    std::vector<Cut> stop(K), start(K);
    for (int m = 0; m < K; ++m) {
        for (int s = 0; s < 2; ++s) {
            const int64_t k = s == 0 ? k_stop[m] : k_start[m];
            Cut& c = s == 0 ? stop[m] : start[m];
            if (k <= 0 || k >= n) { c = exact_cut(k >= n, n); continue; }
            c = Cut{0, 0, (int)q_model.size(), TopSet{0, 0}};
            todo.push_back((int)q_model.size());
            q_model.push_back(m);
            q_k.push_back(k);
        }
    }
    const int TQ = (int)q_model.size();
    std::vector<uint32_t> lo, hi;
    std::vector<int64_t> expect;
    if (TQ) sample_brackets(base, models, dt, n, q_model, q_k, todo, lo, hi, expect, nt);
    for (int m = 0; m < K; ++m)
        for (Cut* c : {&stop[m], &start[m]})
            if (c->tq >= 0) {
                c->lo = (int32_t)std::min<uint32_t>(lo[c->tq], INT32_MAX);
                c->hi = (int32_t)std::min<uint32_t>(hi[c->tq], INT32_MAX);
            }
    const bool stream = ((uintptr_t)out_ptr & 31) == 0;
    Pass P{base, models, dt, K, (void*)out_ptr, out_dt, a, stop, start, stream};
    advise_huge((void*)out_ptr, n * (out_dt == DTYPE_F32 ? 4 : 2));
    const int64_t nblocks = (n + BLK - 1) / BLK;
    std::vector<Worker> workers(nt);
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        Worker& w = workers[omp_get_thread_num()];
#else
        Worker& w = workers[0];
#endif
        w.above.assign(TQ, 0);
        w.cands.resize(TQ);
        for (int q = 0; q < TQ; ++q) w.cands[q].reserve(expect[q] / nt + BLK);
        w.bad.assign(K + 2, 0);
        const int64_t nrec = TQ ? (n / nt) / 16 : 0;
        w.rec_idx.reserve(nrec);
        w.rec_val.reserve(nrec * (K + 1));
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t i0 = blk * BLK;
            P.block(w, i0, (int)std::min<int64_t>(BLK, n - i0), TQ);
        }
        if (stream) stream_fence();
    }
    for (Worker& w : workers)
        for (int f = 0; f < K + 2; ++f) res[1 + f] |= w.bad[f];
    for (int f = 0; f <= K; ++f)
        if (res[1 + f]) return res;  // a non-finite input: the caller names it and raises
    // the exact cuts
    bool ok = true;
    std::vector<int64_t> T(TQ), J(TQ);
    std::vector<char> good(TQ, 0);
#pragma omp parallel for num_threads(std::max(1, std::min(nt, TQ))) schedule(dynamic)
    for (int q = 0; q < TQ; ++q) {
        std::vector<Cand> all;
        int64_t above = 0;
        size_t tot = 0;
        for (Worker& w : workers) tot += w.cands[q].size();
        all.reserve(tot);
        for (Worker& w : workers) {
            above += w.above[q];
            all.insert(all.end(), w.cands[q].begin(), w.cands[q].end());
        }
        good[q] = resolve_bracket(all, q_k[q], above, T[q], J[q]);
    }
    for (int q = 0; q < TQ; ++q) ok = ok && good[q];
    if (!ok) { res[0] = 1; return res; }
    for (int m = 0; m < K; ++m)
        for (Cut* c : {&stop[m], &start[m]})
            if (c->tq >= 0) c->exact = TopSet{T[c->tq], J[c->tq]};
    // the recorded elements, merged again with the exact masks
    std::vector<int> rbad(nt, 0);
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        const Worker& w = workers[t];
        const size_t R = w.rec_idx.size();
        for (size_t r = 0; r < R; ++r) {
            const int64_t i = w.rec_idx[r];
            const float* v = w.rec_val.data() + r * (K + 1);
            uint32_t keep[KMAX];
            for (int m = 0; m < K; ++m) {
                const uint32_t key = mag_key(v[1 + m]);
                keep[m] = 0u - (in_top(key, i, stop[m]) & (in_top(key, i, start[m]) ^ 1u));
            }
            float x = merge_one(v[0], base != nullptr, v + 1, keep, K, a);
            round_to(out_dt, &x, 1);
            rbad[t] |= nonfinite_bits(x);
            store_block((void*)out_ptr, out_dt, i, 1, &x);
        }
    }
    for (int t = 0; t < nt; ++t) res[K + 2] |= rbad[t];
    return res;
}

}  // namespace fm
