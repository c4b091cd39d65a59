"""Benchmarks of the drop-in integrations: the same user code, unpatched vs patched, same run.

    python -m bench.integrations peft     [--size 2048] [--k 3] [--json PATH]
    python -m bench.integrations adapter  [--size 1024] [--layers 4] [--rank 16] [--json PATH]
    python -m bench.integrations mergekit [--scale 1b|tiny] [--methods ties,dare_ties]
                                          [--workdir DIR] [--json PATH]
    python -m bench.integrations merge    (same options; also --methods slerp_slices,passthrough_franken)
                                          [--no-refs: no mergekit-yaml] [--pairs N]

Every end-to-end row also times the bare I/O pass over the same inputs (``bare_io_ms``: K+1
inputs read with ``pread`` into reused buffers, one base-sized output written with ``pwrite``,
no arithmetic) and reports the contender's time as a multiple of it (``x_bare_io``).

``peft``: ``peft.utils.merge_utils``' functions on K fp32 task tensors, PEFT's own code vs
``fastmerge.integrations.peft.patched()``. ``adapter``: ``LoraModel.add_weighted_adapter`` on a
synthetic model of ``--layers`` square Linear layers with three LoRA adapters. ``mergekit``: end to
end ``mergekit-yaml CONFIG OUT`` vs ``fastmerge mergekit CONFIG OUT`` on a synthetic Llama
(``1b``: TinyLlama-1.1B's shapes, bf16, written once under ``--workdir``), K=3, each run a fresh
process timed from start to exit (I/O included) with its peak RSS (getrusage in a fresh helper process, so nothing of this process counts); the inputs are
read once beforehand so both runs find them in the page cache; the outputs are compared.
``merge``: the same, ``mergekit-yaml`` vs ``fastmerge merge CONFIG OUT`` (fastmerge's own
streaming merge of the same YAML).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

import torch

if __package__ in (None, ""):  # ``python bench/integrations.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import suite
else:
    from . import suite


def _meta(mode: str, **extra) -> dict:
    return {"mode": mode, "device": suite.device_name("cpu"), **suite.environment(), **extra}


def _median_ms(fn, max_time=60.0) -> float:
    return 1e3 * statistics.median(suite.time_fn(fn, warmup=1, min_reps=3, min_time=1.0, max_time=max_time))


def _print_row(r: dict) -> None:
    print(f"{r['op']:<34} {r['shape']!s:<14} k={r['k']}  {r['library']:<9} {r['median_ms']:>10.1f} ms  "
          f"patched {r['patched_ms']:>8.1f} ms  x{r['speedup']:.1f}", flush=True)


# ----------------------------------------------------------------------------- PEFT functions

def bench_peft(size: int, k: int) -> list:
    import peft.utils.merge_utils as mu

    import fastmerge.integrations.peft as fm_peft

    g = torch.Generator().manual_seed(0)
    tasks = [0.01 * torch.randn(size, size, generator=g) for _ in range(k)]
    w = torch.linspace(1.0, 0.5, k)
    cases = {
        "ties": lambda: mu.ties(tasks, w, 0.2),
        "dare_ties": lambda: mu.dare_ties(tasks, w, 0.2),
        "dare_linear": lambda: mu.dare_linear(tasks, w, 0.2),
        "magnitude_prune": lambda: mu.magnitude_prune(tasks, w, 0.2),
        "task_arithmetic": lambda: mu.task_arithmetic(tasks, w),
    }
    rows = []
    for op, fn in cases.items():
        theirs = _median_ms(fn)
        with fm_peft.patched():
            ours = _median_ms(fn)
        rows.append({"op": f"peft.merge_utils.{op}", "library": "peft", "shape": [size, size],
                     "dtype": "float32", "k": k, "median_ms": theirs, "patched_ms": ours,
                     "speedup": theirs / ours})
        _print_row(rows[-1])
    return rows


# ----------------------------------------------------------------------------- add_weighted_adapter

def bench_adapter(size: int, layers: int, rank: int) -> list:
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import fastmerge.integrations.peft as fm_peft

    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(size, size, bias=False) for _ in range(layers)])
    targets = [str(i) for i in range(layers)]
    model = get_peft_model(net, LoraConfig(r=rank, target_modules=targets, init_lora_weights=False),
                           adapter_name="x")
    for name in ("y", "z"):
        model.add_adapter(name, LoraConfig(r=rank, target_modules=targets, init_lora_weights=False))
    rows = []
    for combination in ("ties", "dare_ties", "svd", "ties_svd"):
        kw = dict(combination_type=combination, density=0.2)

        def run(patched: bool):
            m = copy.deepcopy(model)  # a fresh model each time: the new adapter name must be new
            t0 = time.perf_counter()
            if patched:
                with fm_peft.patched():
                    m.add_weighted_adapter(["x", "y", "z"], [1.0, 0.7, 0.5], "m", **kw)
            else:
                m.add_weighted_adapter(["x", "y", "z"], [1.0, 0.7, 0.5], "m", **kw)
            return time.perf_counter() - t0

        theirs = 1e3 * statistics.median(run(False) for _ in range(3))
        ours = 1e3 * statistics.median(run(True) for _ in range(3))
        rows.append({"op": f"add_weighted_adapter[{combination}]", "library": "peft",
                     "shape": [layers, size, size], "dtype": "float32", "k": 3, "rank": rank,
                     "median_ms": theirs, "patched_ms": ours, "speedup": theirs / ours})
        _print_row(rows[-1])
    return rows


# ----------------------------------------------------------------------------- mergekit end to end

SCALES = {
    # TinyLlama-1.1B's shapes: 1.10e9 parameters
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
E2E_PARAMS = {
    "ties": ["{weight: 1.0, density: 0.3}", "{weight: 0.5, density: 0.5}", "{weight: 0.7, density: 0.2}"],
    "dare_ties": ["{weight: 1.0, density: 0.3}", "{weight: 0.5, density: 0.5}", "{weight: 0.7, density: 0.2}"],
    "task_arithmetic": ["{weight: 0.5}", "{weight: 0.3}", "{weight: 0.2}"],
}


# `slices` configs (issue 18's acceptance): mergekit's classic gradient SLERP over one slice, and
# a passthrough frankenmerge of two overlapping layer ranges
SLICE_METHODS = {"slerp_slices": "slerp", "passthrough_franken": "passthrough"}


def _e2e_config(method: str, paths: list, layers: int) -> list:
    """The YAML lines of end-to-end case ``method`` over ``paths`` (base, m0, m1, ...)."""
    if method == "slerp_slices":
        return ["merge_method: slerp", f"base_model: {paths[0]}", "dtype: bfloat16", "slices:",
                "  - sources:", f"    - model: {paths[0]}", f"      layer_range: [0, {layers}]",
                f"    - model: {paths[1]}", f"      layer_range: [0, {layers}]",
                "parameters:", "  t:", "    - filter: self_attn", "      value: [0, 0.5, 0.3, 0.7, 1]",
                "    - filter: mlp", "      value: [1, 0.5, 0.7, 0.3, 0]", "    - value: 0.5"]
    if method == "passthrough_franken":
        cut = max(1, layers * 3 // 4)
        return ["merge_method: passthrough", "dtype: bfloat16", "slices:",
                "  - sources:", f"    - model: {paths[1]}", f"      layer_range: [0, {cut}]",
                "  - sources:", f"    - model: {paths[2]}", f"      layer_range: [{layers - cut}, {layers}]"]
    lines = [f"merge_method: {method}", f"base_model: {paths[0]}", "dtype: bfloat16", "models:"]
    for p, params in zip(paths[1:], E2E_PARAMS[method]):
        lines += [f"  - model: {p}", f"    parameters: {params}"]
    return lines


def build_llamas(root: str, scale: str, k: int = 3) -> list:
    """``root/base`` and ``root/m0..m{k-1}``: safetensors checkpoints of a synthetic Llama
    (base ~ N(0, 0.02), fine-tunes = base + N(0, 0.002*(i+1))), bf16, written tensor by tensor
    from the shapes of a meta-device model (no 4 GB fp32 model is ever materialised)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    names = ["base"] + [f"m{i}" for i in range(k)]
    marker = os.path.join(root, f".built-{scale}-{k}")
    if os.path.exists(marker):
        return [os.path.join(root, n) for n in names]
    cfg = LlamaConfig(max_position_embeddings=2048, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"],
                      **SCALES[scale])
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for n in names:
        os.makedirs(os.path.join(root, n), exist_ok=True)
        cfg.save_pretrained(os.path.join(root, n))
    for i, n in enumerate(names):
        g.manual_seed(0)  # the same base in every checkpoint
        tensors = {}
        for name, shape in shapes.items():
            base = 0.02 * torch.randn(shape, generator=g) + (1.0 if name.endswith("norm.weight") else 0.0)
            if i:
                base += 0.002 * i * torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(f'{name}/{i}'.encode())))
            tensors[name] = base.to(torch.bfloat16)
        save_file(tensors, os.path.join(root, n, "model.safetensors"), metadata={"format": "pt"})
        del tensors
        print(f"wrote {n}", flush=True)
    open(marker, "w").close()
    return [os.path.join(root, n) for n in names]


