"""The make_sample CLI writes a ZIP and reports it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from jobs import make_sample
from lib.data.rakuten import X_FILE, X_TEST_FILE, Y_FILE


def test_main_writes_the_zip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nested" / "sample.zip"
    code = make_sample.main(["--out", str(out), "--products", "60", "--seed", "2", "--image-size", "16"])
    assert code == 0
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
    assert X_FILE in names and Y_FILE in names
    assert sum(name.endswith(".jpg") for name in names) == 60
    assert not list(tmp_path.glob("nested/*.part"))
    summary = capsys.readouterr().out.strip()
    assert "60 products" in summary and "27 classes" in summary and len(summary.splitlines()) == 1


def test_main_unlabelled_with_top_folder(tmp_path: Path) -> None:
    out = tmp_path / "u.zip"
    argv = ["--out", str(out), "--products", "30", "--image-size", "16", "--top-folder", "data"]
    argv.append("--unlabelled")
    assert make_sample.main(argv) == 0
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
    assert f"data/{X_TEST_FILE}" in names  # the challenge's test layout
    assert f"data/{Y_FILE}" not in names
