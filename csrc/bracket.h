// The sampled bracket of an exact top-k threshold, shared by magnitude_select.cpp (the
// threshold alone) and select_merge.cpp (the threshold found during the merge pass itself).
// A query (model q_model[q], k q_k[q]) asks for the k-th largest key |d| (mag_key) and the
// index of the last tie kept, lowest index first.
#pragma once

#include <cstdint>
#include <vector>

namespace fm {

struct Cand { uint32_t key; int64_t idx; };

// From a sample of 2^17 keys (runs of 16 contiguous elements, evenly spaced): per query
// todo[tq], a bracket [lo, hi] that holds the k-th largest key unless the sample is off by
// more than 4 standard deviations of its quantile, and the expected number of keys in it.
void sample_brackets(const void* base, const std::vector<uint64_t>& models, int dt, int64_t n,
                     const std::vector<int>& q_model, const std::vector<int64_t>& q_k, const std::vector<int>& todo,
                     std::vector<uint32_t>& lo, std::vector<uint32_t>& hi, std::vector<int64_t>& expect, int nt);

// T (the k-th largest key) and J (the index of the last key equal to T that is kept) from
// `above`, the count of keys > hi, and the candidates (every key in [lo, hi] with its index,
// any order; reordered). False when the bracket missed: k - above is not in 1..|candidates|.
bool resolve_bracket(std::vector<Cand>& cands, int64_t k, int64_t above, int64_t& T, int64_t& J);

}  // namespace fm
