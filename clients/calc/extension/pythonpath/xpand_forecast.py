"""What XPAND.FORECAST computes, without UNO: the job a range becomes, the output's layout, and
the messages a failure shows in the sheet.

Layout of the output (an array formula over the rows of the input range):
for each input row, `horizon` forecast columns; with a level, then `horizon` lower-bound columns
and `horizon` upper-bound columns (3 x horizon columns in all). A row the gateway has not sent
yet shows PLACEHOLDER in each of its cells; a failure shows "#XPAND! <why>" in the top-left cell
and leaves the others empty.
"""

import re
import threading
import time
import uuid

import xpand_client

PLACEHOLDER = "\u2026"  # "…"
ERROR_PREFIX = "#XPAND! "

_CELL = re.compile(r"^input\.series\[(\d+)\]\[(\d+)\]$")
_ROW = re.compile(r"^input\.series\[(\d+)\]$")
_PARAM = re.compile(r"^params\.(\w+)$")
# Refusals that a later recalculation may not meet (the account topped up, the rate limit
# passed): a recalculation of the same values this long after one submits again.
RETRY_STATUSES = (402, 429)
RETRY_AFTER = 1.0


def column_name(index):
    """0 -> A, 25 -> Z, 26 -> AA."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(65 + rest) + name
    return name


def cell_name(column, row):
    return f"{column_name(column)}{row + 1}"


def parse_level(level):
    """The optional `level` argument: None when omitted or blank, else a number from 50 to 99
    (0.5 to 0.99 is read as a fraction). A single-cell reference arrives as a 1x1 array."""
    while isinstance(level, tuple) and len(level) == 1:
        level = level[0]
    if level is None or (isinstance(level, str) and not level.strip()):
        return None
    if isinstance(level, str):
        try:
            level = float(level)
        except ValueError:
            raise ValueError(f"level must be a number from 50 to 99, got {level!r}") from None
    if not isinstance(level, (int, float)) or isinstance(level, bool):
        raise ValueError("level must be a number from 50 to 99")
    if 0 < level < 1:
        level *= 100
    level = round(level, 6)
    return int(level) if level == int(level) else level


def cell_value(value):
    """A cell as the gateway reads it: a number, null for a blank, text as it is (the gateway
    refuses it, naming the cell)."""
    if isinstance(value, str):
        return None if not value.strip() else value
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return int(value)  # shorter JSON: a sheet of whole numbers is the common case
    return value


class Forecast(xpand_client.Follower):
    """One recalculation of one range: one job, its rows as they arrive, or why it failed.
    `changed` is called (from the gateway's thread) whenever what the cells show changes."""

    def __init__(self, data, origin, horizon, level, changed):
        self.key = "calc-" + uuid.uuid4().hex  # the idempotency key: one per recalculation
        self.data = data
        self.origin = origin  # (column, row) of the range's top-left cell
        self.horizon = horizon
        self.level = level
        self.changed = changed
        self.lock = threading.Lock()
        self.rows = [None] * len(data)
        self.message = None  # a failure, shown in the top-left cell
        self.trouble = None  # a connection problem being retried
        self.status = "submitting"
        self.job_id = None
        self.refused = None  # (HTTP status, when) of a problem the gateway answered

    @property
    def width(self):
        return self.horizon * (3 if self.level is not None else 1)

    def finished(self):
        return self.status in ("succeeded", "failed", "canceled", "refused")

    def submission(self):
        params = {"horizon": self.horizon}
        if self.level is not None:
            params["level"] = self.level
        config = xpand_client.GATEWAY.config or {}
        series = [[cell_value(v) for v in row] for row in self.data]
        return {
            "kind": "forecast",
            "input": {"series": series},
            "params": params,
            "max_fee": config.get("max_fee", xpand_client.DEFAULT_MAX_FEE),
        }

    def fail(self, message):
        with self.lock:
            self.message = message
            self.status = "refused"
        self.changed(self)

    # Follower: called from the gateway's thread.

    def on_partial(self, frame):
        offset = frame.get("offset", 0)
        self._fill(offset, frame.get("rows") or [], frame.get("intervals"))

    def on_finished(self, job):
        status = job.get("status")
        with self.lock:
            self.job_id = job.get("id", self.job_id)
            self.trouble = None
        if status == "succeeded":
            output = job.get("output") or {}
            self._fill(0, output.get("forecasts") or [], output.get("intervals"))
            with self.lock:
                self.status = "succeeded"
                if any(r is None for r in self.rows):
                    self.message = "the gateway's output has fewer rows than the range"
        elif status == "failed":
            error = job.get("error") or {}
            why = error.get("message") or error.get("detail") or error.get("code") or "unknown error"
            with self.lock:
                self.status = "failed"
                self.message = f"the job failed: {why}"
        else:
            with self.lock:
                self.status = "canceled"
                self.message = "the job was canceled"
        self.changed(self)

    def may_retry(self):
        """Whether a recalculation with the same values should submit again: the gateway
        refused for a reason that passes (402, 429), and not just now (Calc recalculates the
        formula right after it shows the refusal)."""
        with self.lock:
            if self.status != "refused" or self.refused is None:
                return False
            status, when = self.refused
            return status in RETRY_STATUSES and time.monotonic() - when >= RETRY_AFTER

    def on_problem(self, message, problem):
        with self.lock:
            self.status = "refused"
            self.refused = (problem.get("status"), time.monotonic())
            self.message = self.explain(message, problem)
        self.changed(self)

    def on_trouble(self, message):
        with self.lock:
            if self.finished():
                return
            self.trouble = message
        self.changed(self)

    def on_connected(self):
        with self.lock:
            if self.trouble is None:
                return
            self.trouble = None
        self.changed(self)

    def _fill(self, offset, forecasts, intervals):
        band = None
        if self.level is not None:
            band = next((i for i in intervals or [] if i.get("level") == self.level), None)
            if band is None and intervals:
                band = intervals[0]
        with self.lock:
            self.trouble = None
            self.status = "running"
            for i, row in enumerate(forecasts):
                r = offset + i
                if r >= len(self.rows):
                    break
                values = list(row)
                if self.level is not None:
                    if band is None:
                        self.message = "the gateway sent no prediction intervals"
                        continue
                    values += list(band["lower"][i]) + list(band["upper"][i])
                self.rows[r] = tuple(float(v) for v in values)
        self.changed(self)

    def explain(self, message, problem):
        """A refusal in the sheet's terms: `input.series[r][c]` becomes the cell's address."""
        errors = problem.get("errors") or []
        if not errors:
            return message
        column0, row0 = self.origin
        parts = []
        for error in errors[:3]:
            field, detail = error.get("field", ""), error.get("detail", "is invalid")
            if m := _CELL.match(field):
                r, c = int(m.group(1)), int(m.group(2))
                parts.append(f"{cell_name(column0 + c, row0 + r)} {detail}")
            elif m := _ROW.match(field):
                r = int(m.group(1))
                first = cell_name(column0, row0 + r)
                last = cell_name(column0 + len(self.data[r]) - 1, row0 + r)
                parts.append(f"row {row0 + r + 1} ({first}:{last}) {detail}")
            elif m := _PARAM.match(field):
                parts.append(f"{m.group(1)} {detail}")
            else:
                parts.append(f"{field} {detail}")
        if len(errors) > 3:
            parts.append(f"and {len(errors) - 3} more")
        return "; ".join(parts)

    def cells(self):
        """What the output area shows now: len(data) rows of `width` cells."""
        width = max(self.width, 1)
        with self.lock:
            if self.message is not None:
                blank = ("",) * width
                first = (ERROR_PREFIX + self.message,) + ("",) * (width - 1)
                return (first,) + (blank,) * (len(self.rows) - 1)
            waiting = (PLACEHOLDER,) * width
            out = [row if row is not None else waiting for row in self.rows]
            if self.trouble and self.rows and self.rows[0] is None:
                out[0] = (f"{PLACEHOLDER} {self.trouble}",) + waiting[1:]
            return tuple(out)
