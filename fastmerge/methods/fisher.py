"""Fisher merging as ``fastmerge merge``'s ``merge_method: fisher`` (Matena & Raffel 2022,
"Merging Models with Fisher-Weighted Averaging", https://arxiv.org/abs/2111.09832; FusionBench
``fisher_merging``). Each model names a folder of safetensors files holding its diagonal Fisher
under the model's tensor names (``parameters: {fisher: ./m0-fisher}``); the merge itself is
:func:`fastmerge.fisher`, which also takes the Fisher tensors directly from Python. The Fisher
norms of ``normalize_fisher_weight`` span the whole model, as FusionBench computes them."""
from __future__ import annotations

from fastmerge.methods._common import REQUIRED

CONTRACT = dict(base="none", min_models=1, max_models=None)
# FusionBench's fisher_merging.yaml: normalize_fisher_weight true, minimal_fisher_weight 1e-6;
# weights: its fisher_scaling_coefficients (default 1 / K each)
PARAMS = {"weights": None, "fisher": REQUIRED, "normalize_fisher_weight": True, "minimal_fisher_weight": 1e-6}
STATS = "fisher"  # the per-model statistics file parameter (fastmerge merge reads it, per tensor)


def reference(base, models, **params):
    """Not a per-tensor merge: the Fisher tensors are per-model statistics."""
    raise TypeError("fisher merges with each model's diagonal Fisher: call fastmerge.fisher(models, "
                    "fishers, ...) or run `fastmerge merge` with merge_method: fisher and a fisher: "
                    "folder per model")
