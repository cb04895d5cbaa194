"""Running a benchmark script inside the test VM (virtme-ng, software emulation).

One place for what bench/ipvs.py, bench/share_ns.py and bench/dataplane share: the
newest /boot kernel that has IPVS modules, the guest's setup (PATH, modules, lo up),
the vng command line, and copying its output through a pipe (qemu reopens
/proc/self/fd/1: when that is a file it writes from offset 0 over what is there).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"


def ipvs_kernels() -> list[str]:
    """/boot kernel images whose modules include IPVS, oldest first (by version)."""
    found = (k for k in glob.glob("/boot/vmlinuz-*")
             if glob.glob(f"/lib/modules/{k.removeprefix('/boot/vmlinuz-')}/kernel/net/netfilter/ipvs/ip_vs.ko*"))
    return sorted(found, key=lambda k: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", k)])


def run_in_vm(script: str, args: Sequence[str], *, memory: str, cpus: int = 2, modules: Sequence[str] = (),
              optional_modules: Sequence[str] = (), env: Sequence[str] = (), vng_args: Sequence[str] = (),
              timeout: int | None = None) -> int:
    """Boot the VM and run ``bench/SCRIPT ARGS`` in it as root; its exit status.

    ``modules`` must load (the run stops otherwise), ``optional_modules`` are tried
    and reported; ``env`` are extra ``NAME=value`` words for the guest's export.
    """
    kernels = ipvs_kernels()
    if not kernels:
        print("no kernel with IPVS modules under /boot", file=sys.stderr)
        return 2
    python = shlex.quote(str(VENV / "bin" / "python"))
    guest = ("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONDONTWRITEBYTECODE=1 "
             "PYTHONUNBUFFERED=1 " + " ".join(env) + "; ")
    # Kept short: spelling out twenty modprobe commands made the guest hang at boot.
    if modules:
        guest += f"modprobe -a {' '.join(modules)} && "
    if optional_modules:
        guest += f"for m in {' '.join(optional_modules)}; do modprobe $m || echo modprobe $m FAILED; done; "
    guest += (f"ip link set lo up && cd {shlex.quote(str(REPO))} && {python} bench/{script} "
              + " ".join(shlex.quote(a) for a in args))
    cmd = [str(VENV / "bin" / "vng"), "--run", kernels[-1], "--user", "root", "--disable-kvm", "--force-9p",
           "--memory", memory, "--cpus", str(cpus), *vng_args, "--exec", guest]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if timeout is not None:
        cmd = ["timeout", "--kill-after=30", str(timeout), *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PATH=f"{VENV / 'bin'}:{os.environ.get('PATH', '')}"))
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 130


def built_modules() -> str:
    """The directory of svcproxy's built IPVS modules (tools/build-ipvs-module: built
    for the kernel the VM boots, cached; the script's last line of output)."""
    cp = subprocess.run([str(REPO / "tools" / "build-ipvs-module")], stdout=subprocess.PIPE, text=True)
    if cp.returncode != 0 or not cp.stdout.strip():
        raise SystemExit(f"tools/build-ipvs-module failed (exit {cp.returncode})")
    return cp.stdout.strip().splitlines()[-1]


def load_built_ipvs(directory: str, mode: int) -> None:
    """In the guest: what ip_vs.ko needs, ip_vs.ko with ``mode``, then every other IPVS
    module of the same build (never a stock one: their symbol versions differ)."""
    subprocess.run(["modprobe", "-a", "nf_conntrack", "nf_defrag_ipv4", "nf_defrag_ipv6", "libcrc32c", "nf_nat"],
                   check=True)
    subprocess.run(["insmod", f"{directory}/ip_vs.ko", f"mode={mode}"], check=True)
    for ko in sorted(Path(directory).glob("ip_vs_*.ko")):
        subprocess.run(["insmod", str(ko)], check=False)
