"""Simulated hosts for tests: network namespaces on one virtual switch, with real links to cut.

A test gets N "hosts", each a network namespace with ``lo`` up and one interface ``eth0``
(address 10.77.0.1, 10.77.0.2, ... /24), plugged into a bridge that lives in its own "switch"
namespace, so nothing is added to the machine's own network namespace. Commands run inside a
host with ``ip netns exec``: real processes, real sockets, real routes.

API::

    from netns import hosts, network              # tests/ is on sys.path under pytest

    def test_x(hosts):                            # fixture: 2 hosts (parametrize via network())
        h1, h2 = hosts
        h2.run([sys.executable, "-c", "..."])     # subprocess.run inside host 2 (text, captured)
        proc = h1.popen([...], stdout=f)          # subprocess.Popen inside host 1
        h2.cut(); ...; h2.restore()               # unplug host 2's cable at the switch, plug it back

    with network(3) as (h1, h2, h3):              # the same as a context manager, any N >= 1
        ...

``Host`` has ``name`` (the namespace), ``address`` ("10.77.0.2"), ``iface`` ("eth0"),
``run``/``popen`` (``env=`` adds variables to the current environment), ``cut``/``restore``.
``cut`` sets the switch-side end of the host's link down: the host keeps its address and route
but every packet to or from it is lost, as with a pulled cable or a dead switch port (TCP peers
see timeouts, not resets). ``partition(a, b)`` cuts several hosts at once.

``network(n, etc_hosts=DEBIAN_HOSTS)`` gives every host its own /etc/hosts (``ip netns exec``
bind-mounts ``/etc/netns/<name>/hosts`` over it): with DEBIAN_HOSTS the host name resolves to
127.0.1.1, as on a stock Debian/Ubuntu machine, whatever this machine's /etc/hosts says.

Cleanup always happens, also when the test fails: processes still running in the hosts are
killed (by pid, from ``ip netns pids``), then the namespaces are deleted, which deletes their
links. Names carry the pid and a counter, so parallel test runs never collide.

When namespaces cannot be made (not root, no CAP_NET_ADMIN, no ``ip`` binary, a kernel
without veth/bridge) the fixture skips the test and says why; it never passes silently.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import pytest

SUBNET = "10.77.0"
IFACE = "eth0"
ETC_NETNS = "/etc/netns"  # where `ip netns exec` looks for a namespace's own /etc files
# The /etc/hosts of a stock Debian/Ubuntu install: the host name is a loopback address.
DEBIAN_HOSTS = "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
_counter = itertools.count()


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be created here; the message says why."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


@dataclass
class Host:
    """One simulated host: a namespace with ``lo`` and ``eth0`` up."""

    name: str
    address: str
    switch: str  # the switch namespace
    port: str  # this host's port (veth end) in the switch namespace
    iface: str = IFACE

    def command(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 120,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.command(cmd), env=_env(env), timeout=timeout, text=True, **kwargs)

    def popen(self, cmd: Sequence[str], env: Mapping[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(self.command(cmd), env=_env(env), **kwargs)

    def cut(self) -> None:
        ip("-n", self.switch, "link", "set", self.port, "down")

    def restore(self) -> None:
        ip("-n", self.switch, "link", "set", self.port, "up")


def _env(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    return {**os.environ, **extra} if extra else None


def partition(*hosts: Host) -> None:
    for host in hosts:
        host.cut()


def unavailable_reason() -> str:
    """Why namespaces cannot be made here, or "" when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run as root or in a privileged container"
    return ""


def _write_etc_hosts(host: Host, text: str) -> None:
    folder = os.path.join(ETC_NETNS, host.name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "hosts"), "w", encoding="ascii") as f:
        f.write(text.format(hostname=socket.gethostname()))


def _create(prefix: str, n: int) -> list[Host]:
    """Build the switch and n hosts; on any failure the caller's cleanup removes what exists."""
    switch = f"{prefix}-sw"
    ip("netns", "add", switch)
    ip("-n", switch, "link", "add", "br0", "type", "bridge")
    ip("-n", switch, "link", "set", "br0", "up")
    hosts = []
    for i in range(1, n + 1):
        host = Host(name=f"{prefix}-h{i}", address=f"{SUBNET}.{i}", switch=switch, port=f"p{i}")
        hosts.append(host)
        ip("netns", "add", host.name)
        # Both ends are created inside their namespaces: no name ever exists in the root one.
        ip("-n", switch, "link", "add", host.port, "type", "veth", "peer", "name", IFACE, "netns", host.name)
        ip("-n", switch, "link", "set", host.port, "master", "br0", "up")
        ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", IFACE)
        ip("-n", host.name, "link", "set", "lo", "up")
        ip("-n", host.name, "link", "set", IFACE, "up")
    return hosts


def _kill_processes(namespace: str) -> None:
    """End what the test started inside the namespace (a namespace outlives none of them)."""
    for _ in range(2):
        pids = [int(p) for p in ip("netns", "pids", namespace, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _destroy(prefix: str) -> None:
    names = [n.split()[0] for n in ip("netns", "list", check=False).stdout.splitlines() if n.strip()]
    for name in names:
        if name.startswith(f"{prefix}-"):
            _kill_processes(name)
            ip("netns", "del", name, check=False)
    for folder in glob.glob(os.path.join(ETC_NETNS, f"{prefix}-*")):
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(ETC_NETNS)  # only if no other run's hosts are in it


@contextlib.contextmanager
def network(n: int = 2, etc_hosts: str | None = None) -> Iterator[list[Host]]:
    """N hosts on one switch; raises NetnsUnavailable when they cannot be made here.

    ``etc_hosts``: each host's own /etc/hosts (``{hostname}`` is filled in), e.g. DEBIAN_HOSTS.
    """
    if reason := unavailable_reason():
        raise NetnsUnavailable(reason)
    prefix = f"sg{os.getpid()}x{next(_counter)}"
    try:
        try:
            hosts = _create(prefix, n)
            for host in hosts if etc_hosts is not None else []:
                _write_etc_hosts(host, etc_hosts)
        except (RuntimeError, OSError) as e:
            raise NetnsUnavailable(f"cannot build the test network: {e}") from None
        yield hosts
    finally:
        _destroy(prefix)


@pytest.fixture
def hosts(request: pytest.FixtureRequest) -> Iterator[list[Host]]:
    """Two hosts (or ``@pytest.mark.parametrize("hosts", [3], indirect=True)`` for more)."""
    n = getattr(request, "param", 2)
    try:
        with network(n) as made:
            yield made
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")
