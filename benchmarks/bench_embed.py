"""Embedding speed: the project's job against the raw encoder loop (the limit) and the reference approach.

Three ways to embed the same products (2,000 generated ones with 256 px JPEGs, and the real sample if
:func:`benchmarks.common.real_data_dir` finds it):

(a) limit: one process calling the shipped encoders (USE-m3, EfficientNet-Lite0 on ONNX Runtime) in a
    plain loop with ``settings.embed_batch_size`` on one one-thread lane per core (batches in parallel,
    as the job's actors run them), images already in memory as bytes: no Ray, no S3, no Parquet. Model
    loading is excluded (warm-up batch).
(b) reference: the reference pipeline's approach, one process, USE-m3 and EfficientNet-Lite0 in PyTorch
    (no ONNX), batch 64, one thread per core, images in memory; on the first ``--reference-items`` texts
    and images only (PyTorch Lite0 runs at a few tens of images/s: the rate is steady after a few batches).
(c) job: ``jobs.embed.run(settings)`` after ``jobs.ingest.run``, timed around the whole call: product
    table and hashes, Ray Data, actor start-up and model loading, images read from the batch's archived
    ZIP in S3 (ranged reads), Parquet written to S3 and the commit. The embedding cache is emptied
    before every run.

(a) and (b) time texts and images separately (text items/s, image items/s). The job encodes both
modalities of each product in one pass, so it is compared per product with the combined rate of (a)
and (b): products / (texts / text_rate + images / image_rate), i.e. 1 / (1/text_rate + 1/image_rate)
when every product has a text and an image (the generated sample; the real one has fewer images).

The machine is shared, so: Ray runs its workers at a lower priority (niceness 15 by default), and (a)
and (b) run in child processes at the niceness of the Ray workers, so other processes slow all three
alike; rounds are interleaved (a, b, c, a, b, c, ...); each rate is the median of the rounds with the
min-max range, each ratio the median of the per-round ratios with its range. Targets: c/a >= 0.85,
c/b >= 3.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmarks.common import bench_parser, bench_stack, print_table, real_data_dir, zip_real_sample
from jobs import embed as embed_job
from jobs import ingest as ingest_job
from jobs.common import connect_ray
from lib.data import layout
from lib.data.sample import SampleSpec, write_sample_zip
from lib.data.storage import delete_prefix, get_bytes, s3_client
from lib.features.catalogue import current_catalogue
from lib.settings import Settings

REFERENCE_BATCH = 64  # what the reference pipeline uses for both encoders
GENERATED_PRODUCTS = 2_000
# 256 px: JPEG decoding and resizing cost about what they cost on real catalogue photos.
GENERATED_IMAGE_SIZE = 256
DEFAULT_ROUNDS = 3
DEFAULT_REFERENCE_ITEMS = 512
TARGET_C_OVER_A = 0.85
TARGET_C_OVER_B = 3.0
FETCH_THREADS = 16


# --- (a) and (b): the encoder loop in a child process ------------------------------------------------

_child: dict = {}


def _child_init(
    niceness: int, approach: str, settings: Settings, texts: list[str], images: list[bytes]
) -> None:
    """Runs once in the child: Ray workers' priority, the encoders, the inputs, a warm-up batch."""
    os.nice(niceness - os.nice(0))
    from lib.features.encoders import EfficientNetLite0Torch, build_image_encoder, build_text_encoder

    # Every core: the limit on a one-thread lane per core, the reference with a thread per core.
    lanes, threads = (os.cpu_count(), 1) if approach == "limit" else (1, os.cpu_count())
    settings = settings.model_copy(update={"encoder_threads": threads})

    t0 = time.perf_counter()
    text_encoder = build_text_encoder(settings)  # USE-m3 for both approaches
    if approach == "limit":
        image_encoder, batch = build_image_encoder(settings), settings.embed_batch_size
    else:
        image_encoder, batch = EfficientNetLite0Torch(settings.encoder_threads), REFERENCE_BATCH
    text_encoder.encode(texts[:batch])  # weights load lazily: keep that out of the loop
    image_encoder.encode(images[:batch])
    _child.update(
        text=text_encoder, image=image_encoder, batch=batch, texts=texts, images=images,
        load_s=time.perf_counter() - t0, lanes=ThreadPoolExecutor(lanes),
    )  # fmt: skip


