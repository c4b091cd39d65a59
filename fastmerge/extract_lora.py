"""``fastmerge extract-lora BASE FINETUNED OUT --rank R``: a PEFT LoRA adapter from a full
fine-tune, streaming.

Per 2-D linear module ``M`` (``M.weight`` of shape ``(out, in)``), the delta
``ΔW = W_finetuned − W_base`` is replaced by its top singular directions
(:func:`fastmerge.lowrank.extract_lora`: the randomized SVD, or the full SVD with ``--exact``),
written as PEFT writes a LoRA adapter: ``base_model.model.M.lora_A.weight`` (``r × in``) and
``base_model.model.M.lora_B.weight`` (``out × r``) with ``lora_alpha = r`` (scaling 1), so
``PeftModel.from_pretrained(base, OUT)`` computes with ``W_base + B A``. What mergekit's
``mergekit-extract-lora`` (0.1.5) does with the rest, this does too:

* a linear module's bias delta goes to ``lora_B.bias`` (and ``lora_bias: true``; then the
  linear modules without a bias get a zero ``lora_B.bias``, every key PEFT expects);
* embeddings and the output embedding (``lm_head``) are saved whole in ``modules_to_save``,
  unless ``--embed-lora``: then an embedding gets ``lora_embedding_A`` (``r × vocab``) and
  ``lora_embedding_B`` (``dim × r``) from the SVD of ``ΔWᵀ``, and ``lm_head`` is a linear one;
* every other module with weights (norms, convolutions, GPT-2's Conv1D) is saved whole in
  ``modules_to_save`` under its last name component, as are the modules ``--save-module`` names.

BASE and FINETUNED are local folders or hub ids, resolved as ``fastmerge merge`` resolves its
models (:mod:`fastmerge.hub`). Which module is a Linear or an Embedding is read from the model's class on the meta device
(``config.json``'s ``architectures``, as mergekit does) when transformers has it, else from the
tensor names and shapes (2-D ``*.weight``; embeddings by name).

The pass reuses ``fastmerge merge``'s machinery (:mod:`fastmerge.streaming`): tensors are read
one module at a time from the mapped files (pages dropped after each module, so the resident set
stays at one module's delta, its SVD workspace and the factors so far), a progress bar, OUT
written to a hidden folder that replaces OUT in one atomic step (never a folder of the user's
unless ``--overwrite``), and ``torchrun --nproc-per-node=N -m fastmerge extract-lora ...``
splits the modules across processes (each writes its factors into the one shared file). The
factors are kept in memory until the pass ends, because with ``--rank-fraction`` their shapes
(the file's header) are known only then: that is the adapter's size, not the model's.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from . import hub, lowrank
from .safetensors_io import Checkpoint, FormatError, Layout, Spec, Writer, plan_layout
from .streaming import (Group, Merger, MergeError, Signals, _device, _Progress, assign, check_out,
                        tensor_seed)

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
# embedding modules by name, where the model class is not known (no config.json/transformers)
EMBED_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "tok_embeddings",
               "embed_positions", "position_embeddings", "token_type_embeddings", "shared")
OUTPUT_NAMES = ("lm_head", "embed_out")
# model types whose every 2-D *.weight is an nn.Linear but embed_tokens (nn.Embedding) and
# lm_head (the output embedding): classified by name, without transformers
BY_NAME = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
           "gemma2", "phi3", "olmo", "olmo2", "granite")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ExtractOptions:
    rank: Optional[int] = None  # the largest rank (default: min(out, in), with rank_fraction)
    rank_fraction: Optional[float] = None  # per-module rank by explained energy
    sv_epsilon: float = 0.0
    exact: bool = False
    distribute_scale: bool = True
    embed_lora: bool = False
    save_modules: Tuple[str, ...] = ()
    include: Tuple[str, ...] = ()  # regexes: only modules matching one are extracted
    exclude: Tuple[str, ...] = ()
    dtype: Optional[str] = None  # the factors' dtype (default: the fine-tune's)
    device: str = "auto"
    seed: int = 0
    oversample: Optional[int] = None
    n_iter: Optional[int] = None
    overwrite: bool = False
    progress: bool = True
    trust_index: bool = False


@dataclass
class Module:
    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    kind: str  # lora | embedding (lora_embedding, transposed) | save
    tensors: List[str]  # checkpoint tensors it reads (weight first)
    in_bytes: int = 0
    shape: tuple = ()
    bias: Optional[str] = None  # lora: the bias tensor whose delta goes to lora_B.bias
    zero_bias: bool = False  # lora without a bias where others have one: lora_B.bias = 0
    out: Dict[str, torch.Tensor] = field(default_factory=dict)  # output name -> tensor
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ plan

def _model_type(folder: str) -> Optional[str]:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            t = json.load(fh).get("model_type")
        return t if isinstance(t, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def _class_kinds(folder: str) -> Optional[Dict[str, str]]:
    """``module name -> linear | embedding | output | other`` from the model class on the meta
    device, or None where transformers or the class is not available. For the architectures of
    :data:`BY_NAME` the names say it exactly, and importing transformers' model code (half a
    minute on a loaded 2-core machine) is skipped: ``{}``."""
    conf = os.path.join(folder, "config.json")
    if not os.path.isfile(conf):
        return None
    if _model_type(folder) in BY_NAME:
        return {}
    try:
        import transformers
        from torch import nn

        cfg = transformers.AutoConfig.from_pretrained(folder)
        cls = getattr(transformers, (cfg.architectures or [""])[0], None)
        if cls is None:
            return None
        with torch.device("meta"):
            model = cls(cfg)
    except Exception:  # noqa: BLE001 - any failure here means: classify by names instead
        return None
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    kinds = {}
    for name, mod in model.named_modules():
        if mod is emb_out and not isinstance(mod, nn.Embedding):
            kinds[name] = "output"
        elif isinstance(mod, nn.Embedding) or mod is emb_in:
            kinds[name] = "embedding"
        elif isinstance(mod, nn.Linear):
            kinds[name] = "linear"
        else:
            kinds[name] = "other"
    return kinds


def _name_kind(module: str, ck: Checkpoint) -> str:
    e = ck.entries.get(module + ".weight")
    last = module.split(".")[-1]
    if e is None or len(e.shape) != 2:
        return "other"
    if last in EMBED_NAMES:
        return "embedding"
    return "output" if last in OUTPUT_NAMES else "linear"


def _modules(ck: Checkpoint) -> Dict[str, List[str]]:
    """Module path -> its tensors (``weight`` first), in checkpoint order."""
    mods: Dict[str, List[str]] = {}
    for t in ck.names():
        mod, _, leaf = t.rpartition(".")
        mods.setdefault(mod, [])
        mods[mod].insert(0, t) if leaf == "weight" else mods[mod].append(t)
    return mods


def plan(base: Checkpoint, ft: Checkpoint, opts: ExtractOptions, warn) -> List[Module]:
    kinds = _class_kinds(ft.folder)
    if kinds is None:
        warn("the model class is not known (no config.json with transformers' architectures); "
             "2-D *.weight tensors are taken as Linear layers, embeddings by name")
    save = set(opts.save_modules)
    jobs: List[Module] = []
    unknown = []
    for mod, tensors in _modules(ft).items():
        weight = mod + ".weight"
        kind = (kinds.get(mod) if kinds else None) or _name_kind(mod, ft)
        if kinds and mod not in kinds:
            unknown.append(mod)
        last = mod.split(".")[-1]
        excluded = any(re.search(r, mod) for r in opts.exclude)
        included = not opts.include or any(re.search(r, mod) for r in opts.include)
        if weight not in ft.entries:
            kind = "other"
        nbytes = sum(ft.entries[t].nbytes for t in tensors)
        if mod in save or last in save or (kind in ("embedding", "output") and not opts.embed_lora
                                           and not excluded):
            jobs.append(Module(mod, "save", tensors, nbytes))
            continue
        if excluded or not included:
            continue
        if kind == "other" or len(ft.entries[weight].shape) != 2:
            jobs.append(Module(mod, "save", tensors, nbytes))
            continue
        reads = [weight] + ([mod + ".bias"] if mod + ".bias" in ft.entries else [])
        for t in reads:
            if t not in base.entries:
                raise MergeError(f"BASE ({base.folder}) lacks tensor {t}, which FINETUNED has")
            if base.entries[t].shape != ft.entries[t].shape:
                raise MergeError(f"shape mismatch for tensor {t}: BASE has {list(base.entries[t].shape)}, "
                                 f"FINETUNED has {list(ft.entries[t].shape)}")
        for t in reads:
            if not ft.entries[t].dtype.is_floating_point:
                raise MergeError(f"tensor {t} is {ft.entries[t].dtype}: cannot extract a LoRA from it")
        job = Module(mod, "embedding" if kind == "embedding" else "lora", reads,
                     2 * sum(ft.entries[t].nbytes for t in reads), tuple(ft.entries[weight].shape))
        job.bias = reads[1] if len(reads) > 1 else None
        jobs.append(job)
    # PEFT's lora_bias gives every adapted Linear a lora_B bias: zeros where the layer has none,
    # written out so that PEFT finds every key it expects
    if any(j.bias is not None for j in jobs if j.kind == "lora"):
        for j in jobs:
            j.zero_bias = j.kind == "lora" and j.bias is None
    if unknown:
        warn(f"{len(unknown)} module(s) the model class lacks, classified by shape: "
             f"{', '.join(unknown[:3])}")
    if not any(j.kind != "save" for j in jobs):
        raise MergeError("no 2-D linear module to extract a LoRA from (check --include-regex, "
                         "--exclude-regex and --save-module)")
    return jobs


# ------------------------------------------------------------------------------- run

def _local(ref: str, role: str) -> str:
    """A local folder, or a hub id (``org/name[@revision]``) resolved through the hub cache
    as ``fastmerge merge`` resolves its models (:func:`fastmerge.hub.local_path`)."""
    try:
        return hub.local_path(ref, role)
    except hub.HubError as exc:
        raise MergeError(str(exc)) from None


def _open(path: str, role: str, trust_index: bool) -> Checkpoint:
    try:
        return Checkpoint(path, trust_index=trust_index)
    except FileNotFoundError:
        raise MergeError(f"{role} not found: {path}") from None
    except NotADirectoryError:
        raise MergeError(f"{role} {path} is not a folder") from None
    except FormatError as exc:
        raise MergeError(f"{role}: {exc}") from None


def _check(opts: ExtractOptions) -> None:
    if opts.rank is None and opts.rank_fraction is None:
        raise MergeError("--rank: give the LoRA rank (or --rank-fraction)")
    if opts.rank is not None and (isinstance(opts.rank, bool) or not isinstance(opts.rank, int) or opts.rank < 1):
        raise MergeError(f"--rank {opts.rank}: must be an integer >= 1")
    f = opts.rank_fraction
    if f is not None and not (isinstance(f, (int, float)) and 0 < f <= 1):
        raise MergeError(f"--rank-fraction {f}: must be in (0, 1]")
    if not (isinstance(opts.sv_epsilon, (int, float)) and math.isfinite(opts.sv_epsilon) and opts.sv_epsilon >= 0):
        raise MergeError(f"--sv-epsilon {opts.sv_epsilon}: must be >= 0")
    if opts.dtype is not None and opts.dtype not in _DTYPES:
        raise MergeError(f"--dtype {opts.dtype}: use float32, float16 or bfloat16")
    for flag, regexes in (("--include-regex", opts.include), ("--exclude-regex", opts.exclude)):
        for r in regexes:
            try:
                re.compile(r)
            except re.error as exc:
                raise MergeError(f"{flag} {r!r}: {exc}") from None


class Extractor(Merger):
    """One extraction run; the output folder's life (temporary folder, disk check, atomic commit,
    clean-up, signals, torchrun vote) is :class:`fastmerge.streaming.Merger`'s."""

    def __init__(self, base: str, finetuned: str, out: str, options: ExtractOptions):
        _check(options)
        self.options = options
        self.base_path = _local(base, "BASE")
        self.ft_path = _local(finetuned, "FINETUNED")
        self.base_ref = base  # as given: adapter_config.json's base_model_name_or_path
        self.tmp: Optional[str] = None
        self.tmp_created = False
        self.committed = False
        self.made_parents: List[str] = []
        self.signals = Signals()
        self.out = check_out(out, [("BASE", self.base_path), ("FINETUNED", self.ft_path)],
                             [("the working directory", os.getcwd())])
        self.device = _device(options.device)
        self.dtype = _DTYPES.get(options.dtype)
        self.group = Group(self.device)

    def _warn(self, message: str) -> None:
        if self.group.rank == 0:
            print(f"fastmerge extract-lora: warning: {message}", file=sys.stderr)

    def _setup(self) -> None:
        trust = self.options.trust_index
        self.pool = []
        self.base = _open(self.base_path, "BASE", trust)
        self.pool.append(self.base)
        ft = _open(self.ft_path, "FINETUNED", trust)
        self.inputs = [ft]
        self.pool = [self.base, ft]  # closed by Merger._cleanup
        self.jobs = plan(self.base, ft, self.options, self._warn)
        owner = assign(self.jobs, self.group.world)
        self.mine = [i for i, r in enumerate(owner) if r == self.group.rank]
        if os.path.lexists(self.out) and not self.options.overwrite and not _empty(self.out):
            kind = ("a symlink" if os.path.islink(self.out) else
                    "not empty" if os.path.isdir(self.out) else "a file")
            raise MergeError(f"OUT {self.out} exists and is {kind}; pass --overwrite to replace "
                             "it (it is replaced only once the new adapter is complete)")

    # ---- the streaming pass: factors of this process's modules
    def _extract_all(self) -> None:
        bar = _Progress(len(self.mine), self.options.progress and self.group.rank == 0)
        if bar.bar is not None:
            bar.bar.set_description("extracting")
        ft, base = self.inputs[0], self.base
        try:
            for pos, i in enumerate(self.mine):
                for j in self.mine[pos + 1:pos + 2]:  # the next module's bytes, read ahead
                    for t in self.jobs[j].tensors:
                        ft.prefetch(t)
                        if self.jobs[j].kind != "save":
                            base.prefetch(t)
                self._one(self.jobs[i])
                bar.step(self.jobs[i].in_bytes)
        finally:
            bar.close()

    def _load(self, ck: Checkpoint, name: str) -> torch.Tensor:
        t = ck.tensor(name)
        return t.to(self.device) if self.device.type != "cpu" else t

    def _one(self, job: Module) -> None:
        ft, base, o = self.inputs[0], self.base, self.options
        if job.kind == "save":
            return  # copied from the mapped file when the adapter is written
        w = job.tensors[0]
        b0, f0 = self._load(base, w), self._load(ft, w)
        if job.kind == "embedding":  # PEFT's lora_embedding: ΔWᵀ = B A, B (dim × r), A (r × vocab)
            b0, f0 = b0.T, f0.T
        try:
            b, a, info = lowrank.extract_lora(
                b0, f0, o.rank, rank_fraction=o.rank_fraction, sv_epsilon=o.sv_epsilon, exact=o.exact,
                distribute_scale=o.distribute_scale, out_dtype=self.dtype or f0.dtype,
                oversample=o.oversample, n_iter=o.n_iter, seed=tensor_seed(o.seed, w), return_info=True)
        except (ValueError, TypeError) as exc:
            raise MergeError(f"tensor {w}: {exc}") from None
        del b0, f0
        base.release(w)
        ft.release(w)
        stem = PREFIX + job.name + (".lora_embedding_" if job.kind == "embedding" else ".lora_")
        suffix = "" if job.kind == "embedding" else ".weight"
        job.out = {f"{stem}A{suffix}": a.cpu(), f"{stem}B{suffix}": b.cpu()}
        if job.bias is not None:
            db = self._load(ft, job.bias).float() - self._load(base, job.bias).float()
            job.out[f"{stem}B.bias"] = db.to(self.dtype or ft.entries[job.bias].dtype).cpu()
        if job.zero_bias:
            job.out[f"{stem}B.bias"] = torch.zeros(job.shape[0], dtype=self.dtype or ft.entries[w].dtype)
        job.info = info

    # ---- the adapter file: every process learns every rank, rank 0 lays out the file
    def _ranks(self) -> None:
        r = torch.zeros(len(self.jobs), dtype=torch.int64)
        for i in self.mine:
            if self.jobs[i].kind != "save":
                r[i] = self.jobs[i].info["rank"]
        self.ranks = self.group.sum_(r).tolist()
        ft = self.inputs[0]
        specs = []
        dt = self.dtype
        for job, rank in zip(self.jobs, self.ranks):
            if job.kind == "save":
                specs += [Spec(PREFIX + t, ft.entries[t].dtype, tuple(ft.entries[t].shape)) for t in job.tensors]
                continue
            m, n = job.shape if job.kind == "lora" else job.shape[::-1]
            wdt = dt or ft.entries[job.tensors[0]].dtype
            stem = PREFIX + job.name + (".lora_embedding_" if job.kind == "embedding" else ".lora_")
            suffix = "" if job.kind == "embedding" else ".weight"
            specs += [Spec(f"{stem}A{suffix}", wdt, (rank, n)), Spec(f"{stem}B{suffix}", wdt, (m, rank))]
            if job.bias is not None or job.zero_bias:
                specs.append(Spec(f"{stem}B.bias", dt or ft.entries[job.bias or job.tensors[0]].dtype, (m,)))
        one = plan_layout(specs, 1 << 62)
        self.layout = Layout([(ADAPTER_FILE,) + tuple(one.files[0][1:])], one.place)

    def _write_all(self) -> None:
        ft, writer = self.inputs[0], Writer(self.tmp, self.layout)
        ok = False
        try:
            for i in self.mine:
                job = self.jobs[i]
                if job.kind == "save":
                    for t in job.tensors:
                        writer.write(PREFIX + t, ft.tensor(t))
                        ft.release(t)
                for name, t in job.out.items():
                    writer.write(name, t)
                job.out = {}
            ok = True
        finally:
            writer.close(sync=ok)

    def adapter_config(self) -> dict:
        """PEFT's LoraConfig as mergekit-extract-lora writes it: ``lora_alpha = r`` (scaling 1),
        per-module ranks other than the largest in ``rank_pattern``/``alpha_pattern``."""
        ranks = {j.name: r for j, r in zip(self.jobs, self.ranks) if j.kind != "save"}
        r_max = max(ranks.values())
        other = {k: v for k, v in ranks.items() if v != r_max}
        save = sorted({j.name.split(".")[-1] for j in self.jobs if j.kind == "save"})
        # target_modules by last name component when that picks exactly the extracted modules
        # (PEFT matches a list entry as the whole name or a ".suffix"), else by full name
        names = {m for j in self.jobs for t in j.tensors for m in [t.rpartition(".")[0]]}
        names |= set(_modules(self.inputs[0]))
        lasts = {k.split(".")[-1] for k in ranks}
        picked = {m for m in names if m.split(".")[-1] in lasts}
        targets = sorted(lasts) if picked == set(ranks) else sorted(ranks)
        task = None
        conf = os.path.join(self.ft_path, "config.json")
        try:
            with open(conf, encoding="utf-8") as fh:
                arch = (json.load(fh).get("architectures") or [""])[0]
            task = "CAUSAL_LM" if arch.endswith("ForCausalLM") else None
        except (OSError, ValueError, AttributeError):
            pass
        return {"base_model_name_or_path": self.base_ref, "peft_type": "LORA", "task_type": task,
                "r": r_max, "lora_alpha": r_max, "rank_pattern": other, "alpha_pattern": other,
                "target_modules": targets, "modules_to_save": save or None, "use_rslora": False,
                "lora_dropout": 0.0, "bias": "none",
                "lora_bias": any(j.bias is not None for j in self.jobs if j.kind != "save"),
                "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True}

    def _finish(self) -> None:
        with open(os.path.join(self.tmp, CONFIG_FILE), "w") as fh:
            json.dump(self.adapter_config(), fh, indent=2, sort_keys=True)
            fh.write("\n")
        with self.signals.deferred():
            self._commit()

    def _steps(self) -> None:
        self._step(self._setup)
        token = torch.tensor([int.from_bytes(os.urandom(7), "little") if self.group.rank == 0 else 0])
        token = int(self.group.sum_(token))
        self.tmp = os.path.join(os.path.dirname(self.out),
                                f".{os.path.basename(self.out)}.fastmerge-tmp-{token:016x}")
        self._step(self._extract_all)
        self._step(self._ranks)
        self._step(self._prepare_output, only_rank0=True)
        self._step(self._write_all)
        self._step(self._finish, only_rank0=True)

    def run(self) -> dict:
        t0 = time.perf_counter()
        summary = super().run()
        lora = [(j, r) for j, r in zip(self.jobs, self.ranks) if j.kind != "save"]
        summary.update(seconds=time.perf_counter() - t0, modules=len(lora),
                       saved=sum(j.kind == "save" for j in self.jobs),
                       ranks={j.name: r for j, r in lora},  # every process's modules
                       energy={j.name: j.info["energy"] for j, _ in lora if j.info})  # this one's
        return summary


def _empty(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def extract_lora_checkpoints(base: str, finetuned: str, out: str, **options) -> dict:
    """Python entry of ``fastmerge extract-lora``: the PEFT LoRA adapter of the fine-tune
    ``finetuned`` over ``base`` (local safetensors folders) in the new folder ``out``. Options
    as :class:`ExtractOptions` (``rank=``, ``rank_fraction=``, ``exact=``, ...). Returns a
    summary with every module's rank and kept energy."""
    return Extractor(base, finetuned, out, ExtractOptions(**options)).run()
