"""Structure checks of the deployment files in deploy/: Compose, Kubernetes, .env.example, Dockerfile, SCALING.md.

Plain functions with no database and no Django. Each ``check_*`` returns a list of problems for one deploy
folder; the tests run them on deploy/ and, in ``test_checks_catch_*``, on broken copies to show they can fail.
Run alone with: python -m pytest tests/deploy; with a Python that lacks torch and Django (tests/conftest.py
imports torch), add -p no:django --confcutdir=tests/deploy.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from itertools import pairwise
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SETTINGS = REPO / "audit_service" / "settings.py"

APP_SERVICES = ("migrate", "web", "worker-gpu", "worker-default", "beat")
COMPOSE_SERVICES = ("postgres", "redis", "minio", "minio-init", *APP_SERVICES)
NEW_SETTINGS = ("CELERY_RESULT_BACKEND", "AUDIT_SHARD_SIZE")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
DEPENDS_CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
ENV_READ = re.compile(r"""env_(str|int|bool|choice|float|list)\(\s*["']([A-Z][A-Z0-9_]*)["']""")


def load_all(path: Path) -> list:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def settings_env_names() -> dict[str, str]:
    """Name -> reader (str, int, bool, ...) of every environment variable audit_service/settings.py reads."""
    return {name: kind for kind, name in ENV_READ.findall(SETTINGS.read_text())}


def as_argv(command) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def has_flag(argv: list[str], flag: str, value: str) -> bool:
    return any(a == flag and b == value for a, b in pairwise(argv)) or f"{flag}={value}" in argv


# --------------------------------------------------------------------------- Compose


def compose_services(deploy: Path) -> dict:
    docs = load_all(deploy / "compose.yaml")
    assert len(docs) == 1 and isinstance(docs[0], dict), "compose.yaml must be one YAML mapping"
    return docs[0].get("services") or {}


def env_file_paths(service: dict) -> list[str]:
    value = service.get("env_file")
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [item["path"] if isinstance(item, dict) else item for item in items]


def depends_targets(service: dict) -> dict[str, str]:
    value = service.get("depends_on") or {}
    if isinstance(value, list):
        return {name: "service_started" for name in value}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in value.items()}


def check_compose(deploy: Path) -> list[str]:
    problems = []
    doc = load_all(deploy / "compose.yaml")[0]
    if "version" in doc:
        problems.append("compose.yaml has the obsolete top-level `version` key")
    services = compose_services(deploy)
    missing = [name for name in COMPOSE_SERVICES if name not in services]
    if missing:
        return problems + [f"compose.yaml lacks services {missing}"]

    web = services["web"]
    for name in APP_SERVICES:
        svc = services[name]
        if svc.get("image") != web.get("image") or svc.get("build") != web.get("build"):
            problems.append(f"{name}: image/build differ from web's (all app services run one image)")
        if ".env" not in env_file_paths(svc):
            problems.append(f"{name}: does not read env_file .env")

    for name, svc in services.items():
        build = svc.get("build")
        if build is not None:
            context = deploy / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            if not (context / dockerfile).is_file():
                problems.append(f"{name}: build Dockerfile {context / dockerfile} does not exist")
        for path in env_file_paths(svc):
            # deploy/.env is the user's copy of deploy/.env.example, never committed
            if not (deploy / path).is_file() and not (deploy / f"{path}.example").is_file():
                problems.append(f"{name}: env_file {path} exists neither as a file nor as {path}.example")
        for target, condition in depends_targets(svc).items():
            if target not in services:
                problems.append(f"{name}: depends_on unknown service {target}")
            elif condition not in DEPENDS_CONDITIONS:
                problems.append(f"{name}: depends_on {target} with unknown condition {condition}")
            elif condition == "service_healthy" and "healthcheck" not in services[target]:
                problems.append(f"{name}: waits for {target} to be healthy, but {target} has no healthcheck")
        for volume in svc.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            named = ":" in volume if isinstance(volume, str) else volume.get("type", "volume") == "volume"
            local = source.startswith(("/", ".", "~", "$"))
            if named and source and not local and source not in (doc.get("volumes") or {}):
                problems.append(f"{name}: named volume {source} is not declared under top-level volumes")
    problems += dependency_cycles(services)

    commands = {name: as_argv(services[name].get("command")) for name in APP_SERVICES}
    gpu = commands["worker-gpu"]
    if not (has_flag(gpu, "-Q", "gpu") and has_flag(gpu, "-c", "1")):
        problems.append(f"worker-gpu must consume the gpu queue with -c 1, runs {gpu}")
    if not has_flag(commands["worker-default"], "-Q", "default"):
        problems.append(f"worker-default must consume the default queue, runs {commands['worker-default']}")
    if commands["beat"][-1:] != ["beat"] or "worker" in commands["beat"]:
        problems.append(f"beat must run `celery -A workers beat`, runs {commands['beat']}")
    if commands["migrate"][-2:] != ["migrate", "--noinput"]:
        problems.append(f"migrate must run `manage.py migrate --noinput`, runs {commands['migrate']}")
    if commands["web"][:1] != ["gunicorn"]:
        problems.append(f"web must run gunicorn, runs {commands['web']}")
    if str((services["beat"].get("deploy") or {}).get("replicas", 1)) != "1":
        problems.append("beat must have exactly one replica")

    devices = (((services["worker-gpu"].get("deploy") or {}).get("resources") or {})
               .get("reservations") or {}).get("devices") or []
    if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices):
        problems.append("worker-gpu reserves no nvidia GPU (deploy.resources.reservations.devices)")
    if services["migrate"].get("restart") not in ("no", None):
        problems.append("migrate is one-shot: restart must be \"no\"")

    # The reaper (default queue) deletes finished audits' folders from the AUDIT_WORK_DIR it sees: the GPU
    # workers' scratch must be the same named volume as the default worker's.
    work_dir = parse_env_file(deploy / ".env.example")[0].get("AUDIT_WORK_DIR")
    scratch = {name: {v.split(":")[0] for v in services[name].get("volumes") or []
                      if isinstance(v, str) and v.split(":")[1:2] == [work_dir]}
               for name in ("worker-gpu", "worker-default")}
    if not scratch["worker-gpu"] or scratch["worker-gpu"] != scratch["worker-default"]:
        problems.append(f"worker-gpu and worker-default must mount one named volume at AUDIT_WORK_DIR "
                        f"({work_dir}): {scratch}")
    return problems


