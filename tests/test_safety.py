"""``fastmerge merge`` never loses, leaks or silently corrupts data (issue 16, I/O and CLI).

One test per defect the issue lists, each failing on the code before the fix (398f1ea):

* OUT safety: OUT may not be, hold or lie inside an input, nor be or hold the working directory
  or the config's folder, symlinks resolved; ``--overwrite`` swaps with ``renameat2
  (RENAME_EXCHANGE)`` (checked with strace), onto a file or symlink without a stray entry; the
  fallback sequence where renameat2 is missing; a pre-existing folder with a temporary name is
  never deleted; a failed run removes the parent folders it created.
* Signals (subprocesses, strace fault injection; skipped where strace cannot run): SIGTERM is
  handled like SIGINT; a SIGKILL's leftover is named, not deleted, by the next run; a kill
  between the fallback's two renames and one after the exchange leave recoverable states that
  the next run names.
* Confined, validated input: index paths with ``..`` or absolute, symlinks out of the model
  folder (weights and copied config files), invalid headers that the old reader merged as
  weights, truncated files, malformed headers and indexes, errors that quoted file bytes.
* Nothing silently wrong: tensors missing from the base, duplicate names across shards, an
  index that disagrees with its shards (``--drop-extra-tensors`` and ``--trust-index`` keep
  mergekit's behaviour).
* Errors: every CLI error case here is one line naming the argument or file, a non-zero exit
  and no traceback; ``--debug`` shows the traceback.

Checkpoints are built with ``safetensors`` directly (a few tiny tensors), so the module runs
in seconds; the subprocess tests take a few seconds each.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import struct
import subprocess
import sys

import pytest
import torch

import fastmerge
from fastmerge.cli import main as cli

safetensors_torch = pytest.importorskip("safetensors.torch")
save_file, load_file = safetensors_torch.save_file, safetensors_torch.load_file

# the package under test, wherever it lives (this checkout, or another one on PYTHONPATH)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastmerge.__file__)))
SHAPES = {"model.embed_tokens.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (8, 8),
          "model.layers.1.mlp.up_proj.weight": (8, 8), "model.norm.weight": (8,),
          "lm_head.weight": (16, 8)}


def tensors(seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def make_model(folder, seed, data=None):
    os.makedirs(folder, exist_ok=True)
    save_file(data if data is not None else tensors(seed), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    return folder


def make_config(path, base, models):
    lines = ["merge_method: task_arithmetic", "dtype: float32", f"base_model: {base}", "models:"]
    for k, m in enumerate(models):
        lines += [f"  - model: {m}", f"    parameters: {{weight: {0.5 + 0.1 * k}}}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def setup(tmp_path):
    """A base and two models under tmp/models, the config in tmp/cfg (its own folder)."""
    models = tmp_path / "models"
    base = make_model(models / "base", 0)
    ms = [make_model(models / f"m{k}", k + 1) for k in range(2)]
    os.makedirs(tmp_path / "cfg")
    cfg = make_config(tmp_path / "cfg" / "merge.yml", base, ms)
    return tmp_path, cfg, base, ms


def snapshot(folder):
    """Every file below ``folder`` with its bytes: to prove nothing was touched."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def merge(cfg, out, *args):
    try:
        return cli(["merge", str(cfg), str(out), "--no-progress", *args])
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


def expect_error(capsys, cfg, out, *args, needles=(), rc=1):
    """The CLI fails with exit code ``rc`` and exactly one error line on stderr (besides any
    warning lines), no traceback, holding every needle."""
    capsys.readouterr()  # drop what earlier runs printed
    got = merge(cfg, out, *args)
    err = capsys.readouterr().err
    assert got == rc, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and ": warning: " not in line]
    assert len(lines) == 1, err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


def leftovers(parent):
    return sorted(f for f in os.listdir(parent) if ".fastmerge-" in f)


# ------------------------------------------------------------------------- OUT safety

@pytest.mark.parametrize("where", ["base", "models_parent", "inside_base", "cwd", "config_folder",
                                   "config_file", "cwd_parent", "through_symlink", "input_via_symlink"])
