"""``model+lora`` references: a PEFT LoRA adapter applied to a checkpoint as it streams.

mergekit merges the adapter into the model first (PEFT's ``merge_and_unload``) and saves the
result to a cache folder. Here each weight the adapter targets is read and gets its low-rank
update in the same step, in fp32, rounded once to the merge's working dtype:

* a Linear ``W`` (``out x in``): ``W + s * (B @ A)`` (``(B @ A)^T`` with ``fan_in_fan_out``);
* an Embedding ``E`` (``vocab x dim``): ``E + s * (B @ A)^T`` (PEFT's ``lora_embedding_A/B``);
* ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` and
  ``alpha_pattern`` override ``r`` and ``lora_alpha`` per module (a key matches a module whose
  name ends with it, the longest key first);
* ``modules_to_save`` and a targeted embedding's saved ``base_layer`` (full weights saved with
  the adapter) replace the model's, before the update.

Adapters PEFT cannot merge into a plain weight this way (DoRA's ``use_dora``, other PEFT types)
are refused with a one-line error, as is an adapter weight the model does not have.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Optional, Tuple

import torch

from .safetensors_io import Checkpoint, FormatError

_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


class AdapterError(ValueError):
    """An adapter fastmerge cannot apply (the message names the adapter folder)."""


def split(ref: str) -> Optional[Tuple[str, str]]:
    """``(model, lora)`` of a ``model+lora`` reference, None for a plain one (a path that
    exists as given is plain even if it holds a ``+``)."""
    if "+" not in ref or os.path.exists(ref):
        return None
    for i in [i for i, ch in enumerate(ref) if ch == "+"]:
        model, lora = ref[:i], ref[i + 1:]
        if model and lora and (os.path.isdir(model) or os.path.isdir(lora) or "+" not in lora):
            return model, lora
    return None


def _scale(cfg: dict, module: str, folder: str) -> float:
    def pick(pattern: dict, default):
        keys = sorted((k for k in (pattern or {}) if module == k or module.endswith("." + k)), key=len)
        return pattern[keys[-1]] if keys else default

    r = pick(cfg.get("rank_pattern"), cfg.get("r"))
    alpha = pick(cfg.get("alpha_pattern"), cfg.get("lora_alpha"))
    if not isinstance(r, (int, float)) or r <= 0 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{folder}/adapter_config.json: r and lora_alpha must be numbers (r > 0), "
                           f"got r={r!r}, lora_alpha={alpha!r} for {module}")
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _config(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise AdapterError(f"LoRA adapter folder not found: {folder}")
    path = os.path.join(folder, "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        raise AdapterError(f"{folder} is not a PEFT adapter (no adapter_config.json)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA; only LoRA "
                           "adapters can be applied")
    if cfg.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters (use_dora) are not supported; merge it with "
                           "peft's merge_and_unload first")
    return cfg


class LoraCheckpoint:
    """A :class:`Checkpoint` read through a LoRA adapter: the same names, shapes and dtypes;
    each targeted weight read with its update applied (fp32)."""

    def __init__(self, model: Checkpoint, adapter_folder: str):
        self.model, self.folder, self.entries = model, model.folder, model.entries
        cfg = _config(adapter_folder)
        try:
            self.adapter = Checkpoint(adapter_folder)
        except (FileNotFoundError, FormatError) as exc:
            raise AdapterError(f"adapter {adapter_folder}: {exc}") from None
        parts: Dict[str, dict] = {}
        self.replace: Dict[str, str] = {}
        for key in self.adapter.names():
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _LORA.match(name)
            if m is None:  # modules_to_save, or a targeted embedding's saved base: a full weight
                name = name.replace(".modules_to_save.default", "").replace(".base_layer.", ".")
                self._target(name, adapter_folder)
                self.replace[name] = key
                continue
            parts.setdefault(m["module"], {})[m["kind"]] = key
        self.updates: Dict[str, tuple] = {}
        for module, kinds in parts.items():
            embed = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
            a, b = (kinds.get("lora_embedding_A"), kinds.get("lora_embedding_B")) if embed else \
                (kinds.get("lora_A"), kinds.get("lora_B"))
            if a is None or b is None:
                raise AdapterError(f"adapter {adapter_folder}: {module} has only one of its two "
                                   "LoRA factors")
            name = module + ".weight"
            self._target(name, adapter_folder)
            transpose = embed or bool(cfg.get("fan_in_fan_out"))
            self.updates[name] = (a, b, transpose, _scale(cfg, module, adapter_folder))
            self._check_shape(name, adapter_folder)

    def _target(self, name: str, folder: str) -> None:
        if name not in self.entries:
            raise AdapterError(f"adapter {folder} updates {name}, which {self.folder} does not have")

    def _check_shape(self, name: str, folder: str) -> None:
        a, b, transpose, _ = self.updates[name]
        ea, eb = self.adapter.entries[a].shape, self.adapter.entries[b].shape
        shape = (eb[0], ea[-1]) if len(ea) == 2 and len(eb) == 2 and ea[0] == eb[-1] else None
        if shape is not None and transpose:
            shape = shape[::-1]
        if shape != tuple(self.entries[name].shape):
            raise AdapterError(f"adapter {folder}: the update of {name} (A {list(ea)}, B {list(eb)}) "
                               f"does not fit its shape {list(self.entries[name].shape)}")

    def names(self):
        return self.model.names()

    def _apply(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if name in self.replace:
            w = self.adapter.tensor(self.replace[name]).float()
        if name not in self.updates:
            return w
        a, b, transpose, s = self.updates[name]
        delta = self.adapter.tensor(b).float() @ self.adapter.tensor(a).float()
        return w.float().add_(delta.T if transpose else delta, alpha=s)

    def read(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self._apply(name, self.model.read(name, out))

    def tensor(self, name: str) -> torch.Tensor:
        return self._apply(name, self.model.tensor(name))

    def prefetch(self, name: str) -> None:
        self.model.prefetch(name)

    def release(self, name: str) -> None:
        self.model.release(name)

    def close(self) -> None:
        self.model.close()
        self.adapter.close()
