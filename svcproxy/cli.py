"""Command line: ``plan`` (dry run), ``sync`` (apply once), ``run`` (the node agent)
and ``cleanup``.

``plan`` and ``sync`` build the same IPVS plan from the same inputs; ``plan`` only prints
it, so its operations are exactly those ``sync`` would apply to the same kernel's table.
``sync``'s node steps around that table (``--node-plumbing on``, the IPVS timeouts, the UDP
conntrack cleanup) are not part of the plan and are not shown. Every
flag is checked before anything is read or changed: a bad value is one line naming the
flag and exit status 1 (2 is ``plan``'s "changes pending").
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence, TextIO, TypeAlias

from svcproxy import __version__, flags, logformat
from svcproxy.flags import split_csv
from svcproxy.gcpause import paused_gc
from svcproxy.config import ConfigError, config_tokens
from svcproxy.diff import Exclusions, diff, summarize
from svcproxy.ipvs.backend import Backend, BackendError
from svcproxy.ipvs.ipvsadm import IpvsadmBackend, ParseError, parse_save
from svcproxy.ipvs.timeouts import Timeouts
from svcproxy.kube.files import ObjectFileError, load_objects
from svcproxy.kube.translate import Problem, TranslateConfig, Translation, node_info, translate
from svcproxy.model import Family, OpKind, Operation, Table
from svcproxy.node.dummy import DEVICE
from svcproxy.podns.visible import pod_visible
from svcproxy.podns.mode import IP_VS_MODE_PARAM, Mode, ModeDecision, ModeError, decide_loaded
from svcproxy.podns.cni import DEFAULT_SOCKET as DEFAULT_CNI_SOCKET
from svcproxy.render import plan_json, plan_json_text, plan_text

if TYPE_CHECKING:  # the node and Pod-namespace stacks are imported where they are used:
    # a one-shot plan without them starts several times faster
    from svcproxy.node.plumbing import PlumbingConfig
    from svcproxy.podns.attach import NamespaceReport

log = logging.getLogger("svcproxy")

EXIT_CLEAN, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


def default_node_name() -> str:
    """--node, else NODE_NAME (the DaemonSet sets it from the downward API), else the
    hostname; trimmed and lower-cased like --node (flags.node_name), as kube-proxy does."""
    return (os.environ.get("NODE_NAME") or "").strip().lower() or socket.gethostname().strip().lower()


def _source_args(p: argparse.ArgumentParser, *, file_required: bool = True) -> None:
    p.add_argument("-f", "--file", required=file_required, type=Path,
                   help="YAML/JSON with Services, EndpointSlices and optionally Nodes "
                        "(multi-document or a `kubectl get -o yaml` List)")
    p.add_argument("--node", default=None, type=flags.node_name,
                   help="this node's name (default: $NODE_NAME, else the hostname)")
    p.add_argument("--node-ip", action="append", default=[], metavar="IP", type=flags.ip,
                   help="a node address for NodePorts (repeatable; overrides the Node object's addresses)")
    p.add_argument("--ip-families", type=flags.families, default=frozenset({Family.IPV4, Family.IPV6}),
                   help="families to serve: IPv4, IPv6 or IPv4,IPv6 (default both)")
    p.add_argument("--scheduler", default="rr", type=flags.scheduler, help="default IPVS scheduler (default rr)")
    p.add_argument("--proxy-name", default="svcproxy", type=flags.label_value,
                   help="serve Services whose service.kubernetes.io/service-proxy-name label equals this")
    p.add_argument("--exclude-cidrs", default="", metavar="CIDR,...", type=flags.cidrs,
                   help="kernel virtual services inside these ranges are never touched")
    if file_required:
        p.add_argument("--current-file", type=Path, default=None,
                       help="compare with this `ipvsadm -Sn` dump instead of the live kernel")
    p.add_argument("--ipvsadm", default="ipvsadm", help="ipvsadm binary (default: from PATH)")
    _logging_args(p)
    p.add_argument("--config", type=Path, default=None,
                   help="YAML file with the same keys as these flags (flags given here win)")


def _logging_args(p: argparse.ArgumentParser) -> None:
    """How the log reads (svcproxy/logformat.py); every command has these."""
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--logging-format", choices=list(logformat.FORMATS), default="text",
                   help="log lines as text (default) or JSON objects with time, level, logger, message "
                        "and the Kubernetes object where there is one (kube-proxy's flag)")


def _podns_args(p: argparse.ArgumentParser) -> None:
    """Share-NS flags (docs/share-ns.md), common to plan, sync and run."""
    p.add_argument("--pod-netns-mode", choices=[m.value for m in Mode], default=Mode.AUTO.value,
                   help="how Pod network namespaces get Services: kernel (ip_vs mode=2 shares the node table), "
                        "replicate (program each attached namespace), auto (kernel if available, else "
                        "replicate; the default) or off")
    p.add_argument("--pod-netns", action="append", default=[], metavar="PATH",
                   help="a Pod network namespace to attach (e.g. /var/run/netns/NAME; repeatable)")
    p.add_argument("--ip-vs-mode-param", default=IP_VS_MODE_PARAM, metavar="FILE",
                   help=f"where the ip_vs `mode` parameter is read (default {IP_VS_MODE_PARAM})")


DESCRIPTION = ("A Kubernetes Service proxy for Linux IPVS, for the node and for Pods with a network "
               "interface of their own: plan and sync a table from a file, run the node agent, or clean up.")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 1 like every other error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svcproxy", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"svcproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{plan,sync,run,cleanup}")
    commands = (_plan_parser(sub), _sync_parser(sub), _run_parser(sub), _cleanup_parser(sub))
    for p in commands:
        p.add_argument("--backend", choices=["netlink", "ipvsadm"], default="netlink",
                       help="how IPVS is read and written: svcproxy's pipelined generic-netlink client "
                            "(default), or the ipvsadm program (--ipvsadm)")
    return parser


Subparsers: TypeAlias = "argparse._SubParsersAction[_Parser]"


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")


def _plan_parser(sub: Subparsers) -> _Parser:
    plan = sub.add_parser("plan", help="print what a sync would change, change nothing (dry run)")
    _source_args(plan)
    _output_args(plan)
    _podns_args(plan)
    return plan


def _sync_parser(sub: Subparsers) -> _Parser:
    sync = sub.add_parser("sync", help="apply the plan to the live kernel once and exit")
    _source_args(sync)
    _output_args(sync)
    _podns_args(sync)
    _plumbing_args(sync, default_on=False)
    _ipvs_timeout_args(sync)
    return sync


def _run_parser(sub: Subparsers) -> _Parser:
    run = sub.add_parser("run", help="the node agent: watch the API server (or -f FILE) and keep IPVS in sync")
    _source_args(run, file_required=False)
    run.add_argument("--kubeconfig", default=None, help="kubeconfig for out-of-cluster runs (default: in-cluster)")
    run.add_argument("--watch-idle-timeout", type=flags.watch_idle_seconds, default=65.0,
                     help="seconds a watch stream may send nothing before it is resumed as stalled (default 65; "
                          "the API server sends a bookmark on a quiet watch about once a minute)")
    run.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False, help="watch and compute as usual, log each plan, change nothing")
    run.add_argument("--min-sync-period", type=flags.seconds, default=0.1,
                     help="minimum seconds between syncs: changes within it coalesce (default 0.1)")
    run.add_argument("--sync-period", type=flags.positive_seconds, default=30.0,
                     help="seconds between full syncs that re-read the kernel and repair drift (default 30)")
    run.add_argument("--graceful-timeout", type=flags.seconds, default=900.0,
                     help="seconds a removed TCP real server may drain at weight 0 (default 900)")
    run.add_argument("--health-bind", default=None, type=flags.bind,
                     help="address:port for /healthz /livez /readyz /metrics (default 0.0.0.0:10256; with "
                          "--dry-run 127.0.0.1 on a free port, so that it runs beside the live agent)")
    run.add_argument("--healthcheck-bind-host", default="0.0.0.0", type=flags.ip,
                     help="address the healthCheckNodePort servers listen on (default 0.0.0.0)")
    _podns_args(run)
    _run_podns_args(run)
    _plumbing_args(run, default_on=True)
    _ipvs_timeout_args(run)
    run.add_argument("--nodeport-addresses", default="", metavar="CIDR,...|primary", type=flags.nodeport_addresses,
                     help="serve NodePorts on this node's local addresses within these ranges, re-read at "
                          "every full sync; or 'primary': only the node's primary IP of each family (the "
                          "first InternalIP, else ExternalIP, of the Node object, or the first --node-ip) "
                          "(default: the Node object's addresses, or --node-ip)")
    return run


def _run_podns_args(run: argparse.ArgumentParser) -> None:
    """How the agent finds Pod namespaces besides --pod-netns: a scan, the CNI plugin."""
    run.add_argument("--pod-netns-dir", default=None, metavar="DIR",
                     help="attach every network namespace file found in DIR (e.g. /var/run/netns), "
                          "rescanned every --pod-netns-scan-period seconds (default: no scan)")
    run.add_argument("--pod-netns-scan-period", type=flags.positive_seconds, default=30.0,
                     help="seconds between scans of --pod-netns-dir (default 30)")
    run.add_argument("--cni-socket", default=None, metavar="PATH",
                     help=f"unix socket the svcproxy-cni plugin asks to attach Pod namespaces on "
                          f"(default {DEFAULT_CNI_SOCKET}; '' disables it)")
    run.add_argument("--cni-timeout", type=flags.positive_seconds, default=30.0,
                     help="seconds a CNI ADD may wait for its namespace's table to be programmed (default 30)")


def _cleanup_parser(sub: Subparsers) -> _Parser:
    cleanup = sub.add_parser("cleanup", help="remove what svcproxy programs: every virtual service outside "
                                             "--exclude-cidrs (what a sync with no Services would delete), the "
                                             "dummy device, the nftables table inet svcproxy, and the tables and "
                                             "VIP routes of the Pod namespaces named")
    cleanup.add_argument("--exclude-cidrs", default="", metavar="CIDR,...", type=flags.cidrs,
                         help="kernel virtual services inside these ranges are left alone")
    cleanup.add_argument("--pod-netns", action="append", default=[], metavar="PATH",
                         help="also clean this Pod network namespace (repeatable)")
    cleanup.add_argument("--pod-netns-dir", default=None, metavar="DIR",
                         help="also clean every network namespace file in DIR")
    cleanup.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    cleanup.add_argument("--dummy-device", default=DEVICE, type=flags.ifname,
                         help=f"the dummy device (default {DEVICE})")
    cleanup.add_argument("--nft", default="nft", help="nft binary (default: from PATH)")
    cleanup.add_argument("--ipvsadm", default="ipvsadm", help="ipvsadm binary (default: from PATH)")
    cleanup.add_argument("--ip-vs-mode-param", default=IP_VS_MODE_PARAM, metavar="FILE",
                         help="where the ip_vs `mode` parameter is read: in kernel mode (it reads 2) a Pod "
                              f"namespace has no IPVS table to clean, only VIP routes (default {IP_VS_MODE_PARAM})")
    _logging_args(cleanup)
    cleanup.add_argument("--config", type=Path, default=None, help="YAML file with the same keys as these flags")
    return cleanup


def _plumbing_args(p: argparse.ArgumentParser, *, default_on: bool) -> None:
    """Node-namespace plumbing (svcproxy.node): what kube-proxy does around IPVS."""
    p.add_argument("--node-plumbing", choices=["on", "off"], default="on" if default_on else "off",
                   help="keep sysctls, the dummy device and the nftables masquerade table in line "
                        f"(default {'on' if default_on else 'off'})")
    p.add_argument("--dummy-device", default=DEVICE, type=flags.ifname,
                   help=f"dummy device virtual addresses are bound to (default {DEVICE})")
    p.add_argument("--masquerade-all", action=argparse.BooleanOptionalAction, default=False,
                   help="masquerade all traffic to ClusterIPs (kube-proxy's --masquerade-all)")
    p.add_argument("--cluster-cidr", default="", metavar="CIDR,...", type=flags.cidrs,
                   help="the Pod network: ClusterIP traffic from outside it is masqueraded")
    p.add_argument("--strict-arp", action=argparse.BooleanOptionalAction, default=False,
                   help="arp_ignore=1 and arp_announce=2 (needed by some LoadBalancer implementations)")
    p.add_argument("--nft", default="nft", help="nft binary (default: from PATH)")


def _ipvs_timeout_args(p: argparse.ArgumentParser) -> None:
    """kube-proxy's IPVS timeout flags: durations, 0 (the default) keeps the kernel's value."""
    for name, what in (("tcp", "idle established TCP connections"), ("tcpfin", "TCP connections after FIN"),
                       ("udp", "UDP flows")):
        p.add_argument(f"--ipvs-{name}-timeout", type=flags.ipvs_timeout, default=0, metavar="DURATION",
                       help=f"IPVS timeout for {what} (like 900s or 15m), set on the node and in each "
                            "replicated Pod namespace; 0 (default) leaves the kernel's value")


def ipvs_timeouts(args: argparse.Namespace) -> Timeouts | None:
    """The --ipvs-*-timeout flags as one value; None when all are 0 (nothing to set)."""
    t = Timeouts(args.ipvs_tcp_timeout, args.ipvs_tcpfin_timeout, args.ipvs_udp_timeout)
    return t if t else None


def sync_timeouts(backend: Backend, timeouts: Timeouts | None, where: str, out: TextIO) -> bool:
    """`sync`: set the IPVS timeouts once through ``backend``; True if it failed."""
    if timeouts is None:
        return False
    try:
        backend.set_timeouts(timeouts)  # type: ignore[attr-defined]
    except (BackendError, OSError, AttributeError) as exc:
        out.write(f"FAILED  IPVS timeouts {timeouts.describe()}{where}: {exc}\n")
        return True
    out.write(f"IPVS timeouts set{where}: {timeouts.describe()}\n")
    return False


def sync_conntrack(backend: Backend, desired: Table, out: TextIO) -> bool:
    """`sync`: delete the node's stale UDP conntrack entries (only where the backend
    is the kernel's: a test double's table has no conntrack). True if it failed."""
    from svcproxy.agent import kernel_backend
    from svcproxy.node.conntrack import ConntrackError, KernelConntrack, clean_stale_flows

    if not kernel_backend(backend):
        return False
    try:
        found, deleted = clean_stale_flows(KernelConntrack(), desired, None, dry_run=False)
    except ConntrackError as exc:
        out.write(f"FAILED  UDP conntrack cleanup: {exc}\n")
        return True
    if found:
        out.write(f"cleared {deleted} stale UDP conntrack entries\n")
    return False


def plumbing_config(args: argparse.Namespace) -> PlumbingConfig | None:
    from svcproxy.node.nat import NatConfig
    from svcproxy.node.plumbing import PlumbingConfig

    if args.node_plumbing != "on":
        return None
    nat = NatConfig(masquerade_all=args.masquerade_all, cluster_cidrs=split_csv([args.cluster_cidr]))
    return PlumbingConfig(device=args.dummy_device, nat=nat, strict_arp=args.strict_arp, nft=args.nft,
                          dry_run=bool(getattr(args, "dry_run", False)))


@dataclass(frozen=True)
class Planned:
    translation: Translation
    actual: Table
    operations: list[Operation]
    live: bool
    node_addresses: tuple[str, ...] = ()


def report_problems(problems: Sequence[Problem], out: TextIO) -> None:
    for p in problems:
        out.write(f"svcproxy: {p.severity}: {p.kind}: {p.obj}: {p.message}\n")


def read_current_file(path: Path) -> Table:
    """An ``ipvsadm -Sn`` dump; every error names the file. ipvsadm ends each line with a
    newline, so a last line without one was cut short: refused, not read as a service."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--current-file {path}: cannot read it: {exc}") from None
    if text and not text.endswith("\n"):
        raise ValueError(f"--current-file {path}: the last line has no newline (the file was cut short?)")
    try:
        return parse_save(text)
    except ParseError as exc:
        raise ValueError(f"--current-file {path}: {exc}") from None


