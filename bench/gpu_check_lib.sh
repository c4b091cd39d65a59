# shellcheck shell=bash
# Shared by bench/gpu_check.sh and bench/gpu_check_cuda.sh (sourced, never run): the options,
# the stage runner and summary.json. A device machine gives 15 minutes for a whole issue and a
# command at most 10, so each script is a list of stages that
#   * each run under `timeout` (the smaller of the stage's limit and what is left of the
#     script's budget), in their own process group, so a hung test or build is killed whole;
#   * log through `tee` with `set -o pipefail`, so a killed stage's partial log is still there;
#   * record exit code, duration and limit in $OUT/summary.json, rewritten when a stage starts
#     (status "running") and when it ends, so even a run killed from outside leaves a summary.
# A script defines one bash function per stage (stage_<name>) and calls gc_main with the stage
# table; everything the stages need is exported, because `timeout` runs them in a child bash.

set -u -o pipefail
export PYTHONUNBUFFERED=1
# a script may set these before sourcing; the main log is named after the script
GC_BUDGET_DEVICE=${GC_BUDGET_DEVICE:-420} GC_BUDGET_DRY=${GC_BUDGET_DRY:-900}
GC_LOG_NAME=${GC_LOG_NAME:-$(basename "$GC_SCRIPT" .sh).log}

gc_usage() {
    cat <<EOF
usage: OUT=DIR bash $GC_SCRIPT [--dry-run] [--stages a,b,...] [--budget SECONDS] [--list]

  --dry-run        the same stages on this CPU: Triton's interpreter (TRITON_INTERPRET=1) and the
                   cpu backend at tiny sizes; what needs a GPU is skipped with a line saying so
  --stages a,b     run only these stages (in the script's order); default: all
  --budget S       the whole script's time limit (default ${GC_BUDGET_DEVICE}s on the device,
                   ${GC_BUDGET_DRY}s with --dry-run); each stage stops at min(its limit, what is left)
  --list           print the stages with their limits and exit (writes nothing)

OUT (default ./gpu_check_out) receives at most 8 plain files, no subfolders (the device tool
brings back 8 files); scratch files go to \$WORK (default: a fresh folder under /tmp).
stages:
EOF
    gc_list
}

gc_list() {
    local row name dev dry
    for row in "${GC_STAGES[@]}"; do
        read -r name dev dry <<<"$row"
        printf '  %-14s limit %4ss on the device, %4ss with --dry-run\n' "$name" "$dev" "$dry"
    done
}

# gc_parse_args "$@": sets DRY_RUN, GC_ONLY, GC_BUDGET; exits for --help / --list / bad options.
gc_parse_args() {
    DRY_RUN=0 GC_ONLY="" GC_BUDGET=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --dry-run) DRY_RUN=1 ;;
            --stages) GC_ONLY="${2:?--stages needs a comma-separated list}"; shift ;;
            --stages=*) GC_ONLY="${1#*=}" ;;
            --budget) GC_BUDGET="${2:?--budget needs seconds}"; shift ;;
            --budget=*) GC_BUDGET="${1#*=}" ;;
            --list) gc_list; exit 0 ;;
            -h|--help) gc_usage; exit 0 ;;
            *) echo "$GC_SCRIPT: unknown option $1" >&2; gc_usage >&2; exit 2 ;;
        esac
        shift
    done
    local s known
    for s in ${GC_ONLY//,/ }; do
        known=0
        for row in "${GC_STAGES[@]}"; do [ "${row%% *}" = "$s" ] && known=1; done
        if [ "$known" = 0 ]; then
            echo "$GC_SCRIPT: unknown stage '$s'" >&2
            gc_list >&2
            exit 2
        fi
    done
    if [ -z "$GC_BUDGET" ]; then
        if [ "$DRY_RUN" = 1 ]; then GC_BUDGET=$GC_BUDGET_DRY; else GC_BUDGET=$GC_BUDGET_DEVICE; fi
    fi
    case "$GC_BUDGET" in '' | *[!0-9]*) echo "$GC_SCRIPT: --budget takes whole seconds" >&2; exit 2 ;; esac
    export DRY_RUN
}

