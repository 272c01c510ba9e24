# Why this file exists: the orchestrator of `make bench-peers` (run.sh prepares the venv and the
# network guard, then runs this with the venv's Python). It measures xpand against the Python
# stacks a team would otherwise pick to serve the same ONNX forecast model on this machine:
#
#   bare       ONNX Runtime in-process, pack + run, one thread per process: the limit
#   celery     Celery 5, Redis broker + result backend (DB 15), 2 prefork worker processes
#   ray        Ray Serve, 2 replicas, HTTP on 127.0.0.1
#   ray-batch  the same with @serve.batch
#   xpand-rest xpand from the release binary (`xpand up`: gateway + 2 local workers), driven by
#   xpand-ws   xpand-loadtest --mode rest (SSE) / --mode rest --follow wait (xpand-wait) / --mode ws
#
# For each stack in turn (round r runs every stack once, ROUNDS rounds): start it, check its
# forecasts against bare ONNX Runtime, snapshot its sockets with `ss` (loopback only, or the run
# fails), run a closed loop of 1 and 16 clients for DURATION seconds each, stop it. Then print
# a Markdown table, the ratios, and write results/<timestamp>.json. Everything it starts is
# recorded in a state file, and `bench.py --cleanup STATE` (run.sh's exit trap) stops it all
# again, even after a crash or Ctrl-C.

import datetime as dt
import ipaddress
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

PEERS = Path(__file__).resolve().parent
REPO = PEERS.parents[1]
VENV_BIN = Path(sys.executable).parent
REDIS_DB = int(os.environ.get("PEERS_REDIS_DB", "15"))
CHECK_VARIANTS = (0, 1, 7, 31)
ALL_STACKS = ("bare", "celery", "ray", "ray-batch", "xpand")
PEER_STACKS = ("celery", "ray", "ray-batch")


class Failure(Exception):
    """A run-ending problem, reported without a traceback."""


def log(msg):
    print(f"[bench-peers] {msg}", file=sys.stderr, flush=True)


def env_int(name, default):
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise Failure(f"{name} must be an integer, got {os.environ.get(name)!r}")


# --- processes -------------------------------------------------------------------------------


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode("ascii", "replace")
    # The command name may contain spaces and parentheses; the fields follow the last ')'.
    return data[data.rindex(")") + 2:].split()