def make_plan(args: argparse.Namespace, backend: Backend, err: TextIO) -> Planned:
    objects = load_objects(args.file)
    if objects.lacks_services:
        what = "no Services, EndpointSlices or Nodes" if objects.empty else "no Services"
        raise ObjectFileError(f"{args.file} holds {what}; to plan an empty "
                              "cluster (every virtual service removed), give an empty List: kind: List, items: []")
    name = args.node or default_node_name()
    node_doc = next((n for n in objects.nodes if (n.get("metadata") or {}).get("name") == name), None)
    node, node_problems = node_info(name, node_doc, args.node_ip)
    config = TranslateConfig(node=node, proxy_name=args.proxy_name, families=args.ip_families,
                             scheduler=args.scheduler)
    translation = translate(objects.services, objects.endpoint_slices, config, origins=True)
    report_problems([*objects.problems, *node_problems, *translation.problems], err)
    live = args.current_file is None
    if not live:
        actual = read_current_file(args.current_file)
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
    return Planned(translation, actual, ops, live, node.addresses)


def _use_color(choice: str, out: TextIO) -> bool:
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    return out.isatty()


def pod_netns_decision(args: argparse.Namespace, backend: Backend, err: TextIO) -> ModeDecision:
    """The mode in force; ModeError (exit 1, nothing changed) if `kernel` was asked
    for and the kernel is not in share-namespace mode (or `replicate` and it is)."""
    decision = decide_loaded(args.pod_netns_mode, args.ip_vs_mode_param, backend.read)
    if args.pod_netns or decision.requested is not Mode.AUTO:
        err.write(f"svcproxy: notice: {decision.describe()}\n")
    return decision


