"""Pure logic of the embedding inputs: ZIP locations, run splitting."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lib.data.ingest import IMAGE_ZIP_COLUMNS
from lib.features.embed import IMAGE_ZIP, block_file_name, member_runs, with_image_locations


def test_member_runs_split_on_large_gaps_only():
    offsets = np.array([0, 100, 5000, 5100, 100_000])
    ends = offsets + 50
    runs = member_runs(offsets, ends, max_gap=1000)
    assert [r.tolist() for r in runs] == [[0, 1], [2, 3], [4]]
    assert [r.tolist() for r in member_runs(offsets, ends, max_gap=1 << 20)] == [[0, 1, 2, 3, 4]]
    assert member_runs(np.array([], int), np.array([], int), 10) == []


def test_with_image_locations_sorts_by_zip_and_offset_and_marks_what_has_no_location():
    ids, batches, has_image = [1, 2, 3, 4], ["b", "b", "old", "b"], [True, True, True, False]
    inputs = pd.DataFrame({"productid": ids, "batch_id": batches, "has_image": has_image})
    locations = pd.DataFrame({"productid": [1, 2, 4], "batch_id": "b", IMAGE_ZIP: "s3://lake/b.zip"})
    for column in IMAGE_ZIP_COLUMNS:
        locations[column] = [900, 30, 500]
    out = with_image_locations(inputs, locations)
    # Located images first, by offset; the batch without locations and the product without image last.
    assert out["productid"].tolist()[:2] == [2, 1]
    assert out.set_index("productid").loc[[3, 4], IMAGE_ZIP].isna().all()
    assert (out.set_index("productid").loc[[3, 4], "image_zip_offset"] == -1).all()
    assert out["image_zip_offset"].dtype == np.int64


def test_block_file_name_depends_on_the_rows_only():
    name = block_file_name(["h1", "h2"])
    assert name == block_file_name(["h1", "h2"]) and name.startswith("part-") and name.endswith(".parquet")
    assert len({name, block_file_name(["h2", "h1"]), block_file_name(["h1"])}) == 3
