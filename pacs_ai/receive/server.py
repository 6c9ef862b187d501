"""The listener's network side: one thread per association, blocking sockets.

pynetdicom's own server runs three threads per association (DUL, ACSE/DIMSE,
socket) talking through queues polled every millisecond, and rebuilds each
message as Python objects; held to one core by the GIL, a process of it spent
about 1.5 ms of CPU per instance before storing anything.  Here each
association's thread reads its PDUs itself: command sets are decoded with
``struct``, data set fragments are received into one reused buffer and written
from it straight into a temporary file in the spool, and the same thread then
stores the instance durably (fsync, link, index commit) before it answers.
The thread spends nearly all its time in system calls, which release the GIL,
so the associations of one process overlap; an event loop handing each store
to a worker thread and back cost, per instance, two thread wake-ups, a GIL
hand-over at each system call and the loop's own bookkeeping for every chunk
read (together about as much CPU as the rest of the receive path).
Association negotiation and PDU encoding are pynetdicom's
(:mod:`pacs_ai.receive.acceptor`).

Per association, messages are handled one at a time (no asynchronous
operations window), so a response always follows its request's storage.
An association silent for ``idle_timeout`` seconds while the listener waits
for its next bytes (a kernel socket timeout, see ``_set_timeouts``) is aborted.

A new connection has one deadline for the whole negotiation (TLS handshake and
A-ASSOCIATE-RQ together, ``acse_timeout``), however slowly it drips its bytes,
and takes no association slot until it is accepted: connections still
negotiating are counted apart (``maximum_negotiating``), so a crowd of slow
callers cannot lock out a known peer.  No PDU is read into memory beyond its
type's limit (A-ASSOCIATE-RQ :data:`MAX_ASSOCIATE_RQ_BYTES`, command sets
:data:`MAX_COMMAND_BYTES`, A-RELEASE-RQ and A-ABORT their 4 bytes); data sets
stream to the spool and stop being written once past ``maximum_instance_bytes``
or when the disk nears ``min_free_disk_mb``, and are then answered 0xA700.
Every data set gets a DIMSE status, logged and audited when it is a failure.
An association that ends otherwise than by A-RELEASE marks the series it stored
into interrupted, and a released one completes them again
(:meth:`StoreHandler.association_ended`): the router holds an interrupted
series for a resend instead of analysing it as complete.  A known peer with
``abort_ends_series_normally`` has its A-ABORT count as a release (audited).
Each association also leaves a durable trace of the series it is storing into
(:class:`~pacs_ai.index.associations.AssociationMark`), so that the series of
a listener process killed mid-association are found interrupted too.

When less than ``refuse_associations_below_free_mb`` is free on the spool's
disk, new associations are rejected (transient, local limit exceeded), logged
and audited (``association.refused``): senders keep their studies and retry,
and associations already open may still finish theirs (each instance is
checked against ``min_free_disk_mb`` when it is stored).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pacs_ai import metrics
from pacs_ai.index.associations import AssociationMark
from pacs_ai.index.audit import record_audit
from pacs_ai.index.ingest import Sender
from pacs_ai.peer_settings import KnownPeer
from pacs_ai.process import StopRequest
from pacs_ai.receive.acceptor import (
    ABORT_INVALID_PARAMETER,
    ABORT_UNEXPECTED_PDU,
    AcceptorPolicy,
    NegotiationError,
    abort_pdu,
    command_pdus,
    negotiate,
    release_response_pdu,
)
from pacs_ai.receive.balance import DEFERRAL_STEP, MAXIMUM_DEFERRAL, ListenerLoad
from pacs_ai.receive.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    STATUS_UNRECOGNIZED_OPERATION,
    Command,
    CommandSetError,
    decode_command,
    encode_response,
)
from pacs_ai.receive.filemeta import encode_file_meta
from pacs_ai.receive.headers import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    InstanceRejected,
    ReceivedBytes,
    is_valid_uid,
)
from pacs_ai.receive.health import PUBLISH_SECONDS, publish_listener_state
from pacs_ai.receive.security import certificate_subject
from pacs_ai.receive.spool import Spool
from pacs_ai.receive.store import StoreHandler

log = logging.getLogger(__name__)

_PDU_HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")
PDU_ASSOCIATE_RQ = 0x01
PDU_P_DATA_TF = 0x04
PDU_RELEASE_RQ = 0x05
PDU_ABORT = 0x07
#: An A-ASSOCIATE-RQ larger than this is not a real one (128 contexts of 4 syntaxes are ~30 KB).
MAX_ASSOCIATE_RQ_BYTES = 256 * 1024
#: A command set larger than this is not a real one (a real one is under 300 bytes); one up to
#: this size is decoded, so an over-long UID in it is answered with a status, not an abort.
MAX_COMMAND_BYTES = 128 * 1024
#: Receive buffer of a connection still negotiating: small, since many may be waiting at once.
NEGOTIATION_CHUNK = 4096
#: How often, in bytes written, a streaming data set looks at the spool disk's free space.
FREE_SPACE_CHECK_BYTES = 64 * 1024 * 1024
#: Size of each association's receive buffer: the most read from the socket at once, and
#: handed from there to the file; data sets are never held whole.
READ_CHUNK = 512 * 1024
#: The first bytes of each received file kept in memory, so that its header is parsed without
#: reading the file back; enough for the attributes before Pixel Data of nearly every image.
HEADER_PREFIX_BYTES = 64 * 1024
#: Longest the listener waits for a requestor to close the connection after a rejection,
#: release or abort (the ARTIM timer of PS3.8 9.1.5), in seconds.
ARTIM_SECONDS = 5.0

#: The DIMSE services by command field, as the ``command`` label of the response metrics.
_COMMAND_NAMES = {C_ECHO_RQ: "C-ECHO", C_STORE_RQ: "C-STORE"}


@dataclass(frozen=True)
class ServerOptions:
    """Limits and timers of one listener process."""

    #: Seconds a new connection has to finish negotiating (TLS handshake and A-ASSOCIATE-RQ).
    acse_timeout: float = 10.0
    #: Seconds an association may stay silent (between or inside PDUs) before it is aborted.
    idle_timeout: float = 60.0
    #: Associations all listener processes together serve at once (this one alone, without a
    #: shared load); more are rejected (transient, local limit).
    maximum_associations: int = 128
    #: Associations this process serves at once from one peer address.
    maximum_associations_per_address: int = 32
    #: Connections this process lets negotiate at once; more are closed at once.
    maximum_negotiating: int = 256
    #: Largest data set stored; the rest of a longer one is dropped and it is answered 0xA700.
    maximum_instance_bytes: int = 4096 * 1024 * 1024
    #: Longest a busier listener process leaves a new connection to a less busy one (see
    #: :mod:`pacs_ai.receive.balance`).
    maximum_accept_deferral: float = MAXIMUM_DEFERRAL
    #: How often, in seconds, the accepting thread looks whether the listener is stopping.
    stop_poll_interval: float = 0.2
    #: Where this process publishes its counts for ``pacs-ai status`` (None: nowhere).
    state_file: Path | None = None


class _AbortAssociation(Exception):
    """The peer broke the protocol: send A-ABORT with ``reason`` and close."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _PeerClosed(ConnectionError):
    """The peer closed the connection (or the listener shut it down to stop)."""


