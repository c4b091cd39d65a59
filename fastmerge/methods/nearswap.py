"""NearSwap: take the model's value where it is near the base's, keep the base's elsewhere
(mergekit ``nearswap``; https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)."""
from __future__ import annotations

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import REQUIRED, checked, inputs

CONTRACT = dict(base="required", min_models=1, max_models=1)
PARAMS = {"t": REQUIRED}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)


def reference(base, models, *, t) -> torch.Tensor:
    """Elementwise, with ``a = base`` and ``b = models[0]``::

        w   = clamp(t / max(|a - b|, 1e-6), 0, 1)
        out = w b + (1 - w) a

    Elements closer than ``t`` become the model's; farther ones move toward it by ``t / |a - b|``.
    Any finite ``t`` is accepted: ``t <= 0`` gives the base.

    Differences from mergekit: none.
    """
    a, (b,) = inputs("nearswap", CONTRACT, base, models)
    t = V.number(t, "t")
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


def fused(ops, base, models, *, out_dtype, t) -> torch.Tensor:
    """:func:`reference` in one pass over both inputs (``ops.nearswap``), in ``out_dtype``."""
    a, (b,) = checked("nearswap", CONTRACT, base, models)
    return ops.nearswap(a, b, t=V.number(t, "t"), out_dtype=out_dtype)
