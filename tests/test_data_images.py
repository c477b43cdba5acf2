"""Images of every PIL mode, as real files, through make-shards and through the reader: converted
pixel values within 1 grey level of what the mode means; the pixel cap read from the header."""
from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from sagan_dist.data import build_loader
from sagan_dist.data.images import ImageRejected, to_rgb
from sagan_dist.data.loader import decode_image
from sagan_dist.data.shards import main as make_shards
from test_data_loader import make_cfg

SIDE = 64  # four 32 x 32 quadrants: top-left, top-right, bottom-left, bottom-right


def quadrants(values: list, dtype: str) -> np.ndarray:
    """A SIDE x SIDE (x channels) array whose quadrants hold ``values``."""
    a = np.array(values, dtype=dtype)
    tl, tr, bl, br = a
    def block(value: np.ndarray) -> np.ndarray:
        return np.full((32, 32) + value.shape, value, dtype)

    return np.concatenate([np.concatenate([block(tl), block(tr)], 1), np.concatenate([block(bl), block(br)], 1)], 0)


def _grey(levels: list[int]) -> list[tuple[int, int, int]]:
    return [(v, v, v) for v in levels]


def _palette_png() -> Image.Image:
    img = Image.fromarray(quadrants([0, 1, 2, 3], "uint8"), "P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * 756)
    img.info["transparency"] = 0  # palette entry 0 is transparent
    return img


def _rgba() -> Image.Image:
    return Image.fromarray(quadrants([(255, 0, 0, 0), (255, 0, 0, 255), (255, 0, 0, 128), (0, 0, 255, 255)],
                                     "uint8"), "RGBA")


# name -> (file format, image factory, expected RGB of each quadrant)
CASES: dict[str, tuple[str, Callable[[], Image.Image], list[tuple[int, int, int]]]] = {
    "i16_png": ("PNG", lambda: Image.fromarray(quadrants([0, 1000, 32768, 65535], "uint16")),
                _grey([0, 4, 128, 255])),
    "i16b_tiff": ("TIFF", lambda: Image.frombytes("I;16B", (SIDE, SIDE),
                                                  quadrants([0, 1000, 32768, 65535], "uint16").astype(">u2").tobytes()),
                  _grey([0, 4, 128, 255])),
    "i32_tiff": ("TIFF", lambda: Image.fromarray(quadrants([0, 2**20, 2**30, 2**31 - 1], "int32")),
                 _grey([0, 0, 128, 255])),
    "f32_tiff": ("TIFF", lambda: Image.fromarray(quadrants([0.0, 0.25, 0.5, 1.0], "float32")),
                 _grey([0, 64, 128, 255])),
    "p_transparent_png": ("PNG", _palette_png, [(128, 128, 128), (255, 0, 0), (0, 255, 0), (10, 20, 30)]),
    "la_png": ("PNG", lambda: Image.fromarray(quadrants([(200, 0), (200, 255), (0, 255), (255, 255)], "uint8"), "LA"),
               _grey([128, 200, 0, 255])),
    "rgba_png": ("PNG", _rgba, [(128, 128, 128), (255, 0, 0), (192, 64, 64), (0, 0, 255)]),
    "cmyk_tiff": ("TIFF", lambda: Image.fromarray(
        quadrants([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)], "uint8"), "CMYK"),
                  [(255, 255, 255), (0, 255, 255), (0, 0, 0), (255, 0, 0)]),
    "one_bit_png": ("PNG", lambda: Image.fromarray(quadrants([0, 255, 255, 0], "uint8")).convert("1"),
                    _grey([0, 255, 255, 0])),
    "l_png": ("PNG", lambda: Image.fromarray(quadrants([0, 77, 128, 255], "uint8")), _grey([0, 77, 128, 255])),
}


def _encode(fmt: str, img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"transparency": img.info["transparency"]} if "transparency" in img.info else {}))
    return buf.getvalue()


