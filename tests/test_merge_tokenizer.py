"""``fastmerge merge`` with ``tokenizer_source`` and the ``tokenizer:`` block: the output
vocabulary (base, union, a model's), the embedding rows aligned to it per model, the padded
vocabulary, ``config.json``'s ``vocab_size`` and the saved tokenizer, against ``mergekit-yaml``
(mergekit 0.1.5) on tiny Llamas with two different vocabularies, token by token (mergekit's
ids of appended tokens follow its hash order; fastmerge's are fixed, fastmerge/vocab.py).
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from conftest import assert_tensors_match_mergekit, expect_merge_error, load_folder
from fastmerge import layers
from fastmerge.cli import main as cli

A_WORDS = ["<unk>", "<s>", "</s>"] + [f"a{i}" for i in range(93)] + ["pad0", "pad1"]  # 98 > 96 rows
B_SHARED = [f"a{i}" for i in range(60)]
random.Random(0).shuffle(B_SHARED)
B_WORDS = ["<unk>", "<s>", "</s>"] + B_SHARED + [f"b{i}" for i in range(36)]  # 99 + 1 added = 100


def _tokenizer(folder, words, special=()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(words)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    """``base`` and ``m0`` (vocabulary A: 96 rows, its tokenizer two tokens longer) and ``b``
    (vocabulary B: 100 rows, 60 of A's tokens in another order, 36 of its own and an added
    special token)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("vocabs")
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, **kw))
    base.save_pretrained(root / "base")
    sd = base.state_dict()
    m0 = LlamaForCausalLM(LlamaConfig(vocab_size=96, **kw))
    m0.load_state_dict({n: t + 0.02 * torch.randn_like(t) for n, t in sd.items()})
    m0.save_pretrained(root / "m0")
    b = LlamaForCausalLM(LlamaConfig(vocab_size=100, **kw))
    b.load_state_dict({n: (t + 0.03 * torch.randn_like(t)) if "embed" not in n and "lm_head" not in n
                       else torch.randn(100, t.shape[1]) for n, t in sd.items()})
    b.save_pretrained(root / "b")
    for name in ("base", "m0"):
        _tokenizer(root / name, A_WORDS)
    _tokenizer(root / "b", B_WORDS, special=["<|im_start|>"])
    return root


CONFIGS = {
    "ties_union": "merge_method: ties\nbase_model: {base}\ntokenizer_source: union\nmodels:\n"
                  "  - model: {m0}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                  "  - model: {b}\n    parameters: {{weight: 0.4, density: 0.7}}\n",
    "base_source": "merge_method: task_arithmetic\nbase_model: {base}\ntokenizer_source: base\nmodels:\n"
                   "  - model: {m0}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n",
    "model_source": "merge_method: linear\ntokenizer_source: {b}\nmodels:\n"
                    "  - model: {m0}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.7}}\n",
    "block": "merge_method: linear\nbase_model: {base}\nmodels:\n"
             "  - model: {base}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
             "tokenizer:\n  source: union\n  pad_to_multiple_of: 16\n  tokens:\n"
             "    <|im_start|>:\n      source: {b}\n"
             "    c_new:\n      source: {{kind: zero}}\n"
             "    a5:\n      source: {{kind: model_token, model: {b}, token: b3}}\n      force: true\n"
             "    a80:\n      source: {{kind: model_token, model: {base}, token_id: 7}}\n",
    "slerp_slices": "merge_method: slerp\nbase_model: {base}\ntokenizer_source: union\n"
                    "parameters:\n  t: [0, 0.3, 1]\nslices:\n  - sources:\n"
                    "    - model: {base}\n      layer_range: [0, 2]\n    - model: {b}\n      layer_range: [0, 2]\n",
}


def _config(root, case, dtype):
    text = f"dtype: {dtype}\n" + CONFIGS[case].format(base=root / "base", m0=root / "m0", b=root / "b")
    path = root / f"{case}-{dtype}.yml"
    path.write_text(text)
    return path


def _assert_same_by_token(mk, fm, method, dtype):
    """Same tokens and vocab_size; each token's row of every vocabulary tensor (and the padding
    rows) and every other tensor as conftest compares mergekit's tensors with ours."""
    from transformers import AutoTokenizer

    vm, vf = (AutoTokenizer.from_pretrained(d).get_vocab() for d in (mk, fm))
    assert vm.keys() == vf.keys()
    assert sorted(vf.values()) == list(range(len(vf)))
    cm, cf = (json.loads((d / "config.json").read_text()) for d in (mk, fm))
    assert cf["vocab_size"] == cm["vocab_size"]
    tokens = sorted(vf)
    pad = list(range(len(vf), cf["vocab_size"]))
    rm, rf = [vm[t] for t in tokens] + pad, [vf[t] for t in tokens] + pad
    a, b = load_folder(mk), load_folder(fm)
    assert a.keys() == b.keys()
    vocab = [n for n in a if layers.is_vocab(n)]
    assert len(vocab) == 2 and all(a[n].shape[0] == b[n].shape[0] == cf["vocab_size"] for n in vocab)
    a.update({n: a[n][rm] for n in vocab})
    b.update({n: b[n][rf] for n in vocab})
    assert_tensors_match_mergekit(a, b, method, dtype)


@pytest.mark.parametrize("case,dtype", [(c, "float32") for c in CONFIGS] + [("ties_union", "bfloat16"),
                                                                           ("block", "bfloat16")])
def test_tokenizer_merges_match_mergekit_yaml(vocabs, tmp_path, case, dtype):
    pytest.importorskip("mergekit")
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    cfg = _config(vocabs, case, dtype)
    mergekit_yaml.main(args=[str(cfg), str(tmp_path / "mk")], standalone_mode=False)
    assert cli(["merge", str(cfg), str(tmp_path / "fm"), "--no-progress"]) == 0
    _assert_same_by_token(tmp_path / "mk", tmp_path / "fm", case.split("_")[0], dtype)


