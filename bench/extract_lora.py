"""``fastmerge extract-lora`` vs ``mergekit-extract-lora`` on a synthetic Llama (issue 20).

    python bench/extract_lora.py --scale 1b --rank 64 [--mergekit-layers 1] [--workdir DIR]

Builds (once, under ``--workdir``) a base and a fine-tune with TinyLlama-1.1B's shapes in bf16
(``--layers`` decoder layers, default all 22), written tensor by tensor. The fine-tune's delta on
every 2-D weight is what full fine-tunes look like spectrally: a power-law spectrum over 256
directions (``σ_i ∝ i^-0.8``, RMS 1e-3 against weights ~0.02) on a full-rank noise floor (RMS 1e-4);
norms get a small dense delta. Then, each a fresh process timed from start to exit with peak
RSS from ``wait4`` (files read warm from the page cache for both):

* ``fastmerge extract-lora BASE FT OUT --rank R`` on the whole model;
* ``mergekit-extract-lora --base-model BASE --model FT --out-path OUT --max-rank R`` on the same
  model, or, with ``--mergekit-layers N``, both tools on a model of the same shapes cut to N
  decoder layers (mergekit's full SVD per module takes minutes each on this 2-core CPU);
* then, untimed: per LoRA module of each output, ``‖ΔW − B A‖_F`` against the Eckart-Young
  optimum ``(‖ΔW‖_F² − Σ_{i≤R} λ_i)^½``, ``λ`` the eigenvalues of the fp64 Gram matrix of ΔW.

Writes ``bench/results/extract_lora_<scale>.json`` (rows, the command, commit, versions, date).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib

import torch

if __package__ in (None, ""):  # ``python bench/extract_lora.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import suite
    from bench.integrations import SCALES, _run_timed
else:
    from . import suite
    from .integrations import SCALES, _run_timed

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _delta(shape, g: torch.Generator) -> torch.Tensor:
    """A fine-tune-like delta: power-law spectrum over 256 directions + a noise floor."""
    m, n = shape
    k = min(256, m, n)
    s = 0.02 * torch.arange(1, k + 1, dtype=torch.float32) ** -0.8
    u = torch.randn(m, k, generator=g) / m ** 0.5
    v = torch.randn(k, n, generator=g) / n ** 0.5
    lr = (u * s) @ v
    lr *= 1e-3 * (m * n) ** 0.5 / lr.norm()  # RMS 1e-3
    return lr + 1e-4 * torch.randn(m, n, generator=g)


def build(root: str, scale: str, layers: int) -> tuple:
    """``root/base`` and ``root/ft`` (bf16 safetensors + config.json), built once."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(SCALES[scale], num_hidden_layers=layers)
    paths = (os.path.join(root, "base"), os.path.join(root, "ft"))
    marker = os.path.join(root, ".built")
    if os.path.exists(marker):
        return paths
    cfg = LlamaConfig(max_position_embeddings=2048, torch_dtype="bfloat16",
                      architectures=["LlamaForCausalLM"], tie_word_embeddings=False, **dims)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).state_dict().items()}
    for p in paths:
        os.makedirs(p, exist_ok=True)
        cfg.save_pretrained(p)
    base, ft = {}, {}
    for name, shape in shapes.items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        w = 0.02 * torch.randn(shape, generator=g) + (1.0 if name.endswith("norm.weight") else 0.0)
        d = _delta(shape, g) if len(shape) == 2 else 1e-3 * torch.randn(shape, generator=g)
        base[name], ft[name] = w.to(torch.bfloat16), (w + d).to(torch.bfloat16)
    save_file(base, os.path.join(paths[0], "model.safetensors"), metadata={"format": "pt"})
    save_file(ft, os.path.join(paths[1], "model.safetensors"), metadata={"format": "pt"})
    open(marker, "w").close()
    return paths


