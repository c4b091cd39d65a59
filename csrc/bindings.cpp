// pybind11 bindings. Tensors cross as (data pointer, dtype code, numel); the caller (fastmerge/cpu.py)
// guarantees contiguity, matching dtypes and lifetimes. The GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "gram.h"
#include "research.h"
#include "elementwise.h"
#include "selection.h"
#include "kernels.h"
#include "philox_mask.h"

#ifndef FM_MODULE
#define FM_MODULE _C
#endif
#ifndef FM_ISA
#define FM_ISA "baseline x86-64"
#endif


namespace py = pybind11;

namespace {
// qa = [kind, rows, cols, group, sym, fmt, gran, block rows, block cols, value dtype]; outs: 3 pointers
fm::QuantArgs quant_args(const std::vector<int64_t>& qa, const std::vector<uint64_t>& outs) {
    if (qa.size() != 10 || outs.size() != 3) throw std::invalid_argument("quant args: 10 ints and 3 pointers");
    return fm::QuantArgs{(int)qa[0], qa[1], qa[2], (int)qa[3], qa[4] != 0, (int)qa[5], (int)qa[6],
                         qa[7], qa[8], (int)qa[9], outs[0], outs[1], outs[2]};
}
}  // namespace

#define FM_STR2(x) #x
#define FM_STR(x) FM_STR2(x)

