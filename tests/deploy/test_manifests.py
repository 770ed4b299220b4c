"""deploy/: every overlay renders and validates offline against the oldest and newest Kubernetes supported, and holds
what schemas don't check: selectors match pod labels, probe and Service ports exist in the containers, GPU requests
equal limits, HPAs scale Deployments that exist on metrics the Prometheus Adapter's rules expose, only the
orchestrator reaches the draft and verify ports, cost tables are ConfigMaps of `cast profile` tables, drain fits in
the grace period, and the Dockerfile lints clean."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from cast_core.cost_table import CostTable
from tests.deploy.k8s import (DEPLOY, K8S, REPO_ROOT, K8S_VERSIONS, OVERLAYS, admitted, container_port, matches, objects,
                              one, pod_labels, pod_spec, render, tool)

SERVICES = ("orchestrator", "draft", "verify")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every way the manifests are meant to be applied: the overlays, and the gpu overlay with the draft on GPUs."""
    out = {name: render(K8S / "overlays" / name) for name in OVERLAYS}
    variant = tmp_path_factory.mktemp("gpu-draft-gpu")
    (variant / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", variant)],
        "components": [os.path.relpath(K8S / "components" / "draft-gpu", variant)]}))
    out["gpu+draft-gpu"] = render(variant)
    # Plain manifests applied on their own (`kubectl apply -f`), in the overlays' namespace.
    for path in sorted((K8S / "jobs").glob("*.yaml")):
        out[f"jobs/{path.name}"] = [{**d, "metadata": {**d["metadata"], "namespace": "cast-serve"}}
                                    for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def deployments(docs):
    return objects(docs, "Deployment")


def stacks(rendered):
    """The renders of whole deployments (not the standalone jobs)."""
    return {name: docs for name, docs in rendered.items() if not name.startswith("jobs/")}


def cast_deployment(docs, service: str) -> dict:
    return one(docs, "Deployment", f"cast-{service}")


def main_container(workload: dict) -> dict:
    return pod_spec(workload)["containers"][0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_overlay_validates_strictly(rendered, version, tmp_path):
    for name, docs in rendered.items():
        path = tmp_path / f"{name.replace('/', '-')}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        out = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{name} on Kubernetes {version}:\n{out.stdout}{out.stderr}"


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    """The check above can fail: a field the schema lacks is an error."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                                    "spec": {"ports": [{"port": 1}], "clusterIp": "None"}}))
    out = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSIONS[-1], str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "clusterIp" in out.stdout + out.stderr


def test_selectors_match_the_pods_they_mean(rendered):
    for name, docs in stacks(rendered).items():
        workloads = {**deployments(docs), **objects(docs, "Job")}
        for wname, w in deployments(docs).items():
            assert matches(w["spec"]["selector"], pod_labels(w)), f"{name}: {wname}'s selector misses its pods"
        for sname, service in objects(docs, "Service").items():
            selected = [w for w, d in deployments(docs).items() if matches(service["spec"]["selector"], pod_labels(d))]
            assert len(selected) == 1, f"{name}: Service {sname} selects {selected}"
        for service in SERVICES:
            pdb = one(docs, "PodDisruptionBudget", f"cast-{service}")
            selected = [w for w, d in workloads.items() if matches(pdb["spec"]["selector"], pod_labels(d))]
            assert selected == [f"cast-{service}"], f"{name}: PDB cast-{service} selects {selected}"
        assert one(docs, "Service", "cast-draft")["spec"]["clusterIP"] == "None"
        assert one(docs, "Service", "cast-verify")["spec"]["clusterIP"] == "None"
        assert one(docs, "Service", "cast-orchestrator")["spec"]["type"] == "ClusterIP"


def test_probe_and_service_ports_exist_in_the_containers(rendered):
    for name, docs in stacks(rendered).items():
        for wname, w in deployments(docs).items():
            for c in pod_spec(w)["containers"]:
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    spec = c.get(probe)
                    if spec is None:
                        assert not wname.startswith("cast-"), f"{name}: {wname}/{c['name']} has no {probe}"
                        continue
                    action = spec.get("grpc") or spec.get("httpGet") or spec.get("tcpSocket")
                    assert container_port(c, action["port"]) is not None, \
                        f"{name}: {wname}/{c['name']} {probe} port {action['port']} is not a container port"
        for sname, service in objects(docs, "Service").items():
            [w] = [d for d in deployments(docs).values() if matches(service["spec"]["selector"], pod_labels(d))]
            for port in service["spec"]["ports"]:
                assert any(container_port(c, port["targetPort"]) for c in pod_spec(w)["containers"]), \
                    f"{name}: Service {sname} port {port['name']} targets {port['targetPort']}, not a container port"


def test_the_services_probe_their_own_grpc_health(rendered):
    names = {"orchestrator": "cast.v1.GenerationService", "draft": "cast.v1.DraftService",
             "verify": "cast.v1.VerifyService"}
    for docs in stacks(rendered).values():
        for service in SERVICES:
            c = main_container(cast_deployment(docs, service))
            assert c["readinessProbe"]["grpc"]["service"] == names[service]
            assert c["startupProbe"]["grpc"]["service"] == names[service]
            assert c["livenessProbe"]["grpc"]["service"] == ""
            # Model loading takes minutes on a GPU: the start-up probe allows for it, not the liveness probe.
            startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
            assert startup >= 300, f"cast-{service}: {startup} s to start"


def test_gpus_are_requested_whole_and_equal_to_their_limits(rendered):
    def gpus(container, kind):
        return container.get("resources", {}).get(kind, {}).get("nvidia.com/gpu")

    for name, docs in rendered.items():
        for wname, w in {**deployments(docs), **objects(docs, "Job")}.items():
            for c in pod_spec(w)["containers"]:
                assert gpus(c, "requests") == gpus(c, "limits"), f"{name}: {wname}/{c['name']}"
                if gpus(c, "limits") is not None:
                    assert int(gpus(c, "limits")) >= 1
                    tolerated = {t["key"] for t in pod_spec(w).get("tolerations", [])}
                    assert "nvidia.com/gpu" in tolerated, f"{name}: {wname} does not tolerate the GPU nodes' taint"
                    assert pod_spec(w).get("nodeSelector", {}).get("nvidia.com/gpu.present") == "true"
    gpu_on = {name: {w for w, d in deployments(docs).items() if gpus(main_container(d), "limits")}
              for name, docs in stacks(rendered).items()}
    assert gpu_on == {"cpu": set(), "gpu": {"cast-verify"}, "gpu+draft-gpu": {"cast-verify", "cast-draft"}}


def adapter_rules() -> dict[str, set[str]]:
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    return {kind: {rule["name"]["as"] for rule in values["rules"][kind]} for kind in ("custom", "external")}


def test_autoscalers_scale_deployments_that_exist_on_metrics_the_adapter_exposes(rendered):
    rules = adapter_rules()
    for name, docs in stacks(rendered).items():
        hpas = objects(docs, "HorizontalPodAutoscaler")
        assert set(hpas) == {"cast-draft", "cast-verify"}, name
        for hname, hpa in hpas.items():
            ref = hpa["spec"]["scaleTargetRef"]
            assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
            target = one(docs, "Deployment", ref["name"])
            assert "replicas" not in target["spec"], f"{name}: {ref['name']} sets replicas: applying it would fight the HPA"
            for metric in hpa["spec"]["metrics"]:
                kind = {"Pods": "custom", "External": "external"}[metric["type"]]
                metric_name = metric[metric["type"].lower()]["metric"]["name"]
                assert metric_name in rules[kind], f"{name}: {hname} reads {metric_name}, not among {rules[kind]}"
            down = hpa["spec"]["behavior"]["scaleDown"]
            assert down["stabilizationWindowSeconds"] >= 300, f"{hname} scales down within 5 minutes of a dip"
            assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"]), f"{hname}: one pod at a time"
            assert hpa["spec"]["minReplicas"] >= 1


def test_adapter_rules_query_the_series_they_name():
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    for rule in values["rules"]["custom"] + values["rules"]["external"]:
        series = re.match(r"(\w+)\{", rule["seriesQuery"])[1]
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series), rule
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert "<<.GroupBy>>" in rule["metricsQuery"]


def test_only_the_orchestrator_reaches_the_draft_and_verify_ports(rendered):
    for name, docs in stacks(rendered).items():
        policies = list(objects(docs, "NetworkPolicy").values())
        ns = "cast-serve"
        pods = {w: pod_labels(d) for w, d in {**deployments(docs), **objects(docs, "Job")}.items()}
        for service in ("draft", "verify"):
            target = pods[f"cast-{service}"]
            port = main_container(cast_deployment(docs, service))["ports"][0]["containerPort"]
            assert admitted(policies, pods["cast-orchestrator"], ns, target, ns, port), f"{name}: {service}"
            for other, labels in pods.items():
                if other != "cast-orchestrator":
                    assert not admitted(policies, labels, ns, target, ns, port), f"{name}: {other} reaches {service}"
            assert not admitted(policies, {}, ns, target, ns, port)
            assert not admitted(policies, pods["cast-orchestrator"], "elsewhere", target, ns, port), \
                f"{name}: an orchestrator-labelled pod of another namespace reaches {service}"
            assert admitted(policies, {}, "monitoring", target, ns, 9464), f"{name}: Prometheus cannot scrape {service}"
        assert admitted(policies, {}, "elsewhere", pods["cast-orchestrator"], ns, 50051)


def test_volumes_name_claims_and_config_maps_that_exist(rendered):
    for name, docs in stacks(rendered).items():
        claims, maps = objects(docs, "PersistentVolumeClaim"), objects(docs, "ConfigMap")
        for wname, w in {**deployments(docs), **objects(docs, "Job")}.items():
            for volume in pod_spec(w).get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {wname}"
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in maps, f"{name}: {wname} mounts a missing ConfigMap"
        for service in SERVICES:
            # The weights, and the only paths a service writes on its read-only root filesystem.
            mounts = {m["mountPath"]: m for m in main_container(cast_deployment(docs, service))["volumeMounts"]}
            assert mounts["/models"].get("readOnly") is True, f"{name}: cast-{service}"
            assert {"/var/cache/cast", "/tmp"} <= set(mounts), f"{name}: cast-{service}"


def test_cost_tables_are_config_maps_of_profiled_tables_for_the_gpu_the_pod_runs_on(rendered):
    docs = rendered["gpu"]
    maps = objects(docs, "ConfigMap")
    for service in ("verify", "draft"):
        w = cast_deployment(docs, service)
        c = main_container(w)
        env = {e["name"]: e.get("value") for e in c["env"]}
        path = env[f"CAST_{service.upper()}_COST_TABLE"]
        [mount] = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        [volume] = [v for v in pod_spec(w)["volumes"] if v["name"] == mount["name"]]
        data = maps[volume["configMap"]["name"]]["data"]
        table = CostTable.from_json(data[path[len(mount["mountPath"]) + 1:]])
        assert table.model_id.split("@")[0] == ("target" if service == "verify" else "draft")
        if service == "verify":
            product = pod_spec(w)["nodeSelector"]["nvidia.com/gpu.product"]
            assert product == table.device.replace(" ", "-"), f"a table of {table.device} on {product} nodes"
    # The cpu overlay profiles on the cluster's own CPUs at start-up instead.
    for service in ("verify", "draft"):
        env = {e["name"] for e in main_container(cast_deployment(rendered["cpu"], service))["env"]}
        assert f"CAST_{service.upper()}_COST_TABLE" not in env


def test_termination_grace_covers_the_services_drain(rendered):
    for name, docs in stacks(rendered).items():
        for service, grace_var in (("orchestrator", "CAST_ORCH_GRACE"), ("draft", "CAST_DRAFT_GRACE_S"),
                                   ("verify", "CAST_VERIFY_GRACE_S")):
            w = cast_deployment(docs, service)
            c = main_container(w)
            grace = float({e["name"]: e.get("value") for e in c["env"]}[grace_var])
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            pause = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
            assert pod_spec(w)["terminationGracePeriodSeconds"] >= pause + grace + 5, f"{name}: cast-{service}"


def test_pods_run_as_non_root_on_a_read_only_root_filesystem(rendered):
    for name, docs in rendered.items():
        for wname, w in {**deployments(docs), **objects(docs, "Job")}.items():
            assert pod_spec(w)["securityContext"]["runAsNonRoot"] is True, f"{name}: {wname}"
            for c in pod_spec(w).get("initContainers", []) + pod_spec(w)["containers"]:
                assert c["securityContext"]["readOnlyRootFilesystem"] is True, f"{name}: {wname}/{c['name']}"
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert "limits" in c["resources"] and "requests" in c["resources"], f"{name}: {wname}/{c['name']}"


def test_the_dockerfile_lints_clean():
    out = subprocess.run([tool("hadolint"), str(DEPLOY / "docker" / "Dockerfile")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_readme_applies_the_kustomizations_the_tests_render():
    """Every `-k DIR` and `kubectl kustomize DIR` of deploy/README.md is a kustomization rendered above."""
    readme = (DEPLOY / "README.md").read_text()
    dirs = set(re.findall(r"(?:-k|kustomize) (deploy/k8s/\S+)", readme))
    assert {"deploy/k8s/overlays/cpu", "deploy/k8s/overlays/gpu"} <= dirs
    for d in dirs:
        assert d.rstrip("/").removeprefix("deploy/k8s/overlays/") in OVERLAYS, f"README applies {d}, untested"
    for f in set(re.findall(r"apply -f (deploy/k8s/\S+\.yaml)", readme)):
        assert f.startswith("deploy/k8s/jobs/") and (REPO_ROOT / f).is_file(), f"README applies {f}, unvalidated"
    # The adapter's values the README installs are the ones the autoscaler test reads.
    assert "-f deploy/k8s/monitoring/prometheus-adapter-values.yaml" in readme


def test_base_renders_alone():
    docs = render(K8S / "base")
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                         "NetworkPolicy", "PersistentVolumeClaim"}