def _warm(*folders) -> None:
    for p in folders:
        for f in os.listdir(p):
            with open(os.path.join(p, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def errors(base: str, ft: str, out: str, rank: int, optimum: dict, gram_dtype=torch.float64,
           log: bool = False) -> dict:
    """``module -> (‖ΔW − B A‖_F, rank)`` for every LoRA module in the adapter ``out``; fills
    ``optimum[module]`` (Eckart-Young, from the fp64 Gram matrix's eigenvalues) when missing."""
    from safetensors import safe_open

    res = {}
    with safe_open(os.path.join(base, "model.safetensors"), "pt") as fb, \
            safe_open(os.path.join(ft, "model.safetensors"), "pt") as ff, \
            safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as fa:
        keys = set(fa.keys())
        for k in sorted(keys):
            if not k.endswith(".lora_A.weight"):
                continue
            mod = k[len("base_model.model."):-len(".lora_A.weight")]
            d = ff.get_tensor(mod + ".weight").float() - fb.get_tensor(mod + ".weight").float()
            a = fa.get_tensor(k).float()
            b = fa.get_tensor(k.replace("lora_A", "lora_B")).float()
            res[mod] = (float((d - b @ a).norm()), a.shape[0])
            if mod not in optimum:
                dg = d.to(gram_dtype)
                gram = dg @ dg.T if d.shape[0] <= d.shape[1] else dg.T @ dg
                lam = torch.linalg.eigvalsh(gram).double().flip(0).clamp_min(0)
                optimum[mod] = float((lam[rank:].sum()).sqrt())
            if log:
                print(f"  {mod}: error / optimum {res[mod][0] / optimum[mod]:.4f}", flush=True)
    return res


def _run(name: str, cmd: list, out: str, env) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    print(f"$ {' '.join(cmd)}", flush=True)
    wall, rss, rc = _run_timed(cmd, env=env)
    print(f"  {name}: {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB, rc {rc}", flush=True)
    return {"tool": name, "command": " ".join(cmd), "seconds": wall, "peak_rss_bytes": rss, "rc": rc}


def compare(base: str, ft: str, workdir: str, tag: str, rank: int, mergekit: bool, env) -> dict:
    _warm(base, ft)
    fm_out, mk_out = os.path.join(workdir, f"out-fastmerge-{tag}"), os.path.join(workdir, f"out-mergekit-{tag}")
    runs = [_run("fastmerge", [sys.executable, "-m", "fastmerge", "extract-lora", base, ft, fm_out,
                               "--rank", str(rank), "--no-progress"], fm_out, env)]
    if mergekit:
        runs.append(_run("mergekit", [sys.executable, "-m", "mergekit.scripts.extract_lora", "--base-model", base, "--model", ft, "--out-path", mk_out,
                                      "--max-rank", str(rank)], mk_out, env))
    t0 = time.perf_counter()
    optimum: dict = {}
    for r, out in zip(runs, (fm_out, mk_out)):
        if r["rc"] == 0:
            errs = errors(base, ft, out, rank, optimum)
            r["modules"] = len(errs)
            r["ranks"] = sorted({v[1] for v in errs.values()})
            ratios = {m: e / optimum[m] if optimum[m] > 0 else 1.0 for m, (e, _) in errs.items()}
            r["worst_error_ratio"] = max(ratios.values())
            r["worst_module"] = max(ratios, key=ratios.get)
            r["median_error_ratio"] = sorted(ratios.values())[len(ratios) // 2]
            r["error_ratio"] = ratios
            print(f"  {r['tool']}: {len(errs)} modules, error / optimum: worst {r['worst_error_ratio']:.4f} "
                  f"({r['worst_module']}), median {r['median_error_ratio']:.4f}", flush=True)
    row = {"model": tag, "rank": rank, "runs": runs, "check_seconds": time.perf_counter() - t0}
    if len(runs) == 2 and all(r["rc"] == 0 for r in runs):
        row["speedup"] = runs[1]["seconds"] / runs[0]["seconds"]
        row["rss_ratio"] = runs[1]["peak_rss_bytes"] / runs[0]["peak_rss_bytes"]
        print(f"  speedup x{row['speedup']:.1f}, mergekit/fastmerge peak RSS x{row['rss_ratio']:.2f}", flush=True)
    return row


def _save(out: str, meta: dict, rows: list) -> None:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    slim = json.loads(json.dumps(rows))
    for r in slim:  # per-module ratios only for small models; the worst and median stay
        for run in r["runs"]:
            if len(run.get("error_ratio", {})) > 40:
                run.pop("error_ratio")
    with open(out, "w") as fh:
        json.dump({"meta": meta, "rows": slim}, fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(f"wrote {out}", flush=True)


def check_only(args) -> int:
    """Error / optimum for every LoRA module of an existing adapter, added to the JSON."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    optimum: dict = {}
    errs = errors(*args.check, args.rank, optimum, gram_dtype=torch.float32, log=True)
    ratios = {m: e / optimum[m] if optimum[m] > 0 else 1.0 for m, (e, _) in errs.items()}
    row = {"adapter": args.check[2], "rank": args.rank, "modules": len(errs),
           "ranks": sorted({v[1] for v in errs.values()}), "worst_error_ratio": max(ratios.values()),
           "worst_module": max(ratios, key=ratios.get),
           "median_error_ratio": sorted(ratios.values())[len(ratios) // 2],
           "optimum": "eigvalsh of the fp32 Gram matrix of each delta", "check_seconds": time.perf_counter() - t0}
    print(f"{len(errs)} modules: worst {row['worst_error_ratio']:.4f} ({row['worst_module']}), "
          f"median {row['median_error_ratio']:.4f}", flush=True)
    out = args.out or os.path.join(RESULTS, f"extract_lora_{args.scale}.json")
    data = json.load(open(out)) if os.path.exists(out) else {"meta": {}, "rows": []}
    data.setdefault("checks", []).append(row)
    with open(out, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/extract_lora.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the full model (default: the scale's)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--mergekit-layers", type=int, default=None, metavar="N",
                    help="time mergekit (and fastmerge) on the same shapes cut to N layers, first; "
                         "then fastmerge alone on the full model")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--workdir", default="/tmp/fastmerge-bench-extract")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/extract_lora_<scale>.json)")
    ap.add_argument("--check", nargs=3, metavar=("BASE", "FT", "ADAPTER"), default=None,
                    help="only the error check of one adapter (fp32 Gram matrices, one line per "
                         "module), merged into the JSON's 'checks'")
    args = ap.parse_args(argv)
    if args.check:
        return check_only(args)
    torch.set_num_threads(1)  # the untimed error check; the timed tools run in their own processes
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    layers = args.layers or SCALES[args.scale]["num_hidden_layers"]
    out = args.out or os.path.join(RESULTS, f"extract_lora_{args.scale}.json")
    meta = {"mode": "extract_lora", "device": suite.device_name("cpu"), **suite.environment(),
            "command": " ".join([sys.executable] + sys.argv), "scale": args.scale,
            "delta": "power law sigma_i ~ i^-0.8 over 256 directions (RMS 1e-3) + noise (RMS 1e-4), bf16"}
    rows: list = []
    if args.mergekit_layers and not args.no_mergekit:
        n = args.mergekit_layers
        cut = build(os.path.join(args.workdir, f"{args.scale}-{n}"), args.scale, n)
        rows.append(compare(*cut, args.workdir, f"{args.scale}-{n}", args.rank, True, env))
        _save(out, meta, rows)
    t0 = time.perf_counter()
    full = build(os.path.join(args.workdir, f"{args.scale}-{layers}"), args.scale, layers)
    print(f"built {args.scale} x {layers} layers in {time.perf_counter() - t0:.0f} s", flush=True)
    on_full = not args.no_mergekit and args.mergekit_layers is None
    rows.append(compare(*full, args.workdir, f"{args.scale}-{layers}", args.rank, on_full, env))
    _save(out, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
