"""`sagan-launch local|deepspeed`: the exact launcher command lines, and the mistakes refused first."""
from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import yaml

from launcher.cli import main


def printed_command(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main([*args, "--print-command"]) == 0
    return shlex.split(capsys.readouterr().out)


def test_local_nproc_2_is_a_standalone_torchrun_of_sagan_dist_train(capsys):
    cmd = printed_command(capsys, "local", "--nproc", "2", "demo", "train.steps=2")
    assert cmd == [sys.executable, "-m", "launcher.torchrun", "--standalone", "--nnodes=1",
                   "--nproc-per-node=2", "--max-restarts=0", "--shutdown-timeout=90",
                   "--module", "sagan_dist.cli", "train",
                   "demo", "train.steps=2"]


def test_items_may_follow_the_options_in_any_order(capsys):
    cmd = printed_command(capsys, "local", "demo", "--nproc", "2", "train.steps=2")
    assert cmd[-3:] == ["train", "demo", "train.steps=2"] and "--nproc-per-node=2" in cmd


def test_local_multi_node_uses_static_rendezvous_on_node_zero(capsys):
    args = ["local", "--nproc", "4", "--nnodes", "2", "--node-rank", "1", "--master", "127.0.0.2:29501",
            "--iface", "lo", "demo"]
    cmd = printed_command(capsys, *args)
    assert cmd[:2] == ["GLOO_SOCKET_IFNAME=lo", "NCCL_SOCKET_IFNAME=lo"]
    assert cmd[5:11] == ["--nnodes=2", "--node-rank=1", "--master-addr=127.0.0.2", "--master-port=29501",
                         "--nproc-per-node=4", "--max-restarts=0"]
    # With restarts, c10d: the static rendezvous reuses the failed round's store keys.
    cmd = printed_command(capsys, *args, "--max-restarts", "2")
    assert "--nnodes=2:2" in cmd and "--rdzv-backend=c10d" in cmd and "--max-restarts=2" in cmd
    assert not any(f.startswith(("--node-rank", "--master-addr")) for f in cmd)


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "needs --master"),
    (["--nnodes", "2", "--master", "10.0.0.5"], "ADDR:PORT"),
    (["--nnodes", "2", "--master", "h:1", "--node-rank", "2"], "--node-rank 2"),
    (["--nnodes", "0"], "1 <= MIN <= MAX"),
    (["--nnodes", "3:2", "--master", "127.0.0.1:1"], "1 <= MIN <= MAX"),
    (["--nnodes", "1:2:3"], "N or MIN:MAX"),
    (["--nnodes", "-2"], "N or MIN:MAX"),
    (["--nnodes", "1:2", "--master", "127.0.0.1:1", "--node-rank", "1"], "--node-rank does not apply"),
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


