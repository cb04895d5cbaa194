"""Command line: ``svcproxy plan`` (dry run) and ``svcproxy sync`` (apply once).

Both subcommands build the same plan from the same inputs; ``plan`` only prints it,
so what ``plan`` shows is exactly what ``sync`` would do against the same kernel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

from svcproxy.config import ConfigError, config_tokens
from svcproxy.diff import Exclusions, diff, summarize
from svcproxy.ipvs.backend import Backend, BackendError
from svcproxy.ipvs.ipvsadm import IpvsadmBackend, ParseError, parse_save
from svcproxy.agent import Agent, AgentConfig, split_csv
from svcproxy.kube.files import ObjectFileError, load_objects
from svcproxy.kube.translate import Problem, TranslateConfig, Translation, node_info, translate
from svcproxy.model import Family, OpKind, Operation, Table
from svcproxy.render import plan_json, plan_text

log = logging.getLogger("svcproxy")

EXIT_CLEAN, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


def default_node_name() -> str:
    """--node, else NODE_NAME (the DaemonSet sets it from the downward API), else hostname."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


def _families(text: str) -> frozenset[Family]:
    names = {"ipv4": Family.IPV4, "4": Family.IPV4, "ipv6": Family.IPV6, "6": Family.IPV6}
    chosen = set()
    for part in text.split(","):
        part = part.strip().lower()
        if part not in names:
            raise argparse.ArgumentTypeError(f"unknown IP family {part!r} (use IPv4, IPv6 or IPv4,IPv6)")
        chosen.add(names[part])
    return frozenset(chosen)


