"""Dashboard logic without a browser: figure builders, page renderers, the data layer's pure parts, and
every page's content function against services that are down."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.utils import PlotlyJSONEncoder

from dash_app import figures
from dash_app.app import create_app, page_for
from dash_app.data import (
    Catalogue,
    DataSource,
    RunDetails,
    SimilarityIndex,
    TTLCache,
    Unavailable,
    decode_upload,
    sample_per_class,
    tidy_predictions,
)
from dash_app.pages import catalogue, monitoring, predict, training
from lib.settings import Settings

SHA = "ab" * 32
TOP5 = [
    {"prdtypecode": 2583, "class_name": "Piscine et spa", "score": 0.62},
    {"prdtypecode": 2582, "class_name": "Mobilier de jardin", "score": 0.2},
    {"prdtypecode": 1560, "class_name": "Mobilier", "score": 0.08},
    {"prdtypecode": 2060, "class_name": "Décoration", "score": 0.05},
    {"prdtypecode": 1302, "class_name": "Jeux d'extérieur", "score": 0.02},
]
RESPONSE = {
    "prdtypecode": 2583,
    "class_name": "Piscine et spa",
    "confidence": 0.62,
    "top5": TOP5,
    "model_name": "rakuten-fusion",
    "model_version": "3",
    "abstained": False,
}


def text_of(component) -> str:
    """Everything a component tree would send to the browser, as one string (to search in)."""
    return json.dumps(component, cls=PlotlyJSONEncoder, ensure_ascii=False)


def message_of(fig: go.Figure) -> str:
    """The explanatory text of an empty figure ('' when the figure has data)."""
    return " ".join(a.text for a in fig.layout.annotations) if not fig.data else ""


def predictions_frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    confidence = rng.uniform(0.2, 1.0, n)
    return pd.DataFrame(
        {
            "timestamp": pd.to_datetime([now - timedelta(minutes=float(m)) for m in rng.uniform(0, 600, n)]),
            "model_version": rng.choice(["1", "2"], n),
            "has_text": True,
            "has_image": rng.random(n) > 0.3,
            "prdtypecode": rng.choice([10, 40, 2583], n),
            "confidence": confidence,
            "abstained": confidence < 0.5,
            "input_hash": [f"{i:064x}" for i in range(n)],
            "latency_ms": rng.uniform(20, 200, n),
            "batch_size": rng.integers(1, 17, n),
        }
    ).sort_values("timestamp", ignore_index=True)


def free_port() -> int:
    """A port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def empty_catalogue() -> Catalogue:
    return Catalogue(0, 0, 0, {}, [], pd.DataFrame())


# --- figures ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: figures.class_distribution_figure({}), "No labelled products"),
        (lambda: figures.top5_figure([]), "no class scores"),
        (lambda: figures.f1_history_figure(pd.DataFrame(columns=["start", "test_f1_macro"])), "No finished"),
        (lambda: figures.per_class_f1_figure(None), "per_class_test.csv"),
        (lambda: figures.ablation_figure(None), "No ablation"),
        (lambda: figures.predictions_timeline_figure(pd.DataFrame(), timedelta(hours=1)), "No prediction"),
        (lambda: figures.class_mix_figure(pd.Series(dtype=int), {}), "No prediction"),
        (lambda: figures.confidence_histogram_figure(pd.DataFrame()), "No prediction"),
        (lambda: figures.serving_figure(pd.DataFrame(), timedelta(hours=1)), "No prediction"),
    ],
)
def test_empty_inputs_give_a_figure_that_says_why(build, expected):
    fig = build()
    assert not fig.data
    assert expected in message_of(fig)


def test_class_distribution_has_one_bar_per_class_largest_on_top():
    fig = figures.class_distribution_figure({10: 5, 40: 20, 2583: 12})
    (bar,) = fig.data
    assert bar.type == "bar" and bar.orientation == "h"
    assert list(bar.x) == [5, 12, 20]  # plotly draws the last bar on top
    assert bar.y[-1].startswith("40 ·")


def test_top5_and_gauge_show_the_prediction():
    (bar,) = figures.top5_figure(TOP5).data
    assert len(bar.x) == 5 and bar.x[-1] == pytest.approx(0.62)
    assert bar.y[-1].startswith("2583 ·")
    (gauge,) = figures.confidence_gauge(0.62, 0.5).data
    assert gauge.type == "indicator" and gauge.value == pytest.approx(62)
    assert gauge.gauge.steps[0].range == (0, 50)


