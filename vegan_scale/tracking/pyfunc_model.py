"""The MLflow model ``model`` of a run, as code: MLflow executes this file to load it (models from code), so no
pickled object is ever stored or unpickled. Its one artifact, ``export``, is the run's export directory
(``model.safetensors`` + ``model.yaml``), read by :func:`vegan_scale.registry.load_export`.

``predict`` takes a float32 image batch [N, C, H, W] in [0, 1] and returns the reconstructions in [0, 1], or with
``params={"output": "codes"}`` the latent codes [N, latent_dim] (a Gaussian encoder's mean).
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from vegan_scale.registry import load_export

OUTPUTS = ("reconstruction", "codes")


class AutoEncoderModel(PythonModel):
    """A vegan_scale auto-encoder behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        self.model = load_export(context.artifacts["export"])

    # model_input as np.ndarray: MLflow derives no schema from that hint (the logged signature is the schema) and,
    # unlike a missing hint, does not warn at every import of this file (each model logging and loading).
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        output = (params or {}).get("output", OUTPUTS[0])
        if output not in OUTPUTS:
            raise ValueError(f"params.output={output!r}: choose one of {', '.join(OUTPUTS)}")
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            if output == "reconstruction":
                return self.model.reconstruct(x).float().numpy()
            codes = self.model.encode(self.model.to_model(x))
        return (codes.z if codes.mean is None else codes.mean).float().numpy()


mlflow.models.set_model(AutoEncoderModel())
