"""Log set-up for every command: human lines, or (``--log-format json``) one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# what every LogRecord has; anything else on a record came from ``extra=`` (run_id, node_id, attempt, ...)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra}``; an exception's traceback under ``exc_info``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        tb = extra.get("traceback")
        if isinstance(tb, str) and tb.strip() and message.endswith(tb.rstrip()):
            message = message[: -len(tb.rstrip())].rstrip()  # the text format appends it; here it is a field
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "message": message, **extra,
        }
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack_info"] = record.stack_info
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: int, log_format: LogFormat = LogFormat.TEXT) -> None:
    """Configure the root logger once, to stderr (arq's and redis's loggers included)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == LogFormat.JSON else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
