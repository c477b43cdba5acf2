"""One run directory, one trainer: a lock file that works on shared filesystems (NFS, PVCs).

``<run_dir>/run.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on NFS v3+ and local
filesystems; ``flock``/``fcntl`` locks are not reliable across NFS clients) and holds its owner:
host, boot id, pid namespace, pid and the pid's start time, a random token, and a heartbeat (wall
clock) that a background thread renews every ``LEASE_S / 4`` seconds. Another trainer takes the
lock over only when its owner is provably dead:

* same host, boot and pid namespace: the pid is gone, or is another process now (start time);
* the same host rebooted since (another boot id);
* otherwise (another host, another container): the heartbeat is older than the lease, which
  assumes the hosts' clocks agree to well under ``LEASE_S`` (NTP does). A lock whose heartbeat is
  more than half a lease old (two beats missed: a pod killed on another node) is waited out
  rather than refused, so a restarted job does not fail for it.

Otherwise it is refused with a message naming the owner. Take-over renames the stale file to a
name of the taker's own, checks it moved the stale owner's file (not a racer's fresh one) and
then creates the lock anew, so two takers cannot both win. All ranks of one job share the lock:
rank 0 takes it and tells the others (`hold`). A holder whose file was taken over (its heartbeat
stalled past the lease, so another trainer now owns the directory) exits at once instead of
writing beside the new owner.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from sagan_dist import dist, fsio
from sagan_dist.dist import DistInfo
from sagan_dist.errors import Reported

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
LEASE_S = 120.0  # a holder not heard of for this long, on another host, is taken to be dead


class RunDirLocked(RuntimeError, Reported):
    """Another live trainer owns the run directory."""


def _read_text(path: str) -> str:
    with contextlib.suppress(OSError), open(path) as f:
        return f.read().strip()
    return ""


def _start_time(pid: int) -> str:
    """The pid's start time in clock ticks since boot ('' if there is no such process)."""
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if stat else ""


def identity() -> dict[str, Any]:
    """Who this process is, as precisely as a later reader can check it."""
    pid = os.getpid()
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")  # two containers of one host share host and boot id
    except OSError:
        pid_ns = ""
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": pid_ns, "pid": pid, "pid_start": _start_time(pid)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def dead_because(owner: dict[str, Any], now: float, me: dict[str, Any]) -> Optional[str]:
    """Why the lock's owner is certainly gone, or None if it may still run."""
    same_host = owner.get("host") == me["host"] and owner.get("boot_id")
    if same_host and owner.get("boot_id") != me["boot_id"]:
        return f"host {owner['host']} rebooted since"
    if same_host and owner.get("pid_ns") and owner.get("pid_ns") == me["pid_ns"]:
        pid = int(owner.get("pid", 0))
        if pid == me["pid"] or not _pid_alive(pid):
            return f"process {pid} on {owner['host']} is gone"
        if owner.get("pid_start") and _start_time(pid) != owner["pid_start"]:
            return f"process {pid} on {owner['host']} is gone (its pid belongs to another process now)"
        return None  # alive here: however old its heartbeat, it is not ours to take
    age = now - float(owner.get("heartbeat", 0))
    lease = float(owner.get("lease_s", LEASE_S))
    return f"its heartbeat is {age:.0f} s old (lease {lease:.0f} s)" if age > lease else None


def _describe(owner: dict[str, Any], now: float) -> str:
    return (f"host {owner.get('host', '?')} pid {owner.get('pid', '?')} (heartbeat "
            f"{now - float(owner.get('heartbeat', 0)):.0f} s ago, lease {float(owner.get('lease_s', LEASE_S)):.0f} s)")


