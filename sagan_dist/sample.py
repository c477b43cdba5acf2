"""Latents, image grids, and `sagan-dist sample`: images from a snapshot's EMA generator.

Besides single images, `sample` draws two kinds of PNG grids: interpolations (each row one pair of
endpoints, ``--steps`` columns from one to the other: z from z_a to z_b in one class, or the class
conditioning from class A to class B for one z) and a class sheet (rows of classes, columns of z,
the same z in every row). Class interpolation mixes G's class embeddings: `class_mixture` makes
every conditional BatchNorm take ``sum_c w_c * embedding[c]`` instead of one embedding row, with
forward hooks on the embeddings, so the model itself is unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision.utils import make_grid

from sagan_dist import checkpoint
from sagan_dist.fsio import atomic_write
from sagan_dist.models.sagan import Generator, conditional_batchnorms


def truncated_normal(shape: tuple[int, ...], truncation: float, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """Standard normal samples; with ``truncation > 0``, normal samples restricted to [-T, T] (BigGAN).

    Drawn on the generator's device and returned on ``device``: with a CPU generator one seed gives
    the same z on every device (CUDA's generator draws other numbers). Drawn by inverting the
    normal CDF on [Phi(-T), Phi(T)] in float64: one draw per value, however small T is (redrawing
    values beyond T never ends for T = 1e-6).
    """
    if truncation <= 0:
        z = torch.randn(shape, generator=generator, device=generator.device)
    else:
        lo = torch.special.ndtr(torch.tensor(-float(truncation), dtype=torch.float64))
        u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
        z = torch.special.ndtri(lo + u * (1 - 2 * lo)).clamp_(-truncation, truncation).float()
    # No call at all when already there: training draws on its device's generator every step.
    return z if z.device == torch.device(device) else z.to(device)


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
    image = Image.fromarray(array.permute(1, 2, 0).numpy())
    return atomic_write(Path(path), lambda f: image.save(f, format="PNG"))


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    return _save_png(make_grid(to_uint8(images), nrow=nrow, padding=2), Path(path))


def load_generator(snapshot_path: str | Path, device: torch.device) -> tuple[Generator, DictConfig]:
    """The EMA generator of a snapshot (or of a run directory's newest valid one), or of an MLflow
    model (``models:/NAME@ALIAS``: its weights and config only, see serving.registry), in eval mode."""
    from sagan_dist.serving.registry import is_model_uri, load_registered_generator

    if is_model_uri(snapshot_path):
        return load_registered_generator(str(snapshot_path), device)  # type: ignore[return-value]
    g, cfg, _, _ = checkpoint.load_generator(snapshot_path, device)
    return g, cfg


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


def spread_labels(n: int, classes: list[int]) -> torch.Tensor:
    """N labels spread evenly over ``classes``, in order (the first N % len(classes) get one more)."""
    counts = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    return torch.tensor([c for c, k in zip(classes, counts) for _ in range(k)], dtype=torch.long)


@torch.no_grad()
def write_samples(g: Generator, out: Path, n: int, classes: list[int], truncation: float, seed: int,
                  batch_size: int = 64) -> list[Path]:
    """N images spread evenly over ``classes`` as ``{class}_{index}.png``, plus ``grid.png``."""
    device = next(g.parameters()).device
    labels = spread_labels(n, classes)
    gen = torch.Generator().manual_seed(seed)
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
        per_class = -(-n // len(classes))  # the most images any class has
        _save_png(make_grid(images_t, nrow=per_class, padding=2), out / "grid.png")
    return paths


# ------------------------------------------------------------------------------ class mixtures
@contextlib.contextmanager
def class_mixture(g: Generator, weights: torch.Tensor) -> Iterator[None]:
    """While active, G's conditional BatchNorms use the class mixture ``weights`` (B, num_classes).

    Each cBN gain and bias embedding returns ``weights @ embedding`` (the embedding of a soft
    one-hot) instead of the row of ``y``; G must be called with a batch of B. Rows summing to 1
    keep cBN's ``1 + gain`` the same mixture. A one-hot row gives exactly the row of its class.
    """
    if weights.dim() != 2 or weights.shape[1] != g.num_classes:
        raise ValueError(f"class weights must be (batch, {g.num_classes}), got {tuple(weights.shape)}")

    def mixed(module: torch.nn.Embedding, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return (weights.to(module.weight.dtype) @ module.weight).to(output.dtype)

    handles = [e.register_forward_hook(mixed) for bn in conditional_batchnorms(g) for e in (bn.gain, bn.bias)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def generate(g: Generator, z: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """G(z, y) in batches; ``y`` class indices (B,) or class mixture weights (B, num_classes)."""
    out = []
    for zc, yc in zip(z.split(batch_size), y.split(batch_size)):
        if yc.dim() == 1:
            out.append(g(zc, yc))
        else:
            with class_mixture(g, yc):
                out.append(g(zc, yc.argmax(1)))
    return torch.cat(out)


def _fractions(steps: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(steps, device=device, dtype=torch.float32) / (steps - 1))[:, None]  # ends 0, 1 exactly


def z_interpolation(g: Generator, rows: int, steps: int, classes: list[int], truncation: float,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, y) of ``rows`` x ``steps`` images, row-major: row i in class ``classes[i % len]``, z
    linearly from z_a[i] to z_b[i]. z_a then z_b are the first draws of ``seed``'s generator."""
    device = next(g.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    za = truncated_normal((rows, g.z_dim), truncation, gen, device)
    zb = truncated_normal((rows, g.z_dim), truncation, gen, device)
    t = _fractions(steps, device)
    z = ((1 - t)[None] * za[:, None] + t[None] * zb[:, None]).reshape(rows * steps, g.z_dim)
    y = torch.tensor([classes[i % len(classes)] for i in range(rows)], device=device)
    return z, y.repeat_interleave(steps)


def class_interpolation(g: Generator, rows: int, steps: int, a: int, b: int, truncation: float,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, class weights) of ``rows`` x ``steps`` images: row i one z (the i-th draw of ``seed``),
    the class conditioning linearly from class ``a`` (first column) to ``b`` (last)."""
    device = next(g.parameters()).device
    z = truncated_normal((rows, g.z_dim), truncation, torch.Generator().manual_seed(seed), device)
    t = _fractions(steps, device)
    onehot = torch.eye(g.num_classes, device=device)
    weights = (1 - t) * onehot[a] + t * onehot[b]  # (steps, num_classes)
    return z.repeat_interleave(steps, dim=0), weights.repeat(rows, 1)


def class_sheet(g: Generator, classes: list[int], columns: int, truncation: float,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, y) of a sheet: one row per class, ``columns`` z (draws of ``seed``), the same in every row."""
    device = next(g.parameters()).device
    z = truncated_normal((columns, g.z_dim), truncation, torch.Generator().manual_seed(seed), device)
    y = torch.tensor(classes, device=device).repeat_interleave(columns)
    return z.repeat(len(classes), 1), y


# ------------------------------------------------------------------------------ the command
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a snapshot directory, its state.pt, a run directory "
                                           "(then its newest valid snapshot), or an MLflow model "
                                           "(models:/NAME@ALIAS; server from $MLFLOW_TRACKING_URI)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--n", type=int, default=None,
                        help="images in total (default 100); with --interpolate the rows (default 4); "
                             "with --sheet the columns, z per class (default 8)")
    parser.add_argument("--classes", default=None,
                        help="comma-separated class indices (default: all); with --interpolate z the "
                             "rows' classes, in turn; with --sheet the rows")
    parser.add_argument("--truncation", type=float, default=0.0,
                        help="truncation of z (values in [-T, T]); 0 = off (default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of z (default 0)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--interpolate", choices=("z", "class"), default=None,
                      help="write interpolate-z.png (per row one class, z from z_a to z_b) or "
                           "interpolate-class.png (per row one z, class from --from-class to --to-class)")
    kind.add_argument("--sheet", action="store_true",
                      help="write sheet.png: one row per class, one column per z (same z in every row)")
    parser.add_argument("--steps", type=int, default=8, help="with --interpolate: columns per row, "
                                                             "both ends included (default 8)")
    parser.add_argument("--from-class", type=int, default=None, help="with --interpolate class: class A")
    parser.add_argument("--to-class", type=int, default=None, help="with --interpolate class: class B")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _check_args(args: argparse.Namespace) -> None:
    if args.n is not None and args.n < 1:
        raise SystemExit(f"--n {args.n}: must be >= 1")
    if args.interpolate and args.steps < 2:
        raise SystemExit(f"--steps {args.steps}: an interpolation needs >= 2 steps (both ends)")
    if args.interpolate != "class" and (args.from_class is not None or args.to_class is not None):
        raise SystemExit("--from-class / --to-class are for --interpolate class")
    if args.interpolate == "class" and args.classes:
        raise SystemExit("--classes does not apply to --interpolate class (its classes are --from-class "
                         "and --to-class)")


def _check_classes(args: argparse.Namespace, num_classes: int) -> None:
    if args.interpolate == "class":
        for option, value in (("--from-class", args.from_class), ("--to-class", args.to_class)):
            if value is None:
                raise SystemExit(f"--interpolate class needs {option}")
            if not 0 <= value < num_classes:
                raise SystemExit(f"{option} {value}: class indices must be in 0..{num_classes - 1}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    g, cfg = load_generator(args.checkpoint, torch.device(args.device))
    _check_classes(args, cfg.data.num_classes)
    classes = parse_classes(args.classes, cfg.data.num_classes)
    if args.interpolate is None and not args.sheet:
        paths = write_samples(g, args.out, args.n or 100, classes, args.truncation, args.seed)
        print(f"wrote {len(paths)} images and grid.png to {args.out}")
        return 0
    if args.sheet:
        columns, name = args.n or 8, "sheet.png"
        z, y = class_sheet(g, classes, columns, args.truncation, args.seed)
    else:
        columns, name = args.steps, f"interpolate-{args.interpolate}.png"
        if args.interpolate == "z":
            z, y = z_interpolation(g, args.n or 4, args.steps, classes, args.truncation, args.seed)
        else:
            z, y = class_interpolation(g, args.n or 4, args.steps, args.from_class, args.to_class,
                                       args.truncation, args.seed)
    path = save_grid(generate(g, z, y), args.out / name, nrow=columns)
    print(f"wrote {path}")
    return 0
