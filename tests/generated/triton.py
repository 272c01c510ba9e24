"""Triton's own HTTP client (tritonclient, from PyPI) against xpand's Open Inference Protocol.

It needs nothing but the URL and a token: liveness, readiness (the server's and the model's),
the server's and the model's metadata, an inference whose numbers it prints (as JSON, for
tests/it/predict.rs to compare with ONNX Runtime run directly), and a refused request read as
the protocol's error. Any mismatch fails an assertion.
"""

import json
import os
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url = os.environ["XPAND_URL"].removeprefix("http://")
headers = {"Authorization": f"Bearer {os.environ['XPAND_API_KEY']}"}
rows = int(sys.argv[1])

client = httpclient.InferenceServerClient(url=url)
assert client.is_server_live(headers=headers)
assert client.is_server_ready(headers=headers)
assert client.get_server_metadata(headers=headers)["name"] == "xpand"
assert client.is_model_ready("churn", headers=headers)
assert not client.is_model_ready("no-such-model", headers=headers)
metadata = client.get_model_metadata("churn", headers=headers)
assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}], metadata

x = (((np.arange(rows * 8) * 37) % 101).astype(np.float32) - 50.0) / 25.0
x = x.reshape(rows, 8)
features = httpclient.InferInput("x", list(x.shape), "FP32")
features.set_data_from_numpy(x, binary_data=False)
wanted = httpclient.InferRequestedOutput("p", binary_data=False)
result = client.infer("churn", [features], outputs=[wanted], request_id="r-1", headers=headers)
response = result.get_response()
assert response["id"] == "r-1" and response["model_name"] == "churn", response
assert len(response["model_version"]) == 64, response
p = result.as_numpy("p")
assert p.shape == (rows, 1), p.shape

wrong = httpclient.InferInput("x", list(x.shape), "FP64")
wrong.set_data_from_numpy(x.astype(np.float64), binary_data=False)
try:
    client.infer("churn", [wrong], headers=headers)
    raise SystemExit("an FP64 input was accepted for an FP32 model")
except InferenceServerException as e:
    assert "inputs[0].datatype" in str(e), e

print(json.dumps(p.reshape(-1).astype(float).tolist()))
