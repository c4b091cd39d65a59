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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_yaml_emr_writes_the_unified_model_and_its_masks(llamas, tmp_path, dtype):
    """``merge_method: emr``: OUT holds the unified model ``base + tau_uni`` and
    ``emr/emr.safetensors`` (masks, whole-model rescalers) from which ``fastmerge.load_emr``
    rebuilds each model as ``fastmerge.emr`` over the state dicts does."""
    lines = ["merge_method: emr", f"base_model: {llamas / 'base'}", f"dtype: {dtype}", "models:"]
    lines += [f"  - model: {llamas / f'm{k}'}" for k in range(3)]
    cfg = tmp_path / "emr.yml"
    cfg.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert cli(["merge", str(cfg), str(out), "--no-progress"]) == 0
    td = getattr(torch, dtype)
    base = {n: t.to(td) for n, t in load_folder(llamas / "base").items()}
    models = [{n: t.to(td) for n, t in load_folder(llamas / f"m{k}").items()} for k in range(3)]
    merged = load_folder(out)  # the subfolder's masks are not model tensors
    assert merged.keys() == base.keys()
    want = fastmerge.emr(base, models)
    for name in base:
        assert torch.equal(merged[name], fastmerge.merge("emr", base[name], [m[name] for m in models])), name
        assert torch.equal(merged[name], (base[name].float() + want.unified[name]).to(td)), name
    got = fastmerge.load_emr(str(out), str(llamas / "base"))
    torch.testing.assert_close(got.rescalers, want.rescalers, atol=0, rtol=1e-6)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == "float32" else dict(atol=2e-2, rtol=2e-2)
    for t in range(3):
        rebuilt, expected = got.task(t), want.task(t)
        for name in base:
            assert torch.equal(got.mask(t, name), want.mask(t, name)), (t, name)
            torch.testing.assert_close(rebuilt[name].float(), expected[name].float(), **tol)


def test_yaml_emr_refuses_slices_and_load_emr_names_a_plain_folder(llamas, tmp_path, capsys):
    from conftest import expect_merge_error

    cfg = tmp_path / "s.yml"
    cfg.write_text(f"merge_method: emr\nbase_model: {llamas / 'base'}\nslices:\n"
                   f"  - sources:\n      - model: {llamas / 'base'}\n        layer_range: [0, 2]\n"
                   f"      - model: {llamas / 'm0'}\n        layer_range: [0, 2]\n")
    expect_merge_error(capsys, [cfg, tmp_path / "out"], "emr takes a models list")
    with pytest.raises(ValueError, match="is not the output of a merge_method: emr run"):
        fastmerge.load_emr(str(llamas / "m0"), str(llamas / "base"))


