"""Model quality: what the lexical (TF-IDF) branch adds, on held-out test splits of several split seeds.

The real sample (``RAKUTEN_REAL_DATA``) and a generated one (sanity, not a target) are ingested and
embedded once by the real jobs in a stack of the benchmark's own. Then, per split seed: the TF-IDF block
is fitted on that seed's training split, the head is tuned there (OptunaSearch + ASHA, as the train job
does), and every ablation head is trained with the best configuration: text-only, image-only, lexical-only,
dense fusion, dense fusion + lexical. Printed: test F1-macro, weighted F1 and expected calibration error
(before / after temperature scaling fitted on validation) per head and seed, then mean ± std over seeds
and the gain of the lexical branch over dense fusion on the same split. On the real sample, F1-macro on
the test products that have both a text and an image is shown too (the subset most papers report).

Serving cost of the branch: p50 / p99 latency of one single-product prediction (texts → TF-IDF → head)
against the dense head, in process: the only work the branch adds to a request.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np

from benchmarks.bench_train import load_catalogue
from benchmarks.common import bench_parser, bench_stack, print_table, real_data_dir, zip_real_sample
from lib.data.sample import SampleSpec, write_sample_zip
from lib.data.storage import s3_client
from lib.model import metrics
from lib.model.dataset import load_dataset
from lib.model.evaluate import ablation_variants, fit_and_test
from lib.model.metrics import ABLATION_ROWS
from lib.model.network import load_trained, predict_logits
from lib.model.split import TEST
from lib.model.train import TrainConfig
from lib.model.tune import tune_head
from lib.settings import Settings

TARGET_F1 = 0.72
TARGET_GAIN = 0.04
LATENCY_CALLS = 200


def evaluate_seed(settings: Settings, seed: int, trials: int) -> tuple[dict[str, dict], dict]:
    """Tune on this split seed and score every ablation head on its test split."""
    settings = settings.model_copy(update={"split_seed": seed})
    data, _ = load_dataset(s3_client(settings), settings)
    mlflow.set_tracking_uri(settings.mlflow_uri)
    experiment = mlflow.set_experiment(f"{settings.mlflow_experiment}-bench-quality")
    with mlflow.start_run(run_name=f"quality-seed{seed}") as parent:
        best = tune_head(
            settings, data, parent.info.run_id, experiment.experiment_id, trials, settings.tune_max_epochs
        )
    base = TrainConfig(max_epochs=settings.tune_max_epochs, patience=settings.early_stop_patience, seed=0)
    text, image, y_test = data.part(TEST)
    paired = (np.abs(text).sum(1) > 0) & (np.abs(image).sum(1) > 0)
    rows = {}
    for name, (modality, config) in ablation_variants(best.config, lexical=True).items():
        head = fit_and_test(data, config, base, modality)
        paired_f1 = metrics.summary(y_test[paired], head.predicted[paired])["f1_macro"]
        rows[name] = head.report | {"f1_macro_paired": paired_f1,
                                    "model": (head.model_config, head.result.state_dict)}  # fmt: skip
    return rows, {"data": data, "best": best.config}


def single_request_latency(data, heads: dict) -> dict[str, tuple[float, float]]:
    """p50 / p99 ms of one-product predictions from the raw text, per head (dense vs lexical)."""
    text, image, _ = data.part(TEST)
    texts = data.texts_part(TEST)
    out = {}
    for name, (model_config, state_dict) in heads.items():
        model = load_trained(model_config, state_dict)
        times = []
        for i in range(LATENCY_CALLS):
            j = i % len(texts)
            t0 = time.perf_counter()
            rows = data.lexical_features.transform([texts[j]]) if model_config.uses_lexical else None
            predict_logits(model, text[j : j + 1], image[j : j + 1], rows)
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = (float(np.percentile(times, 50)), float(np.percentile(times, 99)))
    return out


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}"


def report(name: str, per_seed: dict[int, dict[str, dict]], latency: dict) -> None:
    seeds = sorted(per_seed)
    rows = [
        [seed, head, r["f1_macro"], r["f1_weighted"], r["f1_macro_paired"], r["ece_before"], r["ece_after"]]
        for seed in seeds
        for head, r in sorted(per_seed[seed].items(), key=lambda kv: ABLATION_ROWS.index(kv[0]))
    ]
    print_table(
        f"{name}: ablation on the held-out test split, per split seed",
        ["seed", "head", "F1-macro", "F1-weighted", "F1-macro paired", "ECE", "ECE calibrated"],
        rows,
    )
    summary_rows = []
    for head in ABLATION_ROWS:
        values = [per_seed[s][head] for s in seeds if head in per_seed[s]]
        if values:
            keys = ("f1_macro", "f1_weighted", "f1_macro_paired", "ece_after")
            summary_rows.append([head, *(mean_std([v[k] for v in values]) for k in keys)])
    print_table(
        f"{name}: mean ± std over {len(seeds)} split seeds",
        ["head", "F1-macro", "F1-weighted", "F1-macro paired", "ECE calibrated"],
        summary_rows,
    )
    gains = [per_seed[s]["fusion_lexical"]["f1_macro"] - per_seed[s]["fusion"]["f1_macro"] for s in seeds]
    lexical = [per_seed[s]["fusion_lexical"]["f1_macro"] for s in seeds]
    print(
        f"{name}: fusion + lexical F1-macro {mean_std(lexical)} (target ≥ {TARGET_F1}); gain over dense "
        f"fusion {mean_std(gains)} per seed {[round(g, 4) for g in gains]} (target ≥ +{TARGET_GAIN})"
    )
    print(
        f"{name}: one-product prediction from raw text, p50 / p99 ms: "
        + "; ".join(f"{head} {p50:.2f} / {p99:.2f}" for head, (p50, p99) in latency.items())
    )


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("bench_quality", __doc__)
    parser.add_argument("--seeds", default="0,1,2", help="split seeds (comma-separated)")
    parser.add_argument("--trials", type=int, default=20, help="tuning trials per seed")
    parser.add_argument("--generated", type=int, default=20_000, help="generated products (0: skip)")
    parser.add_argument("--generated-seeds", default="0", help="split seeds for the generated sample")
    args = parser.parse_args(argv)
    with bench_stack() as settings, tempfile.TemporaryDirectory() as tmp:
        catalogues = []
        if real := real_data_dir():
            catalogues.append(("real-sample", zip_real_sample(real, Path(tmp) / "real.zip"), args.seeds))
        if args.generated:
            generated = Path(tmp) / f"generated-{args.generated}.zip"
            write_sample_zip(
                SampleSpec(products=args.generated, seed=args.generated, image_size=128), generated
            )
            catalogues.append((f"generated-{args.generated}", generated, args.generated_seeds))
        for name, path, seeds in catalogues:
            embedded = load_catalogue(settings, path)
            print(f"{name}: {embedded['products']} products embedded ({embedded['items_per_s']} items/s)")
            per_seed, latency = {}, {}
            for seed in (int(s) for s in seeds.split(",")):
                per_seed[seed], context = evaluate_seed(settings, seed, args.trials)
                if not latency:
                    heads = {h: per_seed[seed][h]["model"] for h in ("fusion", "fusion_lexical")}
                    latency = single_request_latency(context["data"], heads)
                print(f"{name} seed {seed}: best configuration {context['best']}")
            report(name, per_seed, latency)


if __name__ == "__main__":
    main()
