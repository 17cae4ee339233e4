"""Warm starts for `dpcompile train --resume`: Inductor's cache artifacts kept next to the checkpoint.

Most of a GPU run's wait before its first step is the compile (SmolLM2-135M: about 4 minutes on an H100 with empty
caches, under a minute with Inductor's caches of an earlier run; docs/results.md). Those caches live on the machine
that compiled. torch.compiler.save_cache_artifacts() serializes what this process compiled (Inductor's FX graph
cache entries, AOTAutograd's, autotuning results), and load_cache_artifacts() puts them into the local caches of
another process or machine, so a run resumed elsewhere finds its graphs compiled. Entries are looked up by the same
keys as Inductor's own caches, which include the DP pass's identity (passes.source_hash and the pass context), so an
artifact of other code or other options is never served: it is only a miss.

A run of the `flashdp_eager` backend (the CPU default) compiles no Inductor graph and leaves no artifacts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

ARTIFACTS_NAME = "compile_cache.bin"


def _describe(info) -> str:
    counts = {name: len(getattr(info, name, None) or ()) for name in
              ("inductor_artifacts", "aot_autograd_artifacts", "autotune_artifacts")}
    return ", ".join(f"{n} {name.split('_artifacts')[0]}" for name, n in counts.items() if n) or "no entries"


def save(out_dir: Path) -> Optional[str]:
    """Write this process's compile artifacts to out_dir; what was written (for the log), or None if nothing was
    compiled through Inductor. A stale file from an earlier save is replaced."""
    saved = torch.compiler.save_cache_artifacts()
    path = Path(out_dir) / ARTIFACTS_NAME
    if saved is None:
        return None
    data, info = saved
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return f"{len(data) / 2**20:.1f} MiB ({_describe(info)})"


def load(checkpoint_dir: Path) -> Optional[str]:
    """Load the artifacts a checkpoint carries into this process's caches; what was loaded (for the log), or None
    when there are none. Artifacts that cannot be loaded (another torch version, a damaged file) are reported and
    skipped: the run then compiles from scratch, which is slower but the same graphs."""
    path = Path(checkpoint_dir) / ARTIFACTS_NAME
    if not path.is_file():
        return None
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - any failure here only costs compile time
        return f"not loaded ({type(exc).__name__}: {exc}); the first step compiles from scratch"
    if info is None:  # torch warns and returns None for a file it cannot read
        return "nothing loaded (torch could not read the file); the first step compiles from scratch"
    return _describe(info)
