"""mergekit's other methods (fastmerge/methods/: slerp, nuslerp, multislerp, karcher,
model_stock, sce, nearswap, arcee_fusion, ram, ramplus_tl, passthrough) in ``fastmerge bench``.

Each is timed in :mod:`bench.suite`'s run, as ``fastmerge.merge(method, ...)`` on every fastmerge
backend and as mergekit 0.1.5's ``merge_tensors`` (same inputs, same run), with the suite's
columns: median ms, GB/s of the bytes the merge must move (each input read once, the output
written once: :func:`bytes_in`), % of the copy bandwidth measured in that run, and the speedup
over mergekit. A method takes K models as it allows, up to 3 (``CASES``), whatever ``--k`` says;
its rows carry that K. Issue 17's acceptance reads these rows on 4096x4096 fp32: >= 5x mergekit
(target 20x) and >= 35% of the copy bandwidth::

    fastmerge bench --shapes 4096x4096 --dtypes float32 --methods slerp,nuslerp,...,passthrough

A method the registry lists no fused kernel for on a backend (sce and arcee_fusion, until their
C++ kernels land) runs its torch reference there: its row is still measured, and says so in
``path`` (``fused`` or ``reference``).

``passthrough`` copies its one tensor (scaled when ``scale`` is given); mergekit's returns the
input itself, so a speedup over it is meaningless: read its % of copy bandwidth instead.
"""
from __future__ import annotations

import functools

import fastmerge

# method -> (K non-base models, takes a base, parameters under fastmerge's names). Values suit
# the suite's data (base N(0, 0.02), models base + N(0, 0.002)): the thresholds (t, epsilon)
# sit inside the deltas' range so that every branch of the merge is taken.
CASES = {
    "slerp": (1, True, dict(t=0.3)),
    "nuslerp": (2, True, dict(weights=[0.4, 0.6])),
    "multislerp": (3, True, dict(weights=[0.3, 0.5, 0.2])),
    "karcher": (3, True, dict()),
    "model_stock": (3, True, dict()),
    "sce": (3, True, dict(select_topk=0.5)),
    "nearswap": (1, True, dict(t=0.002)),
    "arcee_fusion": (1, True, dict()),
    "ram": (3, True, dict(epsilon=0.002)),
    "ramplus_tl": (3, True, dict(epsilon=0.002)),
    "passthrough": (1, False, dict()),
}
METHODS = tuple(m for m in CASES if m in fastmerge.METHODS)
MAX_K = max(k for k, _, _ in CASES.values())


def k_of(method: str) -> int:
    return CASES[method][0]


def bytes_in(method: str) -> int:
    """Inputs the merge reads (the base counts when the method takes one)."""
    k, has_base, _ = CASES[method]
    return k + int(has_base)


def path(method: str, backend: str) -> str:
    """``fused`` when the registry lists a fused kernel of ``method`` for ``backend``, else
    ``reference`` (the method's torch reference runs there)."""
    from fastmerge import _registry

    return "fused" if backend in _registry.get(method).kernels else "reference"


def fastmerge_case(method: str, base, models, backend: str):
    k, has_base, params = CASES[method]
    return functools.partial(fastmerge.merge, method, base if has_base else None, list(models[:k]),
                             backend=backend, **params)


def mergekit_case(merge_tensors, method: str, base, models):
    """mergekit's ``merge_tensors`` on the same inputs: fastmerge's ``weights`` is its per-model
    ``weight``; the base is tensor 0 (``base_index=0``) when the method takes one."""
    k, has_base, params = CASES[method]
    mk = {("weight" if n == "weights" else n): v for n, v in params.items()}
    if not has_base:
        return functools.partial(merge_tensors, list(models[:k]), method, parameters=mk)
    return functools.partial(merge_tensors, [base, *models[:k]], method, parameters=mk, base_index=0)