def descendants(root):
    """`root` and every process below it (by parent PID, from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(entry)[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(children.get(pid, []))
    return {p for p in out if alive(p)}


def alive(pid):
    try:
        state = _stat_fields(pid)[0]
    except (OSError, ValueError, IndexError):
        return False
    return state != "Z"


def start_time(pid):
    """The process's start time in clock ticks since boot: with the PID, an identity that a
    recycled PID does not share."""
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


def same_process(pid, started):
    return alive(pid) and start_time(pid) == started


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """utime + stime of each live PID, in seconds."""
    out = {}
    for pid in pids:
        try:
            fields = _stat_fields(pid)
            out[pid] = (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, ValueError, IndexError):
            pass
    return out


def cpu_delta(before, after):
    return sum(after[p] - before.get(p, 0.0) for p in after)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_pids(port):
    out = subprocess.run(["ss", "-tlnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(predicate, timeout, what, proc=None, log_file=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise Failure(f"{what}: the process exited with {proc.returncode}{log_tail(log_file)}")
        time.sleep(0.25)
    raise Failure(f"{what}: not ready after {timeout} s{log_tail(log_file)}")


def log_tail(path, lines=30):
    if not path or not Path(path).exists():
        return ""
    text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {path} ---\n" + "\n".join(text)


# --- everything started, recorded for cleanup ------------------------------------------------


class State:
    """What this run started, kept in a JSON file so `--cleanup` can undo it from outside."""

    def __init__(self, path, data=None):
        self.path = Path(path)
        self.data = data or {"procs": [], "db": None, "broker_pid": None, "topic_prefix": None,
                             "ray_used": False, "dirs": [], "redis_db": REDIS_DB}
        self.lock = threading.Lock()

    @classmethod
    def load(cls, path):
        return cls(path, json.loads(Path(path).read_text()))

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def add_proc(self, name, pid, marker, stop_signal="SIGTERM", grace=15.0):
        with self.lock:
            self.data["procs"].append({"name": name, "pid": pid, "marker": marker,
                                       "signal": stop_signal, "grace": grace,
                                       "family": [[pid, start_time(pid)]]})
            self.save()

    def remember_family(self, pid):
        """Records the current descendants of `pid` (processes in their own groups, such as
        xpand's workers, are then still found when the parent is gone)."""
        with self.lock:
            for proc in self.data["procs"]:
                if proc["pid"] == pid:
                    known = {p for p, _ in proc["family"]}
                    proc["family"] += [[p, start_time(p)] for p in sorted(descendants(pid) - known)]
            self.save()

    def set(self, key, value):
        with self.lock:
            self.data[key] = value
            self.save()


def _ours(pid, marker):
    return alive(pid) and marker in cmdline(pid)


def stop_proc(proc, popen=None):
    """Signals the process (and its group), waits its grace, then SIGKILLs what is left of it
    and of its recorded family."""
    pid, marker = proc["pid"], proc["marker"]
    if _ours(pid, marker):
        log(f"stopping {proc['name']} (pid {pid}) with {proc['signal']}")
        try:
            os.kill(pid, getattr(signal, proc["signal"]))
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + proc["grace"]
        while time.monotonic() < deadline:
            if popen is not None:
                if popen.poll() is not None:
                    break
            elif not alive(pid):
                break
            time.sleep(0.2)
    # Its children get a moment to follow it out (Ray's agents exit after the raylet does).
    family = proc.get("family", [])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(same_process(p, t) for p, t in family):
        time.sleep(0.2)
    leftovers = {p for p, started in family if same_process(p, started)}
    for p in sorted(leftovers):
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if leftovers:
        log(f"killed what was left of {proc['name']}: pids {sorted(leftovers)}")
    if popen is not None:
        try:
            popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


def cleanup(state, popens=None):
    """Undoes everything in `state`; idempotent, and every step runs even if another fails."""
    popens = popens or {}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
    data = state.data
    for proc in reversed(data["procs"]):
        try:
            stop_proc(proc, popens.get(proc["pid"]))
        except Exception as err:
            log(f"cleanup: stopping {proc['name']}: {err}")
    data["procs"] = []
    if data.get("ray_used"):
        ray = VENV_BIN / "ray"
        log("cleanup: ray stop")
        try:
            subprocess.run([str(ray), "stop"], capture_output=True, timeout=60,
                           env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        except Exception as err:
            log(f"cleanup: ray stop: {err}")
        data["ray_used"] = False
    broker = data.get("broker_pid")
    if broker:
        if _ours(broker, "mosquitto"):
            log(f"cleanup: stopping the private Mosquitto this run started (pid {broker})")
            os.kill(broker, signal.SIGTERM)
        data["broker_pid"] = None
    elif data.get("topic_prefix") and port_open(1884):
        clear_retained(data["topic_prefix"])
    data["topic_prefix"] = None
    if data.get("db"):
        log(f"cleanup: dropping database {data['db']}")
        r = subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists",
                            "--force", data["db"]], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"cleanup: dropdb failed: {r.stderr.strip()}")
        data["db"] = None
    try:
        flush_redis_db(data.get("redis_db", REDIS_DB))
    except Exception as err:
        log(f"cleanup: flushing Redis DB {REDIS_DB}: {err}")
    for d in data.get("dirs", []):
        shutil.rmtree(d, ignore_errors=True)
    data["dirs"] = []
    state.save()


def flush_redis_db(db):
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=db, socket_connect_timeout=5).flushdb()


def clear_retained(prefix):
    """Clears the retained messages xpand's workers left under our topic prefix on a Mosquitto
    this run did not start (and so does not stop)."""
    r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", "1884", "-t", f"{prefix}/#",
                        "--retained-only", "-F", "%t", "-W", "2"], capture_output=True, text=True)
    topics = [t for t in r.stdout.split() if t.startswith(prefix + "/")]
    for topic in topics:
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", "1884", "-t", topic, "-r", "-n"],
                       capture_output=True)
    if topics:
        log(f"cleanup: cleared {len(topics)} retained topics under {prefix}/")


# --- the network check -----------------------------------------------------------------------


def _host(addr):
    host = addr.rpartition(":")[0]
    return host.strip("[]").split("%")[0]


