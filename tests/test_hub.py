"""Hub ids in ``fastmerge merge`` configs (fastmerge/hub.py), resolved offline from a Hugging Face
hub cache the test builds in the layout ``huggingface_hub`` writes (``models--org--name/refs``,
``snapshots/<commit>``): the same merge as from the local folders, revisions by branch, tag and
commit, ``HF_HOME`` and ``HF_HUB_CACHE`` read at call time, and one-line errors (a
``model+lora`` reference resolves each part)."""
from __future__ import annotations

import fnmatch
import shutil

import pytest

from conftest import load_folder, tiny_llamas
from fastmerge import hub
from fastmerge.cli import main as cli

pytest.importorskip("huggingface_hub")

COMMITS = {"base": "1" * 40, "m0": "2" * 40, "m1": "3" * 40}


def _cache_repo(cache, repo, folder, commit, refs=("main",)):
    """``folder`` as revision ``commit`` of hub repo ``repo`` in cache ``cache``."""
    d = cache / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (d / "refs" / ref).write_text(commit)
    shutil.copytree(folder, d / "snapshots" / commit)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_llamas(tmp_path_factory.mktemp("llamas"))


@pytest.fixture
def cache(llamas, tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    _cache_repo(cache, "tiny/base", llamas / "base", COMMITS["base"])
    _cache_repo(cache, "tiny/m0", llamas / "m0", COMMITS["m0"], refs=("main", "v1"))
    _cache_repo(cache, "tiny-m1", llamas / "m1", COMMITS["m1"])  # a repo id without an org
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _config(path, base, m0, m1):
    path.write_text(f"merge_method: ties\nbase_model: {base}\ndtype: float32\nmodels:\n"
                    f"  - model: {m0}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
                    f"  - model: {m1}\n    parameters: {{weight: 0.5, density: 0.5}}\n")
    return path


def test_hub_ids_merge_like_the_local_folders(llamas, cache, tmp_path):
    hub_cfg = _config(tmp_path / "hub.yml", "tiny/base", "tiny/m0@v1", f"tiny-m1@{COMMITS['m1']}")
    local_cfg = _config(tmp_path / "local.yml", llamas / "base", llamas / "m0", llamas / "m1")
    assert cli(["merge", str(hub_cfg), str(tmp_path / "hub-out"), "--no-progress"]) == 0
    assert cli(["merge", str(local_cfg), str(tmp_path / "local-out"), "--no-progress"]) == 0
    got, want = load_folder(tmp_path / "hub-out"), load_folder(tmp_path / "local-out")
    assert got.keys() == want.keys() and len(got) > 10
    assert all(got[k].equal(want[k]) for k in want)
    # a cached snapshot is an input: OUT may not lie inside it
    snap = cache / "models--tiny--m0" / "snapshots" / COMMITS["m0"]
    assert cli(["merge", str(hub_cfg), str(snap / "out"), "--no-progress"]) == 1
    assert not (snap / "out").exists()


def test_local_path_resolution(llamas, cache, tmp_path, monkeypatch):
    snap = cache / "models--tiny--m0" / "snapshots" / COMMITS["m0"]
    for ref in ("tiny/m0", "tiny/m0@main", "tiny/m0@v1", f"tiny/m0@{COMMITS['m0']}"):
        assert hub.local_path(ref, "models[0]") == str(snap)
    for ref in (str(llamas / "m0"), "./tiny/m0", "/no/such/folder", "~/x"):
        assert hub.local_path(ref, "models[0]") == ref  # local paths are never looked up
    # HF_HOME is read at call time (its hub/ folder), when HF_HUB_CACHE is unset
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    shutil.copytree(cache, tmp_path / "home" / "hub")
    assert hub.local_path("tiny/m0", "base_model") == str(tmp_path / "home" / "hub" / snap.relative_to(cache))


@pytest.mark.parametrize("ref,needles", [
    ("tiny/absent", ["models[1] 'tiny/absent' is not a local folder and not in the hub cache",
                     "HF_HUB_OFFLINE is set", "hf download tiny/absent"]),
    ("tiny/m0@nope", ["models[1] 'tiny/m0@nope'", "not in the hub cache"]),
    ("tiny/base+tiny/lora", ["models[1] (lora) 'tiny/lora' is not a local folder and not in the hub cache"]),
    ("https://huggingface.co/tiny/m0", ["is a URL"]),
])
def test_errors_are_one_line_and_name_the_entry(llamas, cache, tmp_path, capsys, ref, needles):
    cfg = _config(tmp_path / "bad.yml", "tiny/base", "tiny/m0", ref)
    assert cli(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "out").exists()


def test_hub_id_syntax():
    assert hub.split("org/name@rev") == ("org/name", "rev") and hub.split("name") == ("name", None)
    for ref in ("org/name", "name", "org/name@v1.0", "Org-1/na.me_2"):
        assert hub.is_hub_id(ref), ref
    for ref in ("", "./org/name", "/org/name", "a/b/c", "org/../x", "org--x/y", ".hidden/x"):
        assert not hub.is_hub_id(ref), ref


def test_only_the_files_a_merge_reads_are_fetched():
    def wanted(f):
        return any(fnmatch.fnmatch(f, p) for p in hub.ALLOW_PATTERNS)

    for f in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
              "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json"):
        assert wanted(f), f
    for f in ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.gguf", "README.md",
              "optimizer.pt", "original/consolidated.00.pth", "flax_model.msgpack"):
        assert not wanted(f), f
