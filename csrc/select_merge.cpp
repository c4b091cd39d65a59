// The TIES family (ties, breadcrumbs, breadcrumbs_ties, magnitude-pruned task arithmetic) in
// one streaming pass: exact top-k masks without a pass that only selects.
//
// A sample brackets each top-k threshold (bracket.h). The pass then reads base + K inputs
// once and, per element and model, knows from the bracket alone whether |d| is surely in the
// top set (key > hi), surely out (key < lo) or undecided (lo <= key <= hi, about 1% of the
// elements). It counts the sure keys, collects the undecided ones as candidates, merges every
// element with the sure keep decisions and writes the output once; an element with any
// undecided model is also recorded (its index, base and K deltas: a few % of the elements).
// Afterwards the candidates give the exact thresholds and tie cuts (resolve_bracket), and
// only the recorded elements are merged again, from their records, with the exact masks. Sign
// election and the disjoint mean are per element, so no other element can change.
//
// Same float operations in the same order as MergeBlock::run (fused_merge.cpp): results are
// bit-identical to select_ranges + fused_merge. A bracket that misses (a sample off by more
// than 4 standard deviations) returns status 1 and the caller runs those two passes instead.
// The hot loop only computes and stores: undecided lanes are packed into the records and
// candidate lists with a lane-compaction table, branch-free, and the records are merged again
// 8 at a time by the same vector code.
// Triton's counterpart: triton_kernels/magnitude_select.py + triton_kernels/fused_merge.py.
#include "bracket.h"
#include "common.h"
#include "kernels.h"
#include "masks.h"

#include <algorithm>
#include <climits>
#include <type_traits>
#include <vector>

// The m-loops below are unrolled for a constant K; for K at run time (KT = 0) GCC then warns
// about the unused tails of the per-model arrays, which are never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fm {

namespace {

constexpr int KMAX = SELECT_MERGE_KMAX;

// One cut of a model's mask (its stop or start query): key > hi is surely in the query's top
// set; lo <= key <= hi is undecided, a candidate of bracketed query tq. tq < 0: the set is
// known exactly (nothing, everything), and nothing is undecided. exact: the set once known.
struct Cut {
    int32_t lo, hi;
    int tq;
    TopSet exact;
    // a start cut that can drop anything (bracketed, or exactly everything)
    bool drops() const { return tq >= 0 || hi < 0; }
};

[[maybe_unused]] Cut exact_cut(bool all, int64_t n) {
    if (all) return Cut{0, -1, -1, TopSet{0, n}};
    return Cut{INT32_MAX, INT32_MAX, -1, TopSet{NONE_T, -1}};
}

// Per-thread state of the pass: structure-of-arrays, grown a block at a time, filled by
// compacting stores (which write 8 lanes and advance by the number kept).
struct Worker {
    std::vector<int64_t> above;                 // per bracketed query: keys > hi
    std::vector<std::vector<uint32_t>> ckey;    // per bracketed query: candidate keys ...
    std::vector<std::vector<int32_t>> cidx;     // ... and their indices
    std::vector<size_t> nc;                     // ... and count
    std::vector<int32_t> ridx;                  // recorded elements: index, increasing
    std::vector<std::vector<float>> rv;         // [0]: base, [1 + m]: delta of model m
    size_t nr = 0;
    bool bad_delta = false;                     // some delta is inf/nan (flag 0 of the result)
    bool bad_result = false;                    // some decided merged value is inf/nan (flag K + 1)
};

#ifdef __AVX2__
// lane compaction: LUT[mask] lists the set lanes of an 8-bit mask first
struct Compact {
    alignas(32) int32_t idx[256][8];
    Compact() {
        for (int m = 0; m < 256; ++m) {
            int p = 0;
            for (int t = 0; t < 8; ++t)
                if (m >> t & 1) idx[m][p++] = t;
            for (; p < 8; ++p) idx[m][p] = 0;
        }
    }
};
const Compact LUT;

inline __m256i lanes_of(unsigned mk) { return _mm256_load_si256((const __m256i*)LUT.idx[mk]); }
#endif

// The merge arithmetic of MergeBlock::run on 8 lanes (fused_merge.cpp), given the masked
// deltas' products V = (d & keep) * w and election inputs E.
struct Mix {
    int consensus;
    bool ew, norm, cdiv, count_div, lam, has_base;
    float wv[KMAX], wd[KMAX], const_div, lamv;

