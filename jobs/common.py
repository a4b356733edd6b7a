"""Small Ray helpers shared by the job entry points."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import pandas as pd
import ray

from lib.errors import UserError
from lib.ops.preflight import require, use_stack_ray
from lib.settings import Settings, get_settings


def connect_ray(settings: Settings) -> None:
    """Join the running cluster: the job's own (under ``ray job submit``) or the configured head; a
    clear error at once when it is not running."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or settings.ray_address
        if "://" not in address and address != "auto":
            require(settings, "ray", ray_address=address)
        use_stack_ray(settings)
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)


def cluster_cpus() -> tuple[float, float, int]:
    """The connected cluster's CPUs, those free now and its alive nodes (what encoder pools are sized by)."""
    return (
        ray.cluster_resources().get("CPU", 1),
        ray.available_resources().get("CPU", 0),
        sum(node["Alive"] for node in ray.nodes()),
    )


def own_submission_id() -> str | None:
    """The submission id of the Ray job whose driver this process is (None when run by hand)."""
    # Ray's job supervisor hands the driver its job's config, metadata included, in this variable.
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return config.get("metadata", {}).get("job_submission_id")


def run_cli(name: str, main: Callable[[], int]) -> int:
    """Run an entry point's body; a :class:`lib.errors.UserError` is one line on stderr and status 2."""
    try:
        return main()
    except UserError as err:
        print(f"{name} failed: {err}", file=sys.stderr)
        return 2


def ray_data_mapper(
    fn: Callable[[pd.DataFrame], pd.DataFrame], frame: pd.DataFrame, partition_size: int
) -> pd.DataFrame:
    """Run ``fn`` over partitions of ``frame`` as Ray Data tasks (progress bars included).

    Fractional CPUs per task: the work is mostly S3 round-trips, and Serve or a Tune run may hold CPUs.
    Partitions are cut here (a `repartition` task would need a whole free CPU).
    """
    chunks = [frame.iloc[i : i + partition_size] for i in range(0, len(frame), partition_size)] or [frame]
    dataset = ray.data.from_pandas(chunks)
    cpus = get_settings().data_task_cpus
    return dataset.map_batches(fn, batch_format="pandas", batch_size=None, num_cpus=cpus).to_pandas()
