// passthrough (fastmerge/methods/passthrough.py): out = scale * x, rounded once to out_dt.
// One read of x, one write; scale 1 (mergekit's scale None) is an exact copy.
// No FP trap is ever observed here, so the compiler may evaluate both sides of the
// clamps and selects (if-conversion into blends): without this the loops do not vectorise.
// Values are unchanged: no fast-math, every operation stays IEEE and separately rounded.
#pragma GCC optimize("no-trapping-math")
#include "elementwise.h"

namespace fm {

std::vector<int> scaled_copy(uint64_t x, int dt, uint64_t out, int out_dt, int64_t n, float scale,
                             int nthreads) {
    advise_huge((void*)out, n * (out_dt == DTYPE_F32 ? 4 : 2));
    const void* src = (const void*)x;
    auto sums = ew_parallel(n, nthreads, 2, 2 * EW_BLOCK, [&](int64_t i0, int len, float* o, int64_t* acc) {
        const float* __restrict v = ew_row(src, dt, i0, len, o + EW_BLOCK);
        acc[0] |= ew_nonfinite(v, len);
        for (int j = 0; j < len; ++j) o[j] = v[j] * scale;
        acc[1] |= ew_nonfinite(o, len);
        stream_block((void*)out, out_dt, i0, len, o);
    });
    return ew_flags(sums, 0, 2);
}

}  // namespace fm
