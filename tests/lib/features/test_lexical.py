"""The TF-IDF block: fitted on what it is given only, unit rows, exact round trip, sparse projection."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from lib.features.lexical import LexicalFeatures, LexicalSpec, analyzer_view
from lib.model.network import SparseBatch

SPEC = LexicalSpec(word_ngrams=(1, 2), char_ngrams=(2, 4), min_df=1, max_features=5000)
TRAIN_TEXTS = [
    "Manette PS4 sans fil noire",
    "Jeu PS4 Fifa 2019 édition standard",
    "Voiture miniature 1/43 Renault Alpine",
    "Miniature 1/43 Peugeot 205 rouge",
    "Piscine tubulaire ronde 3 m",
]


def test_rows_are_unit_norm_and_empty_text_is_a_zero_row():
    features = LexicalFeatures.fit(TRAIN_TEXTS, SPEC)
    rows = features.transform([*TRAIN_TEXTS, ""])
    assert isinstance(rows, sp.csr_matrix) and rows.dtype == np.float32 and rows.shape[1] == features.dim
    norms = np.sqrt(rows.multiply(rows).sum(1)).A1
    assert np.allclose(norms[:-1], 1.0, atol=1e-5) and norms[-1] == 0


def test_vocabulary_comes_only_from_the_fitted_texts():
    features = LexicalFeatures.fit(TRAIN_TEXTS, SPEC)
    words = features.vectorizers[0].vocabulary_
    assert "ps4" in words and "43" in words  # codes and scales survive as terms
    assert "zzyzx" not in words
    unseen = features.transform(["zzyzx qwv"])  # nothing of it was fitted: an all-zero word block
    assert unseen[:, : len(words)].nnz == 0


def test_every_block_equals_scikit_learns_transform_exactly_batched_or_one_by_one():
    features = LexicalFeatures.fit(TRAIN_TEXTS, SPEC)
    probe = [
        "MANETTE ps4 Sans-Fil  noire\tédition\n1/43", "a b", "", "   ", "Peugeot\u00a0205 rouge rouge rouge",
        "Jeu PS4 Fifa 2019 ; Jeu PS4", "Œuvre déjà vue x",
    ]  # fmt: skip
    for _ in range(2):  # cold, then with every word's columns remembered
        for texts in (probe, probe[:1], probe[4:5]):
            # scikit-learn's transform of each block, assembled as LexicalFeatures does.
            pairs = zip(features.vectorizers, features.analyzers, strict=True)
            blocks = [v.transform(analyzer_view(texts, a)) for v, a in pairs]
            reference = (sp.hstack(blocks, format="csr", dtype=np.float32) * np.float32(3**-0.5)).tocsr()
            fast = features.transform(texts)
            assert np.array_equal(fast.indptr, reference.indptr)
            assert np.array_equal(fast.indices, reference.indices)
            assert np.array_equal(fast.data, reference.data)  # bit for bit


def test_save_and_load_give_exactly_the_same_features(tmp_path):
    features = LexicalFeatures.fit(TRAIN_TEXTS, SPEC)
    features.save(tmp_path)
    loaded = LexicalFeatures.load(tmp_path)
    probe = ["Manette PS4 édition 1/43", "texte inconnu", ""]
    a, b = features.transform(probe), loaded.transform(probe)
    assert loaded.spec == SPEC and loaded.dim == features.dim
    assert (a != b).nnz == 0
    assert not list(tmp_path.glob("*.pkl"))  # plain files, nothing that runs code on load


def test_sparse_batch_projection_equals_the_dense_product():
    rows = LexicalFeatures.fit(TRAIN_TEXTS, SPEC).transform(TRAIN_TEXTS)
    bag = torch.nn.EmbeddingBag(rows.shape[1], 7, mode="sum")
    batch = SparseBatch.from_csr(rows)
    sparse = bag(batch.indices, batch.offsets, batch.weights)
    dense = torch.from_numpy(rows.toarray()) @ bag.weight
    assert sparse.shape == (len(TRAIN_TEXTS), 7)
    assert torch.allclose(sparse, dense, atol=1e-6)
