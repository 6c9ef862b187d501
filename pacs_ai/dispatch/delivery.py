"""Delivering results to their destinations, with the outcome recorded in the index.

A delivery is one result (SEG or SR) for one destination.  It stays PENDING
while attempts remain and becomes FAILED when the destination's retries are
exhausted; nothing is dropped, and an administrator can replay it.  Sending
the same result twice is harmless: its SOP Instance UID is fixed, so the PACS
replaces or ignores the second copy instead of holding two.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from pacs_ai import metrics
from pacs_ai.config import Settings
from pacs_ai.dispatch.errors import DeliveryError
from pacs_ai.dispatch.senders import send
from pacs_ai.index.audit import record_audit
from pacs_ai.index.db import session_scope
from pacs_ai.index.models import Delivery, DeliveryState, Result, utcnow
from pacs_ai.peer_settings import Destination
from pacs_ai.storage.base import StorageError
from pacs_ai.storage.files import HostFiles

log = logging.getLogger(__name__)

#: How long a delivery handed to the broker may take before it is handed again.
DELIVERY_LEASE = timedelta(minutes=5)


def lease_expiry() -> datetime:
    """When a delivery just handed to the broker counts as lost if still pending."""
    return utcnow() + DELIVERY_LEASE


def attempt_delivery(settings: Settings, sessions: sessionmaker[Session], delivery_id: int) -> bool:
    """Try one delivery once and record the outcome (and when to retry); True if delivered."""
    with session_scope(sessions) as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            raise LookupError(f"delivery {delivery_id} does not exist")
        if delivery.state == DeliveryState.SENT:
            return True
        result = session.get(Result, delivery.result_fk)
        assert result is not None
        destination_name, key, sop_uid = delivery.destination, result.path, result.sop_instance_uid

    started = time.monotonic()
    destination = settings.destinations.get(destination_name)
    error: DeliveryError | None
    if destination is None:
        error = DeliveryError(f"destination {destination_name!r} is not configured")
    else:
        try:
            # From the storage (the worker that made it may be on another host), via this host's cache.
            path = HostFiles(settings).local_path(key)
            send(destination, [path], calling_ae_title=settings.ae_title)
            error = None
        except StorageError as exc:
            error = DeliveryError(f"the result cannot be read from the storage: {exc}")
        except DeliveryError as exc:
            error = exc
        except (OSError, RuntimeError, ValueError) as exc:
            error = DeliveryError(f"{type(exc).__name__}: {exc}")

    with session_scope(sessions) as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        delivery.attempts += 1
        if error is None:
            delivery.state = DeliveryState.SENT
            delivery.last_status = 0x0000
            delivery.last_error = None
            delivery.sent_at = utcnow()
            delivery.next_attempt_at = None
            record_audit(
                session,
                actor="dispatcher",
                action="result.sent",
                object_type="result",
                object_uid=sop_uid,
                detail={"destination": destination_name},
            )
            metrics.delivery_attempted(destination_name, "sent", time.monotonic() - started)
            return True

        delivery.last_status = error.status
        delivery.last_error = str(error)
        max_retries = destination.max_retries if destination else 0
        if delivery.attempts > max_retries:
            delivery.state = DeliveryState.FAILED
            delivery.next_attempt_at = None
            retry_in = None
        else:
            backoff = destination.retry_backoff_seconds if destination else 0.0
            retry_in = backoff * (2 ** (delivery.attempts - 1))
            delivery.next_attempt_at = utcnow() + timedelta(seconds=retry_in)
        record_audit(
            session,
            actor="dispatcher",
            action="result.send_failed",
            object_type="result",
            object_uid=sop_uid,
            detail={
                "destination": destination_name,
                "attempt": delivery.attempts,
                "status": _shown_status(error.status, destination),
                "error": str(error),
                "will_retry": retry_in is not None,
            },
        )
        log.warning(
            "delivery of %s to %s failed (attempt %d): %s",
            sop_uid,
            destination_name,
            delivery.attempts,
            error,
        )
        state = "retrying" if retry_in is not None else "failed"
        metrics.delivery_attempted(destination_name, state, time.monotonic() - started)
        return False


def _shown_status(status: int | None, destination: Destination | None) -> str | None:
    """A DICOM status in hex as DICOM writes it; an HTTP status as a number."""
    if status is None:
        return None
    return str(status) if destination is not None and destination.type == "dicomweb" else f"0x{status:04X}"
