"""Keeps torch.compile's on-disk caches from reusing graphs built with other versions of these
ops.

The caches key a graph on the custom ops it calls by name and schema, not on their Python
autograd formulas or launchers (pytorch/pytorch#144344): after onestep's ops change (an
upgrade, an edit), a cached backward graph of the old formulas could be loaded, wrong in its
shapes or, silently, in its numbers. This module adds a digest of the op modules' sources to
`torch.compiler.config.cache_key_tag` (after any tag of the user's), so a change of them means a
fresh compile.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

OPS_DIR = Path(__file__).resolve().parent


def source_digest(directory: Path = OPS_DIR) -> str:
    """A short digest of every .py file in `directory` (names and contents, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def tag_compile_caches(directory: Path = OPS_DIR) -> str | None:
    """Add "onestep-<digest>" to torch.compile's cache key tag (once); returns the tag, or None
    where this torch has no such setting."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return None
    mark = f"onestep-{source_digest(directory)}"
    tag = config.cache_key_tag
    if mark not in tag.split("+"):
        config.cache_key_tag = f"{tag}+{mark}" if tag else mark
    return config.cache_key_tag
