"""Where each query looks: attention maps of SAGAN's self-attention layers.

`sagan-dist attention` draws them for a snapshot's EMA generator (or its discriminator on real
images), and `attention_summary` gives the trainer one sheet per layer and two numbers per layer
to log. For every self-attention layer a forward hook keeps the layer's input; the layer's own
query and key convs then give the softmax weights of K chosen query positions over all keys
(`SelfAttention.attention_rows`): K rows, never the N x N matrix.

With ``model.attention_pool`` the keys are max-pooled 2 x 2, so a map is a distribution over the
pooled (H/2, W/2) key grid; ``maps.pt`` keeps that grid as it is (each map sums to 1 over it),
and the sheets show each pooled cell over the 2 x 2 feature-map pixels it covers.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
from omegaconf import DictConfig
from torch import nn

from sagan_dist import checkpoint, config
from sagan_dist.attention_sheet import render_sheet
from sagan_dist.fsio import atomic_write, load_torch, save_torch
from sagan_dist.models.sagan import Discriminator, Generator, attention_layers, build_models
from sagan_dist.sample import load_generator, parse_classes, spread_labels, to_uint8, truncated_normal


T = TypeVar("T")


@dataclass
class LayerMaps:
    """One layer's maps: ``maps`` (N, K, h', w') over the key grid, ``points`` (K, 2) query
    (row, col) in the layer's (h, w) feature map, ``stride`` = h / h' (2 with pooled keys, else 1)."""

    maps: torch.Tensor
    points: torch.Tensor
    map_size: tuple[int, int]

    @property
    def stride(self) -> int:
        return self.map_size[0] // self.maps.shape[2]


# ------------------------------------------------------------------------------ query points
def spread_points(h: int, w: int, k: int) -> torch.Tensor:
    """K distinct (row, col) positions spread over an h x w map: about sqrt(K) rows of points,
    each point at the centre of its cell of an even split of the map."""
    if not 1 <= k <= h * w:
        raise ValueError(f"{k} query points per layer (--points, train.attention_points): must be in "
                         f"1..{h * w}, the {h}x{w} map's positions")
    rows = math.ceil(math.sqrt(k))
    while math.ceil(k / rows) > w:
        rows += 1
    rows = min(rows, h)
    counts = [k // rows + (i < k % rows) for i in range(rows)]
    return torch.tensor([(int((i + 0.5) * h / rows), int((j + 0.5) * w / c))
                         for i, c in enumerate(counts) for j in range(c)], dtype=torch.long)


def fraction_points(fractions: list[tuple[float, float]], h: int, w: int) -> torch.Tensor:
    """(row, col) fractions of the map's height and width in [0, 1) -> positions in an h x w map."""
    return torch.tensor([(min(h - 1, int(r * h)), min(w - 1, int(c * w))) for r, c in fractions],
                        dtype=torch.long)


# ------------------------------------------------------------------------------ the maps
def capture_inputs(model: nn.Module, run: Callable[[], T]) -> tuple[dict[str, torch.Tensor], T]:
    """Each SelfAttention's input during ``run()`` (one forward of ``model``), by layer name, and
    what ``run()`` returned."""
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        return lambda module, args: inputs.__setitem__(name, args[0].detach())

    handles = [layer.register_forward_pre_hook(keep(name)) for name, layer in attention_layers(model).items()]
    try:
        output = run()
    finally:
        for h in handles:
            h.remove()
    return inputs, output


@torch.no_grad()
def layer_maps(model: nn.Module, run: Callable[[], T], points: int,
               at: list[tuple[float, float]] | None = None) -> tuple[dict[str, LayerMaps], T]:
    """Maps of every attention layer of ``model`` during ``run()``, and what ``run()`` returned:
    ``at`` (fractions of the map) if given, else ``points`` spread positions per layer."""
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"the {type(model).__name__} has no self-attention layer (model.*_attention=[])")
    inputs, output = capture_inputs(model, run)
    result = {}
    for name, x in inputs.items():
        h, w = x.shape[-2:]
        pts = fraction_points(at, h, w) if at else spread_points(h, w, points)
        maps = layers[name].attention_rows(x, pts[:, 0] * w + pts[:, 1])
        result[name] = LayerMaps(maps.cpu(), pts, (h, w))
    return result, output