    Mix(const MergeArgs& a, int K, bool has_base_) {
        consensus = a.consensus;
        ew = a.elect_weighted;
        norm = a.normalize;
        cdiv = a.normalize && a.divisor == DIVISOR_CONST;
        count_div = a.divisor == DIVISOR_COUNT;
        lam = a.lam != 1.0f;
        has_base = has_base_;
        for (int m = 0; m < K; ++m) {
            wv[m] = a.weights[m];
            wd[m] = a.divisor == DIVISOR_COUNT ? 1.0f : a.weights[m];
        }
        const_div = a.const_div;
        lamv = a.lam;
    }

    // scalar: one element (the scalar tail of a block)
    float one(float b, const float* d, const uint32_t* keep, int K) const {
        float v[KMAX], e[KMAX];
        for (int m = 0; m < K; ++m) {
            const float dm = u2f(f2u(d[m]) & keep[m]);
            v[m] = dm * wv[m];
            e[m] = ew ? v[m] : dm;
        }
        float mixed = 0.0f;
        if (consensus == CONSENSUS_NONE) {
            for (int m = 0; m < K; ++m) mixed = mixed + v[m];
            if (cdiv) mixed = mixed / const_div;
        } else {
            float total = 0.0f;
            for (int m = 0; m < K; ++m)
                total = total + (consensus == CONSENSUS_SUM ? e[m] : (float)((e[m] > 0.0f) - (e[m] < 0.0f)));
            float div = 0.0f;
            const uint32_t pos = (uint32_t)(total >= 0.0f);
            for (int m = 0; m < K; ++m) {
                const uint32_t agree = (pos & (uint32_t)(e[m] > 0.0f)) | ((pos ^ 1u) & (uint32_t)(e[m] < 0.0f));
                const uint32_t mk = 0u - agree;
                mixed = mixed + u2f(f2u(v[m]) & mk);
                div = div + u2f(f2u(wd[m]) & mk);
            }
            if (count_div) div = div < 1.0f ? 1.0f : div;
            else div = div == 0.0f ? 1.0f : div;
            if (norm) mixed = mixed / div;
        }
        if (lam) mixed = mixed * lamv;
        if (has_base) mixed = b + mixed;
        return mixed;
    }

#ifdef __AVX2__
    template <int KT, int CONS>
    inline __m256 eight(__m256 b, const __m256* D, const __m256i* keep, int K) const {
        const int K_ = KT ? KT : K;
        const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
        __m256 V[KMAX], E[KMAX];
        #pragma GCC unroll 16
        for (int m = 0; m < K_; ++m) {
            const __m256 dm = _mm256_and_ps(D[m], _mm256_castsi256_ps(keep[m]));
            V[m] = _mm256_mul_ps(dm, _mm256_set1_ps(wv[m]));
            E[m] = ew ? V[m] : dm;
        }
        __m256 mixed = zero;
        if (CONS == CONSENSUS_NONE) {
            #pragma GCC unroll 16
            for (int m = 0; m < K_; ++m) mixed = _mm256_add_ps(mixed, V[m]);
            if (cdiv) mixed = _mm256_div_ps(mixed, _mm256_set1_ps(const_div));
        } else {
            __m256 total = zero;
            #pragma GCC unroll 16
            for (int m = 0; m < K_; ++m) {
                if (CONS == CONSENSUS_SUM) total = _mm256_add_ps(total, E[m]);
                else
                    total = _mm256_add_ps(total, _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(E[m], zero, _CMP_GT_OQ), one),
                                                               _mm256_and_ps(_mm256_cmp_ps(E[m], zero, _CMP_LT_OQ), one)));
            }
            const __m256 pos = _mm256_cmp_ps(total, zero, _CMP_GE_OQ);
            __m256 div = zero;
            #pragma GCC unroll 16
            for (int m = 0; m < K_; ++m) {
                // agree: sign(E) is the elected sign (blendv picks E > 0 where pos, else E < 0)
                const __m256 agree = _mm256_blendv_ps(_mm256_cmp_ps(E[m], zero, _CMP_LT_OQ),
                                                      _mm256_cmp_ps(E[m], zero, _CMP_GT_OQ), pos);
                mixed = _mm256_add_ps(mixed, _mm256_and_ps(V[m], agree));
                div = _mm256_add_ps(div, _mm256_and_ps(_mm256_set1_ps(wd[m]), agree));
            }
            if (count_div) div = _mm256_max_ps(div, one);  // a count >= 0: below 1 -> 1
            else div = _mm256_blendv_ps(div, one, _mm256_cmp_ps(div, zero, _CMP_EQ_OQ));
            if (norm) mixed = _mm256_div_ps(mixed, div);
        }
        if (lam) mixed = _mm256_mul_ps(mixed, _mm256_set1_ps(lamv));
        if (has_base) mixed = _mm256_add_ps(b, mixed);
        return mixed;
    }
