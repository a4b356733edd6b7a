"""Tune the fusion head (Ray Tune: OptunaSearch TPE + ASHA), log to MLflow, register, promote if better.

``python -m jobs.train [--trials N] [--max-epochs E] [--force]``
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from jobs.common import connect_ray
from lib import lake, metrics, registry
from lib.embed import PRODUCT_COLUMNS, embedding_inputs, read_embeddings
from lib.encoders import encoder_ids, encoder_set_id
from lib.lexical import LexicalSpec
from lib.provenance import git_sha
from lib.rakuten import class_name
from lib.settings import Settings, get_settings
from lib.split import TEST, TRAIN, VAL
from lib.storage import s3_client
from lib.train import (
    Dataset,
    TrainConfig,
    build_dataset,
    configs_from_trial,
    fit_temperature,
    load_trained,
    predict_logits,
    softmax,
    with_lexical,
)
from lib.train import train_model as fit

TARGET = "val_f1_macro"


# Width of the TF-IDF projection into the MLP (0: none). Wider ones cost much more time and, on the real
# sample, scored no better (README, "Model quality").
LEXICAL_PROJECTIONS = [0, 32, 64, 128]


def search_space(lexical: bool) -> dict:
    """Ray Tune search space of the fusion head (with the lexical branch's width if the data has it)."""
    from ray import tune

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


# The first trial: a sensible default, so even a short search starts from a working configuration.
DEFAULT_TRIAL = {"lr": 2e-3, "dropout": 0.3, "weight_decay": 1e-2, "batch_size": 64, "hidden1": 512,
                 "hidden2": 256, "hidden3": 128, "activation": "gelu", "lexical_proj": 64,
                 "lexical_wide": True}  # fmt: skip


def default_trial(space: dict) -> dict:
    """DEFAULT_TRIAL restricted to the keys of ``space``."""
    return {k: v for k, v in DEFAULT_TRIAL.items() if k in space}


def ablation_variants(config: dict, lexical: bool) -> dict[str, tuple[str, dict]]:
    """Ablation rows → (modality, trial config): the best configuration with inputs taken away.

    "fusion" is the dense fusion (text + image embeddings); with lexical data, "fusion_lexical" and
    "lexical" use the best configuration's lexical branch, or the default one if the search turned the
    branch off (the row then shows what the branch would have given).
    """
    # Keys are lib.metrics.ABLATION_ROWS. The variant that is ``config`` itself is ``config`` (the same
    # object), so the caller can reuse its model; text and image heads ignore the lexical keys.
    if not lexical:
        return {"text": ("text", config), "image": ("image", config), "fusion": ("fusion", config)}
    lexical_keys = ("lexical_proj", "lexical_wide")
    branch_on = bool(config.get("lexical_proj")) or bool(config.get("lexical_wide"))
    dense = {**config, "lexical_proj": 0, "lexical_wide": False} if branch_on else config
    with_lexical = config if branch_on else {**config, **{k: DEFAULT_TRIAL[k] for k in lexical_keys}}
    return {
        "text": ("text", config), "image": ("image", config), "fusion": ("fusion", dense),
        "fusion_lexical": ("fusion", with_lexical), "lexical": ("lexical", with_lexical),
    }  # fmt: skip


def load_dataset(settings: Settings, client) -> tuple[Dataset, dict]:
    """Current labelled products joined with their embeddings (labels from the product view).

    With ``settings.lexical_enabled``, the TF-IDF block is fitted on the training split and added.
    """
    text_id, image_id = encoder_ids(settings)
    set_id = encoder_set_id(text_id, image_id)
    manifests = lake.committed_manifests(client, settings)
    products = lake.current_products(client, settings, PRODUCT_COLUMNS, manifests)
    inputs = embedding_inputs(products, settings, set_id)[["productid", "embed_hash", "text"]]
    inputs["prdtypecode"] = products["prdtypecode"].to_numpy()
    vectors = read_embeddings(client, settings, set_id, ["embed_hash", "text_emb", "image_emb"])
    joined = inputs.merge(vectors, on="embed_hash", how="inner")
    data = build_dataset(
        joined, text_id.dim, image_id.dim, settings.split_seed, settings.val_fraction, settings.test_fraction
    )
    if settings.lexical_enabled and len(data.y):
        data = with_lexical(data, LexicalSpec.from_settings(settings))
    counts = pd.Series(data.y).value_counts()
    lineage = {
        "encoder_set_id": set_id,
        "text_encoder": text_id.key,
        "image_encoder": image_id.key,
        "text_dim": text_id.dim,
        "image_dim": image_id.dim,
        "batch_ids": [m["batch_id"] for m in manifests],
        "products": len(data.y),
        "products_without_embedding": int(products["prdtypecode"].notna().sum()) - len(data.y),
        "class_counts": {str(data.codes[i]): int(n) for i, n in counts.sort_index().items()},
        "imbalance_ratio": float(counts.max() / counts.min()) if len(counts) else 0.0,
        "split_counts": data.counts(),
        "data_fingerprint": data.fingerprint,
        "lexical_dim": data.lexical_dim,
    }
    return data, lineage


def trial_fn(config: dict, data: Dataset, parent_run_id: str, experiment_id: str, settings: Settings) -> None:
    """One Tune trial: train with the sampled values, report every epoch to Tune and MLflow."""
    import torch
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from ray import tune

    torch.set_num_threads(1)  # trials run side by side; one thread each avoids oversubscription
    client = MlflowClient(settings.mlflow_uri)
    context = tune.get_context()
    run = client.create_run(
        experiment_id,
        run_name=f"trial-{context.get_trial_id()}",
        tags={"mlflow.parentRunId": parent_run_id, "tune_trial_id": context.get_trial_id()},
    )
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in config.items()])
    model_config, train_config = configs_from_trial(
        config,
        data.text.shape[1],
        data.image.shape[1],
        len(data.codes),
        TrainConfig(
            max_epochs=settings.tune_max_epochs,
            patience=settings.early_stop_patience,
            seed=settings.tune_seed,
        ),
        lexical_dim=data.lexical_dim,
    )

    def report(m: dict) -> None:
        now = int(time.time() * 1000)
        step = int(m["epoch"])
        client.log_batch(
            run.info.run_id, [Metric(k, float(v), now, step) for k, v in m.items() if k != "epoch"]
        )
        tune.report(m)

    result = fit(data, model_config, train_config, on_epoch=report)
    client.log_metric(run.info.run_id, "best_val_f1_macro", result.best_val["val_f1_macro"])
    client.set_terminated(run.info.run_id)


