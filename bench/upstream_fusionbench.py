"""TRANSCRIPTION of FusionBench 0.2.33's RegMean and OPCM merge math: the reference that
``tests/test_regmean.py``, ``tests/test_opcm.py`` and ``bench/regmean_opcm.py`` compare
``fastmerge.regmean`` and ``fastmerge.opcm`` against.

Source: FusionBench (https://github.com/tanganke/fusion_bench), version 0.2.33,
Copyright (c) 2024 Anke Tang, MIT License:

* ``reduce_non_diagonal_elements``, ``merging_with_regmean_weights``:
  ``fusion_bench/method/regmean/regmean.py`` (itself modified from MergeLM), copied unchanged
  except for comments and logging.
* ``_svd``, ``svd``, ``get_task_vector_norm``: ``fusion_bench/method/opcm/utils.py``;
  ``get_task_vector_norm`` (with ``state_dict_to_vector`` / ``state_dict_sub`` from
  ``fusion_bench/utils``) takes state dicts here instead of ``nn.Module``s.
* :class:`OPCMStateDicts`: ``OPCMForCLIP`` of ``fusion_bench/method/opcm/opcm.py``;
  ``merge_linear_weights`` and ``merge_other_parameters`` unchanged, ``run`` reduced to its
  merge arithmetic over state dicts: no shuffling, logging, saving or evaluation; the module
  loop (``nn.Linear`` weight -> ``merge_linear_weights``, every other parameter ->
  ``merge_other_parameters``) becomes a loop over keys with an ``is_linear(name, tensor)``
  predicate, since a state dict has no modules.

FusionBench itself cannot be imported here: ``import fusion_bench`` pulls in omegaconf (and
lightning, hydra, ...) at package import, which the venv does not have. This file is a
reference, not fastmerge code: keep it as close to the source as possible.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Tuple

import numpy as np
import torch
from torch import Tensor, nn

# ---------------------------------------------------------------- fusion_bench/method/regmean/regmean.py


def reduce_non_diagonal_elements(
    regmean_weights: torch.Tensor, reduce_non_diagonal_ratio: float
):
    # diagonal matrix with (1 - reduce_non_diagonal_ratio) as elements
    diag_weights = torch.diag(
        torch.ones(regmean_weights.shape[0]) - reduce_non_diagonal_ratio
    ).to(regmean_weights.device)
    # matrix with reduce_non_diagonal_ratio as elements
    non_diag_weights = torch.zeros_like(diag_weights).fill_(reduce_non_diagonal_ratio)
    # diagonal elements are unchanged, while non-diagonal elements are multiplied by reduce_non_diagonal_ratio
    return regmean_weights * (diag_weights + non_diag_weights)


def merging_with_regmean_weights(
    models_to_merge_param_dict: dict,
    models_to_merge_regmean_weights_list: list,
    reduce_non_diagonal_ratio: float = 1.0,
    weight_transpose: bool = True,
):
    merged_params = {}

    for param_name, param_value_list in models_to_merge_param_dict.items():
        merged_by_regmean = False
        # only perform regmean merging on the "weight" parameter of Linear module
        if param_name.endswith(".weight"):
            module_name = param_name[: -len(".weight")]
            if module_name in models_to_merge_regmean_weights_list[0].keys():
                # two lists with length num_models_to_merge
                param_multiplied_results, module_regmean_weights_list = [], []
                for model_idx, model_to_merge_regmean_weights in enumerate(
                    models_to_merge_regmean_weights_list
                ):
                    # Tensor, shape (hidden_dim, hidden_dim)
                    module_regmean_weights = model_to_merge_regmean_weights[module_name]

                    # reduce non-diagonal elements
                    module_regmean_weights = reduce_non_diagonal_elements(
                        regmean_weights=module_regmean_weights,
                        reduce_non_diagonal_ratio=reduce_non_diagonal_ratio,
                    )
                    module_regmean_weights_list.append(module_regmean_weights)

                    model_to_merge_param = param_value_list[model_idx]
                    # since the weight shape of Linear module is (output_size, input_size), we need to transpose it
                    param_multiplied_results.append(
                        torch.matmul(
                            module_regmean_weights,
                            (
                                model_to_merge_param.transpose(0, 1)
                                if weight_transpose
                                else model_to_merge_param
                            ),
                        )
                    )

                # sum up module_regmean_weights and param_multiplied_results over all individual models
                sum_module_regmean_weights = sum(module_regmean_weights_list)
                sum_param_multiplied_results = sum(param_multiplied_results)

                # get the inverse matrix
                inv_sum_module_regmean_weights = torch.inverse(
                    sum_module_regmean_weights
                )
                # merge parameters with regmean
                merged_param = torch.matmul(
                    inv_sum_module_regmean_weights, sum_param_multiplied_results
                )
                # transpose to the original shape of "weight" in Linear module
                merged_params[param_name] = (
                    merged_param.transpose(0, 1) if weight_transpose else merged_param
                )
                merged_by_regmean = True
        # use average merging for parameters whose names are not end with ".weight" or not in Linear module
        if not merged_by_regmean:
            merged_params[param_name] = torch.stack(param_value_list, dim=0).mean(dim=0)

    return merged_params


# ---------------------------------------------------------------- fusion_bench/method/opcm/utils.py


def _svd(w: Tensor, full_matrices=True) -> Tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(
        w, full_matrices=full_matrices, driver="gesvd" if w.is_cuda else None
    )
    v = vh.T
    return u, s, v


def svd(
    w: Tensor, full_matrices=True, accelerator=None
) -> Tuple[Tensor, Tensor, Tensor]:
    if accelerator is None:
        return _svd(w, full_matrices=full_matrices)
    original_device = w.device
    w = w.to(accelerator)
    u, s, v = _svd(w)
    return u.to(original_device), s.to(original_device), v.to(original_device)


def state_dict_sub(a: dict, b: dict) -> dict:
    # fusion_bench.utils.state_dict_arithmetic.state_dict_sub (strict=True)
    assert set(a) == set(b)
    return OrderedDict((key, a[key] - b[key]) for key in a)


def state_dict_to_vector(state_dict: dict) -> Tensor:
    # fusion_bench.utils.parameters.state_dict_to_vector (remove_keys=None): sorted keys
    sorted_shared_state_dict = OrderedDict(sorted(state_dict.items()))
    return nn.utils.parameters_to_vector(
        [value.reshape(-1) for key, value in sorted_shared_state_dict.items()]
    )


def get_task_vector_norm(model: dict, pretrained_model: dict) -> Tensor:
    # fusion_bench.method.opcm.utils.get_task_vector_norm, on state dicts
    return torch.linalg.norm(
        state_dict_to_vector(state_dict_sub(model, pretrained_model))
    )


# ---------------------------------------------------------------- fusion_bench/method/opcm/opcm.py


def default_is_linear(name, tensor) -> bool:
    """The stand-in for ``isinstance(module, nn.Linear)`` (``fastmerge.opcm.default_linear``)."""
    return tensor.dim() == 2 and (name == "weight" or name.endswith(".weight"))


class OPCMStateDicts:
    """``OPCMForCLIP``'s merge over state dicts (see the module docstring)."""

    def __init__(self, alpha: float, is_linear=default_is_linear, accelerator: str = "cpu"):
        self.alpha = alpha
        self.is_linear = is_linear
        self.accelerator = accelerator
        self.lambda_history = []

    @torch.no_grad()
    def run(self, pretrained_model: dict, models: list) -> dict:
        accelerator = self.accelerator
        # merged_model = modelpool.load_model(model_names[0]): a fresh copy of the first model
        merged_model = {k: v.clone() for k, v in models[0].items()}

        self.avg_task_vector_norm = get_task_vector_norm(merged_model, pretrained_model)
        self.all_task_vector_norm = [self.avg_task_vector_norm]

        self.previous_lambda_t = 1
        self.lambda_t = None
        self.lambda_history.append(self.previous_lambda_t)

        for model_idx, task_model in enumerate(models[1:]):
            model_idx += 1
            self.all_task_vector_norm.append(
                get_task_vector_norm(task_model, pretrained_model)
            )
            self.avg_task_vector_norm = np.mean(self.all_task_vector_norm)

            self.lambda_t = 1  # temporary value

            # for module_name, module in merged_model.named_modules(): ... (per key here)
            for param_name in list(merged_model):
                if self.is_linear(param_name, merged_model[param_name]):
                    merged_model[param_name] = self.merge_linear_weights(
                        merged_model[param_name],
                        pretrained_model[param_name],
                        task_model[param_name],
                        param_name=param_name,
                        alpha=self.alpha,
                        accelerator=accelerator,
                    )
                else:
                    merged_model[param_name] = self.merge_other_parameters(
                        merged_W=merged_model[param_name],
                        pretrained_W=pretrained_model[param_name],
                        task_W=task_model[param_name],
                        param_name=param_name,
                        accelerator=accelerator,
                    )

            task_vector_norm = get_task_vector_norm(merged_model, pretrained_model)
            self.lambda_t *= task_vector_norm / self.avg_task_vector_norm
            for param_name, param in list(merged_model.items()):
                merged_model[param_name] = pretrained_model[param_name] + (
                    param - pretrained_model[param_name]
                ) * (self.avg_task_vector_norm / task_vector_norm)
            self.previous_lambda_t = self.lambda_t
            self.lambda_history.append(float(self.previous_lambda_t))
            self.lambda_t = None

        return merged_model

    def merge_linear_weights(
        self,
        merged_W: Tensor,
        pretrained_W: Tensor,
        task_W: Tensor,
        param_name: str,
        alpha: float,
        accelerator: str = "cpu",
    ):
        original_device = merged_W.device
        merged_W = merged_W.to(accelerator)
        pretrained_W = pretrained_W.to(accelerator)
        task_W = task_W.to(accelerator)

        previous_merged_tv = merged_W - pretrained_W
        task_tv = task_W - pretrained_W

        u, s, v = svd(previous_merged_tv)
        rank = s.size(0)  # noqa: F841  (unused in FusionBench too)
        split_rank = (s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item()

        projected_task_tv = u.T @ task_tv @ v
        projected_task_tv.diagonal().fill_(0)

        projected_task_tv[:split_rank, :split_rank] = 0

        cleaned_task_tv = u @ projected_task_tv @ v.T

        previous_lambda_t = self.previous_lambda_t
        lambda_t = self.lambda_t
        new_merged_W = (
            pretrained_W
            + (previous_lambda_t * previous_merged_tv + cleaned_task_tv) / lambda_t
        )
        return new_merged_W.to(original_device)

    def merge_other_parameters(
        self,
        merged_W: Tensor,
        pretrained_W: Tensor,
        task_W: Tensor,
        param_name: str,
        accelerator: str = "cpu",
    ):
        original_device = merged_W.device
        merged_W = merged_W.to(accelerator)
        pretrained_W = pretrained_W.to(accelerator)
        task_W = task_W.to(accelerator)

        previous_merged_tv = merged_W - pretrained_W
        task_tv = task_W - pretrained_W

        previous_lambda_t = self.previous_lambda_t
        lambda_t = self.lambda_t

        new_merged_W = (
            pretrained_W + (previous_lambda_t * previous_merged_tv + task_tv) / lambda_t
        )
        return new_merged_W.to(original_device)


def opcm_state_dicts(pretrained: dict, models: list, alpha: float, is_linear=default_is_linear,
                     accelerator: str = "cpu") -> Tuple[dict, list]:
    """FusionBench's OPCM over ``models`` in order: ``(merged state dict, [λ_0, λ_1, ...])``."""
    algo = OPCMStateDicts(alpha, is_linear, accelerator)
    merged = algo.run(pretrained, models)
    return merged, algo.lambda_history
