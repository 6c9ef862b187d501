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

When less than ``refuse_associations_below_free_mb`` is free on the spool's
disk, new associations are rejected (transient, local limit exceeded), logged
and audited (``association.refused``): senders keep their studies and retry,
and associations already open may still finish theirs (each instance is
checked against ``min_free_disk_mb`` when it is stored).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pacs_ai.index.audit import record_audit
from pacs_ai.index.ingest import Sender
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
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    InstanceRejected,
    ReceivedBytes,
)
from pacs_ai.receive.spool import Spool
from pacs_ai.receive.store import StoreHandler

log = logging.getLogger(__name__)

_PDU_HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")
PDU_ASSOCIATE_RQ = 0x01
PDU_P_DATA_TF = 0x04
PDU_RELEASE_RQ = 0x05
PDU_ABORT = 0x07
#: An A-ASSOCIATE-RQ or command set larger than this is not a real one.
MAX_CONTROL_BYTES = 1 << 20
#: Size of each association's receive buffer: the most read from the socket at once, and
#: handed from there to the file; data sets are never held whole.
READ_CHUNK = 512 * 1024
#: The first bytes of each received file kept in memory, so that its header is parsed without
#: reading the file back; enough for the attributes before Pixel Data of nearly every image.
HEADER_PREFIX_BYTES = 64 * 1024
#: Longest the listener waits for a requestor to close the connection after a rejection,
#: release or abort (the ARTIM timer of PS3.8 9.1.5), in seconds.
ARTIM_SECONDS = 5.0


@dataclass(frozen=True)
class ServerOptions:
    """Limits and timers of one listener process."""

    #: Seconds a new connection has to send its A-ASSOCIATE-RQ.
    acse_timeout: float = 30.0
    #: Seconds an association may stay silent (between or inside PDUs) before it is aborted.
    idle_timeout: float = 60.0
    #: Associations one process serves at once; more are rejected (transient, local limit).
    maximum_associations: int = 64
    #: Longest a busier listener process leaves a new connection to a less busy one (see
    #: :mod:`pacs_ai.receive.balance`).
    maximum_accept_deferral: float = MAXIMUM_DEFERRAL
    #: How often, in seconds, the accepting thread looks whether the listener is stopping.
    stop_poll_interval: float = 0.2