def test_out_is_never_an_input_nor_holds_or_lies_inside_one(setup, capsys, monkeypatch, where):
    """The old code merged into any OUT: `--overwrite` with OUT=. deleted the working
    directory, OUT=base_model deleted the base. Now refused up front, inputs untouched."""
    tmp, cfg, base, ms = setup
    before = snapshot(tmp)
    work = tmp / "work"
    os.makedirs(work)
    monkeypatch.chdir(work)
    if where == "base":
        out = base
    elif where == "models_parent":
        out = tmp / "models"
    elif where == "inside_base":
        out = base / "merged"
    elif where == "cwd":
        out = "."
    elif where == "config_folder":
        out = tmp / "cfg"
    elif where == "config_file":
        out = cfg
    elif where == "cwd_parent":
        out = tmp
    elif where == "through_symlink":  # OUT reached through a link to the models' folder
        os.symlink(tmp / "models", tmp / "alias")
        out = tmp / "alias" / "m0"
    else:  # the config names an input through a symlink; OUT is its real path
        os.symlink(ms[1], tmp / "m1-link")
        cfg = make_config(tmp / "cfg" / "merge.yml", base, [ms[0], tmp / "m1-link"])
        before = snapshot(tmp)
        out = ms[1]
    expect_error(capsys, cfg, out, "--overwrite", needles=["OUT"])
    assert snapshot(tmp) == before
    assert leftovers(tmp / "models") == [] and leftovers(tmp) == []


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling_symlink"])
def test_overwrite_onto_a_file_or_symlink_leaves_no_stray_entry(setup, kind):
    """The old code renamed a file/symlink OUT to `.OUT.fastmerge-tmp-old` and then failed to
    rmtree it, leaving it behind. Now the entry is swapped and unlinked; a link's target stays."""
    tmp, cfg, base, ms = setup
    out = tmp / "out"
    target = tmp / "target"
    os.makedirs(target)
    (target / "precious.txt").write_text("keep me")
    if kind == "file":
        out.write_text("a file")
    elif kind == "symlink":
        os.symlink(target, out)
    else:
        os.symlink(tmp / "nowhere", out)
    assert merge(cfg, out, "--overwrite") == 0
    assert out.is_dir() and not out.is_symlink() and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp)) == ["cfg", "models", "out", "target"]
    assert (target / "precious.txt").read_text() == "keep me"


