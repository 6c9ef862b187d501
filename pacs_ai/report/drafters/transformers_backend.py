"""The ``transformers`` drafter: a language model from a local directory, run in-process.

Profile::

    report:
      backend: transformers
      params:
        model_dir: /models/medgemma-4b-it      # a directory the site downloaded once
        task: image-text-to-text               # or text-generation (default) for causal LMs
        max_new_tokens: 384
        do_sample: false
        threads: 2                             # CPU threads while generating (default: one per core)

Models are loaded only from ``model_dir`` with ``local_files_only=True`` and
the Hugging Face offline switches set, so nothing is ever downloaded and no
study data leaves the machine.  ``trust_remote_code`` (needed by some models,
e.g. MAIRA-2 and CheXagent) runs Python code from that directory; it is off
unless the profile turns it on.

``text-generation`` loads ``AutoTokenizer`` + ``AutoModelForCausalLM``;
``image-text-to-text`` loads ``AutoProcessor`` + ``AutoModelForImageTextToText``
and passes the key images (:func:`pacs_ai.report.images.render_key_images`)
with the prompt.  The model is loaded on first use and kept by the instance.

Families whose processor also handles video (Qwen2-VL, Qwen2.5-VL) need
torchvision for that video processor alone; the drafter sends still key
images only, so where torchvision is not installed (a CPU-only torch build
has no matching torchvision wheel on PyPI) the family's processor is loaded
without its video processor (:func:`images_only_processor`): the image
processor's PIL/numpy implementation, the tokenizer and the chat template
come from the model directory as ``AutoProcessor`` would load them.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pacs_ai.report.drafters import DrafterError, DraftText, parse_params
from pacs_ai.report.prompts import impression_prompt, parse_impression, parse_report, report_prompt

if TYPE_CHECKING:
    from PIL.Image import Image

    from pacs_ai.report.evidence import Evidence, StudyContext

log = logging.getLogger(__name__)


class TransformersParams(BaseModel):
    """Parameters of the ``transformers`` backend (the profile's ``report.params``)."""

    model_config = ConfigDict(extra="forbid")

    model_dir: Path = Field(description="local directory with config.json, weights and tokenizer/processor")
    task: Literal["text-generation", "image-text-to-text"] = "text-generation"
    max_new_tokens: int = Field(default=384, ge=1, le=8192)
    do_sample: bool = False
    temperature: float | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    #: Seed for sampling (used when do_sample is true), so a re-run drafts the same text.
    seed: int = 0
    device: str = "cpu"
    #: CPU threads torch uses while this model generates (default: torch's own, one per core). On a
    #: machine shared with other services fewer are faster: a tiny model on a busy 2-core host took
    #: 30 times longer per step with 2 threads than with 1.
    threads: int | None = Field(default=None, ge=1, le=256)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    #: Replaces the built-in instruction (the facts are always appended).
    instruction: str | None = None
    #: Key images passed to image-text-to-text models.
    max_images: int = Field(default=1, ge=0, le=8)

    @field_validator("model_dir")
    @classmethod
    def _local_directory(cls, value: Path) -> Path:
        value = value.expanduser()
        if not value.is_dir():
            raise ValueError(
                f"{value} is not a directory; model_dir must be a local model directory "
                "(pacs-ai never downloads models: copy the model there once)"
            )
        if not (value / "config.json").is_file():
            raise ValueError(f"{value} has no config.json; is it a transformers model directory?")
        return value


def images_only_processor(processor_class: Any) -> Any:
    """``processor_class`` without its video processor: a subclass whose processor parts are images and text.

    transformers' processors take their parts from their ``__init__`` arguments;
    this subclass takes ``image_processor`` and ``tokenizer`` only and gives the
    family's own ``__init__`` no video processor, so the family's text and image
    handling (image token expansion, chat template) is unchanged.
    """

    def __init__(
        self: Any,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: Any = None,
        **kwargs: Any,
    ) -> None:
        processor_class.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    doc = f"{processor_class.__name__} for still images: no video processor (that one needs torchvision)."
    return type(
        f"{processor_class.__name__}ImagesOnly", (processor_class,), {"__init__": __init__, "__doc__": doc}
    )


def _load_processor(transformers: Any, model_dir: Path, common: dict[str, Any]) -> Any:
    """``AutoProcessor`` for ``model_dir``; without torchvision, the family's processor less its video."""
    try:
        return transformers.AutoProcessor.from_pretrained(model_dir, **common)
    except (OSError, ValueError, ImportError, AttributeError, TypeError) as exc:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            raise
        config = transformers.AutoConfig.from_pretrained(model_dir, **common)
        class_name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
        processor_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
        if processor_class is None or "video_processor" not in inspect.signature(processor_class).parameters:
            raise
        log.warning(
            "torchvision is not installed: %s is loaded without its video processor (still images only)",
            class_name,
        )
        try:
            return images_only_processor(processor_class).from_pretrained(model_dir, **common)
        except (OSError, ValueError, ImportError, AttributeError, TypeError) as second:
            raise DrafterError(
                f"cannot load the processor in {model_dir}: {exc}; without torchvision, {class_name} without "
                f"its video processor failed too: {second} (install a torchvision matching torch)"
            ) from second


class TransformersDrafter:
    """Drafts with a local transformers model; see the module docstring."""

    name = "transformers"

    def __init__(self, params: TransformersParams) -> None:
        self.params = params
        self._lock = threading.Lock()
        self._model: Any = None
        self._processor: Any = None  # tokenizer for text-generation, processor for image-text-to-text

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> TransformersDrafter:
        return cls(parse_params(TransformersParams, params, "transformers"))

    @property
    def model_id(self) -> str | None:
        return self.params.model_dir.name

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            # Offline in every layer: huggingface_hub and transformers read these switches.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                import torch
                import transformers
            except ImportError as exc:
                raise DrafterError(
                    "the transformers backend needs the 'transformers' package "
                    "(pip install 'pacs-ai[report]')"
                ) from exc
            p = self.params
            common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": p.trust_remote_code}
            dtype = "auto" if p.dtype == "auto" else getattr(torch, p.dtype)
            try:
                if p.task == "text-generation":
                    processor = transformers.AutoTokenizer.from_pretrained(p.model_dir, **common)
                    model = transformers.AutoModelForCausalLM.from_pretrained(
                        p.model_dir, dtype=dtype, **common
                    )
                else:
                    processor = _load_processor(transformers, p.model_dir, common)
                    model = transformers.AutoModelForImageTextToText.from_pretrained(
                        p.model_dir, dtype=dtype, **common
                    )
                model.to(p.device)  # type: ignore[arg-type]  # transformers' stubs: to() takes a device
                model.eval()
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise DrafterError(f"cannot load the model in {p.model_dir} for {p.task}: {exc}") from exc
            log.info("transformers drafter loaded %s (%s) on %s", p.model_dir, p.task, p.device)
            self._model, self._processor = model, processor

    def _generation_kwargs(self) -> dict[str, Any]:
        p = self.params
        kwargs: dict[str, Any] = {"max_new_tokens": p.max_new_tokens, "do_sample": p.do_sample}
        if p.do_sample:
            kwargs.update(
                {k: v for k, v in (("temperature", p.temperature), ("top_p", p.top_p)) if v is not None}
            )
        if p.repetition_penalty is not None:
            kwargs["repetition_penalty"] = p.repetition_penalty
        return kwargs

    def _inputs(self, prompt: str, images: Sequence[Image]) -> Any:
        processor = self._processor
        if self.params.task == "image-text-to-text":
            content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
            content.append({"type": "text", "text": prompt})
            messages = [{"role": "user", "content": content}]
            return processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        return processor(prompt, return_tensors="pt")

    def generate(self, prompt: str, images: Sequence[Image] = ()) -> str:
        """The model's answer to ``prompt`` (new tokens only, special tokens dropped)."""
        self._load()
        import torch

        p = self.params
        images = list(images)[: p.max_images] if p.task == "image-text-to-text" else []
        try:
            inputs = self._inputs(prompt, images).to(p.device)
            length = int(inputs["input_ids"].shape[-1])
            config = getattr(self._model, "config", None)
            text_config = (
                config.get_text_config()
                if config is not None and hasattr(config, "get_text_config")
                else config
            )
            limit = getattr(text_config, "max_position_embeddings", None)
            if limit is not None and length + p.max_new_tokens > limit:
                raise DrafterError(
                    f"prompt of {length} tokens plus max_new_tokens {p.max_new_tokens} exceeds the model's "
                    f"context of {limit} tokens"
                )
            pad = getattr(self._processor, "pad_token_id", None)
            if pad is None and hasattr(self._processor, "tokenizer"):
                pad = self._processor.tokenizer.pad_token_id
            torch.manual_seed(p.seed)
            threads = torch.get_num_threads()
            if p.threads is not None:
                torch.set_num_threads(p.threads)
            try:
                with torch.inference_mode():
                    output = self._model.generate(**inputs, **self._generation_kwargs(), pad_token_id=pad)
            finally:
                torch.set_num_threads(threads)
            decoder = self._processor
            return str(decoder.decode(output[0, length:], skip_special_tokens=True))
        except DrafterError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise DrafterError(
                f"generation with {p.model_dir.name} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def draft_report(self, evidence: Evidence, images: Sequence[Image] = ()) -> DraftText:
        if self.params.task == "image-text-to-text" and self.params.max_images and not images:
            raise DrafterError(
                "the image-text-to-text model was given no key image; render them from the study"
            )
        return parse_report(self.generate(report_prompt(evidence, self.params.instruction), images))

    def draft_impression(self, findings_text: str, context: StudyContext | None = None) -> str:
        # Image-text-to-text models answer text-only prompts too (the images are optional content).
        return parse_impression(self.generate(impression_prompt(findings_text, context, None)))
