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

Everything is read through MONAI's ``ConfigParser``, never from raw config
values: references (``"keys": "@image_key"``), expressions (``"$..."``) and
``_disabled_`` switches resolve as in the bundle's own run.  Two run-time
overrides, neither of which edits a file: ``network_def``'s ``pretrained`` is
turned off (it only downloads initial weights that ``model.pt`` replaces, and
nothing is downloaded here), and arguments that the installed MONAI retired
after they stopped having an effect (:data:`RETIRED_NETWORK_ARGUMENTS`) are dropped.

Detection bundles (a ``detector`` key, e.g. ``lung_nodule_ct_detection``):
the ``detector`` (``RetinaNetDetector``) is built around the weighted
``network_def`` and its ``detector_ops`` run; the bundle's ``inferer`` comes
from its ``scripts/`` folder, which is not executed here: :class:`DetectorInferer`
does what the Zoo's ``RetinaNetInferer`` does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pacs_ai.models import ModelError
from pacs_ai.models.boxes import layout_of
from pacs_ai.models.loaded import LoadedModel, module_size_bytes, root_cause
from pacs_ai.models.store import (
    RegisteredModel,
    bundle_config_path,
    bundle_weights_path,
    output_names,
    read_json_or_yaml,
)

#: Transforms that read or write files; they are removed (the image comes from memory, results go to DICOM).
IO_TRANSFORMS = {"LoadImaged", "LoadImage", "SaveImaged", "SaveImage"}
#: Smallest edge of the synthetic smoke-test input when the metadata gives an expression like "16*n".
MIN_SMOKE_EDGE = 32
#: network_def arguments the installed MONAI no longer accepts and that had no effect before their
#: removal (SwinUNETR's img_size: deprecated in MONAI 1.3, ignored, removed in 1.5).
RETIRED_NETWORK_ARGUMENTS = {"SwinUNETR": ("img_size",)}


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
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    return []


def _image_key(parser: Any, loaders: list[dict[str, Any]], parsed: Callable[[str], Any]) -> tuple[str, bool]:
    """(image key, ensure_channel_first) of the bundle's enabled ``LoadImaged``, resolved by ConfigParser.

    The removed loaders' ``keys``, ``ensure_channel_first`` and ``_disabled_``
    are put back under a private key and resolved, so ``"@image_key"``,
    expressions and ``_disabled_`` switches mean what they mean in the bundle's
    own run (the loader itself is not built: its reader may be absent here).
    """
    for index, loader in enumerate(loaders):
        if not isinstance(loader, dict):
            continue
        key = f"_pacs_ai_loader_{index}"
        parser[key] = {
            "keys": loader.get("keys", "image"),
            "ensure_channel_first": loader.get("ensure_channel_first", False),
            "disabled": loader.get("_disabled_", False),
        }
        resolved = parsed(key)
        disabled = resolved["disabled"]
        if (disabled.strip().lower() == "true") if isinstance(disabled, str) else bool(disabled):
            continue
        keys = _keys(resolved["keys"])
        return (keys[0] if keys else "image"), bool(resolved["ensure_channel_first"])
    if "image_key" in parser:
        value = parsed("image_key")
        if isinstance(value, str):
            return value, False
    return "image", False


def override_network_def(parser: Any) -> None:
    """The two run-time overrides of ``network_def`` (see the module docstring)."""
    if "network_def" not in parser:
        return
    network_def = parser["network_def"]
    if not isinstance(network_def, dict):
        return
    if network_def.get("pretrained") is True:
        parser["network_def#pretrained"] = False
    target = str(network_def.get("_target_", "")).rsplit(".", 1)[-1]
    retired = [a for a in RETIRED_NETWORK_ARGUMENTS.get(target, ()) if a in network_def]
    if retired:
        import inspect

        from monai.utils import optional_import

        cls, found = optional_import("monai.networks.nets", name=target)
        accepted = inspect.signature(cls.__init__).parameters if found else {}
        kept = {k: v for k, v in network_def.items() if k not in retired or k in accepted}
        parser["network_def"] = kept


class DetectorInferer:
    """Runs a MONAI ``RetinaNetDetector`` on one image, as the Model Zoo's ``RetinaNetInferer`` does.

    The sliding window (set by the bundle's ``detector_ops``) is used only when
    the image is larger than its patch, or the bundle forces it.
    """

    def __init__(self, detector: Any, force_sliding_window: bool = False) -> None:
        self.detector = detector
        self.force_sliding_window = force_sliding_window
        roi = getattr(getattr(detector, "inferer", None), "roi_size", None)
        self.window_voxels = int(math.prod(roi)) if roi is not None else None

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        self.detector.network = network
        self.detector.training = network.training
        images = list(inputs)
        use_window = self.force_sliding_window or (
            self.window_voxels is not None and any(image[0].numel() >= self.window_voxels for image in images)
        )
        return list(self.detector(images, use_inferer=use_window))


