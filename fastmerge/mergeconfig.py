"""mergekit's YAML merge configuration, read the way mergekit 0.1.5 reads it.

Supported: ``merge_method``, ``base_model``, ``models`` (each ``model`` with ``parameters``),
top-level ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` (``base``, ``union``
or a model) or the ``tokenizer:`` block (:mod:`fastmerge.vocab` builds it), ``slices``,
``chat_template``, ``name``, plus fastmerge's own keys ``quantize`` and ``topk_scope``. A parameter value is a scalar,
a gradient (a list of numbers, interpolated over the layers), or filters (a list of
``{filter: substring, value: ...}``, the first that matches the tensor name wins) -- exactly
mergekit's ``evaluate_setting``:

- per-model parameters (``weight, density, gamma, epsilon``) look in the model's own
  ``parameters`` first, then the top-level ones; shared ones (``normalize, rescale, lambda,
  int8_mask``) only in the top-level ``parameters``; a value that resolves to nothing (no filter
  matched) falls through to the next place, then to the method's default;
- ``t`` (the gradient position) is ``i / (L - 1)`` for a tensor of layer ``i`` of ``L`` (1 when
  ``L == 1``), and 0 for tensors outside the layer stack (embeddings, final norm, head).

Every registered method runs (``fastmerge.METHODS``). mergekit's other methods (slerp,
nuslerp, multislerp, karcher, model_stock, sce, nearswap, arcee_fusion, ram, ramplus_tl,
passthrough; :mod:`fastmerge.methods`) take their parameters under mergekit's names: ``weight``
(per model, as ``weights``) and passthrough's ``scale`` (per model) from the model's own
``parameters`` first, every other one (``t``, ``eps``, ``filter_wise``, ...) from the top-level
``parameters`` only, as mergekit binds them; required ones (``t``, ``weight``) must resolve for
every tensor. Which models are inputs follows mergekit's base policies: a method that needs a
base (slerp, model_stock, ...) merges the listed models other than ``base_model`` onto it; for
nuslerp, multislerp and karcher ``base_model`` is optional (karcher counts it as one more point
of the mean, as mergekit does); passthrough takes exactly one model and no other base.

``modules`` (per-module slices) are not fastmerge's yet: the error says to use
``fastmerge mergekit`` for those.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _registry as R
from . import _semantics as sem
from . import layers, lowrank


class ConfigError(ValueError):
    """A merge configuration fastmerge cannot run (the message says what and where)."""


# every registered method (fastmerge/_registry.py): each family's parameters are mapped below
METHODS = R.METHODS
# mergekit's per-model parameters of its other methods, under fastmerge's names (-> YAML names)
_PER_INPUT = {"weights": "weight", "scale": "scale", "density": "density", "tall_lambda": "tall_lambda",
              "fisher": "fisher", "grams": "grams"}
# per-model parameters that name a folder (fisher / regmean's statistics), not a number
_PATHS = ("fisher", "grams")
# a method parameter's YAML name where it differs (mergekit spells task arithmetic's scale lambda)
_YAML_NAME = {"lam": "lambda"}
_FLOAT = ("weight", "density", "gamma", "epsilon", "lambda", "alpha")
_BOOL = ("normalize", "rescale", "int8_mask")
SHARED = ("normalize", "rescale", "lambda", "int8_mask", "alpha")
PER_MODEL = ("weight", "density", "gamma", "epsilon")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float": torch.float32, "half": torch.float16}
TOPK_SCOPES = ("tensor", "model")
_KNOWN = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
          "tokenizer_source", "tokenizer", "quantize", "topk_scope", "name", "chat_template"}


@dataclass(frozen=True)
class TokenEmbed:
    """One entry of the ``tokenizer: tokens:`` block (mergekit's ``TokenEmbeddingConfig``): where
    token's embedding row comes from -- ``kind`` ``model`` (the row the token has in ``model``),
    ``model_token`` (row ``token_id``, or token ``token``'s row, of ``model``), ``zero``, or
    None (unset) -- and ``force``: use it even in the models that have the token."""
    kind: Optional[str] = None
    model: Optional[str] = None
    token_id: Optional[int] = None
    token: Optional[str] = None
    force: bool = False


@dataclass
class ModelRef:
    path: str
    parameters: Dict[str, Any] = field(default_factory=dict)
    layer_range: Optional[Tuple[int, int]] = None  # a slice's source: layers [start, end)


@dataclass
class Slice:
    """One entry of ``slices``: its ``sources`` (models with a ``layer_range`` each, all of one
    length), an optional ``base_model`` of its own, and ``parameters`` between the sources'
    own and the top-level ones. ``residual_weight`` is accepted and, as in mergekit 0.1.5,
    unused."""
    sources: List[ModelRef]
    base: Optional[str] = None
    parameters: Dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


@dataclass
class MergeConfig:
    method: str
    base: Optional[str]
    models: List[ModelRef]
    parameters: Dict[str, Any]
    dtype: Optional[torch.dtype] = None
    out_dtype: Optional[torch.dtype] = None
    tokenizer_source: Optional[str] = None
    quantize: Optional[dict] = None
    topk_scope: str = "tensor"
    source: str = ""  # the YAML text, copied next to the output
    slices: List[Slice] = field(default_factory=list)  # a `slices:` config (then no models)
    name: str = ""  # the model card's title (mergekit's `name`)
    chat_template: Optional[str] = None  # "auto" or a Jinja template
    # the `tokenizer:` block (its `source` is tokenizer_source): tokens to add or whose
    # embedding rows are configured, and the vocabulary's padding
    tokens: Dict[str, TokenEmbed] = field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = None

    @property
    def uses_base(self) -> bool:
        """Whether ``base_model`` is read and passed as the merge's base (``linear`` ignores it;
        passthrough takes its one model as an input, never a base)."""
        return self.base_of() is not None

    @property
    def inputs(self) -> List[ModelRef]:
        """The models merged onto the base: every listed model except the base itself (mergekit
        drops the base from the task vectors); ``linear`` and passthrough take every listed
        model."""
        return self.inputs_of()

    def base_of(self, sl: Optional[Slice] = None) -> Optional[str]:
        """The base the merge of ``sl`` (default: the ``models`` list) reads, or None: the
        slice's ``base_model``, else the config's, when the method takes a base; in a slice, a
        base that is not among its sources is none for a method that does not need one."""
        base = (sl.base if sl is not None else None) or self.base
        if base is None or self.method == "linear" or R.get(self.method).base == "none":
            return None
        if sl is not None and not any(_same(s.path, base) for s in sl.sources):
            return None
        return base

    def inputs_of(self, sl: Optional[Slice] = None) -> List[ModelRef]:
        refs = self.models if sl is None else sl.sources
        base = self.base_of(sl)
        return list(refs) if base is None else [m for m in refs if not _same(m.path, base)]

    def base_source(self, sl: Slice) -> Optional[ModelRef]:
        base = self.base_of(sl)
        return None if base is None else next(s for s in sl.sources if _same(s.path, base))

    def paths(self) -> List[Tuple[str, str]]:
        """(label, path) of every model folder the config names."""
        found = [("base_model", self.base)] if self.base is not None else []
        found += [(f"models[{i}]", m.path) for i, m in enumerate(self.models)]
        for i, sl in enumerate(self.slices):
            found += [(f"slices[{i}].base_model", sl.base)] if sl.base is not None else []
            found += [(f"slices[{i}].sources[{j}]", m.path) for j, m in enumerate(sl.sources)]
        return found


def _same(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _kind_of(default: Any) -> str:
    """The value type of a :mod:`fastmerge.methods` parameter, read off its default (no
    default, or None: a number)."""
    if isinstance(default, bool):
        return "bool"
    return "int" if isinstance(default, int) else "float"


def _validate(name: str, value: Any, where: str, kind: Optional[str] = None) -> Any:
    """mergekit's per-parameter type adapter (pydantic lax mode): floats from numbers or
    numeric strings, ints from integral numbers, bools from bools (and yes/no-like strings).
    ``kind`` ("float", "int", "bool") overrides the type known by name."""
    kind = kind or ("float" if name in _FLOAT else "bool" if name in _BOOL else None)
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {name} must be a folder path, got {value!r}")
        return value
    if kind == "int":
        number = _validate(name, value, where, "float")
        if not number.is_integer():
            raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
        return int(number)
    if kind == "float":
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def evaluate(name: str, setting: Any, tensor: str, t: float, where: str = "parameters",
             kind: Optional[str] = None) -> Any:
    """Resolve one parameter ``setting`` for ``tensor`` at gradient position ``t`` (mergekit's
    ``evaluate_setting``); None when a list of filters has no match."""
    if isinstance(setting, dict):
        setting = [setting]
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return None if setting is None else _validate(name, setting, where, kind)
    if not isinstance(setting, list):
        raise ConfigError(f"{where}: {name} has an unexpected value {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [_validate(name, e, where, kind) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return _validate(name, (1 - frac) * values[i0] + frac * values[i1], where, kind)
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise ConfigError(f"{where}: {name}: a list of conditions must hold only "
                              f"{{filter: ..., value: ...}} entries, got {cond!r}")
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor and str(flt) in tensor):
            return evaluate(name, cond["value"], tensor, t, where, kind)
    return None


def _model_ref(entry: Any, i: int, where: Optional[str] = None, more: tuple = ()) -> ModelRef:
    where = where or f"models[{i}]"
    if isinstance(entry, str):
        return ModelRef(entry)
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"{where}: each entry needs a `model:` (a local folder or a hub id)")
    extra = set(entry) - {"model", "parameters", *more}
    if extra:
        raise ConfigError(f"{where}: unknown keys {sorted(extra)}")
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.parameters must be a mapping")
    return ModelRef(str(entry["model"]), dict(params))


def _dtype(value: Any, key: str) -> Optional[torch.dtype]:
    if value is None:
        return None
    if str(value) not in DTYPES:
        raise ConfigError(f"{key}: unknown dtype {value!r}; use float32, float16 or bfloat16")
    return DTYPES[str(value)]


def parse(text: str, source_name: str = "config") -> MergeConfig:
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # one line, and no quote of the file: the problem and where it is
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1} column {mark.column + 1})" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or type(exc).__name__).split())
        raise ConfigError(f"{source_name} is not valid YAML: {problem}{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source_name}: expected a mapping with merge_method, base_model, models")
    if "modules" in raw:
        raise ConfigError(f"{source_name}: `modules` (per-module slices) are not supported by "
                          "`fastmerge merge` yet; run it with `fastmerge mergekit CONFIG OUT` "
                          "(mergekit with fastmerge's kernels) instead")
    if ("slices" in raw) == ("models" in raw):
        raise ConfigError(f"{source_name}: give exactly one of `models` and `slices`")
    unknown = set(raw) - _KNOWN
    if unknown:
        raise ConfigError(f"{source_name}: unknown keys {sorted(unknown)} (known: {sorted(_KNOWN)})")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise ConfigError(f"{source_name}: merge_method {method!r} is not supported by `fastmerge merge` "
                          f"(supported: {', '.join(METHODS)}); for mergekit's other methods run "
                          "`fastmerge mergekit CONFIG OUT`")
    models = raw.get("models", [])
    if "models" in raw and (not isinstance(models, list) or not models):
        raise ConfigError(f"{source_name}: `models` must be a non-empty list")
    slices = raw.get("slices", [])
    if "slices" in raw and (not isinstance(slices, list) or not slices):
        raise ConfigError(f"{source_name}: `slices` must be a non-empty list")
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source_name}: `parameters` must be a mapping")
    scope = raw.get("topk_scope", "tensor")
    if scope not in TOPK_SCOPES:
        raise ConfigError(f"{source_name}: topk_scope must be one of {TOPK_SCOPES}, got {scope!r}")
    base = raw.get("base_model")
    slices = [_slice(sl, i) for i, sl in enumerate(slices)]
    if R.get(method).base == "required" and base is None and not all(sl.base for sl in slices or [None]):
        raise ConfigError(f"{source_name}: merge_method {method} needs a base_model")
    tok, tokens, pad = _tokenizer(raw, source_name)
    quant = raw.get("quantize")
    if quant is not None and not isinstance(quant, dict):
        raise ConfigError(f"{source_name}: quantize must be a mapping, e.g. {{format: int4, group_size: 128}}")
    cfg = MergeConfig(
        method=method, base=None if base is None else str(base),
        models=[_model_ref(m, i) for i, m in enumerate(models)], parameters=dict(params),
        dtype=_dtype(raw.get("dtype"), "dtype"), out_dtype=_dtype(raw.get("out_dtype"), "out_dtype"),
        tokenizer_source=tok, quantize=quant, topk_scope=scope, source=text, slices=slices,
        name=str(raw.get("name") or ""), chat_template=_chat_template(raw.get("chat_template"), source_name),
        tokens=tokens, pad_to_multiple_of=pad,
    )
    for sl in slices or [None]:
        _check_count(cfg, source_name, sl)
    return cfg


def _tokenizer(raw: dict, source_name: str) -> Tuple[Optional[str], Dict[str, TokenEmbed], Optional[int]]:
    """``tokenizer_source`` or the ``tokenizer:`` block (not both, as in mergekit): the source
    (``base``, ``union`` -- the block's default -- or a model), the ``tokens`` entries and
    ``pad_to_multiple_of``."""
    if "tokenizer_source" in raw and "tokenizer" in raw:
        raise ConfigError(f"{source_name}: give `tokenizer_source` or a `tokenizer:` block, not both")
    if "tokenizer" not in raw:
        tok = raw.get("tokenizer_source")
        if tok is not None and not isinstance(tok, str):
            raise ConfigError(f"{source_name}: tokenizer_source must be `base`, `union` or a model, got {tok!r}")
        return tok, {}, None
    block = raw["tokenizer"]
    where = f"{source_name}: tokenizer"
    if not isinstance(block, dict) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
        raise ConfigError(f"{where} must be a mapping of source, tokens and pad_to_multiple_of, got {block!r}")
    tok = block.get("source", "union")
    if not isinstance(tok, str):
        raise ConfigError(f"{where}.source must be `base`, `union` or a model, got {tok!r}")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ConfigError(f"{where}.pad_to_multiple_of must be a positive integer, got {pad!r}")
    entries = block.get("tokens") or {}
    if not isinstance(entries, dict):
        raise ConfigError(f"{where}.tokens must map each token to {{source: ..., force: ...}}")
    return tok, {str(t): _token_embed(e, f"{where}.tokens[{t!r}]") for t, e in entries.items()}, pad


def _token_embed(entry: Any, where: str) -> TokenEmbed:
    """mergekit's ``TokenEmbeddingConfig``: ``source`` a model, ``{kind: zero}`` or ``{kind:
    model_token, model: ..., token_id: N | token: ...}``, and ``force``."""
    entry = {} if entry is None else entry
    if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
        raise ConfigError(f"{where} must be a mapping of source and force, got {entry!r}")
    force = _validate("force", entry.get("force", False), where, "bool")
    src = entry.get("source")
    if src is None:
        return TokenEmbed(force=force)
    if isinstance(src, str):
        return TokenEmbed("model", src, force=force)
    if not isinstance(src, dict) or src.get("kind") not in ("zero", "model_token"):
        raise ConfigError(f"{where}.source must be a model, {{kind: zero}} or {{kind: model_token, "
                          f"model: ..., token_id: N}}, got {src!r}")
    if src["kind"] == "zero":
        if set(src) != {"kind"}:
            raise ConfigError(f"{where}.source: {{kind: zero}} takes no other keys, got {src!r}")
        return TokenEmbed("zero", force=force)
    if set(src) - {"kind", "model", "token_id", "token"} or "model" not in src:
        raise ConfigError(f"{where}.source: model_token takes model and one of token_id, token; got {src!r}")
    tid, name = src.get("token_id"), src.get("token")
    if (tid is None) == (name is None):
        raise ConfigError(f"{where}.source: give exactly one of token_id and token")
    if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
        raise ConfigError(f"{where}.source.token_id must be a non-negative integer, got {tid!r}")
    return TokenEmbed("model_token", str(src["model"]), tid, None if name is None else str(name), force)


def _chat_template(value: Any, source_name: str) -> Optional[str]:
    """mergekit's ``chat_template``: ``auto`` (the template most of the models have) or a Jinja
    template. mergekit's named templates (``chatml``, ``llama3``, ...) are its own data files:
    refused with the way out, rather than written wrong."""
    if value is None or value == "auto":
        return value
    if not isinstance(value, str) or len(value) < 20 or "{" not in value:
        raise ConfigError(f"{source_name}: chat_template must be `auto` or a Jinja template (mergekit's "
                          f"named templates such as chatml are not bundled with fastmerge: paste the "
                          f"template's text), got {value!r}")
    return value


def _layer_range(value: Any, where: str) -> Tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{where}.layer_range must be two integers [start, end], got {value!r}")
    start, end = value
    if not 0 <= start <= end:
        raise ConfigError(f"{where}.layer_range must have 0 <= start <= end, got {list(value)}")
    return start, end


def _slice(entry: Any, i: int) -> Slice:
    where = f"slices[{i}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
        raise ConfigError(f"{where}: each slice needs `sources`, a non-empty list of "
                          "{model: ..., layer_range: [start, end]}")
    extra = set(entry) - {"sources", "base_model", "parameters", "residual_weight"}
    if extra:
        raise ConfigError(f"{where}: unknown keys {sorted(extra)}")
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.parameters must be a mapping")
    sources = []
    for j, src in enumerate(entry["sources"]):
        ref = _model_ref(src, j, f"{where}.sources[{j}]", ("layer_range",))
        if not isinstance(src, dict) or "layer_range" not in src:
            raise ConfigError(f"{where}.sources[{j}] needs a layer_range: [start, end]")
        ref.layer_range = _layer_range(src["layer_range"], f"{where}.sources[{j}]")
        sources.append(ref)
    lengths = {end - start for start, end in (s.layer_range for s in sources)}
    if len(lengths) != 1:
        raise ConfigError(f"{where}: all sources of a slice must span the same number of layers, "
                          f"got {[list(s.layer_range) for s in sources]}")
    base = entry.get("base_model")
    return Slice(sources, None if base is None else str(base), dict(params))


def _check_count(cfg: MergeConfig, source_name: str, sl: Optional[Slice] = None) -> None:
    """mergekit's input count of a method (``fastmerge/methods/<name>.py``'s ``CONTRACT``) for
    the models list or one slice, and a slice's base among its sources, checked before any
    file is opened."""
    entry = R.get(cfg.method)
    where = source_name if sl is None else f"{source_name}: slices[{cfg.slices.index(sl)}]"
    base = (sl.base if sl is not None else None) or cfg.base
    if (sl is not None and entry.base == "required" and cfg.method != "linear"
            and not any(_same(s.path, base) for s in sl.sources)):
        raise ConfigError(f"{where}: merge_method {cfg.method} needs its base_model {base} among "
                          "the slice's sources (with the layer_range to read), as mergekit does")
    if entry.family != "method":
        return
    refs = cfg.models if sl is None else sl.sources
    n, note = len(cfg.inputs_of(sl)), ""
    if sl is None and entry.base == "none" and cfg.base is not None and not any(_same(m.path, cfg.base) for m in refs):
        n, note = n + 1, " (mergekit counts base_model as one)"  # as mergekit's input contract does
    lo, hi = entry.min_models, entry.max_models
    if n < lo or hi is not None and n > hi:
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        besides = " besides base_model" if cfg.base_of(sl) is not None else ""
        raise ConfigError(f"{where}: merge_method {cfg.method} takes {want} model(s){besides}, "
                          f"got {n}{note}")


def load(path: str) -> MergeConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 24)
    except OSError as exc:
        raise ConfigError(f"cannot read the config {path}: {exc.strerror}") from None
    if len(text) == 1 << 24:
        raise ConfigError(f"{path} is over 16 MB: not a merge config")
    try:
        return parse(text.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: not a merge config") from None


# ------------------------------------------------------------------ layers and parameters



def layer_positions(names: List[str]) -> Dict[str, float]:
    """``t`` per tensor: ``i / (L-1)`` for layer ``i`` of a stack of ``L`` layers (``L`` counted
    per stack prefix, e.g. ``model.layers``), 1 for a one-layer stack, 0 outside any stack."""
    found: Dict[str, Tuple[str, int]] = {}
    count: Dict[str, int] = {}
    for n in names:
        m = layers.LAYER.match(n)
        if m:
            found[n] = (m.group(1), int(m.group(2)))
            count[m.group(1)] = max(count.get(m.group(1), 0), int(m.group(2)) + 1)
    out = {}
    for n in names:
        if n not in found:
            out[n] = 0.0
            continue
        prefix, i = found[n]
        L = count[prefix]
        out[n] = i / (L - 1) if L > 1 else 1.0
    return out


def _defaults(method: str) -> Dict[str, Any]:
    if method == "linear":
        return {"normalize": True, "lambda": 1.0, "int8_mask": False}
    if method in lowrank.METHODS:
        return {"lambda": 1.0, "alpha": None, "int8_mask": False, "normalize": None, "rescale": None}
    _, sparsify, d_norm, d_rescale = sem.MERGEKIT_METHODS[method]
    return {"normalize": d_norm, "rescale": d_rescale, "lambda": 1.0, "int8_mask": False,
            "density": 1.0, "gamma": 0.01, "epsilon": 0.15}


def _scopes(cfg: MergeConfig, sl: Optional[Slice], ref: Optional[ModelRef] = None) -> list:
    """(parameters, where) from the highest precedence down, as mergekit's ``parameter_sources``:
    the model's (slice source's) own, the slice's, the top-level ones."""
    found = [] if ref is None else [(ref.parameters, f"model {ref.path}")]
    if sl is not None:
        found.append((sl.parameters, f"slices[{cfg.slices.index(sl)}].parameters"))
    return found + [(cfg.parameters, "parameters")]


