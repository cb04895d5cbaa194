"""An OCI runtime configuration (config.json for crun or runc) for one container of a
Pod spec, made the way a kubelet with containerd makes it, for the parts the DaemonSet
uses: command and args (else the image's entrypoint and cmd), env (values and
spec.nodeName), hostNetwork, hostPath and configMap volumes with readOnly and
mountPropagation, and the securityContext (runAsUser, privileged, capabilities,
readOnlyRootFilesystem, allowPrivilegeEscalation).

Not made: cgroups and resource limits, seccomp and AppArmor profiles and the
kubelet's /etc/hosts and resolv.conf. The caller gives the host directory behind each
configMap volume (the kubelet writes one per ConfigMap), may put any hostPath somewhere
else (a stand-in for a host directory that must not be touched), and may give the
directory of the service account token volume (the kubelet's projected volume, mounted
read-only into every container unless automountServiceAccountToken is false).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

#: containerd's capabilities for a container that is not privileged (before add/drop).
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
                "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")
#: containerd's masked and read-only paths for a container that is not privileged.
MASKED = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"]
READ_ONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
#: Where the kubelet mounts the service account token volume in every container.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
PROPAGATION = {"HostToContainer": "rslave", "Bidirectional": "rshared", "None": "rprivate"}


def capabilities(security: Mapping[str, Any]) -> list[str]:
    """The container's capabilities, as CAP_ names, from its securityContext."""
    caps = security.get("capabilities", {})
    drop = set(caps.get("drop", []))
    kept = set() if "ALL" in drop else set(DEFAULT_CAPS) - drop
    return sorted(f"CAP_{c}" for c in kept | set(caps.get("add", [])))


def oci_config(pod: Mapping[str, Any], name: str, *, rootfs: str, image: Mapping[str, Any],
               node_name: str, config_maps: Mapping[str, str],
               host_paths: Mapping[str, str] | None = None, service_account: str | None = None) -> dict[str, Any]:
    """config.json for container (or init container) ``name`` of ``pod`` (a Pod spec).

    ``image`` is the image's OCI configuration (Entrypoint, Cmd, Env, WorkingDir);
    ``config_maps`` maps a ConfigMap's name to the directory holding its files;
    ``host_paths`` maps a hostPath to the directory used in its place;
    ``service_account`` is the directory holding the Pod's token, ca.crt and namespace.
    """
    container = next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name)
    security = container.get("securityContext", {})
    if security.get("privileged"):
        raise ValueError("privileged containers are not made here")
    args = container.get("command") or image.get("Entrypoint") or []
    args = list(args) + list(container.get("args") or ([] if container.get("command") else image.get("Cmd") or []))
    env = list(image.get("Env") or []) + [f"{e['name']}={_env_value(e, node_name)}" for e in container.get("env", [])]
    caps = capabilities(security)
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if not pod.get("hostNetwork"):
        namespaces.append({"type": "network"})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": security.get("runAsUser", 0), "gid": 0},
            "args": args, "env": env, "cwd": image.get("WorkingDir") or "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": security.get("allowPrivilegeEscalation") is False,
        },
        "root": {"path": rootfs, "readonly": bool(security.get("readOnlyRootFilesystem"))},
        "hostname": node_name,
        "mounts": _base_mounts() + _volume_mounts(pod, container, config_maps, host_paths or {})
        + _token_mount(pod, service_account),
        "linux": {"namespaces": namespaces, "maskedPaths": MASKED, "readonlyPaths": READ_ONLY,
                  **_rootfs_propagation(container)},
    }


def _rootfs_propagation(container: Mapping[str, Any]) -> dict[str, str]:
    """containerd's rootfsPropagation: rshared with a Bidirectional mount, rslave with a
    HostToContainer one. The runtime makes the container's root recursively private
    otherwise, and a bind taken from a private tree receives no later host mount
    whatever its own propagation option says."""
    modes = {m.get("mountPropagation") for m in container.get("volumeMounts", [])}
    for mode in ("Bidirectional", "HostToContainer"):
        if mode in modes:
            return {"rootfsPropagation": PROPAGATION[mode]}
    return {}


def _env_value(entry: Mapping[str, Any], node_name: str) -> str:
    if "value" in entry:
        return str(entry["value"])
    field = entry["valueFrom"]["fieldRef"]["fieldPath"]
    if field != "spec.nodeName":
        raise ValueError(f"env {entry['name']}: fieldRef {field} is not made here")
    return node_name


def _base_mounts() -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]


def _token_mount(pod: Mapping[str, Any], service_account: str | None) -> list[dict[str, Any]]:
    if service_account is None or pod.get("automountServiceAccountToken") is False:
        return []
    return [{"destination": SERVICE_ACCOUNT_DIR, "type": "bind", "source": service_account,
             "options": ["rbind", "ro", "rprivate"]}]


def _volume_mounts(pod: Mapping[str, Any], container: Mapping[str, Any], config_maps: Mapping[str, str],
                   host_paths: Mapping[str, str]) -> list[dict[str, Any]]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = []
    for m in container.get("volumeMounts", []):
        volume = volumes[m["name"]]
        if "hostPath" in volume:
            path = volume["hostPath"]["path"]
            source = host_paths.get(path, path)
        elif "configMap" in volume:
            source = config_maps[volume["configMap"]["name"]]
        else:
            raise ValueError(f"volume {m['name']}: only hostPath and configMap volumes are made here")
        options = ["rbind", "ro" if m.get("readOnly") else "rw",
                   PROPAGATION[m.get("mountPropagation", "None")]]
        mounts.append({"destination": m["mountPath"], "type": "bind", "source": source, "options": options})
    return mounts


def write_projected(directory: Path, files: Mapping[str, str]) -> None:
    """Write ``files`` into a projected volume's directory as the kubelet's atomic writer
    does (and does again when it rotates a token): a new timestamped directory, the
    ``..data`` symlink swapped to it by one rename, each file a symlink through ``..data``."""
    stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    (directory / stamp).mkdir()
    for name, text in files.items():
        (directory / stamp / name).write_text(text)
    os.symlink(stamp, directory / "..data_tmp")
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            os.symlink(f"..data/{name}", directory / name)
