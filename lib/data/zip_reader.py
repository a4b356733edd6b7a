"""Reading ZIP archives stored in S3 without downloading them: hashing, member locations, ranged reads.

The central directory is read once; members are then read by their recorded offsets, several
neighbours with one ranged read, so memory is bounded by what is read, never by the archive.
"""

from __future__ import annotations

import hashlib
import struct
import zipfile
import zlib
from pathlib import PurePosixPath

import pandas as pd


def is_unsafe_member(name: str) -> bool:
    """Absolute paths, drive letters, backslashes and ``..`` components (zip-slip)."""
    if name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in PurePosixPath(name).parts


def zip_sha256(client, bucket: str, key: str, chunk_bytes: int = 8 << 20) -> tuple[str, int]:
    """SHA-256 and size of an S3 object, streamed (constant memory)."""
    digest = hashlib.sha256()
    size = 0
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    for chunk in body.iter_chunks(chunk_bytes):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # ZIP local file header, 30 bytes
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
# A member's location in its ZIP (``member_locations``); offset -1: no member.
LOCATION_COLUMNS = ["offset", "compress_size", "file_size", "compress_type", "crc"]
# The same, as kept in the products table for each product's image: the embedding job reads images
# straight from the archived ZIP with a few ranged reads instead of one GET per image.
IMAGE_ZIP_COLUMNS = [f"image_zip_{c}" for c in LOCATION_COLUMNS]


def member_locations(zf: zipfile.ZipFile, members: list[str | None]) -> pd.DataFrame:
    """Offset, sizes, compression and CRC of each member (from the central directory, read once)."""
    rows = []
    for name in members:
        info = zf.getinfo(name) if isinstance(name, str) else None
        rows.append(
            (info.header_offset, info.compress_size, info.file_size, info.compress_type, info.CRC)
            if info else (-1, 0, 0, 0, 0)
        )  # fmt: skip
    return pd.DataFrame(rows, columns=LOCATION_COLUMNS)


def read_members(handle, locations: pd.DataFrame) -> list[bytes | None]:
    """Read members by their central-directory locations with ONE ranged read spanning them all.

    Tasks get members sorted by offset, so the span is about the size of the members themselves:
    memory stays bounded by the partition, whatever the size of the ZIP. A member whose bytes or CRC
    do not check out comes back as None.
    """
    present = locations[locations["offset"] >= 0]
    if present.empty:
        return [None] * len(locations)
    start = int(present["offset"].min())
    # The local header's name/extra lengths are not in the central directory: allow a margin for them.
    end = int((present["offset"] + present["compress_size"]).max()) + _LOCAL_HEADER.size + 4096
    buffer = handle.read_at(min(end, handle.size()) - start, start)
    out: list[bytes | None] = []
    for row in locations.itertuples(index=False):
        out.append(_decode_member(buffer, row.offset - start, row) if row.offset >= 0 else None)
    return out


def _decode_member(buffer: bytes, at: int, loc) -> bytes | None:
    try:
        header = _LOCAL_HEADER.unpack_from(buffer, at)
        if header[0] != _LOCAL_HEADER_SIGNATURE:
            return None
        body = at + _LOCAL_HEADER.size + header[9] + header[10]
        raw = buffer[body : body + loc.compress_size]
        if loc.compress_type == zipfile.ZIP_STORED:
            data = raw
        elif loc.compress_type == zipfile.ZIP_DEFLATED:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw, loc.file_size + 1)
        else:
            return None
        if len(data) != loc.file_size or zlib.crc32(data) != loc.crc:
            return None
        return data
    except (struct.error, zlib.error):
        return None
