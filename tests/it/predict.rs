//! A `predict` job as a data scientist runs one: their model registered, rows sent in the Open
//! Inference Protocol's shapes (REST, the CLI, and Triton's own client), and the answer compared
//! with ONNX Runtime run directly on the same model and rows. The worker starts cold: it fetches
//! the model through the signed URL, checks its hash and caches it; later jobs run warm, and
//! placement prefers the node that holds the model. Bad requests are refused naming the tensor
//! and the element, and charge nothing; bytes that fail their hash are refused by every node,
//! and a model ONNX Runtime cannot load fails its job with a full refund, blaming no node.

use futures::{SinkExt, StreamExt};
use ort::session::Session;
use ort::value::Tensor;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::xpand;
use crate::common::{assert_refused, problem, TestApp};
use crate::models::{churn, manifest, publish, upload};

/// `rows` rows of 8 features, varied and deterministic.
fn features(rows: usize) -> Vec<f32> {
    (0..rows * 8)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect()
}

/// The model run directly.
fn onnx_runtime(model: &[u8], x: &[f32]) -> Vec<f64> {
    // One environment per process: the in-process worker's.
    let env = xpand_worker::onnx_environment(&xpand_worker::default_ort_dylib_path())
        .expect("ONNX Runtime loads (scripts/setup-onnxruntime.sh)");
    let mut session = Session::builder(&env)
        .unwrap()
        .commit_from_memory(model)
        .unwrap();
    let outputs = session
        .run(ort::inputs!["x" => Tensor::from_array(([x.len() / 8, 8], x.to_vec())).unwrap()])
        .unwrap();
    let (_, data) = outputs["p"].try_extract_tensor::<f32>().unwrap();
    data.iter().map(|&v| f64::from(v)).collect()
}