def _loopback(host):
    if host == "*":
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class NetCheck:
    """`ss` snapshots of the peer processes' TCP and UDP sockets: every one must be on loopback
    (local address, and the peer's for connected sockets)."""

    def __init__(self):
        self.by_stack = {}
        self.lock = threading.Lock()

    def snapshot(self, stack, pids, when):
        out = subprocess.run(["ss", "-tuanpH"], capture_output=True, text=True).stdout
        sockets, bad = 0, []
        for line in out.splitlines():
            fields = line.split(None, 6)
            if len(fields) < 7:
                continue
            owners = {int(p) for p in re.findall(r"pid=(\d+)", fields[6])}
            if not owners & pids:
                continue
            sockets += 1
            state, local, peer = fields[1], fields[4], fields[5]
            ok = _loopback(_host(local)) and (state in ("LISTEN", "UNCONN") or _loopback(_host(peer)))
            if not ok:
                names = re.findall(r'\("([^"]*)",pid=(\d+)', fields[6])
                bad.append(f"{fields[0]} {state} {local} -> {peer} {names}")
        with self.lock:
            entry = self.by_stack.setdefault(stack, {"snapshots": 0, "sockets": 0, "violations": []})
            entry["snapshots"] += 1
            entry["sockets"] += sockets
            entry["violations"].extend(f"{when}: {b}" for b in bad)
        if bad:
            log(f"NETWORK CHECK FAILED for {stack} ({when}): " + "; ".join(bad))

    def failed(self):
        return {s: e["violations"] for s, e in self.by_stack.items() if e["violations"]}


# --- stacks ----------------------------------------------------------------------------------


class Stack:
    name = ""
    entries = ()
    servicenames = ()

    def __init__(self, run):
        self.run = run

    def start(self):
        pass

    def check(self, reference):
        pass

    def server_pids(self):
        return set()

    def service_pids(self):
        pids = set()
        for port in self.servicenames:
            for pid in listening_pids(port):
                pids |= descendants(pid) if port == 5432 else {pid}
        return pids

    def client_command(self, entry, clients, duration):
        raise NotImplementedError

    def parse(self, entry, clients, out):
        data = json.loads(out)
        lat = data["latency_ms"]
        return {"jobs_ok": data["jobs_ok"], "errors": data["jobs_errored"],
                "problems": data.get("problems", {}), "wall_seconds": data["wall_seconds"],
                "jobs_per_second": data["jobs_per_second"], "latency_ms": lat,
                "client_cpu_seconds": data.get("client_cpu_seconds"),
                "server_cpu_seconds": data.get("server_cpu_seconds")}

    def stop(self):
        pass

    def popen(self, name, cmd, marker, cwd, env, stop_signal="SIGTERM", grace=15.0):
        log_file = self.run.dir / f"{name}.log"
        handle = open(log_file, "ab")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        handle.close()
        self.run.state.add_proc(name, proc.pid, marker, stop_signal, grace)
        self.run.popens[proc.pid] = proc
        return proc, log_file

    def stop_popen(self, proc):
        if proc is None:
            return
        for entry in list(self.run.state.data["procs"]):
            if entry["pid"] == proc.pid:
                stop_proc(entry, proc)
                with self.run.state.lock:
                    self.run.state.data["procs"].remove(entry)
                    self.run.state.save()
        self.run.popens.pop(proc.pid, None)

    def python_client(self, mode, clients, duration, *extra):
        return [sys.executable, str(PEERS / "client.py"), mode, "--clients", str(clients),
                "--duration", str(duration), *extra]


class Bare(Stack):
    name = "bare"
    entries = ("bare",)

    def check(self, reference):
        # The reference itself comes from a bare session; check a second, fresh one agrees.
        session = common.new_session()
        for k, expected in reference.items():
            problem = common.mismatch(expected, common.forecast(session, self.run.variants[k]))
            if problem:
                raise Failure(f"bare: variant {k} differs between two sessions: {problem}")

    def client_command(self, entry, clients, duration):
        return self.python_client("bare", clients, duration)


class Celery(Stack):
    name = "celery"
    entries = ("celery",)
    servicenames = (6379,)

    def __init__(self, run):
        super().__init__(run)
        self.proc = None

    def start(self):
        cmd = [str(VENV_BIN / "celery"), "-A", "celery_app", "worker", "--pool", "prefork",
               "--concurrency", "2", "--loglevel", "WARNING", "--hostname", f"peers@{socket.gethostname()}"]
        self.proc, self.log_file = self.popen("celery", cmd, "celery_app", PEERS, self.run.env)
        import celery_app

        self.app = celery_app.make_app()

        def ready():
            try:
                return bool(self.app.control.ping(timeout=1.0))
            except Exception:
                return False

        wait_for(ready, 90, "celery workers", self.proc, self.log_file)
        self.run.state.remember_family(self.proc.pid)

    def check(self, reference):
        for k, expected in reference.items():
            got = self.app.send_task("peers.forecast", args=[self.run.variants[k], common.HORIZON]).get(timeout=60)
            problem = common.mismatch(expected, got)
            if problem:
                raise Failure(f"celery: variant {k} differs from bare ONNX Runtime: {problem}")

    def server_pids(self):
        return descendants(self.proc.pid) if self.proc else set()

    def client_command(self, entry, clients, duration):
        return self.python_client("celery", clients, duration)

    def stop(self):
        if getattr(self, "app", None) is not None:
            self.app.close()
        self.stop_popen(self.proc)
        self.proc = None