def test_union_rows(vocabs, tmp_path):
    """The union's layout, checked on its own: A's 96 tokens first in A's order (its two
    tokens past vocab_size removed), then B's 36 own tokens in B's order, then the added
    special token; a token a model lacks takes the base's row, else the one model's."""
    from transformers import AutoTokenizer

    cfg = _config(vocabs, "ties_union", "float32")
    assert cli(["merge", str(cfg), str(tmp_path / "fm"), "--no-progress", "--backend", "torch"]) == 0
    v = AutoTokenizer.from_pretrained(tmp_path / "fm").get_vocab()
    order = sorted(v, key=v.get)
    assert order == A_WORDS[:96] + [f"b{i}" for i in range(36)] + ["<|im_start|>"]
    assert json.loads((tmp_path / "fm" / "config.json").read_text())["vocab_size"] == 133
    out = load_folder(tmp_path / "fm")["model.embed_tokens.weight"]
    assert out.shape[0] == 133
    base, m0, b = (load_folder(vocabs / n)["model.embed_tokens.weight"] for n in ("base", "m0", "b"))
    # each model's aligned rows: its own where it has the token; else the base's (A's tokens
    # B lacks), else B's (the tokens only B has); then the merge of the aligned rows
    import fastmerge
    bv = {w: i for i, w in enumerate(B_WORDS)}
    bv["<|im_start|>"] = 99
    rows_b = torch.tensor([bv.get(t, -1) for t in order])
    fill = torch.zeros(133, base.shape[1])
    fill[:96] = base
    fill[96:] = b[rows_b[96:]]
    al_b = torch.where((rows_b >= 0)[:, None], b[rows_b.clamp(min=0)], fill)
    al_m0 = fill.clone()
    al_m0[:96] = m0
    want = fastmerge.merge("ties", fill, [al_m0, al_b], weights=[0.6, 0.4], density=[0.5, 0.7], backend="torch")
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


def test_same_vocabulary_is_copied_as_read(vocabs, tmp_path):
    """``tokenizer_source: base`` over models of one vocabulary: the rows are not realigned
    (nothing to do) and the result equals the merge without a tokenizer source."""
    text = ("merge_method: task_arithmetic\nbase_model: {base}\n{tok}models:\n"
            "  - model: {m0}\n    parameters: {{weight: 0.5}}\n")
    outs = []
    for label, tok in (("plain", ""), ("base", "tokenizer_source: base\n")):
        cfg = vocabs / f"same-{label}.yml"
        cfg.write_text(text.format(base=vocabs / "base", m0=vocabs / "m0", tok=tok))
        assert cli(["merge", str(cfg), str(tmp_path / label), "--no-progress"]) == 0
        outs.append(load_folder(tmp_path / label))
    # the base's tokenizer is stripped to its 96 rows; the tensors are the same
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


BAD = {
    "both": ("tokenizer_source: base\ntokenizer: {{source: union}}\n", "not both"),
    "pad": ("tokenizer: {{source: union, pad_to_multiple_of: 0}}\n", "pad_to_multiple_of must be a positive integer"),
    "kind": ("tokenizer: {{tokens: {{x: {{source: {{kind: nope}}}}}}}}\n", "tokenizer.tokens['x'].source must be"),
    "not_merged": ("tokenizer: {{tokens: {{x: {{source: {base}}}}}}}\n", "is not one of the models merged"),
    "no_source": ("tokenizer: {{tokens: {{x: {{force: true}}}}}}\n", "needs a source"),
    "no_token": ("tokenizer: {{tokens: {{a1: {{source: {{kind: model_token, model: {b}, token: zz}}}}}}}}\n",
                 "token 'zz' is not in"),
    "source_type": ("tokenizer_source: [1]\n", "tokenizer_source must be"),
    "no_tokenizer_source": ("", "shape mismatch for tensor"),  # two vocabularies need one
}


@pytest.mark.parametrize("case", BAD)
def test_tokenizer_errors(vocabs, tmp_path, capsys, case):
    body, needle = BAD[case]
    cfg = tmp_path / "bad.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {vocabs / 'm0'}\n  - model: {vocabs / 'b'}\n"
                   + body.format(base=vocabs / "base", b=vocabs / "b"))
    expect_merge_error(capsys, [cfg, tmp_path / "out"], needle)
    assert not (tmp_path / "out").exists()


def test_two_processes_build_the_same_vocabulary(vocabs, tmp_path):
    """torchrun: every process builds the vocabulary; the folder equals one process's byte for byte."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = _config(vocabs, "block", "float32")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    env.pop("OMP_NUM_THREADS", None)
    common = [str(cfg), "--no-progress", "--max-shard-size", "40KB"]
    for cmd in ([sys.executable, "-m", "fastmerge", "merge", common[0], str(tmp_path / "one"), *common[1:]],
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=localhost:0", "-m", "fastmerge", "merge", common[0], str(tmp_path / "two"),
                 *common[1:]]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two")) and sum(n.endswith(".safetensors") for n in names) >= 2
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes(), n


def test_without_transformers_the_error_says_so(vocabs, tmp_path):
    """A config that builds a tokenizer, with transformers unimportable: one line naming it."""
    import subprocess
    import sys

    cfg = _config(vocabs, "ties_union", "float32")
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from fastmerge.cli import main\n"
            f"sys.exit(main(['merge', {str(cfg)!r}, {str(tmp_path / 'out')!r}, '--no-progress']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "pip install transformers" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
