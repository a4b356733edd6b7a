"""Hyper-parameter search of the head: Ray Tune, OptunaSearch (TPE) and ASHA; every trial in MLflow.

Two kinds of head (``settings.head_kind``). An **mlp** trial is ``lib.model.train.train_model`` with
sampled values and reports each epoch's validation scores. An **experts** trial samples the experts'
regularisation and reports, fold by fold, the F1-macro of the out-of-fold predictions of train +
validation (``lib.model.experts.out_of_fold``): ASHA stops a weak configuration after its first folds
as it stops a weak MLP after its first epochs. Each trial has its own MLflow run under the stage's.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from lib.model.artifact import EXPERTS_KIND, MLP_KIND
from lib.model.dataset import Dataset
from lib.model.experts import ExpertConfig, FusionWeights, choose_weights, out_of_fold
from lib.model.metrics import summary
from lib.model.split import TEST, stratified_subsample
from lib.settings import Settings

# F1-macro on rows the trial did not fit: the validation split (mlp) or out-of-fold train + val (experts).
TARGET = "val_f1_macro"
# Width of the TF-IDF projection into the MLP (0: none). Wider ones cost much more time and, on the real
# sample, scored no better (README, "Model quality").
LEXICAL_PROJECTIONS = [0, 32, 64, 128]
# The first trial: a sensible default, so even a short search starts from a working configuration.
DEFAULT_TRIAL = {"lr": 2e-3, "dropout": 0.3, "weight_decay": 1e-2, "batch_size": 64, "hidden1": 512,
                 "hidden2": 256, "hidden3": 128, "activation": "gelu", "lexical_proj": 64,
                 "lexical_wide": True}  # fmt: skip
# Ray Tune reuses a trial's process for the next trial only if the stopped trial's thread ends within
# TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s by default), read in that process. ASHA stops a trial between two
# reports, while the fold (or epoch) under way runs on for longer at scale: the next trial on the process
# then failed ("Trainable runner reuse requires reset_config()": 2 of 10 at both sizes of bench_scale).
STOPPED_TRIAL_WAIT_S = 600


@dataclass
class TuneResult:
    """What a search found: the best trial's configuration and how the search went."""

    config: dict
    val_f1_macro: float  # the best trial's best validation F1-macro over its epochs
    trials: int
    configs: list[dict]  # every trial's configuration, in trial order
    stopped_early: int  # trials that ASHA stopped before max_epochs


def search_space(lexical: bool) -> dict:
    """Ray Tune search space of the fusion head (with the lexical branch's width if the data has it)."""
    space = {
        "lr": tune.loguniform(1e-5, 1e-2),
        "dropout": tune.uniform(0.1, 0.6),
        "weight_decay": tune.loguniform(1e-4, 1e-1),
        "batch_size": tune.choice([64, 128, 256]),
        "hidden1": tune.choice([256, 512, 1024]),
        "hidden2": tune.choice([128, 256, 512]),
        "hidden3": tune.choice([64, 128, 256]),
        "activation": tune.choice(["relu", "gelu", "silu"]),
    }
    if not lexical:
        return space
    # Both off = the dense fusion head: the search decides whether the lexical branch pays.
    return space | {
        "lexical_proj": tune.choice(LEXICAL_PROJECTIONS),
        "lexical_wide": tune.choice([True, False]),
    }


def expert_space() -> dict:
    """Ray Tune search space of the experts: each one's inverse regularisation strength."""
    return {
        "lexical_c": tune.loguniform(0.1, 10.0),
        "text_c": tune.loguniform(0.3, 30.0),
        "image_c": tune.loguniform(0.3, 30.0),
    }


def default_trial(space: dict) -> dict:
    """The default configuration (DEFAULT_TRIAL, or the experts' defaults) restricted to ``space``."""
    defaults = DEFAULT_TRIAL | asdict(ExpertConfig())
    return {k: v for k, v in defaults.items() if k in space}


def allow_process_reuse() -> None:
    """Let Ray Tune wait for a stopped trial's step to end before it reuses the process (see
    STOPPED_TRIAL_WAIT_S); called in the trial's own process."""
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(STOPPED_TRIAL_WAIT_S))


def _trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, config: dict) -> str:
    """The trial's MLflow run, nested under the stage's, with the sampled values as params."""
    allow_process_reuse()
    trial_id = tune.get_context().get_trial_id()
    run = client.create_run(
        experiment_id,
        run_name=f"trial-{trial_id}",
        tags={"mlflow.parentRunId": parent_run_id, "tune_trial_id": trial_id},
    )
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in config.items()])
    return run.info.run_id


def _report(client: MlflowClient, run_id: str, metrics: dict, step: int) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()])
    tune.report(metrics)


def expert_trial_fn(
    config: dict, data: Dataset, parent_run_id: str, experiment_id: str, settings: Settings
) -> None:
    """One experts trial: k-fold over ``data`` (``tuning_sample``: no test rows), reporting the out-of-fold
    F1-macro after each fold."""
    client = MlflowClient(settings.mlflow_uri)
    run_id = _trial_run(client, experiment_id, parent_run_id, config)
    x, y = data.inputs(), data.y

    def report(fold: int, parts: dict, done: np.ndarray) -> None:
        seen = {name: scores[done] for name, scores in parts.items()}
        # The last fold chooses the fusion weights, as the final fit will; before, the default weights.
        weights = choose_weights(seen, y[done]) if done.all() else FusionWeights()
        f1 = summary(y[done], weights.fuse(seen).argmax(1))["f1_macro"]
        _report(client, run_id, {TARGET: f1}, fold)

    out_of_fold(  # the fold models are not kept: the final fit redoes the best configuration's folds
        x, y, len(data.codes), ExpertConfig(**config), settings.expert_folds, settings.tune_seed, report
    )
    client.set_terminated(run_id)


