"""The MLflow pyfunc face of a registered fusion head (imported only when a model is logged or loaded).

MLflow inspects every ``PythonModel`` subclass when it is defined and warns that ``predict`` has no type
hints (the signature is given explicitly at log time, as tensors); keeping the class out of
``lib.model.registry`` keeps that warning out of every process that only reads the registry.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

from lib.model.artifact import read_model_dir


class FusionPyfunc(mlflow.pyfunc.PythonModel):
    """{text_emb, image_emb[, text]} → calibrated class probabilities."""

    def load_context(self, context) -> None:
        self.loaded = read_model_dir(Path(context.artifacts["card"]).parent)

    def predict(self, context, model_input, params=None):
        texts = model_input.get("text")
        return self.loaded.probabilities(
            np.asarray(model_input["text_emb"], np.float32),
            np.asarray(model_input["image_emb"], np.float32),
            None if texts is None else [str(t) for t in np.asarray(texts).ravel()],
        )
