"""Lake reads: catalogue aggregates, gallery images and the similarity index of catalogue embeddings."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from botocore.exceptions import BotoCoreError, ClientError

from dash_app.data.services import Services
from lib.data import lake
from lib.data.layout import image_key
from lib.data.storage import get_bytes
from lib.features.catalogue import current_catalogue
from lib.features.embed import to_matrix
from lib.model import classify

# Product columns of the catalogue view.
CATALOGUE_COLUMNS = [
    "productid", "batch_id", "prdtypecode", "designation_clean", "description_clean", "image_key",
    "image_sha256", "has_image",
]  # fmt: skip
# Columns of a similarity index's products (what the similar-products grid shows).
INDEX_COLUMNS = ["productid", "prdtypecode", "designation", "image_sha256", "has_image"]
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Characters of a description kept for display in the catalogue grid.
DESCRIPTION_PREVIEW_CHARS = 160


@dataclass
class Catalogue:
    """Aggregates of the current catalogue plus a bounded per-class sample for the product grid."""

    products: int
    labelled: int
    with_image: int
    class_counts: dict[int, int]
    manifests: list[dict]
    samples: pd.DataFrame

    @property
    def image_coverage(self) -> float:
        return self.with_image / self.products if self.products else 0.0

    @property
    def imbalance_ratio(self) -> float | None:
        counts = [n for n in self.class_counts.values() if n > 0]
        return max(counts) / min(counts) if counts else None

    @property
    def latest_manifest(self) -> dict | None:
        return self.manifests[-1] if self.manifests else None


@dataclass
class SimilarityIndex:
    """A bounded sample of catalogue embeddings (unit rows; zero rows for a missing modality)."""

    products: pd.DataFrame  # INDEX_COLUMNS
    text: np.ndarray  # (n, text_dim)
    image: np.ndarray  # (n, image_dim)
    total: int = 0  # catalogue products the sample was drawn from

    @classmethod
    def empty(cls, total: int = 0) -> SimilarityIndex:
        none = np.zeros((0, 0), np.float32)
        return cls(pd.DataFrame(columns=INDEX_COLUMNS), none, none.copy(), total)

    def top(self, query_text: np.ndarray | None, query_image: np.ndarray | None, k: int) -> pd.DataFrame:
        """The ``k`` nearest products: mean cosine over the query's modalities."""
        parts = []
        if len(self.products) and query_text is not None:
            parts.append(self.text @ query_text.reshape(-1))  # (n,)
        if len(self.products) and query_image is not None:
            parts.append(self.image @ query_image.reshape(-1))  # (n,)
        if not parts:  # an empty index (no dimension known) or an empty query
            return self.products.head(0).assign(similarity=pd.Series(dtype=float))
        score = np.mean(parts, axis=0)
        order = np.argsort(-score)[:k]
        return self.products.iloc[order].assign(similarity=score[order]).reset_index(drop=True)


def sample_per_class(products: pd.DataFrame, per_class: int) -> pd.DataFrame:
    """Up to ``per_class`` products of each class, in a stable pseudo-random order (with images first)."""
    if products.empty:
        return products
    order = pd.util.hash_pandas_object(products["productid"], index=False).to_numpy()
    shuffled = products.assign(_order=order, _no_image=~products["has_image"].fillna(False).astype(bool))
    shuffled = shuffled.sort_values(["_no_image", "_order"], kind="stable")
    return shuffled.groupby("prdtypecode", dropna=True).head(per_class).drop(columns=["_order", "_no_image"])


