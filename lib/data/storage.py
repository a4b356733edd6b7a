"""S3 access: one boto3 client and one pyarrow filesystem built from Settings, plus small helpers.

Objects are written whole (an S3 PUT is atomic), so "write then commit" means: write every output
under its final or temporary key first, and write the object that makes them visible (a manifest) last.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from botocore.config import Config
from botocore.exceptions import ClientError

from lib.errors import UserError
from lib.settings import Settings, get_settings


def s3_client(settings: Settings | None = None):
    """A boto3 S3 client for the configured endpoint (path-style, SigV4)."""
    s = settings or get_settings()
    return boto3.client(
        "s3",
        endpoint_url=s.s3_url,
        aws_access_key_id=s.s3_access_key.get_secret_value(),
        aws_secret_access_key=s.s3_secret_key.get_secret_value(),
        region_name=s.s3_region,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def arrow_fs(settings: Settings | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for the configured endpoint; paths are ``bucket/key``."""
    s = settings or get_settings()
    scheme, _, host = s.s3_url.partition("://")
    return pafs.S3FileSystem(
        endpoint_override=host,
        scheme=scheme,
        region=s.s3_region,
        access_key=s.s3_access_key.get_secret_value(),
        secret_key=s.s3_secret_key.get_secret_value(),
        allow_bucket_creation=False,
        # A loaded 2-core node can stall an upload part for tens of seconds; the default timeout failed it.
        request_timeout=s.s3_request_timeout_s,
        connect_timeout=s.s3_request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=5),
    )


class NotAnObjectUri(UserError, ValueError):
    """A local path or a malformed URI where an S3 object was expected."""


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise NotAnObjectUri(
            f"{uri!r} is not an S3 object URI (expected s3://bucket/key). A local ZIP goes in with "
            f"`python -m jobs.demo {uri}`, or upload it to the incoming bucket first"
        )
    return bucket, key


def ensure_buckets(client, buckets: tuple[str, ...] | list[str]) -> None:
    """Create the buckets that do not exist yet."""
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in buckets:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def exists(client, bucket: str, key: str) -> bool:
    """Whether the object exists."""
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response["Error"]["Code"] in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise
    return True


def list_keys(client, bucket: str, prefix: str = "") -> Iterator[str]:
    """All keys under ``prefix`` (paged)."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield obj["Key"]


def list_prefixes(client, bucket: str, prefix: str) -> list[str]:
    """Immediate "sub-folders" of ``prefix`` (which should end with ``/``)."""
    paginator = client.get_paginator("list_objects_v2")
    out: list[str] = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        out.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
    return out


def put_bytes(client, bucket: str, key: str, data: bytes, content_type: str | None = None) -> None:
    """Write one object."""
    extra = {"ContentType": content_type} if content_type else {}
    client.put_object(Bucket=bucket, Key=key, Body=data, **extra)


def get_bytes(client, bucket: str, key: str) -> bytes:
    """Read one whole object (use only for small objects)."""
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def read_object(fs: pafs.S3FileSystem, bucket: str, key: str) -> bytes:
    """Read one whole small object through pyarrow's C++ client: for hot loops over many objects.

    Measured on 30 kB objects, 8 threads: 1.4 ms of client CPU per GET against 4.4 ms for boto3, and 3×
    the throughput.
    """
    with fs.open_input_stream(f"{bucket}/{key}") as stream:
        return stream.read()


def put_json(client, bucket: str, key: str, obj: Any) -> None:
    put_bytes(client, bucket, key, json.dumps(obj, indent=2, default=str).encode(), "application/json")


def get_json(client, bucket: str, key: str) -> Any:
    return json.loads(get_bytes(client, bucket, key))


def put_table(client, bucket: str, key: str, table: pa.Table) -> None:
    """Write a Parquet table as one object."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    put_bytes(client, bucket, key, sink.getvalue(), "application/vnd.apache.parquet")


def get_table(client, bucket: str, key: str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet object."""
    return pq.read_table(io.BytesIO(get_bytes(client, bucket, key)), columns=columns)


def delete_prefix(client, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix``; returns how many."""
    keys = list(list_keys(client, bucket, prefix))
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk]})
    return len(keys)


def move(client, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str) -> None:
    """Server-side copy then delete (multipart copy for large objects)."""
    client.copy({"Bucket": src_bucket, "Key": src_key}, dst_bucket, dst_key)
    client.delete_object(Bucket=src_bucket, Key=src_key)
