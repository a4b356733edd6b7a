"""Embeddings of the current catalogue: what to encode, the encoder worker, and reading them back.

Layout (``lib.data.layout``): the encoder actors write one Parquet file per block below the run's
``blocks/`` prefix; the driver then compacts them into a few large files under the run's prefix and
writes the run's manifest last (the commit). A product is encoded again only when its embedding hash
changes: the hash covers the text the encoder sees, the image bytes (their SHA-256) and the encoder ids.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lib.data import lake
from lib.data.layout import (
    RUN_MANIFEST_FILE,
    embedding_run_blocks_prefix,
    embedding_run_manifest_key,
    embedding_run_prefix,
    embedding_set_prefix,
)
from lib.data.storage import (
    arrow_fs,
    delete_prefix,
    get_json,
    list_prefixes,
    put_json,
    put_table,
    read_object,
    s3_client,
    split_uri,
)
from lib.data.text import product_text
from lib.data.zip_reader import IMAGE_ZIP_COLUMNS, LOCATION_COLUMNS, read_members
from lib.features.encoders import build_image_encoder, build_text_encoder
from lib.settings import Settings

# Name of a compacted embedding file; readers take every Parquet file directly under a run's prefix.
COMPACTED_FILE_TEMPLATE = "embeddings-{i}.parquet"
# Hex characters of a block file's name: unique among the blocks of a run.
BLOCK_NAME_HEX_CHARS = 16
# Columns the encoder worker needs from the product table.
PRODUCT_COLUMNS = [
    "productid", "batch_id", "prdtypecode", "designation_clean", "description_clean", "image_key",
    "image_sha256", "has_image",
]  # fmt: skip


def embed_hash(text: str, image_sha256: str | None, set_id: str) -> str:
    """What an embedding depends on: encoder input text, image bytes, encoders."""
    return hashlib.sha256(f"{set_id}\x1f{text}\x1f{image_sha256 or ''}".encode()).hexdigest()[:24]


def embedding_inputs(products: pd.DataFrame, settings: Settings, set_id: str) -> pd.DataFrame:
    """The encoder inputs of each product: text, image key, flags and the embedding hash."""
    texts = [
        product_text(d, s, settings.text_max_chars)
        for d, s in zip(products["designation_clean"], products["description_clean"], strict=True)
    ]
    has_image = products["has_image"].fillna(False).astype(bool).to_numpy()
    image_sha = [s if h else None for s, h in zip(products["image_sha256"], has_image, strict=True)]
    image_key = [k if h else None for k, h in zip(products["image_key"], has_image, strict=True)]
    return pd.DataFrame(
        {
            "productid": products["productid"].astype("int64").to_numpy(),
            "batch_id": products["batch_id"].to_numpy(),
            "prdtypecode": products["prdtypecode"].astype("Int64").to_numpy(),
            "text": texts,
            "has_text": [bool(t.strip()) for t in texts],
            "image_key": image_key,
            "has_image": has_image,
            "embed_hash": [embed_hash(t, s, set_id) for t, s in zip(texts, image_sha, strict=True)],
        }
    )


IMAGE_ZIP = "image_zip"  # column: URI of the ZIP holding the product's image (None: fetch it by key)


def image_locations(client, settings: Settings, manifests: list[dict]) -> pd.DataFrame:
    """Where each product's image sits in its batch's ZIP: productid, batch_id, image_zip, image_zip_*.

    Only batches whose manifest names an ``archive_uri`` (ingested since ZIP locations are kept) appear.
    """
    frames = [
        lake.batch_products(client, settings, m["batch_id"], ["productid", *IMAGE_ZIP_COLUMNS]).assign(
            batch_id=m["batch_id"], **{IMAGE_ZIP: m["archive_uri"]}
        )
        for m in manifests
        if m.get("archive_uri")
    ]
    if not frames:
        return pd.DataFrame(columns=["productid", "batch_id", IMAGE_ZIP, *IMAGE_ZIP_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def with_image_locations(inputs: pd.DataFrame, locations: pd.DataFrame) -> pd.DataFrame:
    """Embedding inputs plus their image's ZIP location, sorted so each batch reads adjacent members.

    A product without a usable location (no image, or a batch without one) gets ``image_zip`` None and
    offset -1: its image is fetched by key.
    """
    out = inputs.merge(locations, on=["productid", "batch_id"], how="left", validate="one_to_one")
    usable = out["has_image"] & out[IMAGE_ZIP].notna() & (out["image_zip_offset"].fillna(-1) >= 0)
    out[IMAGE_ZIP] = out[IMAGE_ZIP].where(usable, None)
    out[IMAGE_ZIP_COLUMNS] = out[IMAGE_ZIP_COLUMNS].where(usable, -1).astype("int64")
    return out.sort_values([IMAGE_ZIP, "image_zip_offset"], kind="stable", na_position="last").reset_index(
        drop=True
    )


def member_runs(offsets: np.ndarray, ends: np.ndarray, max_gap: int) -> list[np.ndarray]:
    """Split members (sorted by offset) into runs read with one ranged read each: a gap > max_gap splits.

    Returns positions into ``offsets``.
    """
    if len(offsets) == 0:
        return []
    reach = np.maximum.accumulate(ends)
    breaks = np.flatnonzero(offsets[1:] - reach[:-1] > max_gap) + 1
    return np.split(np.arange(len(offsets)), breaks)


def committed_runs(client, settings: Settings, set_id: str) -> list[dict]:
    """Manifests of the committed embedding runs of one encoder set, oldest first."""
    runs = []
    for prefix in list_prefixes(client, settings.bucket_lake, embedding_set_prefix(set_id)):
        try:
            runs.append(get_json(client, settings.bucket_lake, f"{prefix}{RUN_MANIFEST_FILE}"))
        except client.exceptions.NoSuchKey:
            continue  # an uncommitted (crashed) run: invisible
    return sorted(runs, key=lambda m: m["committed_at"])


def read_embeddings(
    client,
    settings: Settings,
    set_id: str,
    columns: list[str] | None = None,
    hashes: list[str] | None = None,
) -> pd.DataFrame:
    """Committed embedding rows of the set, the latest run winning per embedding hash.

    With ``hashes``, only those rows: each file's hash column is read first, then only the row groups
    that hold a wanted row, one at a time, so memory stays bounded by what is kept and a file without
    any is skipped for the price of its hash column. Files are read ``settings.read_threads`` at a time
    (runs committed before compaction hold one file per encoded block).
    """
    fs = arrow_fs(settings)
    wanted = None if hashes is None else pa.array(hashes, pa.string())
    read_columns = None if columns is None else list(dict.fromkeys(["embed_hash", *columns]))
    paths = [
        path
        for run in committed_runs(client, settings, set_id)  # oldest first: later runs win below
        for path in parquet_paths(fs, f"{settings.bucket_lake}/{embedding_run_prefix(set_id, run['run_id'])}")
    ]
    with ThreadPoolExecutor(settings.read_threads) as pool:  # map keeps the files' order
        found = pool.map(lambda path: _read_embedding_file(fs, path, read_columns, wanted), paths)
        tables = [table for tables in found for table in tables]
    if not tables:
        return pd.DataFrame(columns=read_columns or ["embed_hash"])
    frame = to_frame(pa.concat_tables(tables, promote_options="default"))
    frame = frame.drop_duplicates("embed_hash", keep="last").reset_index(drop=True)
    return frame if columns is None else frame[columns]


def parquet_paths(fs, directory: str) -> list[str]:
    """The Parquet files directly under ``directory`` (``bucket/prefix``), sorted."""
    infos = fs.get_file_info(pa.fs.FileSelector(directory, allow_not_found=True))
    return sorted(info.path for info in infos if info.path.endswith(".parquet"))


def _read_embedding_file(fs, path: str, columns: list[str] | None, wanted: pa.Array | None) -> list[pa.Table]:
    """One embedding file's rows (only those whose hash is in ``wanted``, unless it is None)."""
    if wanted is None:
        return [pq.read_table(path, filesystem=fs, columns=columns)]
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        hashes = parquet.read(columns=["embed_hash"]).column("embed_hash")
        keep = pc.is_in(hashes, value_set=wanted).to_numpy(zero_copy_only=False)
        if not keep.any():
            return []
        group_rows = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        starts = np.cumsum([0, *group_rows])
        return [
            parquet.read_row_group(group, columns=columns).filter(keep[starts[group] : starts[group + 1]])
            for group in range(parquet.num_row_groups)
            if keep[starts[group] : starts[group + 1]].any()
        ]


