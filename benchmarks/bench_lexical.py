"""The TF-IDF block's transform: scikit-learn's (the baseline) against ``LexicalFeatures.transform``.

Fits the block on 70 % of the real sample's texts (``RAKUTEN_REAL_DATA``; a generated catalogue without
it), then transforms the other 30 %: in one batch (cold: every word new to the block; warm: the same texts
again), and one product per call (as an unbatched request). Prints ms per product, the ratio to the
baseline, whether the features are identical bit for bit, and issue 24's target (≤ 1 ms per product in a
batch) with ✓/✗. No stack needed.

``python -m benchmarks.bench_lexical``
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from benchmarks.common import bench_parser, mark, print_table, real_data_dir
from lib.data.rakuten import X_FILE
from lib.data.text import clean_text, lexical_text
from lib.features.lexical import LexicalFeatures, LexicalSpec, analyzer_view
from lib.settings import get_settings

TARGET_MS = 1.0
FIT_SHARE = 0.7
SINGLE_CALLS = 300


def texts_of(frame: pd.DataFrame, max_chars: int) -> list[str]:
    """The lexical text of each product, as training and Serve build it."""
    frame = frame.fillna("")
    return [lexical_text(clean_text(d), clean_text(s), max_chars)
            for d, s in zip(frame["designation"], frame["description"], strict=True)]  # fmt: skip


def sklearn_transform(features: LexicalFeatures, texts: list[str]) -> sp.csr_matrix:
    """The baseline: each block by scikit-learn's own transform, assembled as LexicalFeatures does."""
    pairs = zip(features.vectorizers, features.analyzers, strict=True)
    blocks = [v.transform(analyzer_view(texts, a)) for v, a in pairs]
    return (sp.hstack(blocks, format="csr", dtype=np.float32) * np.float32(len(blocks) ** -0.5)).tocsr()


def ms_per_product(fn, texts: list[str], per_call: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), per_call):
        fn(texts[i : i + per_call])
    return (time.perf_counter() - start) / len(texts) * 1000


def main(argv: list[str] | None = None) -> None:
    bench_parser("bench_lexical", __doc__).parse_args(argv)
    settings = get_settings()
    real = real_data_dir()
    if real is not None:
        frame, source = pd.read_csv(real / X_FILE, index_col=0), f"real sample ({real})"
    else:
        from lib.data.sample import SampleSpec, generate_catalogue

        frame, source = generate_catalogue(SampleSpec(products=3000, seed=0)), "generated catalogue"
    texts = texts_of(frame, settings.lexical_max_chars)
    cut = int(len(texts) * FIT_SHARE)
    features = LexicalFeatures.fit(texts[:cut], LexicalSpec.from_settings(settings))
    probe = texts[cut:]
    baseline = ms_per_product(lambda t: sklearn_transform(features, t), probe, len(probe))
    cold = ms_per_product(features.transform, probe, len(probe))
    warm = ms_per_product(features.transform, probe, len(probe))
    single_base = ms_per_product(lambda t: sklearn_transform(features, t), probe[:SINGLE_CALLS], 1)
    single = ms_per_product(features.transform, probe[:SINGLE_CALLS], 1)
    ours, reference = features.transform(probe), sklearn_transform(features, probe)
    identical = all(
        np.array_equal(getattr(ours, a), getattr(reference, a)) for a in ("indptr", "indices", "data")
    )
    rows = [
        ["one batch, words new to the block", round(baseline, 3), round(cold, 3), round(baseline / cold, 2)],
        ["one batch, words seen before", round(baseline, 3), round(warm, 3), round(baseline / warm, 2)],
        ["one product per call", round(single_base, 3), round(single, 3), round(single_base / single, 2)],
    ]
    print_table(f"TF-IDF transform, ms per product: {len(probe)} products of the {source}, block of "
                f"{features.dim} columns", ["case", "scikit-learn", "ours", "ratio"], rows)  # fmt: skip
    print(f"identical to scikit-learn bit for bit: {'yes' if identical else 'NO'} {mark(identical)}")
    print(f"batched (words seen before) ≤ {TARGET_MS} ms per product: {warm:.2f} {mark(warm <= TARGET_MS)}")


if __name__ == "__main__":
    main()
