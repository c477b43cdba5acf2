"""make-shards: an ImageFolder tree with bad files -> shards, index, report; only regular files read;
stopped at once by SIGTERM/SIGINT, its workers with it; resumable after SIGKILL."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sagan_dist import cli
from sagan_dist.data.shards import main as make_shards, parse_size

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["n01440764", "n01443537", "n01484850"]
PER_CLASS = 8
SHORT_SIDE = 48


def _jpeg(rng: np.random.Generator, w: int, h: int, mode: str = "RGB") -> bytes:
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_tree(root: Path, seed: int = 0) -> dict[str, list[str]]:
    """3 classes x 8 images (sizes both sides of SHORT_SIDE, grayscale, CMYK, PNG) plus bad files.

    Returns the relative paths of the good images per class, and of the bad and ignored files.
    """
    rng = np.random.default_rng(seed)
    good: list[str] = []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            rel = f"{name}/{name}_{i}.JPEG"
            mode = {0: "L", 1: "CMYK"}.get(i, "RGB") if c == 0 else "RGB"
            (root / rel).write_bytes(_jpeg(rng, int(rng.integers(30, 90)), int(rng.integers(30, 90)), mode))
            good.append(rel)
    png = Image.fromarray(rng.integers(0, 256, (60, 70, 4), dtype=np.uint8), "RGBA")
    png.save(root / CLASSES[1] / "alpha.png")
    good.append(f"{CLASSES[1]}/alpha.png")
    (root / CLASSES[0] / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = _jpeg(rng, 80, 60)
    (root / CLASSES[2] / "truncated.JPEG").write_bytes(truncated[: len(truncated) // 2])
    (root / CLASSES[2] / "README.txt").write_text("not an image")
    return {"good": good, "bad": [f"{CLASSES[0]}/corrupt.jpg", f"{CLASSES[2]}/truncated.JPEG"],
            "ignored": [f"{CLASSES[2]}/README.txt"]}


def read_report(out: Path, split: str = "train") -> list[dict[str, str]]:
    """``{split}-skipped.jsonl``: every line one JSON object with a path and a reason."""
    lines = (out / f"{split}-skipped.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(sorted(row) == ["path", "reason"] for row in rows), rows
    return rows


# Run as `python -c HANG_SCRIPT args...`: make-shards, where the decode of a file holding exactly
# b"HANG" never ends, so that a signal lands for certain while a worker is inside a shard.
HANG_SCRIPT = """
import sys, time
from sagan_dist.data import shards
encode = shards.encode_image
def hang_on_marker(raw, opts):
    if raw == b"HANG":
        time.sleep(3600)
    return encode(raw, opts)
