"""Logging for every pacs-ai process: one line format, to stderr and to the data directory.

Log lines carry UIDs, accession numbers and AE titles, never patient names.
Those values come from senders, so every line goes through
:class:`SafeLines`: control characters are escaped (a CR/LF in a UID or AE
title cannot forge a line of its own) and a line repeated more than
:data:`REPEATS_PER_WINDOW` times in :data:`WINDOW_SECONDS` is held back and
counted (a flood of hostile associations cannot fill the disk with logs).
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
import threading
import time
import traceback
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"

#: Lines of one kind (logger, level, message template) written per window; the rest are counted.
REPEATS_PER_WINDOW = 20
WINDOW_SECONDS = 60.0
#: Longest traceback written (lines); a RecursionError's would run to thousands.
TRACEBACK_LINES = 40
#: Longest message written (characters); a hostile value may be megabytes long.
MESSAGE_CHARACTERS = 4000

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control_characters(text: str) -> str:
    """``text`` with every control character (CR, LF, ESC, ...) written as ``\\xNN`` or ``\\uNNNN``."""
    return _CONTROL.sub(lambda match: match.group(0).encode("unicode_escape").decode("ascii"), text)


class SafeLines(logging.Filter):
    """Escapes control characters, cuts long messages and tracebacks, and rate-limits repeated lines.

    One instance is shared by all handlers of a process; each record is
    judged once (the verdict is kept on the record for the next handler).
    """

    def __init__(self, repeats: int = REPEATS_PER_WINDOW, window: float = WINDOW_SECONDS) -> None:
        super().__init__()
        self.repeats = repeats
        self.window = window
        self._lock = threading.Lock()
        #: (logger, level, template) -> [window start, lines written, lines held back]
        self._kinds: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        verdict = getattr(record, "_pacs_ai_verdict", None)
        if verdict is not None:
            return bool(verdict)
        suppressed = self._count(record)
        verdict = suppressed is not None
        if verdict:
            self._make_safe(record, int(suppressed or 0))
        record._pacs_ai_verdict = verdict
        return verdict

    def _count(self, record: logging.LogRecord) -> float | None:
        """Lines of this kind held back since the last one written; None to hold this one back."""
        key = (record.name, record.levelno, str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            if len(self._kinds) > 10_000:
                self._kinds.clear()
            kind = self._kinds.setdefault(key, [now, 0, 0])
            if now - kind[0] >= self.window:
                held_back = kind[2]
                kind[:] = [now, 1, 0]
                return held_back
            if kind[1] >= self.repeats:
                kind[2] += 1
                return None
            kind[1] += 1
            return 0

    @staticmethod
    def _make_safe(record: logging.LogRecord, held_back: int) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg!r} {record.args!r}"
        if len(message) > MESSAGE_CHARACTERS:
            message = f"{message[:MESSAGE_CHARACTERS]}...({len(message)} characters)"
        message = escape_control_characters(message)
        if held_back:
            message = f"{message} [{held_back} similar lines held back]"
        record.msg, record.args = message, None
        if record.exc_info and record.exc_info[1] is not None:
            lines = "".join(traceback.format_exception(*record.exc_info)).splitlines()
            if len(lines) > TRACEBACK_LINES:
                kept = TRACEBACK_LINES // 2
                lines = [
                    *lines[:kept],
                    f"... {len(lines) - 2 * kept} traceback lines left out ...",
                    *lines[-kept:],
                ]
            record.exc_text = "\n".join(escape_control_characters(line) for line in lines)
            record.exc_info = None


def configure_logging(level: str, log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # Several processes append to one file; WatchedFileHandler reopens it
        # after an external logrotate moves it, which is how sites rotate logs.
        handlers.append(logging.handlers.WatchedFileHandler(log_file, encoding="utf-8"))
    safe_lines = SafeLines()
    for handler in handlers:
        handler.addFilter(safe_lines)
    logging.basicConfig(level=level.upper(), format=FORMAT, handlers=handlers, force=True)
    quiet_noisy_libraries()


def quiet_noisy_libraries() -> None:
    """Keep libraries that narrate at INFO to warnings and errors."""
    # pynetdicom logs every PDU; highdicom every attribute it copies.
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
