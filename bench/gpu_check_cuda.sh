#!/usr/bin/env bash
# GPU check, part 2 (issue 22): the CUDA backend built with the device's torch, tested, and timed
# beside Triton, in one call of the device tool (<= 7 minutes; bench/README.md, "GPU check
# scripts", says how to call it).
#
#   OUT=$OUT bash bench/gpu_check_cuda.sh                 # on the device machine
#   OUT=$(mktemp -d) bash bench/gpu_check_cuda.sh --dry-run   # the same stages on this CPU
#   bash bench/gpu_check_cuda.sh --list
#
# Stages: env, install (the C++ module the tests compare against), build_cuda (the extension,
# exactly as fastmerge builds it on first use: torch.utils.cpp_extension.load, here with
# TORCH_CUDA_ARCH_LIST=9.0 and MAX_JOBS=16), tests_cuda (tests/test_gpu.py on cuda, and the
# seeded-mask comparison of cpu, triton and cuda), bench_accept, l2_check, bench_quick (cuda
# beside triton), review (issue 23: bench/gpu_check_review.py, compute-sanitizer racecheck on the
# CUDA select), report. $OUT gets gpu_check_cuda.log, build.log, tests.log, bench.json,
# summary.json.
cd "$(dirname "$0")/.." || exit 2
GC_SCRIPT=bench/gpu_check_cuda.sh
GC_STAGES=(
    "env 30 60"
    "install 90 300"
    "build_cuda 200 300"
    "tests_cuda 150 180"
    "bench_accept 60 120"
    "l2_check 30 60"
    "bench_quick 90 180"
    "review 90 240"
    "report 20 60"
)
# shellcheck source=bench/gpu_check_lib.sh
. bench/gpu_check_lib.sh
export GC_REVIEW_SANITIZER=racecheck GC_BENCH_BACKENDS=cuda,triton GC_STAGE_LOG_build_cuda=build.log GC_STAGE_LOG_tests_cuda=tests.log
# The build's settings, exported for every stage: the tests and the bench load the extension the
# build_cuda stage built only if they ask for it with the same flags from the same cache.
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTMERGE_CUDA_VERBOSE=1

stage_build_cuda() {
    local f n=0 rc
    if [ "$DRY_RUN" = 1 ]; then
        shopt -s nullglob
        for f in csrc/*.cu; do  # the flags fastmerge's load() passes, for sm_90 alone
            echo "+ nvcc -std=c++17 -Icsrc -O3 --fmad=false -gencode arch=compute_90,code=sm_90 -Xptxas -v -c $f"
            nvcc -std=c++17 -Icsrc -O3 --fmad=false -gencode arch=compute_90,code=sm_90 -Xptxas -v \
                -c "$f" -o "$WORK/$(basename "$f").o" >"$WORK/nvcc.log" 2>&1
            rc=$?
            # ptxas's resource report per kernel: registers, stack frame, spills (METHOD.md: free to read)
            grep -E "error|warning|Compiling entry|registers|spill" "$WORK/nvcc.log"
            [ "$rc" = 0 ] || return "$rc"
            n=$((n + 1))
        done
        for f in csrc/*_bindings.cpp; do  # the binding, against the pybind11 headers torch ships
            read -r -a incs < <("$PYTHON" -c 'import sysconfig; from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths() + [sysconfig.get_paths()["include"]]))')
            echo "+ c++ -std=c++17 -fsyntax-only -Wall -Icsrc ... $f"
            c++ -std=c++17 -fsyntax-only -Wall -Icsrc "${incs[@]}" "$f" || return 1
            n=$((n + 1))
        done
        [ "$n" -gt 0 ] || { echo "no csrc/*.cu or csrc/*_bindings.cpp found"; return 1; }
        echo "SKIP (dry run): torch.utils.cpp_extension.load, the device build itself, needs a CUDA build of torch"
        return 0
    fi
    "$PYTHON" -W default - <<'PY' || return
import sys, time
from fastmerge.backends import cuda
print("before:", cuda.status())
t = time.time()
ext = cuda.extension()
print(f"build + load: {time.time() - t:.0f} s")
if ext is None:
    sys.exit(f"the CUDA extension did not build: {cuda.status()['reason']}")
print("module:", ext.__file__)
print("constants:", {k: getattr(ext, k) for k in dir(ext) if k.isupper()})
PY
    : >"$WORK/cuda_built"
    command -v cuobjdump >/dev/null && find "$TORCH_EXTENSIONS_DIR" -name 'fastmerge_cuda*.so' \
        -exec cuobjdump --list-elf {} \; || true  # sm_90 machine code, not PTX for the driver to JIT
}

# Without a built extension every test worker and bench process would build it again.
gc_cuda_built() {
    [ "$DRY_RUN" = 1 ] || [ -e "$WORK/cuda_built" ] && return 0
    echo "the CUDA extension was not built (stage build_cuda, build.log): $1"
    return 1
}

stage_tests_cuda() {
    gc_cuda_built "its tests would rebuild it in every worker; not run" || return 1
    gc_pytest tests/test_gpu.py -k "cuda or seeded_masks or auto_on_gpu" || return
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: the CUDA kernels' Philox source against the counter layout and the cpu masks,"
        echo "and the fallback a failed build takes:"
        gc_pytest tests/test_determinism.py tests/test_dispatch.py -k "cuda"
    fi
}

# The lib's bench stages ask this which backends to time: triton alone when the extension is missing.
gc_bench_backends() {
    gc_cuda_built "timing triton alone" >&2 && echo "$GC_BENCH_BACKENDS" || echo triton
}

export -f stage_build_cuda gc_cuda_built stage_tests_cuda gc_bench_backends
gc_main "$@"
