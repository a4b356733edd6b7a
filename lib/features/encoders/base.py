"""What every encoder shares: its identity, the text/image protocols and output normalisation.

An embedding is only comparable with embeddings of the same encoder, weights and preprocessing, so each
encoder carries an :class:`EncoderId`; the pair of ids names the embedding set stored in the lake.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

# Derived encoder files (exports, caches) are read by every worker, whatever user it runs as.
CACHE_FILE_MODE = 0o644
# Hex characters of the set id: 48 bits is plenty for a handful of encoder pairs and stays readable in paths.
SET_ID_HEX_CHARS = 12


class EncoderUnavailable(RuntimeError):
    """The encoder cannot be built here (typically: pretrained weights are not available offline)."""


@dataclass(frozen=True)
class EncoderId:
    """Identity of an embedding space: model, weights/code version, output size and input preprocessing."""

    name: str
    version: str
    dim: int
    preprocessing: str

    @property
    def key(self) -> str:
        """Short stable string, e.g. ``use-m3@0.2.1/512/title+desc300``."""
        return f"{self.name}@{self.version}/{self.dim}/{self.preprocessing}"


def encoder_set_id(text: EncoderId, image: EncoderId) -> str:
    """Stable id of a (text, image) encoder pair, safe as an S3 path component (12 hex characters)."""
    digest = hashlib.sha256(f"text={text.key}\nimage={image.key}".encode()).hexdigest()
    return digest[:SET_ID_HEX_CHARS]


def package_version(distribution: str) -> str:
    """Installed version of a distribution, or ``unknown`` (an id must still be buildable)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[str]:
    """A temporary name next to ``path`` to write to; it becomes ``path`` only if the block succeeds.

    Concurrent workers may each build the same cache file, but a reader only ever opens a complete one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp_name
        os.chmod(tmp_name, CACHE_FILE_MODE)  # mkstemp creates 0600
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as float32; all-zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


@runtime_checkable
class TextEncoder(Protocol):
    """Texts to L2-normalised float32 rows of shape (n, id.dim)."""

    id: EncoderId

    def encode(self, texts: list[str]) -> np.ndarray: ...


@runtime_checkable
class ImageEncoder(Protocol):
    """Encoded image bytes (JPEG, PNG, ...) to L2-normalised float32 rows of shape (n, id.dim)."""

    id: EncoderId

    def encode(self, images: list[bytes]) -> np.ndarray: ...