#endif
};

#ifdef __AVX2__
// lanes of r whose magnitude is inf/nan
inline __m256i nonfinite8(__m256 r) {
    return _mm256_castps_si256(_mm256_cmp_ps(_mm256_and_ps(r, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))),
                                             _mm256_set1_ps(3.40282347e38f), _CMP_NLE_UQ));
}
#endif

struct Pass {
    const void* base;
    const std::vector<uint64_t>& models;
    int dt, K;
    void* out;
    int out_dt;
    const Mix& mix;
    const std::vector<Cut>& stop;
    const std::vector<Cut>& start;

    void reserve(Worker& w, int TQ, size_t more) const {
        if (w.nr + more > w.ridx.size()) {
            const size_t cap = std::max(2 * w.ridx.size(), w.nr + more);
            w.ridx.resize(cap);
            for (auto& r : w.rv) r.resize(cap);
        }
        for (int q = 0; q < TQ; ++q)
            if (w.nc[q] + more > w.ckey[q].size()) {
                const size_t cap = std::max(2 * w.ckey[q].size(), w.nc[q] + more);
                w.ckey[q].resize(cap);
                w.cidx[q].resize(cap);
            }
    }

    // one element, scalar: classify, count, collect, merge with the sure decisions
    void element(Worker& w, int64_t i) const {
        const int K_ = K;
        const float b = base ? load_one(base, dt, i) : 0.0f;
        float d[KMAX];
        uint32_t keep[KMAX];
        bool undecided = false;
        for (int m = 0; m < K_; ++m) {
            const float x = load_one((const void*)models[m], dt, i);
            d[m] = base ? x - b : x;
            const uint32_t key = mag_key(d[m]);
            if (key >= 0x7f800000u) w.bad_delta = true;
            const int32_t k = (int32_t)key;
            uint32_t kp = 1;
            for (int s = 0; s < 2; ++s) {
                const Cut& c = s == 0 ? stop[m] : start[m];
                const bool gt = k > c.hi, unk = c.tq >= 0 && !gt && k >= c.lo;
                if (c.tq >= 0) {
                    w.above[c.tq] += gt;
                    if (unk) {
                        w.ckey[c.tq][w.nc[c.tq]] = key;
                        w.cidx[c.tq][w.nc[c.tq]++] = (int32_t)i;
                    }
                    undecided |= unk;
                }
                kp &= s == 0 ? (uint32_t)gt : (uint32_t)!(gt || unk);
            }
            keep[m] = 0u - kp;
        }
        float r = mix.one(b, d, keep, K_);
        round_to(out_dt, &r, 1);
        if (!undecided && nonfinite_bits(r)) w.bad_result = true;
        store_block(out, out_dt, i, 1, &r);
        if (undecided) {
            w.ridx[w.nr] = (int32_t)i;
            w.rv[0][w.nr] = b;
            for (int m = 0; m < K_; ++m) w.rv[1 + m][w.nr] = d[m];
            ++w.nr;
        }
    }

#ifdef __AVX2__
    inline void store8(int64_t i, __m256 r) const {
        if (out_dt == DTYPE_F32) {
            _mm256_storeu_ps((float*)out + i, r);
            return;
        }
        __m128i h;
        if (out_dt == DTYPE_BF16) {
            const __m256i s = _mm256_srli_epi32(_mm256_castps_si256(r), 16);
            h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(s, s), 0x08));
        } else {
            h = _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT);
        }
        _mm_storeu_si128((__m128i*)((uint16_t*)out + i), h);
    }

    // Elements i0 .. i0+len-1 (len <= BLK) 8 at a time, the vector form of element(); returns
    // how many it did. KT: K as a constant (0: K at run time, up to KMAX).
    template <int KT, int CONS, bool ST>
    int vectors(Worker& w, int64_t i0, int len) const {
        const int K_ = KT ? KT : K;
        const __m256 zero = _mm256_setzero_ps();
        const __m256i absmask = _mm256_set1_epi32(0x7fffffff), step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        // per model (hoisted): input, cuts; a cut's undecided lanes are
        // (key > lo - 1) xor (key > hi), as key > hi implies key > lo - 1
        const void* mp[KMAX];
        int32_t hs[KMAX], ls1[KMAX], ht[KMAX], lt1[KMAX];
        int qs[KMAX], qt[KMAX];
        bool use_t[KMAX];
        for (int m = 0; m < K_; ++m) {
            mp[m] = (const void*)models[m];
            hs[m] = stop[m].hi; ls1[m] = stop[m].lo - 1; qs[m] = stop[m].tq;
            ht[m] = start[m].hi; lt1[m] = start[m].lo - 1; qt[m] = start[m].tq;
            use_t[m] = start[m].drops();
        }
        // per model and cut: where its candidates go (raw pointers and counts kept in locals, so
        // the loop's stores cannot alias them)
        uint32_t* cks[KMAX] = {};
        uint32_t* ckt[KMAX] = {};
        int32_t* cis[KMAX] = {};
        int32_t* cit[KMAX] = {};
        size_t ncs[KMAX] = {}, nct[KMAX] = {};
        for (int m = 0; m < K_; ++m) {
            if (qs[m] >= 0) { cks[m] = w.ckey[qs[m]].data(); cis[m] = w.cidx[qs[m]].data(); ncs[m] = w.nc[qs[m]]; }
            if (qt[m] >= 0) { ckt[m] = w.ckey[qt[m]].data(); cit[m] = w.cidx[qt[m]].data(); nct[m] = w.nc[qt[m]]; }
        }
        auto collect = [](uint32_t* ck, int32_t* ci, size_t& nc, __m256i key, __m256i iv, __m256i und) {
            const unsigned mk = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(und));
            const __m256i pk = lanes_of(mk);
            _mm256_storeu_si256((__m256i*)(ck + nc), _mm256_permutevar8x32_epi32(key, pk));
            _mm256_storeu_si256((__m256i*)(ci + nc), _mm256_permutevar8x32_epi32(iv, pk));
            nc += (size_t)__builtin_popcount(mk);
        };
        __m256i cs[KMAX], ct[KMAX];  // per model: keys above the stop / start bracket (negated masks)
        for (int m = 0; m < K_; ++m) cs[m] = ct[m] = _mm256_setzero_si256();
        // the largest delta key: an inf/nan input makes its delta inf/nan (so does an overflow)
        __m256i kmax = _mm256_setzero_si256(), rnfv = _mm256_setzero_si256();
        const bool has_base = base != nullptr;
        const int nv = len / 8;
        float* rv[KMAX + 1];
        for (int m = 0; m <= K_; ++m) rv[m] = w.rv[m].data();
        int32_t* ridx = w.ridx.data();
        size_t nr = w.nr;
        for (int v = 0; v < nv; ++v) {
            const int64_t i = i0 + 8 * v;
            const __m256i iv = _mm256_add_epi32(_mm256_set1_epi32((int32_t)i), step);
            const __m256 b = has_base ? load8(base, dt, i) : zero;
            __m256 D[KMAX];
            __m256i keep[KMAX], key[KMAX];
            __m256i u = _mm256_setzero_si256();
            #pragma GCC unroll 16
            for (int m = 0; m < K_; ++m) {
                const __m256 x = load8(mp[m], dt, i);
                D[m] = has_base ? _mm256_sub_ps(x, b) : x;
                key[m] = _mm256_and_si256(_mm256_castps_si256(D[m]), absmask);
                kmax = _mm256_max_epi32(kmax, key[m]);
                const __m256i gs = _mm256_cmpgt_epi32(key[m], _mm256_set1_epi32(hs[m]));
                keep[m] = gs;
                if (qs[m] >= 0) {
                    const __m256i us = _mm256_xor_si256(_mm256_cmpgt_epi32(key[m], _mm256_set1_epi32(ls1[m])), gs);
                    cs[m] = _mm256_sub_epi32(cs[m], gs);
                    u = _mm256_or_si256(u, us);
                    collect(cks[m], cis[m], ncs[m], key[m], iv, us);
                }
                if (ST && use_t[m]) {
                    const __m256i gt = _mm256_cmpgt_epi32(key[m], _mm256_set1_epi32(ht[m]));
                    const __m256i ge = _mm256_cmpgt_epi32(key[m], _mm256_set1_epi32(lt1[m]));  // maybe in start's set
                    keep[m] = _mm256_andnot_si256(ge, keep[m]);
                    if (qt[m] >= 0) {
                        const __m256i ut = _mm256_xor_si256(ge, gt);
                        ct[m] = _mm256_sub_epi32(ct[m], gt);
                        u = _mm256_or_si256(u, ut);
                        collect(ckt[m], cit[m], nct[m], key[m], iv, ut);
                    }
                }
            }
            const __m256 r = round8(out_dt, mix.eight<KT, CONS>(b, D, keep, K_));
            // an undecided element's value is provisional: its record is checked once merged again
            rnfv = _mm256_or_si256(rnfv, _mm256_andnot_si256(u, nonfinite8(r)));
            store8(i, r);
            // records: the undecided lanes packed to the front, stored, counted
            const unsigned um = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(u));
            const __m256i pk = lanes_of(um);
            _mm256_storeu_si256((__m256i*)(ridx + nr), _mm256_permutevar8x32_epi32(iv, pk));
            _mm256_storeu_ps(rv[0] + nr, _mm256_permutevar8x32_ps(b, pk));
            #pragma GCC unroll 16
            for (int m = 0; m < K_; ++m) _mm256_storeu_ps(rv[1 + m] + nr, _mm256_permutevar8x32_ps(D[m], pk));
            nr += (size_t)__builtin_popcount(um);
        }
        w.nr = nr;
        for (int m = 0; m < K_; ++m) {
            if (qs[m] >= 0) w.nc[qs[m]] = ncs[m];
            if (qt[m] >= 0) w.nc[qt[m]] = nct[m];
        }
        auto add_count = [&](int tq, __m256i c) {
            if (tq < 0) return;
            alignas(32) int32_t l[8];
            _mm256_store_si256((__m256i*)l, c);
            for (int t = 0; t < 8; ++t) w.above[tq] += l[t];
        };
        for (int m = 0; m < K_; ++m) {
            add_count(qs[m], cs[m]);
            add_count(qt[m], ct[m]);
        }
        if (!_mm256_testz_si256(_mm256_cmpgt_epi32(kmax, _mm256_set1_epi32(0x7f7fffff)), _mm256_set1_epi32(-1)))
            w.bad_delta = true;
        if (!_mm256_testz_si256(rnfv, rnfv)) w.bad_result = true;
        return nv * 8;
    }

