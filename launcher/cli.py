"""`sagan-launch`: the command line of the launcher.

Subcommands: ``local`` (torchrun on this host, or one node of several), ``deepspeed`` (the
DeepSpeed runner over a hostfile), ``k8s`` (render and apply Kubernetes manifests), and
``status`` / ``logs`` / ``delete`` for runs started with ``k8s``. CONFIG files and
``key=value`` overrides may be given in any order, before or after the options, as for
``sagan-dist train``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig

from sagan_dist.config import ConfigError, split_items

from launcher import LauncherError, k8s, kube, local, network
from launcher.checks import claim_name, int_at_least, load_for_nodes, namespace_name, port_or_zero
from launcher.manifests import FLAVORS
from launcher.secrets import redact, refuse_logged_items, refuse_pdsh_secrets

ITEMS_HELP = ("YAML configs (paths, or shipped names: demo, imagenet128, imagenet256) and key=value "
              "overrides, e.g. demo train.steps=100")


def _local_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("local", help="Train on this host with torchrun (one node of several with --nnodes)",
                       description="Run `sagan-dist train` under torchrun (python -m launcher.torchrun: "
                                   "torchrun whose stop exits 143 (SIGTERM) or 130 (SIGINT) with one line "
                                   "naming the snapshot): "
                                   "--nproc processes on this host; with --nnodes > 1, run the same command "
                                   "on every node with its --node-rank and node 0's --master; with --nnodes "
                                   "MIN:MAX, elastically (c10d rendezvous at --master; nodes may leave and "
                                   "rejoin, each change resumes from the last snapshot). For several nodes "
                                   "GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME are set to the interface whose "
                                   "route reaches --master, unless already set.")
    p.add_argument("--nproc", type=int_at_least(1), default=1, help="processes on this node (one per GPU; CPU: gloo)")
    p.add_argument("--nnodes", default="1", metavar="N|MIN:MAX",
                   help="number of nodes (default 1: standalone); MIN:MAX: elastic, any count in the range")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank in [0, nnodes) (default 0; not with MIN:MAX)")
    p.add_argument("--master", default="", metavar="ADDR:PORT",
                   help="node 0's address and a free port (elastic: the rendezvous store's host, one of the nodes)")
    p.add_argument("--rdzv-id", default="", help="elastic: the job's id, the same on every node "
                                                 "(default: derived from train.run_dir)")
    p.add_argument("--iface", default="", help="network interface for gloo/NCCL (default: the one whose route "
                                               "reaches --master)")
    p.add_argument("--max-restarts", type=int_at_least(0), default=None,
                   help="torchrun restarts of the worker group after a failure, each resuming from a snapshot "
                        "(default 0; elastic: 3, as a lost node fails the others' collectives)")
    p.add_argument("--grace-period", type=int_at_least(1), default=local.DEFAULT_GRACE_S, metavar="SECONDS",
                   help="after a stop signal, how long torchrun lets the trainers write their snapshot before "
                        f"killing them (torchrun --shutdown-timeout; default {local.DEFAULT_GRACE_S})")
    p.add_argument("--print-command", action="store_true",
                   help="print the torchrun command (with its environment variables) instead of running it")
    p.add_argument("items", nargs="*", metavar="CONFIG_OR_OVERRIDE", help=ITEMS_HELP)
    p.set_defaults(func=_run_local)


def _deepspeed_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deepspeed", help="Train with the DeepSpeed runner over the hosts of a hostfile",
                       description="Run `sagan-dist train` under DeepSpeed's runner (python -m "
                                   "deepspeed.launcher.runner), which starts the processes on every host of "
                                   "the hostfile (over pdsh/ssh for more than one). The engine is the config's: "
                                   "add engine=deepspeed for DeepSpeed's ZeRO engine.")
    p.add_argument("--hostfile", type=Path, required=True, help="MPI-style hostfile: one 'HOST slots=N' per line")
    p.add_argument("--nproc", type=int_at_least(0), default=0, help="processes (GPUs) per host; 0: all slots")
    p.add_argument("--nnodes", type=int_at_least(0), default=0, help="use the first N hosts; 0: all")
    p.add_argument("--master-addr", default="", help="address of the first host (default: the runner's guess)")
    p.add_argument("--master-port", type=port_or_zero, default=0, help="rendezvous port (default: a free one)")
    p.add_argument("--print-command", action="store_true", help="print the runner command instead of running it")
    p.add_argument("items", nargs="*", metavar="CONFIG_OR_OVERRIDE", help=ITEMS_HELP)
    p.set_defaults(func=_run_deepspeed)


def _k8s_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("k8s", help="Render a run's Kubernetes manifests and apply them with kubectl",
                       description="Resolve the config (checked for the run's world size), render a ConfigMap "
                                   "with it and the job of the chosen flavour, and apply them with kubectl; "
                                   "--dry-run prints them. Expects the PVCs and MLflow of k8s/base "
                                   "(kubectl apply -k k8s/base).")
    p.add_argument("--flavor", choices=FLAVORS, default="trainjob",
                   help="trainjob: Kubeflow Trainer v2; pytorchjob: training operator v1; "
                        "indexed-job: plain batch/v1 Job + headless Service")
    p.add_argument("--image", required=True,
                   help="the sagan-dist image (built from the Dockerfile): REGISTRY/REPO:TAG, "
                        "REGISTRY/REPO@sha256:DIGEST or REGISTRY/REPO:TAG@sha256:DIGEST")
    p.add_argument("--nodes", type=int_at_least(1), default=1, help="pods, one per node")
    p.add_argument("--gpus-per-node", type=int_at_least(0), default=0, help="nvidia.com/gpu per pod; 0: CPU only")
    p.add_argument("--procs-per-node", type=int_at_least(0), default=0,
                   help="trainer processes per pod (0, the default: one per GPU, or 1)")
    p.add_argument("--cpus-per-node", type=int_at_least(0), default=0,
                   help="CPU request per pod (0, the default: 8 per process)")
    p.add_argument("--memory-per-node", type=int_at_least(0), default=0, metavar="GIB",
                   help="memory per pod (0, the default: 32 GiB per process)")
    p.add_argument("--shm-size", type=int_at_least(0), default=0, metavar="GIB",
                   help="/dev/shm size (0, the default: a quarter of the memory)")
    p.add_argument("--name", default="", help="run name; default sagan-<config>, so a resubmission resumes the run")
    p.add_argument("--namespace", type=namespace_name, default=None,
                   help="namespace (default: kubectl's current one)")
    p.add_argument("--runs-claim", type=claim_name, default="sagan-runs",
                   help="PVC for run directories (snapshots, samples)")
    p.add_argument("--data-claim", type=claim_name, default="sagan-data",
                   help="PVC with the shards, mounted read-only at /data")
    p.add_argument("--tracking-uri", default="http://sagan-mlflow:5000", help="MLflow server the pods report to")
    p.add_argument("--grace-period", type=int_at_least(30), default=120,
                   help="seconds from SIGTERM to SIGKILL (snapshot time; >= 30)")
    p.add_argument("--max-restarts", type=int_at_least(0), default=3, help="restarts of the whole job after failures")
    p.add_argument("--elastic-min-nodes", type=int_at_least(0), default=0,
                   help="pytorchjob only: run elastically with between this many and --nodes nodes")
    p.add_argument("--dry-run", action="store_true", help="print the manifests instead of applying them")
    p.add_argument("items", nargs="*", metavar="CONFIG_OR_OVERRIDE", help=ITEMS_HELP)
    p.set_defaults(func=_run_k8s)


def _run_parsers(sub: argparse._SubParsersAction) -> None:
    helps = {"status": ("Show a k8s run's job and pods", _run_status),
             "logs": ("Print the logs of a k8s run's pods, each line prefixed with its pod", _run_logs),
             "delete": ("Delete a k8s run's job, pods and ConfigMap (its run directory stays on the PVC)",
                        _run_delete)}
    for command, (text, func) in helps.items():
        p = sub.add_parser(command, help=text, description=text)
        p.add_argument("name", help="run name (as given to, or printed by, sagan-launch k8s)")
        p.add_argument("--namespace", type=namespace_name, default=None,
                       help="namespace (default: kubectl's current one)")
        if command == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="stream new lines")
            p.add_argument("--tail", type=int, default=100, help="lines per pod (-1: all)")
        p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sagan-launch",
        description="Start sagan-dist training: locally with torchrun or DeepSpeed, or on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_local_parser, _deepspeed_parser, _k8s_parser, _run_parsers):
        add(sub)
    return parser


# ---- commands -----------------------------------------------------------------------------------
def _check_config(items: Sequence[str], world_size: int) -> DictConfig:
    """Resolve the config as the trainer will, so that mistakes fail before N processes start."""
    return load_for_nodes(items, [1], world_size)


def _start(cmd: list[str], print_only: bool, env: dict[str, str] | None = None) -> int:
    if print_only:  # redacted: a password in tracking.uri=... is not printed (the run itself gets it)
        print(redact(shlex.join([*(f"{k}={v}" for k, v in (env or {}).items()), *cmd])))
        return 0
    local.exec_command(cmd, env)
    return 0  # not reached: exec replaced this process


def _run_local(args: argparse.Namespace) -> int:
    low, high, elastic = local.parse_nnodes(args.nnodes)
    rdzv = local.Rendezvous(low, high, args.node_rank, args.master, elastic, args.rdzv_id)
    max_restarts = args.max_restarts if args.max_restarts is not None else (3 if elastic else 0)
    local.torchrun_command(args.nproc, rdzv, args.items, max_restarts, args.grace_period)  # refuses bad options first
    cfg = load_for_nodes(args.items, range(low, high + 1), args.nproc)
    if rdzv.multi_node and max_restarts > 0 and not elastic:
        # torchrun's static rendezvous keeps one store for every restart: the node that restarts first
        # reads the failed round's addresses and burns its restarts. The c10d rendezvous meets anew each
        # round, so restarts go through it, as an elastic run of exactly N nodes (ranks by address).
        rdzv, elastic = dataclasses.replace(rdzv, elastic=True, node_rank=None), True
    if elastic:
        local_addr, store_host = network.rendezvous_address(local.split_master(args.master)[0])
        rdzv = dataclasses.replace(rdzv, rdzv_id=args.rdzv_id or local.default_rdzv_id(str(cfg.train.run_dir)),
                                   local_addr=local_addr, store_host=store_host)
    cmd = local.torchrun_command(args.nproc, rdzv, args.items, max_restarts, args.grace_period)
    env = network.socket_env(local.split_master(args.master)[0], args.iface) if rdzv.multi_node else {}
    if elastic:
        env.update(local.ELASTIC_ENV)
    return _start(cmd, args.print_command, env)


def _run_deepspeed(args: argparse.Namespace) -> int:
    hosts = local.hostfile_slots(args.hostfile)
    refuse_logged_items(args.items)
    cfg = _check_config(args.items, local.deepspeed_world_size(hosts, args.nproc, args.nnodes))
    if cfg.engine != "deepspeed":
        print(f"sagan-launch deepspeed: note: the config's engine is {cfg.engine!r}; "
              "add engine=deepspeed for DeepSpeed's engine", file=sys.stderr)
    port = args.master_port or local.free_port()
    single_host = len(hosts) == 1 or args.nnodes == 1
    cmd = local.deepspeed_command(args.hostfile, args.nproc, args.nnodes, args.master_addr, port, args.items,
                                  single_host)
    env: dict[str, str] = {}
    if not single_host:  # pdsh: the runner inlines exported variables and items into each host's shell line
        refuse_pdsh_secrets(str(cfg.tracking.uri))
        env = local.pdsh_exports(os.environ)
    return _start(cmd, args.print_command, env)


def _run_k8s(args: argparse.Namespace) -> int:
    yamls, _ = split_items(args.items)
    name = args.name or k8s.default_name(yamls)
    spec = k8s.cluster_spec(
        name, args.image, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node, cpus_per_node=args.cpus_per_node,
        memory_gib_per_node=args.memory_per_node, shm_gib=args.shm_size, namespace=args.namespace,
        runs_claim=args.runs_claim, data_claim=args.data_claim, tracking_uri=args.tracking_uri,
        grace_seconds=args.grace_period, max_restarts=args.max_restarts,
        elastic_min_nodes=args.elastic_min_nodes)
    print(k8s.launch(args.items, spec, args.flavor, args.dry_run), end="")
    if not args.dry_run:
        print(f"run {name!r} submitted; follow it with: sagan-launch logs {name} -f", file=sys.stderr)
    return 0


def _run_status(args: argparse.Namespace) -> int:
    print(kube.status(args.name, args.namespace), end="")
    return 0


def _run_logs(args: argparse.Namespace) -> int:
    kube.logs(args.name, args.namespace, args.follow, args.tail)
    return 0


def _run_delete(args: argparse.Namespace) -> int:
    print(kube.delete(args.name, args.namespace), end="")
    return 0


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Like parse_args, but CONFIG/override items may also follow the options."""
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or not hasattr(args, "items")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "items"):
        args.items = [*args.items, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as e:
        print(f"sagan-launch {args.command}: config error: {redact(str(e))}", file=sys.stderr)
        return 2
    except LauncherError as e:
        print(f"sagan-launch {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