def tune_head(
    settings: Settings,
    data: Dataset,
    parent_run_id: str,
    experiment_id: str,
    trials: int,
    max_epochs: int,
    scheduler: str = "asha",
    replay: list[dict] | None = None,
) -> dict:
    """Run the search; returns the best trial's config (by its best val F1-macro over epochs).

    ``replay``: run exactly these configurations, in order, instead of searching (``trials`` is then
    their number). The benchmark's FIFO baseline replays ASHA's trials so that the two schedulers train
    the same 20 configurations: TPE fed with truncated results would otherwise sample different ones.
    """
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    space = search_space(lexical=data.lexical_dim > 0)
    points = replay if replay is not None else [default_trial(space)]
    trials = len(replay) if replay is not None else trials
    search = OptunaSearch(
        sampler=optuna.samplers.TPESampler(seed=settings.tune_seed), points_to_evaluate=points
    )
    chosen = (
        ASHAScheduler(
            max_t=max_epochs,
            grace_period=min(settings.tune_grace_epochs, max_epochs),
            reduction_factor=settings.tune_reduction_factor,
        )
        if scheduler == "asha"
        else FIFOScheduler()
    )
    settings = settings.model_copy(update={"tune_max_epochs": max_epochs})
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_fn,
            # Trials read the TF-IDF rows, not the fitted vectorizers (vocabularies): leave those out.
            data=replace(data, lexical_features=None),
            parent_run_id=parent_run_id,
            experiment_id=experiment_id,
            settings=settings,
        ),
        {"cpu": 1},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=TARGET,
            mode="max",
            search_alg=search,
            scheduler=chosen,
            num_samples=trials,
            # A trial's process starts once and serves the next trials: no interpreter + torch import
            # per trial, which costs a short (ASHA-stopped) trial about as much as its training.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"fusion-{parent_run_id[:8]}", storage_path=str(settings.state_dir / "tune"), verbose=1
        ),
    )
    results = tuner.fit()
    best = results.get_best_result(metric=TARGET, mode="max", scope="all")
    return {
        "config": best.config,
        "val_f1_macro": float(best.metrics_dataframe[TARGET].max()),
        "trials": len(results),
        "configs": [r.config for r in results],  # every trial's configuration, in trial order
        "stopped_early": sum(len(r.metrics_dataframe) < max_epochs for r in results),
    }


