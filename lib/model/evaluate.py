"""Evaluation on the held-out test split: test report with calibration, ablation, and the promotion decision.

The test split is read only here, after tuning and early stopping (which see train and val only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from mlflow import MlflowClient

from lib.features.encoders import encoder_ids, encoder_set_id
from lib.model import metrics, registry
from lib.model.artifact import LoadedModel
from lib.model.calibration import Calibration, fit_calibration, softmax
from lib.model.dataset import Dataset
from lib.model.experts import ExpertConfig, ExpertEnsemble, expert_log_probs, fit_ensemble
from lib.model.split import TEST, VAL
from lib.model.tune import DEFAULT_TRIAL
from lib.settings import Settings

if TYPE_CHECKING:  # the fusion MLP's types: torch (~0.7 GB resident) is imported only to train or run one
    from lib.model.network import FusionConfig
    from lib.model.train import TrainConfig, TrainResult


@dataclass
class FittedHead:
    """A head fitted without the test split, and its scores on the test split.

    The fusion MLP: trained on train with early stopping on val. The experts: fitted on train + val.
    """

    # f1_macro, f1_weighted, accuracy, temperature, slope, intercept (lib.model.calibration.Calibration),
    # ece_before, ece_after
    report: dict[str, float]
    predicted: np.ndarray  # predicted label index of each test product
    model_config: FusionConfig | None = None  # the MLP's
    train_config: TrainConfig | None = None
    result: TrainResult | None = None
    ensemble: ExpertEnsemble | None = None  # the experts'
    lane_seconds: dict[str, float] = field(default_factory=dict)  # the experts' fit: busy seconds per lane


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    candidate_version: str
    candidate_test_f1_macro: float
    production_version: str | None
    production_test_f1_macro_rescored: float | None
    pruned_versions: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def test_report(data: Dataset, model) -> tuple[dict, np.ndarray]:
    """Test metrics of a trained MLP, with its calibration; returns (metrics, predicted label indices).

    The calibration is fitted on the validation split.
    """
    from lib.model.network import predict_logits  # lazy: torch, only the MLP head needs it

    val_text, val_image, y_val = data.part(VAL)
    text, image, _ = data.part(TEST)
    calibration = fit_calibration(predict_logits(model, val_text, val_image, data.lexical_part(VAL)), y_val)
    return scored(
        predict_logits(model, text, image, data.lexical_part(TEST)), data.part(TEST)[2], calibration
    )


def scored(logits: np.ndarray, y: np.ndarray, calibration: Calibration) -> tuple[dict, np.ndarray]:
    """F1-macro, weighted F1, accuracy, the calibration's parameters, and the expected calibration error
    before and after it; and the predicted label indices."""
    report = (
        metrics.summary(y, logits.argmax(1))
        | calibration.to_dict()
        | {
            "ece_before": metrics.expected_calibration_error(softmax(logits), y),
            "ece_after": metrics.expected_calibration_error(calibration.probabilities(logits), y),
        }
    )
    return report, logits.argmax(1)


def fit_and_test_experts(
    data: Dataset, config: ExpertConfig, folds: int, seed: int, workers: int = 1
) -> FittedHead:
    """The experts fitted on train + val (fusion weights and calibration from out-of-fold scores), scored
    on test."""
    rows = np.flatnonzero(data.split != TEST)  # the folds read them in place: no copy of train + val
    lanes: dict[str, float] = {}
    ensemble, calibration = fit_ensemble(
        data.inputs(), data.y[rows], len(data.codes), config, folds, seed, workers, rows, lanes
    )
    report, predicted = scored(
        ensemble.logits(data.inputs(data.split == TEST)), data.part(TEST)[2], calibration
    )
    return FittedHead(report, predicted, ensemble=ensemble, lane_seconds=lanes)


def expert_ablation(data: Dataset, head: FittedHead) -> dict[str, dict]:
    """Test metrics of each expert alone, of the dense experts fused, and of the whole ensemble.

    Rows as ``lib.model.metrics.ABLATION_ROWS``: "fusion" is text + image, "fusion_lexical" all three.
    The image expert alone is scored on the test products that have an image (it abstains on the rest).
    """
    test = data.split == TEST
    x, y = data.inputs(test), data.y[test]
    parts = expert_log_probs(head.ensemble.experts, x)
    weights = head.ensemble.weights
    dense = weights.text * parts["text"] + weights.image * parts["image"]
    has_image = x.has_image
    out = {name: metrics.summary(y, parts[name].argmax(1)) for name in ("lexical", "text")}
    out["image"] = metrics.summary(y[has_image], parts["image"][has_image].argmax(1))
    out["fusion"] = metrics.summary(y, dense.argmax(1))
    out["fusion_lexical"] = head.report
    return out


def fit_and_test(data: Dataset, config: dict, base: TrainConfig, modality: str = "fusion") -> FittedHead:
    """Train one configuration on train (early stopping on val) and score the test split."""
    from lib.model.network import load_trained  # lazy: torch, only the MLP head needs it
    from lib.model.train import configs_from_trial, train_model

    model_config, train_config = configs_from_trial(
        config, data.text.shape[1], data.image.shape[1], len(data.codes), base, modality, data.lexical_dim
    )
    result = train_model(data, model_config, train_config)
    report, predicted = test_report(data, load_trained(model_config, result.state_dict))
    return FittedHead(report, predicted, model_config, train_config, result)


def ablation_variants(config: dict, lexical: bool) -> dict[str, tuple[str, dict]]:
    """Ablation rows → (modality, trial config): the best configuration with inputs taken away.

    "fusion" is the dense fusion (text + image embeddings); with lexical data, "fusion_lexical" and
    "lexical" use the best configuration's lexical branch, or the default one if the search turned the
    branch off (the row then shows what the branch would have given).
    """
    # Keys are lib.model.metrics.ABLATION_ROWS. The variant that is ``config`` itself is ``config`` (the
    # same object), so the caller can reuse its model; text and image heads ignore the lexical keys.
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


def evaluate_ablation(data: Dataset, config: dict, base: TrainConfig, report: dict) -> dict[str, dict]:
    """Test metrics of every ablation variant of ``config`` (see ``ablation_variants``), same split.

    ``report`` is the test report of ``config`` itself, reused for the variant that is the same model
    (training is seeded: it would come out identical).
    """
    out = {}
    for name, (modality, cfg) in ablation_variants(config, lexical=data.lexical_dim > 0).items():
        same = modality == "fusion" and cfg is config
        out[name] = report if same else fit_and_test(data, cfg, base, modality).report
    return out


def score_codes(data: Dataset, loaded: LoadedModel) -> float:
    """Test F1-macro of a registered model on THIS dataset's test split (codes compared, not indices)."""
    text, image, y = data.part(TEST)
    predicted = np.array(loaded.codes)[loaded.logits(text, image, data.texts_part(TEST)).argmax(1)]
    truth = np.array(data.codes)[y]
    return metrics.summary(truth, predicted)["f1_macro"]