def _read_owner(path: Path) -> Optional[dict[str, Any]]:
    """The owner record, or None if the file vanished; a symlink or garbage is refused by name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise fsio.UnsafeFileError(f"{path} is a symbolic link; refusing to use it as the run lock "
                                       "(remove it: the run directory should hold only what the run wrote)") from None
        raise
    with os.fdopen(fd) as f:
        text = f.read()
    try:
        owner = json.loads(text)
        if not isinstance(owner, dict):
            raise ValueError("not an object")
        return owner
    except ValueError:
        # Written by a crash between create and write, or not ours: judged by its age alone.
        return {"host": "?", "pid": "?", "heartbeat": path.lstat().st_mtime, "lease_s": LEASE_S, "token": text[:64]}


class RunLock:
    """The lock of one run directory, held by this process until `release`."""

    def __init__(self, run_dir: Path, lease_s: float = LEASE_S) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.lease_s = lease_s
        self.record = {**identity(), "token": secrets.token_hex(16), "lease_s": lease_s}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- taking it ------------------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            owner = _read_owner(self.path)
            if owner is None:
                continue  # released just now: try again
            now = time.time()
            reason = dead_because(owner, now, self.record)
            if reason is None and self._wait_out(owner, now):
                continue
            if reason is None:
                raise RunDirLocked(
                    f"run directory {self.path.parent} is in use by another trainer: {_describe(owner, now)}, "
                    f"see {self.path}. Stop that one first, or use another train.run_dir (a dead owner's lock is "
                    "taken over: at once on its own host, after the lease from another)")
            self._take_over(owner, reason)
        raise RunDirLocked(f"could not take the run lock {self.path}: other trainers kept taking it")

    def _wait_out(self, owner: dict[str, Any], now: float) -> bool:
        """A lock whose heartbeat missed two beats (its owner was most likely killed: a preempted pod
        on another node) is waited out to the end of its lease, instead of failing a restarted job
        that would then only be restarted again. Returns whether it waited."""
        lease = float(owner.get("lease_s", LEASE_S))
        remaining = float(owner.get("heartbeat", 0)) + lease - now
        if not 0 < remaining <= lease / 2:
            return False
        log.warning("run lock %s: waiting %.0f s for the lease of %s to run out (its heartbeat stopped)",
                    self.path, remaining + 1, _describe(owner, now))
        time.sleep(remaining + 1)
        return True

    def _create(self) -> bool:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self._text())
                f.flush()
                os.fsync(f.fileno())
            fsio.fsync_dir(self.path.parent)
        except OSError as e:
            self.path.unlink(missing_ok=True)
            raise fsio.disk_full(e, self.path) from e
        return True

    def _take_over(self, owner: dict[str, Any], reason: str) -> None:
        """Move the dead owner's file out of the way, unless a racer got there first."""
        moved = self.path.with_name(f".{LOCK_NAME}.stale.{self.record['token']}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # a racer moved it: compete for the fresh one
        if (_read_owner(moved) or {}).get("token") != owner.get("token"):
            # We moved a racer's fresh lock: give it back (link never replaces an existing file).
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
            moved.unlink(missing_ok=True)
            return
        moved.unlink(missing_ok=True)
        log.warning("taking over the run lock %s from %s: %s", self.path, _describe(owner, time.time()), reason)

    # ---- holding it -----------------------------------------------------------------------------
    def _text(self) -> str:
        return json.dumps({**self.record, "heartbeat": time.time()}) + "\n"

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                owner = _read_owner(self.path)
                if (owner or {}).get("token") != self.record["token"]:
                    self._lost(owner)
                    return
                fsio.atomic_write(self.path, self._text())
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                log.warning("could not renew the run lock %s (%s: %s)", self.path, type(e).__name__, str(e)[:200])

    def _lost(self, owner: Optional[dict[str, Any]]) -> None:
        who = _describe(owner, time.time()) if owner else "nobody (the file was removed)"
        log.error("the run lock %s was taken over (now held by %s): this trainer's heartbeat stalled past "
                  "the lease. Exiting at once, without writing, so the run directory has one writer.",
                  self.path, who)
        logging.shutdown()
        os._exit(1)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):
            if (_read_owner(self.path) or {}).get("token") == self.record["token"]:
                self.path.unlink()


@contextlib.contextmanager
def hold(run_dir: Path, info: DistInfo, lease_s: float = LEASE_S) -> Iterator[Optional[RunLock]]:
    """Collective: rank 0 checks the run directory's folders and takes its lock for the whole job;
    its verdict reaches every rank, so a refused job ends on all of them alike."""
    lock, error = None, None
    if info.is_main:
        try:
            fsio.check_run_dir(run_dir)
            lock = RunLock(run_dir, lease_s).acquire()
        except Reported as e:
            error = e
    message = dist.broadcast_object(str(error) if error is not None else None)
    if error is not None:
        raise error
    if message is not None:
        raise RunDirLocked(f"rank 0 could not take the run directory: {message}")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