PYBIND11_MODULE(FM_MODULE, m) {
    m.doc() = "fastmerge fused CPU kernels (" FM_ISA ")";
    m.def("isa", []() { return std::string(FM_ISA); });
    m.def("max_threads", &fm::max_threads);
    m.def("select_ranges", &fm::select_ranges, py::call_guard<py::gil_scoped_release>(),
          py::arg("base"), py::arg("models"), py::arg("dtype"), py::arg("n"), py::arg("q_model"),
          py::arg("q_k"), py::arg("nthreads"));
    m.def(
        "mask_norms",
        [](uint64_t base, const std::vector<uint64_t>& models, int dt, int64_t n, const std::vector<int>& kind,
           const std::vector<int64_t>& ranges, const std::vector<float>& p, uint64_t seed,
           const std::vector<uint64_t>& bits_out, int norm, int nthreads) {
            fm::MaskArgs a{kind, ranges, p, std::vector<uint64_t>(models.size(), 0), seed};
            return fm::mask_norms(base, models, dt, n, a, bits_out, norm, nthreads);
        },
        py::call_guard<py::gil_scoped_release>());
    m.def("della_bits", &fm::della_bits, py::call_guard<py::gil_scoped_release>());
    m.def(
        "fused_merge",
        [](uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t out, int out_dt, int64_t n,
           const std::vector<int>& kind, const std::vector<int64_t>& ranges, const std::vector<float>& p,
           const std::vector<uint64_t>& bits, uint64_t seed, const std::vector<float>& weights,
           const std::vector<float>& scale, int scale_mode, int consensus, bool elect_weighted, int divisor,
           float const_div, bool normalize, float lam, bool sign_only, uint64_t sign, int nthreads) {
            fm::MaskArgs ma{kind, ranges, p, bits, seed};
            fm::MergeArgs a{weights, scale, scale_mode, consensus, elect_weighted, divisor,
                            const_div, normalize, lam, sign_only};
            return fm::fused_merge(base, models, dt, out, out_dt, n, ma, a, sign, nthreads);
        },
        py::call_guard<py::gil_scoped_release>());
    m.def(
        "select_merge",
        [](uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t out, int out_dt, int64_t n,
           const std::vector<int64_t>& k_stop, const std::vector<int64_t>& k_start, const std::vector<float>& weights,
           int consensus, bool elect_weighted, int divisor, float const_div, bool normalize, float lam, int nthreads) {
            fm::MergeArgs a{weights, std::vector<float>(models.size(), 1.0f), fm::SCALE_NONE, consensus, elect_weighted,
                            divisor, const_div, normalize, lam, false};
            return fm::select_merge(base, models, dt, out, out_dt, n, k_stop, k_start, a, nthreads);
        },
        py::call_guard<py::gil_scoped_release>());
    m.def(
        "quantize",
        [](uint64_t src, int dt, const std::vector<int64_t>& qa, const std::vector<uint64_t>& outs, int nthreads) {
            return fm::quantize(src, dt, quant_args(qa, outs), nthreads);
        },
        py::call_guard<py::gil_scoped_release>());
    m.def(
        "fused_merge_quantize",
        [](uint64_t base, const std::vector<uint64_t>& models, int dt, const std::vector<int>& kind,
           const std::vector<int64_t>& ranges, const std::vector<float>& p, const std::vector<uint64_t>& bits,
           uint64_t seed, const std::vector<float>& weights, const std::vector<float>& scale, int scale_mode,
           int consensus, bool elect_weighted, int divisor, float const_div, bool normalize, float lam,
           const std::vector<int64_t>& qa, const std::vector<uint64_t>& outs, int nthreads) {
            fm::MaskArgs ma{kind, ranges, p, bits, seed};
            fm::MergeArgs a{weights, scale, scale_mode, consensus, elect_weighted, divisor,
                            const_div, normalize, lam, false};
            return fm::fused_merge_quantize(base, models, dt, ma, a, quant_args(qa, outs), nthreads);
        },
        py::call_guard<py::gil_scoped_release>());
    // The CUDA kernels' random keep decisions (philox_mask.h) for elements 0 .. n-1, compiled
    // for the host: by groups of four as the fused merge draws them, and one element at a time
    // as DELLA does. Tests only (the CUDA source is checked on machines without a GPU).
    m.def("cuda_random_keep_host", [](uint64_t seed, uint32_t stream, int64_t n, float prob, bool single) {
        std::string out((size_t)n, '\0');
        for (int64_t i = 0; i < n; ++i)
            out[(size_t)i] = single ? (char)fmphilox::random_keep1(seed, stream, i, prob)
                                    : (char)((fmphilox::random_keep4(seed, stream, i & ~(int64_t)3, prob) >> (i & 3)) & 1u);
        return py::bytes(out);
    });
    // ---- mergekit's other methods: Gram and linear combinations
    m.def("gram", &fm::gram, py::call_guard<py::gil_scoped_release>(), py::arg("base"), py::arg("xs"),
          py::arg("dtype"), py::arg("outer"), py::arg("length"), py::arg("inner"), py::arg("out"),
          py::arg("nthreads"));
    m.def("lincomb", &fm::lincomb, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("xs"), py::arg("dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("outer"),
          py::arg("length"), py::arg("inner"), py::arg("coef"), py::arg("delta"), py::arg("nthreads"));
    // ---- mergekit's other methods: elementwise merges (csrc/elementwise.h)
    m.def("nearswap", &fm::nearswap, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("model"), py::arg("dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("t"),
          py::arg("nthreads"));
    m.def("ram_counts", &fm::ram_counts, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("models"), py::arg("dtype"), py::arg("n"), py::arg("epsilon"), py::arg("nthreads"));
    m.def("ram_merge", &fm::ram_merge, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("models"), py::arg("dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("n"),
          py::arg("epsilon"), py::arg("lam"), py::arg("nthreads"));
    m.def("scaled_copy", &fm::scaled_copy, py::call_guard<py::gil_scoped_release>(), py::arg("x"),
          py::arg("dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("scale"),
          py::arg("nthreads"));
    // ---- mergekit's other methods: a selection over the whole tensor, then the merge (csrc/selection.h)
    m.def("sce_energy", &fm::sce_energy, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("models"), py::arg("dtype"), py::arg("n"), py::arg("nthreads"));
    m.def("sce_select", &fm::sce_select, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("models"), py::arg("dtype"), py::arg("n"), py::arg("select_topk"), py::arg("bits"),
          py::arg("nthreads"));
    m.def("sce_merge", &fm::sce_merge, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("models"), py::arg("dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("w"),
          py::arg("mode"), py::arg("bits"), py::arg("nthreads"));
    m.def("arcee_select", &fm::arcee_select, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("model"), py::arg("dtype"), py::arg("rows"), py::arg("length"), py::arg("ranks"), py::arg("kl"),
          py::arg("nthreads"));
    m.def("arcee_merge", &fm::arcee_merge, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("model"), py::arg("dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("rows"),
          py::arg("length"), py::arg("kl"), py::arg("thr"), py::arg("nthreads"));
    // ---- the research methods (csrc/research.h)
    m.def("consensus", &fm::consensus, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("models"), py::arg("dtype"), py::arg("mtl"), py::arg("mtl_dtype"), py::arg("cuts"),
          py::arg("normalize"), py::arg("lambdas"), py::arg("kmin"), py::arg("lam"), py::arg("out"),
          py::arg("out_dtype"), py::arg("bits"), py::arg("n"), py::arg("nthreads"));
    m.def("emr", &fm::emr, py::call_guard<py::gil_scoped_release>(), py::arg("base"), py::arg("models"),
          py::arg("dtype"), py::arg("uni"), py::arg("bits"), py::arg("n"), py::arg("nthreads"));
    m.def("fisher_sumsq", &fm::fisher_sumsq, py::call_guard<py::gil_scoped_release>(), py::arg("fishers"),
          py::arg("dtype"), py::arg("n"), py::arg("nthreads"));
    m.def("fisher_merge", &fm::fisher_merge, py::call_guard<py::gil_scoped_release>(), py::arg("models"),
          py::arg("dtype"), py::arg("fishers"), py::arg("fisher_dtype"), py::arg("coef"), py::arg("eps"),
          py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("nthreads"));
    m.def("pcb_select", &fm::pcb_select, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("models"), py::arg("dtype"), py::arg("n"), py::arg("lo"), py::arg("hi"), py::arg("rank"),
          py::arg("nthreads"));
    m.def("pcb_merge", &fm::pcb_merge, py::call_guard<py::gil_scoped_release>(), py::arg("base"),
          py::arg("models"), py::arg("dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("lo"),
          py::arg("hi"), py::arg("q"), py::arg("M"), py::arg("w"), py::arg("lam"), py::arg("nthreads"));
}