def dependency_cycles(services: dict) -> list[str]:
    seen, done, problems = set(), set(), []

    def visit(name, path):
        if name in done or name not in services:
            return
        if name in seen:
            problems.append(f"depends_on cycle: {' -> '.join(path + [name])}")
            return
        seen.add(name)
        for target in depends_targets(services[name]):
            visit(target, path + [name])
        done.add(name)

    for name in services:
        visit(name, [])
    return problems


def check_compose_variables(deploy: Path) -> list[str]:
    """Every ${VAR} Compose substitutes without a default must be set in .env.example (copied to .env)."""
    text = (deploy / "compose.yaml").read_text()
    text = re.sub(r"(?m)^\s*#.*$", "", text).replace("$$", "")
    env = parse_env_file(deploy / ".env.example")[0]
    problems = []
    for name, operator in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+]?)", text):
        if operator in ("", ":", ":?", "?") and name not in env:
            problems.append(f"compose.yaml needs ${{{name}}}, which .env.example does not set")
    return problems


# --------------------------------------------------------------------------- Kubernetes


def k8s_documents(deploy: Path) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((deploy / "k8s").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, doc) for doc in load_all(path)]
    return docs


def pod_spec(doc: dict) -> dict:
    return ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}


def containers_of(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def workloads(deploy: Path) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_documents(deploy) if doc.get("kind") in WORKLOAD_KINDS}