gc_now() { date +%s; }

gc_json_str() {  # a JSON string literal of $1 (stage names, paths and short texts only)
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/ }
    s=${s//$'\t'/ }
    printf '"%s"' "$s"
}

# The source the run measured, for a checkout that travels without .git: commit where git
# answers (or $GIT_COMMIT, which the caller can pass in the command), and a hash of the files.
gc_source_facts() {
    GC_COMMIT=$(git rev-parse HEAD 2>/dev/null || true)
    GC_COMMIT=${GC_COMMIT:-${GIT_COMMIT:-unknown}}
    # tracked files changed since that commit; null where git cannot say (no .git there)
    GC_DIRTY=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo true \
        || { git rev-parse HEAD >/dev/null 2>&1 && echo false || echo null; })
    GC_SRC_SHA=$(find fastmerge csrc triton_kernels bench tests setup.py pyproject.toml -type f \
        \( -name '*.py' -o -name '*.cu' -o -name '*.cpp' -o -name '*.h' -o -name '*.sh' -o -name '*.toml' \) \
        -not -path '*/__pycache__/*' 2>/dev/null | LC_ALL=C sort | xargs sha256sum 2>/dev/null \
        | sha256sum | cut -c1-16)
}

gc_write_summary() {  # $1: true once every stage has been run (or skipped)
    # ok: every stage ran to exit 0 or was left out by --stages ("no_time", "running",
    # "failed" and "timeout" are not ok)
    local tmp="$OUT/.summary.json.tmp" i sep="" ok=true
    for i in "${!GC_REC_NAME[@]}"; do
        [ "${GC_REC_STATUS[$i]}" = ok ] || [ "${GC_REC_STATUS[$i]}" = skipped ] || ok=false
    done
    {
        printf '{"script": %s, "mode": %s, "complete": %s, "ok": %s,\n' \
            "$(gc_json_str "$GC_SCRIPT")" "$(gc_json_str "$([ "$DRY_RUN" = 1 ] && echo dry-run || echo device)")" \
            "$1" "$ok"
        printf ' "started_utc": %s, "updated_utc": %s, "wall_s": %s, "budget_s": %s,\n' \
            "$(gc_json_str "$GC_START_UTC")" "$(gc_json_str "$(date -u +%FT%TZ)")" \
            "$(( $(gc_now) - GC_T0 ))" "$GC_BUDGET"
        printf ' "commit": %s, "dirty": %s, "source_sha256_16": %s, "host": %s, "out": %s, "logs": %s,\n' \
            "$(gc_json_str "$GC_COMMIT")" "$GC_DIRTY" "$(gc_json_str "$GC_SRC_SHA")" "$(gc_json_str "$(hostname)")" \
            "$(gc_json_str "$OUT")" "$(gc_json_str "$GC_LOG")"
        printf ' "stages": ['
        for i in "${!GC_REC_NAME[@]}"; do
            printf '%s\n  {"name": %s, "status": %s, "rc": %s, "seconds": %s, "limit_s": %s, "log": %s, "note": %s}' \
                "$sep" "$(gc_json_str "${GC_REC_NAME[$i]}")" "$(gc_json_str "${GC_REC_STATUS[$i]}")" \
                "${GC_REC_RC[$i]}" "${GC_REC_SECS[$i]}" "${GC_REC_LIMIT[$i]}" \
                "$(gc_json_str "${GC_REC_LOG[$i]}")" "$(gc_json_str "${GC_REC_NOTE[$i]}")"
            sep=","
        done
        printf '],\n "report": '
        # bench/gpu_check_steps.py's findings (acceptance figures), once its stage has run
        if [ -s "$WORK/report.json" ]; then cat "$WORK/report.json"; else printf 'null'; fi
        printf '}\n'
    } >"$tmp" && mv -f "$tmp" "$OUT/summary.json"
}

gc_record() {  # index name status rc seconds limit log note
    GC_REC_NAME[$1]=$2 GC_REC_STATUS[$1]=$3 GC_REC_RC[$1]=$4 GC_REC_SECS[$1]=$5
    GC_REC_LIMIT[$1]=$6 GC_REC_LOG[$1]=$7 GC_REC_NOTE[$1]=$8
}

