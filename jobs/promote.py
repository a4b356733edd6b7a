"""Registry operations by hand: show the aliases, or roll ``production`` back to ``previous``.

``python -m jobs.promote --rollback`` · ``python -m jobs.promote --show``
"""

from __future__ import annotations

import argparse

from mlflow import MlflowClient

from jobs.common import run_cli
from lib.model import registry
from lib.ops.preflight import require
from lib.settings import Settings, get_settings


def rollback(settings: Settings | None = None) -> tuple[str, str]:
    """Swap the ``production`` and ``previous`` aliases; returns (production, previous) after the swap."""
    settings = settings or get_settings()
    client = MlflowClient(settings.mlflow_uri)
    return registry.rollback(client, settings.registered_model_name)


def aliases(settings: Settings | None = None) -> dict[str, str]:
    """Alias → version of the registered model."""
    settings = settings or get_settings()
    return registry.aliases(MlflowClient(settings.mlflow_uri), settings.registered_model_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.promote", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--rollback", action="store_true", help="production ← previous (and back again)")
    group.add_argument("--show", action="store_true", help="print the aliases")
    args = parser.parse_args(argv)

    def act() -> int:
        require(get_settings(), "mlflow")
        if args.rollback:
            production, previous = rollback()
            print(f"rolled back: production → v{production}, previous → v{previous}")
        else:
            print(aliases())
        return 0

    return run_cli("promote", act)


if __name__ == "__main__":
    raise SystemExit(main())
