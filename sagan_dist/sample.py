"""Latents, image grids, and `sagan-dist sample`: images from a snapshot's EMA generator."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision.utils import make_grid

from sagan_dist import checkpoint, config
from sagan_dist.models.sagan import Generator, build_models


def truncated_normal(shape: tuple[int, ...], truncation: float, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """Standard normal samples; with ``truncation > 0``, normal samples restricted to [-T, T] (BigGAN).

    Drawn by inverting the normal CDF on [Phi(-T), Phi(T)] in float64: one draw per value, however
    small T is (redrawing values beyond T never ends for T = 1e-6).
    """
    if truncation <= 0:
        return torch.randn(shape, generator=generator, device=device)
    lo = torch.special.ndtr(torch.tensor(-float(truncation), dtype=torch.float64))
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    z = torch.special.ndtri(lo + u * (1 - 2 * lo)).clamp_(-truncation, truncation)
    return z.to(torch.float32)


def latents(n: int, z_dim: int, num_classes: int, generator: torch.Generator, device: torch.device,
            truncation: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    z = truncated_normal((n, z_dim), truncation, generator, device)
    y = torch.randint(num_classes, (n,), generator=generator, device=device)
    return z, y


def grid_latents(cfg: DictConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed z and labels of the training sample grids: one row per class."""
    t = cfg.train
    rows = min(t.sample_classes or cfg.data.num_classes, cfg.data.num_classes)
    classes = torch.linspace(0, cfg.data.num_classes - 1, rows).round().long()
    g = torch.Generator().manual_seed(t.seed + 12345)
    z = truncated_normal((rows * t.samples_per_class, cfg.model.z_dim), t.truncation, g, torch.device("cpu"))
    return z.to(device), classes.repeat_interleave(t.samples_per_class).to(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (N, 3, H, W) -> uint8 (N, 3, H, W)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _save_png(array: torch.Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    return _save_png(make_grid(to_uint8(images), nrow=nrow, padding=2), Path(path))


def load_generator(snapshot_path: str | Path, device: torch.device) -> tuple[Generator, DictConfig]:
    """The EMA generator of a snapshot (or of a run directory's newest valid one), in eval mode."""
    snapshot = checkpoint.resolve_snapshot(snapshot_path)
    state = checkpoint.load_state(snapshot, device)
    cfg = config.from_container(state["config"])
    g, _ = build_models(cfg)
    g.load_state_dict(state["G_ema"])
    return g.to(device).eval(), cfg


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    if not text:
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"--classes {text!r}: expected comma-separated class indices, e.g. 0,3,7") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise SystemExit(f"--classes {text!r}: class indices must be in 0..{num_classes - 1}")
    return classes


@torch.no_grad()
def write_samples(g: Generator, out: Path, n: int, classes: list[int], truncation: float, seed: int,
                  batch_size: int = 64) -> list[Path]:
    """N images spread evenly over ``classes`` as ``{class}_{index}.png``, plus ``grid.png``."""
    device = next(g.parameters()).device
    counts = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    labels = torch.tensor([c for c, k in zip(classes, counts) for _ in range(k)], dtype=torch.long)
    gen = torch.Generator(device).manual_seed(seed)
    images = []
    for chunk in labels.split(batch_size):
        z = truncated_normal((len(chunk), g.z_dim), truncation, gen, device)
        images.append(to_uint8(g(z, chunk.to(device))))
    images_t = torch.cat(images) if images else torch.empty(0, 3, g.resolution, g.resolution, dtype=torch.uint8)
    paths, index = [], {c: 0 for c in classes}
    for img, c in zip(images_t, labels.tolist()):
        paths.append(_save_png(img, out / f"{c}_{index[c]}.png"))
        index[c] += 1
    if len(images_t):
        _save_png(make_grid(images_t, nrow=max(counts), padding=2), out / "grid.png")
    return paths


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a snapshot directory, its state.pt, or a run directory "
                                           "(then its newest valid snapshot)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--n", type=int, default=100, help="number of images in total (default 100)")
    parser.add_argument("--classes", default=None, help="comma-separated class indices (default: all)")
    parser.add_argument("--truncation", type=float, default=0.0,
                        help="truncation of z (redraw |z| > T); 0 = off (default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of z (default 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise SystemExit("--n must be >= 1")
    g, cfg = load_generator(args.checkpoint, torch.device(args.device))
    classes = parse_classes(args.classes, cfg.data.num_classes)
    paths = write_samples(g, args.out, args.n, classes, args.truncation, args.seed)
    print(f"wrote {len(paths)} images and grid.png to {args.out}")
    return 0
