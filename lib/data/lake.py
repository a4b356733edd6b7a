"""Reading the lake: committed batches, their products and rejects, and the current catalogue.

Keys come from ``lib.data.layout``.

A batch is visible only once its ``manifest.json`` exists (written last). The *current* product view is
computed on read: for each productid, the row of the most recently committed batch, with the label of the
most recently committed batch that labelled it (an unlabelled batch says nothing about labels, so a
catalogue re-sent without labels updates texts and images but never erases a known label).
"""

from __future__ import annotations

import pandas as pd

from lib.data.layout import (
    BATCHES,
    MONITORING,
    REPORT_JSON_FILE,
    batch_id_of,
    manifest_key,
    products_key,
    rejects_key,
)
from lib.data.storage import exists, get_json, get_table, list_prefixes
from lib.settings import Settings


def is_committed(client, settings: Settings, batch_id: str) -> bool:
    return exists(client, settings.bucket_lake, manifest_key(batch_id))


def committed_manifest(client, settings: Settings, batch_id: str) -> dict | None:
    """The batch's manifest, if the batch is committed."""
    if not is_committed(client, settings, batch_id):
        return None
    return get_json(client, settings.bucket_lake, manifest_key(batch_id))


def committed_manifests(client, settings: Settings) -> list[dict]:
    """Manifests of every committed batch, oldest commit first."""
    manifests = []
    for prefix in list_prefixes(client, settings.bucket_lake, BATCHES):
        batch_id = batch_id_of(prefix)
        if is_committed(client, settings, batch_id):
            manifests.append(get_json(client, settings.bucket_lake, manifest_key(batch_id)))
    return sorted(manifests, key=lambda m: (m["committed_at"], m["batch_id"]))


def batch_products(
    client, settings: Settings, batch_id: str, columns: list[str] | None = None
) -> pd.DataFrame:
    """Products of one committed batch (older versions stay queryable this way)."""
    return get_table(client, settings.bucket_lake, products_key(batch_id), columns).to_pandas()


def get_rejects(client, settings: Settings, batch_id: str) -> pd.DataFrame:
    """The reject report of one batch (row, productid, reason, action, detail)."""
    return get_table(client, settings.bucket_lake, rejects_key(batch_id)).to_pandas()


def latest_drift_report(client, settings: Settings) -> dict | None:
    """The newest complete drift report (its JSON plus ``key``), or None."""
    bucket = settings.bucket_lake
    # Timestamps in UTC sort as text; a report still being written is skipped for the previous one.
    for prefix in sorted(list_prefixes(client, bucket, MONITORING), reverse=True):
        key = f"{prefix}{REPORT_JSON_FILE}"
        if exists(client, bucket, key):
            return {"key": key, **get_json(client, bucket, key)}
    return None


def current_products(
    client, settings: Settings, columns: list[str] | None = None, manifests: list[dict] | None = None
) -> pd.DataFrame:
    """The current catalogue: per productid, the row from the newest committed batch, and the label
    from the newest batch that had one for it."""
    manifests = committed_manifests(client, settings) if manifests is None else manifests
    if columns is not None and "productid" not in columns:
        columns = ["productid", *columns]
    frames = [batch_products(client, settings, m["batch_id"], columns) for m in manifests]
    if not frames:
        return pd.DataFrame(columns=columns or ["productid"])
    # Concatenated oldest → newest, so keeping the last occurrence keeps the newest batch's row.
    return newest_rows(pd.concat(frames, ignore_index=True))


def newest_rows(history: pd.DataFrame) -> pd.DataFrame:
    """Per productid, the last row of ``history`` (oldest first), its label carried from the last labelled
    row when the last row has none."""
    current = history.drop_duplicates("productid", keep="last").reset_index(drop=True)
    if "prdtypecode" not in history.columns:
        return current
    labelled = history[history["prdtypecode"].notna()].drop_duplicates("productid", keep="last")
    known = current["productid"].map(labelled.set_index("productid")["prdtypecode"])
    current["prdtypecode"] = current["prdtypecode"].fillna(known).astype(history["prdtypecode"].dtype)
    return current