def test_fallback_without_renameat2(setup, monkeypatch):
    """Where renameat2 is missing (not Linux, an old kernel, a filesystem without it), OUT is
    moved aside, the new one renamed in, the old one deleted: same result, nothing left."""
    from fastmerge import streaming

    tmp, cfg, base, ms = setup
    out = tmp / "out"
    os.makedirs(out)
    (out / "keep.txt").write_text("old")
    monkeypatch.setattr(streaming, "renameat2", lambda src, dst, flags: False)
    assert merge(cfg, out, "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "fastmerge_config.yml", "mergekit_config.yml", "model.safetensors"]
    assert sorted(os.listdir(tmp)) == ["cfg", "models", "out"]
    assert merge(cfg, tmp / "new") == 0 and (tmp / "new" / "model.safetensors").is_file()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
@pytest.mark.parametrize("via", ["libc", "syscall"])
def test_renameat2_exchanges_and_refuses_to_replace(tmp_path, via):
    """Both ways of reaching renameat2 (glibc's wrapper, the raw system call for an older
    libc): RENAME_EXCHANGE swaps two folders, RENAME_NOREPLACE refuses an existing target."""
    import ctypes

    from fastmerge import streaming

    libc = ctypes.CDLL(None, use_errno=True)
    if via == "libc":
        if not hasattr(libc, "renameat2"):
            pytest.skip("this libc has no renameat2")
        fn = streaming._libc_renameat2(libc)
    else:
        if platform.machine() not in streaming._RENAMEAT2_SYSCALL:
            pytest.skip(f"no renameat2 syscall number for {platform.machine()}")
        fn = streaming._syscall_renameat2(libc, platform.machine())
    a, b = tmp_path / "a", tmp_path / "b"
    os.makedirs(a)
    (a / "in_a").write_text("a")
    b.write_text("b is a file")
    if fn(bytes(a), bytes(b), streaming.RENAME_EXCHANGE) != 0:
        pytest.skip(f"this filesystem has no RENAME_EXCHANGE: {os.strerror(ctypes.get_errno())}")
    assert (b / "in_a").read_text() == "a" and a.read_text() == "b is a file"
    assert fn(bytes(b), bytes(a), streaming.RENAME_NOREPLACE) == -1
    assert ctypes.get_errno() == 17 and (b / "in_a").exists() and a.is_file()


def test_a_folder_with_a_temporary_name_is_never_deleted(setup, capsys, monkeypatch):
    """The old code `rmtree`d any `.OUT.fastmerge-tmp` it found (and `-old`) without a word.
    Now such a folder is named and left alone, and a clash with this run's own name is an
    error that touches nothing."""
    from fastmerge import streaming

    tmp, cfg, base, ms = setup
    out = tmp / "out"
    for name in (".out.fastmerge-tmp", ".out.fastmerge-tmp-old"):
        os.makedirs(tmp / name)
        (tmp / name / "mine.txt").write_text("not yours")
    assert merge(cfg, out) == 0
    err = capsys.readouterr().err
    assert ".out.fastmerge-tmp" in err and "not deleted" in err
    for name in (".out.fastmerge-tmp", ".out.fastmerge-tmp-old"):
        assert (tmp / name / "mine.txt").read_text() == "not yours"
    monkeypatch.setattr(streaming.secrets, "randbits", lambda n: 0xABC)
    clash = tmp / f".again.fastmerge-tmp-{0xABC:016x}"
    os.makedirs(clash)
    (clash / "mine.txt").write_text("not yours")
    expect_error(capsys, cfg, tmp / "again", needles=["already exists", str(clash)])
    assert (clash / "mine.txt").read_text() == "not yours" and not (tmp / "again").exists()


def test_a_failed_run_removes_only_what_it_created(setup, capsys, monkeypatch):
    """OUT in folders that do not exist yet: a run that fails removes its temporary folder and
    the parents it made (the old code left the parents), and nothing else."""
    from fastmerge import safetensors_io as sio

    tmp, cfg, base, ms = setup

    def failing(self, name, t):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sio.Writer, "write", failing)
    expect_error(capsys, cfg, tmp / "a" / "b" / "out", needles=["no space left"])
    assert sorted(os.listdir(tmp)) == ["cfg", "models"]
    os.makedirs(tmp / "a")
    (tmp / "a" / "other.txt").write_text("x")
    expect_error(capsys, cfg, tmp / "a" / "b" / "out", needles=["no space left"])
    assert os.listdir(tmp / "a") == ["other.txt"]


# ---------------------------------------------------------------- signals and kills

def _strace_ok() -> str:
    """Why the strace tests cannot run here, or '' when they can."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return "the syscall names injected here (rename, pwrite64, unlinkat) are x86_64 Linux's"
    exe = shutil.which("strace")
    if exe is None:
        return "strace is not installed (apt-get install strace)"
    try:
        r = subprocess.run([exe, "-qq", "-o", "/dev/null", "-e", "inject=getpid:error=ENOSYS",
                            "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"strace does not run: {exc}"
    return "" if r.returncode == 0 else f"strace cannot trace here: {r.stderr.decode()[-200:]}"


STRACE = _strace_ok()
needs_strace = pytest.mark.skipif(bool(STRACE), reason=STRACE or "strace")


def _fm(cfg, out, *args, inject=(), trace=None, cwd=None):
    """``python -m fastmerge merge --device cpu`` in a subprocess under strace with fault
    ``inject``ions (on CPU: no Triton, whose kernel cache would add renames to the count).
    Returns (exit code, stderr, strace's log)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               PYTHONDONTWRITEBYTECODE="1")  # no .pyc renames to confuse the rename counter
    env.pop("TRITON_INTERPRET", None)
    log = os.path.join(str(cwd or os.path.dirname(str(out))), "strace.log")
    cmd = ["strace", "-f", "-qq", "-o", log]
    syscalls = sorted({i.split(":")[0].split("=")[1] for i in inject} | set(trace or ()))
    cmd += ["-e", "trace=" + ",".join(syscalls)]
    for i in inject:
        cmd += ["-e", i]
    cmd += [sys.executable, "-m", "fastmerge", "merge", str(cfg), str(out), "--no-progress",
            "--device", "cpu", *args]
    # never the checkout as the working directory: `python -m` would import its fastmerge (no
    # native module in CI, where the installed package has it) ahead of PYTHONPATH
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240,
                       cwd=cwd or os.path.dirname(str(out)))
    with open(log) as f:
        text = f.read()
    os.remove(log)
    return r.returncode, r.stderr, text


