//! The model registry as a data scientist meets it: an ONNX file and its manifest uploaded as
//! `multipart/form-data`, listed, published, read by version and deleted; and every hostile or
//! lying upload refused by name, with no balance changed and nothing left stored. The models
//! are built here, in ONNX's own protobuf, so each refusal has the one flaw it names.

use onnx_protobuf::{
    tensor_proto::DataLocation, tensor_shape_proto, type_proto, GraphProto, Message, ModelProto,
    NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};

use crate::common::{assert_refused, problem, TestApp};

const FLOAT: i32 = 1;

pub(crate) fn tensor(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for dim in dims {
        let mut d = tensor_shape_proto::Dimension::new();
        match dim {
            Some(v) => d.set_dim_value(*v),
            None => d.set_dim_param("N".into()),
        }
        shape.dim.push(d);
    }
    let mut t = type_proto::Tensor::new();
    t.elem_type = FLOAT;
    t.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.value = Some(type_proto::Value::TensorType(t));
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(ty).into();
    v
}

/// A churn scorer: `p = sigmoid(x · w)`, x of 8 features per row.
pub(crate) fn churn(flaw: impl FnOnce(&mut ModelProto)) -> Vec<u8> {
    let mut weights = TensorProto::new();
    weights.name = "w".into();
    weights.dims = vec![8, 1];
    weights.data_type = FLOAT;
    weights.float_data = vec![0.5, -0.25, 0.125, 1.0, -1.0, 0.75, 0.0, 0.3];
    let node = |op: &str, inputs: &[&str], output: &str| {
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.name = format!("{op}_0");
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![output.into()];
        n
    };
    let mut graph = GraphProto::new();
    graph.name = "churn".into();
    graph.node = vec![
        node("MatMul", &["x", "w"], "z"),
        node("Sigmoid", &["z"], "p"),
    ];
    graph.initializer = vec![weights];
    graph.input = vec![tensor("x", &[None, Some(8)])];
    graph.output = vec![tensor("p", &[None, Some(1)])];
    let mut opset = OperatorSetIdProto::new();
    opset.version = 17;
    let mut model = ModelProto::new();
    model.ir_version = 8;
    model.opset_import = vec![opset];
    model.graph = Some(graph).into();
    flaw(&mut model);
    model.write_to_bytes().unwrap()
}

pub(crate) fn manifest(name: &str) -> Value {
    json!({
        "name": name,
        "description": "Churn probability from 8 account features",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
        "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1, 1]}],
        "price_per_row": 20,
    })
}

