"""Loading a MONAI bundle for in-memory inference.

The bundle's own ``configs/inference.{json,yaml}`` is parsed with
``monai.bundle.ConfigParser`` (``bundle_root`` set to the registered copy,
``device`` to the engine's device), and its ``network_def``, ``preprocessing``,
``inferer`` and ``postprocessing`` are used as they are, with two changes:
``LoadImage(d)`` is dropped from the preprocessing because the image comes
from memory (see :mod:`pacs_ai.models.geometry`), and ``SaveImage(d)`` is
dropped from the postprocessing because the result goes to DICOM SEG/SR.
``Invertd`` in the postprocessing refers to the same (modified) preprocessing
object, so it inverts exactly what was applied.

Weights: ``models/model.pt`` (a state dict, loaded with ``weights_only=True``)
into ``network_def``, or ``models/model.ts`` (TorchScript) when there is no
``model.pt``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from pacs_ai.models import ModelError
from pacs_ai.models.loaded import LoadedModel, module_size_bytes
from pacs_ai.models.store import RegisteredModel, bundle_config_path, bundle_weights_path, read_json_or_yaml

#: Transforms that read or write files; they are removed (the image comes from memory, results go to DICOM).
IO_TRANSFORMS = {"LoadImaged", "LoadImage", "SaveImaged", "SaveImage"}
#: Smallest edge of the synthetic smoke-test input when the metadata gives an expression like "16*n".
MIN_SMOKE_EDGE = 32


def _target_name(item: Any) -> str:
    if isinstance(item, dict) and isinstance(item.get("_target_"), str):
        return item["_target_"].rsplit(".", 1)[-1]
    return ""


def _strip_io(parser: Any, key: str, config_path: Path) -> list[dict[str, Any]]:
    """Remove file transforms from ``key`` (a Compose); return the removed ones."""
    if key not in parser:
        return []
    section = parser[key]
    if not isinstance(section, dict) or not isinstance(section.get("transforms"), list):
        raise ModelError(
            f"{config_path}: key {key!r} must be a Compose written as "
            "{'_target_': 'Compose', 'transforms': [...]} so that file reading/writing can be removed; "
            f"got {str(section)[:120]}"
        )
    kept = [t for t in section["transforms"] if _target_name(t) not in IO_TRANSFORMS]
    removed = [t for t in section["transforms"] if _target_name(t) in IO_TRANSFORMS]
    parser[f"{key}#transforms"] = kept
    return removed


def _keys(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return []


def smoke_shape(shape: Any, spatial_dims: int) -> tuple[int, ...]:
    """A concrete spatial shape from metadata ``spatial_shape`` (numbers or expressions like ``"32*n"``)."""
    if not isinstance(shape, list) or len(shape) != spatial_dims:
        return (64,) * spatial_dims
    result = []
    for value in shape:
        if isinstance(value, int | float) and value > 0:
            result.append(int(value))
            continue
        expression = str(value).replace(" ", "")
        multiple = re.fullmatch(r"(\d+)\*n|n\*(\d+)", expression)
        power = re.fullmatch(r"(\d+)(?:\*\*|\^)n", expression)
        if multiple:
            step = int(multiple.group(1) or multiple.group(2))
            edge = step * max(1, -(-MIN_SMOKE_EDGE // max(step, 1)))
        elif power and int(power.group(1)) > 1:
            base = int(power.group(1))
            edge = base
            while edge < MIN_SMOKE_EDGE:
                edge *= base
        else:
            edge = 64
        result.append(max(edge, 1))
    return tuple(result)


def channel_names(metadata: dict[str, Any]) -> dict[int, str]:
    pred = ((metadata.get("network_data_format") or {}).get("outputs") or {}).get("pred") or {}
    names = pred.get("channel_def") or {}
    return {int(k): str(v) for k, v in names.items() if str(k).isdigit()} if isinstance(names, dict) else {}


def load_bundle(registered: RegisteredModel, device: torch.device) -> LoadedModel:
    """Instantiate a registered bundle on ``device``; :class:`ModelError` names the file and key at fault."""
    from monai.bundle import ConfigParser
    from monai.inferers import SimpleInferer

    root = registered.files_dir
    metadata_path = root / "configs" / "metadata.json"
    config_path = bundle_config_path(root)
    metadata = read_json_or_yaml(metadata_path)
    read_json_or_yaml(config_path)  # a parse error names the file before MONAI's less specific message
    parser = ConfigParser()
    try:
        parser.read_meta(str(metadata_path))
        parser.read_config(str(config_path))
    except Exception as exc:
        raise ModelError(f"{config_path}: cannot be read by monai.bundle.ConfigParser: {exc}") from exc
    parser["bundle_root"] = str(root)
    parser["device"] = device
    loaders = _strip_io(parser, "preprocessing", config_path)
    _strip_io(parser, "postprocessing", config_path)
    image_key, channel_first = "image", False
    if loaders:
        keys = _keys(loaders[0].get("keys"))
        image_key = keys[0] if keys else image_key
        channel_first = bool(loaders[0].get("ensure_channel_first", False))

    def parsed(key: str) -> Any:
        try:
            return parser.get_parsed_content(key)
        except Exception as exc:
            raise ModelError(
                f"{config_path}: key {key!r} cannot be instantiated: {type(exc).__name__}: {exc}"
            ) from exc

    weights = bundle_weights_path(root)
    if weights.name == "model.pt":
        if "network_def" not in parser:
            raise ModelError(f"{config_path}: key 'network_def' is missing; it is needed to load {weights}")
        network = parsed("network_def")
        if not isinstance(network, torch.nn.Module):
            raise ModelError(
                f"{config_path}: 'network_def' builds a {type(network).__name__}, not a torch module"
            )
        _load_state_dict(network, weights)
        network = network.to(device)
    else:
        try:
            network = torch.jit.load(str(weights), map_location=device)
        except Exception as exc:
            raise ModelError(f"{weights}: not a loadable TorchScript file: {exc}") from exc
    network.eval()

    preprocessing = parsed("preprocessing") if "preprocessing" in parser else None
    inferer = parsed("inferer") if "inferer" in parser else SimpleInferer()
    postprocessing = parsed("postprocessing") if "postprocessing" in parser else None
    image_format = (metadata.get("network_data_format") or {}).get("inputs", {}).get("image", {})
    spatial_dims = registered.manifest.spatial_dims
    value_range = image_format.get("value_range")
    smoke_range = (0.0, 1.0)
    if isinstance(value_range, list) and len(value_range) == 2:
        smoke_range = (float(value_range[0]), float(value_range[1]))
    return LoadedModel(
        registered=registered,
        network=network,
        device=device,
        spatial_dims=spatial_dims,
        task=registered.manifest.task,
        image_key=image_key,
        channel_first_input=channel_first,
        preprocessing=preprocessing,
        inferer=inferer,
        postprocessing=postprocessing,
        channel_names=channel_names(metadata),
        smoke_shape=smoke_shape(image_format.get("spatial_shape"), spatial_dims),
        smoke_range=smoke_range,
        size_bytes=module_size_bytes(network),
    )


def _load_state_dict(network: torch.nn.Module, weights: Path) -> None:
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{weights}: cannot be loaded as a state dict (torch.load, weights_only): {exc}"
        ) from exc
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict", "network"):
            inner = state.get(wrapper)
            if len(state) == 1 and isinstance(inner, dict):
                state = inner
    if not isinstance(state, dict):
        raise ModelError(f"{weights}: holds a {type(state).__name__}, not a state dict")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"{weights}: the weights do not fit configs' network_def ({str(exc).splitlines()[0]}); "
            "the bundle's network_def and model.pt disagree"
        ) from exc
