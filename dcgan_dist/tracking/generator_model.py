"""The registered generator as an MLflow pyfunc: latent vectors (N, nz) -> images (N, nc, H, W) in [-1, 1].

MLflow logs this file with the model ("model from code"), so loading or serving it needs torch, numpy and
mlflow, not dcgan_dist. The network is a `torch.export` program (a graph and weights, no pickle). `predict`
checks what a REST client sends: a wrong latent size, a non-finite value or a non-numeric cell is an
`MlflowException` with INVALID_PARAMETER_VALUE, which `mlflow models serve` answers with HTTP 400 and the message.
"""

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


def refuse(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def latent_batch(model_input, nz: int) -> np.ndarray:
    """A (N, nz) float32 array from an ndarray, a list of rows or a DataFrame (float64 accepted), or a 400."""
    try:
        z = np.asarray(getattr(model_input, "values", model_input), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise refuse(f"latent vectors must be numbers ({e})") from None
    if z.ndim == 1 and z.size == nz:
        z = z[None]
    if z.ndim != 2 or z.shape[1] != nz or z.shape[0] == 0:
        raise refuse(f"expected latent vectors of shape (N, {nz}), got shape {tuple(z.shape)}")
    if not np.isfinite(z).all():
        rows = sorted({int(r) for r in np.argwhere(~np.isfinite(z))[:, 0]})
        raise refuse(f"latent vectors must be finite: row(s) {rows[:10]} hold NaN or infinity")
    return z.astype(np.float32)


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.nz = int(context.model_config["nz"])
        self.generator = torch.export.load(context.artifacts["generator"]).module()

    def predict(self, context, model_input: np.ndarray, params=None):  # (the signature checks shape and dtype)
        z = torch.from_numpy(latent_batch(model_input, self.nz))
        with torch.no_grad():
            return self.generator(z).numpy()


mlflow.models.set_model(GeneratorModel())
