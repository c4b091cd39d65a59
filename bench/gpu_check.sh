#!/usr/bin/env bash
# GPU check, part 1 (issue 21): the Triton backend, the quantizers and lowrank on a GPU, in one
# call of the device tool (<= 7 minutes; bench/README.md, "GPU check scripts", says how to call it).
#
#   OUT=$OUT bash bench/gpu_check.sh              # on the device machine
#   OUT=$(mktemp -d) bash bench/gpu_check.sh --dry-run   # the same stages on this CPU
#   bash bench/gpu_check.sh --list                # stages and limits
#
# Stages: env (GPU, versions, fastmerge.backends()), install (build in place), tests
# (tests/test_gpu.py on triton), tests_quant (its quantizer tests on triton), bench_accept
# (bf16 4096x14336 K=4), l2_check (the same with the L2 flushed), bench_quick (4096x4096), bench_quant, bench_lowrank, review (issue 23's checks:
# bench/gpu_check_review.py, compute-sanitizer memcheck), report.
# $OUT gets gpu_check.log, tests.log, bench.json, quant.json, lowrank.json, summary.json.
cd "$(dirname "$0")/.." || exit 2
GC_SCRIPT=bench/gpu_check.sh
GC_STAGES=(
    "env 30 60"
    "install 90 300"
    "tests 150 240"
    "tests_quant 60 180"
    "bench_accept 60 120"
    "l2_check 30 60"
    "bench_quick 100 180"
    "bench_quant 45 120"
    "bench_lowrank 35 90"
    "review 90 240"
    "report 20 60"
)
# shellcheck source=bench/gpu_check_lib.sh
. bench/gpu_check_lib.sh
export GC_REVIEW_SANITIZER=memcheck GC_BENCH_BACKENDS=triton GC_STAGE_LOG_tests=tests.log GC_STAGE_LOG_tests_quant=tests.log

# The cuda backend would be built on first use by the one test that compares every backend's
# seeded masks (minutes of nvcc); bench/gpu_check_cuda.sh builds and tests it, so here the
# plugin marks it unavailable and those comparisons run on cpu and triton.
stage_tests() {
    PYTEST_PLUGINS=bench.gpu_check_pytest gc_pytest tests/test_gpu.py -k "not cuda and not quant" || return
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: test_gpu.py skips without a GPU (above); the same kernels in Triton's interpreter:"
        gc_pytest tests/test_triton_interpreter.py -k "seeded_masks or random_drop or primitives or gpu_benchmark_kernel_rows"
    fi
}

stage_tests_quant() {
    PYTEST_PLUGINS=bench.gpu_check_pytest gc_pytest tests/test_gpu.py -k "not cuda and quant" || return
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: the quantizer edge cases test_gpu.py moves to the GPU, here on every backend the"
        echo "interpreter runs (triton included), and the GPU quant bench's rows:"
        gc_pytest tests/test_quant.py -k "int4_edge_groups or int4_ties_with_the_reciprocal or fp8_sqnr_zero_tiles or gpu_bench_rows"
    fi
}

stage_bench_quant() {
    if [ "$DRY_RUN" = 1 ]; then
        "$PYTHON" -m bench.quant --device cpu --quick --size 256 --json "$OUT/quant.json"
    else
        "$PYTHON" -m bench.quant --device cuda --json "$OUT/quant.json"
    fi
}

# No test in tests/ runs fastmerge.lowrank on CUDA tensors: this run's error columns
# (error_ratio, rel_err_vs_exact against the full SVD on the same GPU) are its check there.
stage_bench_lowrank() {
    if [ "$DRY_RUN" = 1 ]; then
        "$PYTHON" -m bench.lowrank --device cpu --quick --size 128 --tasks 2 --ranks 8 --json "$OUT/lowrank.json"
    else
        "$PYTHON" -m bench.lowrank --device cuda --quick --json "$OUT/lowrank.json"
    fi
}

export -f stage_tests stage_tests_quant stage_bench_quant stage_bench_lowrank
gc_main "$@"
