"""Renders a kustomization the way `kubectl apply -k` would, for the few features the
project's kustomizations use: resources (files and directories with a
kustomization.yaml), configMapGenerator (files, literals, a namespace; with
generatorOptions.disableNameSuffixHash), images (new name and tag for the containers
of workloads), and patches that are JSON patches (RFC 6902,
applied with the jsonpatch library) on a target named by kind and name.

kubectl and kustomize may not be installed where the tests run; anything else in a
kustomization is refused here, so a kustomization that grows a feature this does not
render fails the test instead of rendering wrong.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

KNOWN = {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions", "patches", "images"}


def render(directory: Path, visited: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` prints, in the same order. Like
    kustomize, refuses a directory resource that contains a kustomization it is reached
    from ("cycle detected") and a file resource outside the kustomization's directory
    (its default load restrictor)."""
    directory = directory.resolve()
    visited = (*visited, directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN
    if unknown:
        raise ValueError(f"{directory}: not rendered here: {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            inside = [v for v in visited if v == path or path in v.parents]
            if inside:
                raise ValueError(f"{directory}: resource {entry}: cycle detected: {path} contains {inside[0]}")
            objects += render(path, visited)
        else:
            if directory not in path.parents:
                raise ValueError(f"{directory}: resource {entry}: {path} is not in or below {directory}")
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    generators = kustomization.get("configMapGenerator", [])
    if generators and not kustomization.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise ValueError(f"{directory}: name suffix hashes are not rendered here")
    objects += [_config_map(directory, g) for g in generators]
    for patch in kustomization.get("patches", []):
        objects = [_patched(directory, patch, o) for o in objects]
    for image in kustomization.get("images", []):
        objects = [_retagged(image, o) for o in objects]
    return objects


def _retagged(image: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        name, _, tag = c["image"].partition(":")
        if name == image["name"]:
            c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return obj


def _config_map(directory: Path, gen: dict[str, Any]) -> dict[str, Any]:
    data = {Path(f).name: (directory / f).read_text() for f in gen.get("files", [])}
    data.update(dict(lit.split("=", 1) for lit in gen.get("literals", [])))
    meta = {"name": gen["name"], **({"namespace": gen["namespace"]} if "namespace" in gen else {})}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _patched(directory: Path, patch: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    target = patch["target"]
    if set(target) - {"group", "version", "kind", "name"} or set(patch) - {"target", "path"}:
        raise ValueError(f"{directory}: only JSON patches on a kind and name are rendered here: {patch}")
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    if any(wanted[k] != v for k, v in target.items()):
        return obj
    ops = yaml.safe_load((directory / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise ValueError(f"{patch['path']}: only JSON patches (a list of operations) are rendered here")
    result: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(obj), ops)
    return result
