"""Write webdataset tar shards: ``sagan-dist make-shards SRC OUT`` and the primitives it shares.

``make-shards`` turns an ImageFolder tree (``SRC/<class>/<image>``, e.g. ImageNet's ``train/``
with one folder per synset) into ``OUT/{split}-000000.tar, ...``. Each sample holds

* ``.jpg`` -- the image, downscaled so its short side is ``--short-side`` (JPEG, ``--quality``),
  or the original bytes with ``--keep-original`` (or when no downscale is needed);
* ``.cls`` -- the class index, from the sorted class folder names;
* ``.json`` -- class name, path relative to SRC, original size.

and next to the shards: ``classes.json`` (class name -> index), ``{split}-index.json`` (shards
with their sample counts, the total, the brace pattern to put in ``data.shards``) and
``{split}-skipped.jsonl`` (one JSON object per line, ``{"path": ..., "reason": ...}``: images that
could not be read, files that are not regular files, symlinked folders). JSON lines, because a
file name may hold a tab or a newline, which would add rows to a tab-separated report.

Images of any mode are converted to RGB by images.to_rgb (16-bit grayscale scaled, transparency on
mid-grey); an image of more than ``--max-pixels`` (read from its header) is skipped.

Only regular files are read: a FIFO, a device or a socket with an image's name is skipped with the
reason, judged before it is opened (opening a FIFO waits for a writer, for ever). Symbolic links:
a symlinked *folder* (a class folder, or one inside a class) is not followed -- a link can loop, or
repeat another class's images under a second label -- and is reported (a warning and a line in
the report). A symlinked *file* is read if its target is a regular file (how subsets of a dataset
are often assembled); a link to anything else (a FIFO, a device, nothing) is skipped.

SIGTERM or SIGINT stops the command at once: the writer processes are killed (they also die with
it, whatever kills it), finished shards are kept, and the same command run again writes the rest;
the exit status is 143 (SIGTERM) or 130 (SIGINT).

The file list is shuffled (``--seed``) before it is cut into shards, so every shard mixes all
classes; the cut is fixed by a plan saved in ``OUT/.{split}-parts/`` on the first run. That makes
the run resumable: shards are written in parallel (``--workers``), each to a temporary name and
renamed only when complete, so a rerun after a crash or a kill skips the finished ones and never
sees a half-written tar under a final name (shardfiles.py: how temporaries are made safe and
how a rerun tells a dead writer's from a live one's). A rerun on a changed SRC or with other
options is refused rather than mixing two plans.

webdataset's ``ShardWriter`` is not used: it names shards as it goes, which cannot be resumed or
parallelised; ``TarWriter`` writes each planned shard.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import signal
import stat
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image

from sagan_dist import fsio
from sagan_dist.data.images import open_capped, to_rgb
from sagan_dist.data.procs import kill_group, obey_parent_only
from sagan_dist.data.shardfiles import remove_stale_partials, shard_name, write_json, write_metadata, write_shard

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as is with --keep-original
SAMPLE_OVERHEAD = 2560  # tar headers and padding of a sample's 3 members, plus .cls and .json
PILOT_IMAGES = 32  # images encoded to estimate the bytes per sample for --shard-size
MAX_PIXELS = 64_000_000  # default of --max-pixels (and of data.max_pixels)
SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]?i?b?)\s*$", re.IGNORECASE)

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """make-shards cannot start or continue: bad SRC, or OUT holds another plan."""


class Stopped(Exception):
    """SIGTERM or SIGINT reached make-shards (raised in the main thread by its signal handler)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ------------------------------------------------------------------------------ the source tree
@dataclass(frozen=True)
class Options:
    """What decides the shards' content; a rerun must use the same values."""
    split: str = "train"
    short_side: int = 292
    keep_original: bool = False
    quality: int = 95
    seed: int = 0
    per_shard: int = 0  # 0: derived from shard_size
    shard_size: float = 1e9
    max_pixels: int = MAX_PIXELS


