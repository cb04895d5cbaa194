#!/bin/bash
# The main job, end to end, inside the VM that tools/demo boots (`make demo`):
#
#   1. a network for the example cluster: one namespace per Pod that node-a's table
#      sends traffic to, each running small servers that answer with the Pod's name
#      on every port the table uses (HTTP for TCP ports, a UDP echo for UDP ports);
#   2. a client namespace (a Pod with a network interface of its own: a veth and a
#      default route) where `svcproxy sync` programs IPVS;
#   3. the table as the kernel has it (`ipvsadm -Ln`);
#   4. requests from the client to every virtual service, and who answered.
#
# It creates namespaces and programs IPVS, so it runs only in that throwaway VM
# (tools/demo sets SVCPROXY_DEMO_IN_VM=1). Usage: examples/demo.sh [CLUSTER.yaml [NODE]]
set -Eeuo pipefail

if [[ ${SVCPROXY_DEMO_IN_VM:-} != 1 ]]; then
    echo "examples/demo.sh creates network namespaces and programs IPVS: it runs inside" >&2
    echo "the VM of tools/demo (make demo), not on this machine." >&2
    exit 2
fi

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
CLUSTER=$(readlink -f -- "${1:-$REPO/examples/cluster.yaml}")
NODE=${2:-node-a}
PY=$REPO/.venv/bin/python
SVCPROXY=$REPO/.venv/bin/svcproxy
NETNS_PY=$REPO/tests/kernel/netns.py           # the kernel tests' servers and clients
HELPER=(/usr/bin/python3 -I -S -B)               # stdlib only: starts fastest in the VM
CLIENT=demo-client NODENS=demo-node
WORK=$(mktemp -d /tmp/svcproxy-demo.XXXXXX)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin NO_COLOR=1
export PYTHONDONTWRITEBYTECODE=1

T0=$(cut -d' ' -f1 /proc/uptime)
STEP=0
step() {
    STEP=$((STEP + 1))
    local now; now=$(cut -d' ' -f1 /proc/uptime)
    printf '\n=== VM step %d: %s   [%.0fs]\n' "$STEP" "$*" "$(awk -v a="$T0" -v b="$now" 'BEGIN{print b-a}')"
}
indent() { sed 's/^/    /'; }

