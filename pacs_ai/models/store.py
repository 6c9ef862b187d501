"""The model registry: one directory per model under ``settings.effective_models_dir``.

Layout::

    <models_dir>/<name>/manifest.json     name, kind, version, task, spatial dims, sha256 of every file
    <models_dir>/<name>/model/...         the bundle directory as given, or
                                          model.ts + descriptor.yaml for a TorchScript model

``add`` copies into a temporary directory next to the target and renames it
into place, so a reader never sees a half-copied model and a crash leaves
only a ``.tmp-*`` directory behind.  The manifest's hashes let ``verify`` (and
the engine, on every cold load) detect files changed after registration.
Reading the registry needs neither torch nor MONAI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from pacs_ai.models import ModelError
from pacs_ai.models.descriptor import pair_torchscript, read_descriptor

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MANIFEST = "manifest.json"
MODEL_DIR = "model"
#: File names of a registered TorchScript model inside ``model/``.
TORCHSCRIPT_FILE = "model.ts"
DESCRIPTOR_FILE = "descriptor.yaml"
#: Inference config names of a bundle, in the order they are looked for.
BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
BUNDLE_WEIGHTS = ("model.pt", "model.ts")

Kind = Literal["bundle", "torchscript"]


class UnknownModelError(ModelError, KeyError):
    """No model is registered under the requested name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown model"


@dataclass(frozen=True)
class Manifest:
    """What the registry knows about one model; written once by ``add``."""

    name: str
    kind: Kind
    version: str
    task: Literal["segmentation", "classification", "detection"]
    spatial_dims: int
    #: Path relative to the model's ``model/`` directory -> sha256 hex digest.
    files: dict[str, str]
    added_at: str
    #: Where the model was copied from (for the operator; never read again).
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: Path) -> Manifest:
        try:
            data = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{path}: unreadable manifest ({exc}); remove and add the model again") from exc


