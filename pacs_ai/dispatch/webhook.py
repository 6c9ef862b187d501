"""Webhook calls (routing rules' ``notify``): a JSON POST signed with HMAC-SHA256.

Each call carries two headers, so the receiver knows the call comes from
pacs-ai and was not replayed:

* ``X-PACS-AI-Timestamp``: seconds since the epoch when the call was signed;
* ``X-PACS-AI-Signature``: ``sha256=`` and the lower-case hex HMAC-SHA256, keyed
  with the ``webhook_signing_secret`` setting, of the timestamp, a full stop and
  the request body exactly as received (``f"{timestamp}.".encode() + body``).

A receiver recomputes the HMAC over the raw body, compares in constant time and
refuses timestamps older than a few minutes (:func:`verify_signature` does all
three).  The URL may carry a token of its own: it is sent, but audit records and
logs show the URL without query values (:mod:`pacs_ai.redact`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import requests

from pacs_ai.config import Settings, revealed
from pacs_ai.keyfile import load_or_create_key

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "post_webhook",
    "sign",
    "verify_signature",
    "webhook_key",
]

SIGNATURE_HEADER = "X-PACS-AI-Signature"
TIMESTAMP_HEADER = "X-PACS-AI-Timestamp"
#: Where the signing key is kept when the ``webhook_signing_secret`` setting is not set.
KEY_FILE = "webhook-signing.key"


def webhook_key(settings: Settings) -> str:
    """The signing key: the ``webhook_signing_secret`` setting, else the one kept in the data directory."""
    return revealed(settings.webhook_signing_secret) or load_or_create_key(settings.data_dir / KEY_FILE)


def sign(key: str, timestamp: int, body: bytes) -> str:
    """The ``X-PACS-AI-Signature`` value of ``body`` signed at ``timestamp``."""
    mac = hmac.new(key.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    key: str, headers: Mapping[str, str], body: bytes, *, max_age_seconds: float = 300.0
) -> bool:
    """Whether a received call is signed with ``key`` and fresh; for receivers (and the tests)."""
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    signature = headers.get(SIGNATURE_HEADER, "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > max_age_seconds:
        return False
    return hmac.compare_digest(sign(key, int(timestamp), body), signature)


def post_webhook(
    url: str, payload: Mapping[str, Any], key: str, *, timeout: float = 10.0
) -> requests.Response:
    """POST ``payload`` as JSON to ``url``, signed; raises :class:`requests.RequestException` on failure."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(key, timestamp, body),
    }
    response = requests.post(url, data=body, headers=headers, timeout=timeout)
    response.raise_for_status()
    return response