def _stats_folders(llamas, tmp_path):
    """Per model: a Fisher folder (non-negative tensors under the model's names) and a Gram
    folder (``X^T X`` of random inputs under each 2-D ``<module>.weight``'s module name)."""
    from safetensors.torch import save_file

    base = load_folder(llamas / "base")
    g = torch.Generator().manual_seed(5)
    for k in range(3):
        (tmp_path / f"f{k}").mkdir()
        (tmp_path / f"g{k}").mkdir()
        save_file({n: torch.rand(t.shape, generator=g) ** 2 for n, t in base.items()},
                  str(tmp_path / f"f{k}" / "fisher.safetensors"))
        grams = {}
        for n, t in base.items():
            if n.endswith(".weight") and t.dim() == 2 and "embed" not in n:
                x = torch.randn(3 * t.shape[1], t.shape[1], generator=g)
                grams[n[:-len(".weight")]] = x.t() @ x
        save_file(grams, str(tmp_path / f"g{k}" / "grams.safetensors"))
    return base


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_yaml_fisher_and_regmean_read_statistics_folders(llamas, tmp_path, method):
    """``merge_method: fisher`` / ``regmean``: each model names its statistics folder; the
    result equals ``fastmerge.fisher`` / ``fastmerge.regmean_state_dicts`` on the state dicts
    (Fisher norms over the whole model; RegMean on the linear weights, the rest averaged)."""
    _stats_folders(llamas, tmp_path)
    key, shared = ("fisher", "parameters: {normalize_fisher_weight: true, minimal_fisher_weight: 1.0e-6}") \
        if method == "fisher" else ("grams", "parameters: {alpha: 0.9}")
    stat = "f" if method == "fisher" else "g"
    lines = [f"merge_method: {method}", "dtype: float32", shared, "models:"]
    for k in range(3):
        weight = f", weight: {0.2 + 0.3 * k}" if method == "fisher" else ""
        lines += [f"  - model: {llamas / f'm{k}'}", f"    parameters: {{{key}: {tmp_path / f'{stat}{k}'}{weight}}}"]
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("\n".join(lines) + "\n")
    assert cli(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    out = load_folder(tmp_path / "out")
    models = [load_folder(llamas / f"m{k}") for k in range(3)]
    if method == "fisher":
        fishers = [load_folder(tmp_path / f"f{k}") for k in range(3)]
        want = fastmerge.fisher(models, fishers, weights=[0.2, 0.5, 0.8])
    else:
        grams = [load_folder(tmp_path / f"g{k}") for k in range(3)]
        want = fastmerge.regmean_state_dicts(models, grams, alpha=0.9)
    assert out.keys() == want.keys()
    for name in out:
        torch.testing.assert_close(out[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_yaml_statistics_errors(llamas, tmp_path, capsys):
    from conftest import expect_merge_error

    _stats_folders(llamas, tmp_path)
    cfg = tmp_path / "nofisher.yml"
    cfg.write_text(f"merge_method: fisher\nmodels:\n  - model: {llamas / 'm0'}\n    parameters: {{fisher: {tmp_path / 'f0'}}}\n"
                   f"  - model: {llamas / 'm1'}\n")
    expect_merge_error(capsys, [cfg, tmp_path / "o1"], "fisher", str(llamas / "m1"))
    cfg.write_text(f"merge_method: fisher\nmodels:\n  - model: {llamas / 'm0'}\n    parameters: {{fisher: {tmp_path / 'nope'}}}\n")
    expect_merge_error(capsys, [cfg, tmp_path / "o2"], "fisher", "nope", "no such folder")
    cfg.write_text(f"merge_method: regmean\nbase_model: {llamas / 'base'}\nmodels:\n"
                   f"  - model: {llamas / 'm0'}\n    parameters: {{grams: {tmp_path / 'g0'}}}\n")
    expect_merge_error(capsys, [cfg, tmp_path / "o3"], "no base_model")
    cfg.write_text(f"merge_method: fisher\nmodels:\n  - model: {llamas / 'm0'}\n    parameters: {{fisher: {tmp_path / 'f0'}}}\n"
                   f"  - model: {llamas / 'm1'}\n    parameters: {{fisher: {tmp_path / 'g1'}}}\n")
    expect_merge_error(capsys, [cfg, tmp_path / "o4"], "lacks tensor")
    cfg.write_text(f"merge_method: fisher\nmodels:\n  - model: {llamas / 'm0'}\n    parameters: {{fisher: 0.5}}\n")
    expect_merge_error(capsys, [cfg, tmp_path / "o5"], "fisher must be a folder path")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_yaml_pcb_over_the_whole_model_equals_the_authors_code(llamas, tmp_path, backend):
    """``topk_scope: model``: PCB's clamp bounds, score cut and max over the flattened model, as
    pcb-merging.py computes them; the merge of each tensor with those statistics."""
    from fastmerge.bench import upstream_research as up

    lines = ["merge_method: pcb", f"base_model: {llamas / 'base'}", "dtype: float32", "topk_scope: model",
             "parameters: {ratio: 0.2, lambda: 0.9}", "models:"]
    for k, w in enumerate([1.0, 0.8, 1.2]):
        lines += [f"  - model: {llamas / f'm{k}'}", f"    parameters: {{weight: {w}}}"]
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("\n".join(lines) + "\n")
    assert cli(["merge", str(cfg), str(tmp_path / "out"), "--no-progress", "--backend", backend]) == 0
    out, base = load_folder(tmp_path / "out"), load_folder(llamas / "base")
    models = [load_folder(llamas / f"m{k}") for k in range(3)]
    names = list(base)
    flat = lambda sd: torch.cat([sd[n].reshape(-1).float() for n in names])  # noqa: E731
    ptm = flat(base)
    merged = ptm + 0.9 * up.pcb_authors(torch.vstack([flat(m) for m in models]) - ptm, pcb_ratio=0.2,
                                        lams=[1.0, 0.8, 1.2])
    got = flat(out)
    torch.testing.assert_close(got, merged, atol=2e-6, rtol=1e-5)
    # per tensor (the default scope) the result differs: the statistics are the whole model's
    per_tensor = torch.cat([fastmerge.merge("pcb", base[n], [m[n] for m in models], ratio=0.2, lam=0.9,
                                            weights=[1.0, 0.8, 1.2]).reshape(-1) for n in names])
    assert not torch.allclose(per_tensor, got, atol=1e-6, rtol=1e-5)


def test_yaml_consensus_ties_over_the_whole_model_equals_the_tall_masks_code(llamas, tmp_path):
    """``topk_scope: model``: consensus_ties trims each task vector over the flattened model
    (``|tau| >= kthvalue``), as the tall_masks code does with ``use_ties``."""
    from fastmerge.bench import upstream_research as up

    lines = ["merge_method: consensus_ties", f"base_model: {llamas / 'base'}", "dtype: float32",
             "topk_scope: model", "parameters: {density: 0.2, k: 2, tall_lambda: 0.6}", "models:"]
    lines += [f"  - model: {llamas / f'm{k}'}" for k in range(3)]
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("\n".join(lines) + "\n")
    assert cli(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    out, base = load_folder(tmp_path / "out"), load_folder(llamas / "base")
    models = [load_folder(llamas / f"m{k}") for k in range(3)]
    names = list(base)
    flat = lambda sd: torch.cat([sd[n].reshape(-1).float() for n in names])  # noqa: E731
    ptm, ft = flat(base), torch.vstack([flat(m) for m in models])
    merged = up.ties_tall(ft - ptm, reset_thresh=20, merge_func="sum")
    want = ptm + merged * up.consensus_fb(up.tall_masks_fb(ft, ptm, merged, 0.6), 2)
    torch.testing.assert_close(flat(out), want, atol=1e-6, rtol=1e-5)