def _centres(rgb: np.ndarray) -> list[tuple[int, ...]]:
    """The pixel at the centre of each quadrant of an (H, W, 3) array."""
    h, w = rgb.shape[:2]
    return [tuple(int(c) for c in rgb[y, x]) for y in (h // 4, 3 * h // 4) for x in (w // 4, 3 * w // 4)]


def _assert_close(got: list[tuple[int, ...]], expected: list[tuple[int, int, int]], name: str) -> None:
    diff = np.abs(np.array(got, dtype=int) - np.array(expected, dtype=int)).max()
    assert diff <= 1, f"{name}: {got} != {expected}"


def test_files_of_each_mode_open_in_that_mode() -> None:
    modes = {name: Image.open(io.BytesIO(_encode(fmt, make()))).mode for name, (fmt, make, _) in CASES.items()}
    assert modes["i16_png"] == "I;16" and modes["i16b_tiff"] == "I;16B" and modes["i32_tiff"] == "I"
    assert modes["f32_tiff"] == "F" and modes["p_transparent_png"] == "P" and modes["cmyk_tiff"] == "CMYK"
    assert modes["la_png"] == "LA" and modes["rgba_png"] == "RGBA" and modes["one_bit_png"] == "1"


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_reader_converts_each_mode(name: str) -> None:
    fmt, make, expected = CASES[name]
    image = decode_image(_encode(fmt, make()), 32, "center", use_draft=True)
    _assert_close(_centres(image.permute(1, 2, 0).numpy()), expected, name)


def test_modes_without_a_file_format_convert_too() -> None:
    ycbcr = Image.fromarray(quadrants([(128, 128, 128), (255, 128, 128), (0, 128, 128), (76, 85, 255)], "uint8"),
                            "YCbCr")
    _assert_close(_centres(np.asarray(to_rgb(ycbcr))), [(128, 128, 128), (255, 255, 255), (0, 0, 0), (254, 0, 0)],
                  "YCbCr")
    pa = Image.fromarray(quadrants([(1, 0), (1, 255), (2, 255), (2, 0)], "uint8"), "PA")
    pa.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    _assert_close(_centres(np.asarray(to_rgb(pa))), [(128, 128, 128), (255, 0, 0), (0, 255, 0), (128, 128, 128)], "PA")


def test_a_float_image_of_unknown_scale_is_refused_with_the_reason() -> None:
    img = Image.fromarray(quadrants([0.0, 3.5, 1.0, 0.5], "float32"))
    with pytest.raises(ImageRejected, match=r"outside \[0, 1\].*max 3\.5"):
        to_rgb(img)


def test_make_shards_converts_each_mode_and_the_reader_reads_the_originals(tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = sorted(CASES)
    for name in names:
        fmt, make, _ = CASES[name]
        (src / name).mkdir(parents=True)
        (src / name / f"{name}.{'png' if fmt == 'PNG' else 'tiff'}").write_bytes(_encode(fmt, make()))
    (src / "l_png" / "huge.png").write_bytes(_encode("PNG", Image.new("L", (200, 100))))
    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--quality", "100", "--per-shard", "100", "--workers", "1",
                        "--max-pixels", "10000"]) == 0
    with tarfile.open(out / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    converted = {}
    for key in {n.split(".")[0] for n in members}:
        meta = json.loads(members[f"{key}.json"])
        with Image.open(io.BytesIO(members[f"{key}.jpg"])) as img:
            converted[meta["class"]] = _centres(np.asarray(img.convert("RGB")))
    assert sorted(converted) == names
    for name in names:
        _assert_close(converted[name], CASES[name][2], f"make-shards {name}")
    report = [json.loads(line) for line in (out / "train-skipped.jsonl").read_text().splitlines()]
    rejected = "ImageRejected: 200 x 100 pixels (0.0 Mpx) is over --max-pixels = 10000"
    assert {"path": "l_png/huge.png", "reason": rejected} in report

    # The original bytes in the shards, converted by the reader: one class per mode, one batch.
    kept = tmp_path / "kept"
    assert make_shards([str(src), str(kept), "--keep-original", "--per-shard", "100", "--workers", "1"]) == 0
    pattern = str(kept / "train-000000.tar")
    cfg = make_cfg(pattern, batch=len(names) + 1, world=1, num_classes=len(names), shuffle_buffer=0)
    images, labels = build_loader(cfg, pattern, 0, 1, seed=0).next_batch()
    for image, label in zip(images, labels.tolist()):
        if label == names.index("l_png") and image.abs().max() == 1 and (image == -1).all():
            continue  # huge.png: all black
        rgb = ((image.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        _assert_close(_centres(rgb), CASES[names[label]][2], f"reader {names[label]}")


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring ``width`` x ``height`` 8-bit grey, and no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def test_the_pixel_cap_is_checked_from_the_header_before_decoding(tmp_path: Path, caplog) -> None:
    bomb = _png_header_only(12_000, 12_000)  # 144 Mpx declared in a few hundred bytes: PIL only warns
    with pytest.raises(ImageRejected, match=r"12000 x 12000 pixels \(144\.0 Mpx\) is over data\.max_pixels = 64000000"):
        decode_image(bomb, 32, max_pixels=64_000_000)
    with pytest.raises(ImageRejected, match=r"10000000000 pixels.* data\.max_pixels = 64000000"):
        decode_image(_png_header_only(100_000, 100_000), 32, max_pixels=64_000_000)  # PIL's own error
    from test_data_loader import write_id_shards
    shards = write_id_shards(tmp_path, [8], {0: [{"__key__": "bomb", "png": bomb, "cls": 1}]})
    stream = build_loader(make_cfg(shards, batch=4, world=1), shards, 0, 1, seed=0)
    with caplog.at_level(logging.WARNING, logger="sagan_dist.data.loader"):
        stream.next_batch()
        stream.next_batch()
    assert stream.skipped == 1
    assert any("'bomb'" in r.getMessage() and "data.max_pixels" in r.getMessage() for r in caplog.records)
    stream.close()
