"""Ingest one ZIP from S3 into the lake, exactly once.

``ray job submit --runtime-env runtime_env.yaml -- python -m jobs.ingest s3://incoming/NAME.zip``
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import connect_ray, ray_data_mapper
from lib.ingest import IngestError, ingest_zip
from lib.settings import Settings, get_settings
from lib.storage import s3_client


def run(zip_uri: str, settings: Settings | None = None) -> dict:
    """The ingest stage: a ZIP URI in, the batch manifest out (Ray Data stores the images)."""
    settings = settings or get_settings()
    connect_ray(settings)
    return ingest_zip(settings, s3_client(settings), zip_uri, mapper=ray_data_mapper)


def summary(manifest: dict) -> str:
    if manifest["duplicate"]:
        return f"batch {manifest['batch_id']} already ingested ({manifest['source_uri']}): nothing changed"
    m = manifest
    return (
        f"batch {m['batch_id']} committed: {m['rows_read']} rows read, {m['accepted']} accepted "
        f"({m['new']} new, {m['updated']} updated, {m['unchanged']} unchanged), {m['rejected']} rejected "
        f"{m['rejected_by_reason']}, {m['with_image']} with image, {m['duration_s']:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("zip_uri", help="s3://incoming/NAME.zip")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = parser.parse_args(argv)
    try:
        manifest = run(args.zip_uri)
    except IngestError as err:
        print(f"ingest failed: {err}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2) if args.json else summary(manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