class Ray(Stack):
    name = "ray"
    entries = ("ray",)
    batch = False

    def __init__(self, run):
        super().__init__(run)
        self.proc = None

    def start(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        # A short private temp dir (Ray's socket paths must fit 107 bytes) and a private HOME:
        # Ray's usage module looks for ~/ray_bootstrap_config.yaml and, when there is none,
        # probes cloud metadata servers (169.254.169.254, metadata.google.internal) even with
        # usage stats disabled; a local-provider file there stops that.
        self.temp = Path(tempfile.mkdtemp(prefix="xpr-", dir="/tmp"))
        home = self.temp / "home"
        home.mkdir()
        (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
        self.run.state.set("dirs", self.run.state.data["dirs"] + [str(self.temp)])
        self.run.state.set("ray_used", True)
        ready = self.temp / "ready"
        env = {**self.run.env, "HOME": str(home)}
        cmd = [sys.executable, str(PEERS / "ray_app.py"), "--port", str(self.port),
               "--temp-dir", str(self.temp / "ray"), "--ready-file", str(ready)]
        if self.batch:
            cmd.append("--batch")
        self.proc, self.log_file = self.popen(self.name, cmd, "ray_app.py", PEERS, env,
                                              grace=45.0)
        wait_for(ready.exists, 240, f"{self.name} (Ray Serve)", self.proc, self.log_file)
        self.run.state.remember_family(self.proc.pid)

    def check(self, reference):
        import httpx

        with httpx.Client(timeout=60) as client:
            for k, expected in reference.items():
                resp = client.post(self.url, json={"series": self.run.variants[k], "horizon": common.HORIZON})
                if resp.status_code != 200:
                    raise Failure(f"{self.name}: HTTP {resp.status_code}: {resp.text[:300]}")
                problem = common.mismatch(expected, resp.json()["forecasts"])
                if problem:
                    raise Failure(f"{self.name}: variant {k} differs from bare ONNX Runtime: {problem}")

    def server_pids(self):
        if not self.proc:
            return set()
        pids = descendants(self.proc.pid)
        marker = str(self.temp)
        for entry in os.listdir("/proc"):
            if entry.isdigit() and marker in cmdline(int(entry)):
                pids.add(int(entry))
        return pids

    def client_command(self, entry, clients, duration):
        return self.python_client("ray", clients, duration, "--url", self.url, "--stack", self.name)

    def stop(self):
        if self.proc is not None:
            self.run.state.remember_family(self.proc.pid)
        self.stop_popen(self.proc)
        self.proc = None


class RayBatch(Ray):
    name = "ray-batch"
    entries = ("ray-batch",)
    batch = True


class Xpand(Stack):
    name = "xpand"
    entries = ("xpand-rest", "xpand-wait", "xpand-ws")
    servicenames = (6379, 1884, 5432)

    def __init__(self, run):
        super().__init__(run)
        self.proc = None

    def prepare(self):
        """Once per run: the binaries (copied, so a rebuild mid-run cannot swap them), the
        database, the broker and the state directory."""
        if getattr(self, "prepared", False):
            return
        target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/xpand/target"))
        bindir = self.run.dir / "bin"
        bindir.mkdir()
        for name in ("xpand", "xpand-worker", "xpand-loadtest"):
            src = target / "release" / name
            if not src.is_file():
                raise Failure(f"{src} not found: build the release binaries first "
                              "(cargo build --release --workspace --bins, as `make run` does)")
            shutil.copy2(src, bindir / name)
        self.bin = bindir
        tag = secrets.token_hex(4)
        self.db = f"xpand_peers_{tag}"
        r = subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", self.db],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise Failure(f"createdb {self.db}: {r.stderr.strip()}")
        self.run.state.set("db", self.db)
        prefix = f"xpandpeers{tag}"
        self.run.state.set("topic_prefix", prefix)
        if not port_open(1884):
            r = subprocess.run([str(REPO / "scripts/local-broker.sh")], capture_output=True, text=True)
            if r.returncode != 0:
                raise Failure(f"scripts/local-broker.sh: {r.stderr.strip()}")
            pids = listening_pids(1884)
            if pids:
                self.run.state.set("broker_pid", min(pids))
            log(f"started the private Mosquitto on 127.0.0.1:1884 (pid {sorted(pids)})")
        else:
            log("a Mosquitto already listens on 127.0.0.1:1884; using it (topics under "
                f"{prefix}/, cleared at the end)")
        self.state_dir = self.run.dir / "xpand-state"
        self.state_dir.mkdir()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.key_file = self.state_dir / "dev-api-key"
        self.xenv = {
            **self.run.env,
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{self.db}",
            "MQTT_URL": "mqtt://127.0.0.1:1884",
            "REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
            "XPAND_REDIS_PREFIX": prefix,
            "XPAND_TOPIC_PREFIX": prefix,
            "XPAND_RATE_LIMIT": "1000000",
            "XPAND_MAX_STREAMS_PER_ACCOUNT": "100000",
            "XPAND_LISTEN": f"127.0.0.1:{self.port}",
            "XPAND_GATEWAY_KEY_FILE": str(self.state_dir / "gateway.key"),
            "XPAND_AUDITOR_KEY_FILE": str(self.state_dir / "auditor.key"),
            "XPAND_FILES_DIR": str(self.state_dir / "files"),
            "XPAND_SCRATCH_DIR": str(self.state_dir / "scratch"),
        }
        self.prepared = True

    def start(self):
        self.prepare()
        cmd = [str(self.bin / "xpand"), "up", "--state-dir", str(self.state_dir),
               "--dev-credit", "1000000000000"]
        self.proc, self.log_file = self.popen("xpand", cmd, str(self.bin / "xpand"), REPO,
                                              self.xenv, stop_signal="SIGINT", grace=30.0)
        import httpx

        def ready():
            try:
                return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, "xpand /readyz", self.proc, self.log_file)
        wait_for(self.key_file.exists, 30, "xpand's dev API key", self.proc, self.log_file)
        self.key = self.key_file.read_text().strip()

    def check(self, reference):
        import httpx

        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=30) as client:
            for k, expected in reference.items():
                resp = client.post("/v1/jobs", json=common.job_body(self.run.variants[k]))
                if resp.status_code not in (200, 201, 202):
                    raise Failure(f"xpand: POST /v1/jobs: HTTP {resp.status_code}: {resp.text[:300]}")
                job_id = resp.json()["id"]
                deadline = time.monotonic() + 120  # the first job waits for the workers to join
                while True:
                    job = client.get(f"/v1/jobs/{job_id}").json()
                    if job["status"] in ("succeeded", "failed", "canceled"):
                        break
                    if time.monotonic() > deadline:
                        raise Failure(f"xpand: job {job_id} still {job['status']} after 120 s"
                                      f"{log_tail(self.log_file)}")
                    time.sleep(0.05)
                if job["status"] != "succeeded":
                    raise Failure(f"xpand: job {job_id} {job['status']}: {job.get('error')}")
                problem = common.mismatch(expected, job["output"]["forecasts"])
                if problem:
                    raise Failure(f"xpand: variant {k} differs from bare ONNX Runtime: {problem}")
        self.run.state.remember_family(self.proc.pid)

    def server_pids(self):
        return descendants(self.proc.pid) if self.proc else set()

    def service_pids(self):
        # Redis and Mosquitto whole; of PostgreSQL only the backends serving this run's
        # database (their process titles name it): other users of that server are not counted.
        pids = listening_pids(6379) | listening_pids(1884)
        for postmaster in listening_pids(5432):
            pids |= {p for p in descendants(postmaster) if f" {self.db} " in cmdline(p)}
        return pids

    def client_command(self, entry, clients, duration):
        mode = entry.split("-", 1)[1]
        follow = []
        if mode == "wait":  # REST, the POST answered with the finished job (Prefer: wait)
            mode, follow = "rest", ["--follow", "wait"]
        cmd = [str(self.bin / "xpand-loadtest"), "--url", self.base, "--mode", mode, *follow,
               "-c", str(clients), "-d", str(int(duration)), "-n", "1000000000", "--json",
               "--api-key-file", str(self.key_file)]
        if mode == "ws":
            cmd += ["--in-flight", "1"]  # one job per socket at a time: a closed-loop client
        return cmd

    def parse(self, entry, clients, out):
        data = json.loads(out)
        lat = data.get("latency_ms") or {"p50": None, "p90": None, "p99": None, "max": None}
        errors = data["jobs_failed"] + data["jobs_rejected"] + data["jobs_errored"]
        return {"jobs_ok": data["jobs_ok"], "errors": errors, "problems": data.get("problems", {}),
                "wall_seconds": data["wall_seconds"], "jobs_per_second": data["jobs_per_second"],
                "latency_ms": lat, "client_cpu_seconds": None, "server_cpu_seconds": None}

    def stop(self):
        if self.proc is not None:
            self.run.state.remember_family(self.proc.pid)
        self.stop_popen(self.proc)
        self.proc = None


