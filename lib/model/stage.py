"""The train stage: tune the head, retrain the best configuration, evaluate, register, promote if better.

load_dataset → tune_head (Ray Tune, trials nested in one MLflow parent run) → fit_and_test + ablation on
the held-out test split → model card + files → MLflow registry → promote_if_better (production re-scored
on the same split). ``jobs/train.py`` is its command line; ``jobs/pipeline.py`` runs it after embed.
"""

from __future__ import annotations

import io
import json
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from PIL import Image

from lib.data import lake
from lib.data.rakuten import class_name
from lib.errors import UserError
from lib.model import metrics, registry
from lib.model.artifact import EXPERTS_KIND, MLP_KIND, write_model_dir
from lib.model.dataset import Dataset, load_dataset
from lib.model.evaluate import (
    FittedHead,
    PromotionDecision,
    evaluate_ablation,
    expert_ablation,
    fit_and_test,
    fit_and_test_experts,
    promote_if_better,
)
from lib.model.experts import ExpertConfig
from lib.model.split import TEST, TRAIN
from lib.model.tune import TuneResult, close_stopped_trials, tune_head
from lib.ops.provenance import git_sha
from lib.settings import Settings

# Packages a registered pyfunc model needs to load (recorded with the model in MLflow).
MODEL_REQUIREMENTS = ("torch", "numpy", "mlflow")


@dataclass
class TrainOutcome:
    """What the train stage did: skipped (and why), or the registered version and the promotion decision."""

    skipped: bool
    reason: str = ""
    run_id: str | None = None
    version: str | None = None
    test: dict[str, float] = field(default_factory=dict)
    ablation: dict[str, float] = field(default_factory=dict)  # ablation row → test F1-macro
    best: TuneResult | None = None
    decision: PromotionDecision | None = None
    tune_seconds: float = 0.0
    lineage: dict = field(default_factory=dict)
    retune: str = ""  # full search or refit, and why (``decide_retune``)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # load, search, fit, register_promote
    # This process's peak RSS (GB) by the end of each phase: the phase where it jumps is the one to shrink.
    phase_peak_gb: dict[str, float] = field(default_factory=dict)
    lane_seconds: dict[str, float] = field(default_factory=dict)  # the experts' fit: busy seconds per lane

    def summary(self) -> dict:
        """The JSON the pipeline record keeps."""
        if self.skipped:
            return {"skipped": True, "reason": self.reason}
        return {
            "version": self.version,
            "run_id": self.run_id,
            "test": self.test,
            "ablation": self.ablation,
            "promoted": self.decision.promoted,
            "reason": self.decision.reason,
            "retune": self.retune,
            "tune_seconds": round(self.tune_seconds, 1),
            "phase_seconds": {k: round(v, 1) for k, v in self.phase_seconds.items()},
            "phase_peak_gb": {k: round(v, 2) for k, v in self.phase_peak_gb.items()},
            "lane_seconds": {k: round(v, 1) for k, v in self.lane_seconds.items()},
        }


