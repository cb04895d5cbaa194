"""--logging-format: text lines as before, or JSON lines with the object a record is about."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from svcproxy.logformat import JsonFormatter, about, about_display_name

ROOT = Path(__file__).resolve().parent.parent
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def record(msg: str, *args: object, extra: dict[str, object] | None = None,
           exc: BaseException | None = None) -> logging.LogRecord:
    logger = logging.getLogger("svcproxy.test")
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra)


def test_a_json_line_has_time_level_logger_message_and_the_object() -> None:
    line = JsonFormatter().format(record("stopped %s\nnext line", "héllo", extra=about("Service", "shop", "web")))
    assert "\n" not in line
    doc = json.loads(line)
    assert TIME.match(doc.pop("time")), line
    assert doc == {"level": "warning", "logger": "svcproxy.test", "message": "stopped héllo\nnext line",
                   "object": "shop/web", "kind": "Service"}


def test_no_object_no_object_field_and_a_traceback_goes_under_error() -> None:
    try:
        raise OSError("netlink: no buffer space")
    except OSError as exc:
        doc = json.loads(JsonFormatter().format(record("sync failed", exc=exc)))
    assert "object" not in doc and "kind" not in doc
    assert doc["error"].startswith("Traceback") and "OSError: netlink: no buffer space" in doc["error"]


@pytest.mark.parametrize("text, extra", [
    ("Service shop/web", {"k8s_object": "shop/web", "k8s_kind": "Service"}),
    ("EndpointSlice default/web-abc12", {"k8s_object": "default/web-abc12", "k8s_kind": "EndpointSlice"}),
    ("Node node-a", {"k8s_object": "node-a", "k8s_kind": "Node"}),
    ("Service <unnamed>", {}),
    ("Services", {}),
    ("EndpointSlices", {}),
    ("Service default/<unnamed>", {}),
])
def test_problems_name_their_object_by_display_name(text: str, extra: dict[str, str]) -> None:
    assert about_display_name(text) == extra


def test_the_agent_logs_json_lines_naming_the_broken_object(tmp_path: Path) -> None:
    """The real process: every stderr line is one JSON object; the problem in the
    file carries the EndpointSlice it was found in."""
    cluster = tmp_path / "c.yaml"
    cluster.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
        "spec: {clusterIP: 10.96.0.50, ports: [{name: http, port: 80}]}\n---\n"
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
        "metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\n"
        "addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.1.300]}]\n")
    cmd = [sys.executable, "-m", "svcproxy", "run", "-f", str(cluster), "--dry-run", "--node-plumbing", "off",
           "--cni-socket", "", "--node", "node-a", "--pod-netns-mode", "off", "--logging-format", "json"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if '"ready: ' in line:
                break
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[1]
    docs = [json.loads(line) for line in lines + rest.splitlines(keepends=True) if line.strip()]
    assert docs and all({"time", "level", "logger", "message"} <= set(d) for d in docs), lines
    bad = [d for d in docs if "[invalid-ip]" in d["message"]]
    assert len(bad) == 1 and bad[0]["object"] == "shop/web-1" and bad[0]["kind"] == "EndpointSlice", docs
    assert bad[0]["level"] == "error" and bad[0]["logger"] == "svcproxy.reconcile"
    assert any(d["message"].startswith("ready: ") for d in docs), docs


def test_text_stays_the_default_format_for_every_command() -> None:
    from svcproxy.cli import build_parser

    parser = build_parser()
    for argv in (["plan", "-f", "x"], ["sync", "-f", "x"], ["run"], ["cleanup"]):
        assert parser.parse_args(argv).logging_format == "text"
    assert parser.parse_args(["run", "--logging-format", "json"]).logging_format == "json"


def test_a_failed_start_ends_with_a_json_line_too(tmp_path: Path) -> None:
    """The error that ends the command (a bad --config, an unreadable file) is the line
    an operator needs most: under --logging-format json it is JSON like the rest."""
    from svcproxy.cli import main
    from svcproxy.ipvs.backend import MemoryBackend

    conf = tmp_path / "config.conf"
    conf.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: iptables\n")
    for argv in (["plan", "-f", str(tmp_path / "c.json"), "--config", str(conf)],
                 ["plan", "-f", str(tmp_path / "missing.json")]):
        for fmt in ("json", "text"):
            err = io.StringIO()
            assert main([*argv, "--logging-format", fmt], backend=MemoryBackend(), out=io.StringIO(), err=err) == 1
            assert err.getvalue().count("\n") == 1, err.getvalue()
            if fmt == "text":
                assert err.getvalue().startswith("svcproxy: error: ")
                continue
            doc = json.loads(err.getvalue())
            assert TIME.match(doc.pop("time"))
            assert doc["level"] == "error" and doc["logger"] == "svcproxy", doc
            assert "mode" in doc["message"] or "missing.json" in doc["message"], doc


def test_uncaught_exceptions_are_json_lines_too() -> None:
    """A thread that dies, or the main thread, prints a raw traceback unless the JSON
    format takes it: then it is one record with the traceback under error."""
    code = ("import sys, threading\nfrom svcproxy import logformat\n"
            "logformat.setup('json', verbose=False, stream=sys.stderr)\n"
            "t = threading.Thread(target=lambda: 1 / 0, name='worker'); t.start(); t.join()\n"
            "raise RuntimeError('héllo')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    docs = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [d["level"] for d in docs] == ["critical", "critical"], proc.stderr
    assert "ZeroDivisionError in thread worker" in docs[0]["message"] and "ZeroDivisionError: division by zero" in docs[0]["error"]
    assert docs[1]["message"] == "uncaught RuntimeError: héllo" and "Traceback" in docs[1]["error"]