# gc_run_stage index name limit: stage_<name> under timeout, its output tee'd to the stage's log
# ($OUT/$GC_STAGE_LOG_<name> if set, else the script's main log), its start and end lines to both.
gc_run_stage() {
    local idx=$1 name=$2 limit=$3 left t0 rc status note="" logvar log
    logvar="GC_STAGE_LOG_$name"  # a file name under $OUT; default: the main log
    log=$OUT/${!logvar:-$GC_LOG_NAME}
    # every stage but the last leaves GC_RESERVE seconds, so the report always runs
    left=$(( GC_DEADLINE - $(gc_now) - ( idx < ${#GC_STAGES[@]} - 1 ? GC_RESERVE : 0 ) ))
    if [ "$left" -lt 5 ]; then
        echo "=== $name: SKIPPED, ${left}s left of the ${GC_BUDGET}s budget" | tee -a "$GC_LOG"
        gc_record "$idx" "$name" no_time null 0 "$limit" "$(basename "$log")" "budget spent: not run"
        gc_write_summary false
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left note="limit cut to what was left of the budget"
    gc_record "$idx" "$name" running null 0 "$limit" "$(basename "$log")" "$note"
    gc_write_summary false
    t0=$(gc_now)
    { echo; echo "=== $name: start $(date -u +%T) UTC, limit ${limit}s, log $(basename "$log")"; } | tee -a "$GC_LOG"
    [ "$log" != "$GC_LOG" ] && echo "=== $name: start $(date -u +%T) UTC, limit ${limit}s" >>"$log"
    timeout --kill-after=10 "$limit" bash -c "stage_$name" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    case "$rc" in
        0) status=ok ;;
        124 | 137) status=timeout note="killed at its ${limit}s limit" ;;
        *) status=failed ;;
    esac
    gc_record "$idx" "$name" "$status" "$rc" "$(( $(gc_now) - t0 ))" "$limit" "$(basename "$log")" "$note"
    echo "=== $name: $status (exit $rc) in $(( $(gc_now) - t0 ))s" | tee -a "$GC_LOG"
    gc_write_summary false
}

gc_selected() {
    [ -z "$GC_ONLY" ] && return 0
    case ",$GC_ONLY," in *",$1,"*) return 0 ;; esac
    return 1
}

# gc_main "$@": the scripts' entry point, once GC_SCRIPT, GC_STAGES (rows "name device_limit
# dry_limit") and the stage_* functions are set.
gc_main() {
    gc_parse_args "$@"
    export OUT=${OUT:-$PWD/gpu_check_out}
    mkdir -p "$OUT" || exit 2
    OUT=$(cd "$OUT" && pwd)
    export WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
    mkdir -p "$WORK"
    # where torch.utils.cpp_extension builds and finds the cuda backend's extension: one cache
    # for every stage of this run, fresh on a fresh machine
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
    export GC_LOG="$OUT/$GC_LOG_NAME" GC_SCRIPT
    export PYTHON=${PYTHON:-python3}
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if [ "$DRY_RUN" = 1 ]; then
        export TRITON_INTERPRET=1 JOBS=${JOBS:-2}
    else
        export JOBS=${JOBS:-16}
    fi
    GC_T0=$(gc_now) GC_START_UTC=$(date -u +%FT%TZ)
    GC_DEADLINE=$(( GC_T0 + GC_BUDGET )) GC_RESERVE=${GC_RESERVE:-20}
    GC_REC_NAME=() GC_REC_STATUS=() GC_REC_RC=() GC_REC_SECS=() GC_REC_LIMIT=() GC_REC_LOG=() GC_REC_NOTE=()
    gc_source_facts
    export GC_COMMIT GC_DIRTY GC_SRC_SHA
    # a reused OUT or WORK must not lend this run an earlier run's results: the logs are appended
    # to stage by stage, and the report reads whatever JSON it finds
    local v
    for v in "$GC_LOG_NAME" $(compgen -v GC_STAGE_LOG_ | while read -r v; do echo "${!v}"; done); do
        : >"$OUT/$v"
    done
    rm -f "$OUT"/summary.json "$OUT"/bench.json "$OUT"/quant.json "$OUT"/lowrank.json \
        "$WORK"/report.json "$WORK"/l2.json "$WORK"/bench_*.json "$WORK"/cuda_built
    echo "$GC_SCRIPT: $([ "$DRY_RUN" = 1 ] && echo DRY RUN on the CPU || echo device run), budget ${GC_BUDGET}s," \
        "OUT=$OUT WORK=$WORK commit $GC_COMMIT sources $GC_SRC_SHA" | tee -a "$GC_LOG"
    trap 'gc_write_summary false; exit 130' INT TERM
    local i=0 row name dev dry
    for row in "${GC_STAGES[@]}"; do
        read -r name dev dry <<<"$row"
        if gc_selected "$name"; then
            gc_run_stage "$i" "$name" "$([ "$DRY_RUN" = 1 ] && echo "$dry" || echo "$dev")"
        else
            gc_record "$i" "$name" skipped null 0 0 "" "not in --stages"
        fi
        i=$(( i + 1 ))
    done
    gc_write_summary true
    echo "$GC_SCRIPT: done in $(( $(gc_now) - GC_T0 ))s; $OUT/summary.json:" | tee -a "$GC_LOG"
    grep -o '"name": "[^"]*", "status": "[^"]*", "rc": [^,]*, "seconds": [0-9]*' "$OUT/summary.json" | tee -a "$GC_LOG"
    grep -q '"ok": true' "$OUT/summary.json"
}