def _loop_seconds(
    encode: Callable[[list], object], items: list, batch: int, lanes: ThreadPoolExecutor
) -> float:
    t0 = time.perf_counter()
    list(lanes.map(encode, [items[start : start + batch] for start in range(0, len(items), batch)]))
    return time.perf_counter() - t0


def _child_round() -> dict[str, float]:
    """One pass over every text, then every image: items/s of each, plus the model load time."""
    c = _child
    text_s = _loop_seconds(c["text"].encode, c["texts"], c["batch"], c["lanes"])
    image_s = _loop_seconds(c["image"].encode, c["images"], c["batch"], c["lanes"])
    return {
        "text": len(c["texts"]) / text_s, "image": len(c["images"]) / image_s,
        "load_s": c["load_s"], "load_avg": os.getloadavg()[0],
    }  # fmt: skip


def _niceness() -> int:
    return os.nice(0)


def ray_worker_niceness(settings: Settings) -> int:
    """The niceness Ray gives its worker processes (RAY_worker_niceness, 15 by default)."""
    import ray

    connect_ray(settings)
    return ray.get(ray.remote(num_cpus=0)(_niceness).remote())


# --- one dataset ------------------------------------------------------------------------------------


@dataclass
class Runs:
    """Every round of one approach on one dataset."""

    text: list[float] = field(default_factory=list)
    image: list[float] = field(default_factory=list)
    products: list[float] = field(default_factory=list)
    load_avg: list[float] = field(default_factory=list)
    load_s: float = float("nan")


def combined_rate(products: int, texts: int, images: int, text_rate: float, image_rate: float) -> float:
    """Products/s of one process encoding every text then every image at these rates."""
    return products / (texts / text_rate + images / image_rate)


def spread(values: list[float]) -> str:
    """``median [min-max]`` with 3 significant digits."""
    if not values:
        return "-"
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def ingest(settings: Settings, path: Path) -> pd.DataFrame:
    """An empty lake, then this ZIP ingested; returns the encoder inputs of its products."""
    client = s3_client(settings)
    for bucket in (settings.bucket_lake, settings.bucket_incoming):
        delete_prefix(client, bucket, "")
    client.upload_file(str(path), settings.bucket_incoming, path.name)
    ingest_job.run(f"s3://{settings.bucket_incoming}/{path.name}", settings)
    return current_catalogue(client, settings).inputs


def bench_dataset(settings: Settings, path: Path, rounds: int, niceness: int, reference_items: int) -> dict:
    """Interleaved rounds of (a), (b) and (c) on the products of one ZIP."""
    inputs = ingest(settings, path)
    client = s3_client(settings)
    texts = inputs.loc[inputs["has_text"], "text"].tolist()
    keys = inputs.loc[inputs["has_image"], "image_key"].tolist()
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        images = list(pool.map(lambda k: get_bytes(client, settings.bucket_lake, k), keys))
    n = len(inputs)
    runs = {"a": Runs(), "b": Runs(), "c": Runs()}
    spawn = multiprocessing.get_context("spawn")  # no inherited Ray/ORT/torch state in the children
    ref_texts, ref_images = texts[:reference_items], images[:reference_items]
    children = {
        key: ProcessPoolExecutor(
            1, mp_context=spawn, initializer=_child_init, initargs=(niceness, approach, settings, *items)
        )
        for key, approach, items in (
            ("a", "limit", (texts, images)),
            ("b", "reference", (ref_texts, ref_images)),
        )
    }
    try:
        for _ in range(rounds):
            for key, child in children.items():
                r = child.submit(_child_round).result()
                runs[key].text.append(r["text"])
                runs[key].image.append(r["image"])
                runs[key].products.append(combined_rate(n, len(texts), len(images), r["text"], r["image"]))
                runs[key].load_avg.append(r["load_avg"])
                runs[key].load_s = r["load_s"]
            delete_prefix(client, settings.bucket_lake, layout.EMBEDDINGS)  # encode everything again
            t0 = time.perf_counter()
            manifest = embed_job.run(settings)
            seconds = time.perf_counter() - t0
            if manifest.encoded != n:
                raise RuntimeError(f"the job encoded {manifest.encoded} of {n} products")
            runs["c"].products.append(n / seconds)
            # The encoders' own rate inside the job (their seconds in the actors, every lane at work):
            # against (a), it says whether the job loses its time in the encoders or around them.
            worker, lanes = manifest.worker_seconds, manifest.actors * manifest.lanes
            runs["c"].text.append(len(texts) * lanes / worker["text"])
            runs["c"].image.append(len(images) * lanes / worker["image"])
            actors = f"{manifest.actors} actor(s) × {manifest.threads_per_actor} thread(s)"
            runs["c"].load_avg.append(os.getloadavg()[0])
    finally:
        for child in children.values():
            child.shutdown()
    return {
        "name": path.stem, "products": n, "texts": len(texts), "images": len(images), "runs": runs,
        "reference_items": (len(ref_texts), len(ref_images)), "actors": actors,
    }  # fmt: skip


