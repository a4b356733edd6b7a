"""The embedding job against real Ray + S3: shapes, norms, missing modality, cache."""

from __future__ import annotations

import io
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import embed as embed_job
from jobs import ingest as ingest_job
from lib.data import lake, layout
from lib.data.rakuten import image_member_name
from lib.data.sample import SampleSpec, write_sample_zip
from lib.data.storage import get_bytes, list_keys, put_bytes
from lib.features.embed import encoder_pool_size, read_embeddings, to_matrix


def upload_sample(s3, settings, name: str, products: int = 40, drop_image_of: int | None = None,
                  rename: dict[int, str] | None = None) -> pd.DataFrame:  # fmt: skip
    """A sample ZIP (optionally one image removed, some titles changed) uploaded and ingested."""
    buf = io.BytesIO()
    catalogue = write_sample_zip(SampleSpec(products=products, seed=7, image_size=64), buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    x = pd.read_csv(io.BytesIO(src.read("X_train_update.csv")), index_col=0)
    for productid, title in (rename or {}).items():
        x.loc[x["productid"] == productid, "designation"] = title
    skip = None
    if drop_image_of is not None:
        row = catalogue[catalogue["productid"] == drop_image_of].iloc[0]
        skip = image_member_name(row["imageid"], row["productid"])
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if info.filename == skip:
                continue
            data = x.to_csv().encode() if info.filename == "X_train_update.csv" else src.read(info)
            dst.writestr(info, data)
    put_bytes(s3, settings.bucket_incoming, name, out.getvalue())
    ingest_job.run(f"s3://{settings.bucket_incoming}/{name}", settings)
    return catalogue


def test_embeddings_shapes_norms_missing_image_and_cache(ray_cluster, s3, stack, lake_reset):
    catalogue = upload_sample(s3, stack, "e1.zip", drop_image_of=None)
    no_image = int(catalogue["productid"].iloc[3])
    catalogue = upload_sample(
        s3, stack, "e2.zip", drop_image_of=no_image, rename={}
    )  # same products, 1 image gone
    # Small blocks, files and row groups, so that compaction and the row-group skipping are exercised.
    compacting = stack.model_copy(
        update={"embed_batch_size": 8, "embed_file_rows": 25, "embed_row_group_rows": 8}
    )
    first = embed_job.run(compacting)
    assert first.encoded == len(catalogue) and first.cached == 0
    assert set(first.worker_seconds) == {"fetch", "text", "image", "write", "block", "cpu"}
    # A tiny run's fetch and write can take under a millisecond; the encoders and the actors' CPU cannot.
    assert min(first.worker_seconds.values()) >= 0
    assert min(first.worker_seconds[step] for step in ("text", "image", "block", "cpu")) > 0

    frame = read_embeddings(s3, stack, first.encoder_set_id)
    assert sorted(frame["productid"]) == sorted(catalogue["productid"])
    text, image = to_matrix(frame["text_emb"], 512), to_matrix(frame["image_emb"], 1280)
    assert text.shape == (len(catalogue), 512) and image.shape == (len(catalogue), 1280)
    assert text.dtype == np.float32 and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-4)
    missing = frame["productid"].to_numpy() == no_image
    assert not frame.loc[missing, "has_image"].item()
    assert np.all(image[missing] == 0)
    assert np.allclose(np.linalg.norm(image[~missing], axis=1), 1, atol=1e-4)
    assert set(frame["text_encoder"]) == {first.text_encoder}
    # The encoders' per-block files were compacted into files of at most 25 rows, then deleted: the run
    # holds those files and the manifest that commits them.
    run_keys = sorted(
        list_keys(s3, stack.bucket_lake, layout.embedding_run_prefix(first.encoder_set_id, first.run_id))
    )
    parts = [key for key in run_keys if key.endswith(".parquet")]
    assert first.blocks == 3 and first.files == len(parts) == 2 and len(run_keys) == len(parts) + 1
    assert all("/blocks/" not in key for key in run_keys)
    # Some hashes only: the rows of those, read from the row groups that hold them.
    some = frame["embed_hash"].iloc[[0, 17, 18, 39]].tolist()
    subset = read_embeddings(s3, stack, first.encoder_set_id, ["embed_hash", "text_emb"], some)
    assert sorted(subset["embed_hash"]) == sorted(some)
    by_hash = frame.set_index("embed_hash")["text_emb"]
    assert all(np.array_equal(row.text_emb, by_hash[row.embed_hash]) for row in subset.itertuples())
    assert read_embeddings(s3, stack, first.encoder_set_id, ["embed_hash"], ["no such hash"]).empty

    # Re-running encodes nothing.
    again = embed_job.run(stack)
    assert again.encoded == 0 and again.cached == len(catalogue) and again.run_id is None

    # Changing one product re-encodes only that one.
    changed = int(catalogue["productid"].iloc[10])
    upload_sample(s3, stack, "e3.zip", drop_image_of=no_image, rename={changed: "Titre entièrement nouveau"})
    third = embed_job.run(stack)
    assert third.encoded == 1
    assert third.actors == 1  # one product is less than a batch: no second actor to start for nothing
    # ...and the lone actor covers both cores 1.5 times (three one-thread lanes: see embed_lanes_per_core)
    assert third.threads_per_actor == 3 == third.lanes
    current = lake.current_products(s3, stack)
    assert (
        current.loc[current["productid"] == changed, "designation_clean"].item()
        == "Titre entièrement nouveau"
    )


