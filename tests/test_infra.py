"""Every file under infra/ parses, and the cluster files agree on what the recaption job needs."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import tomllib
import yaml
from packaging.requirements import Requirement

from runner.pool import ClusterView, size_workers

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
INFRA_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
DOCKER_INSTRUCTIONS = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "ADD", "RUN", "ENTRYPOINT", "CMD",
                       "LABEL", "USER", "EXPOSE", "VOLUME", "SHELL", "STOPSIGNAL", "HEALTHCHECK"}


def load_yaml(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def bash_syntax_ok(script: str) -> None:
    result = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


def check_dockerfile(path: Path) -> None:
    instructions = dockerfile_instructions(path)
    assert instructions and instructions[0][0] in {"FROM", "ARG"}, f"{path}: must start with FROM"
    for keyword, arguments in instructions:
        assert keyword in DOCKER_INSTRUCTIONS, f"{path}: unknown instruction {keyword}"
        if keyword == "RUN":
            bash_syntax_ok(arguments)
        if keyword in {"ENTRYPOINT", "CMD"}:
            assert isinstance(json.loads(arguments), list), f"{path}: {keyword} must be exec form"
        if keyword == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{path}: COPY source {source} is missing"


def check_requirements(path: Path) -> None:
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            Requirement(line)


def check_file(path: Path) -> None:
    """Parse one infra file with the parser for its kind; unknown kinds need a check here."""
    name = path.name
    if name.endswith((".yaml", ".yml")):
        assert isinstance(yaml.safe_load(path.read_text()), dict)
    elif name == "Dockerfile":
        check_dockerfile(path)
    elif name.endswith(".dockerignore"):
        patterns = [line for line in path.read_text().splitlines() if line.strip()]
        assert any(not line.startswith("#") for line in patterns)
    elif name.endswith(".sh"):
        bash_syntax_ok(path.read_text())
    elif name.startswith("requirements") and name.endswith(".txt"):
        check_requirements(path)
    elif name.endswith(".py"):  # scripts for other environments (infra/llava_reference/): syntax only
        compile(path.read_text(), str(path), "exec")
    else:
        pytest.fail(f"no check for infra/{name}: add one to tests/test_infra.py")


@pytest.mark.parametrize("path", INFRA_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_infra_file_parses(path: Path):
    check_file(path)


def recaption_config(command: str):
    """The job configuration a `python pipelines/recaption.py ...` command line makes (its own parser)."""
    from pipelines.recaption import config_from_args, parse_args

    tokens = shlex.split(command)
    assert tokens[:2] == ["python", "pipelines/recaption.py"], command
    return config_from_args(parse_args(tokens[2:]))


def secret_names(env_vars: dict) -> list[str]:
    """Variables that look like credentials (they belong in secrets, not in these files)."""
    return [name for name in env_vars if re.search(r"SECRET|_TOKEN$|PASSWORD|_KEY_ID$", name)]


def rayjob_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayjob_runs_recaption_on_gpu_workers():
    job = load_yaml("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    cfg = recaption_config(job["spec"]["entrypoint"])
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert cfg.job.engine.model == "HF_ORG/llava-llama-3-8b-hqedit-hf"  # the converted Recap captioner
    cluster = job["spec"]["rayClusterSpec"]
    head = rayjob_containers(cluster["headGroupSpec"])
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in head)
    cluster_gpus = cluster_cpus = 0
    for group in cluster["workerGroupSpecs"]:
        (worker,) = rayjob_containers(group)
        gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= 1, f"worker group {group['groupName']} requests no GPU"
        cluster_gpus += gpus * group["replicas"]
        cluster_cpus += int(worker["resources"]["limits"]["cpu"]) * group["replicas"]
    sizing = size_workers(ClusterView(gpus=cluster_gpus, started_here=False), cfg.runner.pool,
                          cfg.job.engine.tensor_parallel_size, pending_shards=10**6)
    assert sizing.workers * sizing.gpus == cluster_gpus, "the job's workers must use exactly the cluster's GPUs"
    assert sizing.workers * sizing.cpus <= cluster_cpus, "the workers' CPUs must fit the pods"
    env_vars = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values())
    assert not secret_names(env_vars)


def test_cluster_yaml_is_a_valid_autoscaler_config_with_gpu_workers():
    config = load_yaml("cluster.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}, "only the Ray token is copied"
    head_type = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        gpus = node_type.get("resources", {}).get("GPU", 0)
        assert (gpus == 0) if name == head_type else (gpus >= 1), name


def test_images_and_versions_agree():
    instructions = dockerfile_instructions(INFRA / "Dockerfile")
    base = next(arguments for keyword, arguments in instructions if keyword == "FROM")
    repository, base_tag = base.split(":")
    assert repository == "vllm/vllm-openai"
    cluster, job = load_yaml("cluster.yaml"), load_yaml("rayjob.yaml")
    images = {cluster["docker"]["image"]}
    images |= {cluster["docker"].get(k) for k in ("head_image", "worker_image")} - {None}
    spec = job["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        images |= {c["image"] for c in rayjob_containers(group)}
    assert len(images) == 1, f"cluster.yaml and rayjob.yaml use different images: {images}"
    assert images.pop().endswith(f":vllm-{base_tag}"), "image tag must name the vLLM base image"

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["gpu"]
    pins = {r.name: r for r in map(Requirement, requirements)}
    assert str(pins["vllm"].specifier) == f"=={base_tag.lstrip('v')}"
    ray_version = str(pins["ray"].specifier).removeprefix("==")
    assert spec["rayVersion"] == ray_version
    assert f"'{ray_version}'" in " ".join(cluster["setup_commands"])


def test_runtime_env_ships_code_only():
    runtime_env = load_yaml("runtime_env.yaml")
    assert runtime_env["working_dir"] == "."
    excludes = {pattern.strip("/") for pattern in runtime_env["excludes"]}
    assert {".venv", ".git", "tests"} <= excludes
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    assert runtime_env["env_vars"]["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert not secret_names(runtime_env["env_vars"])


def test_the_ray_token_is_made_once_given_to_every_node_as_a_secret_and_never_written_inline():
    """Autoscaler: the submitting machine's token file on every node, token mode in every container. KubeRay:
    authOptions from a Kubernetes secret. Nowhere a token value, and no token in the runtime env."""
    cluster, job = load_yaml("cluster.yaml"), load_yaml("rayjob.yaml")
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "openvision-ray-token"}
    for path in INFRA_FILES:
        text = path.read_text(errors="replace")
        assert not re.search(r"RAY_AUTH_TOKEN\s*[:=]\s*\S", text), f"{path.name} sets a token value"
    env = load_yaml("runtime_env.yaml")["env_vars"]
    assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env)
