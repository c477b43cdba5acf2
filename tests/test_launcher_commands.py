"""`sagan-launch local|deepspeed`: the exact launcher command lines, and the mistakes refused first."""
from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from launcher.cli import main


def printed_command(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main([*args, "--print-command"]) == 0
    return shlex.split(capsys.readouterr().out)


def test_local_nproc_2_is_a_standalone_torchrun_of_sagan_dist_train(capsys):
    cmd = printed_command(capsys, "local", "--nproc", "2", "demo", "train.steps=2")
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                   "--nproc-per-node=2", "--max-restarts=0", "--module", "sagan_dist.cli", "train",
                   "demo", "train.steps=2"]


def test_items_may_follow_the_options_in_any_order(capsys):
    cmd = printed_command(capsys, "local", "demo", "--nproc", "2", "train.steps=2")
    assert cmd[-3:] == ["train", "demo", "train.steps=2"] and "--nproc-per-node=2" in cmd


def test_local_multi_node_uses_static_rendezvous_on_node_zero(capsys):
    cmd = printed_command(capsys, "local", "--nproc", "4", "--nnodes", "2", "--node-rank", "1",
                          "--master", "10.0.0.5:29501", "--max-restarts", "2", "demo")
    assert cmd[3:9] == ["--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.5", "--master-port=29501",
                        "--nproc-per-node=4", "--max-restarts=2"]


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "needs --master"),
    (["--nnodes", "2", "--master", "10.0.0.5"], "ADDR:PORT"),
    (["--nnodes", "2", "--master", "h:1", "--node-rank", "2"], "--node-rank 2"),
    (["--nproc", "0"], "--nproc"),
])
def test_local_refuses_inconsistent_rendezvous(capsys, args, message):
    assert main(["local", *args, "demo", "--print-command"]) == 1
    assert message in capsys.readouterr().err


def test_local_checks_the_config_for_the_world_size_before_starting(capsys):
    # demo's batch of 64 does not split over 3 ranks: refused, nothing started.
    assert main(["local", "--nproc", "3", "demo"]) == 2
    captured = capsys.readouterr()
    assert "train.batch_size" in captured.err and captured.out == ""


def test_local_without_a_config_names_the_problem(capsys):
    assert main(["local", "--nproc", "2", "train.steps=2"]) == 2
    assert "no CONFIG given" in capsys.readouterr().err


def test_unknown_option_is_an_error_not_an_override(capsys):
    with pytest.raises(SystemExit):
        main(["local", "demo", "--nprocs", "2"])
    assert "--nprocs" in capsys.readouterr().err


def test_deepspeed_command_uses_the_hostfile_and_keeps_local_rank_out_of_argv(capsys, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    cmd = printed_command(capsys, "deepspeed", "--hostfile", str(hostfile), "--nproc", "8",
                          "--master-port", "29600", "demo", "engine=deepspeed")
    assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                   "--num_gpus", "8", "--master_port", "29600", "--no_local_rank",
                   "--module", "sagan_dist.cli", "train", "demo", "engine=deepspeed"]


def test_deepspeed_checks_the_config_for_the_hostfile_world_size(capsys, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=3\n")
    assert main(["deepspeed", "--hostfile", str(hostfile), "demo", "--print-command"]) == 2
    assert "3 x 1 = 3" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [(None, "not found"), ("", "lists no hosts"),
                                              ("node-a 8\n", "is not 'HOST slots=N'")])
def test_deepspeed_refuses_a_bad_hostfile(capsys, tmp_path, content, message):
    hostfile = tmp_path / "hostfile"
    if content is not None:
        hostfile.write_text(content)
    assert main(["deepspeed", "--hostfile", str(hostfile), "demo", "--print-command"]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["local", "deepspeed", "k8s", "status", "logs", "delete"])
def test_every_command_explains_itself_in_help(command):
    out = subprocess.run([sys.executable, "-m", "launcher.cli", command, "--help"],
                         capture_output=True, text=True, check=True).stdout
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 5, out


def test_deepspeed_on_one_host_skips_the_ssh_probe_and_meets_on_localhost(capsys, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cmd = printed_command(capsys, "deepspeed", "--hostfile", str(hostfile), "--nproc", "2", "demo")
    assert cmd[cmd.index("--no_ssh_check") + 1:cmd.index("--master_port")] == ["--master_addr", "127.0.0.1"]
    assert int(cmd[cmd.index("--master_port") + 1]) > 0  # a free port, not DeepSpeed's fixed 29500
