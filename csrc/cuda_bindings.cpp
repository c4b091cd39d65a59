// pybind11 bindings of the CUDA kernels (csrc/cuda_kernels.cu), built on first use by
// fastmerge/cuda.py with torch.utils.cpp_extension.load. Tensors cross as raw device pointers
// (Python ints) and the caller (fastmerge/cuda.py) guarantees dtypes, shapes, lifetimes and the
// current device; the stream is torch's current stream. No torch or CUDA header is needed here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_kernels.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME fastmerge_cuda
#endif

namespace py = pybind11;
using fmcuda::View;

namespace {

using Ptrs = std::vector<uint64_t>;
using I64s = std::vector<int64_t>;

void raise_if(const char* err) {
    if (err) throw std::runtime_error(std::string("fastmerge cuda: ") + err);
}

void check_k(size_t k, size_t limit, const char* what) {
    if (k < 1 || k > limit)
        throw std::invalid_argument(std::string("fastmerge cuda: ") + what + " must be in [1, " +
                                    std::to_string(limit) + "], got " + std::to_string(k));
}

View view(uint64_t ptr, int64_t s0, int64_t s1) { return View{reinterpret_cast<const void*>(ptr), s0, s1}; }

void fill_views(View* dst, const Ptrs& ptrs, const I64s& s0, const I64s& s1) {
    if (s0.size() != ptrs.size() || s1.size() != ptrs.size())
        throw std::invalid_argument("fastmerge cuda: one stride pair per input");
    for (size_t m = 0; m < ptrs.size(); ++m) dst[m] = view(ptrs[m], s0[m], s1[m]);
}

template <class T, class V>
void fill(T* dst, const std::vector<V>& src, size_t k, const char* what) {
    if (src.size() != k) throw std::invalid_argument(std::string("fastmerge cuda: one ") + what + " per input");
    for (size_t m = 0; m < k; ++m) dst[m] = static_cast<T>(src[m]);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fastmerge CUDA kernels (raw device pointers; see fastmerge/cuda.py)";
    m.attr("MAX_K") = fmcuda::MAX_K;
    m.attr("MAX_Q") = fmcuda::MAX_Q;
    m.attr("RADIX_BINS") = fmcuda::RADIX_BINS;
    m.attr("SELECT_TILE") = fmcuda::SELECT_TILE;

    m.def("merge", [](uint64_t base, int64_t bs0, int64_t bs1, const Ptrs& xs, const I64s& s0, const I64s& s1,
                      int dtype, uint64_t out, int out_dtype, uint64_t sign, uint64_t flags, uint64_t thr,
                      uint64_t scale, const Ptrs& keeps, const std::vector<int>& kinds,
                      const std::vector<double>& weights, const std::vector<double>& probs, uint64_t seed,
                      int64_t n, int64_t C, bool strided, bool vec, int scale_mode, int consensus,
                      bool elect_weighted, int divisor, double const_div, bool normalize, double lam,
                      bool sign_only, uint64_t stream) {
        const size_t K = xs.size();
        check_k(K, fmcuda::MAX_K, "the number of inputs");
        fmcuda::MergeArgs a{};
        a.K = (int)K; a.dtype = dtype; a.out_dtype = out_dtype;
        a.has_base = base != 0; a.strided = strided; a.vec = vec;
        a.base = view(base, bs0, bs1);
        fill_views(a.xs, xs, s0, s1);
        if (keeps.size() != K) throw std::invalid_argument("fastmerge cuda: one keep pointer per input");
        for (size_t k = 0; k < K; ++k) a.keeps[k] = reinterpret_cast<const uint8_t*>(keeps[k]);
        fill(a.kinds, kinds, K, "mask kind");
        fill(a.weights, weights, K, "weight");
        fill(a.probs, probs, K, "keep probability");
        a.out = reinterpret_cast<void*>(out);
        a.sign = reinterpret_cast<int8_t*>(sign);
        a.flags = reinterpret_cast<int32_t*>(flags);
        a.thr = reinterpret_cast<const int64_t*>(thr);
        a.scale = reinterpret_cast<const float*>(scale);
        a.seed = seed; a.n = n; a.C = C;
        a.scale_mode = scale_mode; a.consensus = consensus; a.divisor = divisor;
        a.elect_weighted = elect_weighted; a.normalize = normalize; a.sign_only = sign_only;
        a.const_div = (float)const_div; a.lam = (float)lam;
        py::gil_scoped_release nogil;
        raise_if(fmcuda::merge(a, reinterpret_cast<void*>(stream)));
    });

    m.def("select", [](uint64_t base, int64_t bs0, int64_t bs1, const Ptrs& xs, const I64s& s0, const I64s& s1,
                       int dtype, const std::vector<int>& qm, const I64s& qk, int64_t n, int64_t C,
                       bool strided, uint64_t out, uint64_t flag, uint64_t hist, uint64_t state,
                       uint64_t counts, int64_t ntiles, uint64_t stream) {
        check_k(xs.size(), fmcuda::MAX_K, "the number of inputs");
        check_k(qm.size(), fmcuda::MAX_Q, "the number of selection queries");
        fmcuda::SelectArgs a{};
        a.K = (int)xs.size(); a.dtype = dtype; a.Q = (int)qm.size();
        a.has_base = base != 0; a.strided = strided;
        a.base = view(base, bs0, bs1);
        fill_views(a.xs, xs, s0, s1);
        fill(a.qm, qm, qm.size(), "query model");
        fill(a.qk, qk, qm.size(), "query k");
        a.n = n; a.C = C; a.ntiles = ntiles;
        a.out = reinterpret_cast<int64_t*>(out);
        a.flag = reinterpret_cast<int32_t*>(flag);
        a.hist = reinterpret_cast<int64_t*>(hist);
        a.state = reinterpret_cast<int64_t*>(state);
        a.counts = reinterpret_cast<int64_t*>(counts);
        py::gil_scoped_release nogil;
        raise_if(fmcuda::select(a, reinterpret_cast<void*>(stream)));
    });

    m.def("mask_norms", [](uint64_t base, int64_t bs0, int64_t bs1, const Ptrs& xs, const I64s& s0,
                           const I64s& s1, int dtype, const std::vector<int>& kinds,
                           const std::vector<double>& probs, uint64_t thr, uint64_t seed, int64_t n,
                           int64_t C, bool strided, int norm, uint64_t partial, int blocks,
                           uint64_t stream) {
        const size_t K = xs.size();
        check_k(K, fmcuda::MAX_K, "the number of inputs");
        fmcuda::NormArgs a{};
        a.K = (int)K; a.dtype = dtype; a.norm = norm; a.blocks = blocks;
        a.has_base = base != 0; a.strided = strided;
        a.base = view(base, bs0, bs1);
        fill_views(a.xs, xs, s0, s1);
        fill(a.kinds, kinds, K, "mask kind");
        fill(a.probs, probs, K, "keep probability");
        a.thr = reinterpret_cast<const int64_t*>(thr);
        a.seed = seed; a.n = n; a.C = C;
        a.partial = reinterpret_cast<double*>(partial);
        py::gil_scoped_release nogil;
        raise_if(fmcuda::mask_norms(a, reinterpret_cast<void*>(stream)));
    });

    m.def("della_keep", [](uint64_t base, int64_t bs0, int64_t bs1, uint64_t x, int64_t s0, int64_t s1,
                           int dtype, uint64_t order, uint64_t keep, uint64_t partial, int blocks,
                           double c1, double c2, uint64_t seed, uint32_t stream_id, int64_t n, int64_t L,
                           int64_t inner, int64_t C, bool strided, int norm, uint64_t stream) {
        fmcuda::DellaArgs a{};
        a.dtype = dtype; a.norm = norm; a.blocks = blocks; a.stream_id = stream_id;
        a.has_base = base != 0; a.strided = strided;
        a.base = view(base, bs0, bs1);
        a.x = view(x, s0, s1);
        a.order = reinterpret_cast<const int64_t*>(order);
        a.keep = reinterpret_cast<uint8_t*>(keep);
        a.partial = reinterpret_cast<double*>(partial);
        a.c1 = (float)c1; a.c2 = (float)c2;
        a.seed = seed; a.n = n; a.L = L; a.inner = inner; a.C = C;
        py::gil_scoped_release nogil;
        raise_if(fmcuda::della_keep(a, reinterpret_cast<void*>(stream)));
    });
}
