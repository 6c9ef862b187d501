"""The network peers in the settings: where results go, who may call the listener, which PACS to query.

These are configuration models only, so that :mod:`pacs_ai.config` can hold them without
importing a feature package; the code that acts on them lives with its feature.

Result destinations, three kinds told apart by ``type`` (``dicom`` when absent, so older
settings keep working):

* ``dicom``: a DICOM peer that receives by C-STORE, optionally over TLS;
* ``dicomweb``: a DICOMweb server that receives by STOW-RS;
* ``folder``: a directory, e.g. a share that another system picks up.

Each kind has its own retry policy (``max_retries`` with exponential backoff
from ``retry_backoff_seconds``); a delivery that used them up stays in the
index as FAILED, visible and replayable.  The sender for each kind is in its
own module (``cstore``, ``stow``, ``folder``) and registered in
:mod:`pacs_ai.dispatch.senders`.

The listener's known peers and DICOM TLS (:class:`KnownPeer`, :class:`ListenerTls`) are
checked and applied by :mod:`pacs_ai.receive.security`; the PACS that ``pacs-ai reprocess``
queries and retrieves from (:class:`QueryRetrievePeer`) is used by :mod:`pacs_ai.receive.retrieve`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    field_validator,
    model_validator,
)


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: How many times a failed send is retried (with exponential backoff) before
    #: the delivery is left in state ``failed`` for an administrator to replay.
    max_retries: int = Field(default=5, ge=0)
    retry_backoff_seconds: float = Field(default=5.0, gt=0)
    #: Seconds to wait for the peer before an attempt counts as failed.
    timeout_seconds: float = Field(default=60.0, gt=0)


class TlsOptions(BaseModel):
    """TLS for DICOM associations (DICOM PS3.15 secure transport)."""

    model_config = ConfigDict(extra="forbid")

    #: CA bundle that signed the peer's certificate; None uses the system's trust store.
    ca_file: Path | None = None
    #: Our client certificate and key, for peers that require mutual TLS.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Host name expected in the peer's certificate; defaults to ``host``.
    server_hostname: str | None = None

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsOptions:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file for a client certificate, or neither")
        return self


class DicomDestination(RetryPolicy):
    """A DICOM peer that receives by C-STORE."""

    type: Literal["dicom"] = "dicom"
    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(gt=0, lt=65536)
    tls: TlsOptions | None = None

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


class DicomWebDestination(RetryPolicy):
    """A DICOMweb server that receives by STOW-RS (``POST {url}/studies``)."""

    type: Literal["dicomweb"]
    #: The DICOMweb service root, e.g. ``https://pacs.example.org/dicom-web``.
    url: str = Field(pattern=r"^https?://")
    username: str | None = None
    password: SecretStr | None = None
    #: Sent as ``Authorization: Bearer ...``; not combined with username/password.
    bearer_token: SecretStr | None = None
    #: CA bundle for an https URL; None uses the system's trust store.
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _one_kind_of_auth(self) -> DicomWebDestination:
        if self.bearer_token and (self.username or self.password):
            raise ValueError("give either bearer_token or username/password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password, or neither")
        return self

    def describe(self) -> str:
        return f"STOW-RS {self.url}"


class FolderDestination(RetryPolicy):
    """A directory; files are written atomically as ``<StudyInstanceUID>/<SOPInstanceUID>.dcm``."""

    type: Literal["folder"]
    path: Path

    def describe(self) -> str:
        return f"folder {self.path}"


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "dicom"))
    return str(getattr(value, "type", "dicom"))


Destination = Annotated[
    Annotated[DicomDestination, Tag("dicom")]
    | Annotated[DicomWebDestination, Tag("dicomweb")]
    | Annotated[FolderDestination, Tag("folder")],
    Discriminator(_kind),
]


class KnownPeer(BaseModel):
    """A sender the listener accepts: its calling AE title and where it may call from."""

    model_config = ConfigDict(extra="forbid")

    ae_title: str = Field(min_length=1, max_length=16)
    #: Networks (CIDR) the peer calls from; empty allows any address.
    networks: list[str] = Field(default_factory=list)
    #: Subject of the client certificate it must present over TLS (``CN=ct1,O=Hospital``, in
    #: the certificate's order); None accepts any certificate the CA signed (or plain TCP).
    certificate_subject: str | None = None
    #: This peer ends its associations with A-ABORT instead of A-RELEASE (some modalities always
    #: do): its A-ABORT then ends the series it stored into as a release would, instead of
    #: holding them for ``resend_window_seconds`` and marking them incomplete.  Audited on each
    #: such association (``association.aborted`` with ``treated_as: released``).  A dropped
    #: connection, a timeout or a protocol error still interrupts its series.
    abort_ends_series_normally: bool = False

    @field_validator("networks")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # raises with the offending text
        return value


class ListenerTls(BaseModel):
    """DICOM TLS for the listener (the BCP 195 profile of PS3.15 B.9 as Python's ssl offers it)."""

    model_config = ConfigDict(extra="forbid")

    certificate_file: Path
    private_key_file: Path
    #: CA certificates that client certificates must chain to; set it to require a client
    #: certificate (mutual TLS); None accepts any client without a certificate.
    ca_file: Path | None = None
    #: Port of the TLS listener; None (or the plain ``listen_port``) makes the one port TLS only.
    port: int | None = Field(default=None, gt=0, lt=65536)


class QueryRetrievePeer(BaseModel):
    """A PACS that pacs-ai may query (C-FIND) and retrieve from (C-MOVE), e.g. for ``pacs-ai reprocess``."""

    model_config = ConfigDict(extra="forbid")

    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(gt=0, lt=65536)
    tls: TlsOptions | None = None
    #: Seconds to wait for the PACS to connect or to send its next response (a C-MOVE sends a
    #: pending response after each instance, so this does not limit the length of a retrieval).
    timeout_seconds: float = Field(default=60.0, gt=0)
    #: The AE title the PACS knows pacs-ai's listener by; None uses pacs-ai's own ``ae_title``.
    move_destination: str | None = Field(default=None, min_length=1, max_length=16)

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"