# Runs one command and reports its wall time and peak RSS. A child forked from this (large)
# benchmark process would inherit its RSS in ru_maxrss (the count starts at fork, before exec),
# so every command runs under this small, freshly exec'd Python, whose own children start small.
_MEASURE = r"""
import os, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[2:], stdout=subprocess.DEVNULL)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as fh:
    fh.write(f"{wall} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024} {rc}")
"""


def _run_timed(cmd: list, env=None) -> tuple:
    """(wall seconds, peak RSS bytes, returncode) of one child process, measured by a fresh
    helper process (see ``_MEASURE``)."""
    # stderr to a file, not a pipe: nothing reads a pipe while the child runs, so a child writing
    # more than the pipe buffer (progress bars) would stall
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r", suffix=".txt") as res:
        rc = subprocess.call([sys.executable, "-c", _MEASURE, res.name] + cmd, env=env,
                             stdout=subprocess.DEVNULL, stderr=err)
        fields = res.read().split()
        wall, rss, rc = (float(fields[0]), int(fields[1]), int(fields[2])) if len(fields) == 3 else (0.0, 0, rc or 1)
        if rc:
            err.seek(0)
            print(err.read().decode(errors="replace")[-3000:], file=sys.stderr)
    return wall, rss, rc


def _compare(out_a: str, out_b: str) -> dict:
    from safetensors import safe_open

    worst, n, files = 0.0, 0, sorted(f for f in os.listdir(out_a) if f.endswith(".safetensors"))
    for f in files:
        with safe_open(os.path.join(out_a, f), "pt") as a, safe_open(os.path.join(out_b, f), "pt") as b:
            for key in a.keys():
                x, y = a.get_tensor(key).float(), b.get_tensor(key).float()
                worst = max(worst, float((x - y).abs().max()))
                n += 1
    return {"tensors_compared": n, "max_abs_diff": worst}