def to_frame(table: pa.Table) -> pd.DataFrame:
    """``table.to_pandas()``, each vector column (a fixed-size list without nulls) held as row views of
    Arrow's own buffers: pyarrow's conversion copies every row into an array of its own, 4× slower here,
    and the caller copies the rows once more anyway, into the matrix it needs (``to_matrix``)."""
    vectors = [f.name for f in table.schema if pa.types.is_fixed_size_list(f.type)]
    vectors = [name for name in vectors if table.column(name).null_count == 0]
    frame = table.drop_columns(vectors).to_pandas()
    for name in vectors:
        column, dim = table.column(name), table.schema.field(name).type.list_size
        frame[name] = [
            row
            for chunk in column.chunks
            for row in chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), dim)
        ]
    return frame


def to_matrix(column: pd.Series, dim: int) -> np.ndarray:
    """A column of equal-length float vectors → a (n, dim) float32 matrix."""
    if len(column) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack(column.to_numpy()).astype(np.float32, copy=False)


def encoder_pool_size(cluster_cpus: float, actor_cpus: float, reserve_cpus: float) -> int:
    """How many encoder actors fit beside ``reserve_cpus`` for other Ray tasks, at most one per core.

    Leaving no CPU to the other Ray Data tasks deadlocks the pipeline on small machines. One actor per
    core with one thread each beats fewer actors with more threads (bench_embed: 2 × 1 thread encodes
    17 % more products/s than 1 × 2 threads on 2 cores).
    """
    fits = math.floor((cluster_cpus - reserve_cpus) / actor_cpus)
    return max(1, min(math.floor(cluster_cpus), fits))


