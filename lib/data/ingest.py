"""Ingestion: a Rakuten-format ZIP in S3 → a validated, cleaned batch committed to the lake, exactly once.

The ZIP is read in place with ranged reads (central directory, then only the members needed), so memory
does not grow with the archive. Outputs are written first and made visible by the manifest, written
last; a failure at any point leaves no visible trace and a re-run completes the batch.
"""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import PurePosixPath

import pandas as pd
import pyarrow as pa

from lib.data import lake, layout
from lib.data.images import IMAGE_MISSING, IMAGE_TOO_LARGE, IMAGE_UNREADABLE, image_problem, sha256_hex
from lib.data.rakuten import IMAGE_NAME_RE, PRDTYPECODES, X_COLUMNS, X_FILE, X_TEST_FILE, Y_COLUMNS, Y_FILE
from lib.data.storage import (
    arrow_fs,
    exists,
    get_json,
    move,
    put_bytes,
    put_json,
    put_table,
    s3_client,
    split_uri,
)
from lib.data.text import clean_text
from lib.data.zip_reader import (
    IMAGE_ZIP_COLUMNS,
    LOCATION_COLUMNS,
    is_unsafe_member,
    member_locations,
    read_members,
    zip_sha256,
)
from lib.errors import UserError
from lib.settings import Settings

# Row-level reasons (the reject report's ``reason`` column).
EMPTY_DESIGNATION = "empty_designation"
UNKNOWN_LABEL = "unknown_label"
MISSING_LABEL = "missing_label"
BAD_ID = "bad_id"
DUPLICATE_PRODUCTID = "duplicate_productid"
UNSAFE_MEMBER_NAME = "unsafe_member_name"
# What happened to the row: dropped, or kept without its image.
REJECTED = "rejected"
KEPT_WITHOUT_IMAGE = "kept_without_image"
IGNORED_MEMBER = "ignored_member"

REJECT_SCHEMA = pa.schema(
    [("row", pa.int64()), ("productid", pa.int64()), ("reason", pa.string()), ("action", pa.string()),
     ("detail", pa.string())]
)  # fmt: skip


class IngestError(UserError, ValueError):
    """The batch cannot be ingested; the message names the problem. Nothing committed is touched."""


@dataclass(frozen=True)
class ZipLayout:
    """Where the challenge files sit inside one ZIP."""

    x_member: str
    y_member: str | None
    images: dict[tuple[int, int], str]  # (imageid, productid) → member name
    unsafe_members: list[str] = field(default_factory=list)


# --- pure steps ---------------------------------------------------------------------------------
def find_layout(names: list[str]) -> ZipLayout:
    """Locate X, Y and the images among member names (top-level folder optional, ``__MACOSX`` ignored)."""
    unsafe = [n for n in names if is_unsafe_member(n)]
    usable = [
        n for n in names if n not in set(unsafe) and not n.startswith("__MACOSX/") and not n.endswith("/")
    ]
    x_members = [n for n in usable if PurePosixPath(n).name in (X_FILE, X_TEST_FILE)]
    if not x_members:
        seen = ", ".join(usable[:5]) or "none"
        raise IngestError(f"missing {X_FILE} (or {X_TEST_FILE}) in the ZIP (members seen: {seen})")
    if len(x_members) > 1:
        raise IngestError(f"several X files in the ZIP ({x_members}): one batch per ZIP")
    x_member = x_members[0]
    root = str(PurePosixPath(x_member).parent)
    prefix = "" if root == "." else f"{root}/"
    # The challenge's test products have no labels: a Y file beside X_test_update.csv is not theirs.
    labelled = PurePosixPath(x_member).name == X_FILE and f"{prefix}{Y_FILE}" in usable
    y_member = f"{prefix}{Y_FILE}" if labelled else None
    images: dict[tuple[int, int], str] = {}
    for name in usable:
        match = IMAGE_NAME_RE.search(name)
        if match and name.startswith(prefix):
            images[(int(match.group(1)), int(match.group(2)))] = name
    return ZipLayout(x_member, y_member, images, unsafe)