@needs_strace
def test_sigterm_is_handled_like_sigint(setup):
    """SIGTERM mid-merge (delivered at the 3rd pwrite64): one line, exit 143, the temporary
    folder removed, an existing OUT untouched. The old code died and left the full-size
    temporary folder next to OUT."""
    tmp, cfg, base, ms = setup
    out = tmp / "out"
    os.makedirs(out)
    (out / "keep.txt").write_text("old")
    rc, err, _ = _fm(cfg, out, "--overwrite", inject=["inject=pwrite64:signal=SIGTERM:when=3"])
    assert rc == 143, err
    assert "Traceback" not in err and "interrupted by SIGTERM" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp)) == ["cfg", "models", "out"]
    assert os.listdir(out) == ["keep.txt"]


@needs_strace
def test_a_sigkill_leftover_is_named_by_the_next_run_not_deleted(setup, capsys):
    """SIGKILL mid-merge leaves the temporary folder (nothing can catch it); the next run to the
    same OUT names it, leaves it, and merges. The old code silently deleted it, or any folder
    of that name."""
    tmp, cfg, base, ms = setup
    out = tmp / "out"
    rc, err, _ = _fm(cfg, out, inject=["inject=pwrite64:signal=SIGKILL:when=3"])
    assert rc in (-9, 137), err
    left = leftovers(tmp)
    assert len(left) == 1 and not out.exists(), left
    assert merge(cfg, out) == 0
    err = capsys.readouterr().err
    assert left[0] in err and "not deleted" in err, err
    assert leftovers(tmp) == left and (out / "model.safetensors").is_file()


@needs_strace
def test_kill_between_the_fallback_renames_is_recoverable(setup, capsys):
    """Without renameat2 (ENOSYS injected) --overwrite takes two renames; SIGKILL at the second
    leaves no OUT, but the previous OUT and the finished merge both complete under names the
    next run reports. (Before, the previous OUT lay at an unnamed `-old` path and the finished
    merge was deleted by the next run.)"""
    tmp, cfg, base, ms = setup
    out = tmp / "out"
    os.makedirs(out)
    (out / "keep.txt").write_text("old")
    rc, err, log = _fm(cfg, out, "--overwrite", inject=["inject=renameat2:error=ENOSYS",
                                                       "inject=rename:signal=SIGKILL:when=2"])
    assert rc in (-9, 137), err
    assert not out.exists()
    old = [f for f in leftovers(tmp) if "-old-" in f]
    new = [f for f in leftovers(tmp) if "-tmp-" in f]
    assert len(old) == 1 and len(new) == 1, leftovers(tmp)
    assert os.listdir(tmp / old[0]) == ["keep.txt"]
    assert merge(cfg, tmp / "fresh") == 0
    fresh, done = load_file(str(tmp / "fresh" / "model.safetensors")), load_file(str(tmp / new[0] / "model.safetensors"))
    assert fresh.keys() == done.keys() and all(torch.equal(fresh[n], done[n]) for n in fresh)
    capsys.readouterr()
    assert merge(cfg, out) == 0
    err = capsys.readouterr().err
    assert old[0] in err and new[0] in err and "killed between its two renames" in err, err
    assert (tmp / old[0] / "keep.txt").read_text() == "old" and (tmp / new[0]).is_dir()