def _lookup(scopes: list, name: str, tensor: str, t: float, kind=None) -> Any:
    for scope, where in scopes:
        if name in scope:
            v = evaluate(name, scope[name], tensor, t, where, kind)
            if v is not None:
                return v
    return None


def _per_model(cfg: MergeConfig, ref: ModelRef, name: str, tensor: str, t: float, kind=None,
               sl: Optional[Slice] = None) -> Any:
    """A per-model parameter: the model's own ``parameters`` first, then the slice's, then the
    top-level ones."""
    return _lookup(_scopes(cfg, sl, ref), name, tensor, t, kind)


def _resolve_method(cfg: MergeConfig, tensor: str, t: float, sl: Optional[Slice] = None):
    """:func:`resolve` for mergekit's other methods: their ``PARAMS`` under mergekit's names."""
    refs = cfg.inputs_of(sl)
    shared, per_model = {}, [{} for _ in refs]
    for name, default in R.get(cfg.method).defaults.items():
        required = default is R.REQUIRED
        if name in _PER_INPUT:
            for ref, values in zip(refs, per_model):
                v = _per_model(cfg, ref, _PER_INPUT[name], tensor, t, "path" if name in _PATHS else "float", sl)
                if v is None and required:
                    raise ConfigError(f"missing required parameter {_PER_INPUT[name]} for {ref.path} "
                                      f"(tensor {tensor}); mergekit requires it too")
                values[name] = default if v is None else v
            continue
        v = _lookup(_scopes(cfg, sl), _YAML_NAME.get(name, name), tensor, t, _kind_of(default))
        if v is None and required:
            raise ConfigError(f"missing required parameter {name} (tensor {tensor}) in the "
                              "top-level parameters; mergekit requires it too")
        shared[name] = default if v is None else v
    return shared, per_model