#: Why an association ended when the peer sent A-ABORT (the audit's reason).
PEER_ABORT = "the peer sent A-ABORT"


def low_disk_reason(free_bytes: int, refuse_below_free_mb: int) -> str | None:
    """Why new associations are refused with this much free on the spool's disk; None when they are not.

    Shared by the listener and ``pacs-ai status``, so both say the same thing.
    """
    free_mb = free_bytes // (1024 * 1024)
    if not refuse_below_free_mb or free_mb >= refuse_below_free_mb:
        return None
    return (
        f"spool disk nearly full: {free_mb} MB free, below refuse_associations_below_free_mb="
        f"{refuse_below_free_mb} MB"
    )


class AssociationServer:
    """Accepts associations from a listening socket shared with other processes and serves them."""

    def __init__(
        self,
        handler: StoreHandler,
        policy: AcceptorPolicy,
        listening_socket: socket.socket,
        options: ServerOptions | None = None,
        load: ListenerLoad | None = None,
        *,
        tls_context: ssl.SSLContext | None = None,
        tls_socket: socket.socket | None = None,
    ) -> None:
        """``load`` is this process's slot among listener processes sharing the socket (None: alone).

        ``tls_context`` alone makes ``listening_socket`` a DICOM TLS port; with
        ``tls_socket`` the TLS port is that socket, beside the plain one.
        """
        self.handler = handler
        self.policy = policy
        self.listening_socket = listening_socket
        self.options = options or ServerOptions()
        self.spool = handler.spool
        self.load = load
        self.refuse_below_free_mb = handler.settings.refuse_associations_below_free_mb
        #: Each listening socket with the TLS context of its connections (None: plain TCP).
        self.listening: list[tuple[socket.socket, ssl.SSLContext | None]] = (
            [(listening_socket, None), (tls_socket, tls_context)]
            if tls_socket is not None and tls_context is not None
            else [(listening_socket, tls_context)]
        )
        #: Set once the grace period is over: associations still open are aborted.
        self.stopping = threading.Event()
        #: The open connections (negotiating or associated), by the thread serving each.
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._connections_lock = threading.Lock()
        #: Connections accepted that have not finished negotiating (they hold no association slot).
        self._negotiating = 0
        #: Established associations of this process, by peer address.
        self._associations_by_address: Counter[str | None] = Counter()

    @property
    def association_count(self) -> int:
        """Associations this process is serving now (negotiating connections not counted)."""
        with self._connections_lock:
            return sum(self._associations_by_address.values())

    @property
    def negotiating_count(self) -> int:
        """Connections of this process still negotiating."""
        with self._connections_lock:
            return self._negotiating

    def low_disk(self) -> str | None:
        """Why new associations must be refused for lack of disk space, or None (one statvfs call)."""
        if not self.refuse_below_free_mb:
            return None
        try:
            free_bytes = self.handler.spool.free_bytes()
        except OSError as exc:
            return f"spool disk unreadable: {exc}"
        return low_disk_reason(free_bytes, self.refuse_below_free_mb)

    def take_slot(self, peer_address: str | None) -> str | None:
        """Count a new association of ``peer_address``; or, over a limit, count nothing and say why."""
        with self._connections_lock:
            total = (
                self.load.total() if self.load is not None else sum(self._associations_by_address.values())
            )
            maximum = self.options.maximum_associations
            if total >= maximum:
                return f"too many associations ({total}, maximum_associations={maximum})"
            from_peer = self._associations_by_address[peer_address]
            if from_peer >= self.options.maximum_associations_per_address:
                return (
                    f"too many associations from {peer_address} ({from_peer}, "
                    f"maximum_associations_per_address={self.options.maximum_associations_per_address})"
                )
            self._associations_by_address[peer_address] += 1
        if self.load is not None:
            self.load.started()
        return None

    def release_slot(self, peer_address: str | None) -> None:
        """An association counted by :meth:`take_slot` is over (or was not accepted after all)."""
        with self._connections_lock:
            self._associations_by_address[peer_address] -= 1
            if self._associations_by_address[peer_address] <= 0:
                del self._associations_by_address[peer_address]
        if self.load is not None:
            self.load.ended()

    def negotiation_ended(self) -> None:
        """A connection finished negotiating (accepted, rejected or gone)."""
        with self._connections_lock:
            self._negotiating -= 1

    def record_association_event(
        self, action: str, sender: Sender, peer: str, detail: dict[str, str]
    ) -> None:
        """Audit a refused or aborted association (``association.refused`` / ``association.aborted``)."""
        try:
            with self.handler.gate.begin() as connection:
                record_audit(
                    connection,
                    actor=f"dicom:{sender.ae_title}"[:128],
                    action=action,
                    object_type="association",
                    detail={"peer": peer, **detail},
                )
        except Exception:  # the refusal itself already reached the sender
            log.exception("could not audit the %s of the association from %s", action, peer)

    def record_refused_association(self, sender: Sender, peer: str, reason: str) -> None:
        """Audit an association refused at negotiation (``association.refused``)."""
        self.record_association_event(
            "association.refused", sender, peer, {"reason": reason, "result": "A-ASSOCIATE-RJ"}
        )

    def serve(self, stop: StopRequest, shutdown_grace: float) -> None:
        """Accept until ``stop`` is set; then let associations finish for ``shutdown_grace`` seconds.

        Associations still open after that are aborted (their senders keep
        what was not acknowledged and send it again).
        """
        waiting = select.poll()
        by_descriptor = {}
        for listening, context in self.listening:
            waiting.register(listening, select.POLLIN)
            by_descriptor[listening.fileno()] = (listening, context)
        published = 0.0
        while not stop.is_set():
            if self.options.state_file is not None and time.monotonic() - published >= PUBLISH_SECONDS:
                published = time.monotonic()
                self.publish_state(self.options.state_file)
            ready = waiting.poll(self.options.stop_poll_interval * 1000)
            if not ready:
                continue  # nothing to accept yet: look again whether to stop
            self._defer_to_less_busy_process(stop)
            for descriptor, _ in ready:
                listening, context = by_descriptor[descriptor]
                try:
                    connection, address = listening.accept()
                except (BlockingIOError, InterruptedError):
                    continue  # another listener process took it
                except OSError as exc:  # out of file descriptors and the like: wait, do not spin
                    log.error("cannot accept a connection: %s", exc)
                    stop.wait(0.5)
                    continue
                self._start_connection(connection, address, context)
        self._finish(shutdown_grace)

    def publish_state(self, path: Path) -> None:
        """Write this process's counts for ``pacs-ai status`` (see :mod:`pacs_ai.receive.health`)."""
        with self._connections_lock:
            state = {
                "associations": sum(self._associations_by_address.values()),
                "negotiating": self._negotiating,
            }
        publish_listener_state(path, state)

    def _finish(self, shutdown_grace: float) -> None:
        deadline = time.monotonic() + shutdown_grace
        for thread in self._threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        self.stopping.set()
        with self._connections_lock:
            open_connections = list(self._connections.values())
        for connection in open_connections:
            # Ends the thread's wait for its peer; it then aborts the association itself.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RD)
        for thread in self._threads():
            thread.join(5.0)

    def _threads(self) -> list[threading.Thread]:
        with self._connections_lock:
            return list(self._connections)

    def _start_connection(
        self, connection: socket.socket, address: object, tls_context: ssl.SSLContext | None
    ) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        peer_address = address[0] if isinstance(address, tuple) else None
        with self._connections_lock:
            if self._negotiating >= self.options.maximum_negotiating:
                crowded = True
            else:
                crowded = False
                self._negotiating += 1
        if crowded:
            # Closed at once, before a thread or a buffer is spent on it; the log is rate-limited.
            log.warning(
                "closing the connection from %s: %d connections are negotiating (maximum_negotiating)",
                peer,
                self.options.maximum_negotiating,
            )
            connection.close()
            return
        connection.setblocking(True)
        with contextlib.suppress(OSError):  # responses are small and must not wait for more
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        thread = threading.Thread(
            target=self._serve_connection,
            args=(connection, peer, peer_address, tls_context),
            name=f"association-{peer}",
            daemon=True,
        )
        with self._connections_lock:
            self._connections[thread] = connection
        try:
            thread.start()
        except RuntimeError as exc:  # cannot start a thread: out of memory or a limit
            log.error("cannot serve the connection from %s: %s", peer, exc)
            self.negotiation_ended()
            self._connection_ended(thread)
            connection.close()

    def replace_connection(self, connection: socket.socket) -> None:
        """The serving thread's connection is now ``connection`` (its TLS layer), for stopping."""
        with self._connections_lock:
            self._connections[threading.current_thread()] = connection

    def _defer_to_less_busy_process(self, stop: StopRequest) -> None:
        """Give a less busy listener process the time to take the waiting connection first.

        Returns at once when this process is alone or among the least busy; else
        once it is (another process took a connection, or an association here
        ended), or after the maximum deferral.  The accept that follows may then
        find the connection gone, which the accept loop expects.
        """
        if self.load is None:
            return
        waited = 0.0
        while not self.load.is_least_busy() and waited < self.options.maximum_accept_deferral:
            if stop.wait(DEFERRAL_STEP):
                return
            waited += DEFERRAL_STEP

    def _connection_ended(self, thread: threading.Thread) -> None:
        with self._connections_lock:
            self._connections.pop(thread, None)

    def _serve_connection(
        self,
        connection: socket.socket,
        peer: str,
        peer_address: str | None,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        association = _Association(self, connection, peer, peer_address, tls_context)
        try:
            association.run()
        except Exception:  # a bug must end this association only, never the listener
            log.exception("association from %s failed", peer)
        finally:
            association.close()
            connection.close()
            self._connection_ended(threading.current_thread())

    def store(
        self,
        data_set: _DataSetFile,
        sender: Sender,
        stored_series: Counter[str] | None = None,
        mark: AssociationMark | None = None,
    ) -> tuple[int, str | None]:
        """File a complete data set; the temporary file is gone afterwards.

        A stored instance is counted in ``stored_series`` under its series;
        ``mark`` is the association's trace in the index (see
        :meth:`StoreHandler.store`).

        Whatever goes wrong becomes a failure status, logged and audited: an
        exception escaping the store (a decoder's RecursionError, zlib.error)
        is a data set that cannot be understood, not a reason to drop the
        association unanswered.
        """
        command = data_set.command
        try:
            return self.handler.store(
                data_set.file.path,
                sender=sender,
                sop_class=command.affected_sop_class_uid,
                sop_instance=command.affected_sop_instance_uid,
                received=data_set.received(),
                stored_series=stored_series,
                mark=mark,
            )
        except Exception as exc:
            log.debug("storing %s failed", printable(command.affected_sop_instance_uid), exc_info=True)
            rejected = InstanceRejected(
                STATUS_CANNOT_UNDERSTAND, f"data set cannot be decoded: {type(exc).__name__}: {exc}"[:200]
            )
            self.refuse(sender, command, rejected)
            return rejected.status, rejected.reason
        finally:
            data_set.discard()

    def refuse(self, sender: Sender, command: Command, rejected: InstanceRejected) -> None:
        """Log and audit a data set refused before it reached the store (it is answered ``rejected``)."""
        self.handler.record_rejection(sender, printable(command.affected_sop_instance_uid), rejected)


def printable(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, for a log line or an audit record about a bad input."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


_TIMEVAL = struct.Struct("@ll")


def _set_timeouts(connection: socket.socket, seconds: float) -> None:
    """Have any read or write that waits more than ``seconds`` end (BlockingIOError or TimeoutError).

    SO_RCVTIMEO and SO_SNDTIMEO on a blocking socket: a Python socket
    timeout would make every read and write a poll() and then the call
    itself, two system calls each (about 3% of a listener's CPU under load).
    A TLS connection takes Python's timeout: the ssl module would report a
    kernel timeout as a want-read error.
    """
    if isinstance(connection, ssl.SSLSocket):
        connection.settimeout(seconds)
        return
    whole_seconds = int(seconds)
    timeval = _TIMEVAL.pack(whole_seconds, int((seconds - whole_seconds) * 1_000_000))
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class _SocketReader:
    """Buffered reads from an association's blocking socket.

    One buffer per association, reused: PDU headers and command sets are cut
    from it, and data set fragments are handed from it to the file as they
    arrive (:meth:`pass_through`), so a data set is never held whole and its
    bytes are copied only from the kernel into the buffer and from the buffer
    into the file.  The buffer is filled only once it is empty, so nothing in
    it ever has to move.  While ``deadline`` (a monotonic time) is set, no read
    waits past it, however the peer spaces its bytes.
    """

    def __init__(self, connection: socket.socket, size: int = READ_CHUNK) -> None:
        self.connection = connection
        self._buffer = memoryview(bytearray(size))
        self._start = 0
        self._end = 0
        self.deadline: float | None = None

    def grow(self, size: int) -> None:
        """Use a buffer of ``size`` bytes from now on, keeping what is unread."""
        unread = self._buffer[self._start : self._end]
        buffer = memoryview(bytearray(max(size, len(unread))))
        buffer[: len(unread)] = unread
        self._buffer, self._start, self._end = buffer, 0, len(unread)

    def read_exactly(self, size: int) -> bytes:
        """The next ``size`` bytes; :class:`_PeerClosed` if the connection ends before."""
        if self._end - self._start >= size:
            data = bytes(self._buffer[self._start : self._start + size])
            self._start += size
            return data
        collected = bytearray()
        self.pass_through(size, collected.extend)
        return bytes(collected)

    def pass_through(self, size: int, sink: Callable[[memoryview], object]) -> None:
        """Hand the next ``size`` bytes to ``sink`` in pieces as they arrive.

        A piece is a view of the buffer, valid only during the call.
        """
        while size:
            if self._start == self._end:
                if self.deadline is not None:
                    remaining = self.deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("association negotiation took too long")
                    _set_timeouts(self.connection, remaining)
                received = self.connection.recv_into(self._buffer)
                if not received:
                    raise _PeerClosed("the peer closed the connection")
                self._start, self._end = 0, received
            piece = min(size, self._end - self._start)
            sink(self._buffer[self._start : self._start + piece])
            self._start += piece
            size -= piece


class _DataSetFile:
    """A data set being received into a new file in the spool (see :meth:`Spool.create_incoming`).

    The file's first :data:`HEADER_PREFIX_BYTES` are also kept in ``prefix``
    (``prefix_is_whole`` once the whole file fitted in it).  The file stays
    open until :meth:`discard`: an unnamed file exists only while it is open,
    so it is discarded after it has been stored (linked) or refused.  Past
    ``maximum_bytes``, or with the spool's disk below ``minimum_free_bytes``,
    the file is discarded at once and the rest dropped: ``refusal`` says why.
    """

    def __init__(
        self,
        spool: Spool,
        command: Command,
        transfer_syntax: str,
        maximum_bytes: int,
        minimum_free_bytes: int,
    ) -> None:
        self.command = command
        self.spool = spool
        self.error: OSError | None = None
        self.refusal: InstanceRejected | None = None
        self.prefix = bytearray()
        self.prefix_is_whole = True
        self._discarded = False
        self.transfer_syntax = transfer_syntax
        self.maximum_bytes = maximum_bytes
        self.minimum_free_bytes = minimum_free_bytes
        self.data_set_bytes = 0
        self._next_free_space_check = FREE_SPACE_CHECK_BYTES
        meta = encode_file_meta(
            command.affected_sop_class_uid, command.affected_sop_instance_uid, transfer_syntax
        )
        self.data_set_offset = len(meta)
        self.file = spool.create_incoming()
        # Held until the file is stored or refused (closing it releases the lock): a second copy of
        # the instance arriving meanwhile waits for it (see store.wait_for_first_copy).
        fcntl.flock(self.file.descriptor, fcntl.LOCK_EX)
        self.write(meta, counted=False)

    def received(self) -> ReceivedBytes:
        """What was kept of the file in memory, for the store to read the header from."""
        return ReceivedBytes(self.prefix, self.prefix_is_whole, self.data_set_offset, self.transfer_syntax)

    def write(self, data: bytes | memoryview, counted: bool = True) -> None:
        """Append to the file; after a write error (disk full) or a refusal the rest is dropped."""
        if self.error is not None or self.refusal is not None:
            return
        view = memoryview(data)
        if counted:
            self.data_set_bytes += len(view)
            if self._refused_while_streaming():
                self.discard()  # the disk space and the descriptor go back now, not at the end
                return
        if self.prefix_is_whole:
            room = HEADER_PREFIX_BYTES - len(self.prefix)
            self.prefix += view[:room]
            self.prefix_is_whole = len(view) <= room
        try:
            while view:
                written = os.write(self.file.descriptor, view)
                view = view[written:]
        except OSError as exc:
            self.error = exc

    def _refused_while_streaming(self) -> bool:
        """Set ``refusal`` when the data set is too long or the disk nearly full; True then."""
        if self.data_set_bytes > self.maximum_bytes:
            self.refusal = InstanceRejected(
                STATUS_OUT_OF_RESOURCES,
                f"data set longer than maximum_instance_mb={self.maximum_bytes // (1024 * 1024)}",
            )
        elif self.data_set_bytes >= self._next_free_space_check:
            self._next_free_space_check += FREE_SPACE_CHECK_BYTES
            if self.spool.free_bytes() < self.minimum_free_bytes:
                self.refusal = InstanceRejected(
                    STATUS_OUT_OF_RESOURCES, "spool disk nearly full while receiving (min_free_disk_mb)"
                )
        return self.refusal is not None

    def discard(self) -> None:
        """Close the file and drop its temporary name; a name the store gave it stays."""
        if not self._discarded:
            self._discarded = True
            self.file.discard()


class _Association:
    """One connection, from TLS handshake and A-ASSOCIATE-RQ to release or abort, on its own thread."""

    def __init__(
        self,
        server: AssociationServer,
        connection: socket.socket,
        peer: str,
        peer_address: str | None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.server = server
        self.connection = connection
        self.tls_context = tls_context
        self.reader = _SocketReader(connection, NEGOTIATION_CHUNK)
        self.peer = peer
        self.peer_address = peer_address
        self.calling_ae = "?"
        self.sender = Sender(self.calling_ae, peer_address)
        self.contexts: dict[int, tuple[str, str]] = {}
        self.peer_maximum_pdu_length = 0
        self.maximum_pdu_length = server.policy.maximum_pdu_length
        self.command_bytes = bytearray()
        self.command: Command | None = None
        #: The presentation context the command came on; its data set must come on it too.
        self.command_context = 0
        self.data_set: _DataSetFile | None = None
        #: Why the data set now arriving is refused (it is dropped and answered with this).
        self.refusal: InstanceRejected | None = None
        self.negotiating = True
        self.holds_slot = False
        #: Instances this association had acknowledged (for the record of an aborted one).
        self.stored = 0
        #: Instances acknowledged per Series Instance UID: the series an abort leaves interrupted.
        self.stored_series: Counter[str] = Counter()
        #: The series it stores into, durably (``receiving_series``), in case the process dies.
        self.mark: AssociationMark | None = None
        #: The known peer the caller matched at negotiation, if any are named.
        self.known_peer: KnownPeer | None = None

    def run(self) -> None:
        outcome = "aborted"
        why: str | None = None
        try:
            self.reader.deadline = time.monotonic() + self.server.options.acse_timeout
            if self.tls_context is not None and not self._tls_handshake():
                return
            if not self._negotiate():
                self._await_close()
                return
            self._log("established")
            self.reader.deadline = None
            self.reader.grow(READ_CHUNK)
            _set_timeouts(self.connection, self.server.options.idle_timeout)
            outcome = self._serve_messages()
            if outcome == "released":
                self._await_close()
            if outcome == "aborted":
                why = PEER_ABORT
        except _AbortAssociation as abort:
            why = str(abort)[:200]
            log.warning("aborting association from %s (%s): %s", self.calling_ae, self.peer, abort)
            if not self.contexts:  # an established one is audited below
                self.server.record_association_event(
                    "association.aborted", self.sender, self.peer, {"reason": why}
                )
                metrics.association_rejected("protocol-error")
            self._send_abort(abort.reason)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: a kernel timeout (_set_timeouts)
            why = "negotiation took too long" if self.negotiating else "silent too long"
            log.warning("aborting association from %s (%s): %s", self.calling_ae, self.peer, why)
            self._send_abort(0x00)
        except OSError as exc:  # ConnectionError, ssl.SSLError and _PeerClosed included
            if self.server.stopping.is_set():
                log.info(
                    "aborting association from %s (%s): the listener is stopping", self.calling_ae, self.peer
                )
                self._send_abort(0x00)
                why = "the listener is stopping"
            else:
                why = f"connection lost: {exc}"[:200]
                log.info("association from %s (%s) lost: %s", self.calling_ae, self.peer, exc)
        finally:
            if self.data_set is not None:
                self.data_set.discard()  # never acknowledged: the sender will send it again
            if self.negotiating:
                self.server.negotiation_ended()
            if self.holds_slot:
                self.server.release_slot(self.peer_address)
            if self.contexts:
                self._log(outcome)
                # A known peer that always ends with A-ABORT may have it count as a release.
                abort_as_release = (
                    outcome == "aborted"
                    and why == PEER_ABORT
                    and self.known_peer is not None
                    and self.known_peer.abort_ends_series_normally
                )
                if outcome != "released":
                    # What it stored is kept (acknowledged); its series may lack what was not sent.
                    detail = {
                        "reason": why or "ended",
                        "instances_stored": str(self.stored),
                        "series": str(len(self.stored_series)),
                    }
                    if abort_as_release:
                        detail["treated_as"] = "released (known peer: abort_ends_series_normally)"
                    self.server.record_association_event(
                        "association.aborted", self.sender, self.peer, detail
                    )
                # Series an abort cut short wait for a resend; a release completes them.
                self.server.handler.association_ended(
                    self.stored_series,
                    self.sender,
                    released=outcome == "released" or abort_as_release,
                    reason=why,
                    mark=self.mark,
                )

    def close(self) -> None:
        """Close the connection (its TLS layer included)."""
        with contextlib.suppress(OSError):
            self.connection.close()

    def _tls_handshake(self) -> bool:
        """Wrap the connection in TLS within the negotiation deadline; False (logged, audited) if it fails."""
        assert self.tls_context is not None and self.reader.deadline is not None
        wrapped = self.tls_context.wrap_socket(
            self.connection, server_side=True, do_handshake_on_connect=False
        )
        self.connection = self.reader.connection = wrapped
        self.server.replace_connection(wrapped)
        remaining = max(0.001, self.reader.deadline - time.monotonic())
        wrapped.settimeout(remaining)
        # Python's timeout bounds each read of the handshake, not the whole of it: a peer dripping
        # a byte at a time would never reach it.  The deadline shuts the connection down instead.
        deadline = threading.Timer(remaining, _shut_down, args=(wrapped,))
        deadline.daemon = True
        deadline.start()
        try:
            wrapped.do_handshake()
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            reason = f"TLS handshake failed: {exc}"[:200]
            log.warning("refused the connection from %s: %s", self.peer, reason)
            self.server.record_association_event(
                "association.refused", self.sender, self.peer, {"reason": reason, "result": "TLS"}
            )
            metrics.association_rejected("tls")
            return False
        finally:
            deadline.cancel()
        return True

    def _log(self, what: str) -> None:
        log.info("association %s from %s (%s)", what, self.calling_ae, self.peer)

    def _send(self, data: bytes) -> None:
        self.connection.sendall(data)

    def _send_abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            _set_timeouts(self.connection, 1.0)  # a courtesy: never wait long on a peer that went wrong
            self._send(abort_pdu(reason))
        self._await_close()

    def _await_close(self) -> None:
        """Give the peer up to :data:`ARTIM_SECONDS` to close the connection first (PS3.8 Sta13).

        After an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT it is the requestor
        that closes the connection.  Closing it here at once, with bytes of the
        requestor's still unread, makes the kernel reset the connection, and a
        reset can discard the PDU just sent before the requestor reads it.
        Anything arriving meanwhile is dropped, at most
        :data:`NEGOTIATION_CHUNK` bytes per read.
        """
        deadline = time.monotonic() + ARTIM_SECONDS
        with contextlib.suppress(OSError, ValueError):
            while (remaining := deadline - time.monotonic()) > 0:
                _set_timeouts(self.connection, remaining)
                if not self.connection.recv(NEGOTIATION_CHUNK):
                    break

    def _read_pdu_header(self) -> tuple[int, int]:
        pdu_type, _, length = _PDU_HEADER.unpack(self.reader.read_exactly(6))
        return pdu_type, length

    def _negotiate(self) -> bool:
        pdu_type, length = self._read_pdu_header()
        if pdu_type != PDU_ASSOCIATE_RQ:
            raise _AbortAssociation(ABORT_UNEXPECTED_PDU, f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type}")
        if length > MAX_ASSOCIATE_RQ_BYTES:
            raise _AbortAssociation(
                ABORT_INVALID_PARAMETER,
                f"A-ASSOCIATE-RQ of {length} bytes (at most {MAX_ASSOCIATE_RQ_BYTES})",
            )
        body = self.reader.read_exactly(length)
        subject = (
            certificate_subject(self.connection.getpeercert())
            if isinstance(self.connection, ssl.SSLSocket)
            else None
        )
        refused_for_limit = self.server.take_slot(self.peer_address)
        self.holds_slot = refused_for_limit is None
        low_disk = self.server.low_disk()
        try:
            negotiation = negotiate(
                _PDU_HEADER.pack(pdu_type, 0, length) + body,
                self.server.policy,
                over_limit=refused_for_limit or False,
                low_disk=low_disk,
                peer_address=self.peer_address,
                certificate_subject=subject,
            )
        except NegotiationError as exc:
            raise _AbortAssociation(ABORT_INVALID_PARAMETER, str(exc)[:300]) from exc
        finally:
            self.negotiating = False
            self.server.negotiation_ended()
        self.calling_ae = printable(negotiation.calling_ae_title, 16)
        self.sender = Sender(self.calling_ae, self.peer_address)
        self._send(negotiation.reply)
        if not negotiation.accepted:
            if self.holds_slot:
                self.holds_slot = False
                self.server.release_slot(self.peer_address)
            log.warning(
                "association from %s (%s) rejected: %s",
                self.calling_ae,
                self.peer,
                printable(negotiation.reason, 300),
            )
            self.server.record_refused_association(self.sender, self.peer, printable(negotiation.reason, 300))
            metrics.association_rejected(negotiation.reason_class or "other")
            return False
        metrics.association_accepted(self.calling_ae)
        self.contexts = negotiation.contexts
        self.known_peer = negotiation.known_peer
        self.mark = AssociationMark(self.calling_ae)
        self.peer_maximum_pdu_length = negotiation.peer_maximum_pdu_length
        return True

    def _serve_messages(self) -> str:
        while True:
            pdu_type, length = self._read_pdu_header()
            if pdu_type == PDU_P_DATA_TF:
                if self.maximum_pdu_length and length > self.maximum_pdu_length:
                    raise _AbortAssociation(
                        ABORT_INVALID_PARAMETER,
                        f"P-DATA-TF of {length} bytes, longer than the {self.maximum_pdu_length} negotiated",
                    )
                self._p_data(length)
            elif pdu_type in (PDU_RELEASE_RQ, PDU_ABORT):
                if length != 4:  # never read: an A-RELEASE-RQ of 4 GB is not one
                    raise _AbortAssociation(
                        ABORT_INVALID_PARAMETER, f"PDU type {pdu_type} of length {length}"
                    )
                self.reader.read_exactly(length)
                if pdu_type == PDU_ABORT:
                    return "aborted"
                if self.data_set is not None or self.command_bytes or self.command is not None:
                    raise _AbortAssociation(ABORT_UNEXPECTED_PDU, "A-RELEASE-RQ in the middle of a message")
                self._send(release_response_pdu())
                return "released"
            else:
                raise _AbortAssociation(ABORT_UNEXPECTED_PDU, f"unexpected PDU type 0x{pdu_type:02X}")

    def _p_data(self, length: int) -> None:
        remaining = length
        read = self.reader.read_exactly
        while remaining:
            if remaining < 6:
                raise _AbortAssociation(ABORT_INVALID_PARAMETER, "P-DATA-TF ends inside a PDV item header")
            item_length, context_id, control = _PDV_HEADER.unpack(read(6))
            remaining -= 4 + item_length
            if item_length < 2 or remaining < 0:
                raise _AbortAssociation(ABORT_INVALID_PARAMETER, f"PDV item length {item_length} is invalid")
            if context_id not in self.contexts:
                raise _AbortAssociation(
                    ABORT_INVALID_PARAMETER, f"presentation context {context_id} not accepted"
                )
            size = item_length - 2
            last = bool(control & 0x02)
            if control & 0x01:  # command set fragment
                if self.command is not None or len(self.command_bytes) + size > MAX_COMMAND_BYTES:
                    raise _AbortAssociation(
                        ABORT_UNEXPECTED_PDU, "command set fragment out of place or too long"
                    )
                self.command_bytes += read(size)
                if last:
                    self._command_complete(context_id)
                continue
            if self.command is None:
                raise _AbortAssociation(ABORT_UNEXPECTED_PDU, "data set fragment without a command")
            if context_id != self.command_context and self.refusal is None:
                self._refuse_data_set(
                    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    f"data set on presentation context {context_id}, its command on {self.command_context}",
                )
            # Data set fragment: straight to the file as it arrives (or dropped, if no file).
            self.reader.pass_through(size, self.data_set.write if self.data_set is not None else _drop)
            if last:
                self._data_set_complete(self.command_context)

    def _refuse_data_set(self, status: int, reason: str) -> None:
        """Drop the rest of the data set now arriving and answer it ``status`` with ``reason``."""
        self.refusal = InstanceRejected(status, reason)
        if self.data_set is not None:
            self.data_set.discard()
            self.data_set = None

    def _command_complete(self, context_id: int) -> None:
        try:
            command = decode_command(self.command_bytes)
        except CommandSetError as exc:
            raise _AbortAssociation(ABORT_INVALID_PARAMETER, str(exc)) from exc
        self.command_bytes = bytearray()
        if command.has_data_set:
            self.command, self.command_context, self.refusal = command, context_id, None
            if command.command_field == C_STORE_RQ:
                self._open_data_set(command, context_id)
            return
        if command.command_field == C_ECHO_RQ:
            self._respond(context_id, command, STATUS_SUCCESS)
        elif command.command_field == C_STORE_RQ:
            self._respond(context_id, command, STATUS_CANNOT_UNDERSTAND, "C-STORE-RQ without a data set")
        elif command.command_field != C_CANCEL_RQ:  # a cancel has no response
            self._respond(context_id, command, STATUS_UNRECOGNIZED_OPERATION, "only C-ECHO and C-STORE")

    def _open_data_set(self, command: Command, context_id: int) -> None:
        """Start the file of a C-STORE's data set, or decide why the data set is refused."""
        abstract_syntax, transfer_syntax = self.contexts[context_id]
        for name, uid in (
            ("Affected SOP Class UID", command.affected_sop_class_uid),
            ("Affected SOP Instance UID", command.affected_sop_instance_uid),
        ):
            if not is_valid_uid(uid):
                self._refuse_data_set(
                    STATUS_CANNOT_UNDERSTAND, f"{name} {printable(uid, 70)!r} is not a valid UID"
                )
                return
        if command.affected_sop_class_uid != abstract_syntax:
            self._refuse_data_set(
                STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"Affected SOP Class UID {command.affected_sop_class_uid} sent on the presentation context "
                f"{context_id} of {abstract_syntax}",
            )
            return
        try:
            self.data_set = _DataSetFile(
                self.server.spool,
                command,
                transfer_syntax,
                self.server.options.maximum_instance_bytes,
                self.server.handler.min_free_bytes,
            )
        except OSError as exc:  # cannot even create the file: read and drop the data set
            log.error("cannot create a file in %s: %s", self.server.spool.tmp_dir, exc)
            self._refuse_data_set(STATUS_OUT_OF_RESOURCES, f"storage error: {exc}")

    def _data_set_complete(self, context_id: int) -> None:
        command, data_set, refusal = self.command, self.data_set, self.refusal
        assert command is not None
        started = time.monotonic()
        self.command, self.data_set, self.refusal = None, None, None
        if command.command_field != C_STORE_RQ:
            self._respond(context_id, command, STATUS_UNRECOGNIZED_OPERATION, "only C-ECHO and C-STORE")
            return
        if data_set is not None and refusal is None:
            refusal = data_set.refusal
            if data_set.error is not None:
                refusal = InstanceRejected(STATUS_OUT_OF_RESOURCES, f"storage error: {data_set.error}")
        if refusal is not None or data_set is None:
            if data_set is not None:
                data_set.discard()
            refusal = refusal or InstanceRejected(STATUS_OUT_OF_RESOURCES, "no file for the data set")
            self.server.refuse(self.sender, command, refusal)
            self._respond(context_id, command, refusal.status, refusal.reason)
            return
        status, comment = self.server.store(data_set, self.sender, self.stored_series, self.mark)
        self.stored += status == STATUS_SUCCESS
        if status == STATUS_SUCCESS:
            metrics.instance_stored(self.calling_ae, data_set.data_set_bytes, time.monotonic() - started)
        else:
            metrics.store_refused(time.monotonic() - started)
        self._respond(context_id, command, status, comment)

    def _respond(self, context_id: int, command: Command, status: int, comment: str | None = None) -> None:
        response = encode_response(
            command,
            status,
            include_instance=command.command_field != C_ECHO_RQ,
            error_comment=comment if status != STATUS_SUCCESS else None,
        )
        self._send(command_pdus(context_id, response, self.peer_maximum_pdu_length))
        metrics.dimse_response(_COMMAND_NAMES.get(command.command_field, "other"), status)


def _shut_down(connection: socket.socket) -> None:
    """End a connection's pending reads (its negotiation deadline has passed)."""
    with contextlib.suppress(OSError):
        # The plain socket's shutdown: SSLSocket.shutdown would drop the TLS object under the
        # thread still in the handshake.
        socket.socket.shutdown(connection, socket.SHUT_RDWR)


def _drop(_piece: memoryview) -> None:
    """The sink of a data set that has no file to go to (it could not be created)."""