@pytest.mark.parametrize("command, flag, value", [
    ("local", "--nproc", "0"), ("local", "--nproc", "-1"), ("local", "--max-restarts", "-1"),
    ("deepspeed", "--nproc", "-1"), ("deepspeed", "--nnodes", "-2"), ("deepspeed", "--master-port", "70000"),
    ("k8s", "--nodes", "0"), ("k8s", "--nodes", "-1"), ("k8s", "--gpus-per-node", "-1"),
    ("k8s", "--procs-per-node", "-2"), ("k8s", "--cpus-per-node", "-8"), ("k8s", "--memory-per-node", "-1"),
    ("k8s", "--shm-size", "-1"), ("k8s", "--grace-period", "-5"), ("k8s", "--max-restarts", "-1"),
    ("k8s", "--elastic-min-nodes", "-1"), ("k8s", "--nodes", "two"),
])
def test_negative_or_zero_resources_are_refused_naming_the_flag(capsys, tmp_path, command, flag, value):
    extra = {"deepspeed": ["--hostfile", str(tmp_path / "h")], "k8s": ["--image", "r/i:1", "--dry-run"]}
    with pytest.raises(SystemExit) as exit_info:
        main([command, *extra.get(command, []), flag, value, "demo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err


def test_zero_means_default_where_it_says_so(capsys):
    assert main(["k8s", "demo", "--image", "r/i:1", "--dry-run", "--shm-size", "0", "--cpus-per-node", "0",
                 "--memory-per-node", "0", "--gpus-per-node", "0", "--procs-per-node", "0",
                 "--elastic-min-nodes", "0"]) == 0
    assert "kind: TrainJob" in capsys.readouterr().out


# ---- elastic ------------------------------------------------------------------------------------
def test_elastic_range_runs_torchrun_with_c10d_and_a_run_derived_id(capsys):
    args = ["local", "--nproc", "2", "--nnodes", "1:4", "--master", "127.0.0.1:29400", "demo",
            "train.batch_size=48", "train.run_dir=/runs/e1"]
    cmd = printed_command(capsys, *args)
    flags = cmd[cmd.index("launcher.torchrun") + 1:cmd.index("--module")]
    rdzv_id = next(f for f in flags if f.startswith("--rdzv-id="))
    assert flags == ["--nnodes=1:4", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29400", rdzv_id,
                     "--nproc-per-node=2", "--max-restarts=3", "--shutdown-timeout=90"]
    assert printed_command(capsys, *args)[cmd.index(rdzv_id)] == rdzv_id  # the same on every node
    other = printed_command(capsys, *args[:-1], "train.run_dir=/runs/e2")
    assert rdzv_id not in other  # another run, another rendezvous
    assert "--rdzv-id=job7" in printed_command(capsys, *args, "--rdzv-id", "job7")


def test_elastic_range_checks_every_world_size_and_names_the_one_that_fails(capsys):
    # 1..3 nodes x 2: 2 and 4 split demo's 64, 6 does not.
    assert main(["local", "--nproc", "2", "--nnodes", "1:3", "--master", "127.0.0.1:29400", "demo",
                 "--print-command"]) == 2
    err = capsys.readouterr().err
    assert "with 3 node(s) x 2 process(es) = 6" in err and "train.batch_size" in err


def test_elastic_range_with_zero_sharded_deepspeed_is_refused(capsys):
    assert main(["local", "--nnodes", "1:2", "--master", "127.0.0.1:29400", "demo", "engine=deepspeed",
                 "deepspeed.zero_stage=2", "--print-command"]) == 1
    assert "ZeRO 2 cannot resume" in capsys.readouterr().err


def test_an_override_yaml_cannot_parse_is_a_config_error_naming_it(capsys):
    assert main(["local", "demo", "tracking.run_name=`x`", "--print-command"]) == 2
    assert "tracking.run_name=`x`" in capsys.readouterr().err


# ---- DeepSpeed over pdsh: what the remote shell receives ---------------------------------------
HOSTILE = ["train.run_dir=/runs/a;id", "tracking.experiment=$(touch CANARY)", "tracking.run_name=a`touch CANARY`",
           "tracking.experiment=it's \"quoted\" $HOME \\ \\$x", "tracking.run_name=two words; touch CANARY",
           "tracking.run_name=line1\nline2", "tracking.run_name=tab\there&&touch CANARY|x>y<z*"]


def remote_line(cmd: list[str]) -> str:
    """The line pdsh hands each host's shell, built by DeepSpeed's own PDSHRunner from our argv."""
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import parse_args

    args = parse_args(cmd[cmd.index("deepspeed.launcher.runner") + 1:])
    runner = PDSHRunner(args, "e30=")
    pdsh, _, _ = runner.get_cmd({}, {"node-a": [0], "node-b": [0]})
    remote = pdsh[pdsh.index("-w") + 2:]
    return " ".join(remote)  # pdsh joins its command arguments with spaces


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_deepspeed_multi_node_items_reach_the_remote_shell_verbatim_and_run_nothing(capsys, monkeypatch,
                                                                                    tmp_path, shell):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    cmd = printed_command(capsys, "deepspeed", "--hostfile", str(hostfile), "--master-port", "29600",
                          "demo", *HOSTILE)
    monkeypatch.chdir(tmp_path)  # the remote line starts with `cd <this directory>;`
    line = remote_line(cmd)
    # The whole line, run by a real shell, with the runner's python replaced by a program that
    # prints its arguments, one per NUL.
    printer = f"{shell} -c 'printf \"%s\\0\" \"$@\"' _"
    assert line.count(sys.executable) == 1
    out = subprocess.run([shell, "-c", line.replace(sys.executable, printer)], capture_output=True, text=True,
                         check=True).stdout
    received = out.split("\0")[:-1]
    assert received[received.index("sagan_dist.cli"):] == ["sagan_dist.cli", "train", "demo", *HOSTILE]
    assert not (tmp_path / "CANARY").exists()


def test_deepspeed_single_host_passes_items_unquoted(capsys, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    cmd = printed_command(capsys, "deepspeed", "--hostfile", str(hostfile), "demo", "train.run_dir=/runs/a b;id")
    assert cmd[-1] == "train.run_dir=/runs/a b;id"  # the runner execs an argument list: no shell


# ---- Kubernetes names: refused by the launcher before any config work ------------------------------
@pytest.mark.parametrize("command", [["k8s", "demo", "--image", "r/i:1", "--dry-run"], ["status", "run"],
                                     ["logs", "run"], ["delete", "run"]])
@pytest.mark.parametrize("namespace", ["x y", "Team", "-a", "a-", "a.b", "a_b", "", "a" * 64])
def test_a_namespace_kubernetes_would_refuse_is_refused_naming_the_flag(capsys, command, namespace):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, f"--namespace={namespace}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --namespace" in err and repr(namespace) in err and "at most 63" in err


@pytest.mark.parametrize("namespace", ["a", "0", "team-1", "a" * 63])
def test_valid_namespaces_reach_the_manifests(capsys, namespace):
    assert main(["k8s", "demo", "--image", "r/i:1", "--dry-run", "--namespace", namespace]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert docs and all(d["metadata"]["namespace"] == namespace for d in docs)


@pytest.mark.parametrize("flag", ["--runs-claim", "--data-claim"])
def test_claim_names_follow_the_dns_subdomain_rule(capsys, flag):
    for good in ("a", "runs.v2", "a" * 253):
        assert main(["k8s", "demo", "--image", "r/i:1", "--dry-run", flag, good]) == 0
        assert f"claimName: {good}\n" in capsys.readouterr().out
    for bad in ("x y", "Runs", "a..b", ".a", "a" * 254):
        with pytest.raises(SystemExit):
            main(["k8s", "demo", "--image", "r/i:1", "--dry-run", flag, bad])
        assert f"argument {flag}" in capsys.readouterr().err
