#!/bin/bash
# Regenerates the ipvsadm fixtures in this folder. Run ONLY inside a throwaway VM (it
# flushes the IPVS table and creates network namespaces), from the repo root:
#
#   .venv/bin/vng --run /boot/vmlinuz-6.1.0-56-amd64 --user root --disable-kvm \
#       --memory 2G --rwdir /tmp/vmout \
#       --exec "tests/data/ipvsadm/capture.sh /tmp/vmout/fixtures" </dev/null
#   cp /tmp/vmout/fixtures/*.txt tests/data/ipvsadm/
#
# Every fixture is the verbatim output of the command named in its file name.
set -u
OUT=${1:?usage: capture.sh OUTDIR}
mkdir -p "$OUT"
modprobe ip_vs
{ echo "kernel: $(uname -r)"; echo "ipvsadm: $(dpkg-query -W -f='${Version}' ipvsadm)"; } > "$OUT/versions.txt"

# --- mixed: every service/real-server form svcproxy has to read back ------------
ipvsadm -C
: > "$OUT/mixed_rejected.txt"
# One command per line (not -R, which stops at the first parse error); rejects are logged.
while read -r line; do
  ipvsadm $line 2>>"$OUT/mixed_rejected.txt" || echo "  ^ rejected: ipvsadm $line" >> "$OUT/mixed_rejected.txt"
done <<'X'
-A -t 10.0.0.1:80 -s rr
-a -t 10.0.0.1:80 -r 10.1.0.1:8080 -m -w 1
-a -t 10.0.0.1:80 -r 10.1.0.2:8080 -m -w 0
-A -u 10.0.0.1:53 -s wrr -o
-a -u 10.0.0.1:53 -r 10.1.0.3:53 -g -w 5
-a -u 10.0.0.1:53 -r 10.1.0.4:53 -i -w 2147483647
-A --sctp-service 10.0.0.2:3868 -s sh -b sh-fallback,sh-port
-a --sctp-service 10.0.0.2:3868 -r 10.1.0.5:3868 -m -x 100 -y 50
-A -t 10.0.0.3:443 -s lc -p 3600 -M 255.255.255.0
-a -t 10.0.0.3:443 -r 10.1.0.6:443 -m
-A -t 10.0.0.4:0 -s rr -p
-a -t 10.0.0.4:0 -r 10.1.0.7 -g
-A -t 10.0.0.5:8080 -s wlc
-A -t 10.0.0.6:80 -s mh -b mh-fallback,mh-port
-A -t 10.0.0.7:80 -s rr -b flag-1,flag-3
-A -u 10.0.0.8:5060 -s rr -p 60 --pe sip
-A -t 10.0.0.9:80 -s rr
-a -t 10.0.0.9:80 -r 10.1.0.10:80 -i --tun-type gue --tun-port 6080 --tun-csum
-a -t 10.0.0.9:80 -r 10.1.0.11:80 -i --tun-type gre --tun-nocsum
-A -t 10.0.0.10:80 -s rr
-a -t 10.0.0.10:80 -r [fd00:1::10]:80 -i
-A -f 1 -s rr
-a -f 1 -r 10.1.0.8:80 -m
-a -f 1 -r 10.1.0.9 -g
-A -f 2 -6 -s sh -p 60 -M 64 -b sh-port
-a -f 2 -6 -r [fd00:1::8]:80 -m -w 4
-a -f 2 -6 -r [fd00:1::9] -g
-A -f 3 -s rr -o
-A -t [fd00::1]:80 -s rr
-a -t [fd00::1]:80 -r [fd00:1::1]:8080 -m -w 3
-a -t [fd00::1]:80 -r [fd00:1::2]:8080 -i
-A -u [2001:db8::1]:53 -s sh -p 100 -M 64 -b sh-port
-a -u [2001:db8::1]:53 -r [2001:db8:1::1]:53 -g
-A --sctp-service [fd00::2]:9 -s rr -p 300
-A -t [fd00::3]:0 -s wrr -p 120
-A -t [::ffff:10.0.0.11]:80 -s rr
-A -t 0.0.0.0:80 -s rr
-A -t [::]:81 -s rr
X
ipvsadm -Sn > "$OUT/save_mixed.txt"
ipvsadm -Ln > "$OUT/list_mixed.txt"
ipvsadm -Ln --thresholds > "$OUT/list_thresholds_mixed.txt"
ipvsadm -Ln --tun-info > "$OUT/list_tun_info_mixed.txt"

# --- empty table ---------------------------------------------------------------
ipvsadm -C
ipvsadm -Sn > "$OUT/save_empty.txt"
ipvsadm -Ln > "$OUT/list_empty.txt"

# --- connection counts: client ns -> lb ns (IPVS, masq) -> real-server ns --------
ip netns add cl; ip netns add lb; ip netns add rs
ip link add c0 type veth peer name l0; ip link set c0 netns cl; ip link set l0 netns lb
ip link add l1 type veth peer name r0; ip link set l1 netns lb; ip link set r0 netns rs
ip -n cl addr add 192.168.88.2/24 dev c0; ip -n cl link set c0 up; ip -n cl link set lo up
ip -n cl route add 10.96.0.0/16 via 192.168.88.1
ip -n lb addr add 192.168.88.1/24 dev l0; ip -n lb link set l0 up
ip -n lb addr add 192.168.77.1/24 dev l1; ip -n lb link set l1 up; ip -n lb link set lo up
ip -n lb addr add 10.96.0.10/32 dev lo
ip netns exec lb sysctl -qw net.ipv4.ip_forward=1
ip -n rs addr add 192.168.77.2/24 dev r0; ip -n rs link set r0 up; ip -n rs link set lo up
ip -n rs route add default via 192.168.77.1
ip netns exec lb ipvsadm -R <<'X'
-A -t 10.96.0.10:80 -s rr
-a -t 10.96.0.10:80 -r 192.168.77.2:8080 -m -w 1
-a -t 10.96.0.10:80 -r 192.168.77.3:8080 -m -w 1
X
ip netns exec rs python3 -c '
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("192.168.77.2", 8080)); s.listen(64); held = []
s.settimeout(60)
while True:
    try:
        c, _ = s.accept()
    except OSError:
        break
    held.append(c)
' &
SERVER=$!
sleep 2
# rr alternates: even connections reach the live server, odd ones the dead .3 (SYN only).
ip netns exec cl python3 -c '
import socket, time
held = []
for i in range(10):
    c = socket.socket(); c.setblocking(False)
    try:
        c.connect(("10.96.0.10", 80))
    except BlockingIOError:
        pass
    held.append(c)
time.sleep(3)
for c in held[:4]:
    c.close()   # 2 of these were established: they go to FIN_WAIT / TIME_WAIT (inactive)
time.sleep(2)
open("'"$OUT"'/.client_ready", "w").close()
time.sleep(30)
' &
CLIENT=$!
for _ in $(seq 60); do [ -e "$OUT/.client_ready" ] && break; sleep 1; done
ip netns exec lb ipvsadm -Ln > "$OUT/list_conns.txt"
ip netns exec lb ipvsadm -Sn > "$OUT/save_conns.txt"
ip netns exec lb ipvsadm -Lnc > "$OUT/list_conns_connections.txt"
kill $CLIENT $SERVER 2>/dev/null; rm -f "$OUT/.client_ready"
ip netns del cl; ip netns del lb; ip netns del rs
ipvsadm -C
echo done > "$OUT/done"
