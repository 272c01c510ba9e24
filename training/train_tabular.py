"""Train the registry's example model and write what `xpand models push` takes.

A tumour-malignancy scorer on scikit-learn's bundled Wisconsin breast cancer data (569 rows of 30
measurements): a standard scaler and a logistic regression, exported to ONNX with skl2onnx as
plain tensors (no ZipMap), so its outputs are `label` (INT64, one per row) and `probabilities`
(FP32, two per row). Written to examples/models/breast-cancer/: `model.onnx`, its
`manifest.json`, and `request.json`, a predict job for the held-out rows. Deterministic: the
same environment writes the same bytes.

    python3 -m venv training/.venv
    training/.venv/bin/pip install -r training/requirements.txt
    training/.venv/bin/python training/train_tabular.py
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

OUT = Path(__file__).resolve().parent.parent / "examples" / "models" / "breast-cancer"
FEATURES = 30


def main() -> None:
    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, data.target, test_size=0.2, random_state=7, stratify=data.target
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=7))
    model.fit(x_train, y_train)
    accuracy = model.score(x_test, y_test)

    onnx = to_onnx(
        model,
        x_train[:1],
        options={id(model.steps[-1][1]): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
        final_types=None,
    )
    onnx.graph.input[0].name = "x"
    for node in onnx.graph.node:
        node.input[:] = ["x" if name == "X" else name for name in node.input]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "model.onnx").write_bytes(onnx.SerializeToString())

    session = ort.InferenceSession(str(OUT / "model.onnx"))
    labels, _ = session.run(None, {"x": x_test})
    assert (labels == model.predict(x_test)).all(), "ONNX and scikit-learn disagree"

    manifest = {
        "name": "breast-cancer",
        "description": (
            "Malignancy of a breast mass from 30 measurements of its cell nuclei "
            f"(Wisconsin data; logistic regression, held-out accuracy {accuracy:.3f}). "
            "label: 0 malignant, 1 benign; probabilities: [malignant, benign]."
        ),
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, FEATURES]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        ],
        "price_per_row": 5,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    request = {
        "model": "breast-cancer",
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": list(x_test.shape),
                "data": [[float(v) for v in row] for row in x_test],
            }
        ],
    }
    (OUT / "request.json").write_text(json.dumps(request) + "\n")
    print(f"wrote {OUT}: {len(x_test)} held-out rows, accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