@dataclass
class Scan:
    """What SRC holds: class names (sorted folders), (path relative to SRC, label) of each image,
    files ignored (not images), and (path, reason) of folders skipped (symlinks)."""
    classes: list[str]
    items: list[tuple[str, int]]
    ignored: int
    skipped: list[tuple[str, str]]


LINK_REASON = "symlinked folder: not followed (a link can loop or repeat another class's images)"


def scan_image_folder(src: Path) -> Scan:
    """The classes and images of ``src``; symlinked folders are skipped and warned about."""
    if not src.is_dir():
        raise ShardError(f"{src}: not a directory")
    skipped: list[tuple[str, str]] = []
    classes = []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if entry.is_symlink():
            skipped.append((entry.name + "/", LINK_REASON))
        else:
            classes.append(entry.name)
    if not classes:
        raise ShardError(f"{src}: no class folders (expected SRC/<class>/<image>, "
                         "e.g. ImageNet's train/n01440764/n01440764_10026.JPEG)")
    items: list[tuple[str, int]] = []
    ignored = 0
    for label, name in enumerate(classes):
        for root, dirs, files in os.walk(src / name):  # followlinks=False: see the docstring
            links = {d for d in dirs if os.path.islink(os.path.join(root, d))}
            skipped += [(os.path.relpath(os.path.join(root, d), src) + "/", LINK_REASON)
                        for d in sorted(links) if not d.startswith(".")]
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in links)
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    items.append((os.path.relpath(os.path.join(root, f), src), label))
                else:
                    ignored += 1
    for path, reason in skipped:
        log.warning("%s: skipped %s", src / path, reason)
    if not items:
        raise ShardError(f"{src}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {len(classes)} class folders")
    return Scan(classes, items, ignored, skipped)


def _fingerprint(classes: Sequence[str], items: Sequence[tuple[str, int]]) -> str:
    # os.fsencode: a name's bytes back (UTF-8, undecodable bytes included), not a UnicodeEncodeError.
    h = hashlib.sha256(os.fsencode("\n".join(classes)))
    for path, label in items:
        h.update(os.fsencode(f"\n{path}\t{label}"))
    return h.hexdigest()


# ------------------------------------------------------------------------------ one image
def encode_image(raw: bytes, opts: Options) -> tuple[bytes, str, tuple[int, int]]:
    """Bytes to store, their extension, and the original size; raises if the image is unreadable.

    The whole image is always decoded, so a truncated or corrupt file is caught here rather than
    by every training run that reads it.
    """
    with open_capped(raw, opts.max_pixels, "--max-pixels") as img:
        fmt, mode, size = img.format, img.mode, img.size
        target = None if opts.keep_original else _downscaled(size, opts.short_side)
        if target:
            img.draft("RGB", target)  # DCT-scaled JPEG decode, still >= target
        rgb = to_rgb(img)
        rgb.load()  # decode it all, here: a truncated file fails now
    keep = opts.keep_original or (target is None and fmt == "JPEG" and mode in ("RGB", "L"))
    if keep and fmt in KEPT_FORMATS:
        return raw, KEPT_FORMATS[fmt], size
    if target:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=opts.quality)
    return buf.getvalue(), "jpg", size