STACK_CLASSES = {"bare": Bare, "celery": Celery, "ray": Ray, "ray-batch": RayBatch, "xpand": Xpand}


# --- the run ---------------------------------------------------------------------------------


class Run:
    def __init__(self):
        self.duration = env_int("DURATION", 20)
        self.rounds = env_int("ROUNDS", 1)
        self.warmup = env_int("WARMUP", 3)
        self.clients = [int(c) for c in os.environ.get("CLIENTS", "1,16").split(",") if c.strip()]
        stacks = os.environ.get("STACKS", ",".join(ALL_STACKS))
        self.stack_names = [s.strip() for s in stacks.split(",") if s.strip()]
        unknown = set(self.stack_names) - set(ALL_STACKS)
        if unknown or self.duration < 1 or self.rounds < 1 or not self.clients:
            raise Failure(f"bad settings: STACKS may hold {', '.join(ALL_STACKS)} (got "
                          f"{sorted(unknown)}); DURATION, ROUNDS >= 1; CLIENTS a list")
        self.stacks = {}
        self.dir = Path(tempfile.mkdtemp(prefix="xpand-peers-"))
        self.state = State(self.dir / "state.json")
        self.state.data["dirs"] = []
        self.state.save()
        self.popens = {}
        self.guard_log = self.dir / "guard.log"
        self.env = {**os.environ, "PEERS_GUARD_LOG": str(self.guard_log),
                    "PEERS_REDIS_DB": str(REDIS_DB), "PYTHONPATH": str(PEERS),
                    "RAY_USAGE_STATS_ENABLED": "0",
                    # Single-node Ray on the loopback address: without it Ray turns the
                    # 127.0.0.1 it is given into the machine's outward address.
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "PYTHONDONTWRITEBYTECODE": "1"}
        os.environ["PEERS_GUARD_LOG"] = str(self.guard_log)
        self.variants = common.variants()
        self.net = NetCheck()
        self.rows = []
        self.correctness = {}


