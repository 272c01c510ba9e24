//! The spreadsheet add-in's path: a token, one WebSocket, several jobs, partial rows streaming.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;
use xpand::error::Problem;
use xpand::http::account::TokenResponse;
use xpand::http::ws::Reply;
use xpand::jobs::{Job, JobEvent};

use xpand_protocol::ForecastInterval;

use crate::common::{
    forecast_job, forecasts, parse, parse_value, partial_rows, read, ForecastOutput, TestApp,
};

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

async fn next_text(socket: &mut Socket) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("an event within 60 s")
            .expect("socket open")
            .unwrap();
        if let Message::Text(text) = msg {
            return text.to_string();
        }
    }
}

/// A server → client frame: a reply to an op, or an event about a job.
#[derive(Debug)]
enum Frame {
    Reply(Reply),
    Event(JobEvent),
}

/// The next frame, read as the API's own `Reply` or `JobEvent` (a frame that fits neither
/// fails the test, saying why it fits neither).
async fn next_frame(socket: &mut Socket) -> Frame {
    let text = next_text(socket).await;
    let de = &mut serde_json::Deserializer::from_str(&text);
    let reply_error = match serde_path_to_error::deserialize(de) {
        Ok(reply) => return Frame::Reply(reply),
        Err(e) => e,
    };
    let de = &mut serde_json::Deserializer::from_str(&text);
    match serde_path_to_error::deserialize(de) {
        Ok(event) => Frame::Event(event),
        Err(event_error) => {
            panic!("neither a Reply ({reply_error}) nor a JobEvent ({event_error}): {text}")
        }
    }
}

/// The next frame, which must be an `error` reply: its `ref` and problem.
async fn next_error(socket: &mut Socket) -> (Option<String>, Problem) {
    match next_frame(socket).await {
        Frame::Reply(Reply::Error { reference, problem }) => (reference, *problem),
        other => panic!("expected an error frame: {other:?}"),
    }
}

#[tokio::test]
async fn spreadsheet_rows_stream_back_over_one_socket() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    app.start_worker().await;
    let (_, key) = app.customer(50_000_000).await;
    let token: TokenResponse = read(token(&app, &key, json!({})).await).await;
    let mut socket = connect(&app, &token.token).await;

    // The range asks for 80 % and 95 % intervals, with the season named.
    let mut with_levels = forecast_job(40, 12);
    with_levels["params"]["level"] = json!([95, 80]);
    with_levels["params"]["season_length"] = json!(12);
    send(
        &mut socket,
        json!({"op": "submit", "ref": "A1:AJ40", "job": with_levels}),
    )
    .await;
    send(
        &mut socket,
        json!({"op": "submit", "ref": "sheet2", "job": forecast_job(9, 3)}),
    )
    .await;

    let mut ids: BTreeMap<Uuid, String> = BTreeMap::new();
    let mut partials: BTreeMap<Uuid, BTreeMap<i32, Vec<Vec<f64>>>> = BTreeMap::new();
    let mut partial_bands: BTreeMap<Uuid, BTreeMap<i32, Vec<ForecastInterval>>> = BTreeMap::new();
    let mut finals: BTreeMap<Uuid, Job> = BTreeMap::new();
    while finals.len() < 2 {
        match next_frame(&mut socket).await {
            Frame::Reply(Reply::Accepted { reference, job }) => {
                ids.insert(job.id, reference.unwrap());
            }
            Frame::Event(JobEvent::Partial {
                job_id,
                offset,
                rows,
                intervals,
                ..
            }) => {
                assert!(
                    !finals.contains_key(&job_id),
                    "partials come before the end"
                );
                let bands: Vec<ForecastInterval> =
                    intervals.map(|v| parse_value(&v)).unwrap_or_default();
                partial_bands
                    .entry(job_id)
                    .or_default()
                    .insert(offset, bands);
                partials
                    .entry(job_id)
                    .or_default()
                    .insert(offset, partial_rows(&rows));
            }
            Frame::Event(JobEvent::Progress { .. }) => {}
            Frame::Event(JobEvent::Succeeded { job }) => {
                finals.insert(job.id, *job);
            }
            other => panic!("unexpected frame {other:?}"),
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
            expected_offset += slice.len() as i32;
            stitched.extend(slice.iter().cloned());
        }
        assert_eq!(stitched.len(), rows);
        assert_eq!(stitched, forecasts(job));
        // Bands: as many as levels asked, in the order asked, streamed with their rows (one
        // shard's slice per partial, in offset order here), each holding its forecast and the
        // wider level holding the narrower.
        let output: ForecastOutput = parse_value(job.output.as_ref().unwrap());
        let mut bands: Vec<ForecastInterval> = Vec::new();
        for slice in partial_bands[id].values() {
            if bands.is_empty() {
                bands = slice.clone();
            } else {
                for (all, band) in bands.iter_mut().zip(slice) {
                    all.lower.extend(band.lower.iter().cloned());
                    all.upper.extend(band.upper.iter().cloned());
                }
            }
        }
        assert_eq!(bands, output.intervals);
        if ids[id] == "sheet2" {
            assert!(output.intervals.is_empty());
            continue;
        }
        let [ninety_five, eighty] = output.intervals.as_slice() else {
            panic!("two levels asked: {:?}", output.intervals);
        };
        assert_eq!((ninety_five.level, eighty.level), (95.0, 80.0));
        for (r, row) in output.forecasts.iter().enumerate() {
            for (h, f) in row.iter().enumerate() {
                let (lo95, lo80) = (ninety_five.lower[r][h], eighty.lower[r][h]);
                let (hi80, hi95) = (eighty.upper[r][h], ninety_five.upper[r][h]);
                assert!(
                    lo95 < lo80 && lo80 < *f && *f < hi80 && hi80 < hi95,
                    "row {r} step {h}: {lo95} {lo80} {f} {hi80} {hi95}"
                );
            }
        }
    }

    send(&mut socket, json!({"op": "ping", "ref": "p"})).await;
    // Raw on purpose: the pong's exact wire shape, with nothing else in it.
    let pong: Value = parse(&next_text(&mut socket).await);
    assert_eq!(pong, json!({"event": "pong", "ref": "p"}));
    socket.close(None).await.unwrap();
    app.teardown().await;
}