def _downscaled(size: tuple[int, int], short_side: int) -> tuple[int, int] | None:
    """The size with the short side at ``short_side``; None when the image is not larger."""
    scale = short_side / min(size)
    if scale >= 1:
        return None  # never upscale: the reader's crop resizes anyway, bigger files cost I/O
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` (through a symlink too) if it is a regular file, else ValueError.

    Checked before opening (opening a FIFO blocks until a writer comes; opening a device can act on
    it), and again on the open file: O_NONBLOCK keeps a FIFO swapped in between from blocking.
    """
    _require_regular(path.stat().st_mode)  # stat() follows a symlink, as open() does
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        _require_regular(os.fstat(fd).st_mode)
        return f.read()


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ValueError(f"not a regular file: {FILE_KINDS.get(stat.S_IFMT(mode), 'a special file')}")


def _sample(src: Path, rel: str, label: int, key: str, classes: Sequence[str], opts: Options) -> dict[str, Any]:
    data, ext, size = encode_image(read_regular_file(src / rel), opts)
    meta = {"class": classes[label], "path": rel, "size": list(size)}
    return {"__key__": key, ext: data, "cls": label, "json": meta}


# ------------------------------------------------------------------------------ one shard
@dataclass(frozen=True)
class ShardTask:
    src: str
    out: str
    index: int
    first: int  # position of the shard's first item in the shuffled list (for unique keys)
    items: tuple[tuple[str, int], ...]
    classes: tuple[str, ...]
    opts: Options


def write_planned_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard; unreadable images are skipped and listed. Runs in a worker process."""
    src, out, opts = Path(task.src), Path(task.out), task.opts
    skipped: list[list[str]] = []

    def samples() -> Iterator[dict[str, Any]]:
        for offset, (rel, label) in enumerate(task.items):
            try:
                yield _sample(src, rel, label, f"{task.first + offset:09d}", task.classes, opts)
            except Exception as e:  # any decode error: skip the image, never the run
                skipped.append([rel, _one_line(e)])

    path = out / shard_name(opts.split, task.index)
    count, size = write_shard(path, samples())
    # A shard is done once its stats exist too; a kill between the two only costs a rewrite.
    stats = {"name": path.name, "samples": count, "bytes": size, "skipped": skipped}
    write_json(_stats_path(out, opts.split, task.index), stats)
    return stats


def _one_line(e: Exception) -> str:
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file", str(e))
    return f"{type(e).__name__}: {text}".replace("\t", " ").replace("\n", " ")


def _parts_dir(out: Path, split: str) -> Path:
    return out / f".{split}-parts"


def _stats_path(out: Path, split: str, index: int) -> Path:
    return _parts_dir(out, split) / f"{index:06d}.json"


def _done_stats(out: Path, split: str, index: int) -> dict[str, Any] | None:
    if not (out / shard_name(split, index)).is_file():
        return None
    try:
        return json.loads(_stats_path(out, split, index).read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ the plan
def _load_or_create_plan(src: Path, out: Path, opts: Options, classes: Sequence[str],
                         items: Sequence[tuple[str, int]]) -> int:
    """Samples per shard, from OUT's saved plan or (first run) from the options; checks SRC."""
    path = _parts_dir(out, opts.split) / "plan.json"
    plan = {"fingerprint": _fingerprint(classes, items), "images": len(items), "classes": len(classes),
            "options": asdict(opts)}
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = [f"{k}: {v!r} then, {plan['options'][k]!r} now" for k, v in saved["options"].items()
                   if plan["options"].get(k) != v]
        if saved["fingerprint"] != plan["fingerprint"]:
            changed.insert(0, f"SRC's files: {saved['images']} images then, {len(items)} now (or renamed)")
        if changed:
            raise ShardError(f"{out} holds {opts.split!r} shards of another plan ({'; '.join(changed)}); "
                             "rerun with the same SRC and options, or write to a new OUT")
        return int(saved["per_shard"])
    per_shard = opts.per_shard or _per_shard_for_size(src, items, classes, opts)
    write_json(path, {**plan, "per_shard": per_shard})
    return per_shard


def _per_shard_for_size(src: Path, items: Sequence[tuple[str, int]], classes: Sequence[str],
                        opts: Options) -> int:
    """Samples per shard for ``--shard-size``, from the mean size of a few encoded images."""
    sizes = []
    for rel, label in items[:PILOT_IMAGES]:  # items are shuffled: a random pilot
        with contextlib.suppress(Exception):
            sample = _sample(src, rel, label, "0", classes, opts)
            sizes.append(sum(len(v) for k, v in sample.items() if isinstance(v, bytes)))
    mean = (sum(sizes) / len(sizes) if sizes else 0) + SAMPLE_OVERHEAD
    return max(1, int(opts.shard_size // mean))


# ------------------------------------------------------------------------------ the command
def make_shards(src: Path, out: Path, opts: Options, workers: int = 1, log=print) -> dict[str, Any]:
    """Write (or finish writing) the shards of ``src`` into ``out``; returns the index."""
    scan = scan_image_folder(src)
    classes, items, ignored = scan.classes, scan.items, scan.ignored
    random.Random(opts.seed).shuffle(items)
    _parts_dir(out, opts.split).mkdir(parents=True, exist_ok=True)
    per_shard = _load_or_create_plan(src, out, opts, classes, items)
    for folder in (out, _parts_dir(out, opts.split)):
        remove_stale_partials(folder)
    tasks = [ShardTask(str(src), str(out), i, first, tuple(items[first:first + per_shard]),
                       tuple(classes), opts)
             for i, first in enumerate(range(0, len(items), per_shard))]
    done = {t.index: s for t in tasks if (s := _done_stats(out, opts.split, t.index)) is not None}
    todo = [t for t in tasks if t.index not in done]
    log(f"{len(items)} images in {len(classes)} classes ({ignored} other files ignored) -> "
        f"{len(tasks)} shards of {per_shard}; {len(done)} already complete, {len(todo)} to write")
    done.update(_run_tasks(todo, workers, log))
    stats = [done[t.index] for t in tasks]
    _write_report(out, opts.split, scan.skipped, stats)
    skipped = sum(len(s["skipped"]) for s in stats)
    index = write_metadata(out, opts.split, classes,
                           [{k: s[k] for k in ("name", "samples", "bytes")} for s in stats],
                           {"skipped": skipped, "skipped_folders": len(scan.skipped), "ignored": ignored,
                            "options": asdict(opts)})
    # Again at the end: a writer killed just before this run started may have still held its lock
    # then (SIGKILL is asynchronous); by now it is gone.
    for folder in (out, _parts_dir(out, opts.split)):
        remove_stale_partials(folder)
    return index


def _run_tasks(tasks: Sequence[ShardTask], workers: int, log) -> dict[int, dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    start = time.monotonic()

    def report(task: ShardTask, stats: dict[str, Any]) -> None:
        results[task.index] = stats
        rate = len(results) / max(time.monotonic() - start, 1e-9)
        log(f"{stats['name']}: {stats['samples']} samples, {len(stats['skipped'])} skipped "
            f"({len(results)}/{len(tasks)}, {rate:.2f} shards/s)")

    if workers <= 1:
        for task in tasks:
            report(task, write_planned_shard(task))
        return results
    # fork: workers inherit the imported modules instead of re-importing torch (via webdataset).
    # The workers leave signals to this process and die with it (obey_parent_only).
    pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                       initializer=obey_parent_only, initargs=(os.getpid(),))
    try:
        pending = {pool.submit(write_planned_shard, t): t for t in tasks}
        for future in futures.as_completed(pending):
            report(pending[future], future.result())
    except BaseException:
        # Stopped, Ctrl-C or a dead worker: stop at once, not after the shards being written (a
        # shard cut short is a temporary file, removed by the rerun, which writes the rest).
        for proc in list((getattr(pool, "_processes", None) or {}).values()):  # executor internals
            kill_group(proc.pid)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Stopped` in the main thread while the block runs."""
    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _write_report(out: Path, split: str, folders: Sequence[tuple[str, str]], stats: Sequence[dict[str, Any]]) -> None:
    """``{split}-skipped.jsonl``: one ``{"path", "reason"}`` object a line. json.dumps escapes tabs,
    newlines and (ensure_ascii) the undecodable bytes of a name, so no name can add a line."""
    rows = [*folders, *(row for s in stats for row in s["skipped"])]
    fsio.atomic_write(out / f"{split}-skipped.jsonl",
                      "".join(json.dumps({"path": rel, "reason": err}) + "\n" for rel, err in rows))
    (out / f"{split}-skipped.tsv").unlink(missing_ok=True)  # an older version's report, now stale


def parse_size(text: str) -> float:
    """'1GB' -> 1e9, '512MiB' -> 536870912, '2000000' -> 2e6."""
    m = SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1GB, 500MB or 512MiB")
    unit = m["unit"].lower().rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = " kmgt".index(unit[:1] or " ")
    return float(m["num"]) * base ** power


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="ImageFolder root: SRC/<class>/<image> (e.g. ImageNet train/)")
    parser.add_argument("out", type=Path, help="output folder for the shards, index and report")
    parser.add_argument("--split", default="train", help="shard name prefix: OUT/{split}-000000.tar (default: train)")
    parser.add_argument("--short-side", type=int, default=292,
                        help="downscale so the short side is this many pixels (default 292, for 256 px training)")
    parser.add_argument("--keep-original", action="store_true",
                        help="store the original JPEG/PNG/WebP bytes (still checked for readability)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=parse_size, default=None,
                      help="target shard size such as 1GB or 200MB (default 1GB)")
    size.add_argument("--per-shard", type=int, default=0, help="images per shard (instead of --shard-size)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel writer processes (default: all CPUs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding (default 0)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"skip images of more pixels than this, read from the header before decoding "
                             f"(default {MAX_PIXELS:,}; a tiny PNG can declare gigabytes of pixels)")


def run(args: argparse.Namespace) -> int:
    if args.per_shard < 0 or args.short_side < 1 or not 1 <= args.quality <= 100 or \
            not re.fullmatch(r"[\w-]+", args.split) or args.max_pixels < 1:
        print("sagan-dist make-shards: error: need --per-shard >= 0, --short-side >= 1, "
              "1 <= --quality <= 100, --max-pixels >= 1 and a --split of letters, digits, _ or -",
              file=sys.stderr)
        return 2
    opts = Options(split=args.split, short_side=args.short_side, keep_original=args.keep_original,
                   quality=args.quality, seed=args.seed, per_shard=args.per_shard,
                   shard_size=0.0 if args.per_shard else (args.shard_size or 1e9), max_pixels=args.max_pixels)
    try:
        with _stopped_by_signals():
            index = make_shards(args.src, args.out, opts, workers=args.workers,
                                log=lambda msg: print(msg, flush=True))
    except Stopped as e:
        print(f"sagan-dist make-shards: stopped by {e}; finished shards are kept: run the same command "
              "again to write the rest", file=sys.stderr)
        return 128 + e.signum
    except ShardError as e:
        print(f"sagan-dist make-shards: error: {e}", file=sys.stderr)
        return 2
    except BrokenProcessPool:  # imported by name: futures.process exists only once a pool was made
        print("sagan-dist make-shards: error: a writer process died (out of memory?); finished shards "
              "are kept: run the same command again to write the rest", file=sys.stderr)
        return 1
    except OSError as e:  # OUT or SRC itself (not a folder, not writable, full): the message names the path
        print(f"sagan-dist make-shards: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {index['total']} samples in {len(index['shards'])} shards to {args.out} "
          f"({index['skipped']} unreadable images and {index['skipped_folders']} symlinked folders "
          f"skipped, listed in "
          f"{args.out / (args.split + '-skipped.jsonl')})\n"
          f"data.shards={args.out.resolve() / index['pattern']}  data.num_classes={index['num_classes']}")
    return 0 if index["total"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """make-shards alone, without importing the other commands (training, MLflow) as cli.py does."""
    parser = argparse.ArgumentParser(prog="sagan-dist make-shards",
                                     description="Write webdataset tar shards from an ImageFolder tree")
    configure_parser(parser)
    return run(parser.parse_args(argv))
