"""The listener's network loop: one asyncio event loop per listener process.

pynetdicom's own server runs three threads per association (DUL, ACSE/DIMSE,
socket) talking through queues polled every millisecond, and rebuilds each
message as Python objects; held to one core by the GIL, a process of it spent
about 1.5 ms of CPU per instance before storing anything.  Here one loop reads
every association's PDUs itself: command sets are decoded with ``struct``,
data set fragments go from the socket straight into a temporary file in the
spool, and only the durable part of a store (fsync, link, index commit) is
handed to a worker thread, so other associations keep being read meanwhile
(a process serving just one association does it on the loop itself).
Association negotiation and PDU encoding are pynetdicom's
(:mod:`pacs_ai.receive.acceptor`).

Per association, messages are handled one at a time (no asynchronous
operations window), so a response always follows its request's storage.

When less than ``refuse_associations_below_free_mb`` is free on the spool's
disk, new associations are rejected (transient, local limit exceeded), logged
and audited (``association.refused``): senders keep their studies and retry,
and associations already open may still finish theirs (each instance is
checked against ``min_free_disk_mb`` when it is stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pacs_ai.index.audit import record_audit
from pacs_ai.index.ingest import Sender
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
#: Bytes handed from the socket buffer to the file per read; data sets are never held whole.
READ_CHUNK = 1 << 20
#: The first bytes of each received file kept in memory, so that its header is parsed without
#: reading the file back; enough for the attributes before Pixel Data of nearly every image.
HEADER_PREFIX_BYTES = 64 * 1024


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
    #: Threads doing the blocking part of stores (fsync, index commit) for this process.
    store_threads: int = 8


class _AbortAssociation(Exception):
    """The peer broke the protocol: send A-ABORT with ``reason`` and close."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Released(Exception):
    """The association ended normally (A-RELEASE) or the peer aborted it."""


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
        self.associations: set[asyncio.Task[None]] = set()
        self.load = load
        self._executor = ThreadPoolExecutor(self.options.store_threads, thread_name_prefix="store")
        self.refuse_below_free_mb = handler.settings.refuse_associations_below_free_mb

    def low_disk(self) -> str | None:
        """Why new associations must be refused for lack of disk space, or None (one statvfs call)."""
        if not self.refuse_below_free_mb:
            return None
        try:
            free_bytes = self.handler.spool.free_bytes()
        except OSError as exc:
            return f"spool disk unreadable: {exc}"
        return low_disk_reason(free_bytes, self.refuse_below_free_mb)

    async def record_refused_association(self, sender: Sender, peer: str, reason: str) -> None:
        """Audit an association refused because of the disk (``association.refused``)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._audit_refusal, sender, peer, reason)

    def _audit_refusal(self, sender: Sender, peer: str, reason: str) -> None:
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

    async def serve(self, stop: asyncio.Event, shutdown_grace: float) -> None:
        """Serve until ``stop`` is set; then let associations finish for ``shutdown_grace`` seconds."""
        accepting = asyncio.create_task(self._accept_loop())
        await stop.wait()
        accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accepting
        if self.associations:
            await asyncio.wait(set(self.associations), timeout=shutdown_grace)
        for task in set(self.associations):
            task.cancel()  # each aborts its association on the way out
        if self.associations:
            await asyncio.wait(set(self.associations), timeout=5)
        self._executor.shutdown(wait=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        listening = self.listening_socket
        while True:
            await _readable(loop, listening)
            await self._defer_to_less_busy_process()
            try:
                connection, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another listener process took it
            except OSError as exc:  # out of file descriptors and the like: wait, do not spin
                log.error("cannot accept a connection: %s", exc)
                await asyncio.sleep(0.5)
                continue
            connection.setblocking(False)
            if self.load is not None:
                self.load.started()
            task = asyncio.create_task(self._serve_connection(connection, address))
            self.associations.add(task)
            task.add_done_callback(self._association_ended)

    async def _defer_to_less_busy_process(self) -> None:
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
            await asyncio.sleep(DEFERRAL_STEP)
            waited += DEFERRAL_STEP

    def _association_ended(self, task: asyncio.Task[None]) -> None:
        self.associations.discard(task)
        if self.load is not None:
            self.load.ended()

    async def _serve_connection(self, connection: socket.socket, address: object) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        try:
            reader, writer = await asyncio.open_connection(sock=connection, limit=READ_CHUNK)
        except OSError as exc:
            log.info("connection from %s lost before it started: %s", peer, exc)
            connection.close()
            return
        association = _Association(
            self, reader, writer, peer, address[0] if isinstance(address, tuple) else None
        )
        try:
            await association.run()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def store(self, data_set: _DataSetFile, sender: Sender) -> tuple[int, str | None]:
        """File a complete data set; the temporary file is gone afterwards.

        With other associations open in this process, a worker thread does it so that
        they keep being read meanwhile.  Alone, this process has nothing else to do
        while its one sender waits for the response, so the loop files it itself:
        handing every store to a thread and back cost two thread switches and a
        tug of war for the GIL at each of the store's system calls.  A connection
        arriving meanwhile waits in the backlog for that one store (or another
        listener process takes it).
        """
        if len(self.associations) <= 1:
            return _store_and_clean_up(self.handler, data_set, sender)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _store_and_clean_up, self.handler, data_set, sender)

    async def refuse(self, sender: Sender, command: Command, reason: str) -> None:
        """Record (audit) a data set refused because it could not even be written."""
        loop = asyncio.get_running_loop()
        rejected = InstanceRejected(STATUS_OUT_OF_RESOURCES, reason)
        await loop.run_in_executor(
            self._executor,
            self.handler.record_rejection,
            sender,
            command.affected_sop_instance_uid,
            rejected,
        )


def _store_and_clean_up(
    handler: StoreHandler, data_set: _DataSetFile, sender: Sender
) -> tuple[int, str | None]:
    try:
        return handler.store(
            data_set.file.path,
            sender=sender,
            sop_class=data_set.command.affected_sop_class_uid,
            sop_instance=data_set.command.affected_sop_instance_uid,
            received=data_set.received(),
        )
    finally:
        data_set.discard()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


class SilenceWatch:
    """Cancels an association's task once its peer has been silent past a deadline.

    The deadline moves with every chunk read, several times per instance;
    ``asyncio.timeout``'s ``reschedule`` replaced a timer in the event loop's
    heap each time (about 6% of a listener's time holding the GIL under
    load).  Here moving the deadline later stores a number, and the one
    pending timer, when it fires early, waits again for the deadline as it
    now is.  :attr:`expired` tells the cancellation it caused from others.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
        self.loop = loop
        self.task = task
        #: Loop time after which the peer has been silent too long; None: not watching.
        self.deadline: float | None = None
        self.expired = False
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, seconds: float | None) -> None:
        """Expire ``seconds`` from now unless armed again before; None stops watching."""
        if seconds is None:
            self.deadline = None
            return
        self.deadline = self.loop.time() + seconds
        if self._timer is not None and self._timer.when() > self.deadline:
            self._timer.cancel()  # an earlier deadline than the timer's: rare (after negotiation)
            self._timer = None
        if self._timer is None:
            self._timer = self.loop.call_at(self.deadline, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self.deadline is None:
            return
        if self.loop.time() >= self.deadline:
            self.expired = True
            self.task.cancel()
        else:
            self._timer = self.loop.call_at(self.deadline, self._check)


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
    """One association, from A-ASSOCIATE-RQ to release or abort."""

    def __init__(
        self,
        server: AssociationServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        peer_address: str | None,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.peer_address = peer_address
        self.loop = asyncio.get_running_loop()
        self.calling_ae = "?"
        self.sender = Sender(self.calling_ae, peer_address)
        self.contexts: dict[int, tuple[str, str]] = {}
        self.peer_maximum_pdu_length = 0
        self.command_bytes = bytearray()
        self.command: Command | None = None
        self.data_set: _DataSetFile | None = None
        #: Why no temporary file could be created for the data set now arriving (it is dropped).
        self.create_error: OSError | None = None
        self.silence: SilenceWatch | None = None

    async def run(self) -> None:
        outcome = "aborted"
        task = asyncio.current_task()
        assert task is not None
        self.silence = SilenceWatch(self.loop, task)
        try:
            try:
                self._arm(self.server.options.acse_timeout)
                if not await self._negotiate():
                    return
                self._log("established")
                outcome = await self._serve_messages()
            except asyncio.CancelledError:
                if self.silence.expired and task.uncancel() == 0:
                    raise TimeoutError from None
                raise
            finally:
                self.silence.stop()
        except _AbortAssociation as abort:
            log.warning("aborting association from %s (%s): %s", self.calling_ae, self.peer, abort)
            self._send_abort(abort.reason)
        except TimeoutError:
            log.warning("aborting association from %s (%s): silent too long", self.calling_ae, self.peer)
            self._send_abort(0x00)
        except asyncio.CancelledError:
            self._send_abort(0x00)  # the listener is stopping
            raise
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            log.info("association from %s (%s) lost: %s", self.calling_ae, self.peer, exc)
        finally:
            if self.data_set is not None:
                self.data_set.discard()  # never acknowledged: the sender will send it again
            if self.contexts:
                self._log(outcome)

    def _log(self, what: str) -> None:
        log.info("association %s from %s (%s)", what, self.calling_ae, self.peer)

    def _arm(self, seconds: float | None) -> None:
        assert self.silence is not None
        self.silence.arm(seconds)

    def _send_abort(self, reason: int) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(abort_pdu(reason))

    async def _read_pdu_header(self) -> tuple[int, int]:
        pdu_type, _, length = _PDU_HEADER.unpack(await self.reader.readexactly(6))
        return pdu_type, length

    async def _negotiate(self) -> bool:
        pdu_type, length = await self._read_pdu_header()
        if pdu_type != PDU_ASSOCIATE_RQ or length > MAX_CONTROL_BYTES:
            raise _AbortAssociation(ABORT_UNEXPECTED_PDU, f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type}")
        body = await self.reader.readexactly(length)
        over_limit = len(self.server.associations) > self.server.options.maximum_associations
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
        self.writer.write(negotiation.reply)
        if not negotiation.accepted:
            refused_for_disk = low_disk is not None and negotiation.reason == low_disk
            log.log(
                logging.WARNING if refused_for_disk else logging.INFO,
                "association from %s (%s) rejected: %s",
                self.calling_ae,
                self.peer,
                negotiation.reason,
            )
            await self.writer.drain()
            if refused_for_disk:
                await self.server.record_refused_association(self.sender, self.peer, negotiation.reason)
            return False
        self.contexts = negotiation.contexts
        self.peer_maximum_pdu_length = negotiation.peer_maximum_pdu_length
        return True

    async def _serve_messages(self) -> str:
        idle = self.server.options.idle_timeout
        while True:
            self._arm(idle)
            pdu_type, length = await self._read_pdu_header()
            if pdu_type == PDU_P_DATA_TF:
                await self._p_data(length)
            elif pdu_type == PDU_RELEASE_RQ:
                await self.reader.readexactly(length)
                if self.data_set is not None or self.command_bytes:
                    raise _AbortAssociation(ABORT_UNEXPECTED_PDU, "A-RELEASE-RQ in the middle of a message")
                self.writer.write(release_response_pdu())
                await self.writer.drain()
                return "released"
            elif pdu_type == PDU_ABORT:
                await self.reader.readexactly(length)
                return "aborted"
            else:
                raise _AbortAssociation(ABORT_UNEXPECTED_PDU, f"unexpected PDU type 0x{pdu_type:02X}")

    async def _p_data(self, length: int) -> None:
        remaining = length
        read = self.reader.readexactly
        idle = self.server.options.idle_timeout
        while remaining:
            if remaining < 6:
                raise _AbortAssociation(ABORT_INVALID_PARAMETER, "P-DATA-TF ends inside a PDV item header")
            item_length, context_id, control = _PDV_HEADER.unpack(await read(6))
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
                self.command_bytes += await read(size)
                if last:
                    await self._command_complete(context_id)
                continue
            if self.command is None:
                raise _AbortAssociation(ABORT_UNEXPECTED_PDU, "data set fragment without a command")
            while size:  # data set fragment: straight to the file, a chunk at a time
                chunk = await self.reader.read(min(size, READ_CHUNK))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", size)
                size -= len(chunk)
                if self.data_set is not None:
                    self.data_set.write(chunk)
                self._arm(idle)
            if last:
                await self._data_set_complete(context_id)

    async def _command_complete(self, context_id: int) -> None:
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

    async def _data_set_complete(self, context_id: int) -> None:
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
            await self.server.refuse(self.sender, command, reason)
            self._respond(context_id, command, STATUS_OUT_OF_RESOURCES, reason)
            return
        self._arm(None)  # our own work, however slow the disk or index, is not the peer's silence
        status, comment = await self.server.store(data_set, self.sender)
        self._respond(context_id, command, status, comment)

    def _respond(self, context_id: int, command: Command, status: int, comment: str | None = None) -> None:
        response = encode_response(
            command,
            status,
            include_instance=command.command_field != C_ECHO_RQ,
            error_comment=comment if status != STATUS_SUCCESS else None,
        )
        self.writer.write(command_pdus(context_id, response, self.peer_maximum_pdu_length))