def guard_selftest(run):
    """Proves the guard is loaded and refuses before any packet: a child process tries four
    outward operations (TEST-NET and link-local addresses, an .invalid name) and must have all
    four refused."""
    if not getattr(socket, "PEERS_NETWORK_GUARD", False):
        raise Failure("the network guard (sitecustomize.py) is not loaded in this interpreter")
    probe = (
        "import socket\n"
        "tries = [lambda: socket.create_connection(('192.0.2.1', 80), timeout=1),\n"
        "         lambda: socket.getaddrinfo('guard-test.invalid', 80),\n"
        "         lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('169.254.169.254', 53)),\n"
        "         lambda: socket.socket().bind(('0.0.0.0', 0))]\n"
        "refused = 0\n"
        "for t in tries:\n"
        "    try: t()\n"
        "    except PermissionError: refused += 1\n"
        "print(refused)\n"
    )
    selftest_log = run.dir / "guard-selftest.log"
    env = {**run.env, "PEERS_GUARD_LOG": str(selftest_log)}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    if r.stdout.strip() != "4":
        raise Failure(f"the network guard did not refuse its self-test: {r.stdout} {r.stderr[-500:]}")
    return "4/4 outward probes refused before sending (connect, DNS, UDP sendto, wildcard bind)"


def reference_forecasts(run):
    session = common.new_session()
    return {k: common.forecast(session, run.variants[k]) for k in CHECK_VARIANTS}


