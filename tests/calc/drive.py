#!/usr/bin/python3
"""Drives a headless LibreOffice Calc for tests/it/calc.rs: starts one soffice on a throw-away
profile, installs clients/calc/xpand.oxt into it, opens a copy of clients/calc/sample.ods, then
answers commands, one JSON object a line on stdin, with one JSON line each on stdout.

  /usr/bin/python3 tests/calc/drive.py PROFILE_DIR OXT DOC    (env: XPAND_URL, XPAND_API_KEY)

Commands ({"cmd": ...}):
  run      {sheet, formula, target, timeout}: enter `formula` as an array formula over `target`,
           then read it until no cell shows the placeholder; returns the cells and the times from
           entering it to the first and to the last value shown, and whether a first row was
           seen filled while the last row still waited.
  set      {sheet, formula, target}: enter the array formula, read it once (headless Calc
           computes a formula when it is read) and return what it shows.
  read     {sheet, range}: the cells.
  put      {sheet, cell, value}: one cell (a number, text, or null for empty).
  fill     {sheet, origin, rows}: write a block of numbers starting at `origin`.
  clear    {sheet, range}: delete what the cells hold (an array formula included).
  quit
Run with `make-sample OUT.ods` instead, it writes the sample sheet (see sample_rows).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import uno
import unohelper
from com.sun.star.beans import PropertyValue
from com.sun.star.task import XInteractionHandler
from com.sun.star.ucb import XCommandEnvironment, XProgressHandler

PLACEHOLDER = "\u2026"


def prop(name, value):
    p = PropertyValue()
    p.Name, p.Value = name, value
    return p


class Installing(unohelper.Base, XCommandEnvironment, XInteractionHandler, XProgressHandler):
    """The command environment an extension install needs: approves what it asks (the
    extension is ours), remembers what went wrong, shows no progress."""

    def __init__(self):
        self.problems = []

    def getInteractionHandler(self):
        return self

    def getProgressHandler(self):
        return self

    def handle(self, request):
        try:
            self.problems.append(repr(request.getRequest()))
        except Exception as e:  # pyuno cannot always convert the request
            self.problems.append(f"(unreadable request: {e})")
        approve = uno.getTypeByName("com.sun.star.task.XInteractionApprove")
        for continuation in request.getContinuations():
            if continuation.queryInterface(approve) is not None:
                continuation.select()
                return

    def push(self, status):
        pass

    def update(self, status):
        pass

    def pop(self):
        pass


class Office:
    def __init__(self, profile):
        self.profile = os.path.abspath(profile)
        os.makedirs(self.profile, exist_ok=True)
        pipe = f"xpand-calc-{os.getpid()}"
        self.log = open(os.path.join(self.profile, "soffice.log"), "wb")
        self.process = subprocess.Popen(
            ["soffice", "--headless", "--invisible", "--nologo", "--norestore", "--nodefault",
             "--nolockcheck", f"-env:UserInstallation=file://{self.profile}",
             f"--accept=pipe,name={pipe};urp;StarOffice.ComponentContext"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # soffice is a wrapper around soffice.bin: end the group
        )
        local = uno.getComponentContext()
        resolver = local.ServiceManager.createInstanceWithContext(
            "com.sun.star.bridge.UnoUrlResolver", local)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.ctx = resolver.resolve(
                    f"uno:pipe,name={pipe};urp;StarOffice.ComponentContext")
                break
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("soffice did not start; see soffice.log in the profile")
                time.sleep(0.1)
        self.smgr = self.ctx.ServiceManager
        self.desktop = self.smgr.createInstanceWithContext("com.sun.star.frame.Desktop", self.ctx)

    def install(self, oxt):
        """Adds the extension to this profile (what `unopkg add` does; unopkg refuses to run as
        root on a user profile, the extension manager inside soffice does not)."""
        manager = self.ctx.getValueByName(
            "/singletons/com.sun.star.deployment.ExtensionManager")
        abort = manager.createAbortChannel()
        url = uno.systemPathToFileUrl(os.path.abspath(oxt))
        env = Installing()
        try:
            added = manager.addExtension(url, (), "user", abort, env)
            if env.problems:
                print(f"drive.py: installing asked {env.problems}", file=sys.stderr)
            return added
        except Exception as e:
            raise RuntimeError(f"installing {oxt} failed: {e.Message}: {env.problems}") from None

    def open(self, path):
        url = uno.systemPathToFileUrl(os.path.abspath(path))
        return self.desktop.loadComponentFromURL(url, "_blank", 0, (prop("Hidden", True),))

    def quit(self):
        try:
            self.desktop.terminate()
        except Exception:
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of this soffice (its group is its own)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cells(doc, sheet, range_):
    return [list(row) for row in doc.Sheets.getByName(sheet).getCellRangeByName(range_).getDataArray()]


def filled(value):
    return not isinstance(value, str)


def run(doc, sheet, formula, target, timeout):
    area = doc.Sheets.getByName(sheet).getCellRangeByName(target)
    start = time.monotonic()
    area.setArrayFormula(formula)
    first = last = None
    progressive = False
    polls = 0
    while True:
        data = area.getDataArray()
        polls += 1
        now = time.monotonic() - start
        values = [v for row in data for v in row]
        error = isinstance(values[0], str) and values[0].startswith("#XPAND!")
        if first is None and any(filled(v) for v in values):
            first = now
        if filled(data[0][0]) and not all(filled(v) for v in data[-1]):
            progressive = True
        if error or all(filled(v) for v in values):
            last = now
            break
        if now > timeout:
            break
        time.sleep(0.005)
    return {"cells": [list(r) for r in data], "first_s": first, "last_s": last,
            "progressive": progressive, "polls": polls, "timed_out": last is None}


def sample_rows(rows, columns, seed):
    """Seasonal-ish rows with two decimals (short in JSON, like typed-in data)."""
    return [[round(100 + 10 * ((r * seed) % 17) + 0.5 * t + 8 * math.sin(t * math.pi / 6 + r), 2)
             for t in range(columns)] for r in range(rows)]


def make_sample(out):
    """The committed clients/calc/sample.ods: sheet "Data", 40 rows of 48 monthly values at
    A1:AV40, and room to the right for the forecasts."""
    profile = f"/tmp/xpand-calc-sample-{os.getpid()}"
    office = Office(profile)
    try:
        doc = office.desktop.loadComponentFromURL("private:factory/scalc", "_blank", 0,
                                                  (prop("Hidden", True),))
        sheet = doc.Sheets.getByIndex(0)
        sheet.Name = "Data"
        sheet.getCellRangeByName("A1:AV40").setDataArray(
            tuple(tuple(r) for r in sample_rows(40, 48, 7)))
        doc.storeToURL(uno.systemPathToFileUrl(os.path.abspath(out)),
                       (prop("FilterName", "calc8"),))
        doc.close(True)
    finally:
        office.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main():
    if sys.argv[1] == "make-sample":
        make_sample(sys.argv[2])
        return
    profile, oxt, doc_path = sys.argv[1:4]
    started = time.monotonic()
    office = Office(profile)
    office.install(oxt)
    copy = os.path.join(office.profile, "sheet.ods")
    shutil.copy(doc_path, copy)
    doc = office.open(copy)
    print(json.dumps({"ready": True, "startup_s": time.monotonic() - started,
                      "office_pid": office.process.pid}), flush=True)
    try:
        for line in sys.stdin:
            command = json.loads(line)
            cmd = command["cmd"]
            try:
                if cmd == "quit":
                    print(json.dumps({"ok": True}), flush=True)
                    break
                sheet = command.get("sheet", "Data")
                if cmd == "run":
                    answer = run(doc, sheet, command["formula"], command["target"],
                                 command.get("timeout", 30))
                elif cmd == "set":
                    area = doc.Sheets.getByName(sheet).getCellRangeByName(command["target"])
                    area.setArrayFormula(command["formula"])
                    # Calc computes a formula when something reads it (a GUI: when it paints).
                    answer = {"cells": [list(r) for r in area.getDataArray()]}
                elif cmd == "read":
                    answer = {"cells": cells(doc, sheet, command["range"])}
                elif cmd == "put":
                    cell = doc.Sheets.getByName(sheet).getCellRangeByName(command["cell"])
                    value = command["value"]
                    if value is None:
                        cell.setString("")
                    elif isinstance(value, str):
                        cell.setString(value)
                    else:
                        cell.setValue(value)
                    answer = {"ok": True}
                elif cmd == "fill":
                    rows = command["rows"]
                    top = doc.Sheets.getByName(sheet).getCellRangeByName(command["origin"])
                    a = top.getRangeAddress()
                    area = doc.Sheets.getByName(sheet).getCellRangeByPosition(
                        a.StartColumn, a.StartRow, a.StartColumn + len(rows[0]) - 1,
                        a.StartRow + len(rows) - 1)
                    area.setDataArray(tuple(tuple(float(v) for v in r) for r in rows))
                    answer = {"ok": True}
                elif cmd == "clear":
                    area = doc.Sheets.getByName(sheet).getCellRangeByName(command["range"])
                    area.clearContents(1 | 2 | 4 | 16)  # values, dates, strings, formulas
                    answer = {"ok": True}
                elif cmd == "sheet":
                    sheets = doc.Sheets
                    if not sheets.hasByName(command["name"]):
                        sheets.insertNewByName(command["name"], sheets.getCount())
                    answer = {"ok": True}
                else:
                    answer = {"error": f"unknown command {cmd}"}
            except Exception as e:  # reported, the session goes on
                answer = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(answer), flush=True)
    finally:
        office.quit()


if __name__ == "__main__":
    main()