def pod_namespaces(args: argparse.Namespace, planned: Planned, backend: Backend, decision: ModeDecision, *,
                   apply: bool, timeouts: Timeouts | None = None) -> list[NamespaceReport]:
    """--pod-netns: each namespace's Pod-visible table, planned or synced."""
    if not args.pod_netns:
        return []
    from svcproxy.podns.attach import factory_like, sync_namespace

    desired = pod_visible(planned.translation.table, planned.node_addresses)
    exclusions = Exclusions.parse(args.exclude_cidrs.split(","))
    factory = factory_like(backend)
    return [sync_namespace(path, desired, decision, exclusions=exclusions, backend_factory=factory, apply=apply,
                           timeouts=timeouts)
            for path in args.pod_netns]


def run_plan(args: argparse.Namespace, backend: Backend, out: TextIO, err: TextIO) -> int:
    decision = pod_netns_decision(args, backend, err)
    planned = make_plan(args, backend, err)
    reports = pod_namespaces(args, planned, backend, decision, apply=False)
    if args.output == "json":
        origins = planned.translation.origins
        extra: dict[str, Any] = {}
        if reports:
            extra["pod_namespaces"] = [{"netns": r.path, "status": r.status, "note": r.error,
                                        **_nested(plan_json(r.desired, r.operations, origins))} for r in reports]
        out.write(plan_json_text(planned.translation.table, planned.operations, origins, extra))
    else:
        out.write(plan_text(planned.translation.table, planned.actual, planned.operations,
                            color=_use_color(args.color, out), origins=planned.translation.origins))
        for r in reports:
            out.write(f"\n# Pod network namespace {r.path}: {r.summary()}\n")
            if r.status == "planned":
                out.write(plan_text(r.desired, r.actual, r.operations, color=_use_color(args.color, out),
                                    origins=planned.translation.origins))
    changes = planned.operations or any(r.operations for r in reports)
    if any(r.status == "error" for r in reports):
        return EXIT_ERROR
    return EXIT_CHANGES if changes else EXIT_CLEAN