@needs_strace
def test_overwrite_is_one_renameat2_exchange_and_a_kill_after_it_leaves_the_new_out(setup, capsys):
    """The swap is a single renameat2(RENAME_EXCHANGE) (strace shows it); SIGKILL right after
    it (at the first unlinkat, deleting the previous OUT) leaves the NEW OUT in place and the
    previous one under a temporary name, which the next run names."""
    tmp, cfg, base, ms = setup
    out = tmp / "out"
    os.makedirs(out)
    (out / "keep.txt").write_text("old")
    rc, err, log = _fm(cfg, out, "--overwrite", inject=["inject=unlinkat:signal=SIGKILL:when=1"],
                       trace=["renameat2", "rename"])
    assert rc in (-9, 137), err
    swaps = [line for line in log.splitlines() if "RENAME_EXCHANGE" in line]
    assert len(swaps) == 1 and swaps[0].rstrip().endswith("= 0"), log
    assert "rename(" not in log, log
    assert (out / "model.safetensors").is_file() and "keep.txt" not in os.listdir(out)
    left = leftovers(tmp)
    assert len(left) == 1 and (tmp / left[0] / "keep.txt").read_text() == "old"
    assert merge(cfg, tmp / "again") == 0
    assert merge(cfg, out, "--overwrite") == 0
    assert left[0] in capsys.readouterr().err and leftovers(tmp) == left


# ------------------------------------------------------------- confined, validated input

def _index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _shard(folder, name, data):
    save_file(data, str(folder / name), metadata={"format": "pt"})


def _split(folder, data, first):
    """``data`` in two shards (the names in ``first`` go to the first) without an index."""
    if (folder / "model.safetensors").exists():
        os.remove(folder / "model.safetensors")
    _shard(folder, "model-00001-of-00002.safetensors", {n: t for n, t in data.items() if n in first})
    _shard(folder, "model-00002-of-00002.safetensors", {n: t for n, t in data.items() if n not in first})


@pytest.mark.parametrize("path", ["../outside/model.safetensors", "ABSOLUTE"])
def test_index_paths_stay_inside_the_model_folder(setup, capsys, path):
    """An index naming `../x` or `/abs/x` was followed (and a valid file there merged)."""
    tmp, cfg, base, ms = setup
    outside = make_model(tmp / "outside", 7)
    m = ms[0]
    data = load_file(str(m / "model.safetensors"))
    os.remove(m / "model.safetensors")
    _shard(m, "model-00001-of-00002.safetensors", {n: data[n] for n in list(data)[:2]})
    target = str(outside / "model.safetensors") if path == "ABSOLUTE" else path
    _index(m, {**{n: "model-00001-of-00002.safetensors" for n in list(data)[:2]},
               **{n: target for n in list(data)[2:]}})
    expect_error(capsys, cfg, tmp / "out", needles=["models[0]", "not a file name inside"])
    assert not (tmp / "out").exists()


def test_symlinks_out_of_a_model_folder_are_refused(setup, capsys):
    """A weights file or a copied config that is a symlink to a file outside the model folder
    was read (and config.json/tokenizer files copied into OUT). Now an error, nothing copied."""
    tmp, cfg, base, ms = setup
    secret = tmp / "secret"
    make_model(secret, 9)
    m = ms[1]
    os.remove(m / "model.safetensors")
    os.symlink(secret / "model.safetensors", m / "model.safetensors")
    expect_error(capsys, cfg, tmp / "out", needles=["outside", "model.safetensors"])
    os.remove(m / "model.safetensors")
    shutil.copy(secret / "model.safetensors", m / "model.safetensors")
    (tmp / "passwords.txt").write_text("hunter2")
    os.remove(base / "config.json")
    os.symlink(tmp / "passwords.txt", base / "config.json")
    err = expect_error(capsys, cfg, tmp / "out", needles=["config.json", "outside"])
    assert "hunter2" not in err and not (tmp / "out").exists() and leftovers(tmp) == []