# --- report -----------------------------------------------------------------------------------------


def report(results: list[dict], settings: Settings, rounds: int, niceness: int) -> None:
    batch = settings.embed_batch_size
    ratio_rows = []
    for res in results:
        runs, (ref_texts, ref_images) = res["runs"], res["reference_items"]
        labels = {
            "a": f"(a) limit: ONNX Lite0 + USE-m3, batch {batch}, 1 process, {os.cpu_count()} lanes",
            "b": f"(b) reference: torch Lite0 + USE-m3, batch {REFERENCE_BATCH}, 1 process "
            f"({ref_texts} texts, {ref_images} images)",
            "c": "(c) job: jobs.embed.run (Ray Data, S3 in and out; item rates: its encoders' own time)",
        }
        rows = [
            [labels[k], spread(r.text), spread(r.image), spread(r.products),
             "-" if k == "c" else f"{r.load_s:.1f}", spread(r.load_avg)]
            for k, r in runs.items()
        ]  # fmt: skip
        print_table(
            f"Embedding {res['name']}: {res['products']} products, {res['texts']} texts, {res['images']} "
            f"images; (a), (b): {os.cpu_count()} threads; (c): {res['actors']}; "
            f"median [min-max] of {rounds} rounds",
            ["approach", "text items/s", "image items/s", "products/s", "model load s", "load avg 1 min"],
            rows,
        )
        c = runs["c"].products
        c_a = [ci / ai for ci, ai in zip(c, runs["a"].products, strict=True)]
        c_b = [ci / bi for ci, bi in zip(c, runs["b"].products, strict=True)]
        ratio_rows.append(
            [res["name"], spread(c_a), f">= {TARGET_C_OVER_A}", spread(c_b), f">= {TARGET_C_OVER_B}"]
        )
    print_table(
        f"Job vs limit (c/a) and vs reference (c/b), per product; Ray worker niceness {niceness} "
        "(also used for a and b)",
        ["dataset", "c/a", "target", "c/b", "target"],
        ratio_rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("bench_embed", __doc__)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds of a, b, c")
    parser.add_argument("--products", type=int, default=GENERATED_PRODUCTS, help="generated products")
    parser.add_argument(
        "--reference-items", type=int, default=DEFAULT_REFERENCE_ITEMS, help="texts and images timed for (b)"
    )
    parser.add_argument(
        "--datasets", default="generated,real", help="comma-separated: generated, real (if present)"
    )
    args = parser.parse_args(argv)
    datasets = set(args.datasets.split(","))
    results = []
    with bench_stack() as settings, tempfile.TemporaryDirectory() as tmp:
        niceness = ray_worker_niceness(settings)
        generated = Path(tmp) / f"generated-{args.products}.zip"
        spec = SampleSpec(products=args.products, seed=args.products, image_size=GENERATED_IMAGE_SIZE)
        if "generated" in datasets:
            write_sample_zip(spec, generated)
            results.append(bench_dataset(settings, generated, args.rounds, niceness, args.reference_items))
        real = real_data_dir()
        if real and "real" in datasets:
            real_zip = zip_real_sample(real, Path(tmp) / "real-sample.zip")
            results.append(bench_dataset(settings, real_zip, args.rounds, niceness, args.reference_items))
        report(results, settings, args.rounds, niceness)


if __name__ == "__main__":
    main()
