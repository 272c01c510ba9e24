# Why this file exists: the closed-loop load client for the Python peer stacks, run by bench.py in
# a process of its own (never inside a server): N clients, each submitting one job, waiting for
# its answer and submitting the next, until the duration is up; jobs in flight then finish and
# count, as in xpand-loadtest. Prints one JSON summary on stdout.
#
#   client.py bare   --clients N --duration S   min(N, cores) processes, each a tight loop of
#                                               pack + ORT run (no queue, no network: the limit)
#   client.py celery --clients N --duration S   N threads, each with its own Celery app:
#                                               send_task(...).get()
#   client.py ray    --clients N --duration S --url http://127.0.0.1:PORT/
#                                               N asyncio tasks POSTing JSON with aiohttp
#
# Job number k (counted across clients) carries variant k mod 32, as xpand-loadtest does.

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time

import common


def summary(stack, clients, latencies_ms, errors, problems, wall_s, extra=None):
    latencies_ms.sort()
    out = {
        "stack": stack,
        "clients": clients,
        "jobs_ok": len(latencies_ms),
        "jobs_errored": errors,
        "problems": problems,
        "wall_seconds": wall_s,
        "jobs_per_second": len(latencies_ms) / wall_s if wall_s > 0 else 0.0,
        "latency_ms": {
            "p50": common.percentile(latencies_ms, 0.50),
            "p90": common.percentile(latencies_ms, 0.90),
            "p99": common.percentile(latencies_ms, 0.99),
            "max": latencies_ms[-1] if latencies_ms else float("nan"),
        },
    }
    out.update(extra or {})
    return out


def note(problems, err):
    key = type(err).__name__
    entry = problems.setdefault(key, {"count": 0, "example": str(err)[:300]})
    entry["count"] += 1


# --- bare: ORT in-process ------------------------------------------------------------------


def bare_worker(args):
    """One process: its own session, a tight loop from --start-at for --duration seconds."""
    session = common.new_session()
    jobs = common.variants()
    for k in range(3):  # load the kernels before the clock starts
        common.forecast(session, jobs[k])
    while time.time() < args.start_at:
        time.sleep(0.001)
    latencies = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + args.duration
    seq = args.index
    now = start
    while now < deadline:
        t0 = time.perf_counter()
        common.forecast(session, jobs[seq % len(jobs)])
        now = time.perf_counter()
        latencies.append((now - t0) * 1000.0)
        seq += args.procs
    json.dump(
        {"latencies": latencies, "wall": now - start, "cpu_s": time.process_time() - cpu0},
        sys.stdout,
    )


def run_bare(args):
    procs = min(args.clients, common.cpu_count())
    start_at = time.time() + 2.0
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "bare-worker", "--duration", str(args.duration),
             "--start-at", repr(start_at), "--index", str(i), "--procs", str(procs)],
            stdout=subprocess.PIPE,
        )
        for i in range(procs)
    ]
    results = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"a bare worker exited with {child.returncode}")
        results.append(json.loads(out))
    latencies = [x for r in results for x in r["latencies"]]
    wall = max(r["wall"] for r in results)
    cpu_s = sum(r["cpu_s"] for r in results)
    return summary("bare", args.clients, latencies, 0, {}, wall,
                   {"processes": procs, "server_cpu_seconds": cpu_s})


# --- celery ----------------------------------------------------------------------------------


def run_celery(args):
    import celery_app

    jobs = common.variants()
    counter = itertools.count()
    lock = threading.Lock()
    latencies, problems = [], {}
    errors = [0]
    barrier = threading.Barrier(args.clients + 1)
    finished = []

    def client():
        app = celery_app.make_app()  # one app per client, as separate web processes would have
        mine, bad = [], 0
        barrier.wait()
        deadline = start_box[0] + args.duration
        while time.perf_counter() < deadline:
            seq = next(counter)
            t0 = time.perf_counter()
            try:
                result = app.send_task("peers.forecast", args=[jobs[seq % len(jobs)], common.HORIZON])
                out = result.get(timeout=60)
                if len(out) != common.ROWS:
                    raise ValueError(f"{len(out)} rows returned")
                mine.append((time.perf_counter() - t0) * 1000.0)
            except Exception as err:  # counted, never fatal (as xpand-loadtest)
                bad += 1
                with lock:
                    note(problems, err)
        with lock:
            latencies.extend(mine)
            errors[0] += bad
            finished.append(time.perf_counter())
        app.close()

    start_box = [0.0]
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    start_box[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join(args.duration + 120)
    wall = (max(finished) if finished else time.perf_counter()) - start_box[0]
    return summary("celery", args.clients, latencies, errors[0], problems, wall)


# --- ray serve over HTTP ---------------------------------------------------------------------


async def run_ray_async(args):
    import aiohttp

    bodies = [
        json.dumps({"series": series, "horizon": common.HORIZON}).encode()
        for series in common.variants()
    ]
    counter = itertools.count()
    latencies, problems = [], {}
    errors = 0
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=args.clients, use_dns_cache=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        deadline = start + args.duration
        last = [start]

        async def client():
            nonlocal errors
            while time.perf_counter() < deadline:
                body = bodies[next(counter) % len(bodies)]
                t0 = time.perf_counter()
                try:
                    async with session.post(args.url, data=body, headers=headers) as resp:
                        payload = await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}: {payload[:200]!r}")
                        if len(json.loads(payload)["forecasts"]) != common.ROWS:
                            raise ValueError("wrong number of rows")
                    now = time.perf_counter()
                    latencies.append((now - t0) * 1000.0)
                    last[0] = max(last[0], now)
                except Exception as err:
                    errors += 1
                    note(problems, err)

        await asyncio.gather(*(client() for _ in range(args.clients)))
    return summary(args.stack, args.clients, latencies, errors, problems, last[0] - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["bare", "bare-worker", "celery", "ray"])
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--url", default="")
    parser.add_argument("--stack", default="ray", help="the name to report (ray, ray-batch)")
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args()
    if args.mode == "bare-worker":
        return bare_worker(args)
    if args.mode == "bare":
        out = run_bare(args)
    elif args.mode == "celery":
        out = run_celery(args)
    else:
        out = asyncio.run(run_ray_async(args))
    out["client_cpu_seconds"] = sum(os.times()[:4])
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