def run_train_stage(
    settings: Settings, s3, trials: int | None = None, max_epochs: int | None = None, force: bool = False
) -> TrainOutcome:
    """The train stage on the current catalogue (Ray must be connected: trials are Ray Tune actors)."""
    trials = trials or settings.tune_trials
    max_epochs = max_epochs or settings.tune_max_epochs
    mlflow.set_tracking_uri(settings.mlflow_uri)
    client = MlflowClient(settings.mlflow_uri)
    phases, peaks, started = {}, {}, time.monotonic()
    data, lineage = load_dataset(s3, settings)
    production, unchanged, retune = plan_training(settings, client, s3, data, force)
    if unchanged is not None:
        return unchanged
    phases["load"], peaks["load"] = time.monotonic() - started, peak_rss_gb()

    # Created here, in the driver, before any trial touches the tracking store (concurrent first use fails).
    experiment = mlflow.set_experiment(settings.mlflow_experiment)
    t0 = time.monotonic()
    with mlflow.start_run(run_name="tune-fusion") as parent:
        sha = git_sha(settings)
        _log_inputs(settings, data, lineage, sha, trials, max_epochs, retune)
        best = search(settings, client, data, retune, parent.info.run_id, experiment.experiment_id,
                      trials, max_epochs)  # fmt: skip
        tune_seconds = phases["search"] = time.monotonic() - t0
        peaks["search"] = peak_rss_gb()
        mlflow.log_params({f"best_{k}": v for k, v in best.config.items()})
        mlflow.log_metrics({"tune_seconds": tune_seconds, "trials_stopped_early": best.stopped_early})
        if best.trials:
            mlflow.log_metric("best_val_f1_macro", best.val_f1_macro)
        head, ablation = fit_best(settings, data, best, max_epochs, retune.folds(settings))
        _log_evaluation(data, head, ablation)
        phases["fit"], peaks["fit"] = time.monotonic() - t0 - tune_seconds, peak_rss_gb()
        card = model_card(settings, data, lineage, head, sha, parent.info.run_id) | {
            "tune_config": best.config
        }
        version = _register(settings, client, data, head, card)
        candidate_f1 = head.report["f1_macro"]
        decision = promote_if_better(client, settings, data, version, candidate_f1, production)
        _log_decision(decision)
        phases["register_promote"] = time.monotonic() - t0 - tune_seconds - phases["fit"]
        peaks["register_promote"] = peak_rss_gb()
        mlflow.log_metrics({f"seconds_{phase}": seconds for phase, seconds in phases.items()})
        mlflow.log_metrics({f"peak_rss_gb_{phase}": gb for phase, gb in peaks.items()})
        mlflow.log_metrics({f"fit_lane_seconds_{lane}": s for lane, s in head.lane_seconds.items()})
    return TrainOutcome(
        skipped=False,
        run_id=parent.info.run_id,
        version=version,
        test=card["test_metrics"],
        ablation={m: v["f1_macro"] for m, v in ablation.items()},
        best=best,
        decision=decision,
        tune_seconds=tune_seconds,
        lineage=lineage,
        retune=f"{retune.kind}: {retune.reason}",
        phase_seconds=phases,
        phase_peak_gb=peaks,
        lane_seconds=head.lane_seconds,
    )


def peak_rss_gb() -> float:
    """This process's largest resident set so far, in GB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def search(
    settings: Settings,
    client: MlflowClient,
    data: Dataset,
    retune: RetuneDecision,
    parent_run_id: str,
    experiment_id: str,
    trials: int,
    max_epochs: int,
) -> TuneResult:
    """The Ray Tune search, or for a refit production's configuration as it is: the final fit is then the
    one training run (a trial would score a configuration there is nothing to choose against)."""
    if not retune.full:
        return TuneResult(retune.replay, float("nan"), trials=0, configs=[retune.replay], stopped_early=0)
    kind = settings.head_kind
    best = tune_head(settings, data, parent_run_id, experiment_id, trials, max_epochs, kind=kind)
    close_stopped_trials(client, experiment_id, parent_run_id)
    return best


def fit_best(
    settings: Settings, data: Dataset, best: TuneResult, max_epochs: int, folds: int | None = None
) -> tuple[FittedHead, dict]:
    """The best configuration fitted without the test split, scored on it, with its ablation (an experts
    head: ``folds`` fold models averaged, by default ``settings.expert_folds``)."""
    if settings.head_kind == EXPERTS_KIND:
        config, folds = ExpertConfig(**best.config), folds or settings.expert_folds
        head = fit_and_test_experts(data, config, folds, settings.tune_seed, settings.fit_threads)
        return head, expert_ablation(data, head)
    from lib.model.train import TrainConfig  # lazy: torch (~0.7 GB resident), only for the MLP head

    base = TrainConfig(max_epochs=max_epochs, patience=settings.early_stop_patience, seed=settings.tune_seed)
    # Retrain the best configuration (seeded: the same run as the trial); calibrated on val.
    head = fit_and_test(data, best.config, base)
    return head, evaluate_ablation(data, best.config, base, head.report)


def _log_inputs(
    settings: Settings,
    data: Dataset,
    lineage: dict,
    sha: str,
    trials: int,
    max_epochs: int,
    retune: RetuneDecision,
) -> None:
    mlflow.set_tags({"git_sha": sha, "data_fingerprint": data.fingerprint, "stage": "train"})
    params = {"trials": trials, "max_epochs": max_epochs, "split_seed": settings.split_seed,
              "tune_seed": settings.tune_seed, "tune_max_rows": settings.tune_max_rows,
              "encoder_set_id": lineage["encoder_set_id"], "retune": retune.kind,
              "retune_reason": retune.reason, "folds": retune.folds(settings)}  # fmt: skip
    mlflow.log_params(params)
    mlflow.log_dict(lineage, "lineage.json")
    mlflow.log_metrics({"products": lineage["products"], "imbalance_ratio": lineage["imbalance_ratio"],
                        **{f"n_{k}": v for k, v in lineage["split_counts"].items()}})  # fmt: skip


def _log_evaluation(data: Dataset, head: FittedHead, ablation: dict[str, dict]) -> None:
    """Test metrics, calibration, ablation, per-class table and confusion matrix of the chosen head."""
    report, (_, _, y_test) = head.report, data.part(TEST)
    mlflow.log_metrics(_calibration(report))
    mlflow.log_metrics({f"test_{k}": report[k] for k in ("f1_macro", "f1_weighted", "accuracy")})
    mlflow.log_metrics({f"ablation_{m}_test_f1_macro": v["f1_macro"] for m, v in ablation.items()})
    mlflow.log_dict(ablation, "ablation.json")
    per_class = metrics.per_class(y_test, head.predicted, data.codes, [class_name(c) for c in data.codes])
    mlflow.log_table(per_class, "per_class_test.json")
    mlflow.log_text(per_class.to_csv(index=False), "per_class_test.csv")
    confusion = metrics.confusion_png(y_test, head.predicted, data.codes)
    mlflow.log_image(Image.open(io.BytesIO(confusion)), "confusion_matrix.png")


def _calibration(report: dict) -> dict[str, float]:
    """The calibration's parameters (``lib.model.calibration.Calibration``) and its test ECE."""
    return {"temperature": report["temperature"], "slope": report["slope"], "intercept": report["intercept"],
            "test_ece_before": report["ece_before"], "test_ece_after": report["ece_after"]}  # fmt: skip