class _AbortAssociation(Exception):
    """The peer broke the protocol: send A-ABORT with ``reason`` and close."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _PeerClosed(ConnectionError):
    """The peer closed the connection (or the listener shut it down to stop)."""


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
    ) -> None:
        """``load`` is this process's slot among listener processes sharing the socket (None: alone)."""
        self.handler = handler
        self.policy = policy
        self.listening_socket = listening_socket
        self.options = options or ServerOptions()
        self.spool = handler.spool
        self.load = load
        self.refuse_below_free_mb = handler.settings.refuse_associations_below_free_mb
        #: Set once the grace period is over: associations still open are aborted.
        self.stopping = threading.Event()
        #: The open associations' connections, by the thread serving each.
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._connections_lock = threading.Lock()

    @property
    def association_count(self) -> int:
        """Associations this process is serving now."""
        with self._connections_lock:
            return len(self._connections)

    def low_disk(self) -> str | None:
        """Why new associations must be refused for lack of disk space, or None (one statvfs call)."""
        if not self.refuse_below_free_mb:
            return None
        try:
            free_bytes = self.handler.spool.free_bytes()
        except OSError as exc:
            return f"spool disk unreadable: {exc}"
        return low_disk_reason(free_bytes, self.refuse_below_free_mb)

    def record_refused_association(self, sender: Sender, peer: str, reason: str) -> None:
        """Audit an association refused because of the disk (``association.refused``)."""
        try:
            with self.handler.gate.begin() as connection:
                record_audit(
                    connection,
                    actor=f"dicom:{sender.ae_title}",
                    action="association.refused",
                    object_type="association",
                    detail={"peer": peer, "reason": reason, "result": "A-ASSOCIATE-RJ local-limit-exceeded"},
                )
        except Exception:  # the refusal itself already reached the sender
            log.exception("could not audit the refused association from %s", peer)

    def serve(self, stop: StopRequest, shutdown_grace: float) -> None:
        """Accept until ``stop`` is set; then let associations finish for ``shutdown_grace`` seconds.

        Associations still open after that are aborted (their senders keep
        what was not acknowledged and send it again).
        """
        waiting = select.poll()
        waiting.register(self.listening_socket, select.POLLIN)
        while not stop.is_set():
            if not waiting.poll(self.options.stop_poll_interval * 1000):
                continue  # nothing to accept yet: look again whether to stop
            self._defer_to_less_busy_process(stop)
            try:
                connection, address = self.listening_socket.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another listener process took it
            except OSError as exc:  # out of file descriptors and the like: wait, do not spin
                log.error("cannot accept a connection: %s", exc)
                stop.wait(0.5)
                continue
            self._start_association(connection, address)
        self._finish(shutdown_grace)

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

    def _start_association(self, connection: socket.socket, address: object) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        peer_address = address[0] if isinstance(address, tuple) else None
        connection.setblocking(True)
        with contextlib.suppress(OSError):  # responses are small and must not wait for more
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        thread = threading.Thread(
            target=self._serve_connection,
            args=(connection, peer, peer_address),
            name=f"association-{peer}",
            daemon=True,
        )
        with self._connections_lock:
            self._connections[thread] = connection
        if self.load is not None:
            self.load.started()
        try:
            thread.start()
        except RuntimeError as exc:  # cannot start a thread: out of memory or a limit
            log.error("cannot serve the connection from %s: %s", peer, exc)
            self._association_ended(thread)
            connection.close()

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

    def _association_ended(self, thread: threading.Thread) -> None:
        with self._connections_lock:
            self._connections.pop(thread, None)
        if self.load is not None:
            self.load.ended()

    def _serve_connection(self, connection: socket.socket, peer: str, peer_address: str | None) -> None:
        try:
            _Association(self, connection, peer, peer_address).run()
        except Exception:  # a bug must end this association only, never the listener
            log.exception("association from %s failed", peer)
        finally:
            connection.close()
            self._association_ended(threading.current_thread())

    def store(self, data_set: _DataSetFile, sender: Sender) -> tuple[int, str | None]:
        """File a complete data set; the temporary file is gone afterwards."""
        try:
            return self.handler.store(
                data_set.file.path,
                sender=sender,
                sop_class=data_set.command.affected_sop_class_uid,
                sop_instance=data_set.command.affected_sop_instance_uid,
                received=data_set.received(),
            )
        finally:
            data_set.discard()

    def refuse(self, sender: Sender, command: Command, reason: str) -> None:
        """Record (audit) a data set refused because it could not even be written."""
        rejected = InstanceRejected(STATUS_OUT_OF_RESOURCES, reason)
        self.handler.record_rejection(sender, command.affected_sop_instance_uid, rejected)


_TIMEVAL = struct.Struct("@ll")


def _set_timeouts(connection: socket.socket, seconds: float) -> None:
    """Have the kernel end any read or write that waits more than ``seconds`` (BlockingIOError).

    SO_RCVTIMEO and SO_SNDTIMEO on a blocking socket: a Python socket
    timeout would make every read and write a poll() and then the call
    itself, two system calls each (about 3% of a listener's CPU under load).
    """
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
    it ever has to move.
    """

    def __init__(self, connection: socket.socket, size: int = READ_CHUNK) -> None:
        self._connection = connection
        self._buffer = memoryview(bytearray(size))
        self._start = 0
        self._end = 0

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
                received = self._connection.recv_into(self._buffer)
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
    so it is discarded after it has been stored (linked) or refused.
    """

    def __init__(self, spool: Spool, command: Command, transfer_syntax: str) -> None:
        self.command = command
        self.file = spool.create_incoming()
        self.error: OSError | None = None
        self.prefix = bytearray()
        self.prefix_is_whole = True
        self._discarded = False
        self.transfer_syntax = transfer_syntax
        meta = encode_file_meta(
            command.affected_sop_class_uid, command.affected_sop_instance_uid, transfer_syntax
        )
        self.data_set_offset = len(meta)
        self.write(meta)

    def received(self) -> ReceivedBytes:
        """What was kept of the file in memory, for the store to read the header from."""
        return ReceivedBytes(self.prefix, self.prefix_is_whole, self.data_set_offset, self.transfer_syntax)

    def write(self, data: bytes | memoryview) -> None:
        """Append to the file; after a write error (disk full) the rest is read and dropped."""
        if self.error is not None:
            return
        view = memoryview(data)
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

    def discard(self) -> None:
        """Close the file and drop its temporary name; a name the store gave it stays."""
        if not self._discarded:
            self._discarded = True
            self.file.discard()


