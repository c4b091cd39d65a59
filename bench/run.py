"""Run the fastmerge benchmark from a checkout: ``python bench/run.py --quick`` (same options as
``fastmerge bench``; ``--help`` lists them)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    # An installed fastmerge (with its compiled kernels) wins over the bare source tree.
    import fastmerge  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)
if ROOT not in sys.path:
    # For ``bench.suite`` (this checkout's engine); fastmerge is already imported above, so the
    # source tree cannot shadow an installed build.
    sys.path.insert(0, ROOT)

from bench.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python bench/run.py"))
