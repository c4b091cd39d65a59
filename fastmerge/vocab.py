"""The output vocabulary of a merge and the embedding rows aligned to it, as mergekit 0.1.5
builds them for ``tokenizer_source`` and the ``tokenizer:`` block.

- ``base``: the base model's tokenizer (the first model's when there is no base), with the
  tokens at or past its ``config.json`` ``vocab_size`` removed (BPE only, as in mergekit);
  ``union``: that tokenizer plus, appended, every other model's tokens it lacks, then every
  model's added tokens (first settings win); a model reference: that model's tokenizer. The
  ``tokens`` of a ``tokenizer:`` block are added when missing.
- Each model's permutation maps an output token id to the model's row of the same token (-1:
  the model lacks it, or its row is past the model's ``vocab_size``).
- The rows of every vocabulary tensor (input embeddings, output head; fastmerge.layers) are
  aligned per model before the merge: a token the model has keeps its row; one it lacks gets
  the row configured in ``tokens``, else the one model that has it, else the base's, else the
  mean over the models that have it, else zeros. ``pad_to_multiple_of`` pads the vocabulary
  with the mean row.

Where mergekit's order is its hash order (its set of models, the tokenizers' vocabulary
dicts), fastmerge's is fixed: the base first, then the models in the order the config names
them, each model's tokens by id. So every process of a torchrun merge builds the same
vocabulary; the tokens and their rows match mergekit's, their ids may be permuted where
mergekit's own are run-dependent (three or more tokenizers adding tokens).

Building tokenizers needs the ``transformers`` package (a dependency of peft and mergekit);
only a config that names a tokenizer source imports it.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .mergeconfig import TokenEmbed


class VocabError(ValueError):
    """The vocabulary cannot be built as the config asks (the message names what and where)."""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise VocabError("tokenizer_source / the tokenizer: block builds the output tokenizer with the "
                         "`transformers` package, which is not installed (pip install transformers)") from None
    transformers.logging.set_verbosity_error()
    return transformers


def config_vocab_size(folder: str) -> Optional[int]:
    """``vocab_size`` of ``folder``'s config.json (or its ``text_config``'s), None if it has none."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    for holder in (data, data.get("text_config") if isinstance(data, dict) else None):
        if isinstance(holder, dict) and isinstance(holder.get("vocab_size"), int):
            return holder["vocab_size"]
    return None


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f))
               for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"))


def _load(folder: str, trust: bool, where: str):
    tf = _transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust, use_fast=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; one line names the folder
        raise VocabError(f"{where}: cannot load the tokenizer of {folder}: "
                         f"{' '.join(str(exc).split())[:300]}") from None


def _stripped(tok, folder: str):
    """``tok`` without the tokens whose ids are at or past ``folder``'s ``vocab_size`` (the
    rows a model does not have): removed from the BPE vocabulary, the added tokens and every
    merge that names them."""
    import tokenizers

    n = config_vocab_size(folder) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= n}
    if not unused:
        return tok
    if not getattr(tok, "is_fast", False):
        raise VocabError(f"{folder}: its tokenizer has tokens past vocab_size={n} and is not a fast "
                         "tokenizer, so they cannot be removed for the vocabulary merge")
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise VocabError(f"{folder}: its tokenizer ({data['model']['type']}) has tokens past "
                         f"vocab_size={n}; only BPE tokenizers can have them removed")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < n]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m) -> bool:
        parts = m.split(" ") if isinstance(m, str) else m
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _copy(tok, trust: bool):
    """A fresh copy of ``tok`` (saved and loaded again), so adding tokens leaves ``tok`` alone."""
    tf = _transformers()
    with tempfile.TemporaryDirectory(prefix="fastmerge-tok-") as d:
        tok.save_pretrained(d)
        return tf.AutoTokenizer.from_pretrained(d, use_fast=True, trust_remote_code=trust)


def _by_id(vocab: Dict[str, int]) -> List[str]:
    return sorted(vocab, key=lambda t: (vocab[t], t))