def parse_csv(data: bytes, member: str, required: tuple[str, ...]) -> pd.DataFrame:
    """Parse a challenge CSV (unnamed index column first); columns are matched exactly."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise IngestError(
            f"{member} is not valid UTF-8 (byte {err.start}: {data[err.start : err.start + 4]!r}); "
            "re-save it as UTF-8"
        ) from err
    try:
        frame = pd.read_csv(io.StringIO(text), index_col=0, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise IngestError(f"{member} is not a readable CSV: {err}") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise IngestError(f"{member} lacks column(s) {missing}; found {list(frame.columns)}")
    return frame


def read_csv_member(zf: zipfile.ZipFile, member: str, max_bytes: int) -> bytes:
    """A CSV member's bytes, refused when it declares more than ``max_bytes`` (a bomb is never inflated)
    or when its data does not match its header. ``zipfile`` inflates no more than the declared size
    and checks the CRC, so a member lying about its size is caught as corrupt, memory still bounded."""
    declared = zf.getinfo(member).file_size
    if declared > max_bytes:
        raise IngestError(
            f"{member} declares {declared:,} bytes, over the {max_bytes:,}-byte limit (max_csv_bytes)"
        )
    try:
        return zf.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise IngestError(f"{member} is corrupt in the ZIP ({err}); re-create the archive") from err


def _to_int(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series.str.strip(), errors="coerce").astype("Int64")


def validate_rows(
    x: pd.DataFrame, y: pd.DataFrame | None, max_chars: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clean texts (at most ``max_chars`` each), check ids and labels, drop in-batch duplicates (the
    last row wins).

    Returns (accepted products, reject rows).
    """
    frame = x.copy()
    frame.index.name = "row"
    frame = frame.reset_index()
    frame["row"] = pd.to_numeric(frame["row"], errors="coerce").fillna(-1).astype("int64")
    frame["productid"] = _to_int(frame["productid"])
    frame["imageid"] = _to_int(frame["imageid"])
    frame["designation_clean"] = frame["designation"].map(lambda raw: clean_text(raw, max_chars))
    frame["description_clean"] = frame["description"].map(lambda raw: clean_text(raw, max_chars))
    if y is not None:
        labels = y["prdtypecode"].copy()
        labels.index = pd.to_numeric(labels.index, errors="coerce")
        frame["prdtypecode"] = _to_int(frame["row"].map(labels).fillna("").astype(str))
        frame["_label_raw"] = frame["row"].map(labels)
    else:
        frame["prdtypecode"] = pd.array([pd.NA] * len(frame), dtype="Int64")
        frame["_label_raw"] = None

    reasons = pd.Series(pd.NA, index=frame.index, dtype="string")
    bad_id = frame["productid"].isna() | frame["imageid"].isna()
    reasons[bad_id] = BAD_ID
    reasons[reasons.isna() & (frame["designation_clean"] == "")] = EMPTY_DESIGNATION
    if y is not None:
        reasons[reasons.isna() & frame["_label_raw"].isna()] = MISSING_LABEL
        unknown = frame["_label_raw"].notna() & ~frame["prdtypecode"].isin(PRDTYPECODES).fillna(False)
        reasons[reasons.isna() & unknown] = UNKNOWN_LABEL
    valid = reasons.isna()
    duplicate = valid & frame["productid"].duplicated(keep="last") & frame["productid"].notna()
    reasons[duplicate] = DUPLICATE_PRODUCTID

    rejected = frame[reasons.notna()]
    rejects = pd.DataFrame(
        {
            "row": rejected["row"].astype("int64"),
            "productid": rejected["productid"].astype("Int64"),
            "reason": reasons[reasons.notna()].astype(str),
            "action": REJECTED,
            "detail": "",
        }
    )
    accepted = frame[reasons.isna()].drop(columns=["_label_raw"]).reset_index(drop=True)
    return accepted, rejects.reset_index(drop=True)


def content_hash(products: pd.DataFrame) -> pd.Series:
    """A hash of what a product *is* (clean texts, label, image bytes) to tell updated from unchanged."""
    parts = (
        products["designation_clean"] + "\x1f" + products["description_clean"] + "\x1f"
        + products["prdtypecode"].astype("string").fillna("") + "\x1f" + products["image_sha256"].fillna("")
    )  # fmt: skip
    return parts.map(lambda s: hashlib.sha256(s.encode()).hexdigest()[:16])