def test_encoder_pool_fits_what_is_free_now():
    from lib.features.embed import encoder_lanes, plan_encoder_pool, plan_pool
    from lib.settings import Settings

    assert plan_encoder_pool(2, 2, 1.0, 0.5) == (1, 1.0)
    # Lanes per actor cover the node's cores: 1 actor on 2 cores → 2 lanes, 2 → 1, 4 on 2 nodes → 1.
    lanes = [encoder_lanes(2, 1, 1, 1), encoder_lanes(2, 1, 2, 1), encoder_lanes(4, 2, 4, 1)]
    assert lanes == [2, 1, 1]
    assert encoder_lanes(2, 1, 1, 2) == 1 and encoder_lanes(2, 1, 2, 3) == 1  # threads per lane count
    # 1.5 lanes per core: a third lane for the lone actor on 2 cores; still 1 for a one-core share.
    assert [encoder_lanes(cpus, 1, actors, 1, 1.5) for cpus, actors in ((2, 1), (2, 2), (8, 2))] == [3, 1, 6]
    assert plan_encoder_pool(2, 2, 0.75, 0.5) == (2, 0.75)
    assert plan_encoder_pool(4, 4, 1.0, 0.5) == (3, 1.0)
    # Serve holds 0.7 CPU of 2: a 1-CPU actor plus the other tasks would never be scheduled.
    assert plan_encoder_pool(2, 1.3, 1.0, 0.5) == (1, 0.8)
    assert plan_encoder_pool(2, 0.2, 1.0, 0.5) == (1, 0.05)
    # The whole plan: a handful of products gets one actor, which then gets every lane of the node.
    settings = Settings().model_copy(update={"embed_actor_cpus": 0.75, "embed_reserve_cpus": 0.5,
        "embed_batch_size": 32, "encoder_threads": 1, "embed_lanes_per_core": 1.5})  # fmt: skip
    assert plan_pool(3000, settings, 2, 2, 1) == (2, 0.75, 1)
    assert plan_pool(40, settings, 2, 2, 1) == (1, 0.75, 3)


def test_encoder_pool_leaves_a_cpu_for_the_other_tasks():
    assert encoder_pool_size(2, 1.0, 0.5) == 1
    assert encoder_pool_size(4, 1.0, 0.5) == 3
    assert encoder_pool_size(1, 1.0, 0.5) == 1
    assert encoder_pool_size(2, 0.75, 0.5) == 2
    assert encoder_pool_size(8, 0.75, 0.5) == 8  # never more actors than cores


