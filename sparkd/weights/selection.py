"""Which of a hub repository's files vLLM loads: one weight format, plus config, tokenizer and templates.

A repository often carries the same weights several times (safetensors beside
``pytorch_model.bin``, GGUF or ONNX exports, an ``original/`` copy): only one format
is pulled, the first of ``WEIGHT_FORMATS`` the repository has, and with a shard index
only the shards it names (a Mistral repository's ``consolidated.safetensors`` beside
its Hugging Face shards is the same checkpoint again).  Top-level files only: vLLM
loads a repository's root, the sub-folders hold other exports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

WEIGHT_FORMATS = (".safetensors", ".bin", ".pt", ".pth")
"""In order of preference; a repository's first present format is the one pulled."""
INDEX_SUFFIX = ".index.json"
METADATA_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".py")
"""Config, generation config, tokenizer files, chat templates, custom model code."""
NOT_FOR_VLLM = frozenset({"README.md", ".gitattributes", "LICENSE", "LICENSE.txt", "USE_POLICY.md", "NOTICE.txt"})


@dataclass(frozen=True)
class RepoFile:
    name: str
    size: int


def is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_FORMATS) or (name.endswith(INDEX_SUFFIX) and name[: -len(INDEX_SUFFIX)].endswith(WEIGHT_FORMATS))


def weight_format(files: list[RepoFile]) -> str | None:
    """The suffix of the weights that will be pulled, None when the repository has none vLLM loads."""
    names = {f.name for f in files if "/" not in f.name}
    return next((suffix for suffix in WEIGHT_FORMATS if any(n.endswith(suffix) for n in names)), None)


def select_files(files: list[RepoFile], index_text: str | None = None) -> list[RepoFile]:
    """The files to pull, in the repository's order.

    ``index_text``: the content of the chosen format's shard index, when the repository
    has one (``model.safetensors.index.json``): only the shards it names are taken.
    """
    top = [f for f in files if "/" not in f.name and f.name not in NOT_FOR_VLLM]
    chosen = weight_format(top)
    shards = shard_names(index_text) if index_text is not None else None
    selected = []
    for f in top:
        if is_weight(f.name):
            if chosen is None or not f.name.removesuffix(INDEX_SUFFIX).endswith(chosen):
                continue
            if shards is not None and not f.name.endswith(INDEX_SUFFIX) and f.name not in shards:
                continue
            selected.append(f)
        elif f.name.endswith(METADATA_SUFFIXES):
            selected.append(f)
    return selected


def index_file(files: list[RepoFile]) -> str | None:
    """The shard index of the format that will be pulled, if the repository has one."""
    chosen = weight_format(files)
    if chosen is None:
        return None
    return next((f.name for f in files if "/" not in f.name and f.name.endswith(chosen + INDEX_SUFFIX)), None)


def shard_names(index_text: str) -> frozenset[str]:
    """The shard files a ``*.index.json`` names (its ``weight_map`` values); empty for a broken index."""
    try:
        document = json.loads(index_text)
    except ValueError:
        return frozenset()
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict):
        return frozenset()
    return frozenset(str(PurePosixPath(v)) for v in weight_map.values() if isinstance(v, str))
