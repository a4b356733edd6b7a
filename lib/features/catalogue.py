"""The current catalogue with its embeddings: the one place that joins products to their vectors.

encoder ids → encoder set id → committed batches → current products → embedding inputs (what each
product's embedding depends on) → the committed embedding rows of those inputs. The embed stage reads it
to find what is missing, training to build its dataset, the dashboard for its similarity index.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from lib.data import lake
from lib.features.embed import PRODUCT_COLUMNS, embedding_inputs, read_embeddings
from lib.features.encoders import EncoderId, encoder_ids, encoder_set_id
from lib.settings import Settings


@dataclass
class CurrentCatalogue:
    """The current products of the lake and their embedding inputs for one encoder set."""

    text_id: EncoderId
    image_id: EncoderId
    set_id: str
    manifests: list[dict]  # committed batch manifests, oldest first
    products: pd.DataFrame  # PRODUCT_COLUMNS of each current product
    inputs: pd.DataFrame  # row i: product i's encoder inputs and embedding hash (see embedding_inputs)

    @property
    def batch_ids(self) -> list[str]:
        return [m["batch_id"] for m in self.manifests]

    def missing(self, client, settings: Settings) -> pd.DataFrame:
        """Inputs whose embedding is not stored yet (what the embed stage encodes)."""
        done = set(read_embeddings(client, settings, self.set_id, ["embed_hash"])["embed_hash"])
        return self.inputs[~self.inputs["embed_hash"].isin(done)].reset_index(drop=True)

    def embedded(
        self, client, settings: Settings, columns: list[str], rows: pd.DataFrame | None = None
    ) -> pd.DataFrame:
        """``rows`` of the inputs (default: all) joined with their stored embedding ``columns``.

        Products without a stored embedding are left out. Given ``rows``, only their embeddings are read.
        """
        hashes = None if rows is None else rows["embed_hash"].tolist()
        vectors = read_embeddings(client, settings, self.set_id, ["embed_hash", *columns], hashes)
        return (self.inputs if rows is None else rows).merge(vectors, on="embed_hash", how="inner")


def current_catalogue(client, settings: Settings, batch_id: str | None = None) -> CurrentCatalogue:
    """The current catalogue for the configured encoders (only one batch's products with ``batch_id``)."""
    text_id, image_id = encoder_ids(settings)
    set_id = encoder_set_id(text_id, image_id)
    manifests = lake.committed_manifests(client, settings)
    products = lake.current_products(client, settings, PRODUCT_COLUMNS, manifests)
    if batch_id is not None:
        products = products[products["batch_id"] == batch_id].reset_index(drop=True)
    inputs = embedding_inputs(products, settings, set_id)
    return CurrentCatalogue(text_id, image_id, set_id, manifests, products, inputs)
