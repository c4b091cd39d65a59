"""``model+lora`` references in ``fastmerge merge`` (fastmerge/adapters.py): a PEFT LoRA adapter
applied to the model as it streams equals PEFT's own ``merge_and_unload``, for Linear and
Embedding targets, ``modules_to_save``, ``use_rslora`` with ``rank_pattern``/``alpha_pattern``;
unsupported adapters and mismatches are one-line errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import load_folder, tiny_llamas
from fastmerge.cli import main as cli

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_llamas(tmp_path_factory.mktemp("llamas"))


def _adapter(model_dir, out, seed, **config):
    """A LoRA adapter of ``model_dir`` with random (non-zero) factors, saved to ``out``; returns
    PEFT's merge_and_unload state dict (the reference)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    lora.save_pretrained(out)
    return {k: v.detach().clone() for k, v in lora.merge_and_unload().state_dict().items()}


def _run(cfg_text, tmp_path, name="out"):
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(cfg_text)
    return cli(["merge", str(cfg), str(tmp_path / name), "--no-progress"])


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj", "embed_tokens"],
         rank_pattern={"o_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3}),
    dict(r=2, lora_alpha=2, target_modules=["k_proj"], modules_to_save=["lm_head"]),
])
def test_model_plus_lora_equals_peft_merge_and_unload(llamas, tmp_path, config):
    want = _adapter(llamas / "m0", tmp_path / "lora", 0, **config)
    assert _run(f"merge_method: passthrough\ndtype: float32\nmodels:\n"
                f"  - model: {llamas / 'm0'}+{tmp_path / 'lora'}\n", tmp_path) == 0
    got = load_folder(tmp_path / "out")
    changed = [k for k in got if not torch.equal(load_folder(llamas / "m0")[k], want[k])]
    assert changed  # the adapter did change weights
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


def test_lora_inside_a_merge(llamas, tmp_path):
    """A merge whose inputs include a model+lora: the same as merging PEFT's merged model."""
    merged = _adapter(llamas / "m1", tmp_path / "lora", 1, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    folder = tmp_path / "m1-merged"
    shutil.copytree(llamas / "m1", folder)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in merged.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    head = f"merge_method: ties\nbase_model: {llamas / 'base'}\ndtype: float32\nmodels:\n"
    tail = "    parameters: {weight: 0.5, density: 0.5}\n"
    assert _run(head + f"  - model: {llamas / 'm0'}\n{tail}  - model: {llamas / 'm1'}+{tmp_path / 'lora'}\n{tail}",
                tmp_path, "a") == 0
    assert _run(head + f"  - model: {llamas / 'm0'}\n{tail}  - model: {folder}\n{tail}", tmp_path, "b") == 0
    a, b = load_folder(tmp_path / "a"), load_folder(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=k)


def test_adapter_errors(llamas, tmp_path, capsys):
    _adapter(llamas / "m0", tmp_path / "lora", 0, r=2, lora_alpha=4, target_modules=["q_proj"])
    dora = tmp_path / "dora"
    shutil.copytree(tmp_path / "lora", dora)
    conf = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(conf | {"use_dora": True}))
    capsys.readouterr()  # transformers' loading bars
    for lora, needle in ((dora, "DoRA adapters (use_dora) are not supported"),
                         (llamas / "m1", "is not a PEFT adapter (no adapter_config.json)"),
                         (tmp_path / "missing", "not found")):
        assert _run(f"merge_method: passthrough\nmodels:\n  - model: {llamas / 'm0'}+{lora}\n", tmp_path, "x") == 1
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()