fn body(rows: usize, nested: bool) -> Value {
    let x = features(rows);
    let data: Value = if nested {
        json!(x.chunks(8).collect::<Vec<_>>())
    } else {
        json!(x)
    };
    json!({
        "kind": "predict",
        "input": {
            "model": "churn",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 8], "data": data}],
        },
        "max_fee": 1_000_000,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predict_job_returns_what_onnx_runtime_computes_and_refuses_bad_tensors() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, key) = app.customer(10_000_000).await;
    let model = churn(|_| {});
    assert_eq!(
        upload(&app, &key, &manifest("churn"), model.clone())
            .await
            .status(),
        201
    );

    // Cold: the worker fetches the model, checks it, and runs 300 rows (one shard: the tests
    // cut shards at 8,192 elements, 1,024 rows of this model).
    let resp = app
        .http
        .post(format!("{}/v1/jobs", app.base))
        .bearer_auth(&key)
        .header("Prefer", "wait=30")
        .json(&body(300, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["status"], "succeeded", "{job}");
    let p = &job["output"]["outputs"][0];
    assert_eq!(
        (p["name"].clone(), p["datatype"].clone()),
        (json!("p"), json!("FP32"))
    );
    assert_eq!(p["shape"], json!([300, 1]));
    let got: Vec<f64> = serde_json::from_value(p["data"].clone()).unwrap();
    let want = onnx_runtime(&model, &features(300));
    assert_eq!(got, want, "the job's numbers are ONNX Runtime's");
    // Gateway fee and 20 per row.
    assert_eq!(job["cost"], 1_000 + 300 * 20);

    // Warm, nested data, many shards: the same numbers, in order.
    let (status, job) = app.submit(&key, &body(5_000, true)).await;
    assert_eq!(status, 201);
    let job = app.wait_for(&key, job.id).await;
    let output = job.output.clone().expect("an output");
    let got: Vec<f64> = serde_json::from_value(output["outputs"][0]["data"].clone()).unwrap();
    assert_eq!(got, onnx_runtime(&model, &features(5_000)));
    assert!(job.progress.shards_total > 1, "{:?}", job.progress);

    // Over the WebSocket, as an add-in would: each shard's slice streams as it is verified
    // (rows across the outputs, and the protocol's tensors), before the job ends.
    let token: Value = app
        .post_json(&key, "/v1/auth/token", &json!({}))
        .await
        .json()
        .await
        .unwrap();
    let url = format!(
        "{}/v1/ws?token={}",
        app.base.replace("http://", "ws://"),
        token["token"].as_str().unwrap()
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let submit = json!({"op": "submit", "ref": "scores", "job": body(3_000, false)});
    socket
        .send(Message::text(submit.to_string()))
        .await
        .unwrap();
    let mut slices: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
    let finished = loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(30), socket.next())
            .await
            .expect("a frame within 30 s")
            .expect("the socket stays open")
            .unwrap();
        let Message::Text(text) = frame else { continue };
        let frame: Value = serde_json::from_str(&text).unwrap();
        match frame["event"].as_str() {
            Some("partial") => {
                let tensor = &frame["outputs"][0];
                assert_eq!(tensor["name"], "p");
                let data: Vec<f64> = serde_json::from_value(tensor["data"].clone()).unwrap();
                let rows: Vec<Vec<f64>> = serde_json::from_value(frame["rows"].clone()).unwrap();
                assert_eq!(
                    rows.concat(),
                    data,
                    "rows and tensors carry the same numbers"
                );
                slices.insert(frame["offset"].as_i64().unwrap(), data);
            }
            Some("succeeded") => break frame["job"].clone(),
            Some("failed" | "canceled") => panic!("{frame}"),
            _ => {}
        }
    };
    assert_eq!(slices.len(), 3, "one slice per shard");
    let streamed: Vec<f64> = slices.into_values().flatten().collect();
    let want = onnx_runtime(&model, &features(3_000));
    assert_eq!(streamed, want);
    let got: Vec<f64> =
        serde_json::from_value(finished["output"]["outputs"][0]["data"].clone()).unwrap();
    assert_eq!(got, want);

    // Refusals name the tensor and the element, and charge nothing.
    let before = app.balances(&key).await;
    let mut wrong_type = body(2, false);
    wrong_type["input"]["inputs"][0]["datatype"] = json!("INT64");
    let mut wrong_shape = body(2, false);
    wrong_shape["input"]["inputs"][0]["shape"] = json!([2, 7]);
    let mut short = body(2, false);
    short["input"]["inputs"][0]["shape"] = json!([3, 8]);
    let mut text = body(2, false);
    text["input"]["inputs"][0]["data"][5] = json!("NaN");
    let mut unknown = body(2, false);
    unknown["input"]["model"] = json!("nope");
    let mut extra = body(2, false);
    extra["input"]["inputs"][0]["name"] = json!("y");
    for (what, request, field, detail) in [
        (
            "datatype",
            wrong_type,
            "input.inputs[0].datatype",
            "must be FP32",
        ),
        ("shape", wrong_shape, "input.inputs[0].shape[1]", "is 7"),
        ("count", short, "input.inputs[0].data", "the shape needs 24"),
        ("element", text, "input.inputs[0].data[5]", "\"NaN\""),
        ("model", unknown, "input.model", "no model 'nope'"),
        ("name", extra, "input.inputs[0].name", "'y' is not an input"),
    ] {
        let resp = app.post_json(&key, "/v1/jobs", &request).await;
        assert_refused(resp, what, field, detail).await;
    }
    assert_eq!(app.balances(&key).await, before);

    // An existing Open Inference Protocol client, Triton's, with nothing but the URL and a key.
    let venv = std::env::var("XPAND_GENERATED_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/xpand/generated-venv",
            std::env::var("HOME").unwrap()
        )
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/generated/triton.py");
    let triton = tokio::process::Command::new(format!("{venv}/bin/python"))
        .args([script, "50"])
        .env("XPAND_URL", &app.base)
        .env("XPAND_API_KEY", &key)
        .kill_on_drop(true)
        .output();
    let triton = tokio::time::timeout(std::time::Duration::from_secs(60), triton)
        .await
        .expect("the Triton client ends within a minute")
        .expect("the venv's python runs (scripts/setup-generated-clients.sh)");
    assert!(
        triton.status.success(),
        "the Triton client failed:\n{}{}",
        String::from_utf8_lossy(&triton.stdout),
        String::from_utf8_lossy(&triton.stderr)
    );
    let got: Vec<f64> = serde_json::from_slice(&triton.stdout).unwrap();
    assert_eq!(got, onnx_runtime(&model, &features(50)));

    // A refused key is the gateway's usual 401 (with its challenge) in the protocol's shape.
    let resp = app
        .post_json("xp_wrong", "/v2/models/churn/infer", &json!({}))
        .await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let refused: Value = resp.json().await.unwrap();
    assert!(refused["error"].is_string(), "{refused}");

    // A request past the body limit (1 MiB in tests) is refused in the protocol's shape too.
    let huge = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [40_000, 8],
                                  "data": vec![0.123_456_7_f64; 320_000]}]});
    let resp = app.post_json(&key, "/v2/models/churn/infer", &huge).await;
    assert_eq!(resp.status(), 413);
    let refused: Value = resp.json().await.unwrap();
    assert!(
        refused["error"].as_str().unwrap().contains("larger than"),
        "{refused}"
    );

    // Once its jobs have ended, the model can be deleted.
    let resp = app
        .http
        .delete(format!("{}/v1/models/churn/versions/latest", app.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

/// What a node's last capability statement says it holds.
async fn held(app: &TestApp, node: &str) -> Vec<String> {
    let held: Option<Value> =
        sqlx::query_scalar("SELECT capabilities->'held_models' FROM nodes WHERE id = $1")
            .bind(node)
            .fetch_one(&app.db)
            .await
            .unwrap();
    held.and_then(|h| serde_json::from_value(h).ok())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_nodes_go_first_and_swapped_or_unloadable_models_fail_cleanly() {
    let mut app = TestApp::spawn().await;
    let first = app.start_worker().await;
    let (_, key) = app.customer(10_000_000).await;
    let model = churn(|_| {});
    let version: Value = upload(&app, &key, &manifest("churn"), model)
        .await
        .json()
        .await
        .unwrap();
    let sha = version["sha256"].as_str().unwrap().to_string();
    let (_, job) = app.submit(&key, &body(10, false)).await;
    assert_eq!(
        app.wait_for(&key, job.id).await.status,
        xpand::jobs::JobStatus::Succeeded
    );

    // The node that ran it says it holds the model (a hash, which others never read).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !held(&app, &first).await.contains(&sha) {
        assert!(
            std::time::Instant::now() < deadline,
            "the statement never listed the model"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let nodes = app.get_json(&key, "/v1/nodes").await;
    assert!(!nodes.to_string().contains(&sha), "{nodes}");

    // A second, cold node joins: the warm one still gets the model's shards.
    let second = app.start_worker().await;
    for _ in 0..3 {
        let (_, job) = app.submit(&key, &body(10, false)).await;
        app.wait_for(&key, job.id).await;
        let ran_on: Vec<String> =
            sqlx::query_scalar("SELECT node_id FROM shards WHERE job_id = $1")
                .bind(job.id)
                .fetch_all(&app.db)
                .await
                .unwrap();
        assert_eq!(ran_on, std::slice::from_ref(&first));
    }

    // A version whose stored bytes were swapped is refused by the node that fetches it: it
    // hashes to something else. The node neither runs nor keeps it, and the job can be
    // canceled with its escrow back.
    let other = churn(|m| m.graph.as_mut().unwrap().initializer[0].float_data[0] = 9.0);
    let v2: Value = upload(&app, &key, &manifest("churn"), other)
        .await
        .json()
        .await
        .unwrap();
    let v2 = v2["sha256"].as_str().unwrap().to_string();
    let stored = app.config.files_dir.join(format!("models/churn/{v2}"));
    std::fs::write(
        &stored,
        churn(|m| m.graph.as_mut().unwrap().initializer[0].float_data[0] = 7.0),
    )
    .unwrap();
    let before = app.balances(&key).await;
    let mut request = body(10, false);
    request["input"]["version"] = json!(v2);
    let (_, job) = app.submit(&key, &request).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let rejected: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT unnest(rejected_by) FROM shards WHERE job_id = $1")
                .bind(job.id)
                .fetch_all(&app.db)
                .await
                .unwrap();
        if rejected.len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the nodes never refused the model: {rejected:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for node in [&first, &second] {
        assert!(!held(&app, node).await.contains(&v2));
    }
    let resp = app
        .post_json(&key, &format!("/v1/jobs/{}/cancel", job.id), &json!({}))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(app.balances(&key).await, before);

    // A model the registry takes but ONNX Runtime cannot load (its weights do not fit its
    // input) is the model's fault: both nodes say so, and the job fails with a full refund.
    let broken = churn(|m| {
        let w = &mut m.graph.as_mut().unwrap().initializer[0];
        w.dims = vec![7, 1];
        w.float_data.truncate(7);
    });
    assert_eq!(
        upload(&app, &key, &manifest("misfit"), broken)
            .await
            .status(),
        201
    );
    let mut request = body(10, false);
    request["input"]["model"] = json!("misfit");
    let (_, job) = app.submit(&key, &request).await;
    let job = app.wait_for(&key, job.id).await;
    assert_eq!(job.status, xpand::jobs::JobStatus::Failed);
    assert_eq!(
        job.error.as_ref().map(|e| e.code.as_str()),
        Some("input_unusable")
    );
    assert_eq!(app.balances(&key).await, before);
    let failures: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(shards_failed), 0)::bigint FROM nodes")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(failures, 0, "the nodes are not blamed for the model");
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

/// The example in `examples/models/breast-cancer/`, as `training/train_tabular.py` wrote it.
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/models/breast-cancer");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_of_docs_models_md_score_the_example_as_onnx_runtime_does() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, key) = app.customer(10_000_000).await;
    let dir = tempfile::tempdir().unwrap();
    let key = Some(key.as_str());
    let (model, manifest, request) = (
        format!("{EXAMPLE}/model.onnx"),
        format!("{EXAMPLE}/manifest.json"),
        format!("{EXAMPLE}/request.json"),
    );
    let pushed = xpand(
        &app,
        key,
        dir.path(),
        &["models", "push", &model, "-m", &manifest],
        b"",
    )
    .await
    .expect(0);
    assert!(
        pushed.stdout.starts_with("model breast-cancer version "),
        "{}",
        pushed.stdout
    );
    let job = xpand(
        &app,
        key,
        dir.path(),
        &[
            "jobs", "submit", "--kind", "predict", "--input", &request, "--wait", "--json",
        ],
        b"",
    )
    .await
    .expect(0)
    .json();
    let outputs = &job["output"]["outputs"];
    assert_eq!(outputs[0]["name"], "label");
    assert_eq!(outputs[0]["datatype"], "INT64");
    assert_eq!(outputs[1]["shape"], json!([114, 2]));

    // ONNX Runtime run directly on the same file and rows.
    let body: Value = serde_json::from_str(&std::fs::read_to_string(&request).unwrap()).unwrap();
    let x: Vec<f32> = body["inputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    let env = xpand_worker::onnx_environment(&xpand_worker::default_ort_dylib_path()).unwrap();
    let mut session = Session::builder(&env)
        .unwrap()
        .commit_from_file(&model)
        .unwrap();
    let direct = session
        .run(ort::inputs!["x" => Tensor::from_array(([114usize, 30], x)).unwrap()])
        .unwrap();
    let (_, labels) = direct["label"].try_extract_tensor::<i64>().unwrap();
    let (_, probabilities) = direct["probabilities"].try_extract_tensor::<f32>().unwrap();
    let got_labels: Vec<i64> = serde_json::from_value(outputs[0]["data"].clone()).unwrap();
    let got_probabilities: Vec<f64> = serde_json::from_value(outputs[1]["data"].clone()).unwrap();
    assert_eq!(got_labels, labels);
    let direct: Vec<f64> = probabilities.iter().map(|&p| f64::from(p)).collect();
    assert_eq!(got_probabilities, direct);

    // The listing shows it; `rm` deletes it.
    let listed = xpand(&app, key, dir.path(), &["models", "list"], b"")
        .await
        .expect(0);
    assert!(listed.stdout.contains("breast-cancer"), "{}", listed.stdout);
    xpand(
        &app,
        key,
        dir.path(),
        &["models", "rm", "breast-cancer", "latest"],
        b"",
    )
    .await
    .expect(0);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_job_pays_a_published_models_owner_its_royalty() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, owner) = app.customer(1_000_000).await;
    let (_, user) = app.customer(1_000_000).await;
    let mut with_royalty = manifest("churn");
    with_royalty["royalty_per_row"] = json!(3);
    assert_eq!(
        upload(&app, &owner, &with_royalty, churn(|_| {}))
            .await
            .status(),
        201
    );
    // Private: the other account cannot run it.
    let resp = app.post_json(&user, "/v1/jobs", &body(10, false)).await;
    assert_eq!(resp.status(), 422);
    assert_eq!(problem(resp).await.errors[0].field, "input.model");
    publish(&app, &owner, "churn").await;

    // 10 rows: the gateway's fee, 20 a row to the node, 3 a row to the owner.
    let (_, job) = app.submit(&user, &body(10, false)).await;
    let job = app.wait_for(&user, job.id).await;
    assert_eq!(job.status, xpand::jobs::JobStatus::Succeeded);
    assert_eq!(job.cost, Some(1_000 + 10 * 20 + 10 * 3));
    assert_eq!(app.balances(&user).await, (1_000_000 - 1_230, 0));
    assert_eq!(app.balances(&owner).await, (1_000_000 + 30, 0));
    // The owner's own jobs pay no royalty.
    let (_, job) = app.submit(&owner, &body(10, false)).await;
    let job = app.wait_for(&owner, job.id).await;
    assert_eq!(job.cost, Some(1_000 + 10 * 20));
    app.assert_ledger_invariants().await;
    app.teardown().await;
}