def test_f1_history_has_both_scores_and_the_production_line():
    runs = pd.DataFrame(
        {
            "start": pd.to_datetime(["2026-01-01 10:00", "2026-01-02 10:00", "2026-01-03 10:00"], utc=True),
            "test_f1_macro": [0.6, 0.7, None],  # the last run is still running: left out
            "test_f1_weighted": [0.65, 0.72, None],
            "version": ["1", None, None],
        }
    )
    fig = figures.f1_history_figure(runs, production_f1=0.6)
    assert [t.name for t in fig.data] == ["test F1-macro", "test weighted F1"]
    assert len(fig.data[0].x) == 2 and list(fig.data[0].text) == ["v1", ""]
    assert fig.layout.shapes[0].y0 == pytest.approx(0.6)


def test_per_class_and_ablation_figures():
    per_class = pd.DataFrame(
        {"prdtypecode": [10, 40], "name": ["a", "b"], "f1": [0.9, 0.3], "support": [5, 7]}
    )
    (bar,) = figures.per_class_f1_figure(per_class).data
    assert list(bar.x) == [0.9, 0.3] and bar.marker.color == (figures.GOOD, figures.BAD)
    scores = {"text": 0.7, "image": 0.4, "fusion": 0.75}
    ablation = {m: {"f1_macro": f, "f1_weighted": f, "accuracy": f} for m, f in scores.items()}
    fig = figures.ablation_figure(ablation)
    assert [t.name for t in fig.data] == ["f1 macro", "f1 weighted", "accuracy"]
    assert list(fig.data[0].x) == ["text", "image", "fusion"]


def test_serving_series_per_bucket():
    start = pd.Timestamp("2026-12-01 10:00", tz="UTC")
    frame = pd.DataFrame({
        "timestamp": [start + pd.Timedelta(seconds=s) for s in (0, 10, 20, 30, 70)],
        "latency_ms": [10.0, 20.0, 30.0, 40.0, 50.0],
        "batch_size": [1, 1, 4, 4, 8],
    })  # fmt: skip
    old = frame.iloc[[0]].assign(latency_ms=np.nan)  # logged before the column existed: skipped
    series = figures.serving_series(pd.concat([frame, old]), "1min")
    assert series["requests_per_s"].tolist() == pytest.approx([4 / 60, 1 / 60])
    assert series["p50_ms"].tolist() == pytest.approx([25.0, 50.0])
    assert series["p99_ms"].iloc[0] == pytest.approx(39.7)
    assert series["mean_batch"].tolist() == pytest.approx([2.5, 8.0])


def test_monitoring_figures():
    frame = predictions_frame()
    timeline = figures.predictions_timeline_figure(frame, timedelta(hours=12))
    assert [t.type for t in timeline.data] == ["bar", "scatter"]
    assert sum(timeline.data[0].y) == len(frame)
    mix = figures.class_mix_figure(frame["prdtypecode"], {10: 30, 40: 50, 2583: 20, 60: 0})
    assert [t.name for t in mix.data] == ["training data", "predictions"]
    assert sum(mix.data[1].y) == pytest.approx(1.0)
    histogram = figures.confidence_histogram_figure(frame)
    assert {t.name for t in histogram.data} == {"answered", "abstained"}
    serving = figures.serving_figure(frame, timedelta(hours=12))
    assert [t.name for t in serving.data] == ["requests/s", "p50", "p99", "mean batch"]
    assert figures.time_bucket(timedelta(hours=1)) == "1min"
    assert figures.time_bucket(timedelta(days=1)) == "30min"


# --- page renderers --------------------------------------------------------------------------------
def test_catalogue_pages_explain_an_empty_lake():
    assert "No products yet" in text_of(catalogue.render_summary(empty_catalogue(), "incoming"))
    assert "s3://incoming/" in text_of(catalogue.render_summary(empty_catalogue(), "incoming"))
    assert "Choose a class" in text_of(catalogue.render_grid(empty_catalogue(), None))