class _Association:
    """One association, from A-ASSOCIATE-RQ to release or abort, served by its own thread."""

    def __init__(
        self, server: AssociationServer, connection: socket.socket, peer: str, peer_address: str | None
    ) -> None:
        self.server = server
        self.connection = connection
        self.reader = _SocketReader(connection)
        self.peer = peer
        self.peer_address = peer_address
        self.calling_ae = "?"
        self.sender = Sender(self.calling_ae, peer_address)
        self.contexts: dict[int, tuple[str, str]] = {}
        self.peer_maximum_pdu_length = 0
        self.command_bytes = bytearray()
        self.command: Command | None = None
        self.data_set: _DataSetFile | None = None
        #: Why no temporary file could be created for the data set now arriving (it is dropped).
        self.create_error: OSError | None = None

    def run(self) -> None:
        outcome = "aborted"
        try:
            _set_timeouts(self.connection, self.server.options.acse_timeout)
            if not self._negotiate():
                self._await_close()
                return
            self._log("established")
            _set_timeouts(self.connection, self.server.options.idle_timeout)
            outcome = self._serve_messages()
            if outcome == "released":
                self._await_close()
        except _AbortAssociation as abort:
            log.warning("aborting association from %s (%s): %s", self.calling_ae, self.peer, abort)
            self._send_abort(abort.reason)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: a kernel timeout (_set_timeouts)
            log.warning("aborting association from %s (%s): silent too long", self.calling_ae, self.peer)
            self._send_abort(0x00)
        except OSError as exc:  # ConnectionError and _PeerClosed included
            if self.server.stopping.is_set():
                log.info(
                    "aborting association from %s (%s): the listener is stopping", self.calling_ae, self.peer
                )
                self._send_abort(0x00)
            else:
                log.info("association from %s (%s) lost: %s", self.calling_ae, self.peer, exc)
        finally:
            if self.data_set is not None:
                self.data_set.discard()  # never acknowledged: the sender will send it again
            if self.contexts:
                self._log(outcome)

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
        that closes the connection.  Closing it here at once can make the
        requestor lose the PDU just sent: pynetdicom's, finding the connection
        gone before it looks for the answer, aborts instead of reading the
        rejection (seen in CI under load).  Anything arriving meanwhile is dropped.
        """
        deadline = time.monotonic() + ARTIM_SECONDS
        with contextlib.suppress(OSError):
            _set_timeouts(self.connection, ARTIM_SECONDS)
            while time.monotonic() < deadline and self.connection.recv(65536):
                pass

    def _read_pdu_header(self) -> tuple[int, int]:
        pdu_type, _, length = _PDU_HEADER.unpack(self.reader.read_exactly(6))
        return pdu_type, length

    def _negotiate(self) -> bool:
        pdu_type, length = self._read_pdu_header()
        if pdu_type != PDU_ASSOCIATE_RQ or length > MAX_CONTROL_BYTES:
            raise _AbortAssociation(ABORT_UNEXPECTED_PDU, f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type}")
        body = self.reader.read_exactly(length)
        over_limit = self.server.association_count > self.server.options.maximum_associations
        low_disk = self.server.low_disk()
        try:
            negotiation = negotiate(
                _PDU_HEADER.pack(pdu_type, 0, length) + body,
                self.server.policy,
                over_limit=over_limit,
                low_disk=low_disk,
            )
        except NegotiationError as exc:
            raise _AbortAssociation(ABORT_INVALID_PARAMETER, str(exc)) from exc
        self.calling_ae = negotiation.calling_ae_title
        self.sender = Sender(self.calling_ae, self.peer_address)
        self._send(negotiation.reply)
        if not negotiation.accepted:
            refused_for_disk = low_disk is not None and negotiation.reason == low_disk
            log.log(
                logging.WARNING if refused_for_disk else logging.INFO,
                "association from %s (%s) rejected: %s",
                self.calling_ae,
                self.peer,
                negotiation.reason,
            )
            if refused_for_disk:
                self.server.record_refused_association(self.sender, self.peer, negotiation.reason)
            return False
        self.contexts = negotiation.contexts
        self.peer_maximum_pdu_length = negotiation.peer_maximum_pdu_length
        return True

    def _serve_messages(self) -> str:
        while True:
            pdu_type, length = self._read_pdu_header()
            if pdu_type == PDU_P_DATA_TF:
                self._p_data(length)
            elif pdu_type == PDU_RELEASE_RQ:
                self.reader.read_exactly(length)
                if self.data_set is not None or self.command_bytes:
                    raise _AbortAssociation(ABORT_UNEXPECTED_PDU, "A-RELEASE-RQ in the middle of a message")
                self._send(release_response_pdu())
                return "released"
            elif pdu_type == PDU_ABORT:
                self.reader.read_exactly(length)
                return "aborted"
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
                if self.command is not None or len(self.command_bytes) + size > MAX_CONTROL_BYTES:
                    raise _AbortAssociation(ABORT_UNEXPECTED_PDU, "command set fragment out of place")
                self.command_bytes += read(size)
                if last:
                    self._command_complete(context_id)
                continue
            if self.command is None:
                raise _AbortAssociation(ABORT_UNEXPECTED_PDU, "data set fragment without a command")
            # Data set fragment: straight to the file as it arrives (or dropped, if no file).
            self.reader.pass_through(size, self.data_set.write if self.data_set is not None else _drop)
            if last:
                self._data_set_complete(context_id)

    def _command_complete(self, context_id: int) -> None:
        try:
            command = decode_command(self.command_bytes)
        except CommandSetError as exc:
            raise _AbortAssociation(ABORT_INVALID_PARAMETER, str(exc)) from exc
        self.command_bytes = bytearray()
        if command.has_data_set:
            self.command = command
            if command.command_field == C_STORE_RQ:
                try:
                    self.data_set = _DataSetFile(self.server.spool, command, self.contexts[context_id][1])
                except OSError as exc:  # cannot even create the file: read and drop the data set
                    log.error("cannot create a file in %s: %s", self.server.spool.tmp_dir, exc)
                    self.create_error = exc
            return
        if command.command_field == C_ECHO_RQ:
            self._respond(context_id, command, STATUS_SUCCESS)
        elif command.command_field == C_STORE_RQ:
            self._respond(context_id, command, STATUS_CANNOT_UNDERSTAND, "C-STORE-RQ without a data set")
        elif command.command_field != C_CANCEL_RQ:  # a cancel has no response
            self._respond(context_id, command, STATUS_UNRECOGNIZED_OPERATION, "only C-ECHO and C-STORE")

    def _data_set_complete(self, context_id: int) -> None:
        command, data_set = self.command, self.data_set
        assert command is not None
        self.command, self.data_set = None, None
        if command.command_field != C_STORE_RQ:
            self._respond(context_id, command, STATUS_UNRECOGNIZED_OPERATION, "only C-ECHO and C-STORE")
            return
        if data_set is None or data_set.error is not None:
            reason = f"storage error: {data_set.error if data_set else self.create_error}"
            self.create_error = None
            if data_set is not None:
                data_set.discard()
            self.server.refuse(self.sender, command, reason)
            self._respond(context_id, command, STATUS_OUT_OF_RESOURCES, reason)
            return
        status, comment = self.server.store(data_set, self.sender)
        self._respond(context_id, command, status, comment)

    def _respond(self, context_id: int, command: Command, status: int, comment: str | None = None) -> None:
        response = encode_response(
            command,
            status,
            include_instance=command.command_field != C_ECHO_RQ,
            error_comment=comment if status != STATUS_SUCCESS else None,
        )
        self._send(command_pdus(context_id, response, self.peer_maximum_pdu_length))


def _drop(_piece: memoryview) -> None:
    """The sink of a data set that has no file to go to (it could not be created)."""