def key_positions(lm: LayerMaps) -> torch.Tensor:
    """(h', w', 2) centres of the key cells in feature-map pixels (a pooled cell covering pixels
    2i and 2i+1 is centred at 2i + 0.5)."""
    s = lm.stride
    rows = torch.arange(lm.maps.shape[2]) * s + (s - 1) / 2
    cols = torch.arange(lm.maps.shape[3]) * s + (s - 1) / 2
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).float()


def expected_distance(lm: LayerMaps) -> float:
    """Mean over images and queries of sum_j p_j * ||pos_j - pos_query||, in feature-map pixels."""
    keys = key_positions(lm)  # (h', w', 2)
    dist = (keys[None] - lm.points.float()[:, None, None]).norm(dim=-1)  # (K, h', w')
    return float((lm.maps.double() * dist.double()).sum(dim=(2, 3)).mean())


def mean_entropy(lm: LayerMaps) -> float:
    """Mean over images and queries of -sum_j p_j log p_j, in nats (0 = one key; log(keys) = uniform)."""
    p = lm.maps.double().flatten(2)
    return float(-torch.special.xlogy(p, p).sum(-1).mean())


def layer_metrics(maps: dict[str, LayerMaps]) -> dict[str, float]:
    out = {}
    for name, lm in maps.items():
        out[f"attention/{name}/distance"] = expected_distance(lm)
        out[f"attention/{name}/entropy"] = mean_entropy(lm)
    return out


def sheet_title(net: str, name: str, lm: LayerMaps) -> str:
    h, w = lm.map_size
    keys = f", keys pooled to {lm.maps.shape[2]}x{lm.maps.shape[3]}" if lm.stride > 1 else ""
    return f"{net} {name}: {h}x{w} map{keys}; colours scaled per map, corner: peak weight / uniform"


def write_sheets(images: torch.Tensor, maps: dict[str, LayerMaps], net: str,
                 path_of: Callable[[str], Path], labels: list[int] | None = None) -> dict[str, Path]:
    """One PNG per layer (images uint8 (N, 3, R, R)); ``path_of(layer)`` names its file."""
    paths = {}
    for name, lm in maps.items():
        sheet = render_sheet(images, lm.maps, lm.points, lm.map_size, sheet_title(net, name, lm), labels)
        paths[name] = atomic_write(path_of(name), lambda f, s=sheet: s.save(f, format="PNG"))
    return paths


