"""Model quality: the head the pipeline promotes by default against scikit-learn anchors, same splits.

The real sample (``RAKUTEN_REAL_DATA``) is ingested and embedded once by the real jobs in a stack of the
benchmark's own. Then, per split seed, on the same train / validation / test split:

- **default**: exactly what the train stage does with the default settings (``lib.model.stage``: the
  dataset with its TF-IDF block, the Ray Tune search of ``settings.head_kind``, the best configuration
  fitted without the test split), scored on the test split, with its ablation rows;
- anchors, each tuned on the validation split: (i) LogisticRegression on the TF-IDF block (the same
  features: word 1–2 + char 2–5 grams of title + description, and a title block), (ii) LogisticRegression
  on the two embeddings concatenated, (iii) their late fusion, the weight chosen on validation.

Printed: F1-macro and weighted F1 per seed, overall and on the test products with both a text and an
image, then mean ± std; each target with ✓/✗ (default ≥ anchor (iii) + 0.02, default ≥ 0.75, ECE after
the model's calibration ≤ 0.05); and the cost the head adds to a one-product request (p50 / p99). The
default's ablation rows are the members of the promoted ensemble (its own regularisation); the anchors
are the single-input models each tuned on its own.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from sklearn.linear_model import LogisticRegression

from benchmarks.bench_train import load_catalogue
from benchmarks.common import bench_parser, bench_stack, mark, print_table, real_data_dir, zip_real_sample
from lib.data.storage import s3_client
from lib.model import metrics
from lib.model.dataset import Dataset, load_dataset
from lib.model.evaluate import FittedHead
from lib.model.experts import Inputs
from lib.model.metrics import ABLATION_ROWS
from lib.model.split import TEST, TRAIN, VAL
from lib.model.stage import fit_best
from lib.model.tune import tune_head
from lib.settings import Settings

TARGET_F1 = 0.75
TARGET_MARGIN = 0.02
TARGET_ECE = 0.05
TARGET_LATENCY_MS = 5.0
LATENCY_CALLS = 300
ANCHOR_C = {"lexical": (3.0, 10.0, 30.0), "dense": (0.3, 1.0, 3.0)}
FUSION_GRID = np.linspace(0.0, 1.0, 11)


@dataclass
class SeedResult:
    default: dict[str, dict]  # ablation row → metrics (fusion_lexical: the promoted head itself)
    anchors: dict[str, dict]  # anchor → metrics
    best: dict
    head: FittedHead
    data: Dataset


def scores(y: np.ndarray, predicted: np.ndarray, paired: np.ndarray) -> dict[str, float]:
    """F1-macro and weighted F1 overall, and F1-macro on the text + image products."""
    overall = metrics.summary(y, predicted)
    return overall | {"f1_macro_paired": metrics.summary(y[paired], predicted[paired])["f1_macro"]}


def logistic_on_val(x_train, y_train, x_val, y_val, grid) -> LogisticRegression:
    """The LogisticRegression with the best validation F1-macro over the C grid."""
    fitted = [LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train) for c in grid]
    return max(fitted, key=lambda m: metrics.summary(y_val, m.predict(x_val))["f1_macro"])


def log_proba(model: LogisticRegression, x, n_classes: int) -> np.ndarray:
    out = np.full((x.shape[0], n_classes), -1e9)
    out[:, model.classes_] = model.predict_log_proba(x)
    return out


def anchors(data: Dataset, paired: np.ndarray) -> dict[str, dict]:
    """The three scikit-learn anchors on this dataset's split (tuned on validation, scored on test)."""
    train, val, test = (data.split == name for name in (TRAIN, VAL, TEST))
    dense = np.hstack([data.text, data.image])
    k, y = len(data.codes), data.y
    lexical = logistic_on_val(data.lexical[train], y[train], data.lexical[val], y[val], ANCHOR_C["lexical"])
    embeddings = logistic_on_val(dense[train], y[train], dense[val], y[val], ANCHOR_C["dense"])
    lex_lp, dense_lp = log_proba(lexical, data.lexical, k), log_proba(embeddings, dense, k)

    def fused(w: float, rows: np.ndarray) -> np.ndarray:
        return (w * lex_lp[rows] + (1 - w) * dense_lp[rows]).argmax(1)

    weight = max(FUSION_GRID, key=lambda w: metrics.summary(y[val], fused(w, val))["f1_macro"])
    return {
        "(i) LR TF-IDF": scores(y[test], lex_lp[test].argmax(1), paired),
        "(ii) LR embeddings": scores(y[test], dense_lp[test].argmax(1), paired),
        f"(iii) late fusion (w={weight:.1f})": scores(y[test], fused(weight, test), paired),
    }