cleanup() {
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        [[ -f $WORK/namespaces && -n $(grep -Fx "$ns" "$WORK/namespaces") ]] || continue
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns delete "$ns" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'echo "demo.sh: line $LINENO: \"$BASH_COMMAND\" failed (exit $?)" >&2' ERR

newns() { ip netns add "$1"; ip -n "$1" link set lo up; echo "$1" >>"$WORK/namespaces"; }

for m in ip_vs ip_vs_rr ip_vs_wlc veth bridge; do modprobe "$m"; done

# ------------------------------------------------------------------------------------
step "what node-a's table needs: Pods, their addresses, the ports they serve"
newns "$NODENS"
newns "$CLIENT"
# In the client's fresh namespace IPVS is empty: plan shows the whole table.
ip netns exec "$CLIENT" "$SVCPROXY" plan -f "$CLUSTER" --node "$NODE" -o json >"$WORK/plan.json" 2>"$WORK/plan.err" ||
    [[ $? == 2 ]] || { cat "$WORK/plan.err" >&2; exit 1; }

# From the plan (every real server, and what each virtual service is for) and the
# cluster file (which Pod has which address) work out:
#   pod NAME ADDR...            one namespace per Pod
#   serve NAME PROTO PORT       one server per Pod and port
#   vs PROTO ADDR PORT N LABEL  every virtual service, N real servers
"$PY" - "$WORK/plan.json" "$CLUSTER" >"$WORK/layout" <<'EOF'
import json, sys, yaml
plan = json.load(open(sys.argv[1]))
items = []
for doc in yaml.safe_load_all(open(sys.argv[2])):
    if isinstance(doc, dict):
        items.extend(doc.get("items", [doc]) if doc.get("kind", "").endswith("List") else [doc])
pod_of = {}
for s in (i for i in items if i.get("kind") == "EndpointSlice"):
    for ep in s.get("endpoints") or []:
        name = (ep.get("targetRef") or {}).get("name") or "pod-" + ep["addresses"][0].replace(":", "-").replace(".", "-")
        for a in ep["addresses"]:
            pod_of[a] = name
pods, serve = {}, set()
for vs in plan["services"]:
    for d in vs["destinations"]:
        name = pod_of.get(d["address"], "pod-" + d["address"].replace(":", "-").replace(".", "-"))
        pods.setdefault(name, set()).add(d["address"])
        serve.add((name, "udp" if vs["protocol"] == "UDP" else "http", d["port"]))
    print("vs", vs["protocol"], vs["address"], vs["port"], len(vs["destinations"]),
          ", ".join(f'{o["namespace"]}/{o["name"]}:{o["port"]} ({o["kind"]})' for o in vs["origin"]) or "?")
for name, addrs in sorted(pods.items()):
    print("pod", name, *sorted(addrs))
for name, proto, port in sorted(serve):
    print("serve", name, proto, port)
EOF
printf '%s Pods, %s servers, %s virtual services:\n' "$(grep -c '^pod ' "$WORK/layout")" \
    "$(grep -c '^serve ' "$WORK/layout")" "$(grep -c '^vs ' "$WORK/layout")"
awk '$1 == "pod" { $1 = ""; print }' "$WORK/layout" | indent

# ------------------------------------------------------------------------------------
step "Pod namespaces on a bridge, each running servers that answer with the Pod's name"
# One bridge for every Pod (both nodes' Pod networks are flat here: one VM).
ip -n "$NODENS" link add cni0 type bridge
ip -n "$NODENS" addr add 10.244.255.254/16 dev cni0
ip -n "$NODENS" addr add fd00:10:244:ffff::1/48 dev cni0 nodad
ip -n "$NODENS" link set cni0 up
i=0
attach() {  # attach NS ADDR...: veth into the bridge, the addresses, default routes
    local ns=$1 v4=0 v6=0; shift
    i=$((i + 1))
    ip link add "veth$i" netns "$NODENS" type veth peer name eth0 netns "$ns"
    ip -n "$NODENS" link set "veth$i" master cni0 up
    for a in "$@"; do
        if [[ $a == *:* ]]; then ip -n "$ns" addr add "$a/48" dev eth0 nodad; v6=1
        else ip -n "$ns" addr add "$a/16" dev eth0; v4=1; fi
    done
    ip -n "$ns" link set eth0 up
    if ((v4)); then ip -n "$ns" route add default via 10.244.255.254; fi
    if ((v6)); then ip -n "$ns" -6 route add default via fd00:10:244:ffff::1; fi
}
while read -r _ name addrs; do
    newns "$name"
    # shellcheck disable=SC2086
    attach "$name" $addrs
done < <(grep '^pod ' "$WORK/layout")
n=0
while read -r _ name proto port; do
    n=$((n + 1))
    ip netns exec "$name" "${HELPER[@]}" "$NETNS_PY" serve --proto "$proto" --port "$port" --text "$name" \
        </dev/null >"$WORK/server-$n.out" 2>&1 &
done < <(grep '^serve ' "$WORK/layout")
for k in $(seq 1 "$n"); do
    for _ in $(seq 1 600); do
        grep -q '^READY' "$WORK/server-$k.out" 2>/dev/null && break
        sleep 0.1
    done
    grep -q '^READY' "$WORK/server-$k.out" || { echo "server $k did not start:"; cat "$WORK/server-$k.out"; exit 1; }
done
echo "$n servers listening, e.g.:"
grep '^serve ' "$WORK/layout" | head -n 4 | awk '{ printf "    %s: %s on port %s\n", $2, ($3 == "udp" ? "UDP echo" : "HTTP"), $4 }'

# ------------------------------------------------------------------------------------
step "a client Pod: its own veth, an address, a default route; svcproxy sync programs IPVS there"
attach "$CLIENT" 10.244.0.200 fd00:10:244::200
echo "client $CLIENT: 10.244.0.200, fd00:10:244::200 (share-NS: the table lives in the client's namespace)"
echo "\$ ip netns exec $CLIENT svcproxy sync -f ${CLUSTER#"$REPO"/} --node $NODE"
set +e
ip netns exec "$CLIENT" "$SVCPROXY" sync -f "$CLUSTER" --node "$NODE" >"$WORK/sync.out" 2>"$WORK/sync.err"
rc=$?
set -e
grep -v '^applied ' "$WORK/sync.out" | indent
echo "    ($(grep -c '^applied ' "$WORK/sync.out") 'applied ...' lines: the operations of the plan printed before the VM booted)"
[[ $rc == 0 ]] || { echo "sync FAILED (exit $rc):"; indent <"$WORK/sync.err"; exit 1; }

# ------------------------------------------------------------------------------------
step "the kernel's table: ipvsadm -Ln (in the client's namespace)"
ip netns exec "$CLIENT" ipvsadm -Ln | indent

# ------------------------------------------------------------------------------------
step "requests from the client to every virtual service: who answered"
failures=0
while read -r _ proto addr port ndest what; do
    count=$((ndest * 2 < 4 ? 4 : ndest * 2))
    host=$addr; [[ $addr == *:* ]] && host="[$addr]"
    mode=http; [[ $proto == UDP ]] && mode=udp
    if ((ndest == 0)); then
        printf '%-4s %-24s %-42s no endpoints: nothing to answer\n' "$proto" "$host:$port" "$what"
        continue
    fi
    ip netns exec "$CLIENT" "${HELPER[@]}" "$NETNS_PY" request --proto "$mode" --count "$count" --timeout 3 \
        "$addr" "$port" </dev/null >"$WORK/replies" 2>&1 || true
    line=$("${HELPER[@]}" - "$WORK/replies" <<'EOF'
import collections, json, sys
ok, bad, errors = collections.Counter(), 0, set()
for raw in open(sys.argv[1]):
    try:
        r = json.loads(raw)
    except ValueError:
        bad += 1; errors.add(raw.strip()[:60]); continue
    if r.get("ok"):
        ok[r["text"]] += 1
    else:
        bad += 1; errors.add(r.get("error", "?"))
text = ", ".join(f"{name} x{n}" for name, n in sorted(ok.items()))
if bad:
    text += f"{'; ' if text else ''}{bad} FAILED ({'; '.join(sorted(errors))})"
print(text)
EOF
)
    printf '%-4s %-24s %-42s -> %s\n' "$proto" "$host:$port" "$what" "$line"
    [[ $line != *FAILED* ]] || failures=$((failures + 1))
done < <(grep '^vs ' "$WORK/layout")
echo
echo "(rr spreads each client's connections over every real server; default/cart has"
echo " sessionAffinity ClientIP, so this one client stays with one Pod; UDP 53 is a UDP echo)"

# ------------------------------------------------------------------------------------
step "svcproxy plan again: the kernel already matches, nothing to do"
set +e
ip netns exec "$CLIENT" "$SVCPROXY" plan -f "$CLUSTER" --node "$NODE" 2>/dev/null | tail -n 1 | indent
rc=${PIPESTATUS[0]}
set -e
echo "    (plan exit status $rc: 0 = no changes)"

if ((failures)); then
    echo "demo: $failures virtual services did not answer" >&2
    exit 1
fi
((rc == 0)) || exit 1
echo
echo "demo: done: every virtual service answered through IPVS programmed by svcproxy."
