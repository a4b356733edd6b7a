"""Ingestion speed and memory: generated ZIPs of 2k and 20k products, and the real sample if present.

Memory must not grow with the ZIP: the driver reads only the CSVs and the central directory, each Ray
task one partition of images. Prints rows/s and peak RSS (driver, largest Ray worker) per size.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import PeakRss, bench_parser, bench_stack, print_table, real_data_dir, zip_real_sample
from jobs import ingest as ingest_job
from lib.data.sample import SampleSpec, write_sample_zip
from lib.data.storage import s3_client


def run_one(settings, path: Path, name: str) -> list[object]:
    client = s3_client(settings)
    client.upload_file(str(path), settings.bucket_incoming, f"{name}.zip")
    with PeakRss() as rss:
        t0 = time.perf_counter()
        manifest = ingest_job.run(f"s3://{settings.bucket_incoming}/{name}.zip", settings).manifest
        seconds = time.perf_counter() - t0
    return [
        name, path.stat().st_size / 2**20, manifest.rows_read, manifest.accepted, manifest.rejected,
        manifest.with_image, seconds, manifest.rows_read / seconds, rss.driver_mb, rss.worker_mb,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    bench_parser("bench_ingest", __doc__).parse_args(argv)  # no options: --help only
    rows = []
    with bench_stack() as settings, tempfile.TemporaryDirectory() as tmp:
        for products in (2_000, 20_000):
            path = Path(tmp) / f"gen{products}.zip"
            # 500 px images like the real catalogue, so the ZIP size is realistic (~30 KB an image).
            write_sample_zip(SampleSpec(products=products, seed=products, image_size=256), path)
            rows.append(run_one(settings, path, f"generated-{products}"))
        real = real_data_dir()
        if real:
            rows.append(run_one(settings, zip_real_sample(real, Path(tmp) / "real.zip"), "real-sample"))
    print_table(
        "Ingestion (ray data, 2 CPUs)",
        ["batch", "zip MB", "rows", "accepted", "rejected", "with image", "seconds", "rows/s",
         "driver peak MB", "worker peak MB"],
        rows,
    )  # fmt: skip
    if len(rows) >= 2:
        small, large = rows[0], rows[1]
        print(
            f"\n20k/2k ratio: rows {large[2] / small[2]:.0f}x, zip {large[1] / small[1]:.1f}x, "
            f"driver peak RSS {large[8] / small[8]:.2f}x, worker peak RSS {large[9] / small[9]:.2f}x"
        )


if __name__ == "__main__":
    main()