def test_images_are_read_from_the_archived_zip_and_fall_back_to_their_objects(s3, stack, lake_reset):
    from lib.data.storage import delete_prefix, get_bytes, split_uri
    from lib.features.embed import (
        PRODUCT_COLUMNS,
        ImageFetcher,
        embedding_inputs,
        image_locations,
        with_image_locations,
    )

    catalogue = upload_sample(s3, stack, "z1.zip", products=30)
    manifests = lake.committed_manifests(s3, stack)
    archive = f"s3://{stack.bucket_lake}/{layout.archive_key(manifests[0]['batch_id'])}"
    assert manifests[0]["archive_uri"] == archive
    products = lake.current_products(s3, stack, PRODUCT_COLUMNS, manifests)
    inputs = embedding_inputs(products, stack, "set")
    inputs = with_image_locations(inputs, image_locations(s3, stack, manifests))
    assert len(inputs) == len(catalogue) and inputs["image_zip"].notna().all()
    assert inputs["image_zip_offset"].is_monotonic_increasing  # adjacent members: one ranged read per batch
    stored = [get_bytes(s3, stack.bucket_lake, key) for key in inputs["image_key"]]

    fetcher = ImageFetcher(stack)
    # From the ZIP alone: the per-image objects are not touched (their keys point nowhere here).
    assert fetcher.fetch(inputs.assign(image_key="images/none.jpg")) == stored
    # A member whose CRC does not check out comes from its object instead.
    corrupt = inputs.assign(image_zip_crc=inputs["image_zip_crc"].where(inputs.index != 2, 12345))
    assert fetcher.fetch(corrupt) == stored
    # The archive is gone: every image comes from its object.
    delete_prefix(s3, *split_uri(manifests[0]["archive_uri"]))
    assert ImageFetcher(stack).fetch(inputs) == stored
    # A product without an image gets None, whatever its location says.
    assert ImageFetcher(stack).fetch(inputs.assign(has_image=False)) == [None] * len(inputs)


def test_a_retried_block_overwrites_its_own_file(s3, stack, lake_reset):
    from lib.features.embed import PRODUCT_COLUMNS, EncoderWorker, embedding_inputs

    upload_sample(s3, stack, "w1.zip", products=40)
    inputs = embedding_inputs(lake.current_products(s3, stack, PRODUCT_COLUMNS), stack, "set")
    prefix = layout.embedding_run_prefix("set", "r")
    worker = EncoderWorker(stack.model_copy(update={"embed_batch_size": 16}), prefix)
    first, again = worker(inputs), worker(inputs)  # e.g. a task retried after its actor died
    assert (first["file"], first["rows"]) == (again["file"], again["rows"]) == (first["file"], [len(inputs)])
    # Where the block's time went: each step is part of the block's wall time.
    steps = ("fetch_s", "text_s", "image_s", "write_s")
    assert (
        all(first[step][0] > 0 for step in steps) and sum(first[s][0] for s in steps) <= first["block_s"][0]
    )
    assert list(list_keys(s3, stack.bucket_lake, prefix)) == first["file"]
    other = worker(inputs.iloc[:10])
    assert other["file"] != first["file"] and other["rows"] == [10]


def test_blocks_in_one_actor_at_once_share_its_lanes_and_count_its_cpu_once(s3, stack, lake_reset):
    from lib.features.embed import PRODUCT_COLUMNS, EncoderWorker, embedding_inputs

    upload_sample(s3, stack, "w2.zip", products=48)
    inputs = embedding_inputs(lake.current_products(s3, stack, PRODUCT_COLUMNS), stack, "set")
    prefix = layout.embedding_run_prefix("set", "c")
    worker = EncoderWorker(stack.model_copy(update={"embed_batch_size": 8}), prefix, lanes=2)
    cpu_before = time.process_time()
    blocks = [inputs.iloc[:24], inputs.iloc[24:]]
    with ThreadPoolExecutor(2) as calls:  # as Ray Data calls a threaded actor
        results = list(calls.map(worker, blocks))
    cpu_spent = time.process_time() - cpu_before
    assert [r["rows"] for r in results] == [[24], [24]]
    assert sorted(list_keys(s3, stack.bucket_lake, prefix)) == sorted(r["file"][0] for r in results)
    # Each block reports the CPU not yet reported: their sum is the actor's, not twice the overlap.
    reported = sum(r["cpu_s"][0] for r in results)
    assert 0 < reported <= cpu_spent
    frame = pa.concat_tables(
        [pq.read_table(io.BytesIO(get_bytes(s3, stack.bucket_lake, r["file"][0]))) for r in results]
    ).to_pandas()
    assert sorted(frame["productid"]) == sorted(inputs["productid"])