@dataclass(frozen=True)
class RetuneDecision:
    """A full Ray Tune search, or a refit of the production configuration on today's data (no search)."""

    full: bool
    reason: str
    replay: dict | None = None  # the configuration a refit trains

    @property
    def kind(self) -> str:
        return "full search" if self.full else "refit"

    def folds(self, settings: Settings) -> int:
        """Fold models of the final fit: a refit's wait is an incremental batch's (see ``refit_folds``)."""
        return settings.expert_folds if self.full else settings.refit_folds


def plan_training(settings: Settings, client: MlflowClient, s3, data: Dataset, force: bool) -> tuple:
    """(production version or None, a skipped TrainOutcome when the data did not change, RetuneDecision)."""
    if len(data.y) == 0 or min(data.counts().values()) == 0:
        raise NotEnoughData(
            f"not enough labelled, embedded products to train (split counts {data.counts()}): ingest a "
            "ZIP with its Y file (labels) first"
        )
    name = settings.registered_model_name
    production = registry.version_by_alias(client, name, registry.PRODUCTION)
    card = registry.load_version(client, name, production.version).card if production else None
    if card is not None and not force and card.get("data_fingerprint") == data.fingerprint:
        reason = f"data (embeddings and labels) unchanged since production v{production.version}"
        return production, TrainOutcome(True, reason), None
    train_rows = int((data.split == TRAIN).sum())
    return (
        production,
        None,
        decide_retune(settings, card, production, train_rows, lake.latest_drift_report(s3, settings)),
    )


