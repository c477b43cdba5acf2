"""The interface gloo/NCCL are told to use: chosen by the route to the master, on real hosts.

Hosts are network namespaces joined by a switch (tests/netns.py); the chooser runs inside them
as a real process, with their routes and interfaces.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from netns import Host, hosts  # noqa: F401  (fixture)

from launcher import LauncherError
from launcher.cli import main
from launcher.network import choose_interface, socket_env

ROOT = Path(__file__).resolve().parent.parent


def choose_in(host: Host, master: str) -> dict[str, str]:
    """launcher.network.choose_interface run inside ``host``: its interface, or its error."""
    code = ("import json, sys\nfrom launcher import LauncherError\nfrom launcher.network import choose_interface\n"
            "try:\n    i = choose_interface(sys.argv[1]); print(json.dumps({'name': i.name, 'address': i.address}))\n"
            "except LauncherError as e:\n    print(json.dumps({'error': str(e)}))\n")
    proc = host.run([sys.executable, "-c", code, master], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_worker_host_picks_the_link_that_reaches_the_master(hosts):
    h1, h2 = hosts
    assert choose_in(h2, h1.address) == {"name": h2.iface, "address": h2.address}


def test_master_host_picks_the_link_holding_its_own_address_not_loopback(hosts):
    h1, _ = hosts
    # The kernel routes a local address over lo; the interface wanted is the one peers reach.
    assert choose_in(h1, h1.address) == {"name": h1.iface, "address": h1.address}


def test_unreachable_master_is_named_before_anything_starts(hosts):
    _, h2 = hosts
    result = choose_in(h2, "10.99.0.1")
    assert "10.99.0.1 is unreachable" in result["error"]


def test_launcher_inside_a_host_sets_both_variables_and_refuses_an_unreachable_master(hosts):
    _, h2 = hosts
    base = [sys.executable, "-m", "launcher.cli", "local", "--nnodes", "2", "--node-rank", "1", "demo",
            "--print-command"]
    env = {"GLOO_SOCKET_IFNAME": "", "NCCL_SOCKET_IFNAME": ""}
    proc = h2.run([*base, "--master", "10.77.0.1:29500"], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout)[:2] == ["GLOO_SOCKET_IFNAME=eth0", "NCCL_SOCKET_IFNAME=eth0"]
    proc = h2.run([*base, "--master", "10.99.0.1:29500"], cwd=ROOT, env=env)
    assert proc.returncode == 1 and "10.99.0.1 is unreachable" in proc.stderr and proc.stdout == ""


def test_cut_link_makes_the_master_unreachable_until_restored(hosts):
    h1, h2 = hosts
    probe = [sys.executable, "-c", "import socket; socket.create_connection((__import__('sys').argv[1], 9), 1)"]
    listener = h1.popen([sys.executable, "-c", "import socket, time; s = socket.create_server(('0.0.0.0', 9)); "
                         "time.sleep(60)"])
    try:
        for _ in range(50):  # wait for the listener
            if h2.run([*probe, h1.address]).returncode == 0:
                break
        else:
            pytest.fail("listener on host 1 never reachable")
        h2.cut()
        assert "timed out" in h2.run([*probe, h1.address]).stderr
        h2.restore()
        assert h2.run([*probe, h1.address]).returncode == 0
    finally:
        listener.kill()
        listener.wait()


# ---- on this host, without namespaces ------------------------------------------------------------
def test_loopback_master_uses_lo_and_a_bad_name_is_refused():
    assert choose_interface("127.0.0.1").name == "lo"
    with pytest.raises(LauncherError, match="'no-such-host.invalid' does not resolve"):
        choose_interface("no-such-host.invalid")


def test_variables_the_user_set_are_kept_and_iface_overrides_everything():
    assert socket_env("127.0.0.1", environ={"GLOO_SOCKET_IFNAME": "eth7"}) == {"NCCL_SOCKET_IFNAME": "lo"}
    assert socket_env("127.0.0.1", "lo", environ={"GLOO_SOCKET_IFNAME": "eth7"}) == {
        "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    with pytest.raises(LauncherError, match="--iface 'nope0'"):
        socket_env("127.0.0.1", "nope0")


def test_print_command_shows_the_variables_and_single_node_sets_none(capsys, monkeypatch):
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(var, raising=False)
    assert main(["local", "--nnodes", "2", "--master", "127.0.0.1:29500", "demo", "--print-command"]) == 0
    assert shlex.split(capsys.readouterr().out)[:2] == ["GLOO_SOCKET_IFNAME=lo", "NCCL_SOCKET_IFNAME=lo"]
    assert main(["local", "--nproc", "2", "demo", "--print-command"]) == 0
    assert "IFNAME" not in capsys.readouterr().out