def test_report(data: Dataset, model) -> tuple[dict, np.ndarray]:
    """Test metrics of a trained head, with its calibration; returns (metrics, predicted label indices).

    Metrics: F1-macro, weighted F1, accuracy, and the expected calibration error on test before and
    after temperature scaling (the temperature is fitted on the validation split).
    """
    val_text, val_image, y_val = data.part(VAL)
    text, image, y_test = data.part(TEST)
    temperature = fit_temperature(predict_logits(model, val_text, val_image, data.lexical_part(VAL)), y_val)
    logits = predict_logits(model, text, image, data.lexical_part(TEST))
    report = metrics.summary(y_test, logits.argmax(1)) | {
        "temperature": temperature,
        "ece_before": metrics.expected_calibration_error(softmax(logits), y_test),
        "ece_after": metrics.expected_calibration_error(softmax(logits, temperature), y_test),
    }
    return report, logits.argmax(1)


def fit_and_test(data: Dataset, config: dict, base: TrainConfig, modality: str = "fusion"):
    """Train one configuration on train (early stopping on val) and score the test split.

    Returns (model config, train config, train result, test metrics, predicted label indices on test).
    """
    model_config, train_config = configs_from_trial(
        config, data.text.shape[1], data.image.shape[1], len(data.codes), base, modality, data.lexical_dim
    )
    result = fit(data, model_config, train_config)
    report, predicted = test_report(data, load_trained(model_config, result.state_dict))
    return model_config, train_config, result, report, predicted


def evaluate_ablation(data: Dataset, config: dict, base: TrainConfig, report: dict) -> dict[str, dict]:
    """Test metrics of every ablation variant of ``config`` (see ``ablation_variants``), same split.

    ``report`` is the test report of ``config`` itself, reused for the variant that is the same model
    (training is seeded: it would come out identical).
    """
    out = {}
    for name, (modality, cfg) in ablation_variants(config, lexical=data.lexical_dim > 0).items():
        same = modality == "fusion" and cfg is config
        out[name] = report if same else fit_and_test(data, cfg, base, modality)[3]
    return out


def score_codes(data: Dataset, loaded: registry.LoadedModel) -> float:
    """Test F1-macro of a registered model on THIS dataset's test split (codes compared, not indices)."""
    text, image, y = data.part(TEST)
    predicted = np.array(loaded.codes)[loaded.logits(text, image, data.texts_part(TEST)).argmax(1)]
    truth = np.array(data.codes)[y]
    return metrics.summary(truth, predicted)["f1_macro"]


def promote_if_better(
    client, settings: Settings, data: Dataset, version: str, candidate_f1: float, production=None
) -> dict:
    """Promote ``version`` if it beats production re-scored on the same, current test split."""
    name = settings.registered_model_name
    production = production or registry.version_by_alias(client, name, registry.PRODUCTION)
    production_f1 = None
    comparable = True
    if production is not None:
        loaded = registry.load_version(client, name, production.version)
        comparable = loaded.card.get("encoder_set_id") == encoder_set_id(*encoder_ids(settings))
        production_f1 = score_codes(data, loaded) if comparable else None
    promote, reason = registry.decide_promotion(candidate_f1, production_f1)
    if not comparable:
        promote, reason = True, "production model uses other encoders: not comparable, candidate promoted"
    if promote:
        registry.promote(client, name, version)
    deleted = registry.prune_versions(client, name, settings.keep_model_versions)
    return {
        "promoted": promote,
        "reason": reason,
        "candidate_version": version,
        "candidate_test_f1_macro": candidate_f1,
        "production_version": production.version if production else None,
        "production_test_f1_macro_rescored": production_f1,
        "pruned_versions": deleted,
    }


