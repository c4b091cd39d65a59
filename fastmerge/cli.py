"""The ``fastmerge`` command line (also ``python -m fastmerge``).

Subcommands:
    fastmerge bench [options]   benchmark against PEFT and mergekit (``fastmerge bench --help``)
    fastmerge bench-lowrank     fastmerge.lowrank vs the full-SVD paths (``--help``)
    fastmerge bench-gpu         the triton and cuda backends vs PEFT/mergekit on a GPU (``--help``)
    fastmerge bench-quant       fastmerge.quant: quantizers, fused merge->quantize, deltas (``--help``)
    fastmerge backends          which backends this machine can run, and why not
    fastmerge merge CONFIG OUT  merge whole safetensors checkpoints from a mergekit YAML config
                                (any method of fastmerge.METHODS), streaming (``fastmerge merge --help``; ``torchrun ... -m
                                fastmerge merge`` splits the work across processes)
    fastmerge mergekit CONFIG OUT [mergekit-yaml options]
                                mergekit-yaml with its task-arithmetic family and linear merges
                                running on fastmerge (same YAML, same output layout)
    fastmerge extract-lora BASE FINETUNED OUT --rank R
                                a PEFT LoRA adapter from a full fine-tune (randomized SVD per
                                linear module; ``fastmerge extract-lora --help``)

Heavy imports happen inside the subcommand that needs them, so ``fastmerge --help`` is instant.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence


def _bench_module(name: str = "suite"):
    """``fastmerge.bench.<name>`` when installed (setup.py maps bench/ to fastmerge.bench);
    from a source tree without install, ``bench/<name>.py`` next to the package."""
    import importlib

    try:
        return importlib.import_module(f"fastmerge.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastmerge.bench", f"fastmerge.bench.{name}"):
            raise  # a real missing dependency inside the suite: show it
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "bench", f"{name}.py")):
        raise SystemExit("fastmerge bench: the benchmark suite is not installed "
                         "(fastmerge.bench is missing); reinstall fastmerge with `pip install .`")
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"bench.{name}")


def _cmd_bench(args, rest) -> int:
    return _bench_module().main(rest, prog="fastmerge bench")


def _cmd_bench_lowrank(args, rest) -> int:
    return _bench_module("lowrank").main(rest, prog="fastmerge bench-lowrank")


def _cmd_bench_gpu(args, rest) -> int:
    return _bench_module("gpu").main(rest)
def _cmd_bench_quant(args, rest) -> int:
    return _bench_module("quant").main(rest, prog="fastmerge bench-quant")


def _cmd_backends(args, rest) -> int:
    import fastmerge

    for name, info in fastmerge.backends().items():
        print(f"{name:<7} {'available' if info['available'] else 'unavailable':<11}  {info['reason']}")
    return 0


def _cmd_mergekit(args, rest) -> int:
    """``mergekit-yaml`` itself (its options, its config parsing, its writer), with
    :func:`fastmerge.integrations.mergekit.patch` applied first."""
    from .integrations import mergekit as fm_mergekit

    try:
        fm_mergekit.patch()
    except (ImportError, RuntimeError) as exc:
        print(f"fastmerge mergekit: {exc}", file=sys.stderr)
        return 2
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    if not any(a in ("-h", "--help") for a in rest):
        import fastmerge

        names = [n for n, i in fastmerge.backends().items() if i["available"]]
        print(f"fastmerge mergekit: mergekit {', '.join(fm_mergekit.METHODS)} run on fastmerge "
              f"(backends here: {', '.join(names)})", file=sys.stderr)
    try:
        mergekit_yaml.main(args=rest, prog_name="fastmerge mergekit", standalone_mode=True)
    except SystemExit as exc:  # click ends every run with sys.exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except FileNotFoundError as exc:
        print(f"fastmerge mergekit: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 1
    return 0


_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB``, a plain integer, or mergekit's ``5B`` (billion)."""
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = math.nan
    # finite and at least one byte (inf, nan and 1e400 are not sizes)
    if unit not in _SIZE_UNITS or not math.isfinite(value) or value * _SIZE_UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 5GB, 500MB or 2GiB")
    return int(value * _SIZE_UNITS[unit])


