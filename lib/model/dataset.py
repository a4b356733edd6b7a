"""The training dataset: the labelled current catalogue with its embeddings, split and TF-IDF block."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from lib.data.text import lexical_text
from lib.features.catalogue import current_catalogue
from lib.features.embed import to_matrix
from lib.features.lexical import LexicalFeatures, LexicalSpec
from lib.model.experts import Inputs
from lib.model.split import TEST, TRAIN, VAL, assign_splits
from lib.settings import Settings


@dataclass
class Dataset:
    """Embeddings, labels and split of the labelled catalogue (row i of every array is one product)."""

    text: np.ndarray  # (n, text_dim) float32
    image: np.ndarray  # (n, image_dim) float32
    y: np.ndarray  # (n,) int64 label index into ``codes``
    split: np.ndarray  # (n,) "train" | "val" | "test"
    productid: np.ndarray  # (n,) int64
    codes: list[int]  # label index → prdtypecode
    fingerprint: str = ""
    texts: np.ndarray | None = None  # (n,) str: each product's lexical text (lib.data.text.lexical_text)
    lexical: sp.csr_matrix | None = None  # (n, lexical_dim) TF-IDF rows, once with_lexical ran
    lexical_features: LexicalFeatures | None = None  # the fitted block (saved with a lexical model)

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mask = self.split == name
        return self.text[mask], self.image[mask], self.y[mask]

    def lexical_part(self, name: str) -> sp.csr_matrix | None:
        return None if self.lexical is None else self.lexical[self.split == name]

    def texts_part(self, name: str) -> list[str] | None:
        return None if self.texts is None else list(self.texts[self.split == name])

    @property
    def lexical_dim(self) -> int:
        return 0 if self.lexical is None else self.lexical.shape[1]

    def inputs(self, mask: np.ndarray | None = None) -> Inputs:
        """The experts' inputs of the rows in ``mask`` (all rows: None; the TF-IDF block must have been
        added)."""
        if mask is None:
            return Inputs(self.lexical, self.text, self.image)
        return Inputs(self.lexical[mask], self.text[mask], self.image[mask])

    def take(self, rows: np.ndarray) -> Dataset:
        """These rows only, without the texts and the fitted TF-IDF block (what a trial reads)."""
        lexical = None if self.lexical is None else self.lexical[rows]
        return replace(self, text=self.text[rows], image=self.image[rows], y=self.y[rows],
                       split=self.split[rows], productid=self.productid[rows], texts=None,
                       lexical=lexical, lexical_features=None)  # fmt: skip

    def counts(self) -> dict[str, int]:
        return {name: int((self.split == name).sum()) for name in (TRAIN, VAL, TEST)}


def build_dataset(
    embeddings: pd.DataFrame,
    text_dim: int,
    image_dim: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> Dataset:
    """Labelled rows of ``embeddings`` (productid, prdtypecode, embed_hash, text_emb, image_emb[, text])."""
    labelled = embeddings[embeddings["prdtypecode"].notna()].sort_values("productid").reset_index(drop=True)
    codes = sorted(int(c) for c in labelled["prdtypecode"].unique())
    index = {code: i for i, code in enumerate(codes)}
    productid = labelled["productid"].to_numpy(np.int64)
    # What a model trained on these rows depends on: the split, each row's inputs and its label (a batch
    # that only corrects labels must retrain).
    rows = [f"{h}:{int(c)}" for h, c in zip(labelled["embed_hash"], labelled["prdtypecode"], strict=True)]
    fingerprint = hashlib.sha256("\n".join([f"{seed}:{val_fraction}:{test_fraction}", *rows]).encode())
    fingerprint = fingerprint.hexdigest()[:16]
    return Dataset(
        text=to_matrix(labelled["text_emb"], text_dim),
        image=to_matrix(labelled["image_emb"], image_dim),
        y=np.array([index[int(c)] for c in labelled["prdtypecode"]], dtype=np.int64),
        split=assign_splits(productid, seed, val_fraction, test_fraction),
        productid=productid,
        codes=codes,
        fingerprint=fingerprint,
        texts=labelled["text"].to_numpy(object) if "text" in labelled else None,
    )


def with_lexical(data: Dataset, spec: LexicalSpec) -> Dataset:
    """Fit the TF-IDF block on the training split's texts; add it and every product's rows to the dataset."""
    if data.texts is None:
        raise ValueError("the dataset has no product texts: build it from rows with a 'text' column")
    features = LexicalFeatures.fit(data.texts_part(TRAIN), spec)
    return replace(data, lexical=features.transform(list(data.texts)), lexical_features=features)


def load_dataset(client, settings: Settings) -> tuple[Dataset, dict]:
    """The labelled current catalogue joined with its embeddings, and its lineage.

    With ``settings.lexical_enabled``, the TF-IDF block is fitted on the training split and added.
    """
    data, lineage = _embedded_dataset(client, settings)
    # The catalogue's frames and the embeddings' Arrow buffers are freed by now; Arrow's allocator keeps
    # freed pages for reuse unless told: hand them back before the TF-IDF fit, the load's largest moment.
    pa.default_memory_pool().release_unused()
    if settings.lexical_enabled and len(data.y):
        data = with_lexical(data, LexicalSpec.from_settings(settings))
    counts = pd.Series(data.y).value_counts()
    lineage |= {
        "class_counts": {str(data.codes[i]): int(n) for i, n in counts.sort_index().items()},
        "imbalance_ratio": float(counts.max() / counts.min()) if len(counts) else 0.0,
        "split_counts": data.counts(),
        "data_fingerprint": data.fingerprint,
        "lexical_dim": data.lexical_dim,
    }
    return data, lineage


def _embedded_dataset(client, settings: Settings) -> tuple[Dataset, dict]:
    """The dataset without its TF-IDF block, and the lineage of the catalogue it came from."""
    catalogue = current_catalogue(client, settings)
    joined = catalogue.embedded(client, settings, ["text_emb", "image_emb"])
    # The TF-IDF block reads the whole title + description, not the encoder's shortened text.
    products = catalogue.products.set_index("productid")
    joined["text"] = [
        lexical_text(
            products.at[p, "designation_clean"],
            products.at[p, "description_clean"],
            settings.lexical_max_chars,
        )
        for p in joined["productid"]
    ]
    text_id, image_id = catalogue.text_id, catalogue.image_id
    data = build_dataset(
        joined, text_id.dim, image_id.dim, settings.split_seed, settings.val_fraction, settings.test_fraction
    )
    lineage = {
        "encoder_set_id": catalogue.set_id,
        "text_encoder": text_id.key,
        "image_encoder": image_id.key,
        "text_dim": text_id.dim,
        "image_dim": image_id.dim,
        "batch_ids": catalogue.batch_ids,
        "products": len(data.y),
        "products_without_embedding": int(catalogue.inputs["prdtypecode"].notna().sum()) - len(data.y),
    }
    return data, lineage
