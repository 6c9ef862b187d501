"""Log lines from hostile values: control characters escaped, repeats held back, tracebacks cut."""

from __future__ import annotations

import io
import logging
import time

from pacs_ai.logging_setup import FORMAT, SafeLines, escape_control_characters


def _logger(safe: SafeLines) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(safe)
    second = logging.StreamHandler(io.StringIO())  # a second handler must not count lines twice
    second.addFilter(safe)
    logger = logging.getLogger(f"test.safe.{id(safe)}")
    logger.handlers[:] = [handler, second]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, out


def test_cr_lf_in_an_ae_title_cannot_forge_a_line() -> None:
    logger, out = _logger(SafeLines())
    logger.info("association from %s", "EVIL\r\n2026-01-01 CRITICAL forged\x1b[31m")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert "EVIL\\r\\n2026-01-01 CRITICAL forged\\x1b[31m" in lines[0]
    assert escape_control_characters("a\u2028b\x85") == "a\\u2028b\\x85"


def test_repeated_lines_are_held_back_and_counted() -> None:
    safe = SafeLines(repeats=5, window=0.2)
    logger, out = _logger(safe)
    for number in range(1000):
        logger.warning("refused %s", number)
    assert len(out.getvalue().splitlines()) == 5
    time.sleep(0.25)
    logger.warning("refused %s", "after the window")
    last = out.getvalue().splitlines()[-1]
    assert last.endswith("[995 similar lines held back]")
    logger.info("another kind of line")
    assert len(out.getvalue().splitlines()) == 7


def test_a_recursion_error_traceback_is_cut() -> None:
    logger, out = _logger(SafeLines())

    def deep(level: int) -> None:
        deep(level + 1) if level < 10_000 else None

    try:
        deep(0)
    except RecursionError:
        logger.exception("decoding failed")
    assert len(out.getvalue().splitlines()) <= 45
    assert "traceback lines left out" in out.getvalue() or "RecursionError" in out.getvalue()


def test_a_megabyte_value_makes_one_short_line() -> None:
    logger, out = _logger(SafeLines())
    logger.warning("rejected: %s", "1.2." * 250_000)
    text = out.getvalue()
    assert len(text.splitlines()) == 1 and len(text) < 5000
