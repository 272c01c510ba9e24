"""The registry and predict benchmark; run it with run.sh against a running gateway.

1. The registry check: the same 50 MB ONNX file uploaded as a plain file (`POST /v1/files`)
   and registered as a model (`POST /v1/models`, which parses and checks the graph); medians.
2. Cold: a model version no worker holds, and the wall time of its first one-row job (the
   worker fetches, checks and loads it), against a warm job of the same model.
3. Warm: one-row jobs with `Prefer: wait`, one client in turn (p50, p99), then CLIENTS at once
   (jobs/s), against the bare model in ONNX Runtime on the same row in this process.

For the 1 KB example model (examples/models/breast-cancer) and a 50 MB two-layer network built
here. Prints one JSON line per figure and a table at the end.
"""

import json
import os
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

URL = os.environ.get("XPAND_URL", "http://127.0.0.1:8080")
KEY = os.environ["XPAND_API_KEY"]
JOBS = int(os.environ.get("JOBS", "100"))
CLIENTS = int(os.environ.get("CLIENTS", "8"))
EXAMPLE = Path("examples/models/breast-cancer")


def big_model(seed: int, hidden: int = 48_000, features: int = 256):
    """x [n, 256] -> relu(x W1) W2 -> y [n, 1]: about 49 MB of weights."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((features, hidden), dtype=np.float32) * 0.05, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 1), dtype=np.float32) * 0.01, "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = {
        "name": "bench-big",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, features]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
        "price_per_row": 1,
    }
    row = rng.standard_normal((1, features), dtype=np.float32)
    return model.SerializeToString(), manifest, row


def example_model(seed: int):
    model = onnx.load(str(EXAMPLE / "model.onnx"))
    # Another version per run (a cold one): a metadata entry changes the bytes, not the math.
    model.metadata_props.append(onnx.StringStringEntryProto(key="bench", value=str(seed)))
    manifest = json.loads((EXAMPLE / "manifest.json").read_text())
    manifest["name"] = "bench-example"
    request = json.loads((EXAMPLE / "request.json").read_text())
    row = np.array(request["inputs"][0]["data"][:1], dtype=np.float32)
    return model.SerializeToString(), manifest, row


def client() -> httpx.Client:
    return httpx.Client(
        base_url=URL,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
        event_hooks={"response": [_not_rate_limited]},
    )


def _not_rate_limited(response: httpx.Response) -> None:
    # The dev gateway allows 100 requests a second per key; a run at 8 clients can pass it.
    # A 429 fails the run loudly instead of being measured as a job.
    if response.status_code == 429:
        raise SystemExit("rate-limited (429): start the gateway with a higher XPAND_RATE_LIMIT")


def register(http, data: bytes, manifest: dict) -> tuple[str, float]:
    files = {"manifest": (None, json.dumps(manifest), "application/json"), "model": ("m.onnx", data)}
    start = time.perf_counter()
    r = http.post("/v1/models", files=files)
    took = time.perf_counter() - start
    r.raise_for_status()
    return r.json()["sha256"], took


def upload_file(http, data: bytes) -> float:
    start = time.perf_counter()
    r = http.post("/v1/files", content=data, headers={"Content-Type": "application/octet-stream"})
    took = time.perf_counter() - start
    r.raise_for_status()
    http.delete(f"/v1/files/{r.json()['id']}")
    return took


def job(http, manifest: dict, version: str, row: np.ndarray) -> float:
    spec = manifest["inputs"][0]
    body = {
        "kind": "predict",
        "max_fee": 10_000_000,
        "input": {
            "model": manifest["name"],
            "version": version,
            "inputs": [{"name": spec["name"], "datatype": "FP32", "shape": list(row.shape), "data": row.ravel().tolist()}],
        },
    }
    start = time.perf_counter()
    r = http.post("/v1/jobs", json=body, headers={"Prefer": "wait=60"})
    took = time.perf_counter() - start
    r.raise_for_status()
    if r.json()["status"] != "succeeded":
        raise SystemExit(f"a job did not succeed: {r.text[:300]}")
    return took


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bare(data: bytes, row: np.ndarray, runs: int) -> dict:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(5):
        session.run(None, {name: row})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: row})
        times.append(time.perf_counter() - start)
    return {"p50_ms": pct(times, 0.5) * 1e3, "per_s": 1 / statistics.mean(times)}


def measure(label: str, data: bytes, manifest: dict, row: np.ndarray) -> dict:
    out = {"model": label, "bytes": len(data)}
    with client() as http:
        if len(data) > 1_000_000:
            files = [upload_file(http, data) for _ in range(3)]
            models = [register(http, data, manifest)[1] for _ in range(3)]
            out["upload_file_s"] = statistics.median(files)
            out["register_s"] = statistics.median(models)
        version, _ = register(http, data, manifest)
        out["cold_first_job_s"] = job(http, manifest, version, row)
        out["warm_job_s"] = job(http, manifest, version, row)
        one = [job(http, manifest, version, row) for _ in range(JOBS)]
        out["p50_ms"] = pct(one, 0.5) * 1e3
        out["p99_ms"] = pct(one, 0.99) * 1e3
        out["one_client_jobs_s"] = len(one) / sum(one)
    done = []
    lock = threading.Lock()

    def loop(n):
        with client() as http:
            for _ in range(n):
                took = job(http, manifest, version, row)
                with lock:
                    done.append(took)

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(JOBS // CLIENTS,)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out[f"{CLIENTS}_clients_jobs_s"] = len(done) / (time.perf_counter() - start)
    b = bare(data, row, max(JOBS, 50))
    out["bare_p50_ms"] = b["p50_ms"]
    out["bare_per_s"] = b["per_s"]
    out["p50_over_bare"] = out["p50_ms"] / b["p50_ms"]
    with client() as http:
        model = http.get(f"/v1/models/{manifest['name']}")
        model.raise_for_status()
        for v in model.json()["versions"]:
            http.delete(f"/v1/models/{manifest['name']}/versions/{v['sha256']}")
    print(json.dumps(out), flush=True)
    return out


def main():
    seed = int(time.time())
    results = [measure("example (1 KB)", *example_model(seed)), measure("two-layer (50 MB)", *big_model(seed))]
    print(f"\n{'model':<20}{'cold 1st job s':>16}{'warm job s':>12}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'bare p50 ms':>13}{'p50/bare':>10}{CLIENTS:>3} clients jobs/s")
    for r in results:
        print(f"{r['model']:<20}{r['cold_first_job_s']:>16.3f}{r['warm_job_s']:>12.3f}{r['p50_ms']:>9.1f}"
              f"{r['p99_ms']:>9.1f}{r['bare_p50_ms']:>13.3f}{r['p50_over_bare']:>10.1f}"
              f"{r[f'{CLIENTS}_clients_jobs_s']:>18.1f}")
    big = results[1]
    print(f"\n50 MB upload: as a file {big['upload_file_s']:.3f} s, as a model {big['register_s']:.3f} s "
          f"(the registry check adds {big['register_s'] - big['upload_file_s']:.3f} s)")


if __name__ == "__main__":
    main()
