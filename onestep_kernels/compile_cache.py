"""Keeps torch.compile's on-disk caches from reusing graphs built with other versions of
onestep's ops.

The caches key a graph on the custom ops it calls by name and schema, not on their Python
autograd formulas or launchers (pytorch/pytorch#144344): after onestep's ops change (an
upgrade, an edit), a cached backward graph of the old formulas could be loaded, wrong in its
shapes or, silently, in its numbers. `tag_once` adds a digest of the ops' sources (the op
modules and op_spec.py, which builds their autograd formulas) to
`torch.compiler.config.cache_key_tag` (after any tag of the user's), so a change of them means
a fresh compile.

It runs when an op is first traced (from the registered ops' fake implementations, which
every trace runs before any cache key is computed), not at import: importing onestep changes
no process-wide setting, and a process that never compiles an op keeps its tag as it was.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCES = (PACKAGE_DIR / "ops", PACKAGE_DIR / "op_spec.py")


def source_digest(sources=SOURCES) -> str:
    """A short digest of the .py files among `sources` (files, or directories' .py files; by
    name and contents, in order)."""
    digest = hashlib.sha256()
    for source in map(Path, sources):
        for path in sorted(source.glob("*.py")) if source.is_dir() else [source]:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def tag_compile_caches(sources=SOURCES) -> str | None:
    """Add "onestep-<digest>" to torch.compile's cache key tag (once); returns the tag, or None
    where this torch has no such setting."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return None
    mark = f"onestep-{source_digest(sources)}"
    tag = config.cache_key_tag
    if mark not in tag.split("+"):
        config.cache_key_tag = f"{tag}+{mark}" if tag else mark
    return config.cache_key_tag


_tagged = [False]


def tag_once() -> None:
    """tag_compile_caches() the first time it is called in this process (op_spec calls it
    from every registered op's fake, so the first trace of an op tags the caches)."""
    if not _tagged[0]:
        tag_compile_caches()
        _tagged[0] = True
