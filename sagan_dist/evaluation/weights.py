"""torch-fidelity's Inception-v3: finding its weights file, and loading it without running code.

torch-fidelity's `FeatureExtractorInceptionV3` reads the file it is given with
``torch.load(weights_only=False)``: a pickle planted at ``eval.inception_weights`` on shared storage
would run its payload in every job. So the file is read once, here, by `fsio.load_torch`
(weights_only: tensors and containers only), and torch-fidelity's network is handed the state dict
in memory (`InceptionV3`); it never sees the path, so nothing can swap the file between a check and
its use.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
import urllib.request
from pathlib import Path
from typing import Iterator

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from sagan_dist import config, fsio

log = logging.getLogger(__name__)

INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's default for IS, FID and KID
# Every metric reads one of these two layers, and the logits cost one small matrix product more
# than the pool features, so one extractor with both serves all metrics and the reference.
POOL, LOGITS = "2048", "logits_unbiased"
DOWNLOAD_TIMEOUT_S = 60
# How features are computed, in the reference cache's key: FIDs are comparable only between
# features of one precision, whichever path (training's evaluation, `sagan-dist evaluate`) runs.
FEATURE_PRECISION = "fp32, no TF32, no autocast"


@contextlib.contextmanager
def full_fp32(device: torch.device) -> Iterator[None]:
    """Exact fp32 matmuls and convolutions while active, whatever training set (TF32 on CUDA).

    The legacy switches only, as `sagan_dist.acceleration.enable_tf32` sets them (a mix with
    torch's per-backend ``fp32_precision`` would make reading them raise); restored on exit.
    """
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


class InceptionWeightsError(config.ConfigError):
    """The Inception weights are missing, cannot be downloaded, are unsafe, or are another network."""


def weights_help() -> str:
    return (f"torch-fidelity's Inception weights file {INCEPTION_FILE} (from {INCEPTION_URL}) is needed: "
            "download it on a machine with internet access, copy it to the cluster and set "
            f"eval.inception_weights=/path/to/{INCEPTION_FILE}")


def resolve_inception_weights(path: str, hub_dir: Path | None = None, url: str = INCEPTION_URL) -> Path:
    """The local weights file: ``path`` if set, else torch hub's copy, downloaded there if missing."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"eval.inception_weights={path!r}: no such file. {weights_help()}")
        return p
    target = Path(hub_dir or torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if target.is_file():
        return target
    try:
        _download(url, target)
    except OSError as e:  # URLError, timeouts, refused connections, a read-only hub dir
        raise InceptionWeightsError(f"eval.inception_weights is not set, {target} does not exist and "
                                    f"downloading it failed ({type(e).__name__}: {e}). {weights_help()} "
                                    f"(or put it at {target})") from None
    return target


def _download(url: str, target: Path) -> None:
    """Download through `fsio.atomic_write`: never a partial file at ``target``."""
    log.info("downloading %s to %s", url, target)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        fsio.atomic_write(target, lambda f: shutil.copyfileobj(response, f))


def load_inception_state(path: Path) -> dict[str, torch.Tensor]:
    """The weights file as a state dict, read once with weights_only; anything else is refused."""
    try:
        state = fsio.load_torch(path)
    except fsio.UnsafeFileError as e:
        raise InceptionWeightsError(f"eval.inception_weights: {e}. {weights_help()}") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise InceptionWeightsError(f"{path} is not a torch-fidelity Inception state dict "
                                    f"({type(e).__name__}: {_first_line(e)}). {weights_help()}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"{path} is not a torch-fidelity Inception state dict (it holds a "
                                    f"{type(state).__name__}, not names -> tensors). {weights_help()}")
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


class InceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's network built from a state dict in memory rather than from a path.

    Its constructor insists on ``torch.load(weights_only=False)`` of what it is given; it is given
    an in-memory serialisation of ``state_dict``, which `load_inception_state` already reduced to
    plain tensors, so that load has nothing in it that could run.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], features: tuple[str, ...] = (POOL, LOGITS)) -> None:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        super().__init__(FEATURE_EXTRACTOR, list(features), feature_extractor_weights_path=buffer)


def build_extractor(path: Path) -> tuple[InceptionV3, str]:
    """The extractor from the weights file, and the weights' digest (the reference cache keys on it)."""
    state = load_inception_state(path)
    try:
        extractor = InceptionV3(state)
    except Exception as e:  # noqa: BLE001 - missing or unexpected keys, wrong shapes
        raise InceptionWeightsError(f"{path} is not a torch-fidelity Inception state dict "
                                    f"({type(e).__name__}: {_first_line(e)}). {weights_help()}") from None
    return extractor, state_digest(state)


def check_inception_weights(path: Path) -> None:
    """Build the extractor from the file, exactly as the metrics will, or raise `InceptionWeightsError`."""
    build_extractor(path)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors (names, dtypes, shapes, bytes): the weights' identity, computed from
    what was loaded rather than by reading the file a second time."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().reshape(-1).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
