"""The current-catalogue rule on a batch history (pure)."""

from __future__ import annotations

import pandas as pd

from lib.data.lake import newest_rows


def history(rows: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["productid", "designation_clean", "prdtypecode"])
    frame["prdtypecode"] = frame["prdtypecode"].astype("Int64")
    return frame


def test_the_newest_row_wins_and_an_unlabelled_resend_keeps_the_known_label():
    current = newest_rows(
        history([(1, "old", 10), (2, "two", 20), (1, "new", 40), (2, "two again", None), (3, "only x", None)])
    ).set_index("productid")
    assert current.loc[1, "designation_clean"] == "new" and current.loc[1, "prdtypecode"] == 40
    # Product 2 was re-sent without a label: its new text, its last known label.
    assert current.loc[2, "designation_clean"] == "two again" and current.loc[2, "prdtypecode"] == 20
    assert pd.isna(current.loc[3, "prdtypecode"])
    assert str(current["prdtypecode"].dtype) == "Int64"


def test_without_a_label_column_only_the_newest_row_is_kept():
    frame = pd.DataFrame({"productid": [1, 1], "designation_clean": ["a", "b"]})
    assert newest_rows(frame)["designation_clean"].tolist() == ["b"]