def check_k8s(deploy: Path) -> list[str]:
    problems = []
    docs = k8s_documents(deploy)
    keys = set()
    for filename, doc in docs:
        if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind") \
                or not (doc.get("metadata") or {}).get("name"):
            problems.append(f"{filename}: a document lacks apiVersion, kind or metadata.name")
            continue
        key = (doc["kind"], doc["metadata"]["name"])
        if key in keys:
            problems.append(f"{filename}: {key} is defined twice")
        keys.add(key)
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] != "Namespace" and namespace not in (None, "clip-audit"):
            problems.append(f"{filename}: {key} is in namespace {namespace}, not clip-audit")
    if problems:
        return problems
    if ("Namespace", "clip-audit") not in keys:
        problems.append("no Namespace clip-audit")

    by_kind: dict[str, dict[str, dict]] = {}
    for _, doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    config_maps, secrets = by_kind.get("ConfigMap", {}), by_kind.get("Secret", {})
    for kind, objects in (("ConfigMap", config_maps), ("Secret", secrets)):
        for name, obj in objects.items():
            for field in ("data", "stringData"):
                for key, value in (obj.get(field) or {}).items():
                    if not isinstance(value, str):
                        problems.append(f"{kind} {name}: {key} must be a string (quote it), got {value!r}")

    def secret_keys(name):
        obj = secrets[name]
        return set(obj.get("data") or {}) | set(obj.get("stringData") or {})

    loads = workloads(deploy)
    for name, doc in loads.items():
        spec = pod_spec(doc)
        template_labels = ((doc["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
        if doc["kind"] != "Job":
            selector = (doc["spec"].get("selector") or {}).get("matchLabels") or {}
            if not selector or any(template_labels.get(k) != v for k, v in selector.items()):
                problems.append(f"{doc['kind']} {name}: selector {selector} does not match labels {template_labels}")
        if not spec.get("containers"):
            problems.append(f"{doc['kind']} {name}: no containers")
        volumes = {v["name"] for v in spec.get("volumes") or []}
        volumes |= {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates") or []}
        for container in containers_of(doc):
            cname = container.get("name")
            if not cname or not container.get("image"):
                problems.append(f"{name}: a container lacks a name or an image")
            for mount in container.get("volumeMounts") or []:
                if mount.get("name") not in volumes:
                    problems.append(f"{name}/{cname}: mounts undeclared volume {mount.get('name')}")
            for source in container.get("envFrom") or []:
                if "configMapRef" in source and source["configMapRef"].get("name") not in config_maps:
                    problems.append(f"{name}/{cname}: configMapRef {source['configMapRef'].get('name')} undefined")
                if "secretRef" in source and source["secretRef"].get("name") not in secrets:
                    problems.append(f"{name}/{cname}: secretRef {source['secretRef'].get('name')} undefined")
            for var in container.get("env") or []:
                ref = var.get("valueFrom") or {}
                if "value" in var and not isinstance(var["value"], str):
                    problems.append(f"{name}/{cname}: env {var['name']} value must be a string")
                if "configMapKeyRef" in ref:
                    cm, key = ref["configMapKeyRef"].get("name"), ref["configMapKeyRef"].get("key")
                    if cm not in config_maps or key not in (config_maps[cm].get("data") or {}):
                        problems.append(f"{name}/{cname}: configMapKeyRef {cm}/{key} undefined")
                if "secretKeyRef" in ref:
                    sec, key = ref["secretKeyRef"].get("name"), ref["secretKeyRef"].get("key")
                    if sec not in secrets or key not in secret_keys(sec):
                        problems.append(f"{name}/{cname}: secretKeyRef {sec}/{key} undefined")

    for name, service in by_kind.get("Service", {}).items():
        selector = (service.get("spec") or {}).get("selector") or {}
        matching = [doc for doc in loads.values()
                    if selector and all((doc["spec"]["template"]["metadata"].get("labels") or {}).get(k) == v
                                        for k, v in selector.items())]
        if not matching:
            problems.append(f"Service {name}: selector {selector} matches no workload's pod labels")
        port_names = {p.get("name") for doc in matching for c in pod_spec(doc).get("containers") or []
                      for p in c.get("ports") or []}
        for port in service["spec"].get("ports") or []:
            target = port.get("targetPort")
            if isinstance(target, str) and target not in port_names:
                problems.append(f"Service {name}: targetPort {target} is no container port of its pods")
    problems += check_k8s_app(loads, config_maps)
    return problems


def check_k8s_app(loads: dict[str, dict], config_maps: dict[str, dict]) -> list[str]:
    problems = []
    for name in ("postgres", "redis", "migrate", "web", "worker-gpu", "worker-default", "beat"):
        if name not in loads:
            problems.append(f"no workload named {name}")
    if problems:
        return problems
    app_images = {c["image"] for name in ("migrate", "web", "worker-gpu", "worker-default", "beat")
                  for c in containers_of(loads[name])}
    if len(app_images) != 1:
        problems.append(f"app workloads use several images: {sorted(app_images)}")

    gpu = loads["worker-gpu"]
    gpu_container = pod_spec(gpu)["containers"][0]
    argv = as_argv(gpu_container.get("command")) + as_argv(gpu_container.get("args"))
    if not (has_flag(argv, "-Q", "gpu") and has_flag(argv, "-c", "1")):
        problems.append(f"worker-gpu must consume the gpu queue with -c 1, runs {argv}")
    limits = (gpu_container.get("resources") or {}).get("limits") or {}
    if str(limits.get("nvidia.com/gpu")) != "1":
        problems.append("worker-gpu must limit nvidia.com/gpu to 1 per pod")
    if int(pod_spec(gpu).get("terminationGracePeriodSeconds", 30)) < 300:
        problems.append("worker-gpu's terminationGracePeriodSeconds is too short for a shard to finish")
    work_dirs = {cm["data"]["AUDIT_WORK_DIR"] for cm in config_maps.values()
                 if "AUDIT_WORK_DIR" in (cm.get("data") or {})}
    mounts = {m["mountPath"] for m in gpu_container.get("volumeMounts") or []}
    if not work_dirs or not work_dirs <= mounts:
        problems.append(f"worker-gpu mounts no volume at AUDIT_WORK_DIR {sorted(work_dirs)} (mounts: {sorted(mounts)})")

    beat = loads["beat"]
    if beat["spec"].get("replicas") != 1 or (beat["spec"].get("strategy") or {}).get("type") != "Recreate":
        problems.append("beat must have replicas 1 and strategy Recreate")
    web = pod_spec(loads["web"])["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        if not (web.get(probe) or {}).get("httpGet", {}).get("path"):
            problems.append(f"web has no HTTP {probe}")
    return problems


def check_kustomization(deploy: Path) -> list[str]:
    kustomization = load_all(deploy / "k8s" / "kustomization.yaml")[0]
    listed = kustomization.get("resources") or []
    present = sorted(p.name for p in (deploy / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    problems = []
    if sorted(listed) != present or len(set(listed)) != len(listed):
        problems.append(f"kustomization resources {sorted(listed)} != files in deploy/k8s {present}")
    if kustomization.get("kind") != "Kustomization":
        problems.append("kustomization.yaml is not a Kustomization")
    return problems


# --------------------------------------------------------------------------- .env.example


def parse_env_file(path: Path) -> tuple[dict[str, str], list[str]]:
    env, problems, previous = {}, [], ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(\S*)", line)
            if not match:
                problems.append(f"{path.name}:{number}: not KEY=VALUE (no spaces, no quotes): {line!r}")
            else:
                key, value = match.groups()
                if key in env:
                    problems.append(f"{path.name}:{number}: {key} is set twice")
                if not previous.startswith("#"):
                    problems.append(f"{path.name}:{number}: {key} has no comment line above it")
                env[key] = value
        previous = stripped
    return env, problems


def check_env_example(deploy: Path) -> list[str]:
    env, problems = parse_env_file(deploy / ".env.example")
    readers = settings_env_names()
    for name in dict.fromkeys([*readers, *NEW_SETTINGS]):
        if name not in env:
            problems.append(f".env.example lacks {name}")
    for name, kind in {**readers, "AUDIT_SHARD_SIZE": "int"}.items():
        value = env.get(name)
        if value is None:
            continue
        if kind == "int" and not re.fullmatch(r"-?\d+", value):
            problems.append(f".env.example: {name}={value} is not an integer")
        if kind == "bool" and value.lower() not in {"1", "0", "true", "false", "yes", "no", "on", "off", ""}:
            problems.append(f".env.example: {name}={value} is not a boolean")
    hosts = {"DATABASE_URL": "postgres", "CELERY_BROKER_URL": "redis", "CELERY_RESULT_BACKEND": "redis",
             "S3_ENDPOINT_URL": "minio"}
    for name, host in hosts.items():
        if name in env and urlparse(env[name]).hostname != host:
            problems.append(f".env.example: {name} should point at the compose service {host}")
    if env.get("STORAGE_BACKEND") != "s3":
        problems.append(".env.example: several hosts share files through S3: STORAGE_BACKEND=s3")
    return problems


def check_k8s_config_names(deploy: Path) -> list[str]:
    """ConfigMap and Secret keys are known variables (a misspelt name would be silently ignored)."""
    known = set(parse_env_file(deploy / ".env.example")[0])
    problems = []
    for filename, doc in k8s_documents(deploy):
        if doc.get("kind") in ("ConfigMap", "Secret"):
            for key in {**(doc.get("data") or {}), **(doc.get("stringData") or {})}:
                if key not in known:
                    problems.append(f"{filename}: {doc['kind']} key {key} is no variable in .env.example")
    return problems


# --------------------------------------------------------------------------- Dockerfile, SCALING.md


def check_dockerfile(deploy: Path, context: Path = REPO) -> list[str]:
    path = deploy / "Dockerfile"
    if not path.is_file():
        return ["deploy/Dockerfile does not exist"]
    lines = [line.strip() for line in re.sub(r"\\\n", " ", path.read_text()).splitlines()
             if line.strip() and not line.strip().startswith("#")]
    problems = []
    if not any(re.fullmatch(r"FROM\s+python:3\.11-slim(\s+AS\s+\S+)?", line, re.IGNORECASE) for line in lines):
        problems.append("Dockerfile is not FROM python:3.11-slim")
    if not any(re.match(r"RUN\b.*pip install\b.*-r\s+\S*requirements\.txt", line) for line in lines):
        problems.append("Dockerfile does not pip install -r requirements.txt")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("Dockerfile does not switch to a non-root USER")
    if not any(line.startswith("CMD") and "gunicorn" in line for line in lines):
        problems.append("Dockerfile's CMD is not gunicorn")
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            sources = [part for part in line.split()[1:-1] if not part.startswith("--")]
            for source in sources:
                if not (context / source).exists():
                    problems.append(f"Dockerfile copies {source}, which is not in the build context")
    return problems


def check_scaling_doc(deploy: Path) -> list[str]:
    text = (deploy / "SCALING.md").read_text()
    needed = ("-c 1", "AUDIT_SHARD_SIZE", "gpu", "default", "inspect", "CUDA_VISIBLE_DEVICES",
              "deploy/compose.yaml", "kubectl apply -k deploy/k8s")
    return [f"SCALING.md does not mention {word!r}" for word in needed if word not in text]


# --------------------------------------------------------------------------- tests


def test_every_yaml_file_parses():
    paths = [DEPLOY / "compose.yaml", *sorted((DEPLOY / "k8s").glob("*.yaml")), DEPLOY / "github-actions-audit.yml"]
    assert len(paths) >= 11
    for path in paths:
        assert load_all(path), f"{path} holds no YAML document"


def test_compose():
    assert check_compose(DEPLOY) == []


def test_compose_variables_are_in_env_example():
    assert check_compose_variables(DEPLOY) == []


def test_kubernetes_manifests():
    assert check_k8s(DEPLOY) == []


def test_kustomization_lists_every_manifest():
    assert check_kustomization(DEPLOY) == []


def test_env_example_covers_every_setting():
    assert "DATABASE_URL" in settings_env_names()  # the pattern still finds what settings.py reads
    assert check_env_example(DEPLOY) == []


def test_k8s_config_keys_are_known_variables():
    assert check_k8s_config_names(DEPLOY) == []


def test_dockerfile():
    assert check_dockerfile(DEPLOY) == []


def test_scaling_doc():
    assert check_scaling_doc(DEPLOY) == []


def test_github_actions_example():
    workflow = load_all(DEPLOY / "github-actions-audit.yml")[0]
    assert workflow["jobs"], "no jobs"
    for name, job in workflow["jobs"].items():
        assert job.get("runs-on") and job.get("steps"), name
        for step in job["steps"]:
            assert "uses" in step or "run" in step, f"job {name}: a step neither uses nor runs anything"


def test_web_probe_path_resolves():
    """The probes' and healthcheck's path is a URL the app serves (needs Django; skipped without it)."""
    pytest.importorskip("django")
    pytest.importorskip("rest_framework")
    import django
    from django.conf import settings
    from django.urls import resolve

    if not settings.configured:
        import os

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "audit_service.settings")
        django.setup()
    web = pod_spec(workloads(DEPLOY)["web"])["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        resolve(web[probe]["httpGet"]["path"])
    assert web["readinessProbe"]["httpGet"]["path"] in (DEPLOY / "compose.yaml").read_text()


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
def test_kustomize_builds():
    """kubectl's built-in kustomize renders the manifests (offline: no cluster is contacted)."""
    result = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc]
    assert kinds.count("Deployment") == 5 and "StatefulSet" in kinds and "Job" in kinds, kinds


# --------------------------------------------------------------------------- the checks can fail


@pytest.fixture
def broken(tmp_path):
    """A copy of deploy/ to break; returns (deploy copy, edit function)."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)

    def edit(name: str, old: str, new: str) -> None:
        path = copy / name
        text = path.read_text()
        assert old in text, f"{old!r} not in {name}: update this test"
        path.write_text(text.replace(old, new, 1))

    return copy, edit


def test_checks_catch_a_broken_compose_file(broken):
    copy, edit = broken
    edit("compose.yaml", "      minio:\n        condition: service_healthy",
         "      minio-typo:\n        condition: service_healthy")
    edit("compose.yaml", "- driver: nvidia", "- driver: amd")
    edit("compose.yaml", "      - scratch:/scratch\n    depends_on", "    depends_on")
    problems = check_compose(copy)
    assert any("unknown service minio-typo" in p for p in problems), problems
    assert any("reserves no nvidia GPU" in p for p in problems), problems
    assert any("one named volume at AUDIT_WORK_DIR" in p for p in problems), problems
    edit("compose.yaml", "services:\n", "services:\n  bad: [\n")
    with pytest.raises(yaml.YAMLError):
        check_compose(copy)


def test_checks_catch_broken_kubernetes_manifests(broken):
    copy, edit = broken
    edit("k8s/worker-gpu.yaml", "name: clip-audit-config", "name: clip-audit-configs")
    edit("k8s/worker-gpu.yaml", "nvidia.com/gpu: 1", "cpu: 1")
    edit("k8s/config.yaml", 'AUDIT_SHARD_SIZE: "4096"', "AUDIT_SHARD_SIZE: 4096")
    problems = check_k8s(copy)
    assert any("configMapRef clip-audit-configs undefined" in p for p in problems), problems
    assert any("nvidia.com/gpu" in p for p in problems), problems
    assert any("AUDIT_SHARD_SIZE must be a string" in p for p in problems), problems
    (copy / "k8s" / "extra.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra\n")
    assert check_kustomization(copy)


def test_checks_catch_a_broken_env_example(broken):
    copy, edit = broken
    edit(".env.example", "AUDIT_STAGE_TIME_LIMIT=21600\n", "")
    edit(".env.example", "AUDIT_SHARD_SIZE=4096", "AUDIT_SHARD_SIZE=4k")
    edit(".env.example", "API_PAGE_SIZE=50", "API_PAGE_SIZE = 50")
    problems = check_env_example(copy)
    assert any("lacks AUDIT_STAGE_TIME_LIMIT" in p for p in problems), problems
    assert any("AUDIT_SHARD_SIZE=4k is not an integer" in p for p in problems), problems
    assert any("not KEY=VALUE" in p for p in problems), problems


def test_checks_catch_a_broken_dockerfile(broken):
    copy, edit = broken
    edit("Dockerfile", "RUN pip install -r requirements.txt", "RUN pip install torch")
    edit("Dockerfile", "USER 10001:10001", "USER root")
    problems = check_dockerfile(copy)
    assert any("requirements.txt" in p for p in problems) and any("non-root" in p for p in problems), problems
