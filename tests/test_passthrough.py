"""passthrough's reference against mergekit 0.1.5 (see methods_testing for the tolerances).

mergekit takes one input and ignores the base flag; here that input is ``models[0]``."""
from __future__ import annotations

import pytest
import torch
from conftest import mergekit_merge
from methods_testing import (SHAPE_IDS, SHAPES, against_mergekit, contract_matches_mergekit,
                             fused_equals_reference, fused_tests, merged_cpu, standard_tests)

from fastmerge.methods import passthrough

globals().update(standard_tests("passthrough", 1, base=False, scale=0.5))


def test_contract_one_input():
    spec = contract_matches_mergekit("passthrough")
    assert spec.contract.base.value == "ignored" and spec.contract.max_inputs == 1
    assert passthrough.CONTRACT == dict(base="none", min_models=1, max_models=1)


@pytest.mark.parametrize("shape", SHAPES + [(0, 5)], ids=SHAPE_IDS + ["empty"])
@pytest.mark.parametrize("scale", [None, 0.0, 0.5, 2.5, -1.0, [3.0], [None]])
def test_scales(shape, scale):
    x = torch.randn(shape)
    got = against_mergekit("passthrough", None, [x], scale=scale)
    if scale is None:
        assert torch.equal(got, x)


def test_base_flag_of_mergekit_is_models_0():
    x = torch.randn(4, 5)
    expected = mergekit_merge("passthrough", x, [], scale=2.0)  # mergekit: base_index=0
    torch.testing.assert_close(passthrough.reference(None, [x], scale=2.0), expected)


def test_scale_checked():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="scale"):
        passthrough.reference(None, [x], scale=[1.0, 2.0])
    with pytest.raises(TypeError, match="scale"):
        passthrough.reference(None, [x], scale="2")


# ---- the fused CPU kernel (csrc/passthrough.cpp): a scaled copy, the reference's bytes -------
globals().update(fused_tests("passthrough", 1, base=False, scale=0.5))


@pytest.mark.parametrize("shape", SHAPES + [(0, 5)], ids=SHAPE_IDS + ["empty"])
@pytest.mark.parametrize("scale", [None, 0.0, 0.5, 2.5, -1.0, [3.0], [None], 1e30])  # overflow: test_numerics_safety
def test_fused(shape, scale):
    fused_equals_reference("passthrough", None, [torch.randn(shape)], scale=scale)


def test_fused_scale_none_is_a_copy():
    x = torch.randn(5, 7)
    got = merged_cpu("passthrough", None, [x])
    assert torch.equal(got, x) and got.data_ptr() != x.data_ptr()
    assert torch.equal(merged_cpu("passthrough", None, [x], out_dtype=torch.bfloat16), x.bfloat16())


def test_fused_scale_checked():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="scale"):
        merged_cpu("passthrough", None, [x], scale=[1.0, 2.0])