def test_catalogue_summary_and_grid_with_products():
    samples = pd.DataFrame(
        {
            "productid": [1, 2],
            "prdtypecode": [10, 10],
            "designation_clean": ["Le livre", "Un autre"],
            "description_clean": ["", "desc"],
            "image_sha256": [SHA, None],
            "has_image": [True, False],
        }
    )
    manifest = {
        "batch_id": "b1",
        "committed_at": "2026-01-01T00:00:00+00:00",
        "accepted": 2,
        "rejected": 1,
        "rejected_by_reason": {"empty_designation": 1},
        "kept_without_image_by_reason": {},
    }
    cat = Catalogue(2, 2, 1, {10: 2}, [manifest], samples)
    summary = text_of(catalogue.render_summary(cat, "incoming"))
    assert "empty_designation" in summary and "50.0%" in summary and "b1" in summary
    grid = text_of(catalogue.render_grid(cat, 10))
    assert f"/lake-image/{SHA}" in grid and "no image" in grid and "Le livre" in grid
    assert catalogue.class_options(cat)[0]["value"] == 10


def test_training_page_explains_an_empty_registry():
    text = text_of(training.render_summary(None, None, pd.DataFrame(columns=["run_id", "start"])))
    assert "No production model yet" in text and "No training run yet" in text
    details = text_of(training.render_run(RunDetails("r1", None, {}, {})))
    assert "no best_* parameters" in details and "No confusion matrix" in details
    assert training.fmt_param("0.002160082074140205") == "0.00216" and training.fmt_param("64") == "64"


def test_monitoring_page_explains_no_predictions_and_no_report():
    empty = tidy_predictions(pd.DataFrame(), datetime.now(UTC), 10)
    drift = monitoring.render_drift(None)
    text = text_of(monitoring.render_monitoring(empty, timedelta(days=1), {}, drift, 10))
    assert "No prediction logged in this window" in text and "No drift report yet" in text


def test_monitoring_page_with_predictions_and_a_drift_report():
    report = {
        "created_at": "2026-01-01T00:00:00+00:00",
        "window": {"start": "2025-12-31T00:00:00+00:00", "end": "2026-01-01T00:00:00+00:00"},
        "model_version": "2",
        "drifted": True,
        "signals": [
            {"name": "class_mix_psi", "value": 0.3, "threshold": 0.2, "drifted": True, "detail": "2583"},
            {"name": "image_embedding_auc", "value": None, "threshold": 0.75, "drifted": False, "detail": ""},
        ],
    }
    drift = text_of(monitoring.render_drift(report))
    assert "drift detected" in drift and "class_mix_psi" in drift and "no verdict" in drift
    # The monitor job's own shape: window_hours, verdict, predictions.
    too_few = {"created_at": "2026-01-01T00:00:00+00:00", "window_hours": 24.0, "model_version": "2",
               "predictions": 3, "verdict": "not enough data", "drifted": False, "signals": []}  # fmt: skip
    text = text_of(monitoring.render_drift(too_few))
    assert "not enough data" in text and "window 24 h" in text and "3 predictions" in text
    frame = predictions_frame()
    content = text_of(monitoring.render_monitoring(frame, timedelta(days=1), {10: 1}, None, 5))
    assert content.count("input_hash") == 0 and "Recent predictions" in content
    only_v2 = monitoring.filter_version(frame, "2")
    assert set(only_v2["model_version"]) == {"2"}
    assert [o["value"] for o in monitoring.version_options(frame)] == ["all", "1", "2"]


def test_predict_renders_the_answer_and_validates_before_calling_the_service():
    text = text_of(predict.render_prediction(RESPONSE, 0.5))
    assert "2583" in text and "Piscine et spa" in text and "rakuten-fusion v3" in text
    abstained = text_of(predict.render_prediction({**RESPONSE, "abstained": True}, 0.5))
    assert "abstained" in abstained
    data = DataSource(Settings(serve_port=free_port()))
    children, query = predict.predict_content(data, "  ", None, None)
    assert query is None and "Enter a title" in text_of(children)
    children, query = predict.predict_content(data, "x", None, "data:image/png;base64,bm90IGFuIGltYWdl")
    assert query is None and "not a usable image" in text_of(children)


# --- data layer ------------------------------------------------------------------------------------
def test_ttl_cache_expires_and_never_caches_errors():
    cache = TTLCache(ttl_s=0.2)
    calls = []
    assert cache.get("k", lambda: calls.append(1) or len(calls)) == 1
    assert cache.get("k", lambda: calls.append(1) or len(calls)) == 1
    time.sleep(0.25)
    assert cache.get("k", lambda: calls.append(1) or len(calls)) == 2

    def boom():
        raise Unavailable("down")

    with pytest.raises(Unavailable):
        cache.get("e", boom)
    assert cache.get("e", lambda: "up") == "up"


