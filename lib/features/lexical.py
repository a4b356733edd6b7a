"""Lexical text features: TF-IDF over word and character n-grams, fitted on the training split only.

Sentence encoders blur what product titles carry most: codes, brands, model numbers (``PS4``, ``1/43``,
``Xbox-360``). A TF-IDF view keeps them; next to the two embeddings it lifts F1-macro on real Rakuten
data (README, "Model quality"). The vocabulary and IDF weights are saved with the model as plain files
(vocabulary JSON + IDF arrays, no pickle), so serving computes exactly the training features and a
registry artifact cannot run code when loaded.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lib.data.text import TITLE_SEPARATOR
from lib.settings import Settings

VOCABULARY_FILE = "lexical.json"
IDF_FILE = "lexical_idf.npz"
# Word and character n-grams of the whole lexical text, and character n-grams of its title alone (titles
# carry the codes and brands; a block of their own lifts F1-macro by about 0.015 on the real sample).
ANALYZERS = ("word", "char_wb", "title_char_wb")
# Words whose n-gram columns a character block remembers (words repeat across products): tens of MB at most.
WORD_CACHE_SIZE = 200_000


@dataclass(frozen=True)
class LexicalSpec:
    """How the TF-IDF block is built (saved with the model)."""

    word_ngrams: tuple[int, int]
    char_ngrams: tuple[int, int]
    min_df: int
    max_features: int  # per analyzer: the block has at most 2 × max_features columns

    @classmethod
    def from_settings(cls, settings: Settings) -> LexicalSpec:
        return cls(
            word_ngrams=(1, settings.lexical_word_ngram_max),
            char_ngrams=(settings.lexical_char_ngram_min, settings.lexical_char_ngram_max),
            min_df=settings.lexical_min_df,
            max_features=settings.lexical_max_features,
        )


def analyzer_view(texts: Sequence[str], analyzer: str) -> list[str]:
    """The part of each lexical text an analyzer reads: the title for the title block, else all of it."""
    if analyzer == "title_char_wb":
        return [t.split(TITLE_SEPARATOR, 1)[0] for t in texts]
    return [t.replace(TITLE_SEPARATOR, " ") for t in texts]


def _vectorizer(spec: LexicalSpec, analyzer: str, vocabulary: dict[str, int] | None = None):
    # lazy: scikit-learn takes about a second to import; a Serve replica pays it only for a lexical head
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(
        analyzer=analyzer.removeprefix("title_"),
        ngram_range=tuple(spec.word_ngrams if analyzer == "word" else spec.char_ngrams),
        min_df=spec.min_df,
        max_features=spec.max_features,
        sublinear_tf=True,  # a word repeated ten times in a description is not ten times the evidence
        dtype=np.float32,
        vocabulary=vocabulary,
    )


class LexicalFeatures:
    """A fitted TF-IDF block: texts → (n, dim) CSR float32 rows of unit L2 norm (zero rows for no text)."""

    def __init__(
        self, spec: LexicalSpec, vectorizers: Sequence, analyzers: Sequence[str] = ANALYZERS
    ) -> None:
        self.spec = spec
        self.vectorizers = list(vectorizers)  # one per analyzer
        self.analyzers = tuple(analyzers)  # a model saved before the title block has two
        self._word_columns: list[dict[str, array]] = [{} for _ in self.vectorizers]

    @classmethod
    def fit(cls, texts: Sequence[str], spec: LexicalSpec) -> LexicalFeatures:
        """Vocabulary and IDF from ``texts`` (the training split's: never validation or test)."""
        vectorizers = [_vectorizer(spec, a).fit(analyzer_view(texts, a)) for a in ANALYZERS]
        return cls(spec, vectorizers)

    @property
    def dim(self) -> int:
        return sum(len(v.vocabulary_) for v in self.vectorizers)

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        # Each analyzer's block is unit-norm; the scale makes the whole row unit-norm again.
        blocks = [
            _char_wb_tfidf(v, analyzer_view(texts, a), self._word_columns[i]) if a.endswith("char_wb")
            else _word_tfidf(v, analyzer_view(texts, a))
            for i, (v, a) in enumerate(zip(self.vectorizers, self.analyzers, strict=True))
        ]  # fmt: skip
        rows = sp.hstack(blocks, format="csr", dtype=np.float32)
        rows.data *= np.float32(len(blocks) ** -0.5)  # in place: a product of the matrix copies it whole
        return rows

    def save(self, directory: Path) -> None:
        """Write the vocabulary (JSON, terms in column order) and the IDF weights next to the model."""
        vocabularies = []
        for v in self.vectorizers:
            terms = [""] * len(v.vocabulary_)
            for term, column in v.vocabulary_.items():
                terms[column] = term
            vocabularies.append(terms)
        payload = {"spec": asdict(self.spec), "analyzers": list(self.analyzers), "vocabularies": vocabularies}
        (directory / VOCABULARY_FILE).write_text(json.dumps(payload, ensure_ascii=False))
        np.savez(directory / IDF_FILE, *[v.idf_.astype(np.float32) for v in self.vectorizers])

    @classmethod
    def load(cls, directory: Path) -> LexicalFeatures:
        payload = json.loads((directory / VOCABULARY_FILE).read_text())
        spec = LexicalSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["spec"].items()})
        with np.load(directory / IDF_FILE) as idf:
            weights = [idf[f"arr_{i}"] for i in range(len(payload["analyzers"]))]
        vectorizers = []
        for analyzer, terms, idf in zip(payload["analyzers"], payload["vocabularies"], weights, strict=True):
            vectorizer = _vectorizer(spec, analyzer, {term: i for i, term in enumerate(terms)})
            vectorizer.idf_ = idf  # also builds the inner transformer: no refit
            vectorizers.append(vectorizer)
        return cls(spec, vectorizers, payload["analyzers"])