pub(crate) async fn upload(
    app: &TestApp,
    key: &str,
    manifest: &Value,
    model: Vec<u8>,
) -> reqwest::Response {
    let form = Form::new()
        .part(
            "manifest",
            Part::text(manifest.to_string())
                .mime_str("application/json")
                .unwrap(),
        )
        .part("model", Part::bytes(model).file_name("model.onnx"));
    app.http
        .post(format!("{}/v1/models", app.base))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

/// Publishes model `name` of the account `key` stands for.
pub(crate) async fn publish(app: &TestApp, key: &str, name: &str) {
    let resp = app
        .http
        .patch(format!("{}/v1/models/{name}", app.base))
        .bearer_auth(key)
        .json(&json!({"published": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// Stored model bytes, counted on disk.
fn stored_objects(app: &TestApp) -> usize {
    fn walk(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
    }
    walk(&app.config.files_dir.join("models"))
}

#[tokio::test]
async fn a_model_is_registered_listed_published_and_deleted() {
    let app = TestApp::spawn().await;
    let (_, owner) = app.customer(1_000_000).await;
    let (_, other) = app.customer(1_000_000).await;
    let bytes = churn(|_| {});

    let resp = upload(&app, &owner, &manifest("churn"), bytes.clone()).await;
    assert_eq!(resp.status(), 201);
    let version: Value = resp.json().await.unwrap();
    let sha = version["sha256"].as_str().unwrap().to_string();
    assert_eq!(sha, xpand_protocol::sha256_hex(&bytes));
    assert_eq!(version["size"], bytes.len());
    assert_eq!(version["manifest"]["price_per_row"], 20);
    // The same bytes again are the same version.
    let again = upload(&app, &owner, &manifest("churn"), bytes.clone()).await;
    assert_eq!(again.status(), 200);
    // A second version: other weights.
    let second = churn(|m| m.graph.as_mut().unwrap().initializer[0].float_data[0] = 2.0);
    assert_eq!(
        upload(&app, &owner, &manifest("churn"), second)
            .await
            .status(),
        201
    );
    let model = app.get_json(&owner, "/v1/models/churn").await;
    assert_eq!(model["owned"], true);
    assert_eq!(model["published"], false);
    assert_eq!(model["versions"].as_array().unwrap().len(), 2);
    // The listing gives each model its own versions.
    let other_model = upload(&app, &owner, &manifest("another"), churn(|_| {})).await;
    assert_eq!(other_model.status(), 201);
    let listed = app.get_json(&owner, "/v1/models").await;
    let counts: Vec<(String, usize)> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["versions"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [("another".to_string(), 1), ("churn".to_string(), 2)]
    );
    assert_eq!(stored_objects(&app), 3);
    let by_prefix = app
        .get_json(&owner, &format!("/v1/models/churn/versions/{}", &sha[..8]))
        .await;
    assert_eq!(by_prefix["sha256"], sha.as_str());
    let latest = app
        .get_json(&owner, "/v1/models/churn/versions/latest")
        .await;
    assert_ne!(latest["sha256"], sha.as_str());

    // Private: another account sees nothing, and cannot take the name.
    assert_eq!(app.get(&other, "/v1/models/churn").await.status(), 404);
    let listed = app.get_json(&other, "/v1/models").await;
    assert_eq!(listed["models"], json!([]));
    let taken = upload(&app, &other, &manifest("churn"), churn(|_| {})).await;
    assert_eq!(taken.status(), 409);
    // Published: it sees the model, not whose it is, and still cannot change it.
    publish(&app, &owner, "churn").await;
    let seen = app.get_json(&other, "/v1/models/churn").await;
    assert_eq!(
        (seen["owned"].clone(), seen["published"].clone()),
        (json!(false), json!(true))
    );
    assert!(seen.get("account_id").is_none());
    let delete = |key: &str, version: &str| {
        app.http
            .delete(format!("{}/v1/models/churn/versions/{version}", app.base))
            .bearer_auth(key.to_string())
            .send()
    };
    assert_eq!(delete(&other, &sha).await.unwrap().status(), 404);

    // A job that runs the model (queued: this gateway has no worker) keeps it from deletion,
    // named in the refusal; once it is canceled, the version goes.
    let rows: Vec<f32> = vec![0.5; 8];
    let job: Value = app
        .post_json(
            &owner,
            "/v1/jobs",
            &json!({"kind": "predict", "max_fee": 100_000, "input": {"model": "churn",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": rows}]}}),
        )
        .await
        .json()
        .await
        .unwrap();
    let job_id = job["id"].as_str().unwrap();
    let resp = delete(&owner, &sha).await.unwrap();
    assert_eq!(resp.status(), 409);
    assert!(problem(resp).await.detail.contains(job_id));
    let canceled = app
        .post_json(&owner, &format!("/v1/jobs/{job_id}/cancel"), &json!({}))
        .await;
    assert_eq!(canceled.status(), 200);

    // Deleting both versions frees the name and the storage; nothing was charged.
    assert_eq!(delete(&owner, &sha).await.unwrap().status(), 204);
    assert_eq!(delete(&owner, "latest").await.unwrap().status(), 204);
    assert_eq!(app.get(&owner, "/v1/models/churn").await.status(), 404);
    assert_eq!(stored_objects(&app), 1, "only the other model is left");
    assert_eq!(app.balances(&owner).await, (1_000_000, 0));
    assert_eq!(
        upload(&app, &other, &manifest("churn"), bytes)
            .await
            .status(),
        201
    );
    app.teardown().await;
}

#[tokio::test]
async fn hostile_or_lying_models_are_refused_by_name_and_leave_nothing() {
    // A quota that holds the model once but not a second, bigger upload.
    let app = TestApp::spawn_with(|c| c.limits.storage_quota_bytes = 2_000_000).await;
    let (_, key) = app.customer(1_000_000).await;
    let external = churn(|m| {
        let w = &mut m.graph.as_mut().unwrap().initializer[0];
        w.float_data.clear();
        w.data_location = DataLocation::EXTERNAL.into();
        let mut location = StringStringEntryProto::new();
        location.key = "location".into();
        location.value = "/etc/shadow".into();
        w.external_data = vec![location];
    });
    let custom = churn(|m| {
        let node = &mut m.graph.as_mut().unwrap().node[1];
        node.domain = "com.example.fast".into();
        node.op_type = "FastSigmoid".into();
    });
    let too_new = churn(|m| m.opset_import[0].version = 99);
    let whole = churn(|_| {});
    let truncated = whole[..whole.len() / 2].to_vec();
    let mut lying = manifest("churn");
    lying["inputs"][0]["datatype"] = json!("FP64");
    lying["outputs"][0]["shape"] = json!([-1, 2]);
    let mut misnamed = manifest("churn");
    misnamed["inputs"][0]["name"] = json!("features");

    let cases: Vec<(&str, Value, Vec<u8>, &str, &str)> = vec![
        (
            "external data",
            manifest("churn"),
            external,
            "model",
            "external file ('/etc/shadow')",
        ),
        (
            "custom op",
            manifest("churn"),
            custom,
            "model",
            "custom domain 'com.example.fast'",
        ),
        ("new opset", manifest("churn"), too_new, "model", "opset 99"),
        (
            "truncated",
            manifest("churn"),
            truncated,
            "model",
            "truncated",
        ),
        (
            "garbage",
            manifest("churn"),
            b"<html>not a model</html>".to_vec(),
            "model",
            "not an ONNX model",
        ),
        (
            "lying datatype",
            lying.clone(),
            whole.clone(),
            "manifest.inputs[0].datatype",
            "FP32",
        ),
        (
            "lying name",
            misnamed,
            whole.clone(),
            "manifest.inputs[0].name",
            "no input 'features'",
        ),
        (
            "bad name",
            manifest("Churn Model"),
            whole.clone(),
            "manifest.name",
            "a-z",
        ),
    ];
    for (what, manifest, model, field, detail) in cases {
        let resp = upload(&app, &key, &manifest, model).await;
        assert_refused(resp, what, field, detail).await;
    }
    // The lying manifest names both of its lies.
    let refused = problem(upload(&app, &key, &lying, whole.clone()).await).await;
    assert!(refused
        .errors
        .iter()
        .any(|e| e.field == "manifest.outputs[0].shape[1]"));

    // Over the size limit (4 MiB in tests): 413. Over the quota: 403.
    let huge = churn(|m| m.graph.as_mut().unwrap().initializer[0].raw_data = vec![0; 5 << 20]);
    assert_eq!(
        upload(&app, &key, &manifest("churn"), huge).await.status(),
        413
    );
    let big = churn(|m| {
        let w = &mut m.graph.as_mut().unwrap().initializer[0];
        w.float_data = vec![0.5; 8 * 40_000];
        w.dims = vec![8, 40_000];
        m.graph.as_mut().unwrap().output = vec![tensor("p", &[None, None])];
    });
    let mut wide = manifest("wide");
    wide["outputs"][0]["shape"] = json!([-1, 40_000]);
    assert_eq!(upload(&app, &key, &wide, big.clone()).await.status(), 201);
    let mut wider = manifest("wider");
    wider["outputs"][0]["shape"] = json!([-1, 40_000]);
    let resp = upload(&app, &key, &wider, big).await;
    assert_eq!(resp.status(), 403);
    assert!(problem(resp).await.detail.contains("storage quota"));
    let resp = app
        .http
        .post(format!("{}/v1/models", app.base))
        .bearer_auth(&key)
        .json(&manifest("churn"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    assert_eq!(problem(resp).await.errors[0].field, "Content-Type");

    // Only the one accepted model is stored; no money moved.
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM models")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(names, ["wide"]);
    assert_eq!(stored_objects(&app), 1);
    assert_eq!(app.balances(&key).await, (1_000_000, 0));
    app.teardown().await;
}
