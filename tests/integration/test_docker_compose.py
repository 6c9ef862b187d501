"""docker/docker-compose.yml: valid against the Compose Specification, and in the production shape.

Docker cannot run on the CI machines (no engine), so the compose file is never
started in CI.  It is validated against the Compose Specification's JSON schema
as vendored by ``check-jsonschema`` (no network), after resolving YAML anchors
and merge keys as Compose does, and checked for what the README promises:
healthchecks, named volumes, no secret in the file, every variable it needs
listed in ``.env.example``, a GPU worker reserving an NVIDIA device with CUDA
torch in its image, and the DICOM port published.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

DOCKER_DIR = Path(__file__).resolve().parents[2] / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"

#: ${NAME}, ${NAME:-default}, ${NAME:?message}; $$ is an escaped dollar for the container's shell.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return document


def compose_schema() -> dict[str, Any]:
    schema_file = files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema: dict[str, Any] = json.loads(schema_file.read_text(encoding="utf-8"))
    return schema


def test_the_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    validator = Draft202012Validator(compose_schema())
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_broken_file(compose: dict[str, Any]) -> None:
    broken = {**compose, "services": {**compose["services"], "receiver": {"image": "x", "portz": [1]}}}
    assert list(Draft202012Validator(compose_schema()).iter_errors(broken))


def test_every_part_of_the_production_shape_is_there(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "seaweedfs", "receiver", "worker-cpu", "worker-gpu"} <= set(services)
    assert "seaweedfs" in services["seaweedfs"]["image"]
    assert services["receiver"]["command"] == ["serve"]
    assert services["worker-cpu"]["command"][:3] == ["worker", "--queues", "cpu"]
    assert services["worker-gpu"]["command"][:3] == ["worker", "--queues", "gpu"]
    # The receiver sends the results; the analyses run on the workers.
    assert services["receiver"]["environment"]["PACS_AI_WORKER_QUEUES"] == '["dispatch"]'


def test_long_running_services_have_healthchecks_and_named_volumes(compose: dict[str, Any]) -> None:
    named = set(compose["volumes"])
    for name, service in compose["services"].items():
        if service.get("restart") == "no":  # a one-shot job
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in named, f"{name} mounts {source}, not a named volume"


def test_the_gpu_worker_reserves_an_nvidia_gpu_and_installs_cuda_torch(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    dockerfile = (DOCKER_DIR / "Dockerfile").read_text(encoding="utf-8")
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert '--index-url "${TORCH_INDEX_URL}"' in dockerfile
    assert gpu["image"] != compose["services"]["worker-cpu"]["image"], "the CUDA image needs its own tag"


def test_the_dicom_port_is_published_and_the_worklist_only_on_loopback(compose: dict[str, Any]) -> None:
    ports = compose["services"]["receiver"]["ports"]
    assert "11112:11112" in ports
    assert "127.0.0.1:8042:8042" in ports
    for name, service in compose["services"].items():
        if name != "receiver":
            assert "ports" not in service, f"{name} publishes a port"


def test_no_secret_in_the_compose_file_and_every_variable_in_the_env_example() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    document = yaml.safe_load(text)
    for name, service in document["services"].items():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", key):
                assert VARIABLE.fullmatch(str(value)), f"{name}: {key} is not taken from the env file"
    for url_key in ("PACS_AI_DATABASE_URL", "PACS_AI_BROKER_URL"):
        url = document["x-pacs-ai-environment"][url_key]
        credentials = url.split("//", 1)[1].split("@", 1)[0]
        assert VARIABLE.search(credentials), f"{url_key} carries a literal password"
    required = set(VARIABLE.findall(text))
    listed = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    }
    assert required <= listed, f"missing from .env.example: {sorted(required - listed)}"
    gitignore = (DOCKER_DIR.parent / ".gitignore").read_text(encoding="utf-8").split()
    assert "docker/.env" in gitignore


def test_every_pacs_ai_variable_in_docker_names_a_setting() -> None:
    """A setting renamed or removed in pacs_ai/config.py must not be silently ignored in containers.

    pydantic-settings ignores an environment variable that names no field, so a stale
    ``PACS_AI_*`` in the compose file, its env example or the Dockerfile would be dropped
    without a word.  Each one's value is also checked by the Settings model where it is literal.
    """
    from pacs_ai.config import Settings

    texts = [
        COMPOSE_FILE.read_text(encoding="utf-8"),
        (DOCKER_DIR / "Dockerfile").read_text(encoding="utf-8"),
    ]
    texts.append(ENV_EXAMPLE.read_text(encoding="utf-8"))
    named = {name for text in texts for name in re.findall(r"\bPACS_AI_([A-Z0-9_]+)", text)}
    # Variables of the compose file itself (interpolated, never seen by pacs-ai as such) name fields too.
    fields = {name.upper() for name in Settings.model_fields}
    assert named - {"CONFIG_FILE"} <= fields, f"no such setting: {sorted(named - fields - {'CONFIG_FILE'})}"
    literal = {
        key.removeprefix("PACS_AI_").lower(): value
        for key, value in yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))[
            "x-pacs-ai-environment"
        ].items()
        if not VARIABLE.search(str(value))
    }
    Settings.model_validate(literal)  # the literal shared values are valid settings
