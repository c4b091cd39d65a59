"""mergekit 0.1.5's merge methods outside the task-arithmetic family, and the research methods
that merge tensor by tensor (consensus_ta, consensus_ties, pcb, emr's unified model), one module each.

Every module defines the method (its specification; the fused kernels must match it):

* ``reference(base, models, *, <mergekit's parameters>) -> torch.Tensor``: readable torch,
  fp32 compute (the inputs are upcast once), an fp32 result of the inputs' shape (the caller
  casts to the output dtype). ``base`` is the base model's tensor (None where the method takes
  none or mergekit makes it optional), ``models`` the non-base tensors, read in place.
  The docstring gives the formula, the paper and every difference from mergekit's code.
* ``CONTRACT = dict(base="required" | "optional" | "none", min_models=..., max_models=...)``:
  how many non-base tensors the method takes (``max_models`` None: no limit). Every method
  takes at least one tensor in all (base or model).
* ``PARAMS = {name: default}``: mergekit's parameter names and defaults
  (``inspect.Parameter.empty`` where mergekit requires the parameter). mergekit's per-model
  ``weight`` is ``weights`` (one value per non-base model, or one scalar for all).

Differences from mergekit common to every method (each module lists its own): the inputs share
one dtype among fp32/fp16/bf16 (mergekit also takes fp64 and promotes mixed dtypes) and are
computed in fp32 (mergekit computes in the inputs' dtype; the tests compare with mergekit on the
fp32 upcast); inf/nan inputs raise ``NonFiniteError`` (mergekit propagates them); parameters
are taken as given, not coerced (mergekit's pydantic turns ``"0.5"`` into 0.5 and 1 into True),
and must be finite; per-model values are a scalar or a sequence in model order (mergekit also
takes a mapping keyed by input id).

The registry (``fastmerge/_registry.py``) is generated from ``CONTRACT`` and ``PARAMS``;
``_common`` holds the argument checks the references share.

A method with fused kernels also defines

* ``KERNELS = ("cpu", ...)``: the backends that run it fused (``auto`` picks them);
* ``fused(ops, base, models, *, out_dtype, <parameters>) -> torch.Tensor``: the same result
  from the kernels ``ops`` of one backend (``fastmerge/backends/<backend>_methods.py``): e.g. one
  Gram pass (the inputs' pairwise dot products), the coefficients from it on the host, then one
  pass writing a linear combination of the inputs, in ``out_dtype``;
* optionally ``RESULT_CHECKED = True``: ``fused`` returns its last kernel's output unchanged, so
  where the ops module checks its results too (``RESULT_CHECKED`` there), dispatch skips its
  own pass over the output for inf/nan.
"""

from . import (arcee_fusion, consensus_ta, consensus_ties, emr, fisher, karcher, model_stock, multislerp, nearswap,
               nuslerp, passthrough, pcb, ram, ramplus_tl, regmean, sce, slerp)

# in mergekit's registry order; fastmerge/_registry.py makes one entry of each
MERGEKIT = (slerp, nuslerp, multislerp, karcher, model_stock, sce, nearswap, arcee_fusion, ram,
            ramplus_tl, passthrough)
# the research methods of issue 24 (FusionBench's and the papers' names and defaults): per-tensor
# merges, and fisher / regmean, whose modules declare fastmerge merge's YAML entries (their
# ``STATS`` parameter names each model's statistics folder; fastmerge.research and
# fastmerge.regmean compute them)
RESEARCH = (consensus_ta, consensus_ties, pcb, emr, fisher, regmean)
MODULES = MERGEKIT + RESEARCH
NAMES = tuple(m.__name__.rpartition(".")[2] for m in MODULES)