def measure(run, stack, entry, clients, round_no, record=True, duration=None):
    duration = duration or run.duration
    server_before = stack.server_pids()
    services = stack.service_pids()
    cpu0 = cpu_seconds(server_before | services)
    cmd = stack.client_command(entry, clients, duration)
    client = subprocess.Popen(cmd, cwd=REPO, env=run.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)

    def snap():
        pids = stack.server_pids() | descendants(client.pid)
        run.net.snapshot(stack.name, pids, f"{entry} c={clients} r={round_no} mid-run")

    timer = threading.Timer(duration / 2, snap)
    if record:
        timer.start()
    try:
        out, err = client.communicate(timeout=duration + 180)
    except subprocess.TimeoutExpired:
        client.kill()
        out, err = client.communicate()
        raise Failure(f"{entry}: the client did not finish in {duration + 180} s: {err[-1000:]}")
    finally:
        timer.cancel()
    if client.returncode != 0:
        raise Failure(f"{entry} c={clients}: the client exited with {client.returncode}: {err[-2000:]}")
    server_after = stack.server_pids() | server_before
    cpu1 = cpu_seconds(server_after | services)
    result = stack.parse(entry, clients, out)
    if not record:
        return None
    jobs = result["jobs_ok"]
    server_cpu = result["server_cpu_seconds"]
    if server_cpu is None:
        server_cpu = cpu_delta({p: cpu0[p] for p in cpu0 if p in server_after},
                               {p: cpu1[p] for p in cpu1 if p in server_after})
    svc_cpu = cpu_delta({p: cpu0[p] for p in cpu0 if p in services},
                        {p: cpu1[p] for p in cpu1 if p in services}) if services else None
    row = {
        "stack": entry, "clients": clients, "round": round_no, "duration": duration,
        **result,
        "server_cpu_seconds": server_cpu,
        "server_cpu_ms_per_job": 1000.0 * server_cpu / jobs if jobs else None,
        "services_cpu_ms_per_job": (1000.0 * svc_cpu / jobs if jobs and svc_cpu is not None else None),
        "server_processes": len(server_after),
    }
    run.rows.append(row)
    p = row["latency_ms"]
    log(f"  {entry:<10} c={clients:<3} {row['jobs_per_second']:8.1f} jobs/s  p50 {fmt(p['p50'])} ms"
        f"  p99 {fmt(p['p99'])} ms  errors {row['errors']}")
    return row


def run_stack(run, name, reference, round_no):
    # One instance per stack for the whole run: xpand keeps its binaries, database and state
    # directory across rounds (made once, dropped at the end).
    stack = run.stacks.setdefault(name, STACK_CLASSES[name](run))
    log(f"round {round_no}: {name}: starting")
    started = time.monotonic()
    try:
        stack.start()
        log(f"round {round_no}: {name}: up after {time.monotonic() - started:.1f} s; checking forecasts")
        stack.check(reference)
        run.correctness.setdefault(name, f"{len(reference)} variants {list(reference)} match bare "
                                         f"ONNX Runtime within {common.RTOL:g} relative")
        run.net.snapshot(name, stack.server_pids(), f"r={round_no} after start")
        for entry in stack.entries:
            if run.warmup > 0 and name != "bare":
                measure(run, stack, entry, max(run.clients), round_no, record=False,
                        duration=run.warmup)
            for clients in run.clients:
                measure(run, stack, entry, clients, round_no)
    finally:
        stack.stop()
    check_guard(run)


def check_guard(run):
    if run.guard_log.exists() and run.guard_log.read_text().strip():
        raise Failure("the network guard refused outward traffic (see above):\n"
                      + run.guard_log.read_text()[-4000:])


