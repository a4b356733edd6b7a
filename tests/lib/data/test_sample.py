"""The synthetic sample: official layout, class balance, determinism, a learnable but not trivial signal."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from lib.data.rakuten import (
    OFFICIAL_CLASS_COUNTS,
    X_COLUMNS,
    X_FILE,
    X_TEST_FILE,
    Y_COLUMNS,
    Y_FILE,
    image_member_name,
)
from lib.data.sample import SampleSpec, class_counts, generate_catalogue, render_image, write_sample_zip

# Small images keep the suite fast; the signal does not depend on the size.
IMAGE_SIZE = 32


def _write(tmp_path: Path, name: str, spec: SampleSpec) -> tuple[Path, pd.DataFrame]:
    path = tmp_path / name
    return path, write_sample_zip(spec, path)


def _split(n: int, fraction: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(0).permutation(n)
    cut = int(fraction * n)
    return order[:cut], order[cut:]


@pytest.fixture(scope="module")
def sample_600(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    spec = SampleSpec(600, seed=7, image_size=IMAGE_SIZE)
    return _write(tmp_path_factory.mktemp("s600"), "sample.zip", spec)


@pytest.fixture(scope="module")
def sample_1500(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    spec = SampleSpec(1500, seed=11, image_size=IMAGE_SIZE)
    return _write(tmp_path_factory.mktemp("s1500"), "sample.zip", spec)


def test_zip_has_the_official_layout(sample_600: tuple[Path, pd.DataFrame]) -> None:
    path, catalogue = sample_600
    with zipfile.ZipFile(path) as archive:
        x_raw = archive.read(X_FILE).decode("utf-8")
        y_raw = archive.read(Y_FILE).decode("utf-8")
        x = pd.read_csv(io.StringIO(x_raw), index_col=0)
        y = pd.read_csv(io.StringIO(y_raw), index_col=0)
        infos = {info.filename: info for info in archive.infolist()}

    assert x_raw.splitlines()[0] == "," + ",".join(X_COLUMNS)
    assert y_raw.splitlines()[0] == "," + ",".join(Y_COLUMNS)
    assert tuple(x.columns) == X_COLUMNS
    assert tuple(y.columns) == Y_COLUMNS
    assert list(x.index) == list(range(600)) == list(y.index)
    assert x["productid"].is_unique and x["imageid"].is_unique
    assert (x["productid"] > 0).all() and (x["imageid"] > 0).all()
    assert x["productid"].astype(str).str.len().eq(9).all()
    assert x["imageid"].astype(str).str.len().eq(10).all()
    assert x["designation"].tolist() == catalogue["designation"].tolist()
    assert y["prdtypecode"].tolist() == catalogue["prdtypecode"].tolist()
    # Empty descriptions read back as NaN, like in the official file.
    assert x["description"].fillna("").tolist() == catalogue["description"].tolist()
    assert infos[X_FILE].compress_type == zipfile.ZIP_DEFLATED
    assert all(
        info.compress_type == zipfile.ZIP_STORED for name, info in infos.items() if name.endswith(".jpg")
    )


def test_all_classes_with_official_imbalance(sample_600: tuple[Path, pd.DataFrame]) -> None:
    _, catalogue = sample_600
    sizes = catalogue["prdtypecode"].value_counts()
    assert set(sizes.index) == set(OFFICIAL_CLASS_COUNTS)
    assert 8 <= sizes.max() / sizes.min() <= 20
    assert sizes.idxmax() == max(OFFICIAL_CLASS_COUNTS, key=OFFICIAL_CLASS_COUNTS.__getitem__)


@pytest.mark.parametrize("products", [1, 26, 27, 53, 54, 100, 600, 2000])
def test_class_counts_sum_and_minimum(products: int) -> None:
    counts = class_counts(products)
    assert sum(counts.values()) == products
    if products >= 54:
        assert min(counts.values()) >= 2
    elif products >= 27:
        assert min(counts.values()) >= 1


def test_every_product_has_a_readable_image(sample_600: tuple[Path, pd.DataFrame]) -> None:
    path, catalogue = sample_600
    with zipfile.ZipFile(path) as archive:
        images = {name for name in archive.namelist() if name.endswith(".jpg")}
        expected = {
            image_member_name(i, p) for i, p in zip(catalogue["imageid"], catalogue["productid"], strict=True)
        }
        assert images == expected
        for name in sorted(expected)[:50]:
            with Image.open(archive.open(name)) as image:
                assert image.format == "JPEG"
                assert image.mode == "RGB"
                assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    spec = SampleSpec(80, seed=3, image_size=24)
    first, _ = _write(tmp_path, "a.zip", spec)
    second, _ = _write(tmp_path, "b.zip", spec)
    buffer = io.BytesIO()
    write_sample_zip(spec, buffer)
    other, _ = _write(tmp_path, "c.zip", SampleSpec(80, seed=4, image_size=24))
    assert first.read_bytes() == second.read_bytes() == buffer.getvalue()
    assert first.read_bytes() != other.read_bytes()


def test_descriptions_include_empty_and_html(sample_600: tuple[Path, pd.DataFrame]) -> None:
    _, catalogue = sample_600
    descriptions = catalogue["description"]
    empty = descriptions.eq("").mean()
    html = descriptions.str.contains("<p>|<br />|<b>", regex=True)
    entities = descriptions.str.contains("&eacute;|&amp;|&nbsp;|&#39;", regex=True)
    assert 0.2 < empty < 0.4
    assert html.sum() > 20 and entities.sum() > 20
    assert 0.1 < html[descriptions.ne("")].mean() < 0.3
    words = catalogue["designation"].str.split().str.len()
    assert words.min() >= 4


def test_top_folder_prefixes_every_member(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, "t.zip", SampleSpec(30, image_size=16, top_folder="rakuten"))
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert f"rakuten/{X_FILE}" in names and f"rakuten/{Y_FILE}" in names
    assert all(name.startswith("rakuten/") for name in names)
    assert sum(name.startswith("rakuten/images/image_train/") for name in names) == 30


def test_unlabelled_is_the_challenges_test_layout(tmp_path: Path) -> None:
    path, catalogue = _write(tmp_path, "u.zip", SampleSpec(30, image_size=16, with_labels=False))
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert X_TEST_FILE in names and X_FILE not in names
    assert not any(name.endswith(Y_FILE) for name in names)
    assert sum(name.startswith("images/image_test/image_") for name in names) == 30
    assert "prdtypecode" in catalogue.columns  # the ground truth is still returned to the caller


def test_catalogue_does_not_depend_on_image_settings() -> None:
    small = generate_catalogue(SampleSpec(100, seed=5, image_size=16, label_noise_images=0.0))
    large = generate_catalogue(SampleSpec(100, seed=5, image_size=64))
    pd.testing.assert_frame_equal(small, large)


def test_render_image_is_rgb_of_the_requested_size() -> None:
    image = render_image(2583, np.random.default_rng(0), 40)
    assert image.mode == "RGB" and image.size == (40, 40)


def test_invalid_spec_is_rejected() -> None:
    with pytest.raises(ValueError):
        SampleSpec(0)
    with pytest.raises(ValueError):
        SampleSpec(10, html_rate=1.5)


def test_text_is_learnable_but_not_trivial(sample_1500: tuple[Path, pd.DataFrame]) -> None:
    _, catalogue = sample_1500
    text = (catalogue["designation"] + " " + catalogue["description"]).tolist()
    labels = catalogue["prdtypecode"].to_numpy()
    train, test = _split(len(labels))
    features = TfidfVectorizer().fit_transform(text)
    model = LogisticRegression(max_iter=2000).fit(features[train], labels[train])
    score = f1_score(labels[test], model.predict(features[test]), average="macro")
    assert 0.4 < score < 0.97


def test_image_mean_colour_carries_class_signal(sample_1500: tuple[Path, pd.DataFrame]) -> None:
    path, catalogue = sample_1500
    with zipfile.ZipFile(path) as archive:
        members = [
            image_member_name(i, p) for i, p in zip(catalogue["imageid"], catalogue["productid"], strict=True)
        ]
        means = np.array(
            [np.asarray(Image.open(archive.open(m)), dtype=np.float64).mean(axis=(0, 1)) for m in members]
        )
    labels = catalogue["prdtypecode"].to_numpy()
    train, test = _split(len(labels))
    classes = np.unique(labels[train])
    centroids = np.array([means[train][labels[train] == c].mean(axis=0) for c in classes])
    distances = ((means[test][:, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)
    accuracy = (classes[distances.argmin(axis=1)] == labels[test]).mean()
    majority = pd.Series(labels[test]).value_counts(normalize=True).iloc[0]
    # Chance is 1/27 ≈ 0.04 and always answering the largest class scores about 0.12.
    assert accuracy > max(0.2, majority + 0.05)
    assert accuracy < 0.95
