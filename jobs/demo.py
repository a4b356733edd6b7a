"""``make demo``: drop a sample ZIP into ``s3://incoming/``, run the pipeline on it, print the URLs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lib.settings import get_settings
from lib.storage import s3_client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__)
    parser.add_argument("zip_path", type=Path, help="a Rakuten-format ZIP (e.g. from jobs.make_sample)")
    args = parser.parse_args(argv)
    settings = get_settings()
    t0 = time.monotonic()
    key = args.zip_path.name
    s3_client(settings).upload_file(str(args.zip_path), settings.bucket_incoming, key)
    print(f"uploaded {args.zip_path} → s3://{settings.bucket_incoming}/{key}")
    print(f"S3       {settings.s3_url}")
    print(f"MLflow   {settings.mlflow_uri}")
    print(f"Ray      {settings.ray_dashboard_url}")
    print(f"demo finished in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