def _char_wb_tfidf(vectorizer, texts: Sequence[str], word_columns: dict[str, array]) -> sp.csr_matrix:
    """``vectorizer.transform(texts)`` for a ``char_wb`` vectorizer, with the same values, faster
    (bench_lexical, real sample: 3.4× in a batch of known words, 1.6× one text per call).

    A ``char_wb`` n-gram never crosses a word boundary, so a text's counts are the sum of its words'. Each
    word's vocabulary columns are looked up once and remembered in ``word_columns``, instead of every
    n-gram of every text going through a dictionary (scikit-learn: ~3 ms per 2,000-character text).
    """
    preprocess, vocabulary = vectorizer.build_preprocessor(), vectorizer.vocabulary_
    low, high = vectorizer.ngram_range
    # 4 bytes per n-gram occurrence: a list holds an 8-byte pointer each, twice that (tens of millions here)
    indices, indptr = array("i"), [0]
    for text in texts:
        for word in preprocess(text).split():
            columns = word_columns.get(word)
            if columns is None:
                columns = _padded_word_columns(f" {word} ", vocabulary, low, high)
                if len(word_columns) < WORD_CACHE_SIZE:
                    word_columns[word] = columns
            indices.extend(columns)
        indptr.append(len(indices))
    return _tfidf_rows(vectorizer, indices, indptr)


def _padded_word_columns(padded: str, vocabulary: dict[str, int], low: int, high: int) -> array:
    """The vocabulary columns of a space-padded word's character n-grams, as scikit-learn's ``char_wb``
    analyzer cuts them: every n-gram of each length ``low..high`` shorter than the padded word, and the
    padded word itself once if no longer than ``high`` (or shorter than ``low``)."""
    size = len(padded)
    grams = [padded[i : i + n] for n in range(low, min(high, size) + 1) for i in range(size - n + 1)]
    # An array: extending by it is one copy, by a list one conversion per element (2× slower).
    return array("i", [c for c in map(vocabulary.get, grams or [padded]) if c is not None])


def _word_tfidf(vectorizer, texts: Sequence[str]) -> sp.csr_matrix:
    """``vectorizer.transform(texts)`` for a ``word`` vectorizer without stop words, with the same values,
    faster: each text's n-grams go straight to the vocabulary's columns (scikit-learn first counts them in
    a dictionary per text)."""
    preprocess, tokenize = vectorizer.build_preprocessor(), vectorizer.build_tokenizer()
    lookup, (low, high) = vectorizer.vocabulary_.get, vectorizer.ngram_range
    indices, indptr = array("i"), [0]
    for text in texts:
        tokens = tokenize(preprocess(text))
        for n in range(low, high + 1):
            grams = tokens if n == 1 else map(" ".join, zip(*(tokens[i:] for i in range(n)), strict=False))
            indices.extend(array("i", [c for c in map(lookup, grams) if c is not None]))
        indptr.append(len(indices))
    return _tfidf_rows(vectorizer, indices, indptr)


def _tfidf_rows(vectorizer, indices: array, indptr: list[int]) -> sp.csr_matrix:
    """Rows of n-gram columns (one entry per occurrence) → ``TfidfTransformer``'s output: counts, the
    same sublinear TF, IDF weighting and L2 norm."""
    # lazy: scikit-learn takes about a second to import (see _vectorizer)
    from sklearn.preprocessing import normalize

    counts = sp.csr_matrix(
        (np.ones(len(indices), np.float32), np.frombuffer(indices, np.int32), np.asarray(indptr, np.int64)),
        shape=(len(indptr) - 1, len(vectorizer.vocabulary_)),
    )
    counts.sum_duplicates()  # repeated n-grams add up; indices sorted, as scikit-learn's
    if vectorizer.sublinear_tf:
        np.log(counts.data, counts.data)
        counts.data += 1.0
    counts.data *= vectorizer.idf_[counts.indices]
    return normalize(counts, norm=vectorizer.norm, copy=False) if counts.shape[0] else counts