shards.encode_image = hang_on_marker
sys.exit(shards.main(sys.argv[1:]))
"""


def read_shards(out: Path, split: str = "train") -> list[dict[str, bytes]]:
    """Every sample of every final shard, grouped by key (tarfile, not webdataset: independent)."""
    samples: list[dict[str, bytes]] = []
    for path in sorted(out.glob(f"{split}-*.tar")):
        by_key: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                by_key.setdefault(key, {"__key__": key.encode(), "__shard__": path.name.encode()})[ext] = \
                    tar.extractfile(member).read()
        samples.extend(by_key.values())
    return samples


def test_make_shards_writes_every_readable_image_once_with_its_class(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    rc = cli.main(["make-shards", str(tmp_path / "src"), str(out), "--per-shard", "5",
                   "--short-side", str(SHORT_SIDE), "--workers", "2"])
    assert rc == 0
    assert json.loads((out / "classes.json").read_text()) == {n: i for i, n in enumerate(CLASSES)}
    index = json.loads((out / "train-index.json").read_text())
    n_files = len(files["good"]) + len(files["bad"])
    assert len(index["shards"]) == -(-n_files // 5) and index["pattern"] == "train-{000000..000005}.tar"
    assert index["total"] == len(files["good"]) and index["skipped"] == 2 and index["ignored"] == 1

    samples = read_shards(out)
    assert len(samples) == len({s["__key__"] for s in samples}) == len(files["good"])
    counts = {s["__shard__"].decode(): 0 for s in samples}
    for s in samples:
        counts[s["__shard__"].decode()] += 1
    assert counts == {sh["name"]: sh["samples"] for sh in index["shards"] if sh["samples"]}
    assert sorted(json.loads(s["json"])["path"] for s in samples) == sorted(files["good"])
    for s in samples:
        meta = json.loads(s["json"])
        assert int(s["cls"]) == CLASSES.index(meta["class"]) == CLASSES.index(meta["path"].split("/")[0])
        with Image.open(io.BytesIO(s["jpg"])) as img:
            assert img.format == "JPEG" and img.mode in ("RGB", "L")
            # downscaled to the short side, never upscaled
            assert min(img.size) == min(SHORT_SIDE, min(meta["size"]))

    assert sorted(row["path"] for row in read_report(out)) == sorted(files["bad"])
    assert not list(out.rglob("*.partial"))


def test_keep_original_stores_the_original_bytes(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src", seed=1)
    out = tmp_path / "out"
    assert make_shards([str(tmp_path / "src"), str(out), "--keep-original",
                     "--per-shard", "100", "--workers", "1", "--split", "val"]) == 0
    samples = read_shards(out, "val")
    assert len(samples) == len(files["good"])
    for s in samples:
        rel = json.loads(s["json"])["path"]
        stored = s.get("jpg", s.get("png"))
        assert stored == (tmp_path / "src" / rel).read_bytes()


def test_rerun_reuses_complete_shards_and_refuses_other_options(tmp_path: Path, capsys) -> None:
    make_tree(tmp_path / "src")
    out = tmp_path / "out"
    args = [str(tmp_path / "src"), str(out), "--per-shard", "7", "--workers", "1"]
    assert make_shards(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    capsys.readouterr()
    assert make_shards(args) == 0
    assert "4 already complete, 0 to write" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")} == before
    assert make_shards(args[:-4] + ["--per-shard", "8", "--workers", "1"]) == 2
    assert "per_shard: 7 then, 8 now" in capsys.readouterr().err


def test_shard_size_sets_samples_per_shard_from_encoded_sizes(tmp_path: Path) -> None:
    assert parse_size("1GB") == 1e9 and parse_size("512MiB") == 512 * 2**20 and parse_size("300kb") == 3e5
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")
    make_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert make_shards([str(tmp_path / "src"), str(out), "--shard-size", "40KB",
                     "--short-side", str(SHORT_SIDE), "--workers", "1"]) == 0
    sizes = [p.stat().st_size for p in sorted(out.glob("train-*.tar"))[:-1]]  # the last one is a rest
    assert len(sizes) >= 2 and all(20e3 < s < 60e3 for s in sizes), sizes


def _stats_done(out: Path) -> int:
    return len([p for p in (out / ".train-parts").glob("0*.json")])


def test_writer_killed_with_sigkill_resumes_without_duplicates(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src")
    # An image whose decode hangs (HANG_SCRIPT), so the kill below lands for certain while one
    # shard is half-written and the others are done.
    stuck = tmp_path / "src" / CLASSES[1] / "zz_hung.JPEG"
    stuck.write_bytes(b"HANG")
    out = tmp_path / "out"
    args = [str(tmp_path / "src"), str(out), "--per-shard", "4", "--short-side", str(SHORT_SIDE), "--workers", "2"]
    cmd = [sys.executable, "-c", HANG_SCRIPT, *args]
    n_shards = -(-(len(files["good"]) + len(files["bad"]) + 1) // 4)
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while _stats_done(out) < n_shards - 1:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer did not get to the hung shard"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the writer and its worker processes
        proc.wait()
    finals = sorted(out.glob("train-*.tar"))
    assert len(finals) == n_shards - 1  # the hung shard is not under its final name ...
    assert list(out.glob(".train-*.partial"))  # ... only under its temporary one
    for path in finals:  # and what is under a final name is a complete tar
        with tarfile.open(path) as tar:
            assert len(tar.getmembers()) % 3 == 0
    kept = {p.name: p.stat().st_mtime_ns for p in finals}

    stuck.unlink()
    stuck.write_bytes(_jpeg(np.random.default_rng(5), 64, 64))
    assert make_shards(args) == 0
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not rewritten
    samples = read_shards(out)
    paths = [json.loads(s["json"])["path"] for s in samples]
    assert len(paths) == len(set(paths)) == len(files["good"]) + 1
    assert set(paths) == set(files["good"]) | {f"{CLASSES[1]}/zz_hung.JPEG"}
    assert json.loads((out / "train-index.json").read_text())["total"] == len(paths)
    assert not list(out.rglob("*.partial"))


def test_symlinked_folders_are_skipped_and_reported_symlinked_files_read(tmp_path: Path, caplog) -> None:
    files = make_tree(tmp_path / "src")
    src = tmp_path / "src"
    (src / CLASSES[0] / "loop").symlink_to("..")  # a loop: followed, it would never end
    (src / "zz_alias").symlink_to(CLASSES[1])  # a symlinked class folder: a second label for its images
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "real.JPEG").write_bytes(_jpeg(np.random.default_rng(9), 50, 50))
    os.mkfifo(outside / "fifo")
    (src / CLASSES[2] / "linked.JPEG").symlink_to(outside / "real.JPEG")  # read: a regular file
    (src / CLASSES[2] / "fifo.JPEG").symlink_to(outside / "fifo")  # skipped: would block for ever
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="sagan_dist.data.shards"):
        assert make_shards([str(src), str(out), "--per-shard", "100", "--workers", "1"]) == 0
    index = json.loads((out / "train-index.json").read_text())
    assert index["num_classes"] == len(CLASSES) and index["skipped_folders"] == 2
    paths = sorted(json.loads(s["json"])["path"] for s in read_shards(out))
    assert paths == sorted(files["good"] + [f"{CLASSES[2]}/linked.JPEG"])
    report = {row["path"]: row["reason"] for row in read_report(out)}
    assert "symlinked folder" in report[f"{CLASSES[0]}/loop/"] and "symlinked folder" in report["zz_alias/"]
    assert "not a regular file" in report[f"{CLASSES[2]}/fifo.JPEG"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "loop" in warned and "zz_alias" in warned


def test_planted_symlinks_in_out_are_replaced_never_written_through(tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in ("classes.json", "train-index.json", f".train-000000.tar.{os.getpid()}.partial"):
        (out / name).symlink_to(victim)
    assert make_shards([str(tmp_path / "src"), str(out), "--per-shard", "100", "--workers", "1"]) == 0
    assert victim.read_text() == "precious"
    assert not (out / "classes.json").is_symlink() and json.loads((out / "classes.json").read_text())


def test_stale_partials_are_told_from_live_ones_by_their_lock_not_their_pid(tmp_path: Path) -> None:
    from sagan_dist.data.shardfiles import remove_stale_partials
    dead = tmp_path / f".train-000000.tar.{os.getpid()}.partial"  # a live pid (ours), yet nobody writes it
    dead.write_bytes(b"half a tar")
    live = tmp_path / ".train-000001.tar.1.partial"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'wb'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(600)"), str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        assert remove_stale_partials(tmp_path) == 1
        assert not dead.exists() and live.exists()  # an orphaned writer still writing is left alone
    finally:
        writer.kill()
        writer.wait()
    assert remove_stale_partials(tmp_path) == 1 and not live.exists()


def _make_shards_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sagan_dist.cli", "make-shards", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_fifos_and_devices_with_image_names_are_skipped_with_the_reason_never_opened(tmp_path: Path) -> None:
    """Opened, the FIFO blocks for ever and /dev/zero never ends; both are judged by stat first."""
    files = make_tree(tmp_path / "src")
    src = tmp_path / "src"
    os.mkfifo(src / CLASSES[0] / "x.jpg")  # in the tree itself, not behind a symlink
    (src / CLASSES[1] / "zero.JPEG").symlink_to("/dev/zero")
    out = tmp_path / "out"
    done = _make_shards_cli(str(src), str(out), "--per-shard", "4", "--short-side", str(SHORT_SIDE),
                            "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    report = {row["path"]: row["reason"] for row in read_report(out)}
    assert report[f"{CLASSES[0]}/x.jpg"] == "ValueError: not a regular file: a FIFO"
    assert report[f"{CLASSES[1]}/zero.JPEG"] == "ValueError: not a regular file: a character device"
    assert sorted(report) == sorted([*files["bad"], f"{CLASSES[0]}/x.jpg", f"{CLASSES[1]}/zero.JPEG"])
    assert json.loads((out / "train-index.json").read_text())["total"] == len(files["good"])
    assert "train-skipped.jsonl" in done.stdout


def test_an_out_that_is_a_file_is_one_line_naming_it(tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    (tmp_path / "out").write_text("a file")
    done = _make_shards_cli(str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("sagan-dist make-shards: error: ") and str(tmp_path / "out") in line


def test_names_with_newlines_and_tabs_are_one_report_row_each(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "src")
    src = tmp_path / "src"
    odd = [f"{CLASSES[0]}/two\nlines.jpg", f"{CLASSES[1]}/a\tfake\trow.jpg", f"{CLASSES[2]}/\n.JPEG",
           f"{CLASSES[2]}/undecodable-\udcff.jpg"]  # a byte that is not UTF-8, as os.walk returns it
    for rel in odd:
        (src / rel).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    assert make_shards([str(src), str(out), "--per-shard", "100", "--workers", "1"]) == 0
    assert sorted(row["path"] for row in read_report(out)) == sorted([*files["bad"], *odd])
    assert len((out / "train-skipped.jsonl").read_bytes().split(b"\n")) == len(files["bad"]) + len(odd) + 1


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc: no psutil needed)."""
    found = set()
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat_file.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running, and not a zombie (a container's PID 1 may never reap the orphans it inherits)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_a_signal_to_the_writer_alone_ends_its_workers_and_a_rerun_finishes(tmp_path: Path, signum, status) -> None:
    """The signal goes to the writer only (as `timeout` or `kill PID` send it), while one worker is
    stuck in a decode: the writer ends at once, with 128 + the signal's number and one line saying
    how to go on, and no worker outlives it (killed by the writer, or by their death signal)."""
    files = make_tree(tmp_path / "src")
    stuck = tmp_path / "src" / CLASSES[1] / "zz_hung.JPEG"
    stuck.write_bytes(b"HANG")
    out = tmp_path / "out"
    args = [str(tmp_path / "src"), str(out), "--per-shard", "4", "--short-side", str(SHORT_SIDE), "--workers", "2"]
    n_shards = -(-(len(files["good"]) + len(files["bad"]) + 1) // 4)
    stderr = tmp_path / "stderr"  # a file, not a pipe: a worker that outlived the writer would hold a pipe open
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", HANG_SCRIPT, *args], cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while _stats_done(out) < n_shards - 1:
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "the writer did not get to the hung shard"
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid, signum)
        assert proc.wait(timeout=30) == status, stderr.read_text()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers)), "a worker outlived the writer"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if signum != signal.SIGKILL:
        name = signal.Signals(signum).name
        assert stderr.read_text().strip().splitlines() == [
            f"sagan-dist make-shards: stopped by {name}; finished shards are kept: run the same command again "
            "to write the rest"]
    stuck.write_bytes(_jpeg(np.random.default_rng(5), 64, 64))
    assert make_shards(args) == 0
    assert json.loads((out / "train-index.json").read_text())["total"] == len(files["good"]) + 1
    assert not list(out.rglob("*.partial"))