def _nested(doc: dict[str, Any]) -> dict[str, Any]:
    """A plan document inside another: the version is said once, at the top."""
    doc.pop("version", None)
    return doc


def run_sync(args: argparse.Namespace, backend: Backend, out: TextIO, err: TextIO) -> int:
    if args.current_file is not None:
        err.write("svcproxy: error: sync applies to the live kernel; --current-file is for plan only\n")
        return EXIT_ERROR
    decision = pod_netns_decision(args, backend, err)
    planned = make_plan(args, backend, err)
    plumbing_failed = sync_plumbing(args, planned)
    failed = backend.apply(planned.operations) if planned.operations else []
    timeouts = ipvs_timeouts(args)
    notes = out if args.output == "text" else err
    timeouts_failed = sync_timeouts(backend, timeouts, "", notes)
    conntrack_failed = sync_conntrack(backend, planned.translation.table, notes)
    failed_ops = {id(f.operation) for f in failed}
    applied = [op for op in planned.operations if id(op) not in failed_ops]
    reports = pod_namespaces(args, planned, backend, decision, apply=True, timeouts=timeouts)
    if args.output == "json":
        doc: dict[str, Any] = {"applied": len(applied),
                               "failed": [{"operation": str(f.operation), "error": f.error} for f in failed]}
        if reports:
            doc["pod_namespaces"] = [
                {"netns": r.path, "status": r.status, "applied": len(r.applied), "error": r.error,
                 "failed": [{"operation": str(f.operation), "error": f.error} for f in r.failed]}
                for r in reports]
        out.write(plan_json_text(planned.translation.table, planned.operations, planned.translation.origins, doc))
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
        for r in reports:
            for f in r.failed:
                out.write(f"FAILED  {f.operation} in {r.path}: {f.error}\n")
            if r.timeouts_error:
                out.write(f"FAILED  IPVS timeouts in {r.path}: {r.timeouts_error}\n")
            if r.conntrack_error:
                out.write(f"FAILED  UDP conntrack cleanup in {r.path}: {r.conntrack_error}\n")
            out.write(f"sync netns {r.path}: {r.summary()}\n")
    if failed or plumbing_failed or timeouts_failed or conntrack_failed or not all(r.ok for r in reports):
        return EXIT_ERROR
    return EXIT_CLEAN


