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
SECRET_VARS = frozenset({"IRLIVE_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})
ALLOWED_ENV = SETTINGS_VARS | SECRET_VARS
PLACEHOLDER = re.compile(r"^(REPLACE_ME|change-me)$")
MARGIN_S = 30.0
IRLIVE_IMAGE = re.compile(r"^irlive:\d+\.\d+\.\d+$")
REDIS_IMAGE = re.compile(r"^redis:\d+(\.\d+)*$")
WORKER_ARGS = ["celery", "-A", "worker", "worker", "--pool", "threads"]
WORKER_FLAGS = {"--without-gossip", "--without-mingle", "--without-heartbeat"}


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
    assert c["command"][:6] == WORKER_ARGS and set(c["command"]) >= WORKER_FLAGS
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
    for name in ("worker", "producer"):
        environment = services[name]["environment"]
        assert set(environment) <= ALLOWED_ENV
        assert environment["IRLIVE_REDIS_URL"] == "redis://redis:6379/0"
        Settings.from_env({k: v or "" for k, v in environment.items()})


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
    assert any("pip install ." in ln for ln in lines)
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
    assert argv[:6] == WORKER_ARGS and set(argv) >= WORKER_FLAGS
    ignore = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "**", "deny by default, then allow only what `pip install .` needs"
    assert not [ln for ln in ignore if ln.startswith("!") and re.search(r"\.venv|\.env|tests", ln)]


# ---------------------------------------------------------------- systemd


def test_systemd_units_structure() -> None:
    units = _units()
    worker = units["irlive-worker@.service"]["Service"]
    assert worker["EnvironmentFile"] and worker["KillSignal"] == ["SIGTERM"]
    assert worker["Restart"] == ["always"], "a worker that exits for any reason is restarted"
    _check_timing(_env_file(ENV_EXAMPLE), float(worker["TimeoutStopSec"][-1]), "systemd worker")
    argv = worker["ExecStart"][-1].split()
    assert Path(argv[0]).name == "celery" and argv[1:6] == WORKER_ARGS[1:] and set(argv) >= WORKER_FLAGS
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
