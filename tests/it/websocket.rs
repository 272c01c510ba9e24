//! The spreadsheet add-in's path: a token, one WebSocket, several jobs, partial rows streaming.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{forecast_job, TestApp};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn token(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.post_json(key, "/v1/auth/token", &body).await
}

async fn connect(app: &TestApp, token: &str) -> Socket {
    connect_to(&app.base, token).await
}

async fn connect_to(base: &str, token: &str) -> Socket {
    let url = format!("{}/v1/ws?token={token}", base.replace("http://", "ws://"));
    let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    socket
}

async fn send(socket: &mut Socket, frame: Value) {
    socket.send(Message::text(frame.to_string())).await.unwrap();
}

async fn next_event(socket: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("an event within 60 s")
            .expect("socket open")
            .unwrap();
        if let Message::Text(text) = msg {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

#[tokio::test]
async fn spreadsheet_rows_stream_back_over_one_socket() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    app.start_worker().await;
    let (_, key) = app.customer(50_000_000).await;
    let token: Value = token(&app, &key, json!({})).await.json().await.unwrap();
    let mut socket = connect(&app, token["token"].as_str().unwrap()).await;

    send(
        &mut socket,
        json!({"op": "submit", "ref": "A1:AJ40", "job": forecast_job(40, 12)}),
    )
    .await;
    send(
        &mut socket,
        json!({"op": "submit", "ref": "sheet2", "job": forecast_job(9, 3)}),
    )
    .await;

    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    let mut partials: BTreeMap<String, BTreeMap<i64, Vec<Value>>> = BTreeMap::new();
    let mut finals: BTreeMap<String, Value> = BTreeMap::new();
    while finals.len() < 2 {
        let event = next_event(&mut socket).await;
        match event["event"].as_str().unwrap() {
            "accepted" => {
                ids.insert(
                    event["job"]["id"].as_str().unwrap().into(),
                    event["ref"].as_str().unwrap().into(),
                );
            }
            "partial" => {
                let job = event["job_id"].as_str().unwrap().to_string();
                assert!(!finals.contains_key(&job), "partials come before the end");
                partials.entry(job).or_default().insert(
                    event["offset"].as_i64().unwrap(),
                    event["rows"].as_array().unwrap().clone(),
                );
            }
            "progress" => {}
            "succeeded" => {
                finals.insert(
                    event["job"]["id"].as_str().unwrap().into(),
                    event["job"].clone(),
                );
            }
            other => panic!("unexpected event {other}: {event}"),
        }
    }
    assert_eq!(ids.len(), 2);
    for (id, job) in &finals {
        let rows = match ids[id].as_str() {
            "A1:AJ40" => 40,
            "sheet2" => 9,
            other => panic!("unknown ref {other}"),
        };
        // Concatenating the partials in offset order gives exactly the final output.
        let mut expected_offset = 0;
        let mut stitched = Vec::new();
        for (offset, slice) in &partials[id] {
            assert_eq!(*offset, expected_offset, "slices tile the rows");
            expected_offset += slice.len() as i64;
            stitched.extend(slice.iter().cloned());
        }
        assert_eq!(stitched.len(), rows);
        assert_eq!(&Value::Array(stitched), &job["output"]["forecasts"]);
    }

    send(&mut socket, json!({"op": "ping", "ref": "p"})).await;
    let pong = next_event(&mut socket).await;
    assert_eq!(pong, json!({"event": "pong", "ref": "p"}));
    socket.close(None).await.unwrap();
    app.teardown().await;
}

#[tokio::test]
async fn bad_frames_get_problems_and_the_socket_stays_usable() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(50_000_000).await;
    let token: Value = token(&app, &key, json!({})).await.json().await.unwrap();
    let mut socket = connect(&app, token["token"].as_str().unwrap()).await;

    socket
        .send(Message::text("this is not json"))
        .await
        .unwrap();
    let e = next_event(&mut socket).await;
    assert_eq!(e["event"], "error");
    assert_eq!(
        e["problem"]["type"],
        "https://xpand.dev/problems/malformed-json"
    );

    send(&mut socket, json!({"op": "teleport", "ref": "r1"})).await;
    let e = next_event(&mut socket).await;
    assert_eq!(
        (e["event"].as_str(), e["ref"].as_str()),
        (Some("error"), Some("r1"))
    );
    assert_eq!(e["problem"]["status"], 422);

    let mut bad = forecast_job(3, 2);
    bad["input"]["series"][2][4] = json!("#DIV/0!");
    send(
        &mut socket,
        json!({"op": "submit", "ref": "B7", "job": bad}),
    )
    .await;
    let e = next_event(&mut socket).await;
    assert_eq!(e["ref"], "B7");
    assert_eq!(e["problem"]["errors"][0]["field"], "input.series[2][4]");
    assert_eq!(e["problem"]["errors"][0]["row"], 2);

    send(
        &mut socket,
        json!({"op": "subscribe", "ref": "s", "job_id": uuid::Uuid::new_v4()}),
    )
    .await;
    let e = next_event(&mut socket).await;
    assert_eq!(e["problem"]["status"], 404);

    // Still usable: a good job is accepted (no worker, so it waits), then canceled.
    send(
        &mut socket,
        json!({"op": "submit", "ref": "ok", "job": forecast_job(3, 2)}),
    )
    .await;
    let accepted = next_event(&mut socket).await;
    assert_eq!(accepted["event"], "accepted");
    let id = accepted["job"]["id"].as_str().unwrap();
    send(&mut socket, json!({"op": "cancel", "job_id": id})).await;
    let canceled = next_event(&mut socket).await;
    assert_eq!(canceled["event"], "canceled");
    assert_eq!(app.balances(&key).await, (50_000_000, 0));
    app.teardown().await;
}

