//! The forecast a job returns, checked against ONNX Runtime run directly on the committed model
//! (`workers/models/forecast/`), with the input packed here from the model contract the worker's
//! plugin documents: one row per series, right-aligned in `context_length` columns, left-padded
//! with 0.0 under a 0.0 mask, the first `horizon` output columns kept. Every other forecast test
//! checks shapes, streaming and money; this one checks the numbers.
//!
//! ONNX Runtime allows one environment per process, for the life of the process: the oracle
//! takes this process's, so the worker runs as its own `xpand-worker` process.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use ort::session::Session;
use ort::value::Tensor;
use serde_json::{json, Value};
use xpand_protocol::NodeKey;

use crate::common::{clear_retained, forecasts, read, TestApp, MQTT_HOST, MQTT_PORT};

const MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/workers/models/forecast");

/// Series of every length the contract distinguishes: shorter than the context (padded), exactly
/// the minimum, and longer (only the last `context` values count), with different levels,
/// trends and seasons so that rows cannot pass for one another.
fn series(context: usize, min_history: usize) -> Vec<Vec<f64>> {
    let lengths = [
        min_history,
        10,
        36,
        context - 1,
        context,
        context + 1,
        2 * context + 5,
        48,
        20,
        context + 17,
        7,
    ];
    lengths
        .iter()
        .enumerate()
        .map(|(r, &len)| {
            let r = r as f64;
            (0..len)
                .map(|t| {
                    let t = t as f64;
                    50.0 * (r + 1.0) - 3.0 * r * t.sqrt()
                        + (5.0 + r) * (t * std::f64::consts::TAU / (4.0 + r)).sin()
                })
                .collect()
        })
        .collect()
}

/// The model run directly: `values` and `mask` packed as the contract says, then the first
/// `horizon` columns of `forecast`.
fn onnx_runtime(rows: &[Vec<f64>], context: usize, horizon: usize) -> Vec<Vec<f64>> {
    let mut values = vec![0.0f32; rows.len() * context];
    let mut mask = vec![0.0f32; rows.len() * context];
    for (r, row) in rows.iter().enumerate() {
        let kept = &row[row.len().saturating_sub(context)..];
        let start = r * context + context - kept.len();
        for (i, v) in kept.iter().enumerate() {
            values[start + i] = *v as f32;
            mask[start + i] = 1.0;
        }
    }
    let env = ort::init_from(xpand_worker::default_ort_dylib_path())
        .expect("ONNX Runtime loads (scripts/setup-onnxruntime.sh)")
        .with_name("forecast-oracle")
        .build()
        .unwrap();
    let mut session = Session::builder(&env)
        .unwrap()
        .commit_from_file(format!("{MODEL_DIR}/forecast.onnx"))
        .unwrap();
    let shape = [rows.len(), context];
    let outputs = session
        .run(ort::inputs![
            "values" => Tensor::from_array((shape, values)).unwrap(),
            "mask" => Tensor::from_array((shape, mask)).unwrap(),
        ])
        .unwrap();
    let (shape, data) = outputs["forecast"].try_extract_tensor::<f32>().unwrap();
    let width = shape[1] as usize;
    assert_eq!(shape[0] as usize, rows.len());
    data.chunks(width)
        .map(|row| row[..horizon].iter().map(|v| f64::from(*v)).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forecast_job_returns_what_onnx_runtime_computes_on_the_model() {
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{MODEL_DIR}/manifest.json")).unwrap(),
    )
    .unwrap();
    let context = manifest["context_length"].as_u64().unwrap() as usize;
    let min_history = manifest["min_history"].as_u64().unwrap() as usize;
    let horizon = 7;
    let rows = series(context, min_history);
    let expected = onnx_runtime(&rows, context, horizon);

    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("node.key");
    let node = NodeKey::create_file(&key_file).unwrap();
    xpand::nodes::register(&app.db, node.id(), "oracle-worker")
        .await
        .unwrap();
    let worker = WorkerProcess(
        Command::new(Path::new(env!("CARGO_BIN_EXE_xpand")).with_file_name("xpand-worker"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("--key-file")
            .arg(&key_file)
            .args(["--gateway-key", app.config.gateway_key.id()])
            .env("XPAND_MQTT_URL", format!("mqtt://{MQTT_HOST}:{MQTT_PORT}"))
            .env("XPAND_TOPIC_PREFIX", &app.config.topic_prefix)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("xpand-worker runs (cargo builds it with the workspace)"),
    );
    app.wait_until_alive(node.id()).await;
    let (_, key) = app.customer(50_000_000).await;
    let job = json!({
        "kind": "forecast",
        "input": { "series": rows },
        "params": { "horizon": horizon },
        "max_fee": 10_000_000,
    });
    let resp = app.post_json(&key, "/v1/jobs", &job).await;
    assert_eq!(resp.status(), 201);
    let job: xpand::jobs::Job = read(resp).await;
    // 11 rows at 8 per shard: two shards, put back together in order.
    assert_eq!(job.progress.shards_total, 2);
    let job = app.wait_for(&key, job.id).await;
    let got = forecasts(&job);

    assert_eq!(got.len(), expected.len());
    let mut largest = 0.0f64;
    for (r, (got, expected)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(got.len(), horizon, "row {r}");
        for (t, (g, e)) in got.iter().zip(expected).enumerate() {
            let off = (g - e).abs() / e.abs().max(1.0);
            assert!(
                off <= 1e-4,
                "row {r}, step {t}: the job says {g}, ONNX Runtime {e}"
            );
            largest = largest.max(off);
        }
    }
    eprintln!("the job's forecasts are within {largest:e} (relative) of ONNX Runtime's");
    // The rows differ, so a row out of place cannot pass.
    assert!(expected.windows(2).all(|w| w[0] != w[1]));
    drop(worker);
    clear_retained(&app.config.topic_prefix, &[node.id().to_string()]).await;
    app.teardown().await;
}

/// The worker process, killed when the test ends or fails.
struct WorkerProcess(Child);

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
