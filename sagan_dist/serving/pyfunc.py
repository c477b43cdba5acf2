"""`SaganGenerator`: the MLflow pyfunc that turns rows of (class, seed, truncation) into images.

One row is one image, drawn exactly as ``sagan-dist sample --n 1 --classes C --seed S --truncation
T`` draws its image (`sagan_dist.sample.truncated_normal` from a generator seeded with S), so the
two agree. Outputs a DataFrame with ``class``, ``seed`` and ``image``: a base64 PNG by default, or
with the param ``format=uint8`` the (H, W, 3) uint8 array (nested lists over REST). Bad input
raises MlflowException(INVALID_PARAMETER_VALUE), which `mlflow models serve` answers with 400.
"""
from __future__ import annotations

import base64
import io
import math
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

MAX_ROWS = 1024  # images per request: a bigger request is refused, not queued into memory
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed here
BATCH = 64  # rows per forward pass
FORMATS = ("png", "uint8")


def signature() -> Any:
    """Inputs class (long, required), seed (long), truncation (double); param ``format``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("long", "class"), ColSpec("long", "seed", required=False),
                     ColSpec("double", "truncation", required=False)])
    outputs = Schema([ColSpec("long", "class"), ColSpec("long", "seed"), ColSpec("string", "image")])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("format", "string", "png")]))


def input_example() -> pd.DataFrame:
    return pd.DataFrame({"class": [0, 1], "seed": [0, 1], "truncation": [0.0, 1.0]})


def _bad(message: str) -> Exception:
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _column(frame: pd.DataFrame, name: str, default: float) -> np.ndarray:
    """A numeric column as float64 (missing column or cells -> ``default``); text is refused."""
    if name not in frame:
        return np.full(len(frame), default, dtype=np.float64)
    try:
        values = pd.to_numeric(frame[name], errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):
        raise _bad(f"column {name!r}: expected numbers, got {frame[name].tolist()[:3]!r}...") from None
    return np.where(np.isnan(values), default, values) if name != "class" else values


def parse_rows(frame: pd.DataFrame, num_classes: int) -> tuple[list[int], list[int], list[float]]:
    """Checked (classes, seeds, truncations) of the request; MlflowException(400) naming the column."""
    if not isinstance(frame, pd.DataFrame):
        raise _bad(f"expected a table with columns class, seed, truncation, got {type(frame).__name__}")
    if len(frame) > MAX_ROWS:
        raise _bad(f"{len(frame)} rows: at most {MAX_ROWS} images per request (one row each)")
    if "class" not in frame:
        raise _bad("column 'class' is required (the class index of each image)")
    classes, seeds, truncs = (_column(frame, "class", 0), _column(frame, "seed", 0),
                              _column(frame, "truncation", 0.0))
    for name, values, low, high in (("class", classes, 0, num_classes - 1), ("seed", seeds, 0, MAX_SEED)):
        bad = [v for v in values if not (np.isfinite(v) and v == math.floor(v) and low <= v <= high)]
        if bad:
            raise _bad(f"column {name!r}: {float(bad[0]):g} is not an integer in {low}..{high}")
    bad_t = [t for t in truncs if not (np.isfinite(t) and t >= 0)]
    if bad_t:
        raise _bad(f"column 'truncation': {float(bad_t[0]):g} is not a finite number >= 0 (0 = off)")
    return [int(c) for c in classes], [int(s) for s in seeds], [float(t) for t in truncs]


def seeded_latents(seeds: list[int], truncations: list[float], z_dim: int,
                   device: torch.device) -> torch.Tensor:
    """One z per row, each the first draw of its own seed: what `sagan-dist sample --n 1 --seed S`
    gives its image."""
    from sagan_dist.sample import truncated_normal

    rows = [truncated_normal((1, z_dim), t, torch.Generator(device).manual_seed(s), device)
            for s, t in zip(seeds, truncations)]
    return torch.cat(rows) if rows else torch.empty(0, z_dim, device=device)


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class SaganGenerator:
    """The pyfunc model (an mlflow.pyfunc.PythonModel, made one in `pyfunc_code.py`)."""

    def load_context(self, context: Any) -> None:
        from sagan_dist.serving.files import load_model_files

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.g, cfg = load_model_files(context.artifacts["weights"], context.artifacts["config"], self.device)
        self.num_classes = cfg.data.num_classes

    @torch.no_grad()
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: Optional[dict[str, Any]] = None) -> pd.DataFrame:
        from sagan_dist.sample import to_uint8

        fmt = (params or {}).get("format", "png")
        if fmt not in FORMATS:
            raise _bad(f"param 'format': {fmt!r} is not one of {FORMATS}")
        classes, seeds, truncs = parse_rows(model_input, self.num_classes)
        z = seeded_latents(seeds, truncs, self.g.z_dim, self.device)
        y = torch.tensor(classes, dtype=torch.long, device=self.device)
        images = [to_uint8(self.g(zc, yc)) for zc, yc in zip(z.split(BATCH), y.split(BATCH))]
        arrays = [a.permute(1, 2, 0).numpy() for batch in images for a in batch]
        out = [png_base64(a) for a in arrays] if fmt == "png" else arrays
        return pd.DataFrame({"class": classes, "seed": seeds, "image": out})