# ---- helpers the stages of both scripts use (exported: stages run in a child bash) ----

# The environment report: machine, GPU (read-only queries), compilers, Python packages,
# fastmerge.backends() as the source tree sees it before anything is built.
gc_env_report() {
    echo "uname: $(uname -a)"
    echo "cpus: $(nproc), memory: $(free -g 2>/dev/null | awk '/^Mem/ {print $2 " GiB"}')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi || true
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu \
            --format=csv || true
    else
        echo "nvidia-smi: not found$([ "$DRY_RUN" = 1 ] && echo ' (dry run: no GPU here)')"
    fi
    for tool in nvcc ninja c++ cuobjdump; do
        if command -v "$tool" >/dev/null; then
            echo "$tool: $(command -v "$tool"): $("$tool" --version 2>&1 | tail -n 1)"
        else
            echo "$tool: not found"
        fi
    done
    "$PYTHON" - <<'PY'
import importlib, platform, sys
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}: cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
for name in ("triton", "pybind11", "pytest", "xdist", "pytest_timeout", "setuptools", "peft", "mergekit",
             "numpy", "yaml", "safetensors"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
import warnings
warnings.simplefilter("ignore")
import fastmerge
for k, v in fastmerge.backends().items():
    print(f"backend {k}: available={v['available']}: {v['reason']}")
PY
}

# The project, built in place: `setup.py build_ext --inplace` makes fastmerge/_C*.so next to the
# sources, and PYTHONPATH=$PWD (set above) makes the tests, the bench and the CUDA JIT build all
# use this one tree (see bench/README.md, "GPU check scripts", for why not pip).
gc_install() {
    "$PYTHON" setup.py -q build_ext --inplace -j "$JOBS" || return
    ls -l fastmerge/_C*.so
    "$PYTHON" -W ignore - <<'PY'
import sys
import fastmerge
b = fastmerge.backends()
for k, v in b.items():
    print(f"backend {k}: available={v['available']}: {v['reason']}")
sys.exit(0 if b["cpu"]["available"] else "the cpu backend did not load: the GPU tests compare against it")
PY
}

