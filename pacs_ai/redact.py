"""Secrets out of text: URLs, audit details and log messages say where, never with which credential.

A URL may carry a password (``postgresql://user:PASSWORD@host/db``) or a token
in its query string (``https://ris/hook?token=...``); the error text of an HTTP
client repeats the URL.  Before such text is written anywhere that outlives the
request (the audit table, a log line, ``pacs-ai status``), it goes through
:func:`redact_text`: the password of a URL's user info and the value of every
query parameter become :data:`REDACTED`.  Mappings (audit details) are
redacted key by key with :func:`redact_mapping`: values under a key that names
a credential are replaced whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "redact_mapping", "redact_text", "redact_url"]

REDACTED = "***"

#: ``scheme://user:password@`` (the password is group 2).
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(?P<secret>[^@\s/]+)(?=@)")
#: ``?name=value`` or ``&name=value`` (the value up to the next ``&``, ``#``, space or quote).
_QUERY_VALUE = re.compile(r"(?P<head>[?&][^=&#\s'\"]+=)(?P<secret>[^&#\s'\"]+)")
#: Keys of a mapping whose values are credentials, whatever they hold.
_SECRET_KEY = re.compile(
    r"(?:^|[_-])(?:password|passwd|secret|token|api[_-]?key|authorization|credentials?)(?:$|[_-])", re.I
)


def redact_text(text: str) -> str:
    """``text`` with URL passwords and query parameter values replaced by :data:`REDACTED`."""
    text = _USERINFO.sub(lambda m: m.group("head") + REDACTED, text)
    return _QUERY_VALUE.sub(lambda m: m.group("head") + REDACTED, text)


def redact_url(url: str) -> str:
    """A URL fit for logs and audit records: no password, no query values (:func:`redact_text`)."""
    return redact_text(url)


def redact_mapping(value: Any) -> Any:
    """A JSON-like value without credentials: secret-named keys' values whole, strings redacted."""
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _SECRET_KEY.search(str(key)) and item is not None else redact_mapping(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_mapping(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
