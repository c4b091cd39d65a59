"""The ``cpu`` backend's kernels for the :mod:`fastmerge.methods` methods' ``fused`` plans
(C++ in ``csrc/``, one file per kernel). Each function takes the validated inputs read in place
and returns a small host result or the merged tensor in ``out_dtype``."""
from __future__ import annotations