#endif

    // elements i0 .. i0+len-1
    void block(Worker& w, int64_t i0, int len, int TQ) const {
        reserve(w, TQ, (size_t)len + 8);
        int j = 0;
#ifdef __AVX2__
        // ST: some model has a start cut (breadcrumbs); TIES has none, and its loop is leaner
        const bool st = std::any_of(start.begin(), start.end(), [](const Cut& c) { return c.drops(); });
        auto go = [&](auto kt) {
            constexpr int KT = decltype(kt)::value;
            auto run = [&](auto stc) {
                constexpr bool ST = decltype(stc)::value;
                if (mix.consensus == CONSENSUS_SUM) j = vectors<KT, CONSENSUS_SUM, ST>(w, i0, len);
                else if (mix.consensus == CONSENSUS_COUNT) j = vectors<KT, CONSENSUS_COUNT, ST>(w, i0, len);
                else j = vectors<KT, CONSENSUS_NONE, ST>(w, i0, len);
            };
            if (st) run(std::true_type{});
            else run(std::false_type{});
        };
        with_k(K, go);
#endif
        for (; j < len; ++j) element(w, i0 + j);
    }

    // The recorded elements of w merged again with the exact cuts, 8 at a time. A cut's ties
    // (key == T) are kept up to index J: the records are in index order, so that is a prefix
    // of them (jr). Returns whether a result is inf/nan.
    template <int KT, int CONS>
    bool fix(const Worker& w) const {
        const int K_ = KT ? KT : K;
        const size_t R = w.nr;
        if (!R) return false;
        int32_t Ts[KMAX] = {}, Tt[KMAX] = {};
        int64_t Js[KMAX] = {}, Jt[KMAX] = {};
        for (int m = 0; m < K_; ++m) {
            for (int s = 0; s < 2; ++s) {
                const TopSet& e = (s == 0 ? stop[m] : start[m]).exact;
                // NONE_T (nothing): no key is above T or equal to it (keys < 2^31 - 1: finite)
                const int32_t T = e.T >= NONE_T ? INT32_MAX : (int32_t)e.T;
                const int64_t J = e.T >= NONE_T ? -1 : e.J;
                const int64_t jr = std::upper_bound(w.ridx.begin(), w.ridx.begin() + R, J,
                                                    [](int64_t x, int32_t y) { return x < (int64_t)y; }) - w.ridx.begin();
                (s == 0 ? Ts : Tt)[m] = T;
                (s == 0 ? Js : Jt)[m] = jr;
            }
        }
        bool nf = false;
        size_t r = 0;
#ifdef __AVX2__
        const int osz = out_dt == DTYPE_F32 ? 4 : 2;
        const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), absmask = _mm256_set1_epi32(0x7fffffff);
        __m256i nfv = _mm256_setzero_si256();
        for (; r + 8 <= R; r += 8) {
            for (size_t p = r + 32; p < std::min(R, r + 40); ++p)
                __builtin_prefetch((const char*)out + (int64_t)w.ridx[p] * osz, 1, 3);
            const __m256i rr = _mm256_add_epi32(_mm256_set1_epi32((int32_t)r), step);
            const __m256 b = _mm256_loadu_ps(w.rv[0].data() + r);
            __m256 D[KMAX];
            __m256i keep[KMAX];
            #pragma GCC unroll 16
            for (int m = 0; m < K_; ++m) {
                D[m] = _mm256_loadu_ps(w.rv[1 + m].data() + r);
                const __m256i key = _mm256_and_si256(_mm256_castps_si256(D[m]), absmask);
                auto in_top = [&](int32_t T, int64_t jr) {
                    const __m256i vt = _mm256_set1_epi32(T);
                    const __m256i tie = _mm256_and_si256(_mm256_cmpeq_epi32(key, vt),
                                                         _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)jr), rr));
                    return _mm256_or_si256(_mm256_cmpgt_epi32(key, vt), tie);
                };
                keep[m] = _mm256_andnot_si256(in_top(Tt[m], Jt[m]), in_top(Ts[m], Js[m]));
            }
            const __m256 x = round8(out_dt, mix.eight<KT, CONS>(b, D, keep, K_));
            nfv = _mm256_or_si256(nfv, nonfinite8(x));
            alignas(32) float l[8];
            _mm256_store_ps(l, x);
            for (int t = 0; t < 8; ++t) store_block(out, out_dt, w.ridx[r + t], 1, l + t);
        }
        nf = !_mm256_testz_si256(nfv, nfv);
