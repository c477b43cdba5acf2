"""Drawing attention maps: one PNG sheet per layer, as in the SAGAN paper's figure of attention maps.

A sheet has one row per image: the image with its K query points marked in distinct colours, then
for each point its attention map (a colour map of the weights, blended over the image in grey)
with that point marked again and a bar of its colour on top. Maps are scaled per map to their own
maximum for display, so a diffuse map and a peaked one are both visible; the true weights are in
``maps.pt``, and each map's corner gives its largest weight as a multiple of the uniform one.
Maps are enlarged with nearest-neighbour sampling: each key cell shows as the block of
image pixels it covers (2 x 2 feature-map pixels when keys are pooled), nothing is smoothed in.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# Distinct colours for the query points (matplotlib's tab10), cycled beyond ten points.
POINT_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
# The "inferno" colour map at eight stops (dark = little weight, light yellow = the most).
INFERNO = torch.tensor([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66),
                        (245, 125, 21), (250, 193, 39), (252, 255, 164)], dtype=torch.float32)
MIN_TILE = 128  # small images (32 px) are enlarged to at least this many pixels per tile
PAD = 2
BAR = 3
HEADER = 14
# Share of the colour map in a blended tile: more where the weight is higher, so the image stays
# visible where a query does not look.
ALPHA_MIN, ALPHA_MAX = 0.35, 0.85


def colour_map(values: torch.Tensor) -> torch.Tensor:
    """(...,) values in [0, 1] -> (..., 3) float RGB in [0, 255] by linear interpolation of INFERNO."""
    x = values.clamp(0, 1) * (len(INFERNO) - 1)
    lo = x.floor().long().clamp(max=len(INFERNO) - 2)
    frac = (x - lo).unsqueeze(-1)
    return INFERNO[lo] * (1 - frac) + INFERNO[lo + 1] * frac


def tile_size(resolution: int) -> int:
    return resolution * math.ceil(MIN_TILE / resolution)


def _enlarge(t: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) -> (C, size, size), nearest neighbour (size is a multiple of h and w)."""
    return F.interpolate(t[None].float(), size=(size, size), mode="nearest")[0]


def overlay(image: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 image (3, R, R) and one map (h', w') -> uint8 (3, size, size): the map over the grey image."""
    grey = _enlarge(image, size).mean(0, keepdim=True).expand(3, -1, -1)
    peak = weights.max().clamp_min(1e-12)
    scaled = _enlarge((weights / peak)[None], size)  # (1, size, size) in [0, 1]
    heat = colour_map(scaled[0]).permute(2, 0, 1)
    alpha = ALPHA_MIN + (ALPHA_MAX - ALPHA_MIN) * scaled
    return ((1 - alpha) * grey + alpha * heat).round().clamp(0, 255).to(torch.uint8)


def _mark(draw: ImageDraw.ImageDraw, centre: tuple[float, float], colour: tuple[int, int, int],
          radius: float) -> None:
    x, y = centre
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(255, 255, 255))


def _point_centre(point: torch.Tensor, map_size: tuple[int, int], left: int, top: int,
                  size: int) -> tuple[float, float]:
    """Image coordinates of the centre of feature-map pixel (row, col) in a tile at (left, top)."""
    row, col = (int(v) for v in point)
    h, w = map_size
    return left + (col + 0.5) * size / w, top + (row + 0.5) * size / h


def render_sheet(images: torch.Tensor, maps: torch.Tensor, points: torch.Tensor,
                 map_size: tuple[int, int], title: str, labels: list[int] | None = None) -> Image.Image:
    """The sheet of one layer: uint8 images (N, 3, R, R), maps (N, K, h', w'), points (K, 2)."""
    n, k = maps.shape[:2]
    size = tile_size(images.shape[-1])
    step = size + BAR + PAD
    sheet = Image.new("RGB", (PAD + (k + 1) * (size + PAD), HEADER + n * step + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, 1), title, fill=(0, 0, 0))
    radius = max(2.5, size / 36)
    for i in range(n):
        top = HEADER + i * step + BAR
        sheet.paste(_pil(_enlarge(images[i], size).round().to(torch.uint8)), (PAD, top))
        if labels is not None:
            draw.text((PAD + 2, top + 1), f"class {labels[i]}", fill=(255, 255, 255))
        for j in range(k):
            colour = POINT_COLOURS[j % len(POINT_COLOURS)]
            _mark(draw, _point_centre(points[j], map_size, PAD, top, size), colour, radius)
            left = PAD + (j + 1) * (size + PAD)
            sheet.paste(_pil(overlay(images[i], maps[i, j], size)), (left, top))
            draw.rectangle([left, top - BAR, left + size - 1, top - 1], fill=colour)
            _mark(draw, _point_centre(points[j], map_size, left, top, size), colour, radius)
            _peak_label(draw, maps[i, j], left, top + size)
    return sheet


def _peak_label(draw: ImageDraw.ImageDraw, weights: torch.Tensor, left: int, bottom: int) -> None:
    """The map's largest weight as a multiple of the uniform weight: the colours are scaled per map,
    so this tells a peaked map (e.g. 40x) from a nearly flat one (1.2x) that looks as bright."""
    text = f"{float(weights.max()) * weights.numel():.1f}x"
    box = draw.textbbox((left + 2, bottom - 12), text)
    draw.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], fill=(0, 0, 0))
    draw.text((left + 2, bottom - 12), text, fill=(255, 255, 255))


def _pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy())
