"""Bulk classification's pure part: predictions from a loaded model, and the challenge's submission file."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from lib.model.artifact import read_model_dir, write_model_dir
from lib.model.classify import classify_rows, submission_csv
from lib.model.evaluate import fit_and_test_experts
from lib.model.experts import ExpertConfig
from tests.lib.model.test_experts import lexical_toy


def test_rows_get_the_served_prediction_and_the_submission_follows_the_x_file_order(tmp_path):
    data = lexical_toy()
    head = fit_and_test_experts(data, ExpertConfig(), folds=3, seed=0)
    codes = [10 * c + 10 for c in range(len(data.codes))]
    card = {"codes": codes, "head_kind": "experts", "reads_text": True, "class_names": {"10": "dix"},
            "input_dims": {"text_dim": 8, "image_dim": 6}, "temperature": 1.0}  # fmt: skip
    loaded = read_model_dir(write_model_dir(tmp_path, None, card, data.lexical_features, head.ensemble), "7")
    n = 40
    rows = pd.DataFrame(
        {
            "productid": np.arange(1000, 1000 + n),
            "row": np.random.default_rng(0).permutation(np.arange(84916, 84916 + n)),  # not in X order
            "text_emb": list(data.text[:n]),
            "image_emb": list(data.image[:n]),
            "lexical_text": list(data.texts[:n]),
        }
    )
    predictions = classify_rows(loaded, rows, threshold=0.6)
    probabilities = loaded.probabilities(data.text[:n], data.image[:n], list(data.texts[:n]))
    assert (predictions["prdtypecode"] == np.asarray(card["codes"])[probabilities.argmax(1)]).all()
    assert np.allclose(predictions["confidence"], probabilities.max(1))
    assert (predictions["abstained"] == (predictions["confidence"] < 0.6)).all()
    top = min(5, len(codes))
    assert all(list(s) == sorted(s, reverse=True) and len(s) == top for s in predictions["top5_scores"])
    assert (predictions["model_version"] == "7").all() and list(predictions["productid"]) == list(
        rows["productid"]
    )

    csv = submission_csv(predictions).decode()
    assert csv.splitlines()[0] == ",prdtypecode"
    submitted = pd.read_csv(io.StringIO(csv), index_col=0)
    assert list(submitted.index) == sorted(rows["row"])  # the X file's index, in its order
    by_row = predictions.set_index("row")["prdtypecode"]
    assert (submitted["prdtypecode"] == by_row.loc[submitted.index].to_numpy()).all()

    # TF-IDF rows computed beforehand (as the job does, beside the embeddings' read) change nothing.
    lexical = loaded.lexical_rows(list(rows["lexical_text"]))
    ahead = classify_rows(loaded, rows.drop(columns="lexical_text"), threshold=0.6, lexical=lexical)
    assert ahead.drop(columns=["top5_codes", "top5_scores"]).equals(
        predictions.drop(columns=["top5_codes", "top5_scores"])
    )
    assert np.array_equal(np.stack(ahead["top5_scores"]), np.stack(predictions["top5_scores"]))
    # A batch none of whose products has an embedding yet: no prediction, no error.
    assert classify_rows(loaded, rows.iloc[:0], threshold=0.6).empty
