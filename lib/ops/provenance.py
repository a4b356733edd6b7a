"""Where a model came from: the code version."""

from __future__ import annotations

import subprocess

from lib.settings import PROJECT_ROOT, Settings


def git_sha(settings: Settings) -> str:
    """The code's git commit: from settings (captured at submit time) or the working tree's ``.git``."""
    if settings.git_sha:
        return settings.git_sha
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    return out.stdout.strip() + ("-dirty" if dirty else "")
