"""The model card (README.md) ``fastmerge merge`` writes next to a merge, as ``mergekit-yaml``
does: a YAML header the Hugging Face hub reads (``base_model``: the hub repositories merged,
``tags``, ``library_name``), the method and base, the models, and the configuration.

Which references are hub repositories is known from the config as written (a hub id is not an
existing local path, see :mod:`fastmerge.hub`): no network request is made.
"""
from __future__ import annotations

from typing import List

import yaml

from . import _registry as R
from . import hub

# where a method is described (the paper or mergekit's docs), for the card's link
_DOCS = "https://github.com/arcee-ai/mergekit#merge-methods"


def _link(ref: str) -> str:
    return f"[{ref}](https://huggingface.co/{hub.split(ref)[0]})" if hub.is_hub_id(ref) else ref


def _referenced(cfg) -> List[str]:
    """Every model the config names, in order of first mention, without repeats."""
    found = [p for _, p in cfg.paths()]
    return list(dict.fromkeys(found))


def model_card(cfg, name: str = "") -> str:
    """README.md for the merge ``cfg`` (the :class:`fastmerge.mergeconfig.MergeConfig` as read
    from its YAML, before hub ids are resolved)."""
    refs = _referenced(cfg)
    hubs = [hub.split(r)[0] for r in refs if hub.is_hub_id(r)]
    base = cfg.base if cfg.base is not None and R.get(cfg.method).base != "none" else None
    meta = {"base_model": hubs, "library_name": "transformers", "tags": ["merge", "mergekit", "fastmerge"]}
    using = f", with {_link(base)} as the base" if base is not None else ""
    others = "\n".join(f"* {_link(r)}" for r in refs if r != base) or "* (none besides the base)"
    config = cfg.source if cfg.source.endswith("\n") else cfg.source + "\n"
    return (f"---\n{yaml.safe_dump(meta, sort_keys=True)}---\n"
            f"# {name or 'Merged model'}\n\n"
            "This model is a merge of pre-trained language models, made with "
            "[fastmerge](https://pypi.org/project/fastmerge/) (fused kernels for mergekit's merge "
            "methods) from a [mergekit](https://github.com/arcee-ai/mergekit) configuration.\n\n"
            "## Merge details\n\n"
            f"Merge method: [{cfg.method}]({_DOCS}){using}.\n\n"
            "Models merged:\n\n"
            f"{others}\n\n"
            "## Configuration\n\n"
            "The YAML configuration that produced this model:\n\n"
            f"```yaml\n{config}```\n")