# The I/O floor of a merge (issue 19): every tensor of the base and the K models read with
# pread into reused buffers, and one output of the base's size written with pwrite, no
# arithmetic. argv: OUT_FILE BASE_DIR MODEL_DIR...; each model's tensors are looked up by name in
# its own safetensors headers, so sharding may differ between models.
_BARE_IO = r"""
import json, os, struct, sys
def index(d):
    idx = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".safetensors"):
            continue
        fd = os.open(os.path.join(d, f), os.O_RDONLY)
        (hlen,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, hlen, 8))
        for name, t in header.items():
            if name != "__metadata__":
                a, b = t["data_offsets"]
                idx[name] = (fd, 8 + hlen + a, b - a)
    return idx
out, dirs = sys.argv[1], sys.argv[2:]
idx = [index(d) for d in dirs]
buf = bytearray(max(n for _, _, n in idx[0].values()))
view = memoryview(buf)
ofd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
pos = 0
for name, (_, _, n) in idx[0].items():
    for ix in idx:
        fd, off, m = ix[name]
        got = 0
        while got < m:
            got += os.preadv(fd, [view[got:m]], off + got)
    os.pwrite(ofd, view[:n], pos)
    pos += n
os.close(ofd)
"""


CONTENDERS = {  # what each e2e mode runs against mergekit-yaml, as a command prefix
    "mergekit": ("fastmerge mergekit", [sys.executable, "-m", "fastmerge", "mergekit"]),
    "merge": ("fastmerge merge", [sys.executable, "-m", "fastmerge", "merge"]),
}


def bench_bare_io(paths: list, out: str) -> tuple:
    """(wall seconds, peak RSS bytes) of the bare I/O pass over ``paths`` (base first) into the
    file ``out``, a fresh process timed like the merges (``_BARE_IO``)."""
    wall, rss, rc = _run_timed([sys.executable, "-c", _BARE_IO, out] + list(paths))
    if rc:
        raise SystemExit(f"the bare I/O pass failed (exit {rc})")
    os.remove(out)
    return wall, rss