def sync_plumbing(args: argparse.Namespace, planned: Planned) -> bool:
    """`sync --node-plumbing on`: the agent's node plumbing, once; True if it failed."""
    config = plumbing_config(args)
    if config is None:
        return False
    from svcproxy.node.plumbing import NodePlumbing
    from svcproxy.reconcile.desired import nat_view

    services = {nn: nat_view(i, i.keys) for nn, i in planned.translation.services.items()}
    plumbing = NodePlumbing(config)
    plumbing.sync(services, planned.node_addresses)
    return bool(plumbing.stats.errors)


def run_cleanup(args: argparse.Namespace, backend: Backend, out: TextIO) -> int:
    """Remove svcproxy's virtual services (outside --exclude-cidrs), the dummy device,
    the nftables table, and the tables and routes of the Pod namespaces named.

    The arguments are checked before anything is removed; then each part is cleaned
    on its own and reported, so a node without IPVS still loses its nftables table."""
    paths = _cleanup_paths(args)
    exclusions = Exclusions.parse(split_csv([args.exclude_cidrs]))
    failed = _cleanup_ipvs(args, backend, exclusions, out)
    failed += _cleanup_plumbing(args, out)
    failed += _cleanup_namespaces(args, backend, exclusions, paths, out)
    return EXIT_ERROR if failed else EXIT_CLEAN