def _source_args(p: argparse.ArgumentParser, *, file_required: bool = True) -> None:
    p.add_argument("-f", "--file", required=file_required, type=Path,
                   help="YAML/JSON with Services, EndpointSlices and optionally Nodes "
                        "(multi-document or a `kubectl get -o yaml` List)")
    p.add_argument("--node", default=None, help="this node's name (default: $NODE_NAME, else the hostname)")
    p.add_argument("--node-ip", action="append", default=[], metavar="IP",
                   help="a node address for NodePorts (repeatable; overrides the Node object's addresses)")
    p.add_argument("--ip-families", type=_families, default=frozenset({Family.IPV4, Family.IPV6}),
                   help="families to serve: IPv4, IPv6 or IPv4,IPv6 (default both)")
    p.add_argument("--scheduler", default="rr", help="default IPVS scheduler (default rr)")
    p.add_argument("--proxy-name", default="svcproxy",
                   help="serve Services whose service.kubernetes.io/service-proxy-name label equals this")
    p.add_argument("--exclude-cidrs", default="", metavar="CIDR,...",
                   help="kernel virtual services inside these ranges are never touched")
    if file_required:
        p.add_argument("--current-file", type=Path, default=None,
                       help="compare with this `ipvsadm -Sn` dump instead of the live kernel")
    p.add_argument("--ipvsadm", default="ipvsadm", help="ipvsadm binary (default: from PATH)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML file with the same keys as these flags (flags given here win)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svcproxy", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print what a sync would change, change nothing (dry run)")
    _source_args(plan)
    plan.add_argument("-o", "--output", choices=["text", "json"], default="text")
    plan.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    sync = sub.add_parser("sync", help="apply the plan to the live kernel once and exit")
    _source_args(sync)
    sync.add_argument("-o", "--output", choices=["text", "json"], default="text")
    sync.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    run = sub.add_parser("run", help="the node agent: watch the API server (or -f FILE) and keep IPVS in sync")
    _source_args(run, file_required=False)
    run.add_argument("--kubeconfig", default=None, help="kubeconfig for out-of-cluster runs (default: in-cluster)")
    run.add_argument("--dry-run", action="store_true", help="watch and compute as usual, log each plan, change nothing")
    run.add_argument("--min-sync-period", type=_seconds, default=1.0, help="minimum seconds between syncs (default 1)")
    run.add_argument("--sync-period", type=_seconds, default=30.0,
                     help="seconds between full syncs that re-read the kernel and repair drift (default 30)")
    run.add_argument("--graceful-timeout", type=_seconds, default=900.0,
                     help="seconds a removed TCP real server may drain at weight 0 (default 900)")
    run.add_argument("--health-bind", default="0.0.0.0:10256",
                     help="address:port for /healthz /livez /readyz /metrics (default 0.0.0.0:10256)")
    run.add_argument("--healthcheck-bind-host", default="0.0.0.0",
                     help="address the healthCheckNodePort servers listen on (default 0.0.0.0)")
    return parser


def _seconds(text: str) -> float:
    value = float(text.rstrip("s"))
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


@dataclass(frozen=True)
class Planned:
    translation: Translation
    actual: Table
    operations: list[Operation]
    live: bool


def report_problems(problems: Sequence[Problem], out: TextIO) -> None:
    for p in problems:
        out.write(f"svcproxy: {p.severity}: {p.kind}: {p.obj}: {p.message}\n")


def make_plan(args: argparse.Namespace, backend: Backend, err: TextIO) -> Planned:
    objects = load_objects(args.file)
    name = args.node or default_node_name()
    node_doc = next((n for n in objects.nodes if (n.get("metadata") or {}).get("name") == name), None)
    node, node_problems = node_info(name, node_doc, args.node_ip)
    config = TranslateConfig(node=node, proxy_name=args.proxy_name, families=args.ip_families,
                             scheduler=args.scheduler)
    translation = translate(objects.services, objects.endpoint_slices, config)
    report_problems([*objects.problems, *node_problems, *translation.problems], err)
    live = args.current_file is None
    if not live:
        actual = parse_save(args.current_file.read_text())
    else:
        try:
            actual = backend.read()
        except BackendError as exc:
            if args.command == "sync":
                raise
            err.write(f"svcproxy: notice: cannot read the kernel's IPVS table ({exc}); "
                      "comparing with an empty table\n")
            actual = Table()
            live = False
    exclusions = Exclusions.parse(args.exclude_cidrs.split(","))
    ops = diff(translation.table, actual, exclusions)
    return Planned(translation, actual, ops, live)


def _use_color(choice: str, out: TextIO) -> bool:
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    return out.isatty()


def run_plan(args: argparse.Namespace, backend: Backend, out: TextIO, err: TextIO) -> int:
    planned = make_plan(args, backend, err)
    if args.output == "json":
        json.dump(plan_json(planned.translation.table, planned.operations), out, indent=2)
        out.write("\n")
    else:
        out.write(plan_text(planned.translation.table, planned.actual, planned.operations,
                            color=_use_color(args.color, out)))
    return EXIT_CHANGES if planned.operations else EXIT_CLEAN


def run_sync(args: argparse.Namespace, backend: Backend, out: TextIO, err: TextIO) -> int:
    if args.current_file is not None:
        err.write("svcproxy: error: sync applies to the live kernel; --current-file is for plan only\n")
        return EXIT_ERROR
    planned = make_plan(args, backend, err)
    failed = backend.apply(planned.operations) if planned.operations else []
    failed_ops = {id(f.operation) for f in failed}
    applied = [op for op in planned.operations if id(op) not in failed_ops]
    if args.output == "json":
        doc: dict[str, Any] = plan_json(planned.translation.table, planned.operations)
        doc["applied"] = len(applied)
        doc["failed"] = [{"operation": str(f.operation), "error": f.error} for f in failed]
        json.dump(doc, out, indent=2)
        out.write("\n")
    else:
        for op in applied:
            out.write(f"applied {op}\n")
        for f in failed:
            out.write(f"FAILED  {f.operation}: {f.error}\n")
        counts = summarize(applied)
        out.write(
            f"sync: {len(applied)} operations applied, {len(failed)} failed "
            f"({counts[OpKind.ADD_SERVICE]} services added, {counts[OpKind.EDIT_SERVICE]} edited, "
            f"{counts[OpKind.DELETE_SERVICE]} deleted; {counts[OpKind.ADD_DESTINATION]} real servers added, "
            f"{counts[OpKind.EDIT_DESTINATION]} edited, {counts[OpKind.DELETE_DESTINATION]} deleted)\n"
        )
    return EXIT_ERROR if failed else EXIT_CLEAN


def run_agent(args: argparse.Namespace, backend: Backend) -> int:
    config = AgentConfig(
        node_name=args.node or default_node_name(),
        node_ips=tuple(args.node_ip),
        file=str(args.file) if args.file else None,
        kubeconfig=args.kubeconfig,
        proxy_name=args.proxy_name,
        families=args.ip_families,
        scheduler=args.scheduler,
        exclude_cidrs=split_csv([args.exclude_cidrs]),
        min_sync_period=args.min_sync_period,
        sync_period=args.sync_period,
        graceful_timeout=args.graceful_timeout,
        health_bind=args.health_bind,
        healthcheck_bind_host=args.healthcheck_bind_host,
        dry_run=args.dry_run,
    )
    agent = Agent(config, backend)
    agent.install_signal_handlers()
    return agent.run()


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices[command]
            assert isinstance(sub, argparse.ArgumentParser)
            return sub
    raise KeyError(command)


def main(argv: Sequence[str] | None = None, *, backend: Backend | None = None,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.config is not None:
        try:
            at = argv.index(args.command)
            tokens = config_tokens(_subparser(parser, args.command), args.config, argv[at + 1:])
        except ConfigError as exc:
            err.write(f"svcproxy: error: {exc}\n")
            return EXIT_ERROR
        args = parser.parse_args([*argv[:at + 1], *tokens, *argv[at + 1:]])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=err,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if backend is None:
        # The agent reads connection counts for graceful termination; plan/sync need not.
        backend = IpvsadmBackend(binary=args.ipvsadm, counts=args.command == "run")
    try:
        if args.command == "plan":
            return run_plan(args, backend, out, err)
        if args.command == "run":
            return run_agent(args, backend)
        return run_sync(args, backend, out, err)
    except (OSError, ParseError, BackendError, ValueError, ObjectFileError) as exc:
        err.write(f"svcproxy: error: {exc}\n")
        return EXIT_ERROR
