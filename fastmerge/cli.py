"""The ``fastmerge`` command line (also ``python -m fastmerge``).

Subcommands:
    fastmerge bench [options]   benchmark against PEFT and mergekit (``fastmerge bench --help``)
    fastmerge bench-lowrank     fastmerge.lowrank vs the full-SVD paths (``--help``)
    fastmerge bench-quant       fastmerge.quant: quantizers, fused merge->quantize, deltas (``--help``)
    fastmerge backends          which backends this machine can run, and why not
    fastmerge mergekit CONFIG OUT [mergekit-yaml options]
                                mergekit-yaml with its task-arithmetic family and linear merges
                                running on fastmerge (same YAML, same output layout)

Heavy imports happen inside the subcommand that needs them, so ``fastmerge --help`` is instant.
"""
from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    sub.add_parser("bench-quant", add_help=False,
                   help="benchmark fastmerge.quant (INT4/FP8 quantizers, fused merge->quantize, "
                        "delta compression) (bench-quant --help)")
    sub.add_parser("backends", help="list the backends available here, and why not")
    sub.add_parser("mergekit", add_help=False,
                   help="mergekit-yaml CONFIG OUT [options] with merges on fastmerge (mergekit --help)")
    return parser


COMMANDS = {"bench": _cmd_bench, "bench-lowrank": _cmd_bench_lowrank, "bench-quant": _cmd_bench_quant,
            "backends": _cmd_backends,
            "mergekit": _cmd_mergekit}
PASSTHROUGH = ("bench", "bench-lowrank", "bench-quant", "mergekit")  # subcommands that take the rest of the command line as is


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