def decide_promotion(candidate_f1: float, production_f1: float | None) -> tuple[bool, str]:
    """Promote only a strict improvement of test F1-macro on the same split."""
    if production_f1 is None:
        return True, "no production model yet"
    if candidate_f1 > production_f1:
        return True, f"candidate F1-macro {candidate_f1:.4f} > production {production_f1:.4f}"
    return False, f"candidate F1-macro {candidate_f1:.4f} <= production {production_f1:.4f}"


def promote_if_better(
    client: MlflowClient,
    settings: Settings,
    data: Dataset,
    version: str,
    candidate_f1: float,
    production=None,
) -> PromotionDecision:
    """Promote ``version`` if it beats production re-scored on the same, current test split."""
    name = settings.registered_model_name
    production = production or registry.version_by_alias(client, name, registry.PRODUCTION)
    production_f1 = None
    comparable = True
    if production is not None:
        loaded = registry.load_version(client, name, production.version)
        comparable = loaded.card.get("encoder_set_id") == encoder_set_id(*encoder_ids(settings))
        production_f1 = score_codes(data, loaded) if comparable else None
    promote, reason = decide_promotion(candidate_f1, production_f1)
    if not comparable:
        promote, reason = True, "production model uses other encoders: not comparable, candidate promoted"
    if promote:
        registry.promote(client, name, version)
    return PromotionDecision(
        promoted=promote,
        reason=reason,
        candidate_version=version,
        candidate_test_f1_macro=candidate_f1,
        production_version=production.version if production else None,
        production_test_f1_macro_rescored=production_f1,
        pruned_versions=registry.prune_versions(client, name, settings.keep_model_versions),
    )
