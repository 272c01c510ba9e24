"""The gateway side of the Calc extension: where the gateway is, and one WebSocket that carries
every job the open documents started.

One background thread owns the socket: it mints a token with the API key (`POST
/v1/auth/token`; a key never travels in a URL), opens `/v1/ws?token=...`, submits or
re-subscribes every job it follows, and hands each frame to that job's follower. When the socket
drops it reconnects with back-off and re-subscribes: submits carry an idempotency key, so one
resent after a drop gets the job the first created and charges nothing more. Nothing here ever
runs on Calc's main thread except `follow` and `cancel`, which only queue a frame.
"""

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

import xpand_ws

CONFIG_HINT = "set XPAND_URL and XPAND_API_KEY, or write ~/.config/xpand/calc.json"
DEFAULT_MAX_FEE = 10_000_000


def config_path():
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "xpand", "calc.json")


def load_config():
    """`{"url", "api_key", "max_fee"}`: the config file, then the environment variables
    XPAND_URL, XPAND_API_KEY and XPAND_MAX_FEE over it. Read at every (re)connection, so an
    edited file takes effect without restarting LibreOffice."""
    config = {}
    try:
        with open(config_path(), encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {config_path()}: {e}") from e
    for key, env in (("url", "XPAND_URL"), ("api_key", "XPAND_API_KEY"), ("max_fee", "XPAND_MAX_FEE")):
        if os.environ.get(env):
            config[key] = os.environ[env]
    if not config.get("url") or not config.get("api_key"):
        raise ConfigError(f"no gateway configured: {CONFIG_HINT}")
    config["url"] = str(config["url"]).rstrip("/")
    config["max_fee"] = int(config.get("max_fee") or DEFAULT_MAX_FEE)
    return config


class ConfigError(Exception):
    pass


class GatewayError(Exception):
    """A problem document from the gateway (`problem` is its JSON), or a transport failure."""

    def __init__(self, message, problem=None, status=None):
        super().__init__(message)
        self.problem = problem or {}
        self.status = status


def rest(config, method, path, body=None, timeout=15):
    """One REST call with the API key; a problem answer raises GatewayError."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(config["url"] + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + config["api_key"])
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", "replace")
        try:
            problem = json.loads(text)
        except ValueError:
            problem = {"status": e.code, "detail": text[:200]}
        raise GatewayError(problem_text(problem, e.code), problem, e.code) from None
    except (OSError, ValueError) as e:
        raise GatewayError(f"cannot reach {config['url']}: {e}") from None


def problem_text(problem, status=None):
    status = problem.get("status", status)
    detail = problem.get("detail") or problem.get("title") or "refused"
    return f"{detail} ({status})" if status else detail


def is_terminal(status):
    return status in ("succeeded", "failed", "canceled")


class Follower:
    """What the gateway thread calls on a job it follows (all from that thread)."""

    key = ""  # idempotency key and frame `ref`, unique per submission
    job_id = None

    def submission(self):
        """The job to submit (`POST /v1/jobs` body)."""
        raise NotImplementedError

    def on_partial(self, frame):
        pass

    def on_finished(self, job):
        pass

    def on_problem(self, message, problem):
        """The gateway refused the job (a problem) or it cannot be followed."""

    def on_trouble(self, message):
        """The connection is down; it is being retried (the job is not lost)."""

    def on_connected(self):
        """The connection is up again and the job re-subscribed (or resubmitted)."""


class Gateway:
    """One socket for every job of this LibreOffice process."""

    def __init__(self):
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.followers = {}  # key -> Follower, until the job ends
        self.ws = None
        self.sent = set()  # keys submitted on the current socket, not yet answered
        self.orphans = set()  # keys canceled before the gateway answered their submit
        self.thread = None
        self.config = None

    def follow(self, follower):
        """Submits `follower.submission()` and follows the job to its end."""
        with self.lock:
            self.followers[follower.key] = follower
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="xpand-gateway", daemon=True)
                self.thread.start()
            ws = self.ws
            self.wake.notify_all()
        if ws is not None:
            # Serializing a sheet's rows and sending them takes time: not on Calc's thread.
            threading.Thread(target=self._send_submit, args=(ws, follower), daemon=True).start()

    def cancel(self, follower):
        """Stops following; a job the gateway accepted is canceled (its rest refunded)."""
        with self.lock:
            self.followers.pop(follower.key, None)
            ws, job_id = self.ws, follower.job_id
        if job_id is None:
            # Not accepted yet: canceled when the gateway answers the submit (`_dispatch`).
            with self.lock:
                self.orphans.add(follower.key)
            return
        threading.Thread(target=self._cancel_id, args=(ws, job_id), daemon=True).start()

    def _cancel_id(self, ws, job_id):
        if ws is not None:
            try:
                ws.send(json.dumps({"op": "cancel", "job_id": job_id}))
                return
            except OSError:
                pass
        config = self.config

        def by_rest():
            try:
                rest(config, "POST", f"/v1/jobs/{job_id}/cancel")
            except GatewayError:
                pass

        if config is not None:
            threading.Thread(target=by_rest, name="xpand-cancel", daemon=True).start()

    def _send_submit(self, ws, follower):
        frame = {"op": "submit", "ref": follower.key, "idempotency_key": follower.key}
        try:
            frame["job"] = follower.submission()
            with self.lock:
                self.sent.add(follower.key)
            text = json.dumps(frame, separators=(",", ":"))
            trace(f"submit {follower.key} ({len(text)} bytes)")
            ws.send(text)
        except OSError:
            pass  # the reader sees the drop and resubmits
        except Exception as e:  # a bug: say so in the cells, not only in a log
            log(f"submitting {follower.key}")
            self._end(follower)
            follower.on_problem(f"internal error: {type(e).__name__}: {e}", {})

    def _run(self):
        while True:
            try:
                self._connect_and_read()
            except Exception as e:  # a bug: keep the thread alive and say so in the cells
                log("the gateway thread")
                self._trouble(f"internal error: {type(e).__name__}: {e}")
                time.sleep(1)

    def _connect_and_read(self):
        backoff = 0.25
        while True:
            with self.lock:
                while not self.followers:
                    self.wake.wait()
            trace(f"connecting ({len(self.followers)} jobs)")
            try:
                self.config = load_config()
                trace("minting a token")
                token = rest(self.config, "POST", "/v1/auth/token", {})["token"]
                trace("opening the socket")
                url = self.config["url"].replace("http", "ws", 1) + "/v1/ws?token=" + token
                ws = xpand_ws.WebSocket.connect(url)
            except (ConfigError, GatewayError, OSError, KeyError, TypeError, xpand_ws.HandshakeError, xpand_ws.Closed) as e:
                trace(f"cannot connect: {e}")
                self._trouble(str(e), fatal=isinstance(e, ConfigError) or getattr(e, "status", None) in (401, 403))
                time.sleep(backoff)
                backoff = min(backoff * 2, 8.0)
                continue
            backoff = 0.25
            with self.lock:
                self.ws = ws
                self.sent = set()
                followers = list(self.followers.values())
            for follower in followers:
                if follower.job_id is None:
                    self._send_submit(ws, follower)
                else:
                    try:
                        ws.send(json.dumps({"op": "subscribe", "ref": follower.key, "job_id": follower.job_id}))
                    except OSError:
                        break
            trace("connected")
            for follower in followers:
                follower.on_connected()  # a "cannot reach" shown in its cells is over
            closed = self._read(ws)
            trace(f"closed: {closed}")
            with self.lock:
                self.ws = None
                unanswered = [self.followers[k] for k in self.sent if k in self.followers]
            if closed.code == 1009:
                # A submit larger than the gateway's frame limit: resending it cannot help.
                for follower in unanswered:
                    self._end(follower)
                    follower.on_problem("the range is larger than the gateway accepts in one message (XPAND_MAX_BODY_BYTES)", {})
            elif closed.code == 4403:
                self._trouble("the API key was revoked", fatal=True)
                time.sleep(30)

    def _read(self, ws):
        try:
            while True:
                self._dispatch(json.loads(ws.recv()))
        except xpand_ws.Closed as e:
            return e
        except (OSError, ValueError) as e:
            ws.close(1011, "client error")
            return xpand_ws.Closed(1006, str(e))

    def _trouble(self, message, fatal=False):
        with self.lock:
            followers = list(self.followers.values())
        for follower in followers:
            follower.on_trouble(message + ("" if fatal else "; retrying"))

    def _end(self, follower):
        with self.lock:
            self.followers.pop(follower.key, None)
            self.sent.discard(follower.key)

    def _dispatch(self, frame):
        event = frame.get("event")
        trace(f"{event} {frame.get('ref') or frame.get('job_id') or (frame.get('job') or {}).get('id')}")
        ref = frame.get("ref")
        with self.lock:
            by_ref = self.followers.get(ref) if ref else None
            orphaned = ref in self.orphans
        if event in ("accepted", "subscribed") and (by_ref or orphaned):
            job = frame.get("job") or {}
            with self.lock:
                self.sent.discard(ref)
            if orphaned:  # deleted before the gateway answered: cancel it now
                self.orphans.discard(ref)
                if not is_terminal(job.get("status")):
                    self._cancel_id(self.ws, job.get("id"))
                return
            by_ref.job_id = job.get("id")
            if is_terminal(job.get("status")):
                self._end(by_ref)
                by_ref.on_finished(job)
            return
        if event == "error":
            problem = frame.get("problem") or {}
            if by_ref is not None:
                self._end(by_ref)
                by_ref.on_problem(problem_text(problem), problem)
            return
        job_id = frame.get("job_id") or (frame.get("job") or {}).get("id")
        with self.lock:
            follower = next((f for f in self.followers.values() if f.job_id == job_id), None)
        if follower is None:
            return
        if event == "partial":
            follower.on_partial(frame)
        elif event in ("succeeded", "failed", "canceled"):
            self._end(follower)
            follower.on_finished(frame.get("job") or {})


def trace(message):
    """A line in the file XPAND_CALC_LOG names, when set (the tests set it)."""
    path = os.environ.get("XPAND_CALC_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {threading.current_thread().name}: {message}\n")


def log(what):
    """An unexpected exception, with its traceback, on LibreOffice's standard error."""
    import traceback

    trace(f"unexpected error in {what}: {traceback.format_exc()}")
    sys.stderr.write(f"xpand: unexpected error in {what}:\n{traceback.format_exc()}")
    sys.stderr.flush()


GATEWAY = Gateway()
