"""berth's own log lines for `berth serve`, as llama-swap's logToStdout and logTimeFormat say."""

from __future__ import annotations

import datetime
import logging
import sys

from berth.config import BerthConfig

# llama-swap's logTimeFormat names (Go's time layouts) as strftime patterns; "{frac}" is the fraction.
_TIME_LAYOUTS = {
    "ansic": "%a %b %e %H:%M:%S %Y", "unixdate": "%a %b %e %H:%M:%S %Z %Y", "rubydate": "%a %b %d %H:%M:%S %z %Y",
    "rfc822": "%d %b %y %H:%M %Z", "rfc822z": "%d %b %y %H:%M %z", "rfc850": "%A, %d-%b-%y %H:%M:%S %Z",
    "rfc1123": "%a, %d %b %Y %H:%M:%S %Z", "rfc1123z": "%a, %d %b %Y %H:%M:%S %z",
    "rfc3339": "%Y-%m-%dT%H:%M:%S{zone}", "rfc3339nano": "%Y-%m-%dT%H:%M:%S.{frac9}{zone}",
    "kitchen": "%-I:%M%p", "stamp": "%b %e %H:%M:%S", "stampmilli": "%b %e %H:%M:%S.{frac3}",
    "stampmicro": "%b %e %H:%M:%S.{frac6}", "stampnano": "%b %e %H:%M:%S.{frac9}",
}
LOG_LINE = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _LayoutFormatter(logging.Formatter):
    """Timestamps in one of llama-swap's logTimeFormat layouts, in local time."""

    def __init__(self, layout: str) -> None:
        super().__init__(LOG_LINE)
        self.layout = _TIME_LAYOUTS[layout]

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.datetime.fromtimestamp(record.created).astimezone()
        offset = moment.strftime("%z")
        nanos = f"{moment.microsecond:06d}000"
        return moment.strftime(self.layout).format(
            zone="Z" if offset == "+0000" else f"{offset[:3]}:{offset[3:]}",
            frac3=nanos[:3], frac6=nanos[:6], frac9=nanos)


def configure_logging(config: BerthConfig, level: str) -> None:
    """berth's own lines on stdout as llama-swap's logToStdout says (proxy or both), else nowhere."""
    if config.log_to_stdout in ("upstream", "none"):
        logging.basicConfig(level=level, handlers=[logging.NullHandler()])
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_LayoutFormatter(config.log_time_format) if config.log_time_format else
                         logging.Formatter(LOG_LINE))
    logging.basicConfig(level=level, handlers=[handler])
