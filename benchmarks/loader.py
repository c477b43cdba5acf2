"""Our shard reader against torchvision's ImageFolder pipeline, on the same ImageNet-like JPEGs.

Generates photo-like JPEGs (about 500x375, smooth noise plus shapes, quality 90) in an ImageFolder
tree, writes them unchanged into shards (``make-shards --keep-original``), then measures the CPU
time per image of one process (no DataLoader workers, torch on 1 thread) at 128 and 256 px for:

* **ours, draft**: shards -> shuffle buffer -> PIL JPEG draft-mode decode -> random square crop
  (area 0.35..1 of the largest square) -> resize -> flip -> float batch in [-1, 1]
  (``build_loader``, ``data.decode=draft``);
* **ours, full decode**: the same with ``data.decode=full`` (what the tar streaming alone gives);
* **torchvision**: ``ImageFolder`` (PIL full decode) + ``RandomResizedCrop`` (scale 0.35..1,
  square) + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``, batched by a ``DataLoader``;

and, for information (not the goal's comparison): ours with the center crop of the ImageNet
configs, and ours reading shards that ``make-shards`` re-encoded at its default short side 292.

Every pipeline produces float32 (b, 3, R, R) batches. Times are CPU seconds of this process,
medians of round-robin repeats, so a ratio is fair on a shared machine. Goal: ours (draft) >= 2x
torchvision per core at 128 px, on the same bytes and the same kind of crop.

Run from the repository root:  ``.venv/bin/python -m benchmarks.loader``
"""
from __future__ import annotations

import argparse
import tempfile
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from benchmarks.common import describe_machine, format_table, interleaved_times
from sagan_dist import config
from sagan_dist.data import build_loader
from sagan_dist.data.shards import Options, make_shards

SIZES = ((500, 375), (500, 333), (375, 500), (500, 400))  # typical ImageNet photo shapes
CLASSES = 10
BATCH = 32
MIN_SCALE = 0.35
GOAL_RATIO = 2.0  # ours (draft) / torchvision at 128 px


def photo(size: tuple[int, int], rng: np.random.Generator, grain: int = 0) -> Image.Image:
    """Smooth colour noise (upsampled) with a few filled shapes, plus optional per-pixel grain."""
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8))
    pixels = np.array(base.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    if grain:
        pixels += rng.integers(-grain, grain + 1, (h, w, 3), dtype=np.int16)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
        x1, y1 = x0 + int(rng.integers(30, 200)), y0 + int(rng.integers(30, 200))
        yy, xx = np.ogrid[:h, :w]
        if rng.random() < 0.5:
            mask = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        else:
            cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        pixels[mask] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_images(root: Path, count: int, grain: int = 0, seed: int = 0) -> int:
    """An ImageFolder tree of ``count`` JPEGs (quality 90); returns their mean size in bytes."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"n{i % CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(SIZES[i % len(SIZES)], rng, grain).save(folder / f"img_{i:05d}.JPEG", quality=90)
    return sum(p.stat().st_size for p in root.rglob("*.JPEG")) // count


def ours(shards: str, resolution: int, decode: str, crop: str = "random") -> Callable[[int], Any]:
    cfg = config.load(overrides=[
        "data.source=shards", f"data.shards={shards}", f"data.num_classes={CLASSES}",
        f"model.resolution={resolution}", f"train.batch_size={BATCH}", "data.workers=0",
        f"data.decode={decode}", f"data.crop={crop}", f"data.min_scale={MIN_SCALE}", "data.flip=true",
        "data.shuffle_buffer=500"])
    stream = build_loader(cfg, shards, rank=0, world_size=1, seed=0)
    return lambda n: sum(x.shape[0] for x, _ in islice(stream, n // BATCH))


def torchvision_baseline(root: Path, resolution: int) -> Callable[[int], Any]:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(resolution, scale=(MIN_SCALE, 1.0), ratio=(1.0, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), transform=transform),
                                         batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True)

    def run(n: int) -> int:
        done = 0
        while done < n // BATCH * BATCH:  # whole epochs until n images
            for x, _ in islice(loader, (n - done) // BATCH):
                done += x.shape[0]
        return done

    return run


def measure(root: Path, shards: str, shards_292: str, n: int, repeats: int) -> tuple[list[list[str]], float]:
    """Table rows for 128 and 256 px, and the 128 px ratio ours (draft) / torchvision."""
    rows, ratio_128 = [], 0.0
    for resolution in (128, 256):
        fns = {"ours, draft": ours(shards, resolution, "draft"),
               "ours, full decode": ours(shards, resolution, "full"),
               "torchvision": torchvision_baseline(root, resolution),
               "(info) ours, draft, center crop": ours(shards, resolution, "draft", "center"),
               "(info) ours, draft, 292 px shards": ours(shards_292, resolution, "draft")}
        # CPU time of this process, not wall time: on a shared machine a pipeline that loses its
        # core for a while is not charged for it, which is what "images/s per core" means.
        times = interleaved_times({k: (lambda f=f: f(n)) for k, f in fns.items()}, repeats)
        rate = {k: n / t.median("cpu") for k, t in times.items()}
        for name in fns:
            rows.append([f"{resolution} px", name, f"{rate[name]:.0f}", f"{1e3 / rate[name]:.2f}",
                         f"{rate[name] / rate['torchvision']:.2f}x"])
        if resolution == 128:
            ratio_128 = rate["ours, draft"] / rate["torchvision"]
    return rows, ratio_128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320, help="JPEGs to generate (default 320)")
    parser.add_argument("--repeats", type=int, default=5, help="timed round-robin repeats (default 5)")
    parser.add_argument("--grain", type=int, default=0,
                        help="add uniform per-pixel noise of +-GRAIN levels (texture: bigger files, "
                             "more entropy decoding, which draft mode cannot skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core: both pipelines on one thread
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "shards"
        mean_bytes = write_images(root, args.images, args.grain)
        per_shard = -(-args.images // 4)
        index = make_shards(root, out, Options(keep_original=True, per_shard=per_shard),
                            workers=1, log=lambda msg: None)
        make_shards(root, out, Options(split="s292", per_shard=per_shard), workers=1, log=lambda msg: None)
        rows, ratio_128 = measure(root, str(out / index["pattern"]),
                                  str(out / index["pattern"].replace("train", "s292")),
                                  args.images // BATCH * BATCH, args.repeats)
    print(describe_machine())
    print(f"{args.images} JPEGs of about 500x375, quality 90, mean {mean_bytes / 1e3:.0f} kB, grain "
          f"{args.grain}; batch {BATCH}; one process, no DataLoader workers; CPU time, median of "
          f"{args.repeats} round-robin repeats\n")
    print(format_table(["resolution", "pipeline", "images/s per core", "CPU ms / image",
                        "vs torchvision"], rows))
    verdict = "met" if ratio_128 >= GOAL_RATIO else "NOT met"
    print(f"\ngoal: ours (draft) >= {GOAL_RATIO:.0f}x torchvision per core at 128 px: "
          f"{ratio_128:.2f}x, {verdict}")


if __name__ == "__main__":
    main()