def summarise_catalogue(products: pd.DataFrame, manifests: list[dict], per_class: int) -> Catalogue:
    """Counts of the current products and up to ``per_class`` labelled products of each class."""
    if products.empty:
        return Catalogue(0, 0, 0, {}, manifests, pd.DataFrame(columns=CATALOGUE_COLUMNS))
    has_image = products["has_image"].fillna(False).astype(bool)
    labelled = products["prdtypecode"].notna()
    counts = products.loc[labelled, "prdtypecode"].astype(int).value_counts().sort_index()
    samples = sample_per_class(products[labelled], per_class).copy()
    samples["description_clean"] = (
        samples["description_clean"].fillna("").str.slice(0, DESCRIPTION_PREVIEW_CHARS)
    )
    return Catalogue(
        products=len(products),
        labelled=int(labelled.sum()),
        with_image=int(has_image.sum()),
        class_counts={int(k): int(v) for k, v in counts.items()},
        manifests=manifests,
        samples=samples.reset_index(drop=True),
    )


class LakeReader:
    """The catalogue, its images and its embeddings, read from the lake bucket."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings

    def catalogue(self) -> Catalogue:
        """Counts, manifests and a per-class sample of the current catalogue (cached)."""
        return self.services.cached(("catalogue",), "s3", "the lake", self._read_catalogue)

    def _read_catalogue(self) -> Catalogue:
        s3 = self.services.s3
        manifests = lake.committed_manifests(s3, self.settings)
        products = lake.current_products(s3, self.settings, CATALOGUE_COLUMNS, manifests)
        return summarise_catalogue(products, manifests, self.settings.dash_grid_products)

    def classified(self) -> list[classify.ClassifiedBatch]:
        """Committed bulk classifications, newest first (cached)."""
        return self.services.cached(
            ("classified",),
            "s3",
            "bulk classifications",
            lambda: classify.committed_batches(self.services.s3, self.settings),
        )

    def classified_confidence(self, batch_id: str) -> pd.DataFrame:
        """Confidence and abstention of one classification's predictions (a committed one never changes)."""
        columns = ["confidence", "abstained", "model_version"]
        return self.services.cached(
            ("classified", batch_id), "s3", "a classification",
            lambda: classify.read_predictions(self.services.s3, self.settings, batch_id, columns),
        )  # fmt: skip

    def submission(self, batch_id: str) -> bytes:
        """A classification's submission.csv."""
        return self.services.guard(
            "s3",
            "a submission file",
            lambda: classify.submission_bytes(self.services.s3, self.settings, batch_id),
        )

    def image(self, sha256: str) -> bytes | None:
        """The bytes of one lake image (content-addressed), or None if absent or not a SHA-256."""
        if not SHA256_RE.match(sha256):
            return None
        try:
            return get_bytes(self.services.s3, self.settings.bucket_lake, image_key(sha256))
        except (ClientError, BotoCoreError):  # absent, or S3 down: the page shows a broken tile, no error
            return None

    def similarity_index(self) -> SimilarityIndex:
        """A bounded, cached sample of the catalogue's embeddings for the configured encoder set."""
        return self.services.cached(("index",), "s3", "catalogue embeddings", self._similarity_index)

    def _similarity_index(self) -> SimilarityIndex:
        s3 = self.services.s3
        current = current_catalogue(s3, self.settings)
        if current.products.empty:
            return SimilarityIndex.empty()
        has_image = current.inputs["has_image"].to_numpy()
        inputs = current.inputs.assign(
            designation=current.products["designation_clean"].to_numpy(),
            image_sha256=current.products["image_sha256"].where(has_image).to_numpy(),
        )
        # embed_hash is a uniform hash: its order is a stable random sample, the same on every refresh.
        sample = inputs.sort_values("embed_hash").head(self.settings.dash_similarity_rows)
        sample = sample[["embed_hash", *INDEX_COLUMNS]]
        # Only the sample's vectors are read (streamed); products without a stored embedding drop out.
        found = current.embedded(s3, self.settings, ["text_emb", "image_emb"], rows=sample)
        if found.empty:  # no vector: no dimension known either
            return SimilarityIndex.empty(total=len(inputs))
        return SimilarityIndex(
            found[INDEX_COLUMNS].reset_index(drop=True),
            to_matrix(found["text_emb"], 0),
            to_matrix(found["image_emb"], 0),
            total=len(inputs),
        )