def fmt(v, digits=1):
    return "-" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def aggregate(rows):
    """Per (stack, clients): the median over rounds of each figure."""
    groups = {}
    for r in rows:
        groups.setdefault((r["stack"], r["clients"]), []).append(r)

    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    out = []
    order = {s: i for i, s in enumerate(["bare", "celery", "ray", "ray-batch", "xpand-rest", "xpand-wait", "xpand-ws"])}
    for (stack, clients), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        out.append({
            "stack": stack, "clients": clients, "rounds": len(rs),
            "jobs": sum(r["jobs_ok"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "jobs_per_second": med(r["jobs_per_second"] for r in rs),
            "p50_ms": med(r["latency_ms"]["p50"] for r in rs),
            "p99_ms": med(r["latency_ms"]["p99"] for r in rs),
            "server_cpu_ms_per_job": med(r["server_cpu_ms_per_job"] for r in rs),
            "services_cpu_ms_per_job": med(r["services_cpu_ms_per_job"] for r in rs),
        })
    return out


def ratios(summary, clients):
    def get(stack, c):
        return next((s for s in summary if s["stack"] == stack and s["clients"] == c), None)

    many, one = max(clients), min(clients)
    out = {}
    peers = [s for s in summary if s["stack"] in PEER_STACKS and s["clients"] == many and s["jobs_per_second"]]
    best = max(peers, key=lambda s: s["jobs_per_second"]) if peers else None
    bare = get("bare", one)
    for entry in ("xpand-rest", "xpand-wait", "xpand-ws"):
        x_many, x_one = get(entry, many), get(entry, one)
        if best and x_many and x_many["jobs_per_second"]:
            out[f"{entry} jobs/s / best peer ({best['stack']}) jobs/s at {many} clients"] = \
                x_many["jobs_per_second"] / best["jobs_per_second"]
        if bare and x_one and bare["p50_ms"] and x_one["p50_ms"]:
            out[f"{entry} p50 / bare p50 at {one} client{'s' if one != 1 else ''}"] = \
                x_one["p50_ms"] / bare["p50_ms"]
    return out


def markdown(summary):
    lines = ["| stack | clients | jobs/s | p50 ms | p99 ms | CPU ms/job | services CPU ms/job | jobs | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        lines.append(f"| {s['stack']} | {s['clients']} | {fmt(s['jobs_per_second'])} | {fmt(s['p50_ms'], 2)} | "
                     f"{fmt(s['p99_ms'], 2)} | {fmt(s['server_cpu_ms_per_job'], 2)} | "
                     f"{fmt(s['services_cpu_ms_per_job'], 2)} | {s['jobs']} | {s['errors']} |")
    return "\n".join(lines)


def machine():
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return {"nproc": nproc, "cpu_model": model, "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_at_start": os.getloadavg()}


def versions():
    import importlib.metadata as md

    out = {}
    for pkg in ("onnxruntime", "numpy", "celery", "redis", "ray", "aiohttp", "httpx"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out["xpand_commit"] = git("rev-parse", "--short", "HEAD")
    out["xpand_tree_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    return out


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--cleanup":
        path = Path(sys.argv[2])
        if path.exists():
            cleanup(State.load(path))
        return 0
    def interrupted(*_):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    # Ctrl-C stops the run even where SIGINT came in ignored (a shell's background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run = Run()
    state_hint = os.environ.get("PEERS_STATE_LINK")
    if state_hint:
        Path(state_hint).write_text(str(run.state.path))
    status = 1
    started = dt.datetime.now()
    try:
        info = machine()
        command = os.environ.get("PEERS_COMMAND", "loadtests/peers/run.sh")
        settings = (f"DURATION={run.duration} ROUNDS={run.rounds} WARMUP={run.warmup} "
                    f"CLIENTS={','.join(map(str, run.clients))} STACKS={','.join(run.stack_names)}")
        log(f"machine: {info['nproc']} CPUs ({info['cpu_model']}), {info['memory']}, "
            f"load average {' '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}")
        log(f"command: {command}   ({settings})")
        guard = guard_selftest(run)
        log(f"network guard: {guard}")
        flush_redis_db(REDIS_DB)
        reference = reference_forecasts(run)
        for round_no in range(1, run.rounds + 1):
            for name in run.stack_names:
                run_stack(run, name, reference, round_no)
        failed_net = run.net.failed()
        summary = aggregate(run.rows)
        rat = ratios(summary, run.clients)
        print()
        print(f"## xpand vs Python serving stacks: forecast jobs ({common.ROWS} rows x "
              f"{common.HISTORY} values, horizon {common.HORIZON})")
        print()
        print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}; command: `{command}` ({settings})")
        print()
        print(markdown(summary))
        print()
        for k, v in rat.items():
            print(f"- {k}: {v:.2f}x")
        print()
        print("correctness: " + "; ".join(f"{k}: {v}" for k, v in run.correctness.items()))
        for stack, e in run.net.by_stack.items():
            verdict = "all on loopback" if not e["violations"] else f"{len(e['violations'])} NOT on loopback"
            print(f"network check {stack}: {e['snapshots']} ss snapshots, {e['sockets']} sockets, {verdict}")
        print(f"network guard: {guard}; refusals during the run: 0")
        results_dir = PEERS / "results"
        results_dir.mkdir(exist_ok=True)
        out_path = results_dir / f"{started.strftime('%Y%m%dT%H%M%S')}.json"
        out_path.write_text(json.dumps({
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": dt.datetime.now().isoformat(timespec="seconds"),
            "command": command,
            "settings": {"DURATION": run.duration, "ROUNDS": run.rounds, "WARMUP": run.warmup,
                         "CLIENTS": run.clients, "STACKS": run.stack_names},
            "job": {"rows": common.ROWS, "history": common.HISTORY, "horizon": common.HORIZON,
                    "variants": len(run.variants), "model": str(common.MODEL_PATH.relative_to(REPO))},
            "machine": info, "versions": versions(),
            "network_guard": guard, "network_check": run.net.by_stack,
            "correctness": run.correctness, "summary": summary, "ratios": rat, "runs": run.rows,
        }, indent=1))
        print(f"results: {out_path.relative_to(REPO)}")
        if failed_net:
            raise Failure(f"sockets of peer processes were not on loopback: {failed_net}")
        status = 0
    except Failure as err:
        log(f"FAILED: {err}")
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        status = 130
    finally:
        cleanup(run.state, run.popens)
        try:
            check_guard(run)
        except Failure as err:
            log(f"FAILED: {err}")
            status = status or 1
        if status != 1:
            shutil.rmtree(run.dir, ignore_errors=True)
        else:
            log(f"logs kept in {run.dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