def with_known_labels(products: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """``products`` with each missing label taken from the current catalogue (what the product will be
    once committed: see ``lib.data.lake.newest_rows``)."""
    if current.empty or products["prdtypecode"].notna().all():
        return products
    known = products["productid"].map(current.set_index("productid")["prdtypecode"])
    return products.assign(prdtypecode=products["prdtypecode"].fillna(known).astype("Int64"))


def change_counts(new_hashes: pd.Series, productids: pd.Series, current: pd.DataFrame) -> dict[str, int]:
    """How many accepted products are new, updated or unchanged relative to the current view."""
    if current.empty:
        return {"new": len(productids), "updated": 0, "unchanged": 0}
    previous = dict(zip(current["productid"], current["content_hash"], strict=True))
    known = productids.map(lambda p: p in previous)
    same = pd.Series(
        [previous.get(p) == h for p, h in zip(productids, new_hashes, strict=True)], index=productids.index
    )
    return {
        "new": int((~known).sum()),
        "updated": int((known & ~same).sum()),
        "unchanged": int((known & same).sum()),
    }


# --- I/O steps ----------------------------------------------------------------------------------
def open_zip(settings: Settings, bucket: str, key: str) -> zipfile.ZipFile:
    """Open a ZIP stored in S3 for ranged reads (no full download)."""
    handle = arrow_fs(settings).open_input_file(f"{bucket}/{key}")
    try:
        return zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, ValueError, OSError) as err:  # pyarrow raises ArrowInvalid (a ValueError)
        handle.close()
        raise IngestError(f"s3://{bucket}/{key} is not a ZIP archive, or it is truncated ({err})") from err


def store_image_partition(settings: Settings, bucket: str, key: str, tasks: pd.DataFrame) -> pd.DataFrame:
    """Validate and store the images of one partition of products (a Ray Data task).

    ``tasks`` holds productid, member and the member's location (see ``member_locations``).
    Returns productid, image_sha256, image_key, has_image and image_problem. Images go to a
    content-addressed key, so a re-run rewrites identical bytes and never clobbers another image.
    """
    client = s3_client(settings)
    # A member declaring more bytes than an image may have is never read nor inflated (ZIP bomb).
    oversized = (tasks["file_size"] > settings.max_image_bytes) | (
        tasks["compress_size"] > settings.max_image_bytes
    )
    with arrow_fs(settings).open_input_file(f"{bucket}/{key}") as handle:
        blobs = read_members(handle, tasks.assign(offset=tasks["offset"].where(~oversized, -1)))
    out, uploads = [], {}
    rows = zip(tasks["productid"], tasks["member"], blobs, oversized, strict=True)
    for productid, member, data, too_large in rows:
        if not isinstance(member, str):
            problem = IMAGE_MISSING
        elif too_large:
            problem = IMAGE_TOO_LARGE
        elif data is None:
            problem = IMAGE_UNREADABLE
        else:
            problem = image_problem(data, settings.max_image_pixels, settings.max_image_bytes)
        sha = sha256_hex(data) if problem is None else None
        if sha:
            uploads[layout.image_key(sha)] = data
        out.append((productid, sha, layout.image_key(sha) if sha else None, problem is None, problem))
    # Uploads are round-trip bound, not CPU bound: overlap them.
    with ThreadPoolExecutor(settings.upload_threads) as pool:
        list(pool.map(lambda kv: put_bytes(client, settings.bucket_lake, kv[0], kv[1], "image/jpeg"),
                      uploads.items()))  # fmt: skip
    return pd.DataFrame(out, columns=["productid", "image_sha256", "image_key", "has_image", "image_problem"])


PartitionMapper = Callable[[Callable[[pd.DataFrame], pd.DataFrame], pd.DataFrame, int], pd.DataFrame]


def local_mapper(fn: Callable[[pd.DataFrame], pd.DataFrame], frame: pd.DataFrame, size: int) -> pd.DataFrame:
    """Apply ``fn`` partition by partition in this process (the Ray Data mapper's stand-in)."""
    parts = [fn(frame.iloc[i : i + size]) for i in range(0, len(frame), size)] or [fn(frame.iloc[:0])]
    return pd.concat(parts, ignore_index=True)


