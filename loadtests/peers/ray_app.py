# Why this file exists: the `ray` and `ray-batch` peer stacks, i.e. what a Python team would
# write to serve the forecast model with Ray Serve: a deployment of 2 replicas (one per core)
# doing the same pack + run as xpand's worker, behind Serve's HTTP proxy on 127.0.0.1. With
# --batch the deployment uses @serve.batch, stacking the rows of concurrent requests into one
# ONNX Runtime run.
#
# bench.py runs this as a process of its own; it starts a private single-node Ray (everything on
# 127.0.0.1, no dashboard, no usage stats, its own --temp-dir), deploys, writes --ready-file, and
# serves until SIGTERM/SIGINT, when it shuts Serve and Ray down.

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402

import common  # noqa: E402

BATCH_SIZE = 8
BATCH_WAIT_S = 0.002


def keep_replica_grpc_on_loopback():
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on "[::]:0", a listener
    on every interface, hard-coded in ray/serve/_private/replica.py (no option moves it). This
    runs in the replica, before Serve starts that server (the user class is built first), and
    binds it to 127.0.0.1 instead, like every other Ray socket here. It changes no request path:
    the proxy reaches replicas through Ray actor calls. bench.py's `ss` check verifies it."""
    from ray.serve._private import replica

    if getattr(replica, "_peers_loopback_patch", False):
        return
    original = replica.add_port_to_grpc_server

    def add_port(server, address):
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    replica.add_port_to_grpc_server = add_port
    replica._peers_loopback_patch = True


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Forecaster:
    def __init__(self):
        keep_replica_grpc_on_loopback()
        self.session = common.new_session()

    async def __call__(self, request: Request):
        body = await request.json()
        series, horizon = body["series"], int(body["horizon"])
        return {"forecasts": common.forecast(self.session, series, horizon)}


@serve.deployment(ray_actor_options={"num_cpus": 1})
class BatchedForecaster:
    def __init__(self):
        keep_replica_grpc_on_loopback()
        self.session = common.new_session()

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def run(self, jobs):
        return [{"forecasts": f} for f in common.forecast_many(self.session, jobs)]

    async def __call__(self, request: Request):
        body = await request.json()
        return await self.run((body["series"], int(body["horizon"])))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch", action="store_true")
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--ready-file", required=True)
    args = parser.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=common.cpu_count(),
        _temp_dir=args.temp_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        deployment = BatchedForecaster if args.batch else Forecaster
        serve.run(
            deployment.options(num_replicas=args.replicas).bind(),
            name="forecast",
            route_prefix="/",
        )
        Path(args.ready_file).write_text(f"{os.getpid()}\n")
        print(f"ray_app: serving on http://127.0.0.1:{args.port}/", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