@dataclass(frozen=True)
class RegisteredModel:
    """A model in the registry: where it lives and its manifest."""

    manifest: Manifest
    directory: Path
    #: sha256 of manifest.json: identifies this registration (the warm-model cache keys on it).
    manifest_sha256: str

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def files_dir(self) -> Path:
        return self.directory / MODEL_DIR


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(directory: Path) -> dict[str, str]:
    """sha256 of every regular file below ``directory``, keyed by POSIX relative path."""
    return {
        path.relative_to(directory).as_posix(): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ModelError(
            f"model name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# --------------------------------------------------------------------------------------------
# Reading what a model is, without torch
# --------------------------------------------------------------------------------------------


def read_json_or_yaml(path: Path) -> Any:
    """A bundle config file's content; :class:`ModelError` names the file and the parse error."""
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ModelError(f"{path}: cannot be parsed: {exc}") from exc


def bundle_config_path(bundle: Path) -> Path:
    for name in BUNDLE_CONFIGS:
        if (bundle / "configs" / name).is_file():
            return bundle / "configs" / name
    raise ModelError(
        f"{bundle}: no inference config (looked for configs/{', configs/'.join(BUNDLE_CONFIGS)})"
    )


def bundle_weights_path(bundle: Path) -> Path:
    for name in BUNDLE_WEIGHTS:
        if (bundle / "models" / name).is_file():
            return bundle / "models" / name
    raise ModelError(
        f"{bundle}: no weights (looked for models/model.pt (state dict) and models/model.ts (TorchScript))"
    )


def bundle_task(pred: dict[str, Any], config: Any) -> str:
    """``detection``, ``segmentation`` or ``classification``, from the output format and the config.

    Detection: the config builds a ``detector`` (MONAI's detection bundles) or the
    output is an ``object``/``dict`` of boxes.  Segmentation: the output is an
    ``image`` that is not a vector of class scores (``format`` ``labels`` or
    ``classification``, as in ``breast_density_classification``).  Else classification.
    """
    kind, layout = str(pred.get("type", "image")).lower(), str(pred.get("format", "")).lower()
    if (isinstance(config, dict) and "detector" in config) or kind == "object" or layout == "dict":
        return "detection"
    if kind == "image" and layout not in ("labels", "classification"):
        return "segmentation"
    return "classification"


def output_names(model: RegisteredModel) -> dict[int, str]:
    """Output channel (label value) -> name, from the bundle metadata or the descriptor; no torch."""
    if model.manifest.kind == "torchscript":
        descriptor = read_descriptor(model.files_dir / DESCRIPTOR_FILE)
        return {int(k): v for k, v in descriptor.output.channels.items()}
    metadata = read_json_or_yaml(model.files_dir / "configs" / "metadata.json")
    pred = ((metadata.get("network_data_format") or {}).get("outputs") or {}).get("pred") or {}
    names = pred.get("channel_def") or {}
    if not isinstance(names, dict) or not names:
        if model.manifest.task == "detection":  # boxes of class 0.. num_classes-1, unnamed
            return {i: str(i) for i in range(int(pred.get("num_channels") or 1))}
        return {}
    return {int(k): str(v) for k, v in names.items() if str(k).isdigit()}


def model_title(model: RegisteredModel) -> str:
    """What the model is called by its authors (bundle metadata ``name``), else its registry name."""
    if model.manifest.kind == "bundle":
        metadata = read_json_or_yaml(model.files_dir / "configs" / "metadata.json")
        if isinstance(metadata, dict) and metadata.get("name"):
            return str(metadata["name"])
    return model.name


def bundle_summary(bundle: Path) -> dict[str, Any]:
    """version, task, spatial_dims of a bundle from configs/metadata.json (and the inference config).

    task: ``segmentation`` when ``network_data_format.outputs.pred.type`` is
    ``image``, else ``classification``.  spatial_dims: length of the input's
    ``spatial_shape`` in the metadata, else ``network_def.spatial_dims``.
    """
    metadata_path = bundle / "configs" / "metadata.json"
    metadata = read_json_or_yaml(metadata_path)
    if not isinstance(metadata, dict):
        raise ModelError(f"{metadata_path}: expected a JSON object")
    version = metadata.get("version")
    if not version:
        raise ModelError(f"{metadata_path}: key 'version' is missing; a bundle states its version")
    formats = metadata.get("network_data_format") or {}
    inputs = (formats.get("inputs") or {}) if isinstance(formats, dict) else {}
    outputs = (formats.get("outputs") or {}) if isinstance(formats, dict) else {}
    image = inputs.get("image") if isinstance(inputs, dict) else None
    pred = outputs.get("pred") if isinstance(outputs, dict) else None
    if not isinstance(image, dict) or not isinstance(pred, dict):
        raise ModelError(
            f"{metadata_path}: network_data_format.inputs.image and network_data_format.outputs.pred are "
            "required (type, num_channels, spatial_shape, channel_def) so inputs and outputs can be checked"
        )
    task = bundle_task(pred, read_json_or_yaml(bundle_config_path(bundle)))
    shape = image.get("spatial_shape")
    spatial_dims = len(shape) if isinstance(shape, list) and shape else None
    if spatial_dims is None:
        config = read_json_or_yaml(bundle_config_path(bundle))
        network_def = config.get("network_def") if isinstance(config, dict) else None
        if isinstance(network_def, dict) and isinstance(network_def.get("spatial_dims"), int):
            spatial_dims = network_def["spatial_dims"]
    if spatial_dims not in (2, 3):
        raise ModelError(
            f"{metadata_path}: cannot tell 2D from 3D: give network_data_format.inputs.image.spatial_shape "
            f"(e.g. [96, 96, 96]); got {shape!r}"
        )
    return {"version": str(version), "task": task, "spatial_dims": spatial_dims}


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class ModelStore:
    """The registry directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def models(self) -> list[RegisteredModel]:
        return [self.get(name) for name in self.names()]

    def get(self, name: str) -> RegisteredModel:
        """The registered model ``name``; :class:`UnknownModelError` lists the registered ones."""
        directory = self.root / name
        manifest_path = directory / MANIFEST
        if not NAME_PATTERN.match(name) or not manifest_path.is_file():
            raise UnknownModelError(
                f"no model {name!r} is registered in {self.root}; registered: "
                f"{', '.join(self.names()) or 'none'} (add one with `pacs-ai models add PATH`)"
            )
        raw = manifest_path.read_bytes()
        manifest = Manifest.from_json(raw.decode("utf-8"), manifest_path)
        return RegisteredModel(manifest, directory, hashlib.sha256(raw).hexdigest())

    def add(self, source: Path, name: str | None = None) -> RegisteredModel:
        """Copy a bundle directory or a TorchScript file (+ descriptor) into the registry.

        Raises :class:`ModelError` when ``source`` is not a model, its metadata
        or descriptor is unusable, or ``name`` is taken.
        """
        source = Path(source).resolve()
        if source.is_dir():
            kind: Kind = "bundle"
            if not (source / "configs" / "metadata.json").is_file():
                raise ModelError(
                    f"{source} is not a MONAI bundle (configs/metadata.json is missing); give a bundle "
                    "directory, or a TorchScript file with its YAML descriptor"
                )
            bundle_config_path(source)
            bundle_weights_path(source)
            summary = bundle_summary(source)
            default_name = source.name
        elif source.is_file():
            kind = "torchscript"
            torchscript, descriptor_path = pair_torchscript(source)
            descriptor = read_descriptor(descriptor_path)
            summary = {
                "version": descriptor.version,
                "task": descriptor.task,
                "spatial_dims": descriptor.spatial_dims,
            }
            default_name = descriptor.name
        else:
            raise ModelError(f"{source} does not exist")
        name = check_name(name or default_name)
        if (self.root / name).exists():
            raise ModelError(
                f"a model named {name!r} is already registered; remove it first "
                f"(`pacs-ai models remove {name}`) or add this one with --name"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            files_dir = staging / MODEL_DIR
            if kind == "bundle":
                shutil.copytree(source, files_dir, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                files_dir.mkdir()
                shutil.copyfile(torchscript, files_dir / TORCHSCRIPT_FILE)
                shutil.copyfile(descriptor_path, files_dir / DESCRIPTOR_FILE)
            manifest = Manifest(
                name=name,
                kind=kind,
                version=summary["version"],
                task=summary["task"],
                spatial_dims=int(summary["spatial_dims"]),
                files=hash_tree(files_dir),
                added_at=datetime.now(UTC).isoformat(timespec="seconds"),
                source=str(source),
            )
            (staging / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
            try:
                os.rename(staging, self.root / name)
            except OSError as exc:
                raise ModelError(f"a model named {name!r} was registered concurrently: {exc}") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.get(name)

    def remove(self, name: str) -> RegisteredModel:
        """Unregister ``name``: renamed away first (atomic for readers), then deleted."""
        model = self.get(name)
        trash = Path(tempfile.mkdtemp(prefix=f".tmp-removed-{name}-", dir=self.root))
        os.rename(model.directory, trash / name)
        shutil.rmtree(trash, ignore_errors=True)
        return model


def file_problems(model: RegisteredModel) -> list[str]:
    """Differences between the files on disk and the manifest's hashes (empty when they match)."""
    problems = []
    actual = hash_tree(model.files_dir) if model.files_dir.is_dir() else {}
    for path, digest in sorted(model.manifest.files.items()):
        if path not in actual:
            problems.append(f"{model.files_dir / path}: missing (listed in the manifest)")
        elif actual[path] != digest:
            problems.append(
                f"{model.files_dir / path}: sha256 {actual[path][:12]}... differs from the "
                f"manifest's {digest[:12]}...; the file changed after registration"
            )
    for path in sorted(set(actual) - set(model.manifest.files)):
        problems.append(f"{model.files_dir / path}: not in the manifest (added after registration)")
    return problems
