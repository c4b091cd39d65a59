"""``fastmerge extract-lora`` / :func:`fastmerge.lowrank.extract_lora`: LoRA adapters from full
fine-tunes.

Against ``torch.linalg.svdvals`` (the Eckart-Young optimum), against PEFT itself (the adapter
loads with ``PeftModel.from_pretrained`` and its logits are those of ``W_base + B A``), and
against ``mergekit-extract-lora`` (mergekit 0.1.5) on a tiny Llama: the same tensors, modules
and ranks, and an error no worse than its full SVD's (randomized: within the 1.02 factor).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastmerge import lowrank
from fastmerge.cli import main as cli

PREFIX = "base_model.model."


def _spectral_delta(m, n, k=24, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -1.0
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return ((u * s) @ v.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64)).float()


def _optimum(d: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(d.double())
    return float(s[r:].square().sum().sqrt())


# --------------------------------------------------------------------------- one matrix

@pytest.mark.parametrize("shape", [(96, 64), (48, 130)])
@pytest.mark.parametrize("exact", [False, True])
def test_factors_within_eckart_young(shape, exact):
    base = torch.randn(*shape)
    d = _spectral_delta(*shape)
    r = 8
    b, a, info = lowrank.extract_lora(base, base + d, r, exact=exact, seed=1, return_info=True)
    assert b.shape == (shape[0], r) and a.shape == (r, shape[1]) and info["rank"] == r
    err = float((base + d - base - b @ a).norm())  # what PEFT adds: W_base + B A
    opt = _optimum((base + d) - base, r)
    assert err <= (1.0001 if exact else 1.02) * opt
    # mergekit's distribute_scale: the singular values split evenly between B and A
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), rtol=1e-4)
    assert info["residual"] == pytest.approx(err, rel=1e-3)


def test_rank_fraction_and_sv_epsilon():
    base = torch.zeros(80, 60)
    d = _spectral_delta(80, 60, noise=0.0)
    s2 = torch.linalg.svdvals(d.double()).square()
    frac = float(s2[:5].sum() / s2.sum()) - 1e-6  # the smallest rank holding it is 5
    _, a, info = lowrank.extract_lora(base, d, rank_fraction=frac, exact=True, return_info=True)
    assert a.shape[0] == info["rank"] == 5 and info["energy"] >= frac
    _, a, _ = lowrank.extract_lora(base, d, 3, rank_fraction=frac, return_info=True)
    assert a.shape[0] == 3  # --rank caps it
    s = torch.linalg.svdvals(d.double())
    _, a = lowrank.extract_lora(base, d, 20, sv_epsilon=float(s[5] + s[6]) / 2, exact=True)
    assert a.shape[0] == 6
    b, a = lowrank.extract_lora(base, base, 4)  # no change: rank 4 of zeros (PEFT needs r >= 1)
    assert float((b @ a).abs().max()) == 0.0


def test_factor_errors():
    x = torch.randn(8, 6)
    with pytest.raises(ValueError, match="rank"):
        lowrank.extract_lora(x, x)
    with pytest.raises(ValueError, match="rank_fraction"):
        lowrank.extract_lora(x, x, 2, rank_fraction=1.5)
    with pytest.raises(ValueError, match="one shape"):
        lowrank.extract_lora(x, torch.randn(8, 5), 2)
    with pytest.raises(ValueError, match="rank"):
        lowrank.extract_lora(x, x, 0)
    with pytest.raises(TypeError, match="finetuned"):
        lowrank.extract_lora(x, x.int(), 2)


# --------------------------------------------------------------------------- checkpoints

def _tiny(root, arch="llama"):
    """``root/base``, ``root/ft``: a tiny fp32 model and a fine-tune whose 2-D deltas have a
    decaying spectrum (so the rank matters) and whose norms (and biases) change too."""
    import transformers

    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:  # qwen2: q/k/v carry biases -> lora_B.bias
        cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=160,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64, tie_word_embeddings=False)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() == 2:
                p += 0.05 * _spectral_delta(*p.shape, k=12, noise=2e-3, seed=i)
            else:
                p += 0.01 * torch.randn_like(p)
    model.save_pretrained(root / "ft")
    return root / "base", root / "ft"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    return _tiny(tmp_path_factory.mktemp("extract"))


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _extract(base, ft, out, *args):
    rc = cli(["extract-lora", str(base), str(ft), str(out), "--no-progress", *args])
    assert rc == 0
    return _load(out / "adapter_model.safetensors"), json.loads((out / "adapter_config.json").read_text())


def test_adapter_reproduces_base_plus_ba(llama, tmp_path):
    base, ft = llama
    r = 6
    ad, conf = _extract(base, ft, tmp_path / "out", "--rank", str(r))
    wb, wf = _load(base / "model.safetensors"), _load(ft / "model.safetensors")
    mods = sorted(k[len(PREFIX):-len(".lora_A.weight")] for k in ad if k.endswith(".lora_A.weight"))
    assert len(mods) == 2 * 7  # q k v o gate up down per layer
    for mod in mods:
        a, b = ad[f"{PREFIX}{mod}.lora_A.weight"], ad[f"{PREFIX}{mod}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == r and a.dtype == wf[mod + ".weight"].dtype
        d = wf[mod + ".weight"] - wb[mod + ".weight"]
        assert float((d - b @ a).norm()) <= 1.02 * _optimum(d, r)
    # everything else is the fine-tune's tensor itself, under PEFT's modules_to_save names
    saved = {k[len(PREFIX):]: v for k, v in ad.items() if ".lora_" not in k}
    assert set(saved) == {k for k in wf if not any(k == m + ".weight" for m in mods)}
    for k, v in saved.items():
        assert torch.equal(v, wf[k])
    assert conf["r"] == conf["lora_alpha"] == r and conf["peft_type"] == "LORA"
    assert sorted(conf["target_modules"]) == sorted({m.split(".")[-1] for m in mods})
    assert sorted(conf["modules_to_save"]) == ["embed_tokens", "input_layernorm", "lm_head", "norm",
                                               "post_attention_layernorm"]


def _peft_logits(base, out):
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    peft_model = PeftModel.from_pretrained(model, str(out)).eval()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ids, peft_model(ids).logits


def _reference_logits(base, ad, ids, conf):
    """The base model with ``W + B A`` (and ``b + Δb``, ``E + (B A)ᵀ``) per adapted module and
    the saved modules' own tensors: the model the adapter stands for, built without PEFT."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    sd = model.state_dict()
    for k, v in ad.items():
        name = k[len(PREFIX):]
        if ".lora_A.weight" in name:
            mod = name[:-len(".lora_A.weight")]
            sd[mod + ".weight"] += ad[k.replace("lora_A", "lora_B")] @ v
            db = ad.get(k.replace("lora_A.weight", "lora_B.bias"))
            if db is not None and mod + ".bias" in sd:
                sd[mod + ".bias"] += db
            elif db is not None:  # PEFT adds lora_B's bias to a bias-less layer's output
                assert float(db.abs().max()) == 0.0
        elif ".lora_embedding_A" in name:
            mod = name[:-len(".lora_embedding_A")]
            sd[mod + ".weight"] += (ad[k.replace("_A", "_B")] @ v).T
        elif ".lora_" not in name:
            sd[name] = v
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("args", [["--rank", "5"], ["--rank", "8", "--rank-fraction", "0.9", "--embed-lora"]],
                         ids=["rank", "fraction+embed"])