def _cleanup_paths(args: argparse.Namespace) -> list[str]:
    """The Pod namespaces to clean; a --pod-netns-dir that is not a directory is an error."""
    paths = list(args.pod_netns)
    if args.pod_netns_dir:
        directory = Path(args.pod_netns_dir)
        if not directory.is_dir():
            raise ValueError(f"--pod-netns-dir {directory}: no such directory")
        paths += [str(p) for p in sorted(directory.iterdir()) if p.is_file()]
    return paths


def _cleanup_ipvs(args: argparse.Namespace, backend: Backend, exclusions: Exclusions, out: TextIO) -> int:
    verb = "would remove" if args.dry_run else "removed"
    try:
        actual = backend.read()
    except BackendError as exc:
        out.write(f"node: IPVS: FAILED: {exc}\n")
        return 1
    ops = diff(Table(), actual, exclusions)
    if args.dry_run:  # each one named: a dry run shows exactly what the real one would remove
        for op in ops:
            if op.kind is OpKind.DELETE_SERVICE:
                n = len(actual.services[op.service].destinations)
                out.write(f"node: would remove virtual service {op.service} ({n} real server{'s' * (n != 1)})\n")
    errors = backend.apply(ops) if not args.dry_run and ops else []
    for f in errors:
        out.write(f"FAILED  {f.operation}: {f.error}\n")
    out.write(f"node: {verb} {sum(1 for o in ops if o.kind is OpKind.DELETE_SERVICE)} virtual services\n")
    return len(errors)


def _cleanup_plumbing(args: argparse.Namespace, out: TextIO) -> int:
    from svcproxy.node.nftables import Nftables
    from svcproxy.node.plumbing import NodePlumbing, PlumbingConfig

    plumbing = NodePlumbing(PlumbingConfig(device=args.dummy_device, dry_run=args.dry_run),
                            nft=Nftables(args.nft), vs_sysctls={})
    failed = 0
    for what, ok in plumbing.cleanup():
        out.write(f"node: {what}\n")
        failed += not ok
    return failed


