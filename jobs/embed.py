"""Embed every current product that has no embedding yet for the configured encoders.

``python -m jobs.embed [--batch BATCH_ID]`` (also run by the pipeline). Re-running is a no-op.
"""

from __future__ import annotations

import argparse
import time

import ray

from jobs.common import cluster_cpus, connect_ray, run_cli
from lib.data.layout import embedding_run_blocks_prefix
from lib.data.storage import s3_client
from lib.features.catalogue import current_catalogue
from lib.features.embed import (
    EmbedRun,
    EncoderWorker,
    commit_run,
    compact_run,
    image_locations,
    new_run_id,
    plan_encoding,
    with_image_locations,
    worker_seconds,
)
from lib.ops.preflight import require
from lib.settings import Settings, get_settings


def run(settings: Settings | None = None, batch_id: str | None = None) -> EmbedRun:
    """The embed stage: encode what is missing, write Parquet, commit the run."""
    settings = settings or get_settings()
    require(settings, "s3")
    connect_ray(settings)
    client = s3_client(settings)
    catalogue = current_catalogue(client, settings, batch_id)
    todo = catalogue.missing(client, settings)
    embed_run = EmbedRun(
        encoder_set_id=catalogue.set_id,
        text_encoder=catalogue.text_id.key,
        image_encoder=catalogue.image_id.key,
        products=len(catalogue.inputs),
        cached=len(catalogue.inputs) - len(todo),
        encoded=len(todo),
    )
    if todo.empty:
        return embed_run
    todo = with_image_locations(todo, image_locations(client, settings, catalogue.manifests))
    plan = plan_encoding(todo, settings, *cluster_cpus())
    embed_run.run_id = new_run_id()
    blocks_prefix = embedding_run_blocks_prefix(catalogue.set_id, embed_run.run_id)
    started = time.monotonic()
    written = (
        ray.data.from_pandas(plan.blocks)
        # Each actor fetches its block's images (ranged reads of the batch's ZIP; see ImageFetcher) and
        # writes the block as one Parquet file below the run's blocks/ prefix: no stage moves embeddings.
        .map_batches(
            EncoderWorker,
            fn_constructor_args=(settings, blocks_prefix, plan.lanes),
            # A fixed pool, sized from the CPUs free now: with room to shrink, Ray Data's autoscaler cuts
            # it to its own per-operator CPU budget (1 of 2 actors on 2 cores: half the speed).
            # Blocks overlap inside an actor (see EncoderWorker): Ray Data runs its calls on threads.
            compute=ray.data.ActorPoolStrategy(
                size=plan.actors,
                max_concurrent_calls_per_actor=settings.embed_calls_per_actor,
                enable_true_multi_threading=True,
            ),
            num_cpus=plan.actor_cpus,
            batch_size=None,  # one call per block, one file per block
            batch_format="pandas",
        )
        .take_all()
    )
    compact_started = time.monotonic()
    rows_per_file = compact_run(settings, catalogue.set_id, embed_run.run_id)
    embed_run.compact_seconds = round(time.monotonic() - compact_started, 2)
    seconds = time.monotonic() - started
    embed_run.text_dim, embed_run.image_dim = catalogue.text_id.dim, catalogue.image_id.dim
    embed_run.actors, embed_run.lanes = plan.actors, plan.lanes
    embed_run.threads_per_actor = plan.lanes * settings.encoder_threads
    embed_run.batch_size, embed_run.blocks = settings.embed_batch_size, len(written)
    embed_run.files, embed_run.worker_seconds = len(rows_per_file), worker_seconds(written)
    embed_run.seconds, embed_run.items_per_s = round(seconds, 2), round(len(todo) / seconds, 1)
    return commit_run(client, settings, embed_run, sum(rows_per_file))  # every block's rows, compacted


def describe(m: EmbedRun) -> str:
    """One line for people."""
    if m.encoded == 0:
        return f"nothing to embed: {m.products} products already embedded for set {m.encoder_set_id}"
    return (
        f"embedded {m.encoded} products ({m.cached} cached) with {m.text_encoder} + {m.image_encoder} "
        f"in {m.seconds} s: {m.items_per_s} items/s ({m.actors} actor(s))"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.embed", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default=None, help="only the products of this batch id")
    args = parser.parse_args(argv)

    def act() -> int:
        print(describe(run(batch_id=args.batch)))
        return 0

    return run_cli("embed", act)


if __name__ == "__main__":
    raise SystemExit(main())
