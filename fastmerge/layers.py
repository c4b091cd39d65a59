"""Which tensors of a checkpoint are per-layer, derived from their names (what mergekit reads from
its architecture JSONs), for ``slices`` configs and gradient positions.

A layer tensor is ``<stack>.<i>.<rest>``, ``<stack>`` ending in ``layers``, ``layer``, ``h``,
``blocks`` or ``block`` (``model.layers.3.mlp.up_proj.weight``, ``transformer.h.0.attn.c_attn
.weight``). The other tensors come before the layer stack (the input embeddings:
``embed_tokens``, ``wte``, ``wpe``, ``word_embeddings``, ``embed_in``, ...) or after it (the final
norm, the output head, GPT-NeoX's ``embed_out``). A ``slices`` merge takes the tensors before the
stack from its first slice's sources and those after it from its last slice's, as mergekit does.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block))\.(\d+)\.(.+)$")
_PRE = re.compile(r"(^|\.)(embed_tokens|embed_in|embeddings?|wte|wpe|word_embeddings|tok_embeddings|"
                  r"position_embeddings|token_type_embeddings)(\.|$)")
# the tensors whose rows are tokens (mergekit's architecture JSONs mark them with
# `vocabulary_axis: 0`): input embeddings, output heads and their biases, outside the layer stack
_VOCAB = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_out|wte|word_embeddings|tok_embeddings|shared|"
                    r"lm_head|lm_head\.linear|lm_head\.decoder|vocab_projector|output_layer)\.(weight|bias)$"
                    r"|^output\.weight$|^cls\.predictions\.bias$")
# config.json keys of the layer count, in the order transformers' configs use them
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def split(name: str) -> Optional[Tuple[str, int, str]]:
    """``(stack, index, rest)`` of a layer tensor, None for any other."""
    m = LAYER.match(name)
    return None if m is None else (m.group(1), int(m.group(2)), m.group(3))


def is_vocab(name: str) -> bool:
    """Whether a tensor's rows are the vocabulary's tokens (aligned when the tokenizer changes)."""
    return split(name) is None and bool(_VOCAB.search(name))


def is_pre(name: str) -> bool:
    """Whether a tensor outside the layer stack comes before it (the input embeddings)."""
    return bool(_PRE.search(name))


class Stack:
    """The layer stack of one checkpoint's tensor names: ``prefix``, ``layers[i]`` (the
    ``rest`` names of layer ``i``, in the checkpoint's order), and the tensors ``pre`` and
    ``post`` the stack."""

    def __init__(self, names: List[str], where: str):
        self.layers: Dict[int, List[str]] = {}
        self.pre: List[str] = []
        self.post: List[str] = []
        prefixes = set()
        for n in names:
            parts = split(n)
            if parts is None:
                (self.pre if is_pre(n) else self.post).append(n)
                continue
            prefixes.add(parts[0])
            self.layers.setdefault(parts[1], []).append(parts[2])
        if len(prefixes) > 1:
            raise ValueError(f"{where} has more than one layer stack ({', '.join(sorted(prefixes))}): "
                             "slices of it are not supported")
        self.prefix = prefixes.pop() if prefixes else None
        self.count = max(self.layers, default=-1) + 1

    def name(self, index: int, rest: str) -> str:
        return f"{self.prefix}.{index}.{rest}"


def num_layers_key(config: dict) -> Optional[str]:
    """The key of ``config.json`` that holds the layer count, or None."""
    return next((k for k in NUM_LAYERS_KEYS if isinstance(config.get(k), int)), None)
