"""Serving logic without Ray: parsing and validation, scoring, top-5, auth, health, prediction-log rows."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from lib.data import layout
from lib.data.text import clean_text, product_text
from lib.ops import predlog
from lib.settings import PROJECT_ROOT, Settings
from serve import logic

SETTINGS = Settings(max_image_bytes=50_000, max_image_pixels=200 * 200, text_max_chars=20)
CARD = {"codes": [10, 40, 50, 60, 1140, 2583], "class_names": {"10": "Livres", "2583": "Piscine"}}


def jpeg(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def multipart(
    fields: dict[str, bytes], files: dict[str, bytes], boundary: str = "XbOuNdArY"
) -> tuple[bytes, str]:
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value + b"\r\n")
    for name, value in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="p.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
        )
        out.write(value + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def status_of(fn, *args) -> int:
    with pytest.raises(logic.InputError) as err:
        fn(*args)
    assert err.value.detail
    return err.value.status


# --- parsing ------------------------------------------------------------------------------------------


def test_multipart_fields_are_cleaned_exactly_as_in_training():
    image = jpeg()
    body, ctype = multipart(
        {"designation": b"Console <b>Xbox-360</b> &amp; manette", "description": ("é" * 40).encode()},
        {"image": image},
    )
    item = logic.parse_predict(body, ctype, SETTINGS)
    designation, description = clean_text("Console <b>Xbox-360</b> &amp; manette"), clean_text("é" * 40)
    assert item.designation == "Console Xbox-360 & manette"
    assert item.text == product_text(designation, description, SETTINGS.text_max_chars)
    assert item.image == image and item.has_text and item.has_image
    assert item.input_hash == predlog.input_hash(designation, description, image)


def test_json_text_only_image_only_and_data_url():
    text_only = logic.parse_predict(
        json.dumps({"designation": "Piscine tubulaire"}).encode(), "application/json", SETTINGS
    )
    assert text_only.has_text and not text_only.has_image and text_only.text == "Piscine tubulaire"
    b64 = base64.b64encode(jpeg()).decode()
    image_only = logic.parse_predict(json.dumps({"image_base64": b64}).encode(), "application/json", SETTINGS)
    assert image_only.has_image and not image_only.has_text
    data_url = logic.input_from_json({"image_base64": f"data:image/jpeg;base64,{b64}"}, SETTINGS)
    assert data_url.image == image_only.image


def test_an_empty_file_part_means_no_image():
    body, ctype = multipart({"designation": b"Livre"}, {"image": b""})
    assert not logic.parse_predict(body, ctype, SETTINGS).has_image


@pytest.mark.parametrize(
    ("body", "ctype", "status"),
    [
        (b"", "application/json", 422),  # empty body
        (b"", None, 422),
        (b"   ", "multipart/form-data; boundary=x", 422),
        (b"{}", "application/json", 422),  # neither modality
        (json.dumps({"designation": "  <p></p> ", "description": None}).encode(), "application/json", 422),
        (b"[1, 2]", "application/json", 422),  # not an object
        (b'{"designation": 3.5e', "application/json", 422),  # invalid JSON
        (b'{"designation": "caf\xe9"}', "application/json", 422),  # invalid UTF-8
        (json.dumps({"designation": ["a"]}).encode(), "application/json", 422),
        (json.dumps({"image_base64": "not base64!"}).encode(), "application/json", 422),
        (json.dumps({"image_base64": 12}).encode(), "application/json", 422),
        (
            json.dumps({"image_base64": base64.b64encode(b"plain text").decode()}).encode(),
            "application/json",
            415,
        ),
        (
            json.dumps({"image_base64": base64.b64encode(b"x" * 60_000).decode()}).encode(),
            "application/json",
            413,
        ),
        (b"designation=x", "application/x-www-form-urlencoded", 415),
        (b"hello", "text/plain", 415),
        (b"--x\r\nbroken", "multipart/form-data", 422),  # no boundary parameter
    ],
)
def test_bad_requests_get_a_clear_status(body, ctype, status):
    assert status_of(logic.parse_predict, body, ctype, SETTINGS) == status


def test_bad_multipart_inputs():
    body, ctype = multipart({"designation": b"caf\xe9"}, {})
    assert status_of(logic.parse_predict, body, ctype, SETTINGS) == 422  # invalid UTF-8 in a field
    body, ctype = multipart({"designation": b"Livre"}, {"image": b"%PDF-1.4 not an image"})
    assert status_of(logic.parse_predict, body, ctype, SETTINGS) == 415
    big = io.BytesIO()
    Image.new("RGB", (400, 400)).save(big, "PNG")  # few bytes, too many pixels
    body, ctype = multipart({}, {"image": big.getvalue()})
    assert status_of(logic.parse_predict, body, ctype, SETTINGS) == 413


def test_body_size_limit_and_declared_length():
    logic.check_declared_length("100", 100)
    logic.check_declared_length(None, 100)
    assert status_of(logic.check_declared_length, "101", 100) == 413


def test_batch_parsing():
    items = [{"designation": "Livre"}, {"image_base64": base64.b64encode(jpeg()).decode()}]
    parsed = logic.parse_batch(json.dumps(items).encode(), "application/json", SETTINGS)
    assert [p.has_image for p in parsed] == [False, True]
    too_many = json.dumps([{"designation": "x"}] * (SETTINGS.serve_max_batch_items + 1)).encode()
    assert status_of(logic.parse_batch, too_many, "application/json", SETTINGS) == 413
    assert status_of(logic.parse_batch, b"[]", "application/json", SETTINGS) == 422
    assert status_of(logic.parse_batch, b'{"designation": "x"}', "application/json", SETTINGS) == 422
    with pytest.raises(logic.InputError, match="item 1"):
        logic.parse_batch(b'[{"designation": "x"}, {}]', "application/json", SETTINGS)


# --- encoders and scoring -------------------------------------------------------------------------------


def test_groups_are_split_and_aligned_back():
    assert logic.split_groups([1, 2, 3, 4, 5], [2, 0, 3]) == [[1, 2], [], [3, 4, 5]]
    assert logic.scatter([True, False, True], ["t0", "t2"]) == ["t0", None, "t2"]
    assert logic.scatter([False, False], []) == [None, None]


def test_a_batch_is_chunked_over_the_lanes_but_not_below_the_minimum():
    assert logic.chunk_sizes(9, 2, 2) == [5, 4]
    assert logic.chunk_sizes(3, 2, 2) == [3]  # two chunks would leave one below the minimum
    assert logic.chunk_sizes(4, 2, 2) == [2, 2]
    assert logic.chunk_sizes(0, 2, 2) == [0] and logic.chunk_sizes(7, 1, 2) == [7]


def test_batch_user_configs():
    from serve.app import INNER_DEPLOYMENTS, batch_configs

    configs = batch_configs(SETTINGS)
    assert configs["Ingress"]["max_batch_size"] == SETTINGS.serve_max_batch_size
    assert configs["Ingress"]["batch_wait_timeout_s"] == SETTINGS.serve_batch_wait_timeout_s
    assert all(
        configs[d]["batch_wait_timeout_s"] == SETTINGS.serve_inner_batch_wait_timeout_s
        for d in INNER_DEPLOYMENTS
    )
    assert {c["max_batch_size"] for c in batch_configs(SETTINGS, 1).values()} == {1}


def test_encode_isolating_fails_only_the_bad_image():
    def encode(images: list[bytes]) -> np.ndarray:
        if any(i == b"bad" for i in images):
            raise OSError("truncated")
        return np.ones((len(images), 3), np.float32)

    out = logic.encode_isolating(encode, [b"ok", b"bad", b"ok"])
    assert isinstance(out[1], str) and "corrupt" in out[1]
    assert out[0].shape == (3,) and out[2].shape == (3,)


def test_top5_and_prediction():
    probs = np.array([0.05, 0.1, 0.02, 0.03, 0.3, 0.5])
    top = logic.top_k(probs, CARD["codes"], CARD)
    assert [t["prdtypecode"] for t in top] == [2583, 1140, 40, 10, 60]
    assert top[0]["class_name"] == "Piscine" and top[1]["class_name"]  # card name, then lib.data.rakuten's
    result = logic.prediction(probs, CARD, 0.6, "m", "3")
    assert result["prdtypecode"] == 2583 and result["confidence"] == pytest.approx(0.5)
    assert result["abstained"] and not logic.prediction(probs, CARD, 0.4, "m", "3")["abstained"]
    assert result["model_version"] == "3" and len(result["top5"]) == 5
    json.dumps(result)  # plain JSON types only


def test_missing_modality_is_a_zero_row():
    out = logic.stack_inputs([np.ones(3), None], 3)
    assert out.dtype == np.float32 and out[0].tolist() == [1, 1, 1] and out[1].tolist() == [0, 0, 0]


def test_incompatible_encoders_are_refused():
    running = logic.running_encoders("use-m3@1/512/t", "lite0@1/1280/r", "abc")
    card = {"encoder_set_id": "abc", "text_encoder": "use-m3@1/512/t", "image_encoder": "lite0@1/1280/r"}
    assert logic.incompatibility(card, running) is None
    assert "encoder_set_id" in logic.incompatibility({**card, "encoder_set_id": "zzz"}, running)


# --- auth and health --------------------------------------------------------------------------------


def test_build_app_refuses_a_public_host_without_token():
    from lib.ops.exposure import UnsafeExposure
    from serve.app import build_app

    with pytest.raises(UnsafeExposure, match="RAKUTEN_SERVE_AUTH_TOKEN"):
        build_app(Settings(host="0.0.0.0"))


def test_health():
    assert logic.health(None) == (503, {"status": logic.UNAVAILABLE})
    assert logic.health({"model_error": "ActorDiedError"})[1]["status"] == logic.UNAVAILABLE
    status, body = logic.health({"model_version": None, "model_name": "m"})
    assert status == 503 and body["status"] == logic.WAITING
    assert logic.health({"model_version": "2", "model_name": "m"}) == (
        200, {"status": "ok", "model_version": "2", "model_name": "m"}
    )  # fmt: skip


def test_serve_config_yaml_is_loopback_and_valid():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((PROJECT_ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1"
    module, _, attr = config["applications"][0]["import_path"].partition(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))


# --- prediction log -----------------------------------------------------------------------------------


def make_row(ts: datetime, version: str = "1", dims: tuple[int, int] = (4, 6)) -> dict:
    result = logic.prediction(np.array([0.05, 0.1, 0.02, 0.03, 0.3, 0.5]), CARD, 0.4, "m", version)
    return predlog.log_row(result, np.ones(dims[0]), np.zeros(dims[1]), True, False, "h" * 64, ts)


def test_log_rows_and_table():
    ts = datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
    table = predlog.rows_to_table([make_row(ts), make_row(ts + timedelta(minutes=2))])
    assert table.column_names == predlog.COLUMNS
    assert table.schema.field("text_emb").type == pa.list_(pa.float32(), 4)
    row = table.to_pylist()[0]
    assert row["prdtypecode"] == 2583 and row["top5_codes"][:2] == [2583, 1140] and not row["has_image"]
    assert row["input_hash"] == "h" * 64 and row["model_version"] == "1"
    assert layout.prediction_key(ts, "abc") == "predictions/date=2026-03-01/abc.parquet"
    groups = predlog.group_rows(
        [make_row(ts), make_row(ts + timedelta(minutes=2)), make_row(ts, dims=(5, 6))]
    )
    assert len(groups) == 3  # by date and embedding sizes


def test_input_hash_never_needs_raw_text():
    a = predlog.input_hash("Livre", "", None)
    assert a == predlog.input_hash("Livre", "", b"") and a != predlog.input_hash("Livre", "", b"x")
    assert len(a) == 64 and "Livre" not in a


class FlakyStore:
    """A write function that fails while ``down`` is set."""

    def __init__(self) -> None:
        self.down = False
        self.files: dict[str, pa.Table] = {}
        self.lock = threading.Lock()

    def __call__(self, key: str, table: pa.Table) -> None:
        if self.down:
            raise ConnectionError("S3 is down")
        with self.lock:
            self.files[key] = table

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.files.values())


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_writer_flushes_by_rows_and_by_time():
    store = FlakyStore()
    writer = predlog.PredictionLogWriter(store, flush_rows=3, flush_s=0.3, max_buffer_rows=100)
    now = datetime.now(UTC)
    writer.add([make_row(now) for _ in range(3)])  # a full chunk: written at once
    wait_for(lambda: store.rows == 3, 1.0)
    writer.add([make_row(now)])  # a partial chunk: written after flush_s
    wait_for(lambda: store.rows == 4)
    writer.close(2)
    assert writer.stats()["written"] == 4 and writer.dropped == 0
    assert all(k.startswith(layout.prediction_day_prefix(now)) for k in store.files)


def test_writer_keeps_rows_while_s3_is_down_and_drops_the_oldest_beyond_the_bound():
    store = FlakyStore()
    store.down = True
    writer = predlog.PredictionLogWriter(store, flush_rows=2, flush_s=0.05, max_buffer_rows=5)
    base = datetime.now(UTC)
    t0 = time.perf_counter()
    writer.add([make_row(base + timedelta(seconds=i), version=str(i)) for i in range(7)])
    assert time.perf_counter() - t0 < 0.05  # adding never waits for the store
    wait_for(lambda: writer.failures >= 2)
    assert writer.dropped == 2 and writer.pending == 5 and store.rows == 0
    store.down = False
    wait_for(lambda: store.rows == 5)
    versions = sorted(v for t in store.files.values() for v in t.column("model_version").to_pylist())
    assert versions == ["2", "3", "4", "5", "6"]  # the two oldest were dropped
    writer.close(2)
    assert writer.stats()["pending"] == 0 and "S3 is down" in writer.stats()["last_error"]


def test_rows_refused_by_s3_wait_in_the_spool_and_the_next_writer_uploads_them(tmp_path):
    """A replica that stops while S3 is down used to lose its buffer; beyond the bound rows were dropped."""
    store = FlakyStore()
    store.down = True
    writer = predlog.PredictionLogWriter(store, flush_rows=2, flush_s=0.05, max_buffer_rows=3, spool=tmp_path)
    base = datetime.now(UTC)
    writer.add([make_row(base + timedelta(seconds=i), version=str(i)) for i in range(9)])
    wait_for(lambda: writer.spooled == 9)
    writer.close(2)  # the replica stops with S3 still down
    assert store.rows == 0 and writer.dropped == 0 and writer.pending == 0
    assert writer.stats()["spool_files"] >= 5  # files of at most flush_rows rows, named by their key

    store.down = False
    successor = predlog.PredictionLogWriter(
        store, flush_rows=2, flush_s=0.05, max_buffer_rows=3, spool=tmp_path
    )
    wait_for(lambda: store.rows == 9)
    successor.close(2)
    versions = sorted(v for t in store.files.values() for v in t.column("model_version").to_pylist())
    assert versions == [str(i) for i in range(9)]
    assert all(k.startswith(layout.prediction_day_prefix(base)) for k in store.files)
    assert not list(tmp_path.iterdir())  # uploaded files leave the spool


def test_a_multi_megabyte_title_is_bounded_before_any_work():
    """A 5 MB title used to reach the encoder and the TF-IDF block whole (no answer within 20 s)."""
    item = logic.build_input("Piscine " * 700_000, "Bâche " * 700_000, None, SETTINGS)
    assert len(item.designation) <= SETTINGS.max_field_chars
    assert len(item.description) <= SETTINGS.max_field_chars
    assert len(item.lexical_text(SETTINGS.lexical_max_chars)) <= SETTINGS.lexical_max_chars
    assert len(item.text) <= SETTINGS.max_field_chars + SETTINGS.text_max_chars + 3
