"""The network interface a node's processes talk on, for ``sagan-launch local --nnodes N``.

gloo and NCCL pick the address they advertise from the hostname, which /etc/hosts often maps to
127.0.x.1; two real hosts then never meet. The interface to use is the one whose route reaches
the master: the kernel's route lookup (a UDP socket "connected" to the master; no packet is
sent) gives the local source address, and the interface holding that address is the answer.
On node 0 the master's address is local and the kernel routes it over ``lo``, but the source
address is still the master's own, so the interface found is the one that holds it (not ``lo``);
a master on loopback (all nodes on one host) gives ``lo``.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Mapping

import psutil  # a dependency of DeepSpeed; it lists interfaces with all their addresses

from launcher import LauncherError

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@dataclass(frozen=True)
class Interface:
    name: str
    address: str  # the local address the master is reached from


def resolve(host: str) -> str:
    """The address of ``host`` (an IP literal passes through), or a LauncherError naming it."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as e:
        raise LauncherError(f"--master address {host!r} does not resolve ({e}); give node 0's IP "
                            "address or a name every node can resolve") from None
    # IPv4 first: gloo and NCCL are most often used, and tested, over IPv4.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


def source_address(address: str) -> str:
    """The local address the kernel would send from to reach ``address``; no packet leaves."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((address, 9))  # port 9 (discard): any port works, nothing is sent
        except OSError as e:
            raise LauncherError(f"--master address {address} is unreachable from this host ({e.strerror}): "
                                "no route to it; check the address and this node's network") from None
        return str(s.getsockname()[0])


def interface_holding(address: str) -> str:
    """The interface that holds ``address``; a non-loopback one when several do."""
    ip = ipaddress.ip_address(address)
    holders = [name for name, addrs in psutil.net_if_addrs().items()
               if any(_same_ip(a.address, ip) for a in addrs)]
    if not holders:
        raise LauncherError(f"no network interface of this host holds {address}, the address the route to "
                            "the master leaves from; name one with --iface")
    return next((n for n in holders if n != "lo"), holders[0])


def _same_ip(text: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]) == ip  # drop IPv6 zone ids (fe80::1%eth0)
    except ValueError:
        return False  # MAC addresses (AF_PACKET entries)


def choose_interface(master_host: str) -> Interface:
    """The interface whose route reaches the master (see the module docstring)."""
    source = source_address(resolve(master_host))
    return Interface(interface_holding(source), source)


def rendezvous_address(master_host: str) -> tuple[str, bool]:
    """For torchrun's c10d rendezvous: the address the other nodes reach this one at (its
    ``--local-addr``) and whether this node holds the master's address (then it hosts the store).

    torchrun guesses both from the host name: with the usual 127.0.x.1 in /etc/hosts no node
    thinks it is the store's host and every worker is pointed at a loopback address. For a
    master on loopback (all nodes on one host) the guesses are right: ("", False).
    """
    master = ipaddress.ip_address(resolve(master_host))
    if master.is_loopback:
        return "", False
    source = source_address(str(master))
    return source, ipaddress.ip_address(source) == master


def check_interface(name: str) -> str:
    if name not in psutil.net_if_addrs():
        known = ", ".join(sorted(psutil.net_if_addrs()))
        raise LauncherError(f"--iface {name!r} is not an interface of this host (it has: {known})")
    return name


def socket_env(master_host: str, iface: str = "", environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to add to torchrun's environment.

    ``iface`` (--iface) wins; otherwise variables the user already set are kept and only the
    missing ones are filled with the chosen interface. Without --iface the master is checked
    for a route either way, so an unreachable one fails here rather than in torchrun's timeout.
    """
    if iface:
        name = check_interface(iface)
        return {var: name for var in IFNAME_VARS}
    name = choose_interface(master_host).name
    return {var: name for var in IFNAME_VARS if not environ.get(var)}
