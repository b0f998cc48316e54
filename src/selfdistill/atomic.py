"""Atomic file writes: a reader (a resumed job, a dashboard, another rank) sees the old file or the
new one, never half of one. The temp file lives in the target's directory so ``os.replace`` is a
rename on the same file system. Every file the project writes goes through here."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "torch_save_atomic", "write_json_atomic", "write_safetensors_atomic", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; fsynced and renamed onto ``path``
    when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=indent) + "\n")


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None
                             ) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` of plain tensors and values (read back with ``weights_only=True``)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
