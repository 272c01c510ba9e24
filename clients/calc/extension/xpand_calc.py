"""The Calc add-in behind XPAND.FORECAST(range; horizon; [level]): a UNO component in Python.

Calc calls `forecast` on its main thread, so it only reads the range, starts (or finds) the job
and returns at once; the job runs on the gateway thread (`xpand_client`). It returns a volatile
result (com.sun.star.sheet.XVolatileResult): its listeners are told as rows arrive, and Calc
then calls `forecast` again with the same arguments. So results are cached per argument set: a
second call gets the same object, and a recalculation with changed data replaces (and cancels)
the job of the same range, horizon and level. A formula deleted while its job runs is noticed
by the watcher (the range no longer has a forecast depending on it) and its job is canceled.
A refusal that may pass (402: the balance is short; 429) is not kept: recalculating the same
values a second or more later submits again.
"""

import threading
import time

import uno
import unohelper
from com.sun.star.sheet import XVolatileResult

import xpand_client
import xpand_forecast

IMPLEMENTATION = "dev.xpand.calc.Forecast"
# At most this often are Calc's listeners told of new rows (Calc recalculates after each).
NOTIFY_INTERVAL = 0.1
# How often a running job checks that its formula still exists.
WATCH_INTERVAL = 0.5


class Result(unohelper.Base, XVolatileResult):
    """The volatile result of one `forecast` call: a job and the listeners showing it."""

    def __init__(self, range_, forecast):
        self.range = range_
        self.forecast = forecast
        self.listeners = []
        self.lock = threading.Lock()
        self.started = time.monotonic()

    def addResultListener(self, listener):
        with self.lock:
            self.listeners.append(listener)
        listener.modified(self.event())  # the current value, at once (Calc reads it now)

    def removeResultListener(self, listener):
        with self.lock:
            if listener in self.listeners:
                self.listeners.remove(listener)
            alone = not self.listeners
        if alone:  # the document was closed
            self.stop()

    def event(self):
        event = uno.createUnoStruct("com.sun.star.sheet.ResultEvent")
        event.Source = self
        event.Value = uno.Any("[][]any", self.forecast.cells())
        return event

    def notify(self):
        with self.lock:
            listeners = list(self.listeners)
        if not listeners:
            return
        event = self.event()
        for listener in listeners:
            try:
                listener.modified(event)
            except Exception:  # a listener of a closed document
                with self.lock:
                    if listener in self.listeners:
                        self.listeners.remove(listener)

    def stop(self):
        """Cancels the job if it still runs."""
        if not self.forecast.finished():
            xpand_client.GATEWAY.cancel(self.forecast)
            with self.forecast.lock:
                self.forecast.status = "canceled"

    def formula_exists(self):
        """Whether a forecast formula still reads this range (the watcher's question)."""
        try:
            dependents = self.range.queryDependents(False)
            for i in range(dependents.getCount()):
                formula = dependents.getByIndex(i).getCellByPosition(0, 0).getFormula()
                if "FORECAST(" in formula.upper():
                    return True
            return False
        except Exception:  # the document is gone
            return False


class Watcher:
    """One thread that tells listeners of new rows (at most every NOTIFY_INTERVAL per result)
    and cancels the jobs of formulas that were deleted."""

    def __init__(self):
        self.lock = threading.Condition()
        self.dirty = {}  # id -> Result
        self.running = {}  # id -> Result
        self.thread = None

    def changed(self, result):
        with self.lock:
            self.dirty[id(result)] = result
            self.lock.notify()

    def watch(self, result):
        with self.lock:
            self.running[id(result)] = result
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="xpand-watcher", daemon=True)
                self.thread.start()

    def run(self):
        last_watch = time.monotonic()
        while True:
            with self.lock:
                if not self.dirty:
                    self.lock.wait(WATCH_INTERVAL)
                dirty = list(self.dirty.values())
                self.dirty.clear()
            for result in dirty:
                result.notify()
            now = time.monotonic()
            if now - last_watch >= WATCH_INTERVAL:
                last_watch = now
                self.check_formulas(now)
            if dirty:
                time.sleep(NOTIFY_INTERVAL)

    def check_formulas(self, now):
        with self.lock:
            running = list(self.running.items())
        for key, result in running:
            if result.forecast.finished():
                with self.lock:
                    self.running.pop(key, None)
            elif now - result.started > WATCH_INTERVAL and not result.formula_exists():
                result.stop()
                forget(result)
                with self.lock:
                    self.running.pop(key, None)


WATCHER = Watcher()
# (range name, horizon, level) -> (hash of the range's values, Result)
RESULTS = {}
RESULTS_LOCK = threading.Lock()


def forget(result):
    with RESULTS_LOCK:
        for slot, (_, cached) in list(RESULTS.items()):
            if cached is result:
                del RESULTS[slot]


def forecast(range_, horizon, level):
    """XPAND.FORECAST: the cached result of these arguments, or a new job's."""
    try:
        address = range_.getRangeAddress()
        name = range_.AbsoluteName
        data = range_.getDataArray()
    except Exception as e:  # not a reference: nothing to read
        return failed(("bad range", repr(range_)), f"range must be a cell range ({e})")
    try:
        level = xpand_forecast.parse_level(level)
    except ValueError as e:
        return failed((name, horizon, repr(level)), str(e))
    slot = (name, horizon, level)
    fingerprint = hash(data)
    with RESULTS_LOCK:
        cached = RESULTS.get(slot)
        if cached and cached[0] == fingerprint and not cached[1].forecast.may_retry():
            return cached[1]
        origin = (address.StartColumn, address.StartRow)
        job = xpand_forecast.Forecast(data, origin, horizon, level, lambda _: None)
        result = Result(range_, job)
        job.changed = lambda _job: WATCHER.changed(result)
        RESULTS[slot] = (fingerprint, result)
    if cached:  # the same range recalculated with other values: one job per range
        cached[1].stop()
    WATCHER.watch(result)
    xpand_client.GATEWAY.follow(job)
    return result


_ADDIN_CLASS = []


def create_addin(ctx):
    """The add-in object. Its class is made on first use: the interface it implements comes
    from the extension's own type library, which is not loaded yet while LibreOffice imports
    this module to register the extension."""
    if not _ADDIN_CLASS:
        from dev.xpand.calc import XForecast

        class ForecastAddIn(unohelper.Base, XForecast):
            def __init__(self, ctx):
                self.ctx = ctx

            def forecast(self, range_, horizon, level):
                return forecast(range_, horizon, level)

        _ADDIN_CLASS.append(ForecastAddIn)
    return _ADDIN_CLASS[0](ctx)


_FAILED = {}


def failed(key, message):
    """A result that only shows `message`; cached, so Calc's recalculation finds it again."""
    with RESULTS_LOCK:
        if key not in _FAILED:
            job = xpand_forecast.Forecast(((),), (0, 0), 1, None, lambda _: None)
            job.message = message
            job.status = "refused"
            _FAILED[key] = Result(None, job)
        return _FAILED[key]


g_ImplementationHelper = unohelper.ImplementationHelper()
g_ImplementationHelper.addImplementation(create_addin, IMPLEMENTATION, ("com.sun.star.sheet.AddIn",))