def resolve(cfg: MergeConfig, tensor: str, t: float,
            sl: Optional[Slice] = None) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """(shared parameters, one dict of per-model parameters per input) for ``tensor`` (of the
    models list, or of slice ``sl``)."""
    if R.get(cfg.method).family == "method":
        return _resolve_method(cfg, tensor, t, sl)
    defaults = _defaults(cfg.method)
    shared = {}
    for name in SHARED:
        v = _lookup(_scopes(cfg, sl), name, tensor, t)
        shared[name] = defaults.get(name) if v is None else v
    per_model = []
    for ref in cfg.inputs_of(sl):
        values = {}
        for name in PER_MODEL:
            v = _per_model(cfg, ref, name, tensor, t, sl=sl)
            if v is None:
                if name == "weight" and cfg.method not in lowrank.METHODS:
                    raise ConfigError(f"missing required parameter weight for {ref.path} "
                                      f"(tensor {tensor}); mergekit requires it too")
                v = defaults.get(name, 1.0)
            values[name] = v
        per_model.append(values)
    return shared, per_model


def merge_kwargs(cfg: MergeConfig, shared: dict, per_model: List[dict]) -> Dict[str, Any]:
    """Keyword arguments of :func:`fastmerge.merge` for one tensor."""
    if R.get(cfg.method).family == "method":
        # a per-model parameter no model sets stays unset (None: the method's default)
        return dict(shared, **{name: ([p[name] for p in per_model] if any(p[name] is not None for p in per_model)
                                      else None)
                               for name in _PER_INPUT if name in R.get(cfg.method).defaults})
    kw: Dict[str, Any] = {"weights": [p["weight"] for p in per_model]}
    if cfg.method in lowrank.METHODS:
        kw["alpha"] = shared["alpha"] if shared["alpha"] is not None else shared["lambda"]
        return kw
    kw["lam"] = shared["lambda"]
    kw["normalize"] = shared["normalize"]
    if cfg.method == "linear":
        return kw
    kw["rescale"] = shared["rescale"]
    kw["density"] = [p["density"] for p in per_model]
    kw["gamma"] = [p["gamma"] for p in per_model]
    kw["epsilon"] = [p["epsilon"] for p in per_model]
    return kw