# gc_pytest LOGGED_ARGS...: pytest with the flags the device runs use: quiet, every failure and
# skip reason in the summary, the slowest tests, xdist workers and a per-test timeout when those
# plugins are installed (both are on the device image; here they may be missing).
gc_pytest() {
    local extra=()
    if "$PYTHON" -c 'import xdist' 2>/dev/null && [ "${GC_PYTEST_WORKERS:-8}" != 0 ]; then
        extra+=(-n "${GC_PYTEST_WORKERS:-8}")
    fi
    "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout "${GC_TEST_TIMEOUT:-150}")
    echo "+ pytest ${extra[*]} $*"
    "$PYTHON" -m pytest -q -rfEs --durations=10 -p no:cacheprovider "${extra[@]}" "$@"
}

export -f gc_env_report gc_install gc_pytest

# ---- stages both scripts run (the scripts name them in GC_STAGES) ----

stage_env() { gc_env_report; }

stage_install() { gc_install; }

# gc_bench PART ARGS...: python -m bench.gpu into $WORK/bench_PART.json, then every part so far
# merged into $OUT/bench.json (bench.gpu writes its JSON only when it finishes, so a part killed
# at its limit leaves its rows in the log alone). The device runs the GPU backends in
# $GC_BENCH_BACKENDS; the dry run runs the same plan logic on the CPU at its tiny shapes.
gc_backends() {  # the GPU backends to time: a script's gc_bench_backends, else $GC_BENCH_BACKENDS
    if declare -F gc_bench_backends >/dev/null; then gc_bench_backends; else echo "$GC_BENCH_BACKENDS"; fi
}

gc_bench() {
    local part=$1 rc backends
    shift
    backends=$(gc_backends)
    rm -f "$WORK/bench_$part.json"
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ python -m bench.gpu --device cpu --backends cpu,$backends $* --json ..."
        "$PYTHON" -m bench.gpu --device cpu --backends "cpu,$backends" "$@" --json "$WORK/bench_$part.json"
    else
        echo "+ python -m bench.gpu --backends $backends $* --json ..."
        "$PYTHON" -m bench.gpu --backends "$backends" "$@" --json "$WORK/bench_$part.json"
    fi
    rc=$?
    "$PYTHON" bench/gpu_check_steps.py combine "$OUT/bench.json" "$WORK"/bench_accept.json "$WORK"/bench_quick.json \
        || { [ "$rc" = 0 ] && rc=1; }
    return "$rc"
}

# The issue's acceptance rows first (bf16 4096x14336, K=4: the figures the issue judges), then the
# quick plan (4096x4096, bf16 and fp32, K = 2, 4, 8); the dry run shrinks the shape.
stage_bench_accept() {
    if [ "$DRY_RUN" = 1 ]; then
        gc_bench accept --shapes 128x224 --dtypes bf16 --k 4
    else
        gc_bench accept --shapes 4096x14336 --dtypes bf16 --k 4
    fi
}

stage_bench_quick() { gc_bench quick --quick; }

# The acceptance shape again, timed with the L2 flushed before every call (the device notes'
# advice; bench.gpu does not flush): a cross-check of the figures above, into the report.
stage_l2_check() {
    "$PYTHON" bench/gpu_check_steps.py l2 --work "$WORK" --backends "$(gc_backends)" \
        $([ "$DRY_RUN" = 1 ] && echo --dry-run)
}

# Issue 23's review checks (bench/gpu_check_review.py): host reads and CUDA sync warnings per
# merge, a non-default stream, K in {3, 12, 17, 64} bit for bit, > 2**31 elements where memory
# allows, and one small merge under compute-sanitizer ($GC_REVIEW_SANITIZER: memcheck for the
# Triton script, racecheck for the CUDA one); $WORK/review.json goes into the report.
stage_review() {
    "$PYTHON" bench/gpu_check_review.py --work "$WORK" --backends "$(gc_backends)" \
        --sanitizer "${GC_REVIEW_SANITIZER:-memcheck}" $([ "$DRY_RUN" = 1 ] && echo --dry-run)
}

# The short table that ends the output (the device tool returns the output's tail) and
# $WORK/report.json, which summary.json embeds.
stage_report() {
    "$PYTHON" bench/gpu_check_steps.py report --out "$OUT" --work "$WORK" --script "$GC_SCRIPT"
}

export -f gc_backends gc_bench stage_env stage_install stage_bench_accept stage_bench_quick stage_l2_check stage_review stage_report