def _ray_node_id() -> str | None:
    """The Ray node this process runs on; None outside Ray."""
    import ray  # lazy: only encoder actors ask; the dashboard and tests read embeddings without Ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def plan_encoder_pool(
    total_cpus: float, available_cpus: float, actor_cpus: float, reserve_cpus: float
) -> tuple[int, float]:
    """(actors, CPUs per actor) that fit what is free now, keeping ``reserve_cpus`` for the other tasks.

    Other work holds CPUs on a live cluster (Serve replicas, a Tune run): a pool sized from the total
    would wait forever for them. When not even one actor of ``actor_cpus`` fits, the single actor asks for
    what is free (Ray's CPUs are a reservation, not a limit: its threads still use the cores).
    """
    free = max(available_cpus - reserve_cpus, 0.0)
    if free >= actor_cpus:
        return max(
            1, min(encoder_pool_size(total_cpus, actor_cpus, reserve_cpus), math.floor(free / actor_cpus))
        ), actor_cpus
    return 1, max(round(free, 2), 0.05)


def encoder_lanes(
    cluster_cpus: float, nodes: int, actors: int, threads_per_lane: int, lanes_per_core: float = 1.0
) -> int:
    """Encoder batches each actor runs at once (a lane: one batch on ``threads_per_lane`` intra-op
    threads), so that the pool's lanes cover every core of a node, ``lanes_per_core`` times.

    Ray's CPUs are a reservation, not a limit: beside Serve replicas (which reserve CPUs but mostly idle)
    only one actor fits on 2 cores, and with one lane it would leave the second core unused. Lanes beat
    intra-op threads: on the real sample one process encodes 117 products/s on two one-thread lanes and
    85 with one two-thread batch (ONNX Runtime's and BLAS's threads spin, waiting on each other). More
    lanes than cores keep the cores busy while a lane fetches images, writes or holds the GIL.
    """
    nodes = max(nodes, 1)
    per_node = math.ceil(actors / nodes)
    cores = cluster_cpus / nodes / per_node
    return max(1, math.floor(cores * lanes_per_core / max(threads_per_lane, 1)))


@dataclass
class EncoderPlan:
    """How a run encodes: a fixed pool of actors, their CPUs and threads, and the blocks they get."""

    actors: int
    actor_cpus: float
    lanes: int
    blocks: list[pd.DataFrame]