def test_a_hugging_face_cache_snapshot_still_reads(setup):
    """The confinement keeps the one layout where links leave the folder by design: a cache
    snapshot's files link into the repository's own blobs/ folder. The merge is the same as
    from a plain folder; a link from the snapshot anywhere else is refused."""
    tmp, cfg, base, ms = setup
    assert merge(cfg, tmp / "plain") == 0
    repo = tmp / "hub" / "models--org--m1"
    snap = repo / "snapshots" / "0123abcd"
    os.makedirs(repo / "blobs")
    os.makedirs(snap)
    for f in ("model.safetensors", "config.json"):
        shutil.move(ms[1] / f, repo / "blobs" / f"sha-{f}")
        os.symlink(os.path.join("..", "..", "blobs", f"sha-{f}"), snap / f)
    hub_cfg = make_config(tmp / "cfg" / "hub.yml", base, [ms[0], snap])
    assert merge(hub_cfg, tmp / "hub-out") == 0
    a, b = load_file(str(tmp / "plain" / "model.safetensors")), load_file(str(tmp / "hub-out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    os.remove(snap / "model.safetensors")
    os.symlink(tmp / "plain" / "model.safetensors", snap / "model.safetensors")
    assert merge(hub_cfg, tmp / "hub-out2") == 1 and not (tmp / "hub-out2").exists()


def _raw_file(path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _with_header(m, change):
    """Rewrite m's model.safetensors with ``change(header)`` applied to its real header."""
    raw = (m / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    data = change(header, data) or data
    _raw_file(m / "model.safetensors", header, data)


def _negative_offsets(h, data):
    """Point a tensor at bytes before its own start (the old reader accepted negative begin
    offsets and merged the JSON header as weights)."""
    e = h["model.norm.weight"]["data_offsets"]
    h["model.norm.weight"]["data_offsets"] = [e[0] - 100, e[1] - 100]


def _overlap(h, data):
    a, b = h["model.layers.0.mlp.up_proj.weight"], h["model.layers.1.mlp.up_proj.weight"]
    b["data_offsets"] = list(a["data_offsets"])


def _float_shape(h, data):
    h["model.norm.weight"]["shape"] = [8.0]


@pytest.mark.parametrize("change,needle", [
    (_negative_offsets, "not contiguous"), (_overlap, "not contiguous"), (_float_shape, "non-negative integers"),
])
def test_invalid_headers_are_refused_not_merged(setup, capsys, change, needle):
    """Headers the safetensors package rejects: the old reader merged them (rc 0)."""
    tmp, cfg, base, ms = setup
    _with_header(ms[0], change)
    expect_error(capsys, cfg, tmp / "out", needles=["models[0]", str(ms[0] / "model.safetensors"), needle])
    assert not (tmp / "out").exists() and leftovers(tmp) == []


@pytest.mark.parametrize("case", ["truncated", "past_end", "not_object", "length_too_big", "secret_bytes"])
def test_broken_weight_files_give_one_line_errors(setup, capsys, case):
    """Truncated files, offsets past the end and malformed headers ended in tracebacks, and the
    first 8 bytes of a file that is not safetensors were printed as an integer."""
    tmp, cfg, base, ms = setup
    f = ms[1] / "model.safetensors"
    raw = f.read_bytes()
    if case == "truncated":
        f.write_bytes(raw[:-10])
    elif case == "past_end":
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        header["lm_head.weight"]["data_offsets"][1] += 4096
        header["lm_head.weight"]["shape"] = [16 + 128, 8]
        _raw_file(f, header, raw[8 + n:])
    elif case == "not_object":
        f.write_bytes(struct.pack("<Q", 2) + b"[]")
    elif case == "length_too_big":
        f.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    else:
        f.write_bytes(b"SECRETPW and the rest of a private file\n")
    err = expect_error(capsys, cfg, tmp / "out", needles=["models[1]", str(f)])
    first8 = int.from_bytes(f.read_bytes()[:8], "little")
    assert (first8 < 10**6 or str(first8) not in err) and "SECRET" not in err, err
    assert not (tmp / "out").exists() and leftovers(tmp) == []


@pytest.mark.parametrize("index", ['{"weight_map": ', '[]', '{"weight_map": []}', '{"metadata": {}}',
                                   '{"weight_map": {"a": 1}}', "\xff\xfe"])
def test_malformed_index_files_give_one_line_errors(setup, capsys, index):
    """Not JSON, no weight_map, a weight_map of the wrong shape, a name mapped twice: the old
    code raised KeyError/TypeError tracebacks (or silently kept the last mapping)."""
    tmp, cfg, base, ms = setup
    (ms[0] / "model.safetensors.index.json").write_bytes(index.encode("utf-8", "surrogateescape")
                                                        if index != "\xff\xfe" else b"\xff\xfe")
    expect_error(capsys, cfg, tmp / "out", needles=["models[0]", "model.safetensors.index.json"])


# ------------------------------------------------------------------ nothing silently wrong

def test_a_tensor_the_base_lacks_is_an_error_unless_dropped_as_mergekit_does(setup, capsys):
    """A tensor in the models but not in the base was dropped from OUT with rc 0. Now an error
    naming it; --drop-extra-tensors keeps mergekit's behaviour (mergekit writes the base
    architecture's weights only), with a warning."""
    tmp, cfg, base, ms = setup
    for m in ms:
        data = load_file(str(m / "model.safetensors"))
        data["extra.bias"] = torch.ones(4)
        save_file(data, str(m / "model.safetensors"), metadata={"format": "pt"})
    expect_error(capsys, cfg, tmp / "out", needles=["models[0]", "extra.bias", "--drop-extra-tensors"])
    assert merge(cfg, tmp / "out", "--drop-extra-tensors") == 0
    assert "extra.bias" in capsys.readouterr().err
    assert "extra.bias" not in load_file(str(tmp / "out" / "model.safetensors"))


def test_a_tensor_in_two_shards_is_an_error(setup, capsys):
    """Without an index, two shards holding the same name were resolved by file order."""
    tmp, cfg, base, ms = setup
    data = load_file(str(ms[0] / "model.safetensors"))
    _split(ms[0], data, first=["model.norm.weight", "lm_head.weight"])
    _shard(ms[0], "model-00001-of-00002.safetensors",
           {"model.norm.weight": data["model.norm.weight"], "lm_head.weight": data["lm_head.weight"],
            "model.embed_tokens.weight": torch.zeros(16, 8)})
    expect_error(capsys, cfg, tmp / "out", needles=["model.embed_tokens.weight", "in both"])


def test_an_index_mapping_a_name_twice_is_an_error(setup, capsys):
    """json.load kept the last of two mappings of one tensor name, and the merge went on."""
    tmp, cfg, base, ms = setup
    m = ms[0]
    data = load_file(str(m / "model.safetensors"))
    first = ["model.norm.weight", "lm_head.weight"]
    _split(m, data, first)
    pairs = [f'"{n}": "model-0000{1 if n in first else 2}-of-00002.safetensors"' for n in data]
    pairs.append('"model.norm.weight": "model-00002-of-00002.safetensors"')
    (m / "model.safetensors.index.json").write_text('{"weight_map": {' + ", ".join(pairs) + "}}")
    expect_error(capsys, cfg, tmp / "out", needles=["model.safetensors.index.json", "model.norm.weight", "twice"])


def test_an_index_that_disagrees_with_its_shards_is_an_error_unless_trusted(setup, capsys):
    """With an index, a copy of a tensor in another shard won by file order, whatever the index
    said. Now an error; --trust-index reads it from the shard the index names (mergekit's
    reading), and a shard's tensor the index does not list is an error unless trusted."""
    tmp, cfg, base, ms = setup
    m = ms[0]
    data = load_file(str(m / "model.safetensors"))
    first = ["model.norm.weight", "lm_head.weight"]
    _split(m, data, first)
    stale = dict({n: data[n] for n in first}, **{"model.embed_tokens.weight": torch.full((16, 8), 1e3)})
    _shard(m, "model-00001-of-00002.safetensors", stale)  # a stale copy, listed first
    _index(m, {n: "model-00001-of-00002.safetensors" if n in first else "model-00002-of-00002.safetensors"
               for n in data})
    expect_error(capsys, cfg, tmp / "out", needles=["model.embed_tokens.weight", "--trust-index"])
    assert merge(cfg, tmp / "trusted", "--trust-index") == 0
    _split(m, data, first)  # the same weights without the stale copy: the same merge
    os.remove(m / "model.safetensors.index.json")
    assert merge(cfg, tmp / "clean") == 0
    a, b = load_file(str(tmp / "trusted" / "model.safetensors")), load_file(str(tmp / "clean" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # a shard holding a tensor the index does not list
    _shard(m, "model-00001-of-00002.safetensors", dict({n: data[n] for n in first}, unlisted=torch.ones(2)))
    _index(m, {n: "model-00001-of-00002.safetensors" if n in first else "model-00002-of-00002.safetensors"
               for n in data})
    expect_error(capsys, cfg, tmp / "out", needles=["unlisted", "does not list"])
    assert merge(cfg, tmp / "trusted2", "--trust-index") == 0
    # and an index mapping a tensor to a shard that lacks it, trusted or not
    _index(m, dict({n: "model-00002-of-00002.safetensors" for n in data}))
    expect_error(capsys, cfg, tmp / "out", "--trust-index", needles=["does not hold it"])


# --------------------------------------------------------------------------- CLI errors

def _read_only_parent(tmp):
    """A folder this process cannot create entries in: chmod 555 for a normal user; for root
    (which ignores modes) a folder under /sys, which refuses mkdir to root too."""
    if os.geteuid() != 0:
        ro = tmp / "ro"
        os.makedirs(ro)
        os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)
        return ro / "out", "cannot write in"
    return "/sys/fastmerge-test/out", "cannot create OUT's folder /sys/fastmerge-test"


@pytest.mark.parametrize("case", ["device_tpu", "backend_triton_cpu", "backend_cuda_cpu", "env_backend",
                                  "shard_inf", "shard_nan", "out_parent_file", "out_read_only",
                                  "out_under_proc", "config_binary", "config_yaml"])
def test_cli_user_errors_are_one_line(setup, capsys, monkeypatch, case):
    """Each of these ended in a traceback (or, for YAML, a multi-line quote of the config)."""
    tmp, cfg, base, ms = setup
    out, args, needles, rc = tmp / "out", [], [], 1
    if case == "device_tpu":
        args, needles = ["--device", "tpu"], ["--device tpu"]
    elif case in ("backend_triton_cpu", "backend_cuda_cpu"):
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest runs Triton interpreted
        name = case.split("_")[1]
        args, needles = ["--backend", name], [f"--backend {name}", "not available"]
    elif case == "env_backend":
        monkeypatch.setenv("FASTMERGE_BACKEND", "tpu")
        needles = ["FASTMERGE_BACKEND=tpu"]
    elif case in ("shard_inf", "shard_nan"):
        args, needles, rc = ["--max-shard-size", case[6:]], ["argument --max-shard-size"], 2
    elif case == "out_parent_file":
        (tmp / "afile").write_text("x")
        out, needles = tmp / "afile" / "out", ["is not a folder", tmp / "afile"]
    elif case == "out_read_only":
        out, need = _read_only_parent(tmp)
        needles = [need]
    elif case == "out_under_proc":
        out, needles = "/proc/fastmerge-test/out", ["/proc/fastmerge-test"]
    elif case == "config_binary":
        cfg = tmp / "cfg" / "bin.yml"
        cfg.write_bytes(b"\xff\xfe\x00binary")
        needles = ["bin.yml", "not UTF-8"]
    elif case == "config_yaml":
        cfg = tmp / "cfg" / "bad.yml"
        cfg.write_text("merge_method: [ties\nmodels:\n  - a\n")
        needles = ["bad.yml", "not valid YAML", "line"]
    expect_error(capsys, cfg, out, *args, needles=needles, rc=rc)
    assert leftovers(tmp) == [] and not (tmp / "out").exists()


def test_debug_shows_the_traceback(setup, capsys):
    tmp, cfg, base, ms = setup
    assert merge(cfg, tmp / "out", "--device", "tpu", "--debug") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "MergeError" in err and err.strip().endswith("use auto, cpu or cuda[:N]")