def _detector_inferer(
    parser: Any, parsed: Callable[[str], Any], network: torch.nn.Module, config_path: Path
) -> DetectorInferer:
    if "detector" not in parser:
        raise ModelError(f"{config_path}: a detection bundle needs a 'detector' (e.g. RetinaNetDetector)")
    detector = parsed("detector")
    detector.network = network
    if "detector_ops" in parser:
        parsed("detector_ops")
    force = bool(parsed("force_sliding_window")) if "force_sliding_window" in parser else False
    return DetectorInferer(detector, force_sliding_window=force)


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


#: Packages that must be the build made for the installed torch, not any release of them.
_TORCH_COMPANIONS = ("torchvision", "torchaudio")


def missing_package_hint(error: ImportError, metadata: dict[str, Any]) -> str:
    """What to do about a package a bundle imports and this Python lacks, naming the package.

    torchvision (and torchaudio) must be the build made for the installed
    torch: a release of it built for another torch does not load (``operator
    torchvision::nms does not exist``), and where the only builds at hand are
    for a CUDA torch the CPU torch cannot keep them company, so the message
    says to install torch and torchvision as a pair, or to run the model on a
    worker that has both.
    """
    text = str(error)
    name = getattr(error, "name", None) or next(
        (
            package
            for package in (*_TORCH_COMPANIONS, *metadata.get("optional_packages_version", {}))
            if package in text
        ),
        None,
    )
    wanted = (metadata.get("optional_packages_version") or {}).get(name or "")
    version = f" {wanted}" if wanted else ""
    if name and name.split(".")[0] in _TORCH_COMPANIONS:
        package = name.split(".")[0]
        return (
            f"the bundle needs {package}{version}, which is not installed here; it must be the build made "
            f"for the installed torch {torch.__version__} (pip cannot add one built for another torch "
            f"beside it: install torch and {package} together as a matching pair, which may replace this "
            f"CPU torch with a CUDA build), or run this model on a worker that has both"
        )
    what = f"the Python package {name!r}{version}" if name else "a Python package"
    return (
        f"the bundle needs {what}, which is not installed here (see optional_packages_version in its "
        "metadata.json; add it to the workers' environment)"
    )


@dataclass
class OpenBundle:
    """A bundle's inference config parsed by ConfigParser, file transforms removed, nothing built yet."""

    root: Path
    config_path: Path
    metadata: dict[str, Any]
    parser: Any
    #: The key of the image in the transforms' dictionary (the enabled LoadImaged's keys, resolved).
    image_key: str
    #: Whether that LoadImaged adds the channel axis itself.
    channel_first: bool

    def parsed(self, key: str) -> Any:
        """``get_parsed_content(key)``; :class:`ModelError` names the file, the key and the real cause."""
        try:
            return self.parser.get_parsed_content(key)
        except Exception as exc:
            cause = root_cause(exc)
            reason = f"{type(cause).__name__}: {cause}"
            if cause is not exc:
                reason += f" (in {type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            if isinstance(cause, ImportError):
                reason += "; " + missing_package_hint(cause, self.metadata)
            raise ModelError(f"{self.config_path}: key {key!r} cannot be instantiated: {reason}") from exc

    def section(self, key: str) -> Any:
        """The instantiated ``key`` (e.g. ``preprocessing``), or None when the config has none."""
        return self.parsed(key) if key in self.parser else None


def open_bundle(root: Path, device: torch.device) -> OpenBundle:
    """Parse a bundle directory's metadata and inference config the way :func:`load_bundle` runs them."""
    from monai.bundle import ConfigParser

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
    override_network_def(parser)
    bundle = OpenBundle(root, config_path, metadata, parser, "image", False)
    bundle.image_key, bundle.channel_first = _image_key(parser, loaders, bundle.parsed)
    return bundle


def load_bundle(registered: RegisteredModel, device: torch.device) -> LoadedModel:
    """Instantiate a registered bundle on ``device``; :class:`ModelError` names the file and key at fault."""
    from monai.inferers import SimpleInferer

    root = registered.files_dir
    bundle = open_bundle(root, device)
    parser, parsed, config_path, metadata = bundle.parser, bundle.parsed, bundle.config_path, bundle.metadata
    image_key, channel_first = bundle.image_key, bundle.channel_first

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

    preprocessing = bundle.section("preprocessing")
    if registered.manifest.task == "detection":
        inferer: Any = _detector_inferer(parser, parsed, network, config_path)
    else:
        inferer = parsed("inferer") if "inferer" in parser else SimpleInferer()
    postprocessing = bundle.section("postprocessing")
    box_layout = layout_of(inferer.detector, postprocessing) if isinstance(inferer, DetectorInferer) else None
    image_format = (metadata.get("network_data_format") or {}).get("inputs", {}).get("image", {})
    spatial_dims = registered.manifest.spatial_dims
    value_range = image_format.get("value_range")
    smoke_range = (0.0, 1.0)
    if isinstance(value_range, list) and len(value_range) == 2:
        smoke_range = (float(value_range[0]), float(value_range[1]))
    channels = image_format.get("num_channels")
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
        channel_names=output_names(registered),
        smoke_shape=smoke_shape(image_format.get("spatial_shape"), spatial_dims),
        smoke_range=smoke_range,
        size_bytes=module_size_bytes(network),
        input_channels=int(channels) if isinstance(channels, int) and channels > 0 else 1,
        title=str(metadata.get("name") or registered.name),
        box_layout=box_layout,
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