def decide_retune(
    settings: Settings, card: dict | None, production, train_rows: int, drift: dict | None
) -> RetuneDecision:
    """The retune policy (``settings.retune_policy``): ``auto`` searches again when the labelled training
    rows grew by at least ``retune_growth_fraction`` since production was trained, or the newest drift
    report flagged production; otherwise it refits production's configuration (cheap, still guarded by
    the promotion rule). ``always`` / ``never`` force one branch; with nothing to reuse, it searches."""
    if settings.retune_policy == "always":
        return RetuneDecision(True, "retune_policy=always")
    if card is None:
        return RetuneDecision(True, "no production model yet")
    if "tune_config" not in card or card.get("head_kind", MLP_KIND) != settings.head_kind:
        return RetuneDecision(True, f"production v{production.version} has no configuration for this head")
    refit = RetuneDecision(False, "retune_policy=never", card["tune_config"])
    if settings.retune_policy == "never":
        return refit
    if drift and drift.get("drifted") and str(drift.get("model_version")) == str(production.version):
        return RetuneDecision(
            True, f"the monitor flagged drift on production v{production.version} ({drift['key']})"
        )
    before = sum(card.get("class_counts_train", {}).values())
    growth = train_rows / max(before, 1) - 1
    threshold = settings.retune_growth_fraction
    if growth >= threshold:
        return RetuneDecision(
            True, f"labelled training rows grew {growth:+.0%} since v{production.version} (≥ {threshold:.0%})"
        )
    reason = (
        f"labelled training rows grew {growth:+.0%} since v{production.version} (< {threshold:.0%}), no drift"
    )
    return replace(refit, reason=reason)


class NotEnoughData(UserError):
    """The lake holds too few labelled, embedded products for every split."""


def model_card(
    settings: Settings, data: Dataset, lineage: dict, head: FittedHead, sha: str, parent_run_id: str
) -> dict:
    """The card registered with the model: label map, architecture, encoders, split, lineage, scores."""
    train_counts = np.bincount(data.part(TRAIN)[2], minlength=len(data.codes))
    if head.ensemble is not None:
        head_card = {"head_kind": EXPERTS_KIND, "reads_text": True,
                     "expert_config": asdict(head.ensemble.config),
                     "fusion_weights": asdict(head.ensemble.weights)}  # fmt: skip
    else:
        head_card = {"head_kind": MLP_KIND, "reads_text": head.model_config.uses_lexical,
                     "model_config": head.model_config.to_dict(), "train_config": asdict(head.train_config),
                     "best_epoch": head.result.best_epoch}  # fmt: skip
    return {
        "codes": data.codes,
        "class_names": {str(c): class_name(c) for c in data.codes},
        **head_card,
        "input_dims": {"text_dim": int(data.text.shape[1]), "image_dim": int(data.image.shape[1])},
        "lexical_max_chars": settings.lexical_max_chars,
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
        "test_metrics": {k: head.report[k] for k in ("f1_macro", "f1_weighted", "accuracy")},
        "temperature": head.report["temperature"],
        "calibration": _calibration(head.report),
        "class_counts_train": {str(data.codes[i]): int(n) for i, n in enumerate(train_counts)},
        "parent_run_id": parent_run_id,
    }


def _register(settings: Settings, client: MlflowClient, data: Dataset, head: FittedHead, card: dict) -> str:
    """Log the model's files in the active run and register them; returns the new version."""
    name = settings.registered_model_name
    with tempfile.TemporaryDirectory() as tmp:
        lexical = data.lexical_features if card["reads_text"] else None
        state_dict = None if head.ensemble is not None else head.result.state_dict
        model_dir = write_model_dir(Path(tmp) / "model", state_dict, card, lexical, head.ensemble)
        requirements = [f"{pkg}=={metadata.version(pkg)}" for pkg in MODEL_REQUIREMENTS]
        info = registry.log_model(model_dir, card, requirements)
    version = mlflow.register_model(
        info.model_uri, name, tags={"git_sha": card["git_sha"], "data_fingerprint": data.fingerprint}
    ).version
    client.set_model_version_tag(name, version, "test_f1_macro", f"{card['test_metrics']['f1_macro']:.4f}")
    client.set_model_version_tag(name, version, "batch_ids", json.dumps(card["batch_ids"]))
    return version


def _log_decision(decision: PromotionDecision) -> None:
    mlflow.log_dict(decision.to_dict(), "promotion.json")
    mlflow.set_tag("promotion", "promoted" if decision.promoted else "rejected")
    mlflow.log_metric("promoted", float(decision.promoted))
    if decision.production_test_f1_macro_rescored is not None:
        mlflow.log_metric("production_test_f1_macro_rescored", decision.production_test_f1_macro_rescored)
