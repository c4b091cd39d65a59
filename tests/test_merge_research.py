"""``fastmerge merge`` runs the research methods that merge tensor by tensor from YAML
(``pcb``, ``consensus_ties``, ``consensus_ta``) on a tiny Llama: every output tensor equals
``fastmerge.merge`` of that tensor with the config's parameters (mergekit's YAML names:
``lambda`` for ``lam``, per-model ``weight``, ``density`` and ``tall_lambda``)."""
from __future__ import annotations

import pytest
import torch
from conftest import load_folder, tiny_llamas

import fastmerge
from fastmerge.cli import main as cli

CONFIGS = {
    "pcb": ("parameters: {ratio: 0.2, lambda: 0.9}", ["{weight: 1.0}", "{weight: 0.8}", "{weight: 1.2}"],
            lambda ws: dict(ratio=0.2, lam=0.9, weights=ws)),
    "consensus_ties": ("parameters: {k: 2, lambda: 1.1, tall_lambda: 0.5}",
                       ["{density: 0.3}", "{density: 0.5}", "{density: 0.2}"],
                       lambda ds: dict(k=2, lam=1.1, tall_lambda=0.5, density=ds)),
    "consensus_ta": ("parameters: {k: 1, lambda: 0.7}", ["{tall_lambda: 0.4}", "{tall_lambda: 0.6}", "{tall_lambda: 0.8}"],
                     lambda ls: dict(k=1, lam=0.7, tall_lambda=ls)),
}
PER_MODEL = {"pcb": [1.0, 0.8, 1.2], "consensus_ties": [0.3, 0.5, 0.2], "consensus_ta": [0.4, 0.6, 0.8]}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return tiny_llamas(tmp_path_factory.mktemp("research_llamas"))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_yaml_merge_equals_the_api(llamas, tmp_path, method):
    shared, per_model, kwargs = CONFIGS[method]
    lines = [f"merge_method: {method}", f"base_model: {llamas / 'base'}", "dtype: float32", shared, "models:"]
    for k, p in enumerate(per_model):
        lines += [f"  - model: {llamas / f'm{k}'}", f"    parameters: {p}"]
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("\n".join(lines) + "\n")
    assert cli(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    out, base = load_folder(tmp_path / "out"), load_folder(llamas / "base")
    models = [load_folder(llamas / f"m{k}") for k in range(3)]
    assert out.keys() == base.keys()
    changed = 0
    for name in base:
        want = fastmerge.merge(method, base[name], [m[name] for m in models], backend="torch",
                               **kwargs(PER_MODEL[method]))
        torch.testing.assert_close(out[name], want, atol=1e-6, rtol=1e-6, msg=name)
        changed += not torch.equal(out[name], base[name])
    assert changed > len(base) // 2  # the merge did something on most tensors
