"""Triton kernels, installed as ``fastmerge.triton_kernels`` (the top-level name is taken on PyPI).

One file per op, as the backend driver (``fastmerge/gpu.py``) calls them:

* :mod:`.fused_merge` - the merge pass of every method (base + K inputs read once, one write);
* :mod:`.magnitude_select` - exact top-k thresholds (sample bracket + candidate compaction,
  histogram radix select as the fallback, tie scan by lowest index);
* :mod:`.mask_norms` - per-model norms before/after masking (mergekit's norm-matching rescale);
* :mod:`.della` - DELLA's rank-based keep decisions;
* :mod:`.quant` - INT4 (GPTQ v1, torchao) and FP8 quantizers, and the merge fused with INT4;
* :mod:`.gram`, :mod:`.lincomb`, :mod:`.nearswap`, :mod:`.ram`, :mod:`.passthrough`, :mod:`.sce`,
  :mod:`.arcee_fusion` - the
  passes of mergekit's other methods (``fastmerge/backends/triton_methods.py`` drives them;
  the same kernels as ``csrc/gram.cpp`` .. ``passthrough.cpp``);
* :mod:`.consensus`, :mod:`.emr`, :mod:`.fisher`, :mod:`.pcb` - the research methods of issue 24
  (consensus_ta/ties and TALL masks, EMR, Fisher, PCB; the same kernels as ``csrc/consensus.cpp``
  .. ``pcb.cpp``, driven by ``triton_methods.py`` too);
* :mod:`._common` - Philox4x32-10 in fastmerge's counter layout, strided loads, keys.

Importing this package imports ``triton``; ``import fastmerge`` never does (the backend loads
it on first use). Under ``TRITON_INTERPRET=1`` the kernels run in Triton's interpreter on CPU
tensors (how CI tests them without a GPU); the variable must be set before this import.
"""
from .arcee_fusion import arcee_importance, arcee_merge
from .consensus import consensus
from .della import della_keep
from .emr import emr
from .fisher import fisher_merge, fisher_sumsq
from .fused_merge import fused_merge
from .gram import gram
from .lincomb import lincomb
from .magnitude_select import select, select_deferred
from .mask_norms import mask_norms
from .nearswap import nearswap
from .passthrough import scaled_copy
from .pcb import pcb_merge, pcb_scores
from .quant import fp8_codes, fused_merge_int4, quantize_fp8, quantize_int4
from .ram import ram_counts, ram_merge
from .sce import sce_energy, sce_merge, sce_variance

__all__ = ["fused_merge", "select", "select_deferred", "mask_norms", "della_keep", "quantize_int4", "quantize_fp8",
           "fp8_codes", "fused_merge_int4", "gram", "lincomb", "nearswap", "ram_counts", "ram_merge",
           "scaled_copy", "sce_variance", "sce_energy", "sce_merge", "arcee_importance",
           "arcee_merge", "consensus", "emr", "fisher_sumsq", "fisher_merge", "pcb_scores", "pcb_merge"]
