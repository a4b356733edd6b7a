"""Shared fixtures: one real local stack (SeaweedFS + MLflow + Ray) per test session.

The test stack runs on its own ports and state directory so it never touches a developer's stack.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Ports of the test stack (the developer stack uses the defaults from lib.settings). Two test sessions
# can run side by side with RAKUTEN_TEST_PORT_OFFSET (e.g. 100) in one of them.
_OFFSET = int(os.environ.get("RAKUTEN_TEST_PORT_OFFSET", "0"))
TEST_PORTS = {
    "RAKUTEN_S3_PORT": "29000",
    "RAKUTEN_MLFLOW_PORT": "25000",
    "RAKUTEN_RAY_GCS_PORT": "26379",
    "RAKUTEN_RAY_DASHBOARD_PORT": "28265",
    "RAKUTEN_SERVE_PORT": "28000",
    "RAKUTEN_DASH_PORT": "28050",
}
TEST_ENV = {
    **{name: str(int(port) + _OFFSET) for name, port in TEST_PORTS.items()},
    "RAKUTEN_RAY_NUM_CPUS": "2",
    "RAKUTEN_TUNE_TRIALS": "3",
    "RAKUTEN_TUNE_MAX_EPOCHS": "3",
}


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory):
    """Settings of the test stack (environment variables, as a user would set them)."""
    from lib.settings import Settings, get_settings

    state_dir = os.environ.get("RAKUTEN_TEST_STATE_DIR") or str(tmp_path_factory.mktemp("stack"))
    env = {**TEST_ENV, "RAKUTEN_STATE_DIR": state_dir}
    os.environ.update(env)
    get_settings.cache_clear()
    return Settings()


@pytest.fixture(scope="session")
def stack(settings) -> Iterator:
    """The real local stack, started once for the session and stopped at the end."""
    from lib.ops import stack as stack_mod

    # The dashboard is started by its own browser tests.
    stack_mod.up(settings, list(stack_mod.CORE_SERVICES))
    try:
        yield settings
    finally:
        stack_mod.down(settings)


@pytest.fixture(scope="session")
def s3(stack):
    """A boto3 client on the test stack's S3 server."""
    from lib.data.storage import s3_client

    return s3_client(stack)


@pytest.fixture(scope="session")
def ray_cluster(stack) -> Iterator:
    """This test process connected as a driver to the test stack's Ray head."""
    import ray

    from lib.ops.preflight import use_stack_ray

    use_stack_ray(stack)  # the stack's Ray asks every client for its token
    ray.init(address=stack.ray_address, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def lake_reset(s3, stack):
    """Empty lake and incoming buckets around a test (the buckets themselves stay)."""
    from lib.data.storage import delete_prefix

    for bucket in (stack.bucket_lake, stack.bucket_incoming):
        delete_prefix(s3, bucket, "")
    yield
    for bucket in (stack.bucket_lake, stack.bucket_incoming):
        delete_prefix(s3, bucket, "")


def build_production_model(settings, products: int = 300, seed: int = 5) -> dict:
    """The real pipeline on a small generated sample: ingest → embed (real encoders) → train → promote.

    Leaves a fresh lake and registry holding exactly that batch and one production model version.
    """
    import io

    from jobs import embed as embed_job
    from jobs import ingest as ingest_job
    from jobs import train as train_job
    from lib.data.sample import SampleSpec, write_sample_zip
    from lib.data.storage import put_bytes, s3_client
    from lib.ops.stack import reset_lake_and_registry

    reset_lake_and_registry(settings)
    client = s3_client(settings)
    buf = io.BytesIO()
    catalogue = write_sample_zip(SampleSpec(products=products, seed=seed, image_size=96), buf)
    put_bytes(client, settings.bucket_incoming, "model-sample.zip", buf.getvalue())
    manifest = ingest_job.run(f"s3://{settings.bucket_incoming}/model-sample.zip", settings).manifest
    embedded = embed_job.run(settings)
    # One trial = the default configuration, whose lexical branch is on: serving and monitoring tests
    # run the TF-IDF path end to end.
    trained = train_job.run(settings, trials=1, max_epochs=8)
    return {"catalogue": catalogue, "manifest": manifest, "embed": embedded, "train": trained}


@pytest.fixture(scope="module")
def production_model(ray_cluster, stack) -> dict:
    """A production model trained by the real pipeline on a small sample (rebuilt per test module,
    since other modules reset the lake and registry)."""
    return build_production_model(stack)
