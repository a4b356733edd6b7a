"""Small Ray helpers shared by the job entry points."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pandas as pd

from lib.settings import Settings


def connect_ray(settings: Settings) -> None:
    """Join the running cluster: the job's own (under ``ray job submit``) or the configured head."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or settings.ray_address
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)


def ray_data_mapper(
    fn: Callable[[pd.DataFrame], pd.DataFrame], frame: pd.DataFrame, partition_size: int
) -> pd.DataFrame:
    """Run ``fn`` over partitions of ``frame`` as Ray Data tasks (progress bars included).

    Half a CPU per task: the work is mostly S3 round-trips, and it leaves room for other stages.
    """
    import ray

    partitions = max(1, math.ceil(len(frame) / partition_size))
    dataset = ray.data.from_pandas(frame).repartition(partitions)
    return dataset.map_batches(fn, batch_format="pandas", batch_size=None, num_cpus=0.5).to_pandas()