#[tokio::test]
async fn bad_frames_get_problems_and_the_socket_stays_usable() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(50_000_000).await;
    let token: TokenResponse = read(token(&app, &key, json!({})).await).await;
    let mut socket = connect(&app, &token.token).await;

    socket
        .send(Message::text("this is not json"))
        .await
        .unwrap();
    let (_, problem) = next_error(&mut socket).await;
    assert_eq!(
        problem.type_uri,
        "https://xpand.dev/problems/malformed-json"
    );

    send(&mut socket, json!({"op": "teleport", "ref": "r1"})).await;
    let (reference, problem) = next_error(&mut socket).await;
    assert_eq!(reference.as_deref(), Some("r1"));
    assert_eq!(problem.status, 422);

    let mut bad = forecast_job(3, 2);
    bad["input"]["series"][2][4] = json!("#DIV/0!");
    send(
        &mut socket,
        json!({"op": "submit", "ref": "B7", "job": bad}),
    )
    .await;
    let (reference, problem) = next_error(&mut socket).await;
    assert_eq!(reference.as_deref(), Some("B7"));
    assert_eq!(problem.errors[0].field, "input.series[2][4]");
    assert_eq!(problem.errors[0].row, Some(2));

    send(
        &mut socket,
        json!({"op": "subscribe", "ref": "s", "job_id": uuid::Uuid::new_v4()}),
    )
    .await;
    let (_, problem) = next_error(&mut socket).await;
    assert_eq!(problem.status, 404);

    // Still usable: a good job is accepted (no worker, so it waits), then canceled.
    send(
        &mut socket,
        json!({"op": "submit", "ref": "ok", "job": forecast_job(3, 2)}),
    )
    .await;
    let id = match next_frame(&mut socket).await {
        Frame::Reply(Reply::Accepted { job, .. }) => job.id,
        other => panic!("expected accepted: {other:?}"),
    };
    // The cancel is answered with its ref; the socket, following the job, then gets the
    // terminal event too.
    send(
        &mut socket,
        json!({"op": "cancel", "ref": "c1", "job_id": id}),
    )
    .await;
    match next_frame(&mut socket).await {
        Frame::Reply(Reply::CancelAccepted { reference, job }) => {
            assert_eq!((reference.as_deref(), job.id), (Some("c1"), id));
            assert_eq!(job.status, xpand::jobs::JobStatus::Canceled);
        }
        other => panic!("expected the cancel's answer: {other:?}"),
    }
    let canceled = next_frame(&mut socket).await;
    assert!(
        matches!(canceled, Frame::Event(JobEvent::Canceled { .. })),
        "{canceled:?}"
    );
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
    let read_only: TokenResponse = read(resp).await;
    assert_eq!(read_only.expires_in, 120);
    let read_only = read_only.token.as_str();

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
    let full: TokenResponse = read(resp).await;
    assert_eq!(full.scopes.len(), 3);
    assert_eq!(full.expires_in, 900);

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
    let token: TokenResponse = read(token(&app, &key, json!({})).await).await;
    let token = token.token.as_str();

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
    let job: Job = read(resp).await;
    let mut socket = connect(&app, token).await;
    send(
        &mut socket,
        json!({"op": "subscribe", "ref": "s", "job_id": job.id}),
    )
    .await;
    let subscribed = next_frame(&mut socket).await;
    assert!(
        matches!(subscribed, Frame::Reply(Reply::Subscribed { .. })),
        "{subscribed:?}"
    );
    // Only now can the job run; both replicas share the worker's results.
    app.start_worker().await;
    let mut rows = 0;
    loop {
        match next_frame(&mut socket).await {
            Frame::Event(JobEvent::Progress { .. }) => {}
            Frame::Event(JobEvent::Partial { rows: slice, .. }) => {
                rows += partial_rows(&slice).len()
            }
            Frame::Event(JobEvent::Succeeded { job: finished }) => {
                assert_eq!(finished.id, job.id);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(rows, 16, "every partial reached the other replica's socket");
    let done = app.wait_for(&key, job.id).await;
    assert_eq!(forecasts(&done).len(), 16);
    app.assert_ledger_invariants().await;
    replica.stop().await;
    app.teardown().await;
}

/// The problem of a refused WebSocket upgrade.
async fn refused_upgrade(base: &str, token: &str) -> Problem {
    let url = format!("{}/v1/ws?token={token}", base.replace("http://", "ws://"));
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => parse(&String::from_utf8_lossy(
            resp.body().as_deref().unwrap_or_default(),
        )),
        other => panic!("the upgrade was not refused: {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn socket_ops_share_the_rate_limit_and_refused_ops_do_not_run() {
    let limit = xpand::config::Limits::DEFAULT.requests_per_sec;
    let app = TestApp::spawn_with(|c| c.limits.requests_per_sec = limit).await;
    let (_, key) = app.customer(1_000_000_000).await;
    let token: TokenResponse = read(token(&app, &key, json!({})).await).await;
    let (mut flooding, mut stream) = connect(&app, &token.token).await.split();

    // What the stranger did: subscribe ops, 2,000 a second, for 3 s.
    let flood = Duration::from_secs(3);
    let sender = tokio::spawn(async move {
        let (started, mut sent) = (std::time::Instant::now(), 0usize);
        while started.elapsed() < flood {
            for _ in 0..10 {
                let op = json!({"op": "subscribe", "job_id": Uuid::now_v7()});
                flooding.feed(Message::text(op.to_string())).await.unwrap();
                sent += 1;
            }
            flooding.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (flooding, sent)
    });
    let started = std::time::Instant::now();
    // Ops refused by the rate limit, and by the socket's queue of unanswered ops (also a 429).
    let (mut ran, mut limited, mut queue_full, mut answered) = (0usize, 0usize, 0usize, 0usize);
    let rate_limited = format!("more than {limit} requests per second");
    let (mut sent, mut sink) = (None, None);
    let mut sender = Some(sender);
    while sent.is_none_or(|sent| answered < sent) {
        if sender.as_ref().is_some_and(|s| s.is_finished()) {
            let (back, n) = sender.take().unwrap().await.unwrap();
            sink = Some(back);
            sent = Some(n);
            continue;
        }
        let Ok(message) = tokio::time::timeout(Duration::from_millis(200), stream.next()).await
        else {
            continue;
        };
        let Message::Text(text) = message.unwrap().unwrap() else {
            continue;
        };
        let Reply::Error { problem, .. } = parse::<Reply>(&text) else {
            panic!("a subscribe to a job that does not exist succeeded: {text}");
        };
        answered += 1;
        match problem.status {
            // Run: the job was looked up, and is not there.
            404 => ran += 1,
            429 => {
                assert_eq!(problem.retry_after, Some(1), "{problem:?}");
                if problem.detail.contains(&rate_limited) {
                    limited += 1;
                } else {
                    queue_full += 1;
                }
            }
            other => panic!("unexpected {other}: {problem:?}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (sent, mut sink) = (sent.unwrap(), sink.unwrap());
    println!(
        "socket flood at a limit of {limit}/s: {sent} ops sent in {:.1} s, {ran} run \
         ({:.0}/s), {limited} refused by the rate limit, {queue_full} by the full queue",
        flood.as_secs_f64(),
        ran as f64 / elapsed
    );
    assert!(
        limited > sent / 2,
        "{sent} ops in 3 s, {limited} refused by a limit of {limit}/s"
    );
    // Each one-second window lets `limit` through: the flood touches at most 5 of them.
    assert!(
        ran <= limit as usize * 5,
        "{ran} ops ran at {limit}/s in {elapsed:.1} s"
    );

    // Submits over the limit are not run: nothing is created or held for them.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (available, _) = app.balances(&key).await;
    let burst = 3 * limit as usize;
    for i in 0..burst {
        let op = json!({"op": "submit", "ref": i.to_string(), "job": forecast_job(2, 3)});
        sink.feed(Message::text(op.to_string())).await.unwrap();
    }
    sink.flush().await.unwrap();
    let (mut accepted, mut refused) = (Vec::new(), 0);
    while accepted.len() + refused < burst {
        let Message::Text(text) = stream.next().await.unwrap().unwrap() else {
            continue;
        };
        match parse::<Reply>(&text) {
            Reply::Accepted { job, .. } => accepted.push(*job),
            Reply::Error { problem, .. } if problem.status == 429 => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(refused > 0, "{burst} submits at once passed {limit}/s");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(jobs as usize, accepted.len());
    let charged: i64 = accepted.iter().map(|j| j.escrow).sum();
    let (after, held) = app.balances(&key).await;
    assert_eq!((available - after, held), (charged, charged));

    // One counter for every door: REST spent this second's budget, the socket's op is refused.
    let mut shared = false;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        while app.get(&token.token, "/v1/jobs?limit=1").await.status() != 429 {}
        sink.send(Message::text(
            json!({"op": "ping", "ref": "after REST"}).to_string(),
        ))
        .await
        .unwrap();
        let text = loop {
            if let Message::Text(text) = stream.next().await.unwrap().unwrap() {
                break text;
            }
        };
        if let Reply::Error { problem, reference } = parse::<Reply>(&text) {
            assert_eq!(
                (problem.status, reference.as_deref()),
                (429, Some("after REST"))
            );
            shared = true;
            break;
        }
    }
    assert!(
        shared,
        "a socket op ran although REST had used up the limit"
    );
    app.teardown().await;
}

#[tokio::test]
async fn open_streams_per_account_are_capped_on_all_replicas() {
    let app = TestApp::spawn_with(|c| c.limits.max_streams_per_account = 3).await;
    let replica = app.replica().await;
    let (_, key) = app.customer(50_000_000).await;
    let (_, other_key) = app.customer(50_000_000).await;
    let (_, job) = app.submit(&key, &forecast_job(2, 3)).await;
    let minted: TokenResponse = read(token(&app, &key, json!({})).await).await;
    let token = minted.token;
    let other: TokenResponse = read(self::token(&app, &other_key, json!({})).await).await;

    let mut first = connect(&app, &token).await;
    let _second = connect_to(&replica.base, &token).await;
    let events = format!("{}/v1/jobs/{}/events?token={token}", app.base, job.id);
    let third = app.http.get(&events).send().await.unwrap();
    assert_eq!(third.status(), 200);

    // Full, on either replica and for either kind of stream.
    for base in [&app.base, &replica.base] {
        let p = refused_upgrade(base, &token).await;
        assert_eq!(p.status, 429, "{p:?}");
        assert!(p.type_uri.ends_with("too-many-streams"), "{p:?}");
        assert!(p.detail.contains("3 open streams"), "{p:?}");
    }
    let refused = app.http.get(&events).send().await.unwrap();
    let p: Problem = crate::common::problem(refused).await;
    assert_eq!(p.status, 429, "{p:?}");
    // Another account is not affected.
    let _other = connect(&app, &other.token).await;

    // A closed socket frees its place, soon.
    first.close(None).await.unwrap();
    let freed = std::time::Instant::now();
    let url = format!(
        "{}/v1/ws?token={token}",
        app.base.replace("http://", "ws://")
    );
    loop {
        if tokio_tungstenite::connect_async(&url).await.is_ok() {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(3),
            "a closed socket's place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replica.stop().await;
    app.teardown().await;
}