def bench_mergekit(scale: str, methods: list, workdir: str, mode: str = "mergekit", refs: bool = True,
                   pairs: int = 1) -> list:
    """``mergekit-yaml CONFIG OUT`` vs the contender of ``mode`` on the same config, each a fresh
    process timed from start to exit, peak RSS measured by a fresh helper process. Beside each
    contender run, the bare I/O pass over the method's inputs is timed too (``bare_io_ms``: the
    floor the contender is measured against; ``pairs`` alternating pairs of the two, medians and
    the median ratio reported). ``refs=False`` skips mergekit-yaml."""
    paths = build_llamas(os.path.join(workdir, f"llama-{scale}"), scale)
    for p in paths:  # page cache: both runs read warm files
        for f in os.listdir(p):
            with open(os.path.join(p, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    name, command = CONTENDERS[mode]
    rows = []
    for method in methods:
        cfg = os.path.join(workdir, f"{scale}-{method}.yml")
        lines = _e2e_config(method, paths, SCALES[scale]["num_hidden_layers"])
        with open(cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        extra = {"mergekit-yaml": ["--random-seed", "0", "--no-copy-tokenizer"],
                 name: ["--random-seed", "0", "--no-copy-tokenizer"] + (["--no-progress"] if mode == "merge" else [])}
        outs = {}
        results = {}
        runs = (("mergekit-yaml", [sys.executable, "-c", "from mergekit.scripts.run_yaml import main; main()"]),
                (name, command))
        k = {"slerp_slices": 1, "passthrough_franken": 2}.get(method, 3)
        ins = [paths[0]] + list(paths[1:1 + k])  # what the method reads: the base, then its models
        io_walls, ratios = [], []
        for who, prefix in runs[(0 if refs else 1):]:
            out = os.path.join(workdir, f"out-{scale}-{method}-{who.replace(' ', '-')}")
            walls = []
            # the contender: `pairs` pairs of (bare I/O pass, contender), alternating
            for _ in range(pairs if who == name else 1):
                if who == name:
                    io_wall, io_rss = bench_bare_io(ins, os.path.join(workdir, "bare-io.out"))
                    io_walls.append(io_wall)
                    print(f"{method:<10} {'bare I/O pass':<19} {io_wall:8.1f} s   peak RSS {io_rss / 2**30:6.2f} GiB",
                          flush=True)
                subprocess.run(["rm", "-rf", out], check=True)
                wall, rss, rc = _run_timed(prefix + [cfg, out] + extra[who], env)
                if rc:
                    raise SystemExit(f"{who} failed on {cfg} (exit {rc})")
                walls.append(wall)
                if who == name:
                    ratios.append(wall / io_wall)
                print(f"{method:<10} {who:<19} {wall:8.1f} s   peak RSS {rss / 2**30:6.2f} GiB", flush=True)
            outs[who], results[who] = out, (statistics.median(walls), rss)
        io_wall = statistics.median(io_walls)
        t_fm, rss_fm = results[name]
        row = {"op": f"e2e {method}", "library": "mergekit", "contender": name, "scale": scale,
               "params": SCALES[scale], "dtype": "bfloat16", "k": k, "config": "\n".join(lines),
               "patched_ms": t_fm * 1e3, "bare_io_ms": io_wall * 1e3, "x_bare_io": statistics.median(ratios),
               "pairs_ms": [[1e3 * a, 1e3 * a * r] for a, r in zip(io_walls, ratios)],
               "peak_rss_bytes": {name: rss_fm, "bare I/O pass": io_rss}}
        if refs:
            t_mk, rss_mk = results["mergekit-yaml"]
            row.update(median_ms=t_mk * 1e3, speedup=t_mk / t_fm, rss_ratio=rss_fm / rss_mk,
                       output_vs_mergekit=_compare(outs["mergekit-yaml"], outs[name]))
            row["peak_rss_bytes"]["mergekit-yaml"] = rss_mk
            print(f"{method:<10} speedup x{t_mk / t_fm:.1f}, peak RSS ratio {rss_fm / rss_mk:.2f}, "
                  f"outputs: {row['output_vs_mergekit']}", flush=True)
        print(f"{method:<10} {name}: {row['x_bare_io']:.2f}x the bare I/O pass (median of {len(ratios)} pairs)",
              flush=True)
        rows.append(row)
        for out in outs.values():
            subprocess.run(["rm", "-rf", out], check=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.integrations", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("peft")
    a.add_argument("--size", type=int, default=2048)
    a.add_argument("--k", type=int, default=3)
    b = sub.add_parser("adapter")
    b.add_argument("--size", type=int, default=1024)
    b.add_argument("--layers", type=int, default=4)
    b.add_argument("--rank", type=int, default=16)
    e2e = []
    for mode in CONTENDERS:
        c = sub.add_parser(mode)
        c.add_argument("--scale", choices=sorted(SCALES), default="tiny")
        c.add_argument("--methods", default="ties,dare_ties")
        c.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "fastmerge-e2e"))
        c.add_argument("--no-refs", action="store_true", help="skip mergekit-yaml (the bare I/O row stays)")
        c.add_argument("--pairs", type=int, default=1, help="(bare I/O pass, contender) pairs timed alternately")
        e2e.append(c)
    for s in (a, b, *e2e):
        s.add_argument("--json", default=None, help="write {meta, rows} here")
    args = p.parse_args(argv)
    print(f"{suite.device_name('cpu')}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    if args.mode == "peft":
        rows = bench_peft(args.size, args.k)
    elif args.mode == "adapter":
        rows = bench_adapter(args.size, args.layers, args.rank)
    else:
        rows = bench_mergekit(args.scale, args.methods.split(","), args.workdir, args.mode, refs=not args.no_refs,
                              pairs=max(1, args.pairs))
    if args.json:
        meta = _meta(f"integrations-{args.mode}", argv=list(argv if argv is not None else sys.argv[1:]))
        path = suite.save_json(rows, meta, args.json)
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