def plan_pool(
    products: int, settings: Settings, total_cpus: float, available_cpus: float, nodes: int
) -> tuple[int, float, int]:
    """(actors, CPUs per actor, lanes per actor) that encode ``products`` on a cluster with these CPUs
    and alive nodes."""
    actors, actor_cpus = plan_encoder_pool(
        total_cpus, available_cpus, settings.embed_actor_cpus, settings.embed_reserve_cpus
    )
    # An actor per full encoder batch at most: for a handful of products a second actor would spend more
    # on its start and model loading than it takes off the first one.
    actors = min(actors, max(1, products // settings.embed_batch_size))
    lanes = encoder_lanes(total_cpus, nodes, actors, settings.encoder_threads, settings.embed_lanes_per_core)
    return actors, actor_cpus, lanes


def plan_encoding(
    todo: pd.DataFrame, settings: Settings, total_cpus: float, available_cpus: float, nodes: int
) -> EncoderPlan:
    """The actor pool and the blocks for ``todo`` on a cluster with these CPUs and alive nodes."""
    actors, actor_cpus, lanes = plan_pool(len(todo), settings, total_cpus, available_cpus, nodes)
    # Each lane gets as many of a block's batches as the others: a block ends when its last batch does.
    batches = lanes * math.ceil(settings.embed_block_batches / lanes)
    count = max(actors, math.ceil(len(todo) / (settings.embed_batch_size * batches)))
    size = max(1, math.ceil(len(todo) / count))
    # Blocks cut here rather than by `repartition`, whose task would need a whole free CPU.
    blocks = [todo.iloc[i : i + size] for i in range(0, len(todo), size)]
    return EncoderPlan(actors, actor_cpus, lanes, blocks)


@dataclass
class EmbedRun:
    """An embedding run: what was encoded, how, and how fast (its JSON is the run's manifest, the commit)."""

    encoder_set_id: str
    text_encoder: str
    image_encoder: str
    products: int  # current products considered
    cached: int  # of which already embedded
    encoded: int  # of which encoded by this run
    run_id: str | None = None  # None: nothing to encode, nothing written
    text_dim: int = 0
    image_dim: int = 0
    actors: int = 0
    lanes: int = 0  # encoder batches an actor runs at once
    threads_per_actor: int = 0  # lanes × intra-op threads per lane
    batch_size: int = 0
    blocks: int = 0  # files the encoders wrote, one per block
    files: int = 0  # files after compaction
    compact_seconds: float = 0.0
    # Summed over blocks: image fetch, text and image encoders (lane seconds), Parquet write, whole block
    # (blocks overlap in an actor), actor CPU (each second once).
    worker_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    items_per_s: float = 0.0
    committed_at: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def worker_seconds(blocks: list[dict]) -> dict[str, float]:
    """Where the encoder actors' time went, summed over the blocks they returned."""
    steps = [column.removesuffix("_s") for column in (blocks[0] if blocks else {}) if column.endswith("_s")]
    return {step: round(sum(block[f"{step}_s"] for block in blocks), 3) for step in steps}


def new_run_id() -> str:
    """Sortable and unique: UTC time plus a random suffix."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def compact_run(settings: Settings, set_id: str, run_id: str) -> list[int]:
    """Rewrite a run's block files as files of ``settings.embed_file_rows`` rows; returns rows per file.

    At full size the encoders write 1,327 blocks of 64 products, and a reader pays S3 round trips per
    file more than decoding. The rows are streamed (memory: a few row groups), in the blocks' sorted order.
    """
    fs = arrow_fs(settings)
    blocks = parquet_paths(fs, f"{settings.bucket_lake}/{embedding_run_blocks_prefix(set_id, run_id)}")
    if not blocks:
        return []
    rows_per_file: list[int] = []
    ds.write_dataset(
        ds.dataset(blocks, format="parquet", filesystem=fs),
        f"{settings.bucket_lake}/{embedding_run_prefix(set_id, run_id)}".rstrip("/"),
        basename_template=COMPACTED_FILE_TEMPLATE,
        format="parquet",
        filesystem=fs,
        file_options=ds.ParquetFileFormat().make_write_options(compression="zstd"),
        max_rows_per_file=settings.embed_file_rows,
        min_rows_per_group=settings.embed_row_group_rows,
        max_rows_per_group=settings.embed_row_group_rows,
        preserve_order=True,
        existing_data_behavior="overwrite_or_ignore",  # a retried compaction overwrites its own files
        create_dir=False,  # S3 has no directories: no empty marker object
        file_visitor=lambda written: rows_per_file.append(written.metadata.num_rows),
    )
    return rows_per_file


def commit_run(client, settings: Settings, run: EmbedRun, rows_written: int) -> EmbedRun:
    """Write the run's manifest (readers only see runs that have one) once every product was written.

    The per-block files, now compacted, are deleted after the commit: a crash before that leaves them
    below ``blocks/``, where no reader looks.
    """
    if rows_written != run.encoded:
        raise RuntimeError(
            f"the encoders wrote {rows_written} rows for {run.encoded} products in run {run.run_id}"
        )
    run.committed_at = datetime.now(UTC).isoformat()
    put_json(
        client,
        settings.bucket_lake,
        embedding_run_manifest_key(run.encoder_set_id, run.run_id),
        run.to_dict(),
    )
    delete_prefix(client, settings.bucket_lake, embedding_run_blocks_prefix(run.encoder_set_id, run.run_id))
    return run


class ImageFetcher:
    """The image bytes of a batch of embedding inputs: ranged reads of the batch's ZIP, else one GET each.

    Members next to each other in a ZIP come with one ranged read (a batch of 32 is one read instead of
    32 GETs). An image without a location, in a ZIP that is gone, or whose CRC fails is read from its
    content-addressed object. Reads go through pyarrow's C++ S3 client (a third of boto3's CPU per GET).
    """

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.bucket_lake
        self.max_gap = settings.embed_zip_max_gap_bytes
        self._fs = arrow_fs(settings)
        self._pool = ThreadPoolExecutor(settings.upload_threads)
        self._archives: dict[str, object] = {}

    def _archive(self, uri: str):
        if uri not in self._archives:
            bucket, key = split_uri(uri)
            self._archives[uri] = self._fs.open_input_file(f"{bucket}/{key}")
        return self._archives[uri]

    def _from_archive(self, uri: str, locations: pd.DataFrame) -> list[bytes | None]:
        try:
            return read_members(self._archive(uri), locations)
        except OSError:  # the ZIP was deleted or cannot be read: fall back to the objects
            return [None] * len(locations)

    def _fetch_zipped(self, batch: pd.DataFrame, out: list[bytes | None]) -> None:
        located = batch[batch[IMAGE_ZIP].notna()].sort_values("image_zip_offset", kind="stable")
        for uri, group in located.groupby(IMAGE_ZIP, sort=False):
            locations = group[IMAGE_ZIP_COLUMNS].set_axis(LOCATION_COLUMNS, axis=1)
            offsets = locations["offset"].to_numpy()
            ends = offsets + locations["compress_size"].to_numpy()
            for run in member_runs(offsets, ends, self.max_gap):
                blobs = self._from_archive(str(uri), locations.iloc[run])
                for position, data in zip(group.index[run], blobs, strict=True):
                    out[position] = data

    def fetch(self, batch: pd.DataFrame) -> list[bytes | None]:
        """Bytes of each row's image (None where ``has_image`` is false)."""
        batch = batch.reset_index(drop=True)
        out: list[bytes | None] = [None] * len(batch)
        if IMAGE_ZIP in batch:
            self._fetch_zipped(batch, out)
        keys = batch["image_key"].tolist()
        by_key = [i for i, has in enumerate(batch["has_image"].tolist()) if has and out[i] is None]
        blobs = self._pool.map(lambda i: read_object(self._fs, self.bucket, keys[i]), by_key)
        for position, data in zip(by_key, blobs, strict=True):
            out[position] = data
        return out


def block_file_name(embed_hashes: list[str]) -> str:
    """A block's Parquet file name, derived from its rows: a retried block overwrites its own file."""
    digest = hashlib.sha256("\n".join(embed_hashes).encode()).hexdigest()[:BLOCK_NAME_HEX_CHARS]
    return f"part-{digest}.parquet"


class EncoderWorker:
    """Encodes blocks of embedding inputs and writes each block as one Parquet file (a Ray Data actor).

    A block is encoded in batches of ``settings.embed_batch_size``. Missing modalities get a zero vector
    and a false flag, so every row has both columns. Each row records the Ray node that encoded it
    (``node_id``), which shows how the work spread over the cluster. The worker fetches its own images
    (with ranged ZIP reads a batch's fetch is about 1 % of its encoding) and writes its own output: a
    separate fetch or write stage would cost a process start and CPU that 2 cores do not have spare.
    A block's batches run on ``lanes`` threads at once (see :func:`encoder_lanes`); the encoders release
    the GIL while they compute and are safe to call from several threads. Ray Data may call it for
    several blocks at once (``settings.embed_calls_per_actor``): their batches share the lanes, so a lane
    that finished its share of a block takes the next block's instead of waiting for the block's last
    batch and its write.
    """

    def __init__(self, settings: Settings, output_prefix: str, lanes: int = 1) -> None:
        self._lanes = ThreadPoolExecutor(lanes, thread_name_prefix="lane")
        self.text_encoder = build_text_encoder(settings)
        self.image_encoder = build_image_encoder(settings)
        self.fetcher = ImageFetcher(settings)
        self.node_id = _ray_node_id()
        self.batch_size = settings.embed_batch_size
        self.bucket, self.output_prefix = settings.bucket_lake, output_prefix
        self._client = s3_client(settings)
        self._cpu_lock = threading.Lock()
        self._cpu_counted = time.process_time()  # the process's CPU already reported (or spent starting)

    def __call__(self, block: pd.DataFrame) -> dict[str, list]:
        """Encode and write one block; returns its file, row count and where its time went."""
        started = time.perf_counter()
        block = block.reset_index(drop=True)
        batches = [block.iloc[i : i + self.batch_size] for i in range(0, len(block), self.batch_size)]
        encoded = list(self._lanes.map(self.encode, batches))
        table = pa.concat_tables([rows for rows, _ in encoded])  # rows in block order
        key = f"{self.output_prefix}{block_file_name(block['embed_hash'].tolist())}"
        written = time.perf_counter()
        put_table(self._client, self.bucket, key, table)
        seconds = {step: sum(timing[step] for _, timing in encoded) for step in ("fetch", "text", "image")}
        seconds["write"] = time.perf_counter() - written
        seconds["block"] = time.perf_counter() - started
        seconds["cpu"] = self._cpu_since_last_report()
        return {"file": [key], "rows": [table.num_rows], **{f"{k}_s": [v] for k, v in seconds.items()}}

    def _cpu_since_last_report(self) -> float:
        """The process's CPU seconds (every thread) not yet reported by a block: blocks that overlap must
        not count the same seconds twice, so their sum is the actor's CPU since it was constructed (the
        encoders' lazy weight loading included)."""
        with self._cpu_lock:
            now = time.process_time()
            spent, self._cpu_counted = now - self._cpu_counted, now
        return spent

    def encode(self, batch: pd.DataFrame) -> tuple[pa.Table, dict[str, float]]:
        """Embedding rows of one encoder batch, and the seconds its fetch and each encoder took."""
        n = len(batch)
        has_text = batch["has_text"].to_numpy(bool)
        has_image = batch["has_image"].to_numpy(bool)
        text_dim, image_dim = self.text_encoder.id.dim, self.image_encoder.id.dim
        text_emb = np.zeros((n, text_dim), np.float32)  # (n, text_dim)
        image_emb = np.zeros((n, image_dim), np.float32)  # (n, image_dim)
        started = time.perf_counter()
        if has_text.any():
            text_emb[has_text] = self.text_encoder.encode(batch["text"][has_text].tolist())
        text_done = time.perf_counter()
        images = self.fetcher.fetch(batch[has_image]) if has_image.any() else []
        fetched = time.perf_counter()
        if images:
            image_emb[has_image] = self.image_encoder.encode(images)
        timing = {
            "text": text_done - started,
            "fetch": fetched - text_done,
            "image": time.perf_counter() - fetched,
        }
        rows = pa.table(
            {
                "productid": pa.array(batch["productid"], pa.int64()),
                "batch_id": pa.array(batch["batch_id"], pa.string()),
                "prdtypecode": pa.array(batch["prdtypecode"], pa.int64()),
                "embed_hash": pa.array(batch["embed_hash"], pa.string()),
                "has_text": pa.array(has_text),
                "has_image": pa.array(has_image),
                "text_emb": pa.FixedSizeListArray.from_arrays(text_emb.ravel(), text_dim),
                "image_emb": pa.FixedSizeListArray.from_arrays(image_emb.ravel(), image_dim),
                "text_encoder": pa.array([self.text_encoder.id.key] * n, pa.string()),
                "image_encoder": pa.array([self.image_encoder.id.key] * n, pa.string()),
                "node_id": pa.array([self.node_id] * n, pa.string()),
            }
        )
        return rows, timing