def trial_fn(config: dict, data: Dataset, parent_run_id: str, experiment_id: str, settings: Settings) -> None:
    """One MLP trial: train with the sampled values, report every epoch to Tune and MLflow."""
    import torch  # lazy: ~0.7 GB resident per trial process; an experts trial never needs it

    from lib.model.train import TrainConfig, configs_from_trial, train_model

    torch.set_num_threads(1)  # trials run side by side; one thread each avoids oversubscription
    client = MlflowClient(settings.mlflow_uri)
    run_id = _trial_run(client, experiment_id, parent_run_id, config)
    base = TrainConfig(
        max_epochs=settings.tune_max_epochs, patience=settings.early_stop_patience, seed=settings.tune_seed
    )
    model_config, train_config = configs_from_trial(
        config, data.text.shape[1], data.image.shape[1], len(data.codes), base, lexical_dim=data.lexical_dim
    )

    def report(m: dict) -> None:
        _report(client, run_id, {k: v for k, v in m.items() if k != "epoch"}, int(m["epoch"]))

    result = train_model(data, model_config, train_config, on_epoch=report)
    client.log_metric(run_id, "best_val_f1_macro", result.best_val["val_f1_macro"])
    client.set_terminated(run_id)


def tuning_sample(data: Dataset, max_rows: int, seed: int) -> Dataset:
    """The train + val rows trials search on: a stratified sample of at most ``max_rows`` (each keeps its
    split). Only these rows go to the object store, so a trial's memory and time stop growing with the
    catalogue; the final fit uses every row."""
    rows = np.flatnonzero(data.split != TEST)
    return data.take(rows[stratified_subsample(data.y[rows], max_rows, seed)])


def make_scheduler(name: str, max_epochs: int, settings: Settings) -> TrialScheduler:
    """``asha``: stop weak trials early (grace and reduction factor from settings); ``fifo``: never stop."""
    if name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        max_t=max_epochs,
        grace_period=min(settings.tune_grace_epochs, max_epochs),
        reduction_factor=settings.tune_reduction_factor,
    )


def tune_head(
    settings: Settings,
    data: Dataset,
    parent_run_id: str,
    experiment_id: str,
    trials: int,
    max_epochs: int,
    scheduler: str = "asha",
    replay: list[dict] | None = None,
    kind: str = MLP_KIND,
) -> TuneResult:
    """Run the search; the best trial as ``best_trial`` picks it.

    ``replay``: run exactly these configurations, in order, instead of searching (``trials`` is then
    their number). The benchmark's FIFO baseline replays ASHA's trials so that the two schedulers train
    the same configurations: TPE fed with truncated results would otherwise sample different ones.
    ``kind``: the head (``mlp`` or ``experts``); an experts trial's "epochs" are its folds.
    """
    experts = kind == EXPERTS_KIND
    space = expert_space() if experts else search_space(lexical=data.lexical_dim > 0)
    max_epochs = settings.expert_folds if experts else max_epochs
    points = replay if replay is not None else [default_trial(space)]
    search = OptunaSearch(
        sampler=optuna.samplers.TPESampler(seed=settings.tune_seed), points_to_evaluate=points
    )
    trial_settings = settings.model_copy(update={"tune_max_epochs": max_epochs})
    trainable = tune.with_resources(
        tune.with_parameters(
            expert_trial_fn if experts else trial_fn,
            data=tuning_sample(data, settings.tune_max_rows, settings.tune_seed),
            parent_run_id=parent_run_id,
            experiment_id=experiment_id,
            settings=trial_settings,
        ),
        {"cpu": settings.tune_trial_cpus},
    )
    tune_config = tune.TuneConfig(
        metric=TARGET,
        mode="max",
        search_alg=search,
        scheduler=make_scheduler(scheduler, max_epochs, settings),
        num_samples=len(replay) if replay is not None else trials,
        # A trial's process starts once and serves the next trials: no interpreter + torch import per
        # trial, which costs a short (ASHA-stopped) trial about as much as its training.
        reuse_actors=True,
    )
    run_config = tune.RunConfig(
        name=f"fusion-{parent_run_id[:8]}", storage_path=str(settings.state_dir / "tune"), verbose=1
    )
    results = tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config).fit()
    best, score = best_trial(results, experts, max_epochs)
    return TuneResult(
        config=best.config,
        val_f1_macro=score,
        trials=len(results),
        configs=[r.config for r in results],
        stopped_early=sum(len(r.metrics_dataframe) < max_epochs for r in results),
    )


def best_trial(results, experts: bool, rounds: int) -> tuple:
    """The winning trial and its score. MLP: the best epoch of any trial (early stopping keeps that
    epoch's weights). Experts: the best out-of-fold F1 among trials that ran all ``rounds`` folds: the
    score of a trial ASHA stopped early is measured on a fraction of the products and would win by noise."""
    if not experts:
        best = results.get_best_result(metric=TARGET, mode="max", scope="all")
        return best, float(best.metrics_dataframe[TARGET].max())
    complete = [r for r in results if r.metrics_dataframe is not None and len(r.metrics_dataframe) >= rounds]
    best = max(complete, key=lambda r: r.metrics[TARGET])
    return best, float(best.metrics[TARGET])


def close_stopped_trials(client: MlflowClient, experiment_id: str, parent_run_id: str) -> None:
    """Trials that ASHA stopped never reach set_terminated: mark them so the UI does not show them running."""
    runs = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"
    )
    for run in runs:
        client.set_tag(run.info.run_id, "stopped_by", "asha")
        client.set_terminated(run.info.run_id, "KILLED")
