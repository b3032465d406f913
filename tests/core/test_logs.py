"""The CLI's log handler: it writes to the stderr of the moment, so a swapped stderr never breaks logging."""

import io
import logging
import sys

from services.core.logs import setup_logging


def test_log_lines_follow_sys_stderr_when_it_is_swapped(monkeypatch):
    setup_logging("INFO")
    try:
        first, second = io.StringIO(), io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        logging.getLogger("rpo.test").info("line one")
        assert "line one" in first.getvalue()
        first.close()  # what pytest does to a finished test's capture stream
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("rpo.test").info("line two")
        assert "line two" in second.getvalue() and "Logging error" not in second.getvalue()
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_rpo", False)]:
            root.removeHandler(handler)
