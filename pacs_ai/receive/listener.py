"""The DICOM listener: C-ECHO and C-STORE SCP for all storage SOP classes.

An instance is acknowledged with Success only after its file is fsynced in the
spool and its row is committed in the index.  Anything else gets a failure
status that says why (0xA700 out of resources, 0xA900 data set does not match
SOP class, 0xC000 cannot understand) and leaves nothing half-written; the
rejection is recorded in the audit table, so it is visible, not silent.

Several listener processes accept from one listening socket opened by the
supervisor: one Python process is held by the GIL to about one core of receive
work, and a free process takes the next association.  Datasets are streamed to a
temporary file as they arrive (pynetdicom's chunked receive), never held whole
in memory.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import socketserver
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

from pynetdicom import (
    AE,
    _config,
    evt,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import IntegrityError, OperationalError

from pacs_ai.config import Settings
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import make_engine
from pacs_ai.index.ingest import SeriesIds, find_instance, record_duplicate, record_new_instance
from pacs_ai.receive.headers import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    InstanceHeader,
    InstanceRejected,
    read_header,
)
from pacs_ai.receive.spool import Spool, UnsafeIdentifier

log = logging.getLogger(__name__)

#: How long a stopping listener lets associations in progress finish.
SHUTDOWN_GRACE_SECONDS = 10.0
#: Per association already served, how long a listener process defers accepting a new one.
BUSY_ACCEPT_DELAY_SECONDS = 0.003


def open_listening_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """Bind and listen once, in the supervisor; every listener process accepts from it.

    Processes blocked on one shared socket take connections as they become
    free, which spreads associations over processes far more evenly than
    SO_REUSEPORT's hashing (where two of four associations often land on the
    same process while another idles).  The socket is non-blocking so that
    processes losing the race for a connection go back to waiting.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as exc:
        listening.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc} (is another DICOM service using it?)") from exc
    listening.listen(backlog)
    listening.setblocking(False)
    return listening


class SharedSocketAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server accepting from an already listening socket."""

    def __init__(self, *args: Any, listening_socket: socket.socket, **kwargs: Any) -> None:
        self._listening_socket = listening_socket
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.close()
        self.socket = self._listening_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Already listening."""

    def get_request(self) -> tuple[socket.socket, Any]:
        # Every listener process is woken for a new connection; one that is
        # already busy waits a moment so that an idle process takes it first.
        # Without this, the process that accepted first tends to win again and
        # ends up serving several associations while others idle.
        busy = len(self.active_associations)
        if busy:
            time.sleep(min(busy, 10) * BUSY_ACCEPT_DELAY_SECONDS)
        return super().get_request()