def evaluate_seed(settings: Settings, seed: int) -> SeedResult:
    """The default train-stage path and the anchors on this split seed."""
    settings = settings.model_copy(update={"split_seed": seed})
    data, _ = load_dataset(s3_client(settings), settings)
    mlflow.set_tracking_uri(settings.mlflow_uri)
    experiment = mlflow.set_experiment(f"{settings.mlflow_experiment}-bench-quality")
    with mlflow.start_run(run_name=f"quality-seed{seed}") as parent:
        best = tune_head(settings, data, parent.info.run_id, experiment.experiment_id, settings.tune_trials,
                         settings.tune_max_epochs, kind=settings.head_kind)  # fmt: skip
    head, ablation = fit_best(settings, data, best, settings.tune_max_epochs)
    test = data.split == TEST
    text, image = data.text[test], data.image[test]
    paired = (np.abs(text).sum(1) > 0) & (np.abs(image).sum(1) > 0)
    default = {row: dict(values) for row, values in ablation.items()}
    default["fusion_lexical"] = scores(data.y[test], head.predicted, paired) | {
        "ece_after": head.report["ece_after"]
    }
    return SeedResult(default, anchors(data, paired), best.config, head, data)


def head_latency(result: SeedResult) -> tuple[float, float]:
    """p50 / p99 ms of the promoted head on one product from its raw text (TF-IDF included)."""
    data, test = result.data, np.flatnonzero(result.data.split == TEST)
    texts = list(data.texts)
    times = []
    for i in range(LATENCY_CALLS):
        j = test[i % len(test)]
        t0 = time.perf_counter()
        rows = data.lexical_features.transform([texts[j]])
        if result.head.ensemble is not None:
            result.head.ensemble.logits(Inputs(rows, data.text[j : j + 1], data.image[j : j + 1]))
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}"


def report(results: dict[int, SeedResult], latency: tuple[float, float]) -> None:
    seeds = sorted(results)
    rows = []
    for seed in seeds:
        r = results[seed]
        heads = [(f"default: {h}", r.default[h]) for h in ABLATION_ROWS if h in r.default]
        for name, m in [*heads, *r.anchors.items()]:
            rows.append([seed, name, m["f1_macro"], m["f1_weighted"], m.get("f1_macro_paired", float("nan"))])
    print_table("Per split seed (held-out test split)", ["seed", "head", "F1-macro", "weighted F1",
                                                         "F1-macro text+image"], rows)  # fmt: skip
    names = [f"default: {h}" for h in ABLATION_ROWS] + [a.split(" (w=")[0] for a in results[seeds[0]].anchors]

    def values(name: str, key: str) -> list[float]:
        out = []
        for seed in seeds:
            r = results[seed]
            found = {f"default: {h}": m for h, m in r.default.items()} | {
                a.split(" (w=")[0]: m for a, m in r.anchors.items()
            }
            if name in found and key in found[name]:
                out.append(found[name][key])
        return out

    summary = [[n, *(mean_std(values(n, k)) if values(n, k) else "-" for k in ("f1_macro", "f1_weighted",
               "f1_macro_paired"))] for n in names]  # fmt: skip
    print_table(f"Mean ± std over {len(seeds)} split seeds", ["head", "F1-macro", "weighted F1",
                                                              "F1-macro text+image"], summary)  # fmt: skip
    default = values("default: fusion_lexical", "f1_macro")
    anchor3 = values("(iii) late fusion", "f1_macro")
    margin = [d - a for d, a in zip(default, anchor3, strict=True)]
    ece = values("default: fusion_lexical", "ece_after")
    print(f"default − anchor (iii): {mean_std(margin)} per seed {[round(m, 4) for m in margin]} "
          f"(target ≥ +{TARGET_MARGIN}) {mark(statistics.mean(margin) >= TARGET_MARGIN)}")  # fmt: skip
    ok = statistics.mean(default) >= TARGET_F1
    print(f"default F1-macro: {mean_std(default)} (target ≥ {TARGET_F1}) {mark(ok)}")
    print(f"default ECE after calibration: {mean_std(ece)} (target ≤ {TARGET_ECE}) "
          f"{mark(statistics.mean(ece) <= TARGET_ECE)}")  # fmt: skip
    print(f"head cost per one-product request, p50 / p99: {latency[0]:.2f} / {latency[1]:.2f} ms "
          f"(target p50 ≤ {TARGET_LATENCY_MS}) {mark(latency[0] <= TARGET_LATENCY_MS)}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("bench_quality", __doc__)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="split seeds (comma-separated)")
    args = parser.parse_args(argv)
    real = real_data_dir()
    if real is None:
        raise SystemExit("bench_quality needs the real sample: set RAKUTEN_REAL_DATA=/path/to/rakuten_real")
    with bench_stack() as settings, tempfile.TemporaryDirectory() as tmp:
        embedded = load_catalogue(settings, zip_real_sample(real, Path(tmp) / "real.zip"))
        print(f"real sample: {embedded.products} products embedded ({embedded.items_per_s} items/s)")
        print(f"default head: {settings.head_kind}, {settings.tune_trials} trials per seed")
        results = {}
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.monotonic()
            results[seed] = evaluate_seed(settings, seed)
            print(f"seed {seed}: best {results[seed].best}; {time.monotonic() - t0:.0f} s", flush=True)
        report(results, head_latency(results[min(results)]))


if __name__ == "__main__":
    main()
