"""Record how `ipvsadm -R` reacts to failing lines: writes restore_cases.json.

Run ONLY inside a throwaway VM (it flushes the IPVS table), from the repo root:

    .venv/bin/vng --run /boot/vmlinuz-6.1.0-56-amd64 --user root --disable-kvm \
        --memory 2G --rwdir /tmp/vmout \
        --exec "python3 tests/data/ipvsadm/capture_restore.py /tmp/vmout/restore_cases.json" </dev/null
    cp /tmp/vmout/restore_cases.json tests/data/ipvsadm/

For every case: flush, apply ``setup`` with `ipvsadm -R` (must be clean), then feed
``input`` to `ipvsadm -R` and record its exit status, stdout, stderr and the table
afterwards (`ipvsadm -Sn`). tests/test_ipvsadm.py replays every case through its
fake ipvsadm and requires the same status, stderr and table.
"""

from __future__ import annotations

import json
import subprocess
import sys

CASES: list[tuple[str, str, str]] = [
    # (name, setup, input)
    ("clean", "", "-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.1.1.1:8080 -m -w 2\n"),
    ("empty_input", "", ""),
    (
        "kernel_errors_continue",
        "",
        "-A -t 10.0.0.1:80 -s rr\n"
        "-A -t 10.0.0.1:80 -s rr\n"
        "-A -t 10.0.0.2:80 -s nosuchsched\n"
        "-E -t 10.0.0.9:80 -s rr\n"
        "-a -t 10.0.0.9:80 -r 10.1.1.1:80 -m\n"
        "-e -t 10.0.0.9:80 -r 10.1.1.1:80 -m\n"
        "-d -t 10.0.0.9:80 -r 10.1.1.1:80\n"
        "-a -t 10.0.0.1:80 -r 10.1.1.1:80 -m\n"
        "-a -t 10.0.0.1:80 -r 10.1.1.1:80 -m\n"
        "-e -t 10.0.0.1:80 -r 10.1.1.2:80 -m\n"
        "-d -t 10.0.0.1:80 -r 10.1.1.2:80\n"
        "-D -t 10.0.0.9:80\n"
        "-E -t 10.0.0.1:80 -s nosuchsched\n"
        "-A -t 10.0.0.3:80 -s RR\n"
        "-A -t 10.0.0.4:80 -s rr\n",
    ),
    ("kernel_error_last_line", "", "-A -t 10.0.0.1:80 -s rr\n-A -t 10.0.0.1:80 -s rr\n"),
    ("unknown_option_skips_line", "", "-A -t 10.0.0.1:80 -s rr\n-A -t 10.0.0.2:80 -s rr -Q\n-A -t 10.0.0.3:80 -s rr\n"),
    ("unknown_option_last_line", "", "-A -t 10.0.0.1:80 -s rr\n-A -t 10.0.0.2:80 -s rr --bogus\n"),
    ("missing_argument", "", "-A -t 10.0.0.1:80 -s\n-A -t 10.0.0.2:80 -s rr\n"),
    ("no_command_stops", "", "-A -t 10.0.0.1:80 -s rr\n--svcproxy-op-1\n-A -t 10.0.0.3:80 -s rr\n"),
    ("comment_stops", "", "# a comment\n-A -t 10.0.0.1:80 -s rr\n"),
    (
        "bad_sched_flag_stops",
        "",
        "-A -t 10.0.0.1:80 -s rr\n-A -t 10.0.0.2:80 -s sh -b bogus\n-A -t 10.0.0.3:80 -s rr\n",
    ),
    (
        "incompatible_sched_flag_stops",
        "",
        "-A -t 10.0.0.1:80 -s rr\n-A -t 10.0.0.2:80 -s rr -b sh-port\n-A -t 10.0.0.3:80 -s rr\n",
    ),
    ("bad_address_stops", "", "-A -t 10.0.0.1:80 -s rr\n-A -t 999.0.0.1:80 -s rr\n-A -t 10.0.0.3:80 -s rr\n"),
    (
        "bad_weight_stops",
        "-A -t 10.0.0.1:80 -s rr\n",
        "-a -t 10.0.0.1:80 -r 10.1.1.1:80 -m -w -1\n-A -t 10.0.0.3:80 -s rr\n",
    ),
    ("timeout_zero_stops", "", "-A -t 10.0.0.1:80 -s rr -p 0\n-A -t 10.0.0.3:80 -s rr\n"),
    ("timeout_too_big_stops", "", "-A -t 10.0.0.1:80 -s rr -p 2678401\n-A -t 10.0.0.3:80 -s rr\n"),
    ("timeout_max_ok", "", "-A -t 10.0.0.1:80 -s rr -p 2678400\n"),
    ("port_zero_needs_persistence", "", "-A -t 10.0.0.1:0 -s rr\n-A -t 10.0.0.3:80 -s rr\n"),
    ("ops_only_udp", "", "-A -t 10.0.0.1:80 -s rr -o\n-A -t 10.0.0.3:80 -s rr\n"),
    (
        "delete_server_with_forward_stops",
        "-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.1.1.1:80 -m -w 1\n",
        "-d -t 10.0.0.1:80 -r 10.1.1.1:80 -m\n-A -t 10.0.0.3:80 -s rr\n",
    ),
    (
        "delete_service_with_scheduler_stops",
        "-A -t 10.0.0.1:80 -s rr\n",
        "-D -t 10.0.0.1:80 -s rr\n-A -t 10.0.0.3:80 -s rr\n",
    ),
    (
        "mixed_family_needs_tunnel",
        "-A -t [fd00::1]:80 -s rr\n",
        "-a -t [fd00::1]:80 -r 10.1.1.1:80 -i\n-a -t [fd00::1]:80 -r 10.1.1.2:80 -m\n-A -t 10.0.0.3:80 -s rr\n",
    ),
    (
        "edit_resets_what_it_omits",
        "-A -t 10.0.0.1:80 -s sh -p 600 -M 255.255.255.0 -b sh-port\n"
        "-a -t 10.0.0.1:80 -r 10.1.1.1:80 -m -w 5\n"
        "-A -u 10.0.0.2:53 -s rr -o\n"
        "-A -u 10.0.0.3:5060 -s rr -p 60 --pe sip\n"
        "-A -t [fd00::1]:80 -s rr -p 60 -M 64\n",
        "-E -t 10.0.0.1:80 -s rr\n"
        "-e -t 10.0.0.1:80 -r 10.1.1.1:80 -w 3\n"
        "-E -u 10.0.0.2:53 -s wrr\n"
        "-E -u 10.0.0.3:5060 -s rr -p 60\n"
        "-E -t [fd00::1]:80 -s rr -p 60\n",
    ),
    (
        "edit_sets_everything_given",
        "-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.1.1.1:80 -g -w 1\n-A -u 10.0.0.2:53 -s rr\n",
        "-E -t 10.0.0.1:80 -s sh -p 100 -M 255.255.0.0 -b sh-fallback,sh-port\n"
        "-e -t 10.0.0.1:80 -r 10.1.1.1:80 -m -w 7\n"
        "-E -u 10.0.0.2:53 -s wrr -o --pe sip\n",
    ),
    (
        "route_and_tunnel_use_the_service_port",
        "-A -t 10.0.0.1:80 -s rr\n-A -f 7 -s rr\n",
        "-a -t 10.0.0.1:80 -r 10.1.1.1:8080 -g\n"
        "-a -t 10.0.0.1:80 -r 10.1.1.2:8080 -i\n"
        "-a -t 10.0.0.1:80 -r 10.1.1.3:8080 -m\n"
        "-a -t 10.0.0.1:80 -r 10.1.1.1:8080 -g\n"
        "-e -t 10.0.0.1:80 -r 10.1.1.2:9999 -i -w 4\n"
        "-a -f 7 -r 10.1.1.4:8080 -g\n"
        "-a -f 7 -r 10.1.1.5:8080 -m\n"
        "-d -t 10.0.0.1:80 -r 10.1.1.1:1234\n",
    ),
    ("netmask_without_persistence_is_invisible", "", "-A -t 10.0.0.1:80 -s rr -M 255.255.0.0\n"),
    (
        "real_server_not_unicast",
        "-A -t [fd00::1]:80 -s rr\n",
        "-a -t [fd00::1]:80 -r [::ffff:10.0.0.12]:80 -m\n-a -t [fd00::1]:80 -r [fd00::2]:80 -m\n",
    ),
    (
        "markers",
        "",
        "-L --svcproxy-op-0\n-A -t 10.0.0.1:80 -s rr\n"
        "-L --svcproxy-op-1\n-A -t 10.0.0.1:80 -s rr\n"
        "-L --svcproxy-op-2\n-a -t 10.0.0.1:80 -r 10.1.1.1:80 -m -w 1\n"
        "-L --svcproxy-op-3\n-A -t 10.0.0.2:80 -s nosuchsched\n"
        "-L --svcproxy-op-4\n-A -t 10.0.0.3:80 -s rr\n"
        "-L --svcproxy-op-5\n-A -t 10.0.0.4:80 -s rr -b sh-port\n"
        "-L --svcproxy-op-6\n-A -t 10.0.0.5:80 -s rr\n",
    ),
    (
        "markers_last_line_fails",
        "",
        "-L --svcproxy-op-0\n-A -t 10.0.0.1:80 -s rr\n-L --svcproxy-op-1\n-A -t 10.0.0.1:80 -s rr\n",
    ),
    (
        "ipv6_and_fwmark",
        "",
        "-A -t [FD00:0::00A]:80 -s rr\n"
        "-a -t [fd00::a]:80 -r [FD00::B]:80 -m\n"
        "-A -f 6 -6 -s rr\n"
        "-a -f 6 -6 -r [fd00::1]:0 -m\n"
        "-a -f 6 -r [fd00::2]:0 -m\n"
        "-A -t 10.0.0.3:80 -s rr\n",
    ),
]


def run(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)


def main() -> None:
    out = sys.argv[1]
    subprocess.run(["modprobe", "ip_vs"], check=True)
    version = run(["dpkg-query", "-W", "-f=${Version}", "ipvsadm"]).stdout
    records = []
    for name, setup, script in CASES:
        run(["ipvsadm", "-C"])
        if setup:
            prep = run(["ipvsadm", "-R"], setup)
            assert prep.returncode == 0 and not prep.stderr, (name, prep)
        proc = run(["ipvsadm", "-R"], script)
        after = run(["ipvsadm", "-Sn"])
        records.append(
            {
                "name": name,
                "setup": setup,
                "input": script,
                "returncode": proc.returncode,
                "stdout": proc.stdout,
                "stderr": proc.stderr,
                "after": after.stdout,
            }
        )
    run(["ipvsadm", "-C"])
    doc = {"kernel": run(["uname", "-r"]).stdout.strip(), "ipvsadm": version, "cases": records}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
