"""pytest plugin for ``bench/gpu_check.sh``'s Triton run (``PYTEST_PLUGINS=bench.gpu_check_pytest``;
an environment variable, so pytest-xdist's workers load it too).

``tests/test_gpu.py::test_seeded_masks_identical_on_every_backend`` compares every available GPU
backend with ``cpu``, and the ``cuda`` backend builds its extension on first use: minutes of
nvcc inside a 7-minute script whose subject is Triton. ``bench/gpu_check_cuda.sh`` builds and
tests that backend; here it is marked unavailable, the way a failed build marks it, so those
comparisons run on ``cpu`` and ``triton`` and every ``cuda`` case says why it is skipped.
"""
from __future__ import annotations

REASON = "left out of bench/gpu_check.sh's Triton run (bench/gpu_check_cuda.sh builds and tests it)"


def pytest_configure(config):
    from fastmerge.backends import cuda

    cuda._tried = True  # extension() returns None at once: nothing is built
    cuda._error = REASON  # status(): {"available": False, "reason": ...}
