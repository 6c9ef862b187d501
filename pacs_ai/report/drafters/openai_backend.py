"""The ``openai`` drafter: any OpenAI-compatible chat endpoint on the hospital network.

vLLM, TGI, llama.cpp's server, Ollama and ``transformers serve`` all speak the
``/v1/chat/completions`` protocol.  Profile::

    report:
      backend: openai
      params:
        base_url: http://llm.radiology.local:8000/v1
        model: medgemma-27b-text-it
        api_key_env: PACS_AI_LLM_API_KEY   # optional: name of the environment variable with the key
        timeout_seconds: 60
        max_retries: 2

Drafts must never leave the hospital, so the backend is off unless a
``base_url`` is configured (there is no default endpoint, and the
``OPENAI_BASE_URL`` variable is ignored), and it refuses an endpoint whose
host resolves to a public address: only loopback, private and link-local
addresses are accepted, checked before every request.  A site whose internal
network uses public address space sets ``allow_public_addresses: true``,
knowingly.  Keys are never written in profiles: the ``report_llm_api_key``
setting (a secret, kept out of child environments) holds one, or
``api_key_env`` names an environment variable that does.

Timeouts and retries are the ``openai`` client's: each attempt is bounded by
``timeout_seconds``, connection errors, timeouts, 408/409/429 and 5xx answers
are retried ``max_retries`` times with exponential back-off; then the draft
falls back to the template with the error as the reason.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pacs_ai.report.drafters import DrafterConfigError, DrafterError, DraftText, parse_params
from pacs_ai.report.prompts import impression_prompt, parse_impression, parse_report, report_prompt

if TYPE_CHECKING:
    from PIL.Image import Image

    from pacs_ai.report.evidence import Evidence, StudyContext


class OpenAIParams(BaseModel):
    """Parameters of the ``openai`` backend (the profile's ``report.params``)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(
        default=None, description="e.g. http://llm.local:8000/v1; None disables the backend"
    )
    model: str = Field(min_length=1, description="model name as the server knows it")
    api_key_env: str | None = None
    timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    max_retries: int = Field(default=2, ge=0, le=10)
    max_tokens: int = Field(default=512, ge=1, le=16384)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = 0
    allow_public_addresses: bool = False
    #: Send the key images (as PNG data URLs) to multimodal served models.
    send_images: bool = False
    instruction: str | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL with a host, got {value!r}")
        return value.rstrip("/")


def _is_local(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone ("fe80::1%eth0")
    return ip.is_loopback or ip.is_private or ip.is_link_local


def check_endpoint_is_local(base_url: str, *, allow_public: bool = False) -> list[str]:
    """The addresses ``base_url``'s host resolves to; :class:`DrafterConfigError` if any is public.

    "Local" means loopback, private (RFC 1918, RFC 4193) or link-local: the
    hospital network.  Resolution failure is a :class:`DrafterError` (the
    endpoint may be down, the profile may be right).
    """
    host = urlsplit(base_url).hostname or ""
    port = urlsplit(base_url).port or (443 if base_url.startswith("https") else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DrafterError(f"cannot resolve the drafter endpoint host {host!r}: {exc}") from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    public = [address for address in addresses if not _is_local(address)]
    if public and not allow_public:
        raise DrafterConfigError(
            f"drafter endpoint {base_url} resolves to public address(es) {', '.join(public)}; "
            "drafts must not leave the hospital network (set allow_public_addresses: true only for an "
            "internal server with public addressing)"
        )
    return addresses


def _png_data_url(image: Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAIDrafter:
    """Drafts with an OpenAI-compatible endpoint; see the module docstring."""

    name = "openai"

    def __init__(self, params: OpenAIParams) -> None:
        if params.base_url is None:
            raise DrafterConfigError(
                "the openai drafter is disabled: set report.params.base_url to the hospital's "
                "OpenAI-compatible endpoint (e.g. http://llm.local:8000/v1)"
            )
        if params.api_key_env and params.api_key_env not in os.environ:
            raise DrafterConfigError(
                f"api_key_env names {params.api_key_env!r}, which is not set in the environment"
            )
        self.params = params
        self._client: Any = None
        self._api_key: str | None = None

    def use_api_key(self, key: str | None) -> None:
        """Send ``key`` (the ``report_llm_api_key`` setting) where the profile names no ``api_key_env``."""
        self._api_key = key
        self._client = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> OpenAIDrafter:
        return cls(parse_params(OpenAIParams, params, "openai"))

    @property
    def model_id(self) -> str | None:
        return self.params.model

    def _client_for(self) -> Any:
        if self._client is None:
            try:
                import openai
            except ImportError as exc:
                raise DrafterError(
                    "the openai backend needs the 'openai' package (pip install 'pacs-ai[report]')"
                ) from exc
            p = self.params
            key = os.environ[p.api_key_env] if p.api_key_env else (self._api_key or "not-needed")
            self._client = openai.OpenAI(
                base_url=p.base_url, api_key=key, timeout=p.timeout_seconds, max_retries=p.max_retries
            )
        return self._client

    def request_body(self, prompt: str, images: Sequence[Image] = ()) -> dict[str, Any]:
        """The chat-completions request (without transport details), as sent."""
        p = self.params
        content: str | list[dict[str, Any]] = prompt
        if p.send_images and images:
            content = [{"type": "image_url", "image_url": {"url": _png_data_url(image)}} for image in images]
            content.append({"type": "text", "text": prompt})
        body: dict[str, Any] = {
            "model": p.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
        }
        if p.top_p is not None:
            body["top_p"] = p.top_p
        if p.seed is not None:
            body["seed"] = p.seed
        return body

    def complete(self, prompt: str, images: Sequence[Image] = ()) -> str:
        """The endpoint's answer to ``prompt``; :class:`DrafterError` after the retries are spent."""
        import openai

        assert self.params.base_url is not None
        check_endpoint_is_local(self.params.base_url, allow_public=self.params.allow_public_addresses)
        client = self._client_for()
        try:
            response = client.chat.completions.create(**self.request_body(prompt, images))
        except openai.APITimeoutError as exc:
            raise DrafterError(
                f"{self.params.base_url} did not answer within {self.params.timeout_seconds:g} s "
                f"({self.params.max_retries + 1} attempts)"
            ) from exc
        except openai.APIConnectionError as exc:
            raise DrafterError(
                f"cannot reach {self.params.base_url} ({self.params.max_retries + 1} attempts): {exc}"
            ) from exc
        except openai.APIStatusError as exc:
            raise DrafterError(
                f"{self.params.base_url} answered HTTP {exc.status_code}: {exc.message}"
            ) from exc
        except openai.OpenAIError as exc:
            raise DrafterError(f"{self.params.base_url}: {type(exc).__name__}: {exc}") from exc
        if not response.choices or response.choices[0].message.content is None:
            raise DrafterError(f"{self.params.base_url} returned no message content")
        return str(response.choices[0].message.content)

    def draft_report(self, evidence: Evidence, images: Sequence[Image] = ()) -> DraftText:
        return parse_report(self.complete(report_prompt(evidence, self.params.instruction), images))

    def draft_impression(self, findings_text: str, context: StudyContext | None = None) -> str:
        return parse_impression(self.complete(impression_prompt(findings_text, context)))