def _cleanup_namespaces(args: argparse.Namespace, backend: Backend, exclusions: Exclusions,
                        paths: list[str], out: TextIO) -> int:
    """Each Pod namespace named, the way the running ip_vs serves it (the mode as
    `auto` would find it): replicate mode's tables, or in kernel mode no IPVS at all."""
    from svcproxy.podns.attach import cleanup_namespace, factory_like

    if not paths:
        return 0
    decision = decide_loaded(Mode.AUTO, args.ip_vs_mode_param, backend.read)
    failed = 0
    for path in paths:
        line, ok = cleanup_namespace(path, decision, exclusions=exclusions, backend_factory=factory_like(backend),
                                     apply=not args.dry_run)
        out.write(f"netns {path}: {line}\n")
        failed += not ok
    return failed


def check_run_paths(args: argparse.Namespace) -> None:
    """`run`: a --pod-netns-dir that is there but is not a directory is a bad flag (one
    that is not there yet is fine: the first `ip netns add` creates it)."""
    directory = args.pod_netns_dir
    if directory and os.path.lexists(directory) and not os.path.isdir(directory):
        raise ValueError(f"--pod-netns-dir {directory}: not a directory")


def run_agent(args: argparse.Namespace, backend: Backend) -> int:
    from svcproxy.agent import Agent, AgentConfig  # the agent's stack, for `run` only

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
        health_bind=args.health_bind or ("127.0.0.1:0" if args.dry_run else "0.0.0.0:10256"),
        healthcheck_bind_host=args.healthcheck_bind_host,
        dry_run=args.dry_run,
        cni_socket=DEFAULT_CNI_SOCKET if args.cni_socket is None else args.cni_socket,
        cni_socket_required=args.cni_socket is not None,
        cni_timeout=args.cni_timeout,
    )
    config = replace(config, pod_netns_mode=args.pod_netns_mode, pod_netns=tuple(args.pod_netns),
                     pod_netns_dir=args.pod_netns_dir, pod_netns_scan_period=args.pod_netns_scan_period,
                     ip_vs_mode_param=args.ip_vs_mode_param, plumbing=plumbing_config(args),
                     nodeport_addresses=split_csv([args.nodeport_addresses]),
                     watch_idle_timeout=args.watch_idle_timeout)
    config = replace(config, ipvs_timeouts=ipvs_timeouts(args))
    agent = Agent(config, backend)
    agent.install_signal_handlers()
    return agent.run()


def make_backend(args: argparse.Namespace) -> Backend:
    if args.backend == "netlink":
        from svcproxy.ipvs import nlencode
        from svcproxy.ipvs.netlink import NetlinkBackend

        if not nlencode.COMPILED:
            log.warning("the netlink encoder's compiled loop (svcproxy/ipvs/_nlfast.c) is not built: "
                        "encoding in Python, which makes large applies slower")
        return NetlinkBackend()
    # The agent reads connection counts for graceful termination; plan/sync need not.
    return IpvsadmBackend(binary=args.ipvsadm, counts=args.command == "run")


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
    warnings: list[str] = []  # logged once the log is set up (--logging-format may come from the file)
    if args.config is not None:
        try:
            at = argv.index(args.command)
            others = {opt[2:] for name in ("plan", "sync", "run", "cleanup") if name != args.command
                      for action in _subparser(parser, name)._actions for opt in action.option_strings
                      if opt.startswith("--")}
            tokens = config_tokens(_subparser(parser, args.command), args.config, argv[at + 1:], others,
                                   warn=warnings.append)
        except ConfigError as exc:
            err.write(logformat.fatal_line(args.logging_format, str(exc)))
            return EXIT_ERROR
        args = parser.parse_args([*argv[:at + 1], *tokens, *argv[at + 1:]])
    logformat.setup(args.logging_format, verbose=args.verbose, stream=err)
    for message in warnings:
        log.warning("%s", message)
    try:
        if backend is None:
            backend = make_backend(args)
        if args.command == "cleanup":
            return run_cleanup(args, backend, out)
        if args.command == "run":
            check_run_paths(args)
            return run_agent(args, backend)
        with paused_gc():  # one big computation: see svcproxy/gcpause.py
            if args.command == "plan":
                return run_plan(args, backend, out, err)
            return run_sync(args, backend, out, err)
    except (OSError, ParseError, BackendError, ValueError, ObjectFileError, ModeError) as exc:
        err.write(logformat.fatal_line(args.logging_format, str(exc)))
        return EXIT_ERROR