@dataclass
class BatchManifest:
    """A committed batch: where it came from, what was accepted or rejected, and what changed.

    Its JSON, written last, is the batch's commit (``lib.data.layout.manifest_key``).
    """

    batch_id: str
    zip_sha256: str
    zip_bytes: int
    source_uri: str
    archive_uri: str
    labelled: bool
    rows_read: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    kept_without_image_by_reason: dict[str, int]
    unsafe_members: int
    with_image: int
    class_counts: dict[str, int]
    new: int
    updated: int
    unchanged: int
    committed_at: str
    duration_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> BatchManifest:
        return cls(**{f.name: values[f.name] for f in fields(cls)})


@dataclass
class IngestResult:
    """The batch's manifest, and whether the ZIP was a duplicate of a batch already committed."""

    manifest: BatchManifest
    duplicate: bool
    source_uri: str  # the ZIP this run read (a duplicate's manifest names the first one)


@dataclass
class _ParsedBatch:
    """A ZIP's rows after validation, with where each accepted product's image sits in the ZIP."""

    rows_read: int
    labelled: bool
    products: pd.DataFrame
    rejects: pd.DataFrame
    image_tasks: pd.DataFrame  # productid, member, LOCATION_COLUMNS; sorted by offset
    unsafe_members: list[str]


def ingest_zip(
    settings: Settings,
    client,
    zip_uri: str,
    mapper: PartitionMapper = local_mapper,
    on_stage: Callable[[str], None] | None = None,
    digest: tuple[str, int] | None = None,
) -> IngestResult:
    """Ingest one ZIP exactly once per content.

    ``digest``: the ZIP's (SHA-256, size) when the caller already hashed it (the pipeline does).
    """
    t0 = time.monotonic()
    stage = on_stage or (lambda _name: None)
    bucket, key = split_uri(zip_uri)
    if not exists(client, bucket, key):
        raise IngestError(f"{zip_uri} does not exist")
    sha, size = digest or zip_sha256(client, bucket, key)
    batch_id = sha[:16]
    if lake.is_committed(client, settings, batch_id):
        manifest = BatchManifest.from_dict(
            get_json(client, settings.bucket_lake, layout.manifest_key(batch_id))
        )
        archive_zip(client, settings, bucket, key, batch_id)
        return IngestResult(manifest, duplicate=True, source_uri=zip_uri)
    batch = read_batch(settings, bucket, key)
    stage("validated")
    images = mapper(
        lambda part: store_image_partition(settings, bucket, key, part),
        batch.image_tasks,
        settings.ingest_partition_size,
    )
    stage("images_stored")
    products = with_images(batch.products, images, batch.image_tasks)
    report = reject_report(batch.rejects, products, batch.unsafe_members)
    committed_at = datetime.now(UTC)
    current = lake.current_products(client, settings, ["content_hash", "prdtypecode"])
    products = products.drop(columns=["image_problem"]).assign(
        content_hash=content_hash(with_known_labels(products, current)), batch_id=batch_id,
        ingested_at=committed_at,
    )  # fmt: skip
    counts = change_counts(products["content_hash"], products["productid"], current)
    write_tables(client, settings, batch_id, products, report, stage)
    manifest = BatchManifest(
        batch_id=batch_id, zip_sha256=sha, zip_bytes=size, source_uri=zip_uri,
        archive_uri=archive_uri(settings, bucket, key, batch_id), labelled=batch.labelled,
        rows_read=batch.rows_read, accepted=len(products), rejected=len(batch.rejects),
        rejected_by_reason=_counts(batch.rejects["reason"]),
        kept_without_image_by_reason=_counts(report.loc[report["action"] == KEPT_WITHOUT_IMAGE, "reason"]),
        unsafe_members=len(batch.unsafe_members), with_image=int(products["has_image"].sum()),
        class_counts={str(k): int(v) for k, v in products["prdtypecode"].value_counts().sort_index().items()},
        **counts, committed_at=committed_at.isoformat(), duration_s=round(time.monotonic() - t0, 3),
    )  # fmt: skip
    # The commit: from here on the batch is visible.
    put_json(client, settings.bucket_lake, layout.manifest_key(batch_id), manifest.to_dict())
    stage("committed")
    archive_zip(client, settings, bucket, key, batch_id)
    return IngestResult(manifest, duplicate=False, source_uri=zip_uri)


