"""Pure ingestion logic: layout discovery, CSV parsing, row validation, ZIP member decoding."""

from __future__ import annotations

import io
import zipfile

import pandas as pd
import pytest

from lib.data.ingest import (
    BAD_ID,
    DUPLICATE_PRODUCTID,
    EMPTY_DESIGNATION,
    MISSING_LABEL,
    UNKNOWN_LABEL,
    IngestError,
    change_counts,
    find_layout,
    is_unsafe_member,
    member_locations,
    parse_csv,
    read_members,
    validate_rows,
)
from lib.data.rakuten import X_COLUMNS, Y_COLUMNS


class BytesHandle:
    """The subset of a pyarrow RandomAccessFile that read_members uses."""

    def __init__(self, data: bytes):
        self.data = data
        self.reads = 0

    def size(self) -> int:
        return len(self.data)

    def read_at(self, nbytes: int, offset: int) -> bytes:
        self.reads += 1
        return self.data[offset : offset + nbytes]


def frames(rows: list[tuple], labels: list[object] | None):
    x = pd.DataFrame(rows, columns=list(X_COLUMNS), dtype=str)
    y = None if labels is None else pd.DataFrame({"prdtypecode": [str(v) for v in labels]}, dtype=str)
    return x, y


@pytest.mark.parametrize(
    "name", ["../evil.jpg", "a/../../evil.jpg", "/etc/passwd", "C:/x.jpg", "a\\..\\b.jpg"]
)
def test_unsafe_member_names_are_detected(name):
    assert is_unsafe_member(name)


def test_safe_member_names_pass():
    assert not is_unsafe_member("images/image_train/image_1_product_2.jpg")


def test_layout_with_top_folder_ignores_macosx_and_collects_unsafe_members():
    names = [
        "data/X_train_update.csv", "data/Y_train_CVw08PX.csv", "data/images/image_train/",
        "data/images/image_train/image_11_product_22.jpg",
        "__MACOSX/data/images/image_train/._image_11_product_22.jpg",
        "../image_12_product_23.jpg",
    ]  # fmt: skip
    layout = find_layout(names)
    assert layout.x_member == "data/X_train_update.csv"
    assert layout.y_member == "data/Y_train_CVw08PX.csv"
    assert layout.images == {(11, 22): "data/images/image_train/image_11_product_22.jpg"}
    assert layout.unsafe_members == ["../image_12_product_23.jpg"]


def test_missing_x_file_is_named():
    with pytest.raises(IngestError, match=r"missing X_train_update\.csv"):
        find_layout(["Y_train_CVw08PX.csv"])


def test_missing_column_is_named():
    data = b",designation,description,productid\n0,a,b,1\n"
    with pytest.raises(IngestError, match=r"lacks column\(s\) \['imageid'\]"):
        parse_csv(data, "X_train_update.csv", X_COLUMNS)


def test_non_utf8_csv_is_a_clear_error():
    data = ",designation,description,productid,imageid\n0,Bébé,,1,2\n".encode("latin-1")
    with pytest.raises(IngestError, match="not valid UTF-8"):
        parse_csv(data, "X_train_update.csv", X_COLUMNS)


def test_label_file_parses_with_its_index():
    y = parse_csv(b",prdtypecode\n0,10\n1,2583\n", "Y_train_CVw08PX.csv", Y_COLUMNS)
    assert y["prdtypecode"].tolist() == ["10", "2583"]


def test_validation_reasons_and_last_duplicate_wins():
    x, y = frames(
        [
            ("Livre ancien", "", "1", "11"),
            ("  <b></b> ", "desc", "2", "12"),  # empty once cleaned
            ("Piscine", "", "3", "13"),  # unknown label
            ("Doublon v1", "", "4", "14"),
            ("Doublon v2", "", "4", "15"),  # same productid later: this one wins
            ("Sans id", "", "x", "16"),
        ],
        [10, 2583, 999, 40, 50, 10],
    )
    accepted, rejects = validate_rows(x, y)
    assert accepted["productid"].tolist() == [1, 4]
    assert accepted.loc[accepted["productid"] == 4, "designation_clean"].item() == "Doublon v2"
    assert accepted.loc[accepted["productid"] == 4, "prdtypecode"].item() == 50
    assert dict(zip(rejects["row"], rejects["reason"], strict=True)) == {
        1: EMPTY_DESIGNATION, 2: UNKNOWN_LABEL, 3: DUPLICATE_PRODUCTID, 5: BAD_ID,
    }  # fmt: skip


def test_row_without_label_in_a_labelled_batch_is_rejected():
    x, y = frames([("A", "", "1", "11"), ("B", "", "2", "12")], [10])
    accepted, rejects = validate_rows(x, y)
    assert accepted["productid"].tolist() == [1]
    assert rejects["reason"].tolist() == [MISSING_LABEL]


def test_unlabelled_batch_keeps_rows_without_label():
    x, _ = frames([("A", "", "1", "11")], None)
    accepted, rejects = validate_rows(x, None)
    assert accepted["prdtypecode"].isna().all() and rejects.empty


def test_change_counts_against_the_current_view():
    current = pd.DataFrame({"productid": [1, 2], "content_hash": ["h1", "h2"]})
    counts = change_counts(pd.Series(["h1", "new", "h3"]), pd.Series([1, 2, 3]), current)
    assert counts == {"new": 1, "updated": 1, "unchanged": 1}


def test_members_are_read_with_one_ranged_read_and_crc_checked():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.jpg", b"A" * 1000, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("skip.txt", b"not needed")
        zf.writestr("b.jpg", b"B" * 10, compress_type=zipfile.ZIP_STORED)
    data = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        locations = member_locations(zf, ["b.jpg", None, "a.jpg"])
    handle = BytesHandle(data)
    assert read_members(handle, locations) == [b"B" * 10, None, b"A" * 1000]
    assert handle.reads == 1
    # A flipped byte inside a member fails its CRC: the member comes back as None.
    corrupted = bytearray(data)
    corrupted[data.index(b"B" * 10)] = ord("X")
    assert read_members(BytesHandle(bytes(corrupted)), locations)[0] is None
