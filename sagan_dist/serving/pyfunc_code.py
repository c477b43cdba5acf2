"""The models-from-code file MLflow stores with each logged generator and runs to load it.

It only imports the installed sagan_dist; the weights and config it loads are data files
(`sagan_dist.serving.files`). Kept this small on purpose: it is the one stored file MLflow executes.
"""
import mlflow
from mlflow.pyfunc import PythonModel

from sagan_dist.serving.pyfunc import SaganGenerator


class SaganGeneratorModel(SaganGenerator, PythonModel):
    pass


mlflow.models.set_model(SaganGeneratorModel())