#[tokio::test]
async fn tokens_are_scoped_and_checked() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(50_000_000).await;
    let resp = token(
        &app,
        &key,
        json!({"scopes": ["jobs:read"], "ttl_seconds": 120}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let read_only: Value = resp.json().await.unwrap();
    assert_eq!(read_only["expires_in"], 120);
    let read_only = read_only["token"].as_str().unwrap();

    assert_eq!(app.get(read_only, "/v1/jobs").await.status(), 200);
    let resp = app
        .post_json(read_only, "/v1/jobs", &forecast_job(3, 2))
        .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(app.get(read_only, "/v1/account").await.status(), 403);
    // A token cannot mint tokens (that would make it immortal).
    assert_eq!(token(&app, read_only, json!({})).await.status(), 403);
    assert_eq!(
        token(&app, &key, json!({"ttl_seconds": 10})).await.status(),
        422
    );

    // No body at all: every scope, the longest lifetime.
    let resp = app
        .http
        .post(format!("{}/v1/auth/token", app.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let full: Value = resp.json().await.unwrap();
    assert_eq!(full["scopes"].as_array().unwrap().len(), 3);
    assert_eq!(full["expires_in"], 900);

    // A tampered token is refused, over REST and on the WebSocket upgrade.
    let mut forged = read_only.to_string();
    forged.pop();
    forged.push(if read_only.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(app.get(&forged, "/v1/jobs").await.status(), 401);
    let url = format!(
        "{}/v1/ws?token={forged}",
        app.base.replace("http://", "ws://")
    );
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    app.teardown().await;
}

#[tokio::test]
async fn a_socket_on_one_replica_sees_jobs_run_through_another() {
    let mut app = TestApp::spawn().await;
    let replica = app.replica().await;
    let (_, key) = app.customer(50_000_000).await;
    let token: Value = token(&app, &key, json!({})).await.json().await.unwrap();
    let token = token["token"].as_str().unwrap();

    // Submitted over REST to the replica; followed on a socket held by the first gateway.
    let resp = app
        .http
        .post(format!("{}/v1/jobs", replica.base))
        .bearer_auth(&key)
        .json(&forecast_job(16, 4))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let job: Value = resp.json().await.unwrap();
    let mut socket = connect(&app, token).await;
    send(
        &mut socket,
        json!({"op": "subscribe", "ref": "s", "job_id": job["id"]}),
    )
    .await;
    assert_eq!(next_event(&mut socket).await["event"], "subscribed");
    // Only now can the job run; both replicas share the worker's results.
    app.start_worker().await;
    let mut rows = 0;
    loop {
        let event = next_event(&mut socket).await;
        match event["event"].as_str().unwrap() {
            "progress" => {}
            "partial" => rows += event["rows"].as_array().unwrap().len(),
            "succeeded" => {
                assert_eq!(event["job"]["id"], job["id"]);
                break;
            }
            other => panic!("unexpected {other}: {event}"),
        }
    }
    assert_eq!(rows, 16, "every partial reached the other replica's socket");
    let done = app.wait_for_job(&key, job["id"].as_str().unwrap()).await;
    assert_eq!(done["output"]["forecasts"].as_array().unwrap().len(), 16);
    app.assert_ledger_invariants().await;
    replica.stop().await;
    app.teardown().await;
}
