"""RegMean as ``fastmerge merge``'s ``merge_method: regmean`` (Jin et al. 2023, "Dataless
Knowledge Fusion by Merging Weights of Language Models", https://arxiv.org/abs/2212.09849;
FusionBench ``regmean``). Each model names a folder of safetensors files holding the input Gram
matrix of each linear layer under the layer's module name (``parameters: {grams: ./m0-grams}``,
tensor ``model.layers.0.mlp.up_proj`` for weight ``model.layers.0.mlp.up_proj.weight``). As
FusionBench's ``merging_with_regmean_weights``: a ``<module>.weight`` with a Gram is merged by
:func:`fastmerge.regmean`, every other tensor is averaged."""
from __future__ import annotations

from fastmerge.methods._common import REQUIRED

CONTRACT = dict(base="none", min_models=1, max_models=None)
# alpha: FusionBench's reduce_non_diagonal_ratio (its function's default 1.0; regmean.yaml 0.1)
PARAMS = {"grams": REQUIRED, "alpha": 1.0}
STATS = "grams"


def reference(base, models, **params):
    """Not a per-tensor merge: the Grams are per-model statistics of each linear layer."""
    raise TypeError("regmean merges linear layers with each model's input Grams: call "
                    "fastmerge.regmean(weights, grams, ...) or run `fastmerge merge` with merge_method: "
                    "regmean and a grams: folder per model")