def _close_stopped_trials(client, experiment_id: str, parent_run_id: str) -> None:
    """Trials that ASHA stopped never reach set_terminated: mark them so the UI does not show them running."""
    runs = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"
    )
    for run in runs:
        client.set_tag(run.info.run_id, "stopped_by", "asha")
        client.set_terminated(run.info.run_id, "KILLED")


def run(
    settings: Settings | None = None,
    trials: int | None = None,
    max_epochs: int | None = None,
    force: bool = False,
) -> dict:
    """The train stage; returns a summary with the decision."""
    import mlflow
    from mlflow import MlflowClient

    settings = settings or get_settings()
    trials = trials or settings.tune_trials
    max_epochs = max_epochs or settings.tune_max_epochs
    connect_ray(settings)
    s3 = s3_client(settings)
    mlflow.set_tracking_uri(settings.mlflow_uri)
    client = MlflowClient(settings.mlflow_uri)
    name = settings.registered_model_name

    data, lineage = load_dataset(settings, s3)
    if len(data.y) == 0 or min(data.counts().values()) == 0:
        raise RuntimeError(f"not enough labelled, embedded products to train: split counts {data.counts()}")
    production = registry.version_by_alias(client, name, registry.PRODUCTION)
    if production is not None and not force:
        card = registry.load_version(client, name, production.version).card
        if card.get("data_fingerprint") == data.fingerprint:
            return {"skipped": True, "reason": f"embeddings unchanged since production v{production.version}"}

    # Created here, in the driver, before any trial touches the tracking store (concurrent first use fails).
    experiment = mlflow.set_experiment(settings.mlflow_experiment)
    t0 = time.monotonic()
    with mlflow.start_run(run_name="tune-fusion") as parent:
        sha = git_sha(settings)
        mlflow.set_tags({"git_sha": sha, "data_fingerprint": data.fingerprint, "stage": "train"})
        mlflow.log_params(
            {
                "trials": trials,
                "max_epochs": max_epochs,
                "split_seed": settings.split_seed,
                "tune_seed": settings.tune_seed,
                "encoder_set_id": lineage["encoder_set_id"],
            }
        )
        mlflow.log_dict(lineage, "lineage.json")
        mlflow.log_metrics(
            {
                "products": lineage["products"],
                "imbalance_ratio": lineage["imbalance_ratio"],
                **{f"n_{k}": v for k, v in lineage["split_counts"].items()},
            }
        )

        best = tune_head(settings, data, parent.info.run_id, experiment.experiment_id, trials, max_epochs)
        _close_stopped_trials(client, experiment.experiment_id, parent.info.run_id)
        tune_seconds = time.monotonic() - t0
        mlflow.log_params({f"best_{k}": v for k, v in best["config"].items()})
        mlflow.log_metrics(
            {
                "best_val_f1_macro": best["val_f1_macro"],
                "tune_seconds": tune_seconds,
                "trials_stopped_early": best["stopped_early"],
            }
        )

        # Retrain the best configuration (seeded: the same run as the trial) for each modality.
        base = TrainConfig(
            max_epochs=max_epochs, patience=settings.early_stop_patience, seed=settings.tune_seed
        )
        _, _, y_test = data.part(TEST)
        truth = np.array(data.codes)[y_test]
        # The model to register; calibrated: its temperature is fitted on val, its ECE judged on test.
        model_config, train_config, result, report, predicted = fit_and_test(data, best["config"], base)
        ablation = evaluate_ablation(data, best["config"], base, report)
        temperature = report["temperature"]
        calibration = {
            "temperature": temperature,
            "test_ece_before": report["ece_before"],
            "test_ece_after": report["ece_after"],
        }
        mlflow.log_metrics(calibration)
        test = {k: report[k] for k in ("f1_macro", "f1_weighted", "accuracy")}
        mlflow.log_metrics({f"test_{k}": v for k, v in test.items()})
        mlflow.log_metrics({f"ablation_{m}_test_f1_macro": v["f1_macro"] for m, v in ablation.items()})
        mlflow.log_dict(ablation, "ablation.json")
        names = [class_name(c) for c in data.codes]
        per_class = metrics.per_class(y_test, predicted, data.codes, names)
        mlflow.log_table(per_class, "per_class_test.json")
        mlflow.log_text(per_class.to_csv(index=False), "per_class_test.csv")
        mlflow.log_image(_png(metrics.confusion_png(y_test, predicted, data.codes)), "confusion_matrix.png")

        card = {
            "codes": data.codes,
            "class_names": {str(c): n for c, n in zip(data.codes, names, strict=True)},
            "model_config": model_config.to_dict(),
            "train_config": asdict(train_config),
            "encoder_set_id": lineage["encoder_set_id"],
            "text_encoder": lineage["text_encoder"],
            "image_encoder": lineage["image_encoder"],
            "split": {
                "seed": settings.split_seed,
                "val_fraction": settings.val_fraction,
                "test_fraction": settings.test_fraction,
            },
            "batch_ids": lineage["batch_ids"],
            "data_fingerprint": data.fingerprint,
            "git_sha": sha,
            "test_metrics": test,
            "temperature": temperature,
            "calibration": calibration,
            "class_counts_train": {
                str(data.codes[i]): int(n)
                for i, n in enumerate(np.bincount(data.part(TRAIN)[2], minlength=len(data.codes)))
            },
            "best_epoch": result.best_epoch,
            "parent_run_id": parent.info.run_id,
        }
        with tempfile.TemporaryDirectory() as tmp:
            lexical = data.lexical_features if model_config.uses_lexical else None
            model_dir = registry.write_model_dir(Path(tmp) / "model", result.state_dict, card, lexical)
            info = registry.log_model(model_dir, card, _requirements())
        version = mlflow.register_model(
            info.model_uri, name, tags={"git_sha": sha, "data_fingerprint": data.fingerprint}
        )
        client.set_model_version_tag(name, version.version, "test_f1_macro", f"{test['f1_macro']:.4f}")
        client.set_model_version_tag(name, version.version, "batch_ids", json.dumps(lineage["batch_ids"]))

        candidate_f1 = metrics.summary(truth, np.array(data.codes)[predicted])["f1_macro"]
        decision = promote_if_better(client, settings, data, version.version, candidate_f1, production)
        mlflow.log_dict(decision, "promotion.json")
        mlflow.set_tag("promotion", "promoted" if decision["promoted"] else "rejected")
        mlflow.log_metric("promoted", float(decision["promoted"]))
        if decision["production_test_f1_macro_rescored"] is not None:
            mlflow.log_metric(
                "production_test_f1_macro_rescored", decision["production_test_f1_macro_rescored"]
            )

    return {
        "skipped": False,
        "run_id": parent.info.run_id,
        "version": version.version,
        "test": test,
        "ablation": {m: v["f1_macro"] for m, v in ablation.items()},
        "best": best,
        "decision": decision,
        "tune_seconds": tune_seconds,
        "lineage": lineage,
    }


def _png(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def _requirements() -> list[str]:
    return [f"{pkg}=={metadata.version(pkg)}" for pkg in ("torch", "numpy", "mlflow")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="train even if the embeddings did not change")
    args = parser.parse_args(argv)
    out = run(trials=args.trials, max_epochs=args.max_epochs, force=args.force)
    if out["skipped"]:
        print(f"nothing to train: {out['reason']}")
        return 0
    d = out["decision"]
    test, verdict = out["test"], "PROMOTED" if d["promoted"] else "not promoted"
    print(
        f"version {out['version']}: test F1-macro {test['f1_macro']:.4f}, "
        f"weighted F1 {test['f1_weighted']:.4f}, accuracy {test['accuracy']:.4f}; "
        f"ablation {out['ablation']}; tuning {out['tune_seconds']:.0f} s; {verdict} ({d['reason']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
