"""deploy/ checked without a Docker engine, a cluster or the network.

Always: every YAML parses and has the expected structure, every IRLIVE_* name is a Settings field and every
value parses, no literal secrets, grace periods >= 2 x IRLIVE_CALL_TIMEOUT_S + margin, the IAM policy grants
exactly the allowed actions, the Dockerfile runs as non-root. When the tool is present: Kubernetes schemas
(kubernetes-validate, offline), `kubectl kustomize`, `docker compose config`, `systemd-analyze verify`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from worker.config import Settings

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
ENV_EXAMPLE = DEPLOY / "irlive.env.example"

SETTINGS_VARS = frozenset("IRLIVE_" + f.name.upper() for f in fields(Settings))
# FLOWER_BASIC_AUTH: Flower's own login (user:password), from the same Secret, optional.
SECRET_VARS = frozenset({"IRLIVE_API_KEY", "IRLIVE_X402_PRIVATE_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                         "AWS_SESSION_TOKEN",
                         "FLOWER_BASIC_AUTH"})
ALLOWED_ENV = SETTINGS_VARS | SECRET_VARS
PLACEHOLDER = re.compile(r"^(REPLACE_ME|change-me)$")
MARGIN_S = 30.0
IRLIVE_IMAGE = re.compile(r"^irlive:\d+\.\d+\.\d+$")
REDIS_IMAGE = re.compile(r"^redis:\d+(\.\d+)*$")
WORKER_ARGS = ["celery", "-A", "worker", "worker", "--pool", "threads"]
WORKER_FLAGS = {"--without-gossip", "--without-mingle"}
# Flower shows a worker as online only while its heartbeats arrive; irlive's chunk lease is its own (Redis).
FORBIDDEN_WORKER_FLAGS = {"--without-heartbeat"}
FLOWER_ARGS = ["celery", "-A", "worker", "flower"]


# ---------------------------------------------------------------- helpers


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kw)


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "CronJob", "Job", "DaemonSet")]


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            assert not value.startswith(("'", '"')), f"{path.name}: quotes differ between compose and systemd"
            values[key.strip()] = value.strip()
    return values


def _configmap() -> dict[str, str]:
    return dict(_one(_k8s_docs(), "ConfigMap", "irlive-config")["data"])


def _call_timeout(env: dict[str, str]) -> float:
    return float(env.get("IRLIVE_CALL_TIMEOUT_S") or Settings.call_timeout_s)


def _check_timing(env: dict[str, str], grace_s: float, where: str) -> None:
    settings = Settings.from_env(env)
    need = 2 * settings.call_timeout_s + MARGIN_S
    assert grace_s >= need, f"{where}: grace {grace_s}s < 2 x IRLIVE_CALL_TIMEOUT_S + {MARGIN_S}s = {need}s"
    calls = math.ceil(settings.chunk_size / settings.images_per_call)
    assert settings.visibility_timeout >= 2 * calls * settings.call_timeout_s, f"{where}: visibility timeout"
    assert settings.visibility_timeout > grace_s, f"{where}: a chunk in warm shutdown would be redelivered"


def _duration(text: str) -> float:
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?", str(text).strip())
    assert parts and any(parts.groups()), f"not a duration: {text!r}"
    h, m, s = (int(g or 0) for g in parts.groups())
    return h * 3600 + m * 60 + s


def _units() -> dict[str, dict[str, dict[str, list[str]]]]:
    units: dict[str, dict[str, dict[str, list[str]]]] = {}
    for path in sorted(SYSTEMD.iterdir()):
        sections: dict[str, dict[str, list[str]]] = {}
        current: dict[str, list[str]] | None = None
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), {})
                continue
            assert current is not None, f"{path.name}: key outside a section"
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
        units[path.name] = sections
    return units


def _worker_flags_ok(argv: list[str]) -> bool:
    return set(argv) >= WORKER_FLAGS and not set(argv) & FORBIDDEN_WORKER_FLAGS


def _deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


# ---------------------------------------------------------------- every file


def test_expected_files_exist() -> None:
    for name in ("Dockerfile", "compose.yaml", "irlive.env.example", "iam-policy.json", "README.md",
                 "systemd/irlive-worker@.service", "systemd/irlive-scan.service", "systemd/irlive-scan.timer"):
        assert (DEPLOY / name).is_file(), name


def test_every_yaml_parses() -> None:
    paths = [p for p in _deploy_files() if p.suffix in (".yaml", ".yml")]
    assert len(paths) >= 7
    for path in paths:
        # CloudFormation's short forms (!Ref, !GetAtt, !Sub) are YAML tags of its own.
        loader = _cfn_loader() if path.parent == CLOUDFORMATION else yaml.SafeLoader
        docs = [d for d in yaml.load_all(path.read_text(), Loader=loader) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_every_irlive_name_is_a_settings_field() -> None:
    for path in _deploy_files():
        for name in set(re.findall(r"\bIRLIVE_[A-Z0-9_]+\b", path.read_text())):
            assert name in SETTINGS_VARS, f"{path.relative_to(ROOT)}: {name} is not a Settings field"


def test_no_literal_secrets_anywhere() -> None:
    aws_key = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    assignment = re.compile(r"\b(IRLIVE_API_KEY|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID)\s*[=:]\s*\"?([^\s\"#]+)")
    reference = re.compile(r"^\$\{?[A-Za-z_]+\}?$")  # a shell or env reference, not a value
    for path in _deploy_files():
        text = path.read_text()
        assert not aws_key.search(text), path
        assert "BEGIN PRIVATE KEY" not in text and "BEGIN RSA" not in text, path
        for name, value in assignment.findall(text):
            assert PLACEHOLDER.match(value) or reference.match(value), (
                f"{path.relative_to(ROOT)}: {name} has a value that is not a placeholder")


# ---------------------------------------------------------------- env file


def test_env_example_documents_every_setting_and_parses() -> None:
    env = _env_file(ENV_EXAMPLE)
    assert {k for k in env if k.startswith("IRLIVE_")} == SETTINGS_VARS
    assert set(env) <= ALLOWED_ENV
    settings = Settings.from_env(env)
    assert settings.output is not None
    assert PLACEHOLDER.match(env["IRLIVE_API_KEY"])


# ---------------------------------------------------------------- Kubernetes


def test_k8s_kinds_and_metadata() -> None:
    docs = _k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Secret", "Deployment", "PodDisruptionBudget", "CronJob", "StatefulSet", "Service"} <= kinds
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d
        assert "namespace" not in d["metadata"], f"{d['kind']}/{d['metadata']['name']} must be namespace-less"


def test_k8s_kustomization_lists_everything_but_the_secret_template() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {"secret.template.yaml"}
    assert "namespace" not in kust


def test_k8s_images_and_env_names() -> None:
    docs = _k8s_docs()
    configmap = _configmap()
    secret = _one(docs, "Secret", "irlive-secrets")
    for d in _workloads(docs):
        for c in _pod_spec(d)["containers"]:
            image = c["image"]
            assert IRLIVE_IMAGE.match(image) or REDIS_IMAGE.match(image), f"{d['metadata']['name']}: {image}"
            for e in c.get("env", ()):
                assert e["name"] in ALLOWED_ENV, e["name"]
                assert "value" not in e or e["name"] not in SECRET_VARS, f"literal {e['name']}"
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"]
            for src in c.get("envFrom", ()):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] == "irlive-config"
                if "secretRef" in src:
                    assert src["secretRef"]["name"] == secret["metadata"]["name"]
    irlive_images = {c["image"] for d in _workloads(docs) for c in _pod_spec(d)["containers"]
                     if c["image"].startswith("irlive")}
    assert len(irlive_images) == 1, irlive_images
    assert set(configmap) <= SETTINGS_VARS and not set(configmap) & SECRET_VARS
    Settings.from_env(configmap)  # every value parses and is in range


def test_k8s_secret_is_a_template() -> None:
    secret = _one(_k8s_docs(), "Secret", "irlive-secrets")
    assert "data" not in secret, "use stringData placeholders, not base64 data"
    values = secret["stringData"]
    assert set(values) <= SECRET_VARS and "IRLIVE_API_KEY" in values
    for key, value in values.items():
        assert PLACEHOLDER.match(value), f"Secret {key} is not a placeholder"


def test_k8s_worker_deployment() -> None:
    docs = _k8s_docs()
    dep = _one(docs, "Deployment", "irlive-worker")
    spec = _pod_spec(dep)
    _check_timing(_configmap(), spec["terminationGracePeriodSeconds"], "worker Deployment")
    assert spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    assert c["command"][:6] == WORKER_ARGS and _worker_flags_ok(c["command"])
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    probes = json.dumps({k: v for k, v in c.items() if k.endswith("Probe")})
    assert "inspect" not in probes, "no `celery inspect ping` probe: it goes through Redis and is heavy"
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


def test_k8s_scan_cronjob() -> None:
    cron = _one(_k8s_docs(), "CronJob", "irlive-scan")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    spec = _pod_spec(cron)
    assert spec["restartPolicy"] == "Never" and spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    command = c["command"] + c.get("args", [])
    assert command[:2] == ["irlive", "scan"] and command[2].startswith("s3://") and "--json" in command
    # The producer never calls the paid API: it must not receive the API key.
    assert not any("secretRef" in src for src in c.get("envFrom", ()))
    assert "IRLIVE_API_KEY" not in {e["name"] for e in c.get("env", ())}


def test_k8s_redis_statefulset() -> None:
    docs = _k8s_docs()
    sts = _one(docs, "StatefulSet", "irlive-redis")
    conf = _one(docs, "ConfigMap", "irlive-redis-config")["data"]["redis.conf"]
    directives = {line.split()[0]: line.split(None, 1)[1] for line in conf.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")}
    assert directives["maxmemory-policy"] == "noeviction"
    assert directives["appendonly"] == "yes"
    assert sts["spec"]["replicas"] == 1
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"]
    (c,) = _pod_spec(sts)["containers"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == directives["dir"]
    service = _one(docs, "Service", sts["spec"]["serviceName"])
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    host = re.match(r"redis://([^:/]+)", _configmap()["IRLIVE_REDIS_URL"])
    assert host and host.group(1) == service["metadata"]["name"]


def test_k8s_schemas_offline() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (dev extra)")
    docs = _k8s_docs()
    # 1.29: the oldest release this targets (CronJob timeZone is GA since 1.27); and the newest bundled.
    for version in ("1.29", kv.latest_version()):
        for doc in docs:
            if doc["apiVersion"].startswith("keda.sh/"):
                continue  # KEDA's CRDs: no bundled schema; test_keda_objects_validate_against_the_crd_schemas
            kv.validate(doc, version, strict=True)


def test_k8s_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = _run([kubectl, "kustomize", str(K8S)])
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    expected = [d for d in _k8s_docs() if d["kind"] != "Secret"]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in expected)


# ---------------------------------------------------------------- compose


def test_compose_structure() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "worker", "producer"} <= set(services)
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_cmd and "--appendonly yes" in redis_cmd
    volume = services["redis"]["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in compose["volumes"]
    assert REDIS_IMAGE.match(services["redis"]["image"])
    worker, producer = services["worker"], services["producer"]
    assert "replicas" in worker["deploy"]
    assert worker["stop_signal"] == "SIGTERM"
    _check_timing(_env_file(ENV_EXAMPLE), _duration(worker["stop_grace_period"]), "compose worker")
    assert producer["profiles"] == ["producer"]
    assert producer["entrypoint"] == ["irlive"] and producer["command"][0] == "scan"
    assert "--json" in producer["command"]
    for svc in (worker, producer):
        assert svc["env_file"] == ["irlive.env"]
        assert set(svc["environment"]) <= SETTINGS_VARS and not set(svc["environment"]) & SECRET_VARS
        default_image = re.fullmatch(r"\$\{[A-Z_]+:-([^}]+)\}|([^$]+)", svc["image"])
        assert default_image and IRLIVE_IMAGE.match(default_image.group(1) or default_image.group(2))
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve().is_file()
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"


def _compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).is_file():
            out = _run([str(candidate), "version", "--short"])
            if out.returncode == 0 and not out.stdout.strip().lstrip("v").startswith("1."):
                return [str(candidate)]
    return None


def test_compose_config_without_engine(tmp_path: Path) -> None:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor a v2+ `docker-compose` binary is installed")
    work = tmp_path / "deploy"
    work.mkdir()
    shutil.copy(DEPLOY / "compose.yaml", work / "compose.yaml")
    shutil.copy(ENV_EXAMPLE, work / "irlive.env")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    base = [*cmd, "-f", str(work / "compose.yaml"), "--project-directory", str(work)]
    quiet = _run([*base, "config", "-q"], env=env)
    assert quiet.returncode == 0, quiet.stderr
    out = _run([*base, "--profile", "producer", "config", "--format", "json"], env=env)
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    assert services["worker"]["deploy"]["replicas"] == 2
    for name in ("worker", "producer", "flower"):
        environment = services[name]["environment"]
        assert set(environment) <= ALLOWED_ENV
        assert environment["IRLIVE_REDIS_URL"] == "redis://redis:6379/0"
        Settings.from_env({k: v or "" for k, v in environment.items()})
    # The env file's API key, emptied (unset) for Flower after compose merged the two.
    assert not services["flower"]["environment"]["IRLIVE_API_KEY"]


# ---------------------------------------------------------------- IAM


def _list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def test_iam_policy_is_least_privilege() -> None:
    policy = json.loads((DEPLOY / "iam-policy.json").read_text())
    assert policy["Version"] == "2012-10-17"
    grants: set[tuple[str, str]] = set()
    list_conditions = []
    sqs = [st for st in policy["Statement"] if any(a.startswith("sqs:") for a in _list(st["Action"]))]
    # The listener's queue: receive, delete, look up; nothing that sends, purges or changes queues.
    (queue,) = sqs
    assert set(_list(queue["Action"])) == {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueUrl",
                                           "sqs:GetQueueAttributes"}
    assert all(r.startswith("arn:aws:sqs:") and "*" not in r for r in _list(queue["Resource"]))
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        assert not {"NotAction", "NotResource", "Principal", "NotPrincipal"} & set(st)
        if st in sqs:
            continue
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        for action in actions:
            assert "*" not in action
            for resource in resources:
                assert resource.startswith("arn:aws:s3:::") and resource not in ("*", "arn:aws:s3:::*")
                grants.add((action, resource))
        if "s3:ListBucket" in actions:
            list_conditions.append(st.get("Condition", {}))
    assert {a for a, _ in grants} == {"s3:ListBucket", "s3:GetObject", "s3:GetObjectVersion", "s3:PutObject"}

    (source_bucket,) = {r for a, r in grants if a == "s3:ListBucket"}
    assert "/" not in source_bucket.removeprefix("arn:aws:s3:::")
    (condition,) = list_conditions
    prefixes = condition["StringLike"]["s3:prefix"]
    prefixes = [prefixes] if isinstance(prefixes, str) else prefixes
    source_prefix = prefixes[0].rstrip("*")
    assert source_prefix.endswith("/") and all(p.startswith(source_prefix) for p in prefixes)

    source_objects = f"{source_bucket}/{source_prefix}*"
    (output,) = {r for a, r in grants if a == "s3:PutObject"}
    assert output.endswith("/*") and not output.startswith(source_objects.rstrip("*"))
    assert {r for a, r in grants if a == "s3:GetObject"} == {source_objects, output}
    # GetObjectVersion: in a versioned bucket the seller is given a URL to the exact version validated.
    assert grants == {("s3:ListBucket", source_bucket), ("s3:GetObject", source_objects),
                      ("s3:GetObjectVersion", source_objects), ("s3:GetObject", output), ("s3:PutObject", output)}
    # The output location in the samples matches the policy's output prefix.
    out_bucket, _, out_prefix = _env_file(ENV_EXAMPLE)["IRLIVE_OUTPUT"].removeprefix("s3://").partition("/")
    assert output == f"arn:aws:s3:::{out_bucket}/{out_prefix}/*"


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert froms and all(ln.split()[1] == "python:3.11-slim" for ln in froms)
    final = lines[lines.index(froms[-1]):]
    users = [ln.split()[1] for ln in final if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any("uv sync --locked" in ln for ln in lines), "installs from uv.lock (tests/test_lock.py checks how)"
    secretish = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|AWS_", re.IGNORECASE)
    for ln in lines:
        if ln.upper().startswith(("ENV ", "ARG ")):
            assert not secretish.search(ln), f"secret-looking ENV/ARG: {ln}"
        if ln.upper().startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
                assert ".env" not in src
    (cmd,) = [ln for ln in final if ln.upper().startswith("CMD ")]
    argv = json.loads(cmd[4:])
    assert argv[:6] == WORKER_ARGS and _worker_flags_ok(argv)
    ignore = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "**", "deny by default, then allow only what the install needs"
    assert not [ln for ln in ignore if ln.startswith("!") and re.search(r"\.venv|\.env|tests", ln)]


# ---------------------------------------------------------------- systemd


def test_systemd_units_structure() -> None:
    units = _units()
    worker = units["irlive-worker@.service"]["Service"]
    assert worker["EnvironmentFile"] and worker["KillSignal"] == ["SIGTERM"]
    assert worker["Restart"] == ["always"], "a worker that exits for any reason is restarted"
    _check_timing(_env_file(ENV_EXAMPLE), float(worker["TimeoutStopSec"][-1]), "systemd worker")
    argv = worker["ExecStart"][-1].split()
    assert Path(argv[0]).name == "celery" and argv[1:6] == WORKER_ARGS[1:] and _worker_flags_ok(argv)
    assert any("%i" in a for a in argv), "each instance needs its own Celery node name"
    assert worker["User"] != ["root"]

    scan = units["irlive-scan.service"]["Service"]
    assert scan["Type"] == ["oneshot"] and "Restart" not in scan and scan["EnvironmentFile"]
    scan_argv = scan["ExecStart"][-1].split()
    assert Path(scan_argv[0]).name == "irlive" and scan_argv[1] == "scan" and "--json" in scan_argv
    assert scan.get("UnsetEnvironment") == ["IRLIVE_API_KEY"]

    listen = units["irlive-listen.service"]["Service"]
    listen_argv = listen["ExecStart"][-1].split()
    assert Path(listen_argv[0]).name == "irlive" and listen_argv[1] == "listen" and listen_argv[2].startswith("sqs://")
    assert listen["Restart"] == ["always"] and listen.get("UnsetEnvironment") == ["IRLIVE_API_KEY"]
    assert listen["KillSignal"] == ["SIGTERM"] and listen["User"] != ["root"]

    timer = units["irlive-scan.timer"]
    assert timer["Timer"]["OnCalendar"] and timer["Timer"]["Unit"] == ["irlive-scan.service"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze not installed")
    # verify checks that ExecStart binaries exist: point them at this environment's celery and irlive.
    bindir = Path(sys.executable).parent
    assert (bindir / "celery").exists() and (bindir / "irlive").exists()
    for unit in SYSTEMD.iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/irlive/bin/", f"{bindir}/"))
    names = sorted(p.name for p in SYSTEMD.iterdir())
    out = _run([tool, "verify", *(f"./{n}" for n in names)], cwd=tmp_path)
    # verify exits 0 on unknown keys and bad values, printing them: fail on any line about our units.
    ours = [ln for ln in (out.stdout + out.stderr).splitlines() if "irlive" in ln]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr


def test_k8s_listener_deployment() -> None:
    docs = _k8s_docs()
    dep = _one(docs, "Deployment", "irlive-listener")
    spec = _pod_spec(dep)
    (c,) = spec["containers"]
    assert c["command"][:2] == ["irlive", "listen"] and c["command"][2].startswith("sqs://")
    assert dep["spec"]["replicas"] >= 2, "a second listener keeps events moving while one restarts"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert not any("secretRef" in src for src in c.get("envFrom", ())), "the listener never pays: no API key"


CLOUDFORMATION = DEPLOY / "cloudformation"


def _cfn_loader() -> type[yaml.SafeLoader]:
    class Loader(yaml.SafeLoader):
        pass

    def intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
        # !Ref, !GetAtt, !Sub: kept as {"Fn": value} for the structural checks below.
        value = loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else \
            loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node)
        return {suffix: value}

    Loader.add_multi_constructor("!", intrinsic)
    return Loader


def test_cloudformation_event_queue_structure() -> None:
    template = yaml.load((CLOUDFORMATION / "events.yaml").read_text(), Loader=_cfn_loader())
    resources = template["Resources"]
    kinds = {r["Type"] for r in resources.values()}
    assert kinds == {"AWS::SQS::Queue", "AWS::SQS::QueuePolicy"}
    queue = resources["EventQueue"]["Properties"]
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"GetAtt": "DeadLetterQueue.Arn"}
    assert int(queue["VisibilityTimeout"]) >= 30
    statement = resources["EventQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"} and statement["Action"] == "sqs:SendMessage"
    assert "aws:SourceArn" in statement["Condition"]["ArnLike"], "only the capture bucket may send"
    notification = json.loads((CLOUDFORMATION / "bucket-notification.json").read_text())
    (config,) = notification["QueueConfigurations"]
    assert config["Events"] == ["s3:ObjectCreated:*"]


def test_cloudformation_lint_offline() -> None:
    tool = shutil.which("cfn-lint") or (str(Path(sys.executable).parent / "cfn-lint")
                                        if (Path(sys.executable).parent / "cfn-lint").exists() else None)
    if not tool:
        pytest.skip("cfn-lint not installed")
    out = _run([tool, str(CLOUDFORMATION / "events.yaml")])
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- Flower


def _flower_options(argv: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_k8s_flower() -> None:
    docs = _k8s_docs()
    dep = _one(docs, "Deployment", "irlive-flower")
    spec = _pod_spec(dep)
    assert dep["spec"]["replicas"] == 1, "Flower's task history is in memory: two replicas show two histories"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in spec, "Flower needs no AWS role"
    (c,) = spec["containers"]
    assert c["command"][:4] == FLOWER_ARGS
    options = _flower_options(c["command"])
    port = int(options["port"])
    assert {p["containerPort"] for p in c["ports"]} == {port}
    # The workers' settings (one visibility timeout on the broker), never the API key: Flower never pays.
    assert [src["configMapRef"]["name"] for src in c["envFrom"]] == ["irlive-config"]
    assert "IRLIVE_API_KEY" not in {e["name"] for e in c.get("env", ())}
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthcheck"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["resources"]["limits"]["memory"]
    service = _one(docs, "Service", "irlive-flower")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "Flower can stop workers: never exposed as is"
    assert service["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] in (port, "http") and svc_port["port"] == port
    # The worker pods' PodDisruptionBudget must not count Flower's pod as a worker.
    pdb = _one(docs, "PodDisruptionBudget")
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_compose_flower() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    flower, worker = compose["services"]["flower"], compose["services"]["worker"]
    assert flower["image"] == worker["image"] and flower["env_file"] == worker["env_file"] == ["irlive.env"]
    assert flower["entrypoint"] == ["celery"] and ["celery", *flower["command"]][:4] == FLOWER_ARGS
    port = _flower_options(flower["command"])["port"]
    (published,) = flower["ports"]
    assert published == f"127.0.0.1:{port}:{port}", "Flower can stop workers: published on the host's loopback only"
    env = flower["environment"]
    assert env["IRLIVE_API_KEY"] == "", "an empty value unsets the env file's key: Flower never pays"
    assert env["IRLIVE_REDIS_URL"] == worker["environment"]["IRLIVE_REDIS_URL"]
    assert set(env) <= ALLOWED_ENV
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])
    assert "profiles" not in flower, "up with the workers"


# ---------------------------------------------------------------- metrics: dashboard and alert rules
#
# The metric catalogue of worker/ops/metrics.py. Counters and histograms are per worker process group: summed,
# and read through rate()/increase(). The gauges are read from Redis at scrape time, so every worker reports the
# same fleet-wide value: max(), never sum() or avg().

GRAFANA = DEPLOY / "grafana"
PROMETHEUS = DEPLOY / "prometheus"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
DEFAULT_METRICS_PORT = 9808
COUNTERS: dict[str, dict[str, frozenset[str] | None]] = {
    "irlive_images_total": {"verdict": frozenset({"live", "spoof", "no_face", "rejected", "error", "not_judged",
                                                  "duplicate"})},
    "irlive_calls_total": {"outcome": frozenset({"answered", "failed", "unknown", "refused", "throttled"})},
    "irlive_money_cents_total": {"kind": frozenset({"bought", "spent", "returned", "void", "unknown"})},
    "irlive_throttles_total": {},
    "irlive_deliveries_total": {"queue": None},
    "irlive_dead_letters_total": {},
    "irlive_download_retries_total": {},
    "irlive_answers_lost_total": {},
}
HISTOGRAMS = ("irlive_call_duration_seconds", "irlive_chunk_duration_seconds", "irlive_limiter_wait_seconds")
GAUGES: dict[str, dict[str, frozenset[str] | None]] = {
    "irlive_calls_in_flight": {},
    "irlive_limiter_rate_per_s": {},
    "irlive_queue_depth": {"queue": None},
    "irlive_token_pool": {},
    "irlive_redis_replicas": {},
    "irlive_redis_replicas_wanted": {},
    "irlive_budget_left_cents": {"scope": frozenset({"run", "day"}), "run_id": None},
    "irlive_runs": {"state": None},
    "irlive_run_images": {"run_id": None, "state": None},
    "irlive_run_pending_chunks": {"run_id": None},
}
# name -> {label: allowed values (None: any)}; a histogram's series carry `le` on _bucket only.
CATALOGUE: dict[str, dict[str, frozenset[str] | None]] = {
    **COUNTERS, **GAUGES,
    **{f"{h}_bucket": {"le": None} for h in HISTOGRAMS},
    **{f"{h}{suffix}": {} for h in HISTOGRAMS for suffix in ("_sum", "_count")},
}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "component"})
PROMQL_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                             "unless", "offset", "inf", "nan"})
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
SELECTOR = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*,?')
# Whole names only (no backtracking into `rat` of `rate(`), and not a function call.
IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()")


def _promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once strings, label matchers, ranges,
    grouping clauses, function calls and keywords are taken out."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    return {name for name in IDENT.findall(text) if name.lower() not in PROMQL_KEYWORDS}


def _check_promql(expr: str, where: str) -> set[str]:
    """Every metric is in the catalogue, used with its own labels and values, counters through a rate and
    fleet gauges never summed; returns the metrics used."""
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{where}: unbalanced: {expr}"
    used = _promql_metrics(expr)
    assert used, f"{where}: selects no metric: {expr}"
    unknown = used - CATALOGUE.keys()
    assert not unknown, f"{where}: not in the metric catalogue: {sorted(unknown)} in {expr}"
    for name, matchers in SELECTOR.findall(expr):
        if name not in CATALOGUE:
            continue  # a function's braces cannot occur in PromQL; unknown names failed above
        assert re.fullmatch(f"(?:{MATCHER.pattern})*\\s*", matchers), f"{where}: unreadable matchers {{{matchers}}}"
        parsed = MATCHER.findall(matchers)
        for label, op, quoted in parsed:
            allowed = CATALOGUE[name]
            assert label in allowed or label in TARGET_LABELS, f"{where}: {name} has no label {label!r}"
            values = allowed.get(label)
            if values is None or "$" in quoted:
                continue
            wanted = json.loads(quoted)
            words = wanted.split("|") if op in ("=~", "!~") else [wanted]
            assert set(words) <= values, f"{where}: {name}{{{label}}} has no value {sorted(set(words) - values)}"
    flat = GROUPING.sub(" ", STRING.sub('""', expr))
    for name in used:
        if name in COUNTERS or name.endswith(("_bucket", "_sum", "_count")):
            for m in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])", flat):
                assert re.search(r"\b(rate|irate|increase)\(\s*$", flat[:m.start()]), \
                    f"{where}: counter {name} read without rate()/increase(): {expr}"
        if name in GAUGES:
            assert not re.search(rf"\b(sum|avg|count)\s*\(\s*{name}\b", flat), \
                f"{where}: {name} is fleet-wide (every worker reports it): aggregate with max(), not sum(): {expr}"
    return used


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in panels:
        found.append(panel)
        found += _panels(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def _check_dashboard(dashboard: dict[str, Any]) -> set[str]:
    """Structure of the importable dashboard and the PromQL of every panel and variable; the metrics used."""
    assert dashboard["schemaVersion"] >= 36
    (ds_input,) = [i for i in dashboard["__inputs"] if i["name"] == "DS_PROMETHEUS"]
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    used: set[str] = set()
    panels = _panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        where = f"panel {panel['title']!r}"
        assert panel["datasource"] == datasource, where
        assert panel["targets"], f"{where}: no query"
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target.get("datasource", datasource) == datasource, where
            used |= _check_promql(target["expr"], where)
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert inner, f"variable {var['name']}: {query}"
            used |= _check_promql(inner.group(1), f"variable {var['name']}")
            assert inner.group(2) in CATALOGUE[inner.group(1).strip()], f"variable {var['name']}: label"
    return used


def _load_dashboard() -> dict[str, Any]:
    return dict(json.loads((GRAFANA / "irlive-dashboard.json").read_text()))


def test_grafana_dashboard_uses_only_catalogue_metrics_and_shows_every_one() -> None:
    used = _check_dashboard(_load_dashboard())
    # Every metric of the catalogue is on the dashboard (histograms through their buckets).
    shown = {n.removesuffix("_bucket") for n in used}
    missing = (set(COUNTERS) | set(HISTOGRAMS) | set(GAUGES)) - shown
    assert not missing, f"not on the dashboard: {sorted(missing)}"


@pytest.mark.parametrize(("old", "new", "complaint"), [
    ("irlive_images_total", "irlive_image_total", "not in the metric catalogue"),
    ("max(irlive_token_pool)", "sum(irlive_token_pool)", "fleet-wide"),
    ("sum by (verdict) (rate(irlive_images_total[$__rate_interval]))", "sum by (verdict) (irlive_images_total)",
     "without rate"),
    ('kind=~\\"bought|spent\\"', 'kind=~\\"bought|spend\\"', "has no value"),
    ('run_id=~\\"$run_id\\"', 'run=~\\"$run_id\\"', "has no label"),
])
def test_grafana_dashboard_check_catches_mistakes(old: str, new: str, complaint: str) -> None:
    # The checker must fail on a wrong dashboard, or the test above proves nothing.
    text = (GRAFANA / "irlive-dashboard.json").read_text()
    assert old in text, old
    with pytest.raises(AssertionError, match=complaint):
        _check_dashboard(json.loads(text.replace(old, new, 1)))


def test_promql_extractor() -> None:
    expr = ('histogram_quantile(0.95, sum by (le) (rate(irlive_call_duration_seconds_bucket{job="a"}[5m]))) '
            '/ on() group_left max(irlive_token_pool offset 1h) and absent(irlive_runs{state="x y"})')
    assert _promql_metrics(expr) == {"irlive_call_duration_seconds_bucket", "irlive_token_pool", "irlive_runs"}
    assert _promql_metrics('sum(rate(irlive_calls_total{outcome!="answered"}[$__rate_interval])) * 60') == {
        "irlive_calls_total"}


REQUIRED_ALERTS = {"IrliveSellerFailing", "IrliveRunBudgetNearlySpent", "IrliveDailyBudgetNearlySpent",
                   "IrliveQueueNotDraining", "IrliveTokenPoolEmpty", "IrliveRunStalled", "IrliveAnswersLost"}
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}


def _operations_sections() -> set[str]:
    return {line[3:].strip() for line in OPERATIONS.read_text().splitlines() if line.startswith("## ")}


def _check_rules(doc: dict[str, Any]) -> set[str]:
    """promtool's structure plus ours: severity, an operator's summary and description naming existing
    docs/OPERATIONS.md sections, catalogue metrics only. Returns the alert names."""
    assert set(doc) == {"groups"} and doc["groups"]
    sections = _operations_sections()
    names: list[str] = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert "record" not in rule, "alerting rules only"
            assert set(rule) <= RULE_KEYS, f"unknown keys {set(rule) - RULE_KEYS}"
            name = rule["alert"]
            assert re.fullmatch(r"Irlive[A-Z][A-Za-z]+", name), name
            names.append(name)
            assert isinstance(rule["expr"], str)
            _check_promql(rule["expr"], name)
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{name}: for {rule['for']!r}"
            assert rule["labels"]["severity"] in ("critical", "warning"), f"{name}: severity"
            notes = rule["annotations"]
            assert notes.get("summary") and len(notes.get("description", "")) > 80, f"{name}: summary/description"
            refs = re.findall(r"docs/OPERATIONS\.md((?:,? (?:and )?'[^']+')+)", notes["description"])
            cited = {s for ref in refs for s in re.findall(r"'([^']+)'", ref)}
            assert cited, f"{name}: the description must point to a docs/OPERATIONS.md section"
            assert cited <= sections, f"{name}: no such section in docs/OPERATIONS.md: {sorted(cited - sections)}"
    assert len(names) == len(set(names)), "alert names must be unique"
    return set(names)


def _load_rules() -> dict[str, Any]:
    return dict(yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text()))


def test_prometheus_alert_rules_structure() -> None:
    names = _check_rules(_load_rules())
    assert names >= REQUIRED_ALERTS, f"missing alerts: {sorted(REQUIRED_ALERTS - names)}"


@pytest.mark.parametrize(("old", "new", "complaint"), [
    ("irlive_answers_lost_total", "irlive_answer_lost_total", "not in the metric catalogue"),
    ("max(irlive_token_pool)", "sum(irlive_token_pool)", "fleet-wide"),
    ("severity: critical", "severity: page", "severity"),
    ("'Money'", "'Monies'", "no such section"),
    ('outcome!="answered"', 'outcome!="answerd"', "has no value"),
])
def test_prometheus_alert_rules_check_catches_mistakes(old: str, new: str, complaint: str) -> None:
    text = (PROMETHEUS / "alerts.yaml").read_text()
    assert old in text, old
    with pytest.raises(AssertionError, match=complaint):
        _check_rules(yaml.safe_load(text.replace(old, new, 1)))


def _promtool() -> str:
    tool = shutil.which("promtool")
    if not tool:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus; ./dev.sh test does)")
    return tool


def test_promtool_check_rules() -> None:
    out = _run([_promtool(), "check", "rules", str(PROMETHEUS / "alerts.yaml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules_catches_a_bad_expression(tmp_path: Path) -> None:
    bad = tmp_path / "alerts.yaml"
    bad.write_text((PROMETHEUS / "alerts.yaml").read_text().replace("> 0.25", "> > 0.25", 1))
    out = _run([_promtool(), "check", "rules", str(bad)])
    assert out.returncode != 0


def test_promtool_check_scrape_config(tmp_path: Path) -> None:
    tool = _promtool()
    config = yaml.safe_load((PROMETHEUS / "scrape.yaml").read_text())
    assert config["rule_files"] == ["alerts.yaml"]
    (k8s_job,) = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" in j]
    keeps = {r["source_labels"][0]: r["regex"] for r in k8s_job["relabel_configs"] if r.get("action") == "keep"}
    assert keeps == {"__meta_kubernetes_pod_label_app_kubernetes_io_name": "irlive",
                     "__meta_kubernetes_pod_container_port_name": "metrics"}
    shutil.copy(PROMETHEUS / "alerts.yaml", tmp_path / "alerts.yaml")
    (tmp_path / "scrape.yaml").write_text((PROMETHEUS / "scrape.yaml").read_text())
    out = _run([tool, "check", "config", str(tmp_path / "scrape.yaml")])
    if out.returncode != 0 and "kubernetes_sd_configs not found" in out.stdout + out.stderr:
        # Debian's promtool is built without Kubernetes service discovery: check the rest of the file.
        config["scrape_configs"].remove(k8s_job)
        (tmp_path / "scrape.yaml").write_text(yaml.safe_dump(config))
        out = _run([tool, "check", "config", str(tmp_path / "scrape.yaml")])
    assert out.returncode == 0, out.stdout + out.stderr


def _series(name: str, values: str) -> dict[str, str]:
    # Two workers report the same fleet-wide gauges: the rules must not double them.
    return {"series": name, "values": values}


def test_promtool_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests on made-up series: each alert fires on its condition and stays quiet
    otherwise. Annotations are left out of the copy tested (promtool compares them verbatim; `check rules`
    validates their templates)."""
    tool = _promtool()
    rules = _load_rules()
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))

    def alert(name: str, at: str, labels: list[dict[str, str]]) -> dict[str, Any]:
        return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": x} for x in labels]}

    crit, warn = {"severity": "critical"}, {"severity": "warning"}
    tests = [
        {"interval": "1m", "input_series": [
            _series('irlive_answers_lost_total{instance="w1"}', "0 0 0 1 1 1"),
            _series('irlive_answers_lost_total{instance="w2"}', "0x5")],
         "alert_rule_test": [alert("IrliveAnswersLost", "2m", []), alert("IrliveAnswersLost", "4m", [crit])]},
        {"interval": "1m", "input_series": [
            _series('irlive_calls_total{instance="w1",outcome="answered"}', "0+6x30"),
            _series('irlive_calls_total{instance="w1",outcome="failed"}', "0+60x30"),
            _series('irlive_calls_total{instance="w2",outcome="answered"}', "0+60x30")],
         "alert_rule_test": [alert("IrliveSellerFailing", "8m", []), alert("IrliveSellerFailing", "20m", [crit])]},
        {"interval": "1m", "input_series": [
            _series('irlive_calls_total{instance="w1",outcome="answered"}', "0+60x30"),
            _series('irlive_calls_total{instance="w1",outcome="failed"}', "0+3x30")],
         "alert_rule_test": [alert("IrliveSellerFailing", "20m", [])]},
        {"interval": "1m", "input_series": [
            _series('irlive_token_pool{instance="w1"}', "0x20"),
            _series('irlive_token_pool{instance="w2"}', "0x20"),
            _series('irlive_runs{instance="w1",state="running"}', "1x20"),
            _series('irlive_runs{instance="w2",state="running"}', "1x20")],
         "alert_rule_test": [alert("IrliveTokenPoolEmpty", "5m", []), alert("IrliveTokenPoolEmpty", "15m", [warn])]},
        {"interval": "1m", "input_series": [
            _series('irlive_token_pool{instance="w1"}', "0x20"),
            _series('irlive_runs{instance="w1",state="running"}', "0x20")],
         "alert_rule_test": [alert("IrliveTokenPoolEmpty", "15m", [])]},
        {"interval": "1m", "input_series": [
            _series('irlive_run_images{instance="w1",run_id="r1",state="running"}', "0+10x10 100x30"),
            _series('irlive_run_images{instance="w2",run_id="r1",state="running"}', "0+10x10 100x30"),
            _series('irlive_run_pending_chunks{instance="w1",run_id="r1"}', "3x40"),
            _series('irlive_run_images{instance="w1",run_id="r2",state="running"}', "0+10x40"),
            _series('irlive_run_pending_chunks{instance="w1",run_id="r2"}', "3x40")],
         "alert_rule_test": [alert("IrliveRunStalled", "20m", []),
                             alert("IrliveRunStalled", "30m", [{**warn, "run_id": "r1"}])]},
        {"interval": "1m", "input_series": [
            _series('irlive_queue_depth{instance="w1",queue="irlive.nightly"}', "5x50"),
            _series('irlive_queue_depth{instance="w2",queue="irlive.nightly"}', "5x50"),
            _series('irlive_queue_depth{instance="w1",queue="irlive.events"}', "50-1x50"),
            _series('irlive_queue_depth{instance="w1",queue="irlive.backfill"}', "0x50")],
         "alert_rule_test": [alert("IrliveQueueNotDraining", "20m", []),
                             alert("IrliveQueueNotDraining", "40m", [{**warn, "queue": "irlive.nightly"}]),
                             alert("IrliveNoWorkerMetrics", "40m", [])]},
        {"interval": "1m", "input_series": [
            _series('irlive_budget_left_cents{instance="w1",scope="run",run_id="r1"}', "900-100x20"),
            _series('irlive_budget_left_cents{instance="w1",scope="day",run_id=""}', "5000x20")],
         "alert_rule_test": [alert("IrliveRunBudgetNearlySpent", "3m", []),
                             alert("IrliveRunBudgetNearlySpent", "12m", [{**warn, "run_id": "r1"}]),
                             alert("IrliveDailyBudgetNearlySpent", "12m", [])]},
        {"interval": "1m", "input_series": [_series('irlive_calls_total{instance="w1",outcome="answered"}', "0x20")],
         "alert_rule_test": [alert("IrliveNoWorkerMetrics", "15m", [crit])]},
        {"interval": "1m", "input_series": [
            _series('irlive_redis_replicas{instance="w1"}', "1 1 0 0 0 0 1 1"),
            _series('irlive_redis_replicas{instance="w2"}', "1 1 0 0 0 0 1 1"),
            _series('irlive_redis_replicas_wanted{instance="w1"}', "1x8"),
            _series('irlive_redis_replicas_wanted{instance="w2"}', "1x8")],
         "alert_rule_test": [alert("IrliveRedisReplicasMissing", "2m", []),
                             alert("IrliveRedisReplicasMissing", "4m", [crit]),
                             alert("IrliveRedisReplicasMissing", "7m", [])]},
    ]
    spec = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = _run([tool, "test", "rules", "test.yaml"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_metrics_port_and_pod_monitor() -> None:
    docs = _k8s_docs()
    (c,) = _pod_spec(_one(docs, "Deployment", "irlive-worker"))["containers"]
    (port,) = [p for p in c.get("ports", ()) if p["name"] == "metrics"]
    configured = _configmap().get("IRLIVE_METRICS_PORT")
    assert port["containerPort"] == int(configured or Settings().metrics_port or DEFAULT_METRICS_PORT)
    monitor = yaml.safe_load((PROMETHEUS / "podmonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert "namespace" not in monitor["metadata"]
    pod_labels = _one(docs, "Deployment", "irlive-worker")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"


# ---------------------------------------------------------------- KEDA

# KEDA's schemas come from npm's @kubernetes-models/keda (generated from KEDA's API types); `./dev.sh test`
# installs it into .cache/node (git-ignored) when node and npm exist. ESM only: imported, not required.
KEDA_NODE_PREFIX = ROOT / ".cache" / "node"
KEDA_MODELS = KEDA_NODE_PREFIX / "node_modules" / "@kubernetes-models" / "keda"
# One document as JSON on stdin; `new Kind(doc).validate()` throws the model's JSON-schema errors.
KEDA_VALIDATE_JS = """
import { readFileSync } from "node:fs";
const doc = JSON.parse(readFileSync(0, "utf8"));
let Kind;
try {
  ({ [doc.kind]: Kind } = await import(`@kubernetes-models/keda/${doc.apiVersion}/${doc.kind}`));
} catch (e) {
  console.error(`no @kubernetes-models/keda model for ${doc.apiVersion} ${doc.kind}: ${e.message}`);
  process.exit(2);
}
try {
  new Kind(doc).validate();
} catch (e) {
  console.error(e.message);
  process.exit(1);
}
"""
# Trigger metadata keys each scaler reads (KEDA v2.20.2, pkg/scalers/redis_scaler.go and
# aws_sqs_queue_scaler.go, the `keda:"name=..."` tags whose order includes triggerMetadata). The CRD types
# metadata as a string map, so a misspelt key passes the schema and fails only in the cluster.
KEDA_TRIGGER_KEYS = {
    "redis": {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
              "sentinelUsername", "sentinelPassword", "sentinelMaster", "unsafeSsl", "listLength",
              "activationListLength", "listName", "databaseIndex", "enableTLS"},
    "aws-sqs-queue": {"queueURL", "queueLength", "activationQueueLength", "awsRegion", "awsEndpoint",
                      "scaleOnInFlight", "scaleOnDelayed", "identityOwner"},
}


def _keda_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("keda-*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _keda_schema_error(doc: dict[str, Any]) -> str | None:
    """None when @kubernetes-models/keda's model for the document's kind accepts it, else its errors."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not on PATH: the KEDA schema checks run @kubernetes-models/keda's validate()")
    if not (KEDA_MODELS / "package.json").is_file():
        pytest.skip(f"@kubernetes-models/keda not installed in {KEDA_NODE_PREFIX.relative_to(ROOT)} "
                    "(`./dev.sh test` installs it with npm)")
    r = _run([node, "--input-type=module", "-e", KEDA_VALIDATE_JS], input=json.dumps(doc), cwd=KEDA_NODE_PREFIX)
    if r.returncode == 0:
        return None
    return (r.stderr.strip() or r.stdout.strip()) + f" (exit {r.returncode})"


def _check_keda_schemas(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            error = _keda_schema_error(doc)
            assert error is None, f"{doc['kind']}/{doc['metadata']['name']}: {error}"


def _check_keda_trigger_keys(docs: list[dict[str, Any]]) -> None:
    for so in (d for d in docs if d["kind"] == "ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            keys = set(trigger["metadata"])
            known = KEDA_TRIGGER_KEYS[trigger["type"]]
            unknown = {k for k in keys if k not in known and k.removesuffix("FromEnv") not in known}
            assert not unknown, f"{so['metadata']['name']}: {trigger['type']} reads no {sorted(unknown)}"


def test_keda_trigger_metadata_keys_are_read_by_the_scalers() -> None:
    _check_keda_trigger_keys(_keda_docs())


def test_keda_objects_validate_against_the_crd_schemas() -> None:
    docs = _keda_docs()
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} >= {
        ("ScaledObject", "irlive-worker"), ("ScaledObject", "irlive-listener"),
        ("TriggerAuthentication", "irlive-redis"), ("TriggerAuthentication", "irlive-aws")}
    _check_keda_schemas(docs)


# The models' schemas leave additionalProperties open, so an unknown or misspelt field (minReplicas for
# minReplicaCount) passes them, as it passes a CRD schema; they catch these.
@pytest.mark.parametrize(("mistake", "complaint"), [
    ("missing target", "must have required property scaleTargetRef"),
    ("bad identity owner", "/podIdentity/identityOwner must be equal to one of the allowed values"),
    ("number not string", "/triggers/0/metadata/listLength must be string"),
])
def test_keda_schema_check_catches_mistakes(mistake: str, complaint: str) -> None:
    docs = _keda_docs()
    so = next(d for d in docs if d["kind"] == "ScaledObject")
    auth = next(d for d in docs if d["kind"] == "TriggerAuthentication" and "podIdentity" in d["spec"])
    if mistake == "missing target":
        del so["spec"]["scaleTargetRef"]
    elif mistake == "bad identity owner":
        auth["spec"]["podIdentity"]["identityOwner"] = "operator"
    else:
        so["spec"]["triggers"][0]["metadata"]["listLength"] = 1
    with pytest.raises(AssertionError, match=re.escape(complaint)):
        _check_keda_schemas(docs)


def test_keda_trigger_key_check_catches_a_misspelt_key() -> None:
    docs = _keda_docs()
    so = next(d for d in docs if d["kind"] == "ScaledObject")
    so["spec"]["triggers"][0]["metadata"]["listname"] = so["spec"]["triggers"][0]["metadata"].pop("listName")
    with pytest.raises(AssertionError, match="reads no"):
        _check_keda_trigger_keys(docs)


def _celery_lists() -> set[str]:
    """The Redis lists kombu LPUSHes irlive's chunks onto: the queue's name for a message without a priority
    (a priority would go to `<queue>\\x06\\x16<n>`), with no global key prefix."""
    from unittest import mock

    from kombu.transport.redis import PRIORITY_STEPS, Channel

    from worker.app import make_app, send_chunk, send_finalize
    from worker.messages import PRIORITIES, QUEUES, Chunk

    app = make_app(Settings())
    assert app.conf.task_default_priority is None
    assert not set(app.conf.broker_transport_options) & {"global_keyprefix", "priority_steps", "sep"}
    sent = []
    with mock.patch.object(app, "send_task", side_effect=lambda *a, **kw: sent.append(kw)):
        for priority in PRIORITIES:
            send_chunk(app, Chunk("r", 0, "bucket", [("k", "e")], priority))
        send_finalize(app, "r")
    assert sent and not any("priority" in kw for kw in sent), "a message priority moves it to a sub-list"

    class Lists:  # kombu's own naming, without a connection
        priority_steps = PRIORITY_STEPS
        sep = Channel.sep
        priority = Channel.priority
        _q_for_pri = Channel._q_for_pri

    lists = {Lists()._q_for_pri(q, 0) for q in QUEUES.values()}
    assert {kw["queue"] for kw in sent} <= set(QUEUES.values())
    return lists


def test_keda_worker_scaler_reads_the_celery_lists() -> None:
    from worker.messages import QUEUES

    docs = _k8s_docs()
    so = _one(_keda_docs(), "ScaledObject", "irlive-worker")
    target = _one(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
    assert target["metadata"]["name"] == "irlive-worker"
    assert so["spec"]["minReplicaCount"] >= 1, "the watchdog and event chunks need a worker at all times"
    assert so["spec"]["maxReplicaCount"] > so["spec"]["minReplicaCount"]
    triggers = so["spec"]["triggers"]
    assert all(t["type"] == "redis" for t in triggers)
    by_list = {t["metadata"]["listName"]: t for t in triggers}
    assert len(by_list) == len(triggers) and set(by_list) == _celery_lists() == set(QUEUES.values())
    # The events queue weighs most: the lowest target length, so a backlog there adds workers soonest.
    lengths = {name: int(t["metadata"]["listLength"]) for name, t in by_list.items()}
    events = lengths.pop(QUEUES["events"])
    assert all(events < n for n in lengths.values()), (events, lengths)
    # Same Redis and database as the workers' broker URL.
    url = re.fullmatch(r"redis://(?:[^@]*@)?([^:/]+):(\d+)/(\d+)", _configmap()["IRLIVE_REDIS_URL"])
    assert url
    service = _one(docs, "Service", url.group(1))
    (svc_port,) = service["spec"]["ports"]
    auths = {d["metadata"]["name"]: d for d in _keda_docs() if d["kind"] == "TriggerAuthentication"}
    for t in triggers:
        host, _, port = t["metadata"]["address"].rpartition(":")
        assert host.split(".")[0] == service["metadata"]["name"] and host.endswith(".svc.cluster.local"), host
        assert int(port) == svc_port["port"] and t["metadata"]["databaseIndex"] == url.group(3)
        auth = auths[t["authenticationRef"]["name"]]["spec"]
        assert [(r["parameter"], r["name"]) for r in auth["secretTargetRef"]] == [("password", "irlive-secrets")]
    # KEDA's operator may reach Redis: a NetworkPolicy on the Redis pods admits it.
    sts = _one(docs, "StatefulSet", "irlive-redis")
    policy = _one(docs, "NetworkPolicy", "irlive-redis-keda")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_keda_listener_scaler_reads_the_event_queue() -> None:
    docs = _k8s_docs()
    so = _one(_keda_docs(), "ScaledObject", "irlive-listener")
    listener = _one(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
    (c,) = _pod_spec(listener)["containers"]
    queue_name = c["command"][2].removeprefix("sqs://")
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "aws-sqs-queue"
    url = re.fullmatch(r"https://sqs\.([a-z0-9-]+)\.amazonaws\.com/\d{12}/([\w-]+)", trigger["metadata"]["queueURL"])
    assert url and url.group(2) == queue_name and url.group(1) == trigger["metadata"]["awsRegion"]
    assert so["spec"]["minReplicaCount"] >= 2, "a second listener keeps events moving while one restarts"
    auth = _one(_keda_docs(), "TriggerAuthentication", trigger["authenticationRef"]["name"])
    # The listener's own role (the irlive ServiceAccount), which iam-policy.json lets read the queue's attributes.
    assert auth["spec"]["podIdentity"] == {"provider": "aws", "identityOwner": "workload"}
    assert _pod_spec(listener)["serviceAccountName"] == "irlive"
    policy = json.loads((DEPLOY / "iam-policy.json").read_text())
    assert any("sqs:GetQueueAttributes" in _list(st["Action"]) for st in policy["Statement"])


def test_k8s_every_pod_that_reads_the_broker_is_admitted_to_redis() -> None:
    """A pod with IRLIVE_REDIS_URL (the irlive-config ConfigMap) that the Redis NetworkPolicy does not admit cannot
    work where policies are enforced: the listener and Flower both were once left out."""
    docs = _k8s_docs()
    policy = _one(docs, "NetworkPolicy", "irlive-redis")
    admitted = [peer["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for peer in rule["from"]
                if "podSelector" in peer]
    users = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "CronJob")
             and any(src.get("configMapRef", {}).get("name") == "irlive-config"
                     for c in _pod_spec(d)["containers"] for src in c.get("envFrom", ()))]
    assert {d["metadata"]["name"] for d in users} >= {"irlive-worker", "irlive-flower", "irlive-listener"}
    for d in users:
        labels = (d["spec"]["jobTemplate"]["spec"]["template"] if d["kind"] == "CronJob"
                  else d["spec"]["template"])["metadata"]["labels"]
        assert any(sel.items() <= labels.items() for sel in admitted), f"{d['metadata']['name']} cannot reach Redis"


def test_k8s_flower_is_reachable_only_by_its_labelled_clients_and_can_ask_a_password() -> None:
    docs = _k8s_docs()
    dep = _one(docs, "Deployment", "irlive-flower")
    policy = _one(docs, "NetworkPolicy", "irlive-flower")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"irlive.dev/flower-access": "true"}}}]
    (c,) = _pod_spec(dep)["containers"]
    auth = {e["name"]: e for e in c.get("env", ())}["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert auth == {"name": "irlive-secrets", "key": "FLOWER_BASIC_AUTH", "optional": True}