def write_tables(
    client, settings: Settings, batch_id: str, products: pd.DataFrame, report: pd.DataFrame, stage
) -> None:
    """The batch's products and reject report (invisible until the manifest commits them)."""
    put_table(client, settings.bucket_lake, layout.products_key(batch_id), pa.Table.from_pandas(products))
    stage("products_written")
    rejects_table = pa.Table.from_pandas(report, schema=REJECT_SCHEMA, preserve_index=False)
    put_table(client, settings.bucket_lake, layout.rejects_key(batch_id), rejects_table)
    stage("rejects_written")


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.value_counts().items()}


def read_batch(settings: Settings, bucket: str, key: str) -> _ParsedBatch:
    """Parse and validate the ZIP's CSV files and locate each accepted product's image member."""
    with open_zip(settings, bucket, key) as zf:
        contents = find_layout(zf.namelist())
        x = parse_csv(
            read_csv_member(zf, contents.x_member, settings.max_csv_bytes), contents.x_member, X_COLUMNS
        )
        y = None
        if contents.y_member:
            y_bytes = read_csv_member(zf, contents.y_member, settings.max_csv_bytes)
            y = parse_csv(y_bytes, contents.y_member, Y_COLUMNS)
        if x.empty:
            raise IngestError(f"{contents.x_member} has no product rows (empty batch)")
        products, rejects = validate_rows(x, y, settings.max_field_chars)
        if products.empty:
            raise IngestError(f"no valid product in the batch: {rejects['reason'].value_counts().to_dict()}")
        members = [
            contents.images.get((int(i), int(p)))
            for i, p in zip(products["imageid"], products["productid"], strict=True)
        ]
        locations = member_locations(zf, members)
    tasks = pd.concat(
        [pd.DataFrame({"productid": products["productid"].astype("int64"), "member": members}), locations],
        axis=1,
    )
    # Sorted by offset, each partition's members sit next to each other in the ZIP (one ranged read).
    tasks = tasks.sort_values("offset", kind="stable").reset_index(drop=True)
    return _ParsedBatch(len(x), y is not None, products, rejects, tasks, contents.unsafe_members)


def with_images(products: pd.DataFrame, images: pd.DataFrame, tasks: pd.DataFrame) -> pd.DataFrame:
    """Products with their stored image (or its problem) and the image's location in the ZIP."""
    products = products.merge(images, on="productid", how="left", validate="one_to_one")
    located = tasks[["productid", *LOCATION_COLUMNS]].set_axis(["productid", *IMAGE_ZIP_COLUMNS], axis=1)
    products = products.merge(located, on="productid", how="left", validate="one_to_one")
    # Only a valid image has a location worth reading.
    products.loc[~products["has_image"], "image_zip_offset"] = -1
    return products


def reject_report(rejects: pd.DataFrame, products: pd.DataFrame, unsafe_members: list[str]) -> pd.DataFrame:
    """Rejected rows, products kept without their image, and ignored unsafe members: one row each."""
    without_image = products[~products["has_image"]]
    flagged = pd.DataFrame(
        {
            "row": without_image["row"].astype("int64"),
            "productid": without_image["productid"].astype("Int64"),
            "reason": without_image["image_problem"].astype(str),
            "action": KEPT_WITHOUT_IMAGE,
            "detail": "",
        }
    )
    unsafe = pd.DataFrame(
        {"row": -1, "productid": pd.array([pd.NA] * len(unsafe_members), dtype="Int64"),
         "reason": UNSAFE_MEMBER_NAME, "action": IGNORED_MEMBER, "detail": unsafe_members}
    )  # fmt: skip
    return pd.concat([r for r in (rejects, flagged, unsafe) if not r.empty] or [rejects], ignore_index=True)


def archive_uri(settings: Settings, bucket: str, key: str, batch_id: str) -> str:
    """Where the batch's ZIP lives once ingested: the lake's archive for a dropped ZIP, else where it is."""
    if bucket == settings.bucket_incoming:
        return f"s3://{settings.bucket_lake}/{layout.archive_key(batch_id)}"
    return f"s3://{bucket}/{key}"


def archive_zip(client, settings: Settings, bucket: str, key: str, batch_id: str) -> None:
    """Move the processed ZIP out of ``incoming/`` (idempotent: the archive key is the content id)."""
    if bucket == settings.bucket_incoming:
        move(client, bucket, key, settings.bucket_lake, layout.archive_key(batch_id))
