"""Atomic file writes and content fingerprints.

Every artifact (ticket files, patches, reports) is written to a temporary file in the destination directory,
flushed to disk and then renamed over the destination, so a crash, a kill or a full disk leaves either the old file
or the new one — never half of one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_path", "tensor_fingerprint", "file_fingerprint"]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see module docstring)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see module docstring)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def tensor_fingerprint(tensor: torch.Tensor, *, chunk_rows: int = 4096) -> str:
    """A content hash of a tensor (shape, dtype and every byte), e.g. to tie a ticket file to its base embedding.

    BLAKE2b-128 over the raw bytes, read in row chunks so no copy of the whole tensor is made.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(tensor.shape)}|{str(tensor.dtype).removeprefix('torch.')}|".encode())
    flat = tensor.detach().reshape(tensor.shape[0], -1) if tensor.dim() > 0 else tensor.detach().reshape(1, 1)
    for start in range(0, flat.shape[0], chunk_rows):
        chunk = flat[start : start + chunk_rows].contiguous().cpu()
        digest.update(chunk.view(torch.uint8).numpy().tobytes())
    return f"blake2b-128:{digest.hexdigest()}"


def file_fingerprint(*paths: Path) -> str:
    """A content hash of one or more files (e.g. the files that define a tokenizer)."""
    digest = hashlib.blake2b(digest_size=16)
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return f"blake2b-128:{digest.hexdigest()}"