class StoreHandler:
    """Handles C-STORE requests for one listener process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool_dir, fsync=settings.fsync)
        self.engine = make_engine(settings.effective_database_url)
        self.series_ids = SeriesIds()
        self.min_free_bytes = settings.min_free_disk_mb * 1024 * 1024

    def __call__(self, event: Event) -> int:
        calling_ae = event.assoc.requestor.ae_title
        request = cast(C_STORE, event.request)
        sop_instance = str(request.AffectedSOPInstanceUID)
        temp_path = Path(event.dataset_path)
        try:
            return self._store(temp_path, calling_ae, str(request.AffectedSOPClassUID), sop_instance)
        except InstanceRejected as rejected:
            self._record_rejection(calling_ae, sop_instance, rejected)
            return rejected.status
        except OSError as exc:
            # Full disk, I/O error: refuse with "out of resources"; the sender retries later.
            log.error("cannot store %s from %s: %s", sop_instance, calling_ae, exc)
            self._record_rejection(
                calling_ae, sop_instance, InstanceRejected(STATUS_OUT_OF_RESOURCES, f"storage error: {exc}")
            )
            return STATUS_OUT_OF_RESOURCES
        except OperationalError as exc:
            log.error("index unavailable while storing %s: %s", sop_instance, exc)
            return STATUS_OUT_OF_RESOURCES

    def _store(self, temp_path: Path, calling_ae: str, sop_class: str, sop_instance: str) -> int:
        if self.spool.free_bytes() < self.min_free_bytes:
            raise InstanceRejected(
                STATUS_OUT_OF_RESOURCES,
                f"less than {self.settings.min_free_disk_mb} MB free in {self.spool.root}",
            )
        header = read_header(temp_path, command_sop_class=sop_class, command_sop_instance=sop_instance)
        try:
            final_path = self.spool.path_for(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )
        except UnsafeIdentifier as exc:
            raise InstanceRejected(0xC000, str(exc)) from exc

        self.spool.flush(temp_path)
        if self.spool.place_new(temp_path, final_path):
            try:
                self._index_new(header, final_path, calling_ae)
            except BaseException:
                # Not indexed means not accepted: take the name back so nothing half-recorded remains.
                final_path.unlink(missing_ok=True)
                raise
        else:
            self._store_over_existing_name(header, temp_path, final_path, calling_ae)
        log.debug(
            "stored %s (series %s) from %s", header.sop_instance_uid, header.series_instance_uid, calling_ae
        )
        return STATUS_SUCCESS

    def _index_new(self, header: InstanceHeader, final_path: Path, calling_ae: str) -> None:
        size = final_path.stat().st_size
        for attempt in range(2):
            try:
                with self.engine.begin() as connection:
                    record_new_instance(
                        connection,
                        header,
                        path=str(final_path),
                        size=size,
                        calling_ae=calling_ae,
                        series_ids=self.series_ids,
                    )
                return
            except IntegrityError:
                with self.engine.begin() as connection:
                    existing = find_instance(connection, header.sop_instance_uid)
                    if existing is not None:
                        # Indexed meanwhile by another association: this copy is a duplicate.
                        record_duplicate(
                            connection, existing[0], header, replaced=False, size=size, calling_ae=calling_ae
                        )
                        return
                # Not a duplicate: the remembered series row is gone (purged); look it up again.
                self.series_ids.forget(header.series_instance_uid)
                if attempt:
                    raise

    def _store_over_existing_name(
        self, header: InstanceHeader, temp_path: Path, final_path: Path, calling_ae: str
    ) -> None:
        """The spool already has a file of this name: a duplicate, or an unindexed leftover."""
        with self.engine.begin() as connection:
            existing = find_instance(connection, header.sop_instance_uid)
            if existing is not None:
                instance_id, existing_path = existing
                replace = self.settings.duplicate_policy == "replace"
                if replace:
                    self.spool.replace(temp_path, Path(existing_path))
                outcome = record_duplicate(
                    connection,
                    instance_id,
                    header,
                    replaced=replace,
                    size=Path(existing_path).stat().st_size,
                    calling_ae=calling_ae,
                )
                log.info("duplicate %s from %s: %s", header.sop_instance_uid, calling_ae, outcome.value)
                return
        # A file never acknowledged (a crash between rename and commit): this copy replaces it.
        self.spool.replace(temp_path, final_path)
        self._index_new(header, final_path, calling_ae)

    def _record_rejection(self, calling_ae: str, sop_instance: str, rejected: InstanceRejected) -> None:
        log.warning(
            "refused %s from %s with status 0x%04X: %s",
            sop_instance,
            calling_ae,
            rejected.status,
            rejected.reason,
        )
        try:
            with self.engine.begin() as connection:
                record_audit(
                    connection,
                    actor=f"dicom:{calling_ae}",
                    action="instance.rejected",
                    object_type="instance",
                    object_uid=sop_instance[:64],
                    detail={"status": f"0x{rejected.status:04X}", "reason": rejected.reason},
                )
        except Exception:  # the refusal itself must still reach the sender
            log.exception("could not record the refusal of %s", sop_instance)


def _log_association(event: Event) -> None:
    requestor = event.assoc.requestor
    log.info(
        "association %s from %s (%s:%s)",
        event.event.name.split("_")[-1].lower(),
        requestor.ae_title,
        requestor.address,
        requestor.port,
    )


def build_application_entity(settings: Settings) -> AE:
    """The AE: Verification, and (unrestricted) storage of every SOP class in any transfer syntax."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = 64
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
    ae.require_called_aet = True
    if settings.allowed_calling_ae_titles:
        ae.require_calling_aet = list(settings.allowed_calling_ae_titles)
    ae.add_supported_context(Verification)
    # Storage is unrestricted (see serve()): every storage SOP class, public or
    # private, is accepted in the first transfer syntax the sender proposes and
    # stored as received, without listing 170 x 45 contexts that pynetdicom
    # would deep-copy for every association.
    return ae


def serve(
    settings: Settings,
    stop: threading.Event | None = None,
    listening_socket: socket.socket | None = None,
) -> None:
    """Run one listener until SIGTERM/SIGINT (or ``stop`` is set).

    ``listening_socket`` is the socket shared by all listener processes; alone,
    the listener opens its own.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    # pynetdicom's "standard" handlers describe every PDU and DIMSE message
    # for its logger; at ingest rates that costs more than our own work.
    _config.LOG_HANDLER_LEVEL = "none"
    # pynetdicom writes the incoming data set to a NamedTemporaryFile: keep it
    # on the spool's filesystem so the final rename is atomic.
    spool = Spool(settings.spool_dir, fsync=settings.fsync)
    tempfile.tempdir = str(spool.tmp_dir)

    if stop is None:  # running as a process of its own: stop on SIGTERM/SIGINT
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())

    ae = build_application_entity(settings)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, StoreHandler(settings)),
        (evt.EVT_ESTABLISHED, _log_association),
        (evt.EVT_RELEASED, _log_association),
        (evt.EVT_ABORTED, _log_association),
    ]
    if listening_socket is None:
        listening_socket = open_listening_socket(settings.listen_host, settings.listen_port)
    server = ae.make_server(
        (settings.listen_host, settings.listen_port),
        evt_handlers=handlers,
        server_class=functools.partial(SharedSocketAssociationServer, listening_socket=listening_socket),  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True)
    thread.start()
    log.info(
        "DICOM listener pid %d: AE %s on %s:%d, spool %s",
        os.getpid(),
        settings.ae_title,
        settings.listen_host,
        settings.listen_port,
        settings.spool_dir,
    )
    while not stop.is_set():
        time.sleep(0.2)
    # Stop accepting, then give associations in progress a moment to finish:
    # what they have not had acknowledged, their senders will send again.
    socketserver.BaseServer.shutdown(server)
    server.server_close()
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    while ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    for assoc in ae.active_associations:
        assoc.abort()
    log.info("DICOM listener pid %d stopped", os.getpid())
