"""Ingest one ZIP from S3 into the lake, exactly once.

``ray job submit --runtime-env runtime_env.yaml -- python -m jobs.ingest s3://incoming/NAME.zip``
"""

from __future__ import annotations

import argparse
import json

from jobs.common import connect_ray, ray_data_mapper, run_cli
from lib.data.ingest import IngestResult, ingest_zip
from lib.data.storage import s3_client, split_uri
from lib.ops.preflight import require
from lib.settings import Settings, get_settings


def run(
    zip_uri: str, settings: Settings | None = None, digest: tuple[str, int] | None = None
) -> IngestResult:
    """The ingest stage: a ZIP URI in, the batch manifest out (Ray Data stores the images).

    ``digest``: the ZIP's (SHA-256, size) if the caller hashed it already.
    """
    settings = settings or get_settings()
    split_uri(zip_uri)  # a local path is named before anything connects
    require(settings, "s3")
    connect_ray(settings)
    return ingest_zip(settings, s3_client(settings), zip_uri, mapper=ray_data_mapper, digest=digest)


def describe(result: IngestResult) -> str:
    """One line for people."""
    m = result.manifest
    if result.duplicate:
        return f"batch {m.batch_id} already ingested ({result.source_uri}): nothing changed"
    return (
        f"batch {m.batch_id} committed: {m.rows_read} rows read, {m.accepted} accepted "
        f"({m.new} new, {m.updated} updated, {m.unchanged} unchanged), {m.rejected} rejected "
        f"{m.rejected_by_reason}, {m.with_image} with image, {m.duration_s:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("zip_uri", help="s3://incoming/NAME.zip")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = parser.parse_args(argv)

    def act() -> int:
        result = run(args.zip_uri)
        print(json.dumps(result.manifest.to_dict(), indent=2) if args.json else describe(result))
        return 0

    return run_cli("ingest", act)


if __name__ == "__main__":
    raise SystemExit(main())
