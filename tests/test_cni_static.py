"""The static ``svcproxy-cni`` (cni/svcproxy-cni.c) on its own: what it sends, how it
relays the agent's answer, and what it does when the agent is missing, hangs or
answers nonsense. The agent here is a scripted unix socket server on a temporary
path, so every kind of bad answer can be given; test_cni.py runs the CNI behaviour
against the real agent server with both plugins."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from cni_build import static_plugin
from svcproxy.podns.cni import SUPPORTED_VERSIONS, Config
from svcproxy.podns.install import STATIC_MARKER
from svcproxy.podns.server import CniServer

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/pod-1", "CNI_IFNAME": "eth0",
       "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7d9f", "CNI_PATH": "/opt/cni/bin"}


@pytest.fixture(scope="module")
def plugin() -> Path:
    return static_plugin()


@pytest.fixture
def rundir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="svcproxy-cnis-", dir="/tmp"))  # short: sun_path is 108 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Script:
    """A unix socket server that reads one request line per connection and answers
    with ``reply(request)``: bytes to send (then close), or None to hang until closed."""

    def __init__(self, path: Path, reply: Callable[[bytes], bytes | None]) -> None:
        self.path, self.reply = path, reply
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while not data.endswith(b"\n"):
                        chunk = conn.recv(1 << 16)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    continue
                self.requests.append(data)
                answer = self.reply(data)
                if answer is None:
                    self.stop.wait(30)
                    continue
                try:
                    conn.sendall(answer)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(10)


@pytest.fixture
def scripted(rundir: Path) -> Iterator[Callable[[Callable[[bytes], bytes | None]], Script]]:
    made: list[Script] = []

    def make(reply: Callable[[bytes], bytes | None]) -> Script:
        s = Script(rundir / f"a{len(made)}.sock", reply)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def config(sock: Path | str, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "eni-net", "type": "svcproxy-cni", "socket": str(sock),
            "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}]}, **extra}


def run(exe: Path, stdin: bytes | str | dict[str, Any], env: dict[str, str] | None = None, *,
        command: str = "ADD", timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    data = json.dumps(stdin).encode() if isinstance(stdin, dict) else stdin.encode() if isinstance(stdin, str) \
        else stdin
    full = {**ENV, "CNI_COMMAND": command, **(env or {})}
    return subprocess.run([str(exe)], input=data, env=full, capture_output=True, timeout=timeout)


def error(cp: subprocess.CompletedProcess[bytes], code: int) -> dict[str, Any]:
    assert cp.returncode == 1, cp
    doc = json.loads(cp.stdout)
    assert doc["code"] == code and set(doc) <= {"cniVersion", "code", "msg", "details"}, doc
    assert cp.stdout.count(b"\n") == 1 and cp.stdout.endswith(b"\n")
    return dict(doc)


def ok_answer(rc: int = 0, stdout: str = "", stderr: str = "") -> bytes:
    return json.dumps({"ok": True, "rc": rc, "stdout": stdout, "stderr": stderr}).encode() + b"\n"


# --------------------------------------------------------------------------------------
# the executable


def test_it_is_a_static_executable(plugin: Path) -> None:
    """No interpreter, no dynamic section: nothing on the node is needed to run it."""
    data = plugin.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # 64-bit
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    kinds = {struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)}
    assert 3 not in kinds, "PT_INTERP: it needs a dynamic loader"
    assert 2 not in kinds, "PT_DYNAMIC: it needs shared libraries"
    assert STATIC_MARKER in data  # what the installer recognises
    assert len(data) < 256 * 1024
    if shutil.which("ldd"):
        done = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True)
        assert "not a dynamic executable" in done.stdout + done.stderr


def test_version_is_answered_without_the_agent(plugin: Path) -> None:
    for stdin, want in (('{"cniVersion": "0.4.0"}', "0.4.0"), ("", "1.1.0"), ("{not json", "1.1.0"),
                        ('{"cniVersion": "9.9.9"}', "1.1.0"), ('{"cniVersion": 1}', "1.1.0")):
        done = subprocess.run([str(plugin)], input=stdin.encode(), env={"CNI_COMMAND": "VERSION"},
                              capture_output=True, timeout=10)
        assert done.returncode == 0, done
        assert json.loads(done.stdout) == {"cniVersion": want, "supportedVersions": list(SUPPORTED_VERSIONS)}


def test_no_command_and_an_unknown_command_are_error_4(plugin: Path) -> None:
    done = subprocess.run([str(plugin)], input=b"{}", env={}, capture_output=True, timeout=10)
    assert "CNI_COMMAND" in error(done, 4)["msg"]
    assert error(run(plugin, "{}", command="FROB"), 4)["msg"] == "unknown CNI_COMMAND: FROB"


# --------------------------------------------------------------------------------------
# the request, and the answer relayed


def test_forwards_the_whole_invocation_and_relays_the_answer(plugin: Path, scripted: Any) -> None:
    agent = scripted(lambda req: ok_answer(3, '{"cniVersion": "1.0.0", "x": "\u00e9\U0001f600"}\n', "a log\n"))
    conf = config(agent.path, note="tab\there \"quoted\" \\ \u00e9 \U0001f600 \x01")
    stdin = json.dumps(conf, ensure_ascii=False)
    env = {"CNI_ARGS": ENV["CNI_ARGS"] + ";K=v\u00e9"}
    done = run(plugin, stdin, env=env)
    assert done.returncode == 3
    assert done.stdout.decode() == '{"cniVersion": "1.0.0", "x": "\u00e9\U0001f600"}\n'
    assert done.stderr == b"a log\n"
    (line,) = agent.requests
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    request = json.loads(line)
    assert request == {"op": "cni", "env": {**ENV, **env}, "stdin": stdin}  # byte for byte
    # absent variables are not sent (the agent tells absent from empty as the runtime does;
    # a variable the command requires, missing or empty, is error 4 before the agent is asked)
    run(plugin, stdin, env={"CNI_ARGS": ""})
    del_env = dict(ENV)
    del del_env["CNI_ARGS"]
    subprocess.run([str(plugin)], input=stdin.encode(), env=del_env, capture_output=True, timeout=10)
    assert json.loads(agent.requests[1])["env"]["CNI_ARGS"] == ""
    assert "CNI_ARGS" not in json.loads(agent.requests[2])["env"]
    error(run(plugin, stdin, env={"CNI_PATH": ""}), 4)
    assert len(agent.requests) == 3


def test_the_agent_refusing_the_request_is_an_error_with_its_code(plugin: Path, scripted: Any) -> None:
    agent = scripted(lambda req: b'{"ok": false, "error": "permission denied", "code": 4}\n')
    err = error(run(plugin, config(agent.path)), 4)
    assert err["msg"] == "svcproxy agent: permission denied" and err["cniVersion"] == "1.0.0"
    assert run(plugin, config(agent.path), command="DEL").returncode == 0  # DEL still succeeds
    assert error(run(plugin, config(agent.path), command="STATUS"), 50)


# --------------------------------------------------------------------------------------
# the agent unreachable, hanging, or answering nonsense


def test_agent_unreachable(plugin: Path, rundir: Path) -> None:
    missing = rundir / "none.sock"
    err = error(run(plugin, config(missing)), 11)
    assert err["msg"] == (f"svcproxy agent unavailable: no agent socket at {missing} "
                          "(is the svcproxy agent running on this node?)")
    assert err["details"] == "the Services of Pod shop/cart-7d9f cannot be programmed in /run/netns/pod-1 yet"
    assert err["cniVersion"] == "1.0.0"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(rundir / "stale.sock"))  # an agent that died: nobody listens
    assert "refuses connections" in error(run(plugin, config(rundir / "stale.sock"), command="CHECK"), 11)["msg"]
    err = error(run(plugin, config(missing), command="STATUS"), 50)
    assert err["msg"].startswith("plugin not available: svcproxy agent unreachable: no agent socket")
    for command in ("DEL", "GC"):
        done = run(plugin, config(missing), command=command)
        assert (done.returncode, done.stdout) == (0, b""), done
        assert b"the agent will forget the namespace" in done.stderr
    long_path = "/" + "x" * 200
    assert "path too long" in error(run(plugin, config(long_path)), 11)["msg"]


def test_agent_timeout(plugin: Path, scripted: Any) -> None:
    agent = scripted(lambda req: None)  # reads the request, never answers
    t0 = time.monotonic()
    err = error(run(plugin, config(agent.path, timeout=0.5)), 11)
    took = time.monotonic() - t0
    assert err["msg"] == f"svcproxy agent unavailable: the agent did not answer within 0.5s on {agent.path}"
    assert 0.45 < took < 10
    assert error(run(plugin, config(agent.path, timeout=0.3), command="STATUS"), 50)
    done = run(plugin, config(agent.path, timeout=0.3), command="DEL")
    assert (done.returncode, done.stdout) == (0, b"") and b"did not answer within 0.3s" in done.stderr
    # a bad timeout is the agent's to report: the plugin waits the default for it
    agent2 = scripted(lambda req: ok_answer(1, '{"code": 7}\n'))
    assert run(plugin, config(agent2.path, timeout="soon")).returncode == 1


@pytest.mark.parametrize("answer,needle", [
    (b"", "closed the connection"),
    (b'{"ok": true, "rc": 0, "stdout": "half', "closed the connection"),
    (b"not json\n", "malformed"),
    (b"[1, 2]\n", "malformed"),
    (b"{}\n", "malformed"),
    (b'{"ok": true}\n', "malformed"),
    (b'{"ok": "yes", "rc": 0, "stdout": ""}\n', "malformed"),
    (b'{"ok": true, "rc": "0", "stdout": ""}\n', "malformed"),
    (b'{"ok": true, "rc": 256, "stdout": ""}\n', "malformed"),
    (b'{"ok": true, "rc": -1, "stdout": ""}\n', "malformed"),
    (b'{"ok": true, "rc": 0.5, "stdout": ""}\n', "malformed"),
    (b'{"ok": true, "rc": 0, "stdout": 5}\n', "malformed"),
    (b'{"ok": true, "rc": 0, "stdout": "\\ud800"}\n', "malformed"),
    (b'{"ok": true, "rc": 0, "stdout": "\\q"}\n', "malformed"),
    (b'{"ok": true, "rc": 0, "stdout": "", "stderr": null}\n', "malformed"),
    (b'{"ok": false}\n', "malformed"),
    (b'{"ok": true, "rc": 0, "stdout": ""} trailing\n', "malformed"),
    (b"[" * 100000 + b"\n", "malformed"),
    (b'"' + b"x" * (9 << 20), "too long"),
])
def test_a_bad_answer_is_the_agent_being_unavailable(plugin: Path, scripted: Any, answer: bytes,
                                                    needle: str) -> None:
    agent = scripted(lambda req: answer)
    err = error(run(plugin, config(agent.path, timeout=5)), 11)
    assert err["msg"].startswith("svcproxy agent unavailable: ") and needle in err["msg"], err
    assert len(err["msg"]) < 1000
    assert run(plugin, config(agent.path, timeout=5), command="DEL").returncode == 0


# --------------------------------------------------------------------------------------
# bad input


def test_bad_configuration_is_refused_before_the_agent_is_asked(plugin: Path, scripted: Any) -> None:
    agent = scripted(lambda req: ok_answer())
    assert error(run(plugin, "{not json"), 6)["cniVersion"] == "1.1.0"
    assert error(run(plugin, "[]"), 6)
    assert error(run(plugin, '{"a": 1} {"b": 2}'), 6)
    assert error(run(plugin, b'{"socket": "/x\xff"}'), 6)["details"] == "not UTF-8 text"
    err = error(run(plugin, config("run/cni.sock")), 7)
    assert err["msg"] == "socket must be an absolute path" and err["cniVersion"] == "1.0.0"
    assert error(run(plugin, config(5)), 7)  # type: ignore[arg-type]
    assert error(run(plugin, {**config(agent.path), "socket": "/a\u0000b"}), 7)
    done = subprocess.run([str(plugin)], input=json.dumps(config(agent.path)).encode(),
                          env={**{k.encode(): v.encode() for k, v in ENV.items()}, b"CNI_ARGS": b"K=\xff"},
                          capture_output=True, timeout=10)
    assert error(done, 4)["msg"] == "CNI_ARGS is not UTF-8 text"
    assert agent.requests == []


def test_huge_stdin_is_refused(plugin: Path, scripted: Any) -> None:
    agent = scripted(lambda req: ok_answer())
    big = json.dumps(config(agent.path, pad="x" * (1 << 20)))
    err = error(run(plugin, big), 6)
    assert "1 MiB" in err["details"]
    # under the read limit, but too long once escaped for the agent's line limit
    escaped = json.dumps(config(agent.path, pad="\"" * 300_000))  # \" forwarded as \\\"
    assert "too large" in error(run(plugin, escaped), 6)["details"]
    assert agent.requests == []


def test_an_oversized_environment_variable_is_error_4_naming_it(plugin: Path, scripted: Any) -> None:
    """CNI's code for a bad environment variable is 4, and the message names it; a
    configuration that is too large on its own stays error 6."""
    agent = scripted(lambda req: ok_answer())
    # 128 KiB is the kernel's limit for one variable; control characters are
    # forwarded as \u00XX, six bytes each, so with a 400 kB configuration the request
    # is over the agent's 1 MiB line limit while the configuration alone is not.
    args = "\x01" * (128 * 1024 - 64)
    done = run(plugin, config(agent.path, pad="x" * 400_000), env={"CNI_ARGS": args})
    err = error(done, 4)
    assert err["msg"].startswith("CNI_ARGS is too large to forward to the svcproxy agent"), err
    assert agent.requests == []


def test_a_key_written_twice_counts_with_its_last_value_as_in_the_agent(plugin: Path, scripted: Any) -> None:
    """The plugin and the agent (Python's json: the last of duplicate keys) must read
    the same socket from the same configuration."""
    agent = scripted(lambda req: ok_answer(0, '{"cniVersion": "1.0.0"}\n'))
    missing = agent.path.with_name("missing.sock")
    body = json.dumps(config(agent.path))[1:-1]
    last_is_agent = '{"socket": "%s", %s}' % (missing, body)
    assert Config(json.loads(last_is_agent)).socket == str(agent.path)
    done = run(plugin, last_is_agent)
    assert done.returncode == 0, done
    assert len(agent.requests) == 1
    first_is_agent = '{%s, "socket": "%s"}' % (body, missing)
    assert Config(json.loads(first_is_agent)).socket == str(missing)
    assert str(missing) in error(run(plugin, first_is_agent), 11)["msg"]
    assert len(agent.requests) == 1


def test_quick_fuzz_never_crashes(plugin: Path, scripted: Any) -> None:
    """Seeded random damage to the configuration and to the agent's answer: the
    plugin never dies of a signal, prints only text, and on a damaged configuration
    exits 0 or 1, with one CNI error on 1."""
    rng = random.Random(19)
    good_answer = ok_answer(0, '{"cniVersion": "1.0.0"}\n')
    answers: list[bytes] = []
    agent = scripted(lambda req: answers.pop() if answers else good_answer)
    base = json.dumps(config(agent.path, timeout=2, runtimeConfig={"a": [1, 2.5, None, True, {"b": "\u00e9"}]}))

    def damage(data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            op, i = rng.randrange(4), rng.randrange(len(b) + 1)
            if op == 0 and b:
                del b[min(i, len(b) - 1)]
            elif op == 1:
                b[i:i] = bytes([rng.choice(b'{}[]",:\\u0123456789 \x00\xff\n')])
            elif op == 2 and b:
                b[min(i, len(b) - 1)] = rng.randrange(256)
            else:
                b[i:i] = b[rng.randrange(len(b) or 1):][:rng.randint(0, 40)]
        return bytes(b)

    outcomes = {0: 0, 1: 0}
    for n in range(int(os.environ.get("SVCPROXY_CNI_FUZZ_RUNS", "300"))):  # more: a longer run by hand
        damaged_config = n % 2 == 1
        answers.clear()
        stdin = damage(base.encode()) if damaged_config else base.encode()
        if not damaged_config:
            answers.append(damage(good_answer))
        done = run(plugin, stdin, command=rng.choice(["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"]))
        assert done.returncode >= 0, (stdin, done)  # never killed by a signal
        # a damaged answer may carry another exit status, which is relayed as it is
        assert done.returncode in (0, 1) or not damaged_config, (stdin, done)
        outcomes[min(done.returncode, 1)] += 1
        done.stdout.decode(), done.stderr.decode()  # always text
        if done.returncode == 1 and damaged_config:  # the agent was fine: the error is the plugin's own
            doc = json.loads(done.stdout)
            assert isinstance(doc["code"], int) and doc["msg"], doc
    assert outcomes[0] > 20 and outcomes[1] > 20, outcomes


# --------------------------------------------------------------------------------------
# the agent's side of the forwarded invocation


def test_the_agent_checks_a_forwarded_invocation(rundir: Path) -> None:
    from test_cni import FakeAttacher, talk

    sock = rundir / "run" / "cni.sock"
    with CniServer(str(sock), FakeAttacher(), timeout=5):
        answers = talk(sock, {"op": "cni", "env": [], "stdin": ""}, {"op": "cni", "env": {"CNI_COMMAND": 1},
                                                                        "stdin": ""},
                       {"op": "cni", "env": {"LD_PRELOAD": "x"}, "stdin": ""},
                       {"op": "cni", "env": {"CNI_COMMAND": "VERSION"}},
                       {"op": "cni", "env": {"CNI_COMMAND": "VERSION"}, "stdin": '{"cniVersion": "0.4.0"}'},
                       {"op": "cni", "env": {"CNI_COMMAND": "ADD"}, "stdin": "{}"})
    assert [a["ok"] for a in answers] == [False, False, False, False, True, True]
    assert "env must map" in answers[0]["error"] and "env must map" in answers[1]["error"]
    assert "unexpected variables in env: LD_PRELOAD" in answers[2]["error"]
    assert "stdin must be a string" in answers[3]["error"] and answers[3]["code"] == 4
    assert answers[4]["rc"] == 0 and json.loads(answers[4]["stdout"])["cniVersion"] == "0.4.0"
    assert answers[5]["rc"] == 1 and json.loads(answers[5]["stdout"])["code"] == 4  # env missing
    assert "ADD failed" in answers[5]["stderr"]


def test_valgrind_finds_nothing(plugin: Path, scripted: Any, rundir: Path) -> None:
    """The same source built for valgrind (dynamic, -O0 -g): memory errors and
    definite leaks fail the run, over the paths that parse and relay."""
    if not shutil.which("valgrind") or not shutil.which("gcc"):
        pytest.skip("valgrind or gcc missing (apt-get install valgrind gcc)")
    exe = rundir / "svcproxy-cni-debug"
    inc = plugin.parent / "include"
    subprocess.run(["gcc", "-std=c11", "-O0", "-g", "-Wall", "-Wextra", "-Werror", f"-I{inc}", "-o", str(exe),
                    str(static_plugin().parents[1] / "cni" / "svcproxy-cni.c")], check=True)
    answers = [b'{"ok": true, "rc": 0, "stdout": "\\ud83d\\ude00 \\u00e9", "stderr": "x"}\n', b"[[[[[\n",
               b'{"ok": false, "error": "e", "code": 4}\n']
    agent = scripted(lambda req: answers.pop())
    cases = [("VERSION", '{"cniVersion": "0.4.0"}')] + [("ADD", json.dumps(config(agent.path)))] * 3 + [
        ("DEL", json.dumps(config(rundir / "none.sock")))]
    for command, stdin in cases:
        done = subprocess.run(["valgrind", "-q", "--error-exitcode=99", "--leak-check=full",
                               "--errors-for-leak-kinds=definite", str(exe)], input=stdin.encode(),
                              env={**ENV, "CNI_COMMAND": command}, capture_output=True, timeout=120)
        assert done.returncode in (0, 1), (command, done.stderr.decode()[-2000:])
