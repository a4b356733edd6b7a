"""Tuning cost: 20 trials with ASHA early stopping versus the same 20 trials run to the end (FIFO).

FIFO replays the configurations ASHA's search sampled (same trials, same order); each trial keeps the
training recipe's own patience on val loss, so "to the end" means max_epochs or that patience. One run,
same data: wall time ratio ASHA/FIFO (target ≤ 0.5) and the best configuration's test F1-macro for each
(target: within 0.01). On the real sample (if present) and on 20k generated products; also the ablation
(text / image / lexical / fusion / fusion + lexical) of ASHA's best configuration. Embeddings come from
the real pipeline (ingest + embed) in a stack of the benchmark's own.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import mlflow

from benchmarks.common import bench_parser, bench_stack, print_table, real_data_dir, zip_real_sample
from jobs import embed as embed_job
from jobs import ingest as ingest_job
from lib.data import layout
from lib.data.sample import SampleSpec, write_sample_zip
from lib.data.storage import delete_prefix, s3_client
from lib.features.embed import EmbedRun
from lib.model.dataset import load_dataset
from lib.model.evaluate import evaluate_ablation, fit_and_test
from lib.model.train import TrainConfig
from lib.model.tune import tune_head

TRIALS = 20


def load_catalogue(settings, zip_path: Path) -> EmbedRun:
    """Reset the lake, ingest and embed one ZIP; returns the embed manifest."""
    client = s3_client(settings)
    for prefix in (layout.BATCHES, layout.IMAGES, layout.EMBEDDINGS, layout.ARCHIVE, layout.PIPELINE):
        delete_prefix(client, settings.bucket_lake, prefix)
    client.upload_file(str(zip_path), settings.bucket_incoming, zip_path.name)
    ingest_job.run(f"s3://{settings.bucket_incoming}/{zip_path.name}", settings)
    return embed_job.run(settings)


def compare(settings, name: str) -> tuple[list[list[object]], dict]:
    """ASHA vs FIFO on the catalogue in the lake; returns table rows and the ablation of ASHA's best."""
    data, lineage = load_dataset(s3_client(settings), settings)
    mlflow.set_tracking_uri(settings.mlflow_uri)
    experiment = mlflow.set_experiment(f"{settings.mlflow_experiment}-bench")
    base = TrainConfig(
        max_epochs=settings.tune_max_epochs, patience=settings.early_stop_patience, seed=settings.tune_seed
    )
    rows, ablation, asha_configs = [], {}, None
    for scheduler in ("asha", "fifo"):
        with mlflow.start_run(run_name=f"bench-{name}-{scheduler}") as parent:
            t0 = time.perf_counter()
            best = tune_head(
                settings,
                data,
                parent.info.run_id,
                experiment.experiment_id,
                TRIALS,
                settings.tune_max_epochs,
                scheduler,
                replay=asha_configs,  # FIFO trains exactly the configurations ASHA tried
            )
            seconds = time.perf_counter() - t0
        asha_configs = asha_configs or best.configs
        test = fit_and_test(data, best.config, base).report
        rows.append(
            [
                name,
                scheduler,
                lineage["products"],
                TRIALS,
                best.stopped_early,
                seconds,
                best.val_f1_macro,
                test["f1_macro"],
                test["f1_weighted"],
            ]
        )
        if scheduler == "asha":
            ablation = evaluate_ablation(data, best.config, base, test)
    return rows, ablation


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("bench_train", __doc__)
    parser.add_argument("--generated", type=int, default=20_000, help="generated products (0: skip)")
    args = parser.parse_args(argv)
    results, ablations = [], {}
    with bench_stack() as settings, tempfile.TemporaryDirectory() as tmp:
        real = real_data_dir()
        catalogues = []
        if real:
            catalogues.append(("real-sample", zip_real_sample(real, Path(tmp) / "real.zip")))
        if args.generated:
            generated = Path(tmp) / f"generated-{args.generated}.zip"
            write_sample_zip(SampleSpec(products=args.generated, seed=20_000, image_size=128), generated)
            catalogues.append((f"generated-{args.generated}", generated))
        for name, path in catalogues:
            embedded = load_catalogue(settings, path)
            print(f"{name}: {embedded.products} products embedded ({embedded.items_per_s} items/s)")
            rows, ablations[name] = compare(settings, name)
            results.extend(rows)
    print_table(
        f"Tuning: {TRIALS} trials, ASHA vs FIFO (same seed)",
        [
            "catalogue",
            "scheduler",
            "products",
            "trials",
            "stopped early",
            "wall s",
            "best val F1",
            "test F1-macro",
            "test F1-weighted",
        ],
        results,
    )
    for i in range(0, len(results), 2):
        asha, fifo = results[i], results[i + 1]
        print(
            f"{asha[0]}: wall time ASHA/FIFO = {asha[5] / fifo[5]:.2f} (target ≤ 0.5); "
            f"test F1-macro ASHA − FIFO = {asha[7] - fifo[7]:+.4f} (target within 0.01)"
        )
    print_table(
        "Ablation on the held-out test split (ASHA's best configuration)",
        ["catalogue", "inputs", "test F1-macro", "test F1-weighted", "accuracy", "ECE", "ECE calibrated"],
        [
            [name, m, v["f1_macro"], v["f1_weighted"], v["accuracy"], v["ece_before"], v["ece_after"]]
            for name, ab in ablations.items()
            for m, v in ab.items()
        ],
    )


if __name__ == "__main__":
    main()