# ------------------------------------------------------------------------------ for the trainer
def _spread_over_classes(y: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of up to n entries of y, one per class first (in order of appearance)."""
    first = {}
    for i, c in enumerate(y.tolist()):
        first.setdefault(c, i)
    chosen = list(first.values())[:n]
    rest = [i for i in range(len(y)) if i not in set(chosen)]
    return torch.tensor(chosen + rest[: n - len(chosen)], dtype=torch.long)


@torch.no_grad()
def attention_summary(g: Generator, z: torch.Tensor, y: torch.Tensor, points: int, out_dir: Path,
                      step: int, images: int = 4) -> tuple[dict[str, Path], dict[str, float]]:
    """Attention sheets and metrics of G's self-attention layers, for logging during training.

    Uses up to ``images`` of the latents (z, y), one per class first, and ``points`` spread query
    positions per layer, so it costs one small forward of G plus K rows of attention per layer.
    G runs in eval mode (running BatchNorm statistics; its mode is restored afterwards).

    Writes ``out_dir/<layer>/step-<step>.png`` per layer and returns the paths by layer, and
    per-layer metrics (means over the images and query points):

    * ``attention/<layer>/distance``: expected distance, in feature-map pixels, between a query
      and where it looks, sum_j p_j * ||pos_j - pos_query||; with pooled keys, pos_j is the
      centre of the pooled cell in full-map pixels. Near 0: attention stays local; about half the
      map size: it looks across the image.
    * ``attention/<layer>/entropy``: entropy of the weights in nats, -sum_j p_j log p_j; from 0
      (one key) to log(number of keys) (uniform, e.g. 5.55 for 16x16 keys).
    """
    pick = _spread_over_classes(y.cpu(), images).to(y.device)
    z, y = z[pick], y[pick]
    was_training = g.training
    g.eval()
    try:
        maps, images = layer_maps(g, lambda: g(z, y), points)
    finally:
        g.train(was_training)
    path_of = lambda name: Path(out_dir) / name / f"step-{step:08d}.png"  # noqa: E731
    paths = write_sheets(to_uint8(images), maps, "G", path_of, y.tolist())
    return paths, layer_metrics(maps)


# ------------------------------------------------------------------------------ D on real images
def load_discriminator(snapshot: Path, cfg: DictConfig, device: torch.device) -> Discriminator:
    """D of a snapshot: ``D.pt`` (DDP engine) or the module weights in DeepSpeed's model-states
    file (``D/deepspeed/mp_rank_00_model_states.pt``), both read weights-only, in eval mode."""
    _, d = build_models(cfg)
    ddp, ds = snapshot / "D.pt", snapshot / "D" / "deepspeed" / "mp_rank_00_model_states.pt"
    if ddp.is_file():
        state = load_torch(ddp)["model"]
    elif ds.is_file():
        state = load_torch(ds)["module"]
    else:
        raise SystemExit(f"--net D: snapshot {snapshot} holds no discriminator weights "
                         f"(neither {ddp.name} nor {ds.relative_to(snapshot)})")
    d.load_state_dict(state)
    return d.to(device).eval()


def run_shards(cfg: DictConfig, snapshot: Path) -> str:
    """The shard pattern a run trained on: ``data.shards``, or the digits shards in its run directory."""
    if cfg.data.source == "shards":
        if cfg.data.shards == checkpoint.SHARDS_NOT_STORED:  # a command never comes from a file read
            raise SystemExit(f"--data: the snapshot {snapshot} was trained on shards read through a command or "
                             "URL, which is never taken from a stored config; name them: --data 'PATTERN'")
        return str(cfg.data.shards)
    from sagan_dist.data.sources import DIGITS_SHARDS, DIGITS_SPLIT

    run_dir = snapshot.parent.parent  # <run_dir>/checkpoints/<snapshot>
    return str(run_dir / "data" / f"{DIGITS_SPLIT}-{{000000..{DIGITS_SHARDS - 1:06d}}}.tar")


def real_batch(cfg: DictConfig, shards: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N real images (center crop, no flip) and labels from ``shards`` through the training reader."""
    from sagan_dist.data import build_loader

    data = config.to_container(cfg)
    data["train"].update(batch_size=n, accumulation=1)
    data["data"].update(workers=0, crop="center", flip=False)
    try:
        stream = build_loader(config.from_container(data), shards, 0, 1, seed)
        images, labels = next(stream)
    except ValueError as e:
        raise SystemExit(f"--data {shards!r}: {e}") from None
    stream.close()
    return images, labels


# ------------------------------------------------------------------------------ the command
def parse_at(text: str | None) -> list[tuple[float, float]] | None:
    if not text:
        return None
    try:
        pts = [tuple(float(v) for v in p.split(",")) for p in text.split(";") if p.strip()]
    except ValueError:
        pts = []
    if not pts or any(len(p) != 2 or not all(0 <= v < 1 for v in p) for p in pts):
        raise SystemExit(f"--at {text!r}: expected 'ROW,COL;ROW,COL;...' with fractions of the map "
                         "in [0, 1), e.g. '0.25,0.5;0.75,0.5'")
    return pts  # type: ignore[return-value]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a snapshot directory, its state.pt, a run directory "
                                           "(then its newest valid snapshot), or an MLflow model "
                                           "(models:/NAME@ALIAS, --net G only)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--n", type=int, default=4, help="images, one row each (default 4)")
    parser.add_argument("--points", type=int, default=4,
                        help="query positions per layer, spread over the map (default 4)")
    parser.add_argument("--at", default=None, help="query positions instead of --points: 'ROW,COL;...' "
                                                   "as fractions of the map in [0, 1), e.g. '0.5,0.5'")
    parser.add_argument("--net", choices=("G", "D"), default="G",
                        help="G: the EMA generator on its samples (default); D: the discriminator on "
                             "real images (needs --data)")
    parser.add_argument("--data", nargs="?", const="", default=None, metavar="SHARDS",
                        help="with --net D: real images from SHARDS, or without a value from the "
                             "run's own shards")
    parser.add_argument("--classes", default=None,
                        help="comma-separated class indices of G's images (default: all)")
    parser.add_argument("--truncation", type=float, default=0.0, help="truncation of z; 0 = off (default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of z, or of the data shuffle (default 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _check_args(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise SystemExit(f"--n {args.n}: must be >= 1 (images to show)")
    if args.points < 1:
        raise SystemExit(f"--points {args.points}: must be >= 1 (query positions per layer)")
    if args.net == "D" and args.data is None:
        raise SystemExit("--net D shows D's attention on real images: add --data (the run's own "
                         "shards) or --data 'PATTERN' (webdataset shards)")
    if args.net == "G" and args.data is not None:
        raise SystemExit("--data is for --net D; G's maps are of its own samples")
    parse_at(args.at)  # refuse a malformed --at before loading anything


Shown = tuple[torch.Tensor, torch.Tensor, dict[str, LayerMaps]]  # images, labels, maps


@torch.no_grad()
def _generated(g: Generator, args: argparse.Namespace) -> Shown:
    device = next(g.parameters()).device
    labels = spread_labels(args.n, parse_classes(args.classes, g.num_classes)).to(device)
    gen = torch.Generator().manual_seed(args.seed)  # CPU: one --seed, the same z on every device
    z = truncated_normal((args.n, g.z_dim), args.truncation, gen, device)
    maps, images = layer_maps(g, lambda: g(z, labels), args.points, parse_at(args.at))
    return images, labels, maps


@torch.no_grad()
def _real(args: argparse.Namespace, snapshot: Path, cfg: DictConfig) -> Shown:
    device = torch.device(args.device)
    d = load_discriminator(snapshot, cfg, device)
    images, labels = real_batch(cfg, args.data or run_shards(cfg, snapshot), args.n, args.seed)
    images, labels = images.to(device), labels.to(device)
    maps, _ = layer_maps(d, lambda: d(images, labels), args.points, parse_at(args.at))
    return images, labels, maps


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from sagan_dist.serving.registry import is_model_uri

    if is_model_uri(args.checkpoint) and args.net == "D":
        raise SystemExit(f"--net D: {args.checkpoint} is an MLflow model, which holds only the generator; "
                         "give a snapshot for the discriminator")
    snapshot = args.checkpoint if is_model_uri(args.checkpoint) else checkpoint.resolve_snapshot(args.checkpoint)
    g, cfg = load_generator(snapshot, torch.device(args.device))
    try:
        images, labels, maps = _generated(g, args) if args.net == "G" else _real(args, snapshot, cfg)
    except ValueError as e:  # a point count the map cannot hold, a model without attention
        raise SystemExit(str(e)) from None
    paths = write_sheets(to_uint8(images), maps, args.net, lambda name: args.out / f"{name}.png",
                         labels.tolist())
    save_torch({"maps": {n: lm.maps for n, lm in maps.items()},
                "points": {n: lm.points for n, lm in maps.items()},
                "map_size": {n: list(lm.map_size) for n, lm in maps.items()},
                "labels": labels.cpu(), "net": args.net}, args.out / "maps.pt")
    for name, value in layer_metrics(maps).items():
        print(f"{name} {value:.3f}")
    print(f"wrote {', '.join(p.name for p in paths.values())} and maps.pt to {args.out}")
    return 0