def test_ttl_cache_computes_once_for_concurrent_callers():
    cache = TTLCache(ttl_s=60)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return "value"

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: cache.get("k", slow), range(4))) == ["value"] * 4
    assert len(calls) == 1


def test_tidy_predictions_filters_caps_and_normalises():
    now = datetime.now(UTC)
    epoch = [(now - timedelta(hours=h)).timestamp() for h in (30, 2, 1)]
    frame = pd.DataFrame({"timestamp": epoch, "model_version": [1, 2, None], "abstained": [None, True, False],
                          "confidence": [0.1, 0.2, 0.3]})  # fmt: skip
    tidy = tidy_predictions(frame, now - timedelta(days=1), max_rows=1)
    assert len(tidy) == 1 and tidy["confidence"].iloc[0] == pytest.approx(0.3)  # the newest row kept
    assert str(tidy["timestamp"].dt.tz) == "UTC" and tidy["model_version"].iloc[0] == "?"
    assert tidy["abstained"].dtype == bool


def test_sample_per_class_is_bounded_stable_and_prefers_images():
    products = pd.DataFrame(
        {"productid": range(100), "prdtypecode": [10, 40] * 50, "has_image": [i % 3 != 0 for i in range(100)]}
    )
    sample = sample_per_class(products, 5)
    assert sample.groupby("prdtypecode").size().to_dict() == {10: 5, 40: 5}
    assert sample["has_image"].all()
    assert sample["productid"].tolist() == sample_per_class(products, 5)["productid"].tolist()


def test_similarity_index_ranks_by_mean_cosine_over_the_query_modalities():
    text = np.eye(3, 4, dtype=np.float32)
    image = np.zeros((3, 2), np.float32)
    image[2] = [1, 0]
    products = pd.DataFrame(
        {
            "productid": [1, 2, 3],
            "prdtypecode": [10, 40, 60],
            "designation": list("abc"),
            "image_sha256": [None, None, SHA],
            "has_image": [False, False, True],
        }
    )
    index = SimilarityIndex(products, text, image, total=3)
    assert index.top(np.array([0, 1, 0, 0], np.float32), None, 2)["productid"].tolist()[0] == 2
    both = index.top(np.array([0, 0, 1, 0], np.float32), np.array([1, 0], np.float32), 1)
    assert both["productid"].tolist() == [3] and both["similarity"].iloc[0] == pytest.approx(1.0)
    assert index.top(None, None, 3).empty


def test_decode_upload():
    assert decode_upload("data:image/png;base64,aGk=") == b"hi"
    assert decode_upload(None) is None


# --- a system that is down -------------------------------------------------------------------------
def test_every_page_explains_services_that_are_down():
    down = Settings(s3_port=free_port(), mlflow_port=free_port(), serve_port=free_port())
    data = DataSource(down)
    t0 = time.monotonic()
    summary, options, value = catalogue.summary_content(data)
    assert "S3 object store is not reachable" in text_of(summary) and options == [] and value is None
    assert "not reachable" in text_of(catalogue.grid_content(data, 10))
    summary, options, value = training.summary_content(data)
    assert "MLflow tracking server is not reachable" in text_of(summary) and value is None
    assert "not reachable" in text_of(training.run_content(data, "some-run"))
    content, options = monitoring.monitoring_content(data, "24h", "all")
    assert "not reachable" in text_of(content) and options[0]["value"] == "all"
    children, query = predict.predict_content(data, "Chaise de jardin", "", None)
    assert "prediction service (Ray Serve) is not reachable" in text_of(children) and query is None
    assert "after a prediction" in text_of(predict.similar_content(data, None, None))
    assert "not reachable" in text_of(
        predict.similar_content(data, {"designation": "x", "description": ""}, None)
    )
    assert time.monotonic() - t0 < 10  # probes, not client retry loops


def test_the_app_builds_without_touching_any_service_and_serves_its_routes():
    down = Settings(s3_port=free_port(), mlflow_port=free_port(), serve_port=free_port())
    app = create_app(down)
    assert page_for("/") is predict and page_for("/training/") is training and page_for("/nope") is None
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    assert client.get("/lake-image/not-a-sha").status_code == 404
    assert client.get(f"/lake-image/{SHA}").status_code == 404  # S3 down: a missing image, not a 500
