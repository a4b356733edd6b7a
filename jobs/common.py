"""Small Ray helpers shared by the job entry points."""

from __future__ import annotations

import os
from collections.abc import Callable

import pandas as pd
import ray

from lib.settings import Settings, get_settings


def connect_ray(settings: Settings) -> None:
    """Join the running cluster: the job's own (under ``ray job submit``) or the configured head."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or settings.ray_address
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)


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