def parse_count(text: str) -> int:
    """A parameter count as mergekit writes it: ``5B``, ``500M``, ``10K`` or an integer."""
    t = text.strip().upper().replace(" ", "")
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale != 1 else t)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value * scale < 1:
        raise argparse.ArgumentTypeError(f"bad parameter count {text!r}: use e.g. 5B, 500M or 1000000")
    return int(value * scale)


_NO_OPS = ("lazy-unpickle", "low-cpu-memory", "read-to-gpu", "multi-gpu", "async-write",
           "clone-tensors")


def _mergekit_options(p) -> None:
    """``mergekit-yaml``'s options, so that its command lines run unchanged."""
    g = p.add_argument_group("mergekit-yaml options")
    g.add_argument("--out-shard-size", type=parse_count, default=None, metavar="N",
                   help="parameters per output shard, as mergekit counts them (e.g. 5B); "
                        "overrides --max-shard-size")
    g.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the tokenizer files to OUT (default: yes)")
    g.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write a README.md model card describing the merge (default: yes)")
    g.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=False,
                   help="merge models whose config.json names different architectures")
    g.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                   help="same as --device cuda")
    g.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="same as --no-progress")
    g.add_argument("--transformers-cache", default=None, metavar="DIR",
                   help="the Hugging Face hub cache hub ids are read from (sets HF_HUB_CACHE)")
    g.add_argument("-j", "--num-threads", type=int, default=None, metavar="N",
                   help="CPU threads of the merge kernels (default: torch's)")
    g.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True,
                   help="fastmerge always writes safetensors; --no-safe-serialization is refused")
    g.add_argument("--unsafe-truncate-embeddings", action=argparse.BooleanOptionalAction,
                   default=False, help="not supported (an error): align vocabularies instead")
    g.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="let transformers run a model folder's own tokenizer code when the config "
                        "builds a tokenizer (tokenizer_source / tokenizer:); model code never runs")
    for flag in _NO_OPS:
        g.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None,
                       help=argparse.SUPPRESS)
    g.add_argument("--write-threads", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    g.add_argument("--lora-merge-cache", default=None, help=argparse.SUPPRESS)
    g.add_argument("--lora-merge-dtype", default=None, help=argparse.SUPPRESS)


def _mergekit_args(args) -> Optional[str]:
    """Apply mergekit-yaml's options to ``args``; an error message for one fastmerge refuses."""
    if not args.safe_serialization:
        return "--no-safe-serialization: fastmerge writes safetensors only"
    if args.unsafe_truncate_embeddings:
        return ("--unsafe-truncate-embeddings is not supported: merge models of one vocabulary "
                "(or use `fastmerge mergekit`)")
    if args.cuda:
        args.device = "cuda"
    if args.quiet:
        args.no_progress = True
    if args.num_threads is not None and args.num_threads < 1:
        return f"--num-threads must be at least 1, got {args.num_threads}"
    return None


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``fastmerge merge: error: argument --x: ...``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _merge_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge safetensors checkpoints from a mergekit YAML config (merge --help)",
        description="Merge whole checkpoints (local folders of safetensors) as a mergekit YAML "
                    "config says, streaming tensor by tensor on fastmerge's kernels. Runs under "
                    "torchrun too: `torchrun --nproc-per-node=N -m fastmerge merge CONFIG OUT` "
                    "splits the tensors across the processes (gloo on CPU, NCCL on GPUs) and "
                    "writes the same files as one process. OUT appears only when complete.")
    p.add_argument("config", help="mergekit-style YAML: merge_method, base_model, models with "
                                  "parameters, dtype, out_dtype (+ fastmerge's topk_scope)")
    p.add_argument("out", help="output folder (created; replaced only with --overwrite)")
    p.add_argument("--device", default="auto", help="auto (a GPU if present), cpu, cuda, cuda:N")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "cpu", "triton", "cuda"],
                   help="kernel backend (default: env FASTMERGE_BACKEND or auto)")
    p.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9, metavar="SIZE",
                   help="largest output shard, e.g. 5GB (default), 2GiB, 500MB")
    p.add_argument("--random-seed", type=int, default=0, metavar="N",
                   help="seed of DARE/DELLA's random masks (each tensor's Philox seed hashes it "
                        "with the tensor name; default 0)")
    p.add_argument("--topk-scope", choices=["tensor", "model"], default=None,
                   help="TIES trimming (and PCB's statistics) per tensor (mergekit, default) or over "
                        "the whole model (FusionBench, the PCB authors); overrides the config's topk_scope")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (folder, file or symlink) in one atomic swap once "
                        "the new merge is complete; the previous OUT is then deleted")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--read-ahead", type=int, default=2, metavar="N",
                   help="tensors read ahead of the one being merged (default 2)")
    p.add_argument("--drop-extra-tensors", action="store_true",
                   help="leave out of OUT the tensors some model has and the base model lacks, as "
                        "mergekit does (default: an error naming them)")
    p.add_argument("--trust-index", action="store_true",
                   help="read each tensor from the shard its model's index names and ignore copies "
                        "in other shards and tensors the index does not list, as mergekit does "
                        "(default: an index that disagrees with its shards is an error)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    _mergekit_options(p)
    p.epilog = ("mergekit-yaml's other options are accepted: --lazy-unpickle, --low-cpu-memory, "
                "--read-to-gpu, --multi-gpu, --async-write, --clone-tensors "
                "(no effect: fastmerge always streams one tensor at a time and never runs model code).")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _cmd_merge(args, rest) -> int:
    """Every failure is one line on stderr and a non-zero exit code: 1 for an error, 128 +
    the signal for an interruption. ``--debug`` prints the traceback first."""
    from .streaming import Interrupted, MergeError, merge_checkpoints

    problem = _mergekit_args(args)
    if problem:
        print(f"fastmerge merge: error: {problem}", file=sys.stderr)
        return 2
    import torch

    threads, cache = torch.get_num_threads(), os.environ.get("HF_HUB_CACHE")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    if args.transformers_cache:
        os.environ["HF_HUB_CACHE"] = args.transformers_cache
    try:
        return _merge_and_report(args, merge_checkpoints, Interrupted, MergeError)
    finally:  # a call from Python leaves the process as it found it
        torch.set_num_threads(threads)
        if args.transformers_cache:
            if cache is None:
                os.environ.pop("HF_HUB_CACHE", None)
            else:
                os.environ["HF_HUB_CACHE"] = cache


def _merge_and_report(args, merge_checkpoints, Interrupted, MergeError) -> int:
    import traceback

    try:
        summary = merge_checkpoints(
            args.config, args.out, device=args.device, backend=args.backend,
            max_shard_bytes=args.max_shard_size, seed=args.random_seed, topk_scope=args.topk_scope,
            overwrite=args.overwrite, copy_tokenizer=args.copy_tokenizer,
            progress=not args.no_progress, read_ahead=max(0, args.read_ahead),
            drop_extra_tensors=args.drop_extra_tensors, trust_index=args.trust_index,
            write_model_card=args.write_model_card, allow_crimes=args.allow_crimes,
            shard_params=args.out_shard_size, trust_remote_code=args.trust_remote_code)
    except BaseException as exc:  # noqa: BLE001 - every path ends in one line
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, SystemExit):
            raise
        if isinstance(exc, KeyboardInterrupt):
            print("fastmerge merge: interrupted; the output folder was not written", file=sys.stderr)
            return 130
        if isinstance(exc, Interrupted):
            print(f"fastmerge merge: {exc}", file=sys.stderr)
            return exc.code
        if isinstance(exc, MergeError):
            if int(os.environ.get("RANK", "0")) == 0 or "another process" not in str(exc):
                print(f"fastmerge merge: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        if isinstance(exc, OSError):
            what = f": {exc.filename}" if exc.filename is not None else ""
            print(f"fastmerge merge: error: {_one_line(exc.strerror or exc)}{what}", file=sys.stderr)
            return 1
        hint = "" if args.debug else " (rerun with --debug for the traceback)"
        print(f"fastmerge merge: internal error: {type(exc).__name__}: {_one_line(exc)}{hint}",
              file=sys.stderr)
        return 1
    if summary["rank"] == 0:
        print(f"fastmerge merge: {summary['tensors']} tensors -> {summary['out']} "
              f"({summary['bytes_written'] / 1e9:.2f} GB) in {summary['seconds']:.1f} s"
              + (f" on {summary['world']} processes" if summary["world"] > 1 else ""), file=sys.stderr)
    return 0


def _extract_parser(sub) -> None:
    p = sub.add_parser(
        "extract-lora", help="a PEFT LoRA adapter from a full fine-tune (extract-lora --help)",
        description="Extract a PEFT LoRA adapter from a full fine-tune: per 2-D linear module, "
                    "the top-R singular directions of W_finetuned - W_base (randomized SVD; "
                    "--exact: full SVD), written as adapter_config.json + "
                    "adapter_model.safetensors, which peft.PeftModel.from_pretrained loads. "
                    "Norms, biases of non-linear modules, embeddings and lm_head (unless "
                    "--embed-lora) go to modules_to_save whole, as mergekit-extract-lora does. "
                    "Streaming, module by module; `torchrun --nproc-per-node=N -m fastmerge "
                    "extract-lora ...` splits the modules across processes. OUT appears only "
                    "when complete.")
    p.add_argument("base", help="base model: a local folder of safetensors or a hub id (org/name[@rev])")
    p.add_argument("finetuned", help="fine-tuned model: a local folder or a hub id")
    p.add_argument("out", help="adapter folder to create (replaced only with --overwrite)")
    p.add_argument("--rank", type=int, default=None, metavar="R",
                   help="LoRA rank (with --rank-fraction: the largest rank)")
    p.add_argument("--rank-fraction", type=float, default=None, metavar="F",
                   help="per module, the smallest rank whose singular directions hold F (0 < F "
                        "<= 1) of ||delta||_F^2, at most --rank (without --rank: a full SVD)")
    p.add_argument("--sv-epsilon", type=float, default=0.0, metavar="E",
                   help="drop singular values <= E (mergekit's --sv-epsilon; default 0)")
    p.add_argument("--exact", action="store_true", help="full SVD (torch.linalg.svd) per module")
    p.add_argument("--no-distribute-scale", action="store_true",
                   help="B = U, A = S Vh (default, as mergekit: B = U sqrt(S), A = sqrt(S) Vh)")
    p.add_argument("--embed-lora", action="store_true",
                   help="LoRA for the embeddings and lm_head too (default: modules_to_save)")
    p.add_argument("--save-module", action="append", default=[], metavar="NAME",
                   help="save this module (full path or last name component) whole; repeatable")
    p.add_argument("-i", "--include-regex", action="append", default=[], metavar="RE",
                   help="extract only modules matching one of these regexes; repeatable")
    p.add_argument("-e", "--exclude-regex", action="append", default=[], metavar="RE",
                   help="skip modules matching this regex; repeatable")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of the LoRA factors (default: the fine-tune's)")
    p.add_argument("--device", default="auto", help="auto (a GPU if present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the randomized SVD's sketch (hashed with each tensor's name)")
    p.add_argument("--oversample", type=int, default=None, metavar="P",
                   help="randomized SVD: extra sketch columns (default max(10, R/10))")
    p.add_argument("--n-iter", type=int, default=None, metavar="Q",
                   help="randomized SVD: power iterations (default 2)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT in one atomic swap once the adapter is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trust-index", action="store_true",
                   help="read each tensor from the shard its index names, as mergekit does")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _one_line_errors(prog: str, debug: bool, call) -> tuple:
    """``(0, call())``, or ``(exit code, None)`` after one line on stderr (``--debug``: the
    traceback first)."""
    import traceback

    from .streaming import Interrupted, MergeError

    try:
        return 0, call()
    except BaseException as exc:  # noqa: BLE001 - every path ends in one line
        if debug:
            traceback.print_exc()
        if isinstance(exc, SystemExit):
            raise
        if isinstance(exc, KeyboardInterrupt):
            print(f"{prog}: interrupted; the output folder was not written", file=sys.stderr)
            return 130, None
        if isinstance(exc, Interrupted):
            print(f"{prog}: {exc}", file=sys.stderr)
            return exc.code, None
        if isinstance(exc, MergeError):
            if int(os.environ.get("RANK", "0")) == 0 or "another process" not in str(exc):
                print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return 1, None
        if isinstance(exc, OSError):
            what = f": {exc.filename}" if exc.filename is not None else ""
            print(f"{prog}: error: {_one_line(exc.strerror or exc)}{what}", file=sys.stderr)
            return 1, None
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print(f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)}{hint}", file=sys.stderr)
        return 1, None


def _cmd_extract_lora(args, rest) -> int:
    def call():
        from .extract_lora import extract_lora_checkpoints

        return extract_lora_checkpoints(
            args.base, args.finetuned, args.out, rank=args.rank, rank_fraction=args.rank_fraction,
            sv_epsilon=args.sv_epsilon, exact=args.exact,
            distribute_scale=not args.no_distribute_scale, embed_lora=args.embed_lora,
            save_modules=tuple(args.save_module), include=tuple(args.include_regex),
            exclude=tuple(args.exclude_regex), dtype=args.dtype, device=args.device,
            seed=args.seed, oversample=args.oversample, n_iter=args.n_iter,
            overwrite=args.overwrite, progress=not args.no_progress, trust_index=args.trust_index)

    code, summary = _one_line_errors("fastmerge extract-lora", args.debug, call)
    if code == 0 and summary["rank"] == 0:
        ranks = sorted(set(summary["ranks"].values()))
        shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        print(f"fastmerge extract-lora: {summary['modules']} LoRA modules ({shown}), "
              f"{summary['saved']} saved whole -> {summary['out']} "
              f"({summary['bytes_written'] / 1e9:.2f} GB) in {summary['seconds']:.1f} s"
              + (f" on {summary['world']} processes" if summary["world"] > 1 else ""), file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastmerge",
        description="fastmerge: fused model-merging kernels (TIES, DARE, DELLA, breadcrumbs, "
                    "task arithmetic).",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # bench parses its own options (shared with bench/run.py), so its parser here only names it.
    sub.add_parser("bench", add_help=False,
                   help="benchmark against PEFT and mergekit on this machine (bench --help)")
    sub.add_parser("bench-lowrank", add_help=False,
                   help="benchmark fastmerge.lowrank (randomized SVD, polar, TSV/Iso-C/Iso-CTS, "
                        "LoRA re-rank) against the full-SVD paths (bench-lowrank --help)")
    sub.add_parser("bench-gpu", add_help=False,
                   help="benchmark the triton and cuda backends against PEFT and mergekit on this GPU "
                        "(bench-gpu --help)")
    sub.add_parser("bench-quant", add_help=False,
                   help="benchmark fastmerge.quant (INT4/FP8 quantizers, fused merge->quantize, "
                        "delta compression) (bench-quant --help)")
    sub.add_parser("backends", help="list the backends available here, and why not")
    _merge_parser(sub)
    _extract_parser(sub)
    sub.add_parser("mergekit", add_help=False,
                   help="mergekit-yaml CONFIG OUT [options] with merges on fastmerge (mergekit --help)")
    return parser


COMMANDS = {"bench": _cmd_bench, "bench-lowrank": _cmd_bench_lowrank, "bench-gpu": _cmd_bench_gpu,
            "bench-quant": _cmd_bench_quant, "backends": _cmd_backends, "mergekit": _cmd_mergekit,
            "merge": _cmd_merge, "extract-lora": _cmd_extract_lora}
# subcommands that take the rest of the command line as is
PASSTHROUGH = ("bench", "bench-lowrank", "bench-gpu", "bench-quant", "mergekit")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.version:
        from . import __version__

        print(f"fastmerge {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    if rest and args.command not in PASSTHROUGH:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return COMMANDS[args.command](args, rest)


if __name__ == "__main__":
    sys.exit(main())