def _union(base_tok, toks: Dict[str, object], sizes: Dict[str, int], trust: bool, warn):
    """The base's tokenizer plus every other model's regular tokens it lacks, then every
    model's added tokens (the first model's settings of a token win)."""
    added: Dict[str, object] = {}
    regular: Dict[str, None] = {}
    for folder, tok in toks.items():
        n = sizes[folder]
        vocab = tok.get_vocab()
        for t in _by_id(vocab):
            if vocab[t] < n:
                regular.setdefault(t)
        for i in sorted(tok.added_tokens_decoder):
            info = tok.added_tokens_decoder[i]
            if i >= n:
                continue
            if info.content in added and added[info.content] != info:
                warn(f"token {info.content!r} is added with other settings in {folder}; the first are kept")
            added.setdefault(info.content, info)
    res = _copy(base_tok, trust)
    have = base_tok.get_vocab()
    new = [t for t in regular if t not in added and t not in have]
    if new:
        res.add_tokens(new)
    if added:
        res.add_tokens(list(added.values()))
    return res


@dataclass
class Vocabulary:
    tokenizer: object  # the output tokenizer (transformers), saved into OUT
    vocab: Dict[str, int]  # token -> output id
    size: int  # rows of every vocabulary tensor in OUT (len(vocab), padded)
    perms: Dict[str, torch.Tensor]  # model folder -> int64 [len(vocab)]: its row, or -1
    originals: Dict[str, Dict[str, int]]  # model folder -> its own vocabulary
    tokens: Dict[str, TokenEmbed] = field(default_factory=dict)  # model folders resolved
    identity: Dict[str, bool] = field(default_factory=dict)

    def trivial(self, folder: str, rows: int) -> bool:
        """Whether ``folder``'s vocabulary tensors of ``rows`` rows come out unchanged."""
        return self.identity.get(folder, False) and rows == self.size


def build(base: str, folders: List[str], source: str, tokens: Dict[str, TokenEmbed],
          pad_to_multiple_of: Optional[int] = None, trust_remote_code: bool = False,
          warn: Callable[[str], None] = lambda m: None) -> Vocabulary:
    """The output vocabulary. ``base``: the base model's folder (the first model's when the
    config has none); ``folders``: every model folder the config names, in order, the base
    among them if it is one; ``source``: ``base``, ``union`` or a tokenizer folder; ``tokens``:
    the ``tokenizer: tokens:`` entries, their models as folders."""
    folders = list(dict.fromkeys([base] + list(folders)))
    base_tok = _stripped(_load(base, trust_remote_code, "base_model"), base)
    toks = {base: base_tok}
    for f in folders[1:]:
        if has_tokenizer(f):
            toks[f] = _load(f, trust_remote_code, "tokenizer")
        else:
            warn(f"{f} has no tokenizer; its vocabulary is taken to be the base model's")
    sizes = {f: config_vocab_size(f) or len(toks.get(f, base_tok).get_vocab()) for f in folders}
    if source == "base":
        out = base_tok
    elif source == "union":
        out = _union(base_tok, toks, sizes, trust_remote_code, warn)
    else:
        out = _load(source, trust_remote_code, "tokenizer_source")
    missing = [t for t in tokens if t not in out.get_vocab()]
    if missing:
        out = _copy(out, trust_remote_code) if out is base_tok else out
        out.add_tokens(missing)
    vocab = out.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise VocabError("the output tokenizer's token ids are not 0..N-1; its embedding rows "
                         "cannot be laid out")
    order = _by_id(vocab)
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    perms, originals, identity = {}, {}, {}
    for f in folders:
        own = toks.get(f, base_tok).get_vocab()
        n = sizes[f]
        rows = [own.get(t, -1) for t in order]
        perms[f] = torch.tensor([r if r < n else -1 for r in rows], dtype=torch.int64)
        originals[f] = own
        identity[f] = n == len(order) and bool(torch.equal(perms[f], torch.arange(len(order))))
    for t, cfg in tokens.items():
        if cfg.model is not None and cfg.model not in perms:
            raise VocabError(f"tokenizer.tokens[{t!r}]: model {cfg.model} is not one of the models merged")
        if cfg.kind is None and (cfg.force or any(perms[f][vocab[t]] < 0 for f in folders)):
            raise VocabError(f"tokenizer.tokens[{t!r}] needs a source (a model, {{kind: zero}} or "
                             "{kind: model_token, ...})")
        if cfg.kind == "model_token" and cfg.token is not None and cfg.token not in originals[cfg.model]:
            raise VocabError(f"tokenizer.tokens[{t!r}]: token {cfg.token!r} is not in {cfg.model}'s vocabulary")
        if cfg.kind == "model_token" and cfg.token_id is not None and cfg.token_id >= sizes[cfg.model]:
            raise VocabError(f"tokenizer.tokens[{t!r}]: token_id {cfg.token_id} is past {cfg.model}'s "
                             f"vocab_size {sizes[cfg.model]}")
        if cfg.kind == "model" and perms[cfg.model][vocab[t]] < 0:
            raise VocabError(f"tokenizer.tokens[{t!r}]: {cfg.model} does not have the token")
        if cfg.force:
            identity = {f: False for f in identity}
    return Vocabulary(out, vocab, size, perms, originals, dict(tokens), identity)


