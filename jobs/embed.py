"""Embed every current product that has no embedding yet for the configured encoders.

``python -m jobs.embed [--batch BATCH_ID]`` (also run by the pipeline). Re-running is a no-op.
"""

from __future__ import annotations

import argparse
import math
import time
import uuid
from datetime import UTC, datetime

from jobs.common import connect_ray
from lib import lake
from lib.embed import (
    PRODUCT_COLUMNS,
    RUN_MANIFEST,
    EncoderWorker,
    embedding_inputs,
    encoder_threads,
    image_locations,
    plan_encoder_pool,
    read_embeddings,
    run_prefix,
    with_image_locations,
)
from lib.encoders import encoder_ids, encoder_set_id
from lib.settings import Settings, get_settings
from lib.storage import put_json, s3_client


def run(settings: Settings | None = None, batch_id: str | None = None) -> dict:
    """The embed stage: encode what is missing, write Parquet, commit the run; returns its manifest."""
    import ray

    settings = settings or get_settings()
    connect_ray(settings)
    client = s3_client(settings)
    t0 = time.monotonic()
    text_id, image_id = encoder_ids(settings)
    set_id = encoder_set_id(text_id, image_id)
    manifests = lake.committed_manifests(client, settings)
    products = lake.current_products(client, settings, PRODUCT_COLUMNS, manifests)
    if batch_id is not None:
        products = products[products["batch_id"] == batch_id]
    inputs = embedding_inputs(products, settings, set_id)
    done = set(read_embeddings(client, settings, set_id, ["embed_hash"])["embed_hash"])
    todo = inputs[~inputs["embed_hash"].isin(done)].reset_index(drop=True)
    if not todo.empty:
        todo = with_image_locations(todo, image_locations(client, settings, manifests))
    summary = {
        "encoder_set_id": set_id,
        "text_encoder": text_id.key,
        "image_encoder": image_id.key,
        "products": len(inputs),
        "cached": len(inputs) - len(todo),
        "encoded": len(todo),
    }
    if todo.empty:
        return {**summary, "run_id": None, "seconds": round(time.monotonic() - t0, 2), "items_per_s": 0.0}

    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    total_cpus = ray.cluster_resources().get("CPU", 1)
    pool, actor_cpus = plan_encoder_pool(
        total_cpus,
        ray.available_resources().get("CPU", 0),
        settings.embed_actor_cpus,
        settings.embed_reserve_cpus,
    )
    # An actor per full encoder batch at most: for a handful of products a second actor would spend more
    # on its start and model loading than it takes off the first one.
    pool = min(pool, max(1, len(todo) // settings.embed_batch_size))
    alive_nodes = sum(node["Alive"] for node in ray.nodes())
    threads = encoder_threads(total_cpus, alive_nodes, pool, settings.encoder_threads)
    worker_settings = settings.model_copy(update={"encoder_threads": threads})
    blocks = max(pool, math.ceil(len(todo) / (settings.embed_batch_size * settings.embed_block_batches)))
    size = math.ceil(len(todo) / blocks)
    # Blocks made here rather than by `repartition`, whose task would need a whole free CPU.
    chunks = [todo.iloc[i : i + size] for i in range(0, len(todo), size)]
    prefix = run_prefix(set_id, run_id)
    t_encode = time.monotonic()
    written = (
        ray.data.from_pandas(chunks)
        # Each actor fetches its block's images (ranged reads of the batch's ZIP; see ImageFetcher) and
        # writes the block as one Parquet file under the run's prefix, so no stage moves embeddings.
        .map_batches(
            EncoderWorker,
            fn_constructor_args=(worker_settings, prefix),
            # A fixed pool, sized above from the CPUs free now: with room to shrink, Ray Data's autoscaler
            # cuts it to its own per-operator CPU budget (1 of 2 actors on 2 cores: half the speed).
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_cpus=actor_cpus,
            batch_size=None,  # one call per block, one file per block
            batch_format="pandas",
        )
        .take_all()
    )
    seconds = time.monotonic() - t_encode
    rows = sum(block["rows"] for block in written)
    if rows != len(todo):  # nothing is committed unless every product was written
        raise RuntimeError(f"the encoders wrote {rows} rows for {len(todo)} products in run {run_id}")
    manifest = {
        **summary,
        "run_id": run_id,
        "text_dim": text_id.dim,
        "image_dim": image_id.dim,
        "actors": pool,
        "threads_per_actor": threads,
        "batch_size": settings.embed_batch_size,
        "files": len(written),
        "seconds": round(seconds, 2),
        "items_per_s": round(len(todo) / seconds, 1),
        "committed_at": datetime.now(UTC).isoformat(),
    }
    # The commit: readers only see runs that have their manifest.
    put_json(client, settings.bucket_lake, f"{prefix}{RUN_MANIFEST}", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.embed", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default=None, help="only the products of this batch id")
    args = parser.parse_args(argv)
    m = run(batch_id=args.batch)
    if m["encoded"] == 0:
        print(f"nothing to embed: {m['products']} products already embedded for set {m['encoder_set_id']}")
    else:
        print(
            f"embedded {m['encoded']} products ({m['cached']} cached) with {m['text_encoder']} + "
            f"{m['image_encoder']} in {m['seconds']} s: {m['items_per_s']} items/s ({m['actors']} actor(s))"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