def test_peft_loads_and_logits_match(llama, tmp_path, args):
    pytest.importorskip("peft")
    base, ft = llama
    ad, conf = _extract(base, ft, tmp_path / "out", *args)
    if "--embed-lora" in args:
        assert f"{PREFIX}model.embed_tokens.lora_embedding_A" in ad and "lm_head" in conf["target_modules"]
        assert conf["rank_pattern"]  # the energy rule picked ranks below 8 for some modules
    ids, got = _peft_logits(base, tmp_path / "out")
    want = _reference_logits(base, ad, ids, conf)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and the adapter is not a no-op: the fine-tune's logits are closer than the base's
    import transformers

    with torch.no_grad():
        tuned = transformers.AutoModelForCausalLM.from_pretrained(str(ft))(ids).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(base))(ids).logits
    assert float((got - tuned).norm()) < 0.5 * float((plain - tuned).norm())


def test_linear_bias_goes_to_lora_b_bias(tmp_path):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen2ForCausalLM"):
        pytest.skip("transformers lacks Qwen2")
    base, ft = _tiny(tmp_path, "qwen2")
    ad, conf = _extract(base, ft, tmp_path / "out", "--rank", "6")
    assert conf["lora_bias"] is True
    wb, wf = _load(base / "model.safetensors"), _load(ft / "model.safetensors")
    k = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(ad[f"{PREFIX}{k}.lora_B.bias"], wf[k + ".bias"] - wb[k + ".bias"])
    o = "model.layers.0.self_attn.o_proj"  # no bias: PEFT's lora_B bias is written as zeros
    assert float(ad[f"{PREFIX}{o}.lora_B.bias"].abs().max()) == 0.0
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, got = _peft_logits(base, tmp_path / "out")
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    torch.testing.assert_close(got, _reference_logits(base, ad, ids, conf), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "randomized"])
def test_against_mergekit_extract_lora(llama, tmp_path, exact):
    pytest.importorskip("mergekit.scripts.extract_lora")
    from mergekit.scripts.extract_lora import main as mk_main

    base, ft = llama
    r = 6
    mk_out = tmp_path / "mk"
    try:
        mk_main.main(args=["--base-model", str(base), "--model", str(ft), "--out-path", str(mk_out),
                           "--max-rank", str(r)], standalone_mode=False)
    except SystemExit as exc:  # click may still exit
        assert not exc.code
    ours, conf = _extract(base, ft, tmp_path / "fm", "--rank", str(r), *(["--exact"] if exact else []))
    theirs = _load(mk_out / "adapter_model.safetensors")
    mk_conf = json.loads((mk_out / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype, k
    for key in ("r", "lora_alpha", "rank_pattern", "peft_type", "task_type"):
        assert conf[key] == mk_conf[key], key
    assert sorted(conf["target_modules"]) == sorted(mk_conf["target_modules"])
    assert sorted(conf["modules_to_save"]) == sorted(mk_conf["modules_to_save"])
    wb, wf = _load(base / "model.safetensors"), _load(ft / "model.safetensors")
    factor = 1.0 + 1e-4 if exact else 1.02
    for k in ours:
        if not k.endswith(".lora_A.weight"):
            if ".lora_" not in k:
                assert torch.equal(ours[k], theirs[k]), k
            continue
        mod = k[len(PREFIX):-len(".lora_A.weight")]
        d = wf[mod + ".weight"] - wb[mod + ".weight"]
        kb = k.replace("lora_A", "lora_B")
        e_ours = float((d - ours[kb] @ ours[k]).norm())
        e_theirs = float((d - theirs[kb] @ theirs[k]).norm())
        assert e_ours <= factor * e_theirs + 1e-7, (mod, e_ours, e_theirs)


# --------------------------------------------------------------------------- CLI and safety

def _err(capsys, *argv):
    rc = cli(["extract-lora", *map(str, argv), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_cli_errors(llama, tmp_path, capsys, monkeypatch):
    base, ft = llama
    out = tmp_path / "out"
    rc, line = _err(capsys, base, ft, out)
    assert rc == 1 and "--rank" in line
    rc, line = _err(capsys, tmp_path / "nope", ft, out, "--rank", "4")
    assert rc == 1 and "BASE not found" in line and "nope" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id is resolved through the cache only
    rc, line = _err(capsys, base, "no-such-org/no-such-model", out, "--rank", "4")
    assert rc == 1 and "FINETUNED 'no-such-org/no-such-model' is not a local folder" in line
    rc, line = _err(capsys, base, ft, out, "--rank", "0")
    assert rc == 1 and "--rank 0" in line
    rc, line = _err(capsys, base, ft, out, "--rank-fraction", "1.5")
    assert rc == 1 and "--rank-fraction" in line
    rc, line = _err(capsys, base, ft, out, "--rank", "4", "-e", "(")
    assert rc == 1 and "--exclude-regex" in line
    rc, line = _err(capsys, base, ft, base, "--rank", "4")
    assert rc == 1 and "is BASE" in line
    rc, line = _err(capsys, base, ft, ft / "x", "--rank", "4")
    assert rc == 1 and "inside FINETUNED" in line
    rc, line = _err(capsys, base, ft, out, "--rank", "4", "-i", "no_such_module")
    assert rc == 1 and "no 2-D linear module" in line
    assert not out.exists()
    with pytest.raises(SystemExit):  # argparse: one line, exit code 2
        cli(["extract-lora", str(base), str(ft), str(out), "--rank", "x"])
    assert "--rank: invalid int value" in capsys.readouterr().err


def test_out_is_atomic_and_never_overwritten_unasked(llama, tmp_path, capsys):
    base, ft = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    rc, line = _err(capsys, base, ft, out, "--rank", "4")
    assert rc == 1 and "--overwrite" in line and (out / "mine.txt").read_text() == "keep"
    assert cli(["extract-lora", str(base), str(ft), str(out), "--rank", "4", "--overwrite", "--no-progress"]) == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [f for f in os.listdir(tmp_path) if ".fastmerge-" in f]  # no temporary left


def test_torchrun_two_processes_write_the_same_adapter(llama, tmp_path):
    """``torchrun --nproc-per-node=2`` (gloo) splits the modules and writes into one shared file:
    byte-identical to one process (both at 1 thread: BLAS results may depend on the count)."""
    import subprocess
    import sys

    base, ft = llama
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    args = [str(base), str(ft), "--rank", "4", "--no-progress", "--device", "cpu"]
    one = [sys.executable, "-m", "fastmerge", "extract-lora", args[0], args[1], str(tmp_path / "one"), *args[2:]]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", "-m", "fastmerge", "extract-lora", args[0], args[1],
           str(tmp_path / "two"), *args[2:]]
    script = tmp_path / "both.sh"
    script.write_text("set -e\n" + " ".join(one) + "\n" + " ".join(two) + "\n")
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 processes" in r.stderr
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