def align(v: Vocabulary, folders: List[str], tensors: List[torch.Tensor],
          base: Optional[str] = None) -> List[torch.Tensor]:
    """Each model's vocabulary tensor (rows: tokens) laid out in the output vocabulary.
    ``folders[k]`` is the model of ``tensors[k]``; ``base``: the config's base model folder
    (its rows are preferred for tokens other models lack)."""
    n = len(v.vocab)
    dtype = tensors[0].dtype
    device = tensors[0].device
    P = torch.stack([v.perms[f] for f in folders]).to(device)  # [M, n]
    present = P >= 0
    count = present.sum(0)
    forced = torch.zeros(n, dtype=torch.bool, device=device)
    # for each token some model lacks (or that is forced): the row the others take
    fill = torch.zeros((n, *tensors[0].shape[1:]), dtype=dtype, device=device)
    configured = torch.zeros(n, dtype=torch.bool, device=device)
    for t, cfg in v.tokens.items():
        i = v.vocab[t]
        configured[i] = True
        forced[i] = cfg.force
        if not cfg.force and bool(present[:, i].all()):
            continue
        if cfg.kind == "model":
            k = folders.index(cfg.model) if cfg.model in folders else None
            if k is None:
                raise VocabError(f"tokenizer.tokens[{t!r}] takes its row from {cfg.model}, which is "
                                 "not merged for this tensor")
            fill[i] = tensors[k][P[k, i]]
        elif cfg.kind == "model_token":
            if cfg.model not in folders:
                raise VocabError(f"tokenizer.tokens[{t!r}] takes its row from {cfg.model}, which is "
                                 "not merged for this tensor")
            k = folders.index(cfg.model)
            row = cfg.token_id if cfg.token_id is not None else v.originals[cfg.model][cfg.token]
            if row >= tensors[k].shape[0]:
                raise VocabError(f"tokenizer.tokens[{t!r}]: row {row} is past {cfg.model}'s "
                                 f"{tensors[k].shape[0]} rows")
            fill[i] = tensors[k][row]
    free = ~configured & (count < len(folders))
    one = free & (count == 1)
    from_base = torch.zeros_like(free)
    if base in folders:
        b = folders.index(base)
        from_base = free & (count > 1) & present[b]
        idx = from_base.nonzero().squeeze(1)
        fill[idx] = tensors[b][P[b, idx]]
    mean = free & (count > 1) & ~from_base
    acc = torch.zeros((int(mean.sum()), *tensors[0].shape[1:]), dtype=dtype, device=device)
    midx = mean.nonzero().squeeze(1)
    for k, x in enumerate(tensors):  # in model order, in the working dtype, as mergekit sums
        rows = P[k, midx]
        has = rows >= 0
        acc[has] = acc[has] + x[rows[has]]
    if midx.numel():
        fill[midx] = acc / count[midx].to(dtype).view(-1, *([1] * (acc.dim() - 1)))
    for k, x in enumerate(tensors):  # a token only one model has: that model's row
        idx = (one & present[k]).nonzero().squeeze(1)
        fill[idx] = x[P[k, idx]]
    out = []
    for k, x in enumerate(tensors):
        new = torch.zeros((v.size, *x.shape[1:]), dtype=dtype, device=device)
        keep = present[k] & ~forced
        idx = keep.nonzero().squeeze(1)
        new[idx] = x[P[k, idx]]
        other = (~keep).nonzero().squeeze(1)
        new[other] = fill[other]
        if v.size > n:  # padding rows: the mean row (mergekit, after Hewitt's vocabulary expansion)
            new[n:] = new[:n].mean(dim=0)
        out.append(new)
    return out
