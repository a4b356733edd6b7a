"""Tune the fusion head (Ray Tune: OptunaSearch TPE + ASHA), log to MLflow, register, promote if better.

``python -m jobs.train [--trials N] [--max-epochs E] [--force]`` (the stage itself: ``lib.model.stage``)
"""

from __future__ import annotations

import argparse

from jobs.common import connect_ray, run_cli
from lib.data.storage import s3_client
from lib.model.stage import TrainOutcome, run_train_stage
from lib.ops.preflight import require
from lib.settings import Settings, get_settings


def run(
    settings: Settings | None = None,
    trials: int | None = None,
    max_epochs: int | None = None,
    force: bool = False,
) -> TrainOutcome:
    """The train stage against the configured stack."""
    settings = settings or get_settings()
    require(settings, "s3", "mlflow")
    connect_ray(settings)
    return run_train_stage(settings, s3_client(settings), trials, max_epochs, force)


def describe(out: TrainOutcome) -> str:
    """One line for people."""
    if out.skipped:
        return f"nothing to train: {out.reason}"
    verdict = "PROMOTED" if out.decision.promoted else "not promoted"
    return (
        f"version {out.version}: test F1-macro {out.test['f1_macro']:.4f}, "
        f"weighted F1 {out.test['f1_weighted']:.4f}, accuracy {out.test['accuracy']:.4f}; "
        f"ablation {out.ablation}; tuning {out.tune_seconds:.0f} s; {verdict} ({out.decision.reason})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="train even if the embeddings did not change")
    args = parser.parse_args(argv)

    def act() -> int:
        print(describe(run(trials=args.trials, max_epochs=args.max_epochs, force=args.force)))
        return 0

    return run_cli("train", act)


if __name__ == "__main__":
    raise SystemExit(main())