#endif
        for (; r < R; ++r) {
            float d[KMAX];
            uint32_t keep[KMAX];
            for (int m = 0; m < K_; ++m) {
                d[m] = w.rv[1 + m][r];
                const int32_t key = (int32_t)mag_key(d[m]);
                const auto in = [&](int32_t T, int64_t jr) { return key > T || (key == T && (int64_t)r < jr); };
                keep[m] = 0u - (uint32_t)(in(Ts[m], Js[m]) && !in(Tt[m], Jt[m]));
            }
            float x = mix.one(w.rv[0][r], d, keep, K_);
            round_to(out_dt, &x, 1);
            nf |= nonfinite_bits(x);
            store_block(out, out_dt, w.ridx[r], 1, &x);
        }
        return nf;
    }

    bool fix_any(const Worker& w) const {
        auto go = [&](auto kt) {
            constexpr int KT = decltype(kt)::value;
            if (mix.consensus == CONSENSUS_SUM) return fix<KT, CONSENSUS_SUM>(w);
            if (mix.consensus == CONSENSUS_COUNT) return fix<KT, CONSENSUS_COUNT>(w);
            return fix<KT, CONSENSUS_NONE>(w);
        };
        return with_k(K, go);
    }
};

}  // namespace

// Returns {status, then the K+2 flags of fused_merge}: status 0: merged; 1: a bracket missed
// (run select_ranges + fused_merge); 2: not supported here (no AVX2, K > KMAX, n outside
// [2^20, 2^31)). Flag 0 stands for "some delta is inf/nan" (a non-finite input, or finite ones
// whose difference overflowed: the caller rescans to tell), flag K+1 for an inf/nan result.
std::vector<int> select_merge(uint64_t base_ptr, const std::vector<uint64_t>& models, int dt, uint64_t out_ptr,
                              int out_dt, int64_t n, const std::vector<int64_t>& k_stop,
                              const std::vector<int64_t>& k_start, const MergeArgs& a, int nthreads) {
    const int K = (int)models.size();
    std::vector<int> res(K + 3, 0);
#ifndef __AVX2__
    (void)base_ptr; (void)dt; (void)out_ptr; (void)out_dt; (void)k_stop; (void)k_start; (void)a; (void)nthreads;
    res[0] = 2;
    return res;
#else
    if (K < 1 || K > KMAX || n < ((int64_t)1 << 20) || n >= ((int64_t)1 << 31)) { res[0] = 2; return res; }
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
    const Mix mix(a, K, base != nullptr);
    Pass P{base, models, dt, K, (void*)out_ptr, out_dt, mix, stop, start};
    advise_huge((void*)out_ptr, n * (out_dt == DTYPE_F32 ? 4 : 2));
    const int64_t nblocks = (n + BLK - 1) / BLK;
    std::vector<Worker> workers(nt);
#pragma omp parallel num_threads(nt)
    {
        Worker& w = workers[omp_get_thread_num()];
        w.above.assign(TQ, 0);
        w.nc.assign(TQ, 0);
        w.ckey.resize(TQ);
        w.cidx.resize(TQ);
        for (int q = 0; q < TQ; ++q) {
            w.ckey[q].resize(expect[q] / nt + 2 * BLK);
            w.cidx[q].resize(expect[q] / nt + 2 * BLK);
        }
        w.rv.resize(K + 1);
        P.reserve(w, 0, TQ ? (size_t)(n / nt / 16) : (size_t)BLK);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t i0 = blk * BLK;
            P.block(w, i0, (int)std::min<int64_t>(BLK, n - i0), TQ);
        }
    }
    for (const Worker& w : workers) {
        res[1] |= w.bad_delta;
        res[K + 2] |= w.bad_result;
    }
    if (res[1]) return res;  // an inf/nan delta: the caller tells which
    // the exact cuts
    std::vector<int64_t> T(TQ), J(TQ);
    std::vector<char> good(TQ, 0);
#pragma omp parallel for num_threads(std::max(1, std::min(nt, TQ))) schedule(dynamic)
    for (int q = 0; q < TQ; ++q) {
        std::vector<Cand> all;
        int64_t above = 0;
        size_t tot = 0;
        for (Worker& w : workers) tot += w.nc[q];
        all.reserve(tot);
        for (Worker& w : workers) {
            above += w.above[q];
            for (size_t c = 0; c < w.nc[q]; ++c) all.push_back(Cand{w.ckey[q][c], (int64_t)w.cidx[q][c]});
        }
        good[q] = resolve_bracket(all, q_k[q], above, T[q], J[q]);
    }
    for (int q = 0; q < TQ; ++q)
        if (!good[q]) { res[0] = 1; return res; }
    for (int m = 0; m < K; ++m)
        for (Cut* c : {&stop[m], &start[m]})
            if (c->tq >= 0) c->exact = TopSet{T[c->tq], J[c->tq]};
    // the recorded elements, merged again with the exact masks
    std::vector<int> rbad(nt, 0);
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) rbad[t] = P.fix_any(workers[t]);
    for (int t = 0; t < nt; ++t) res[K + 2] |= rbad[t];
    return res;
#endif
}

}  // namespace fm
