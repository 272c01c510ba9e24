//! The public surface as an attacker or a curious stranger sees it (issue "Nothing leaks"):
//! each test sends what the attacker would and checks both the refusal and that nothing
//! changed — balances, jobs, files.

use serde_json::{json, Value};

use crate::common::{forecast_job, TestApp};

/// What a refused request must leave untouched: the account's balances and its jobs.
async fn footprint(app: &TestApp, key: &str) -> ((i64, i64), usize) {
    let jobs = app.get_json(key, "/v1/jobs?limit=100").await;
    (
        app.balances(key).await,
        jobs["jobs"].as_array().unwrap().len(),
    )
}

async fn problem(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "a {status} must be a problem document"
    );
    (status, resp.json().await.unwrap())
}

fn field_of(problem: &Value) -> &str {
    problem["errors"][0]["field"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn webhooks_to_internal_addresses_are_refused_at_submit() {
    // No allow-list: the production default.
    let app = TestApp::spawn_with(|c| c.egress.allow.clear()).await;
    let (_, key) = app.customer(10_000_000).await;
    let before = footprint(&app, &key).await;
    for url in [
        "http://127.0.0.1:6379/",
        "http://localhost:8080/hook",
        "http://0x7f000001/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/",
        "http://[::1]/",
        "gopher://93.184.216.34/",
    ] {
        let mut job = forecast_job(2, 3);
        job["webhook"] = json!(url);
        let (status, p) = problem(app.post_json(&key, "/v1/jobs", &job).await).await;
        assert_eq!((status, field_of(&p)), (422, "webhook"), "{url}: {p}");
    }
    assert_eq!(footprint(&app, &key).await, before);
    app.teardown().await;
}

#[tokio::test]
async fn nul_characters_are_refused_naming_the_field() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(10_000_000).await;
    let before = footprint(&app, &key).await;
    let (status, p) = problem(app.get(&key, "/v1/jobs?kind=a%00b").await).await;
    assert_eq!((status, field_of(&p)), (422, "kind"));
    let (status, p) = problem(app.get(&key, "/v1/nodes/a%00b").await).await;
    assert_eq!((status, field_of(&p)), (422, "path"));

    let mut job = forecast_job(2, 3);
    job["webhook"] = json!("http://127.0.0.1/\u{0}");
    let (status, p) = problem(app.post_json(&key, "/v1/jobs", &job).await).await;
    assert_eq!((status, field_of(&p)), (422, "webhook"));
    let mut job = forecast_job(2, 3);
    job["input"]["a\u{0}b"] = json!(1);
    let (status, p) = problem(app.post_json(&key, "/v1/jobs", &job).await).await;
    assert_eq!((status, field_of(&p)), (422, "input.a\\u0000b"));
    assert_eq!(footprint(&app, &key).await, before);
    app.teardown().await;
}

#[tokio::test]
async fn loose_bodies_are_refused() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(10_000_000).await;
    let before = footprint(&app, &key).await;
    // Trailing garbage after the JSON value.
    let body = format!("{}xyz", forecast_job(2, 3));
    let resp = app
        .http
        .post(format!("{}/v1/jobs", app.base))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, p) = problem(resp).await;
    assert_eq!(status, 400, "{p}");
    // Unknown keys in `input` are named, as unknown `params` keys are.
    let mut job = forecast_job(2, 3);
    job["input"]["colour"] = json!("red");
    let (status, p) = problem(app.post_json(&key, "/v1/jobs", &job).await).await;
    assert_eq!((status, field_of(&p)), (422, "input.colour"));
    assert_eq!(footprint(&app, &key).await, before);

    // A token without jobs:write: the detail says what is missing, in one sentence.
    let token: Value = app
        .post_json(&key, "/v1/auth/token", &json!({"scopes": ["jobs:read"]}))
        .await
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap();
    let (status, p) = problem(app.post_json(token, "/v1/jobs", &forecast_job(2, 3)).await).await;
    assert_eq!(status, 403);
    assert_eq!(p["detail"], "the credential lacks scope jobs:write");
    assert_eq!(footprint(&app, &key).await, before);
    app.teardown().await;
}

#[tokio::test]
async fn uploaded_pages_download_instead_of_running_in_our_origin() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(10_000_000).await;
    let page = b"<script>alert(document.cookie)</script>".to_vec();
    let info: Value = upload_as(&app, &key, "text/html", page)
        .await
        .json()
        .await
        .unwrap();
    let resp = app
        .get(&key, &format!("/v1/files/{}", info["id"].as_str().unwrap()))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let disposition = resp.headers()["content-disposition"].to_str().unwrap();
    assert!(disposition.starts_with("attachment"), "{disposition}");
    app.teardown().await;
}

#[tokio::test]
async fn metrics_labels_stay_bounded_whatever_the_method() {
    let app = TestApp::spawn().await;
    for i in 0..200 {
        let method = reqwest::Method::from_bytes(format!("X{i:04}Y").as_bytes()).unwrap();
        let resp = app
            .http
            .request(method, format!("{}/v1/jobs/{i}", app.base))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_client_error());
    }
    let metrics = app.metrics().await;
    assert!(metrics.contains("method=\"other\""));
    assert!(!metrics.contains("X0001Y"), "a raw method became a label");
    let series = metrics
        .lines()
        .filter(|l| l.starts_with("xpand_http_requests_total{"))
        .count();
    assert!(
        series < 10,
        "{series} request series after 200 odd requests"
    );
    app.teardown().await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A token for `account`, minted from its first API key, valid `secs` seconds (shorter than
/// `/v1/auth/token` grants).
async fn token_for(app: &TestApp, account: uuid::Uuid, secs: u64) -> String {
    let key: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM api_keys WHERE account_id = $1 ORDER BY id LIMIT 1")
            .bind(account)
            .fetch_one(&app.db)
            .await
            .unwrap();
    app.state
        .jwt
        .issue(
            account,
            key,
            &xpand::http::auth::Scope::ALL,
            std::time::Duration::from_secs(secs),
        )
        .unwrap()
}

async fn open_socket(app: &TestApp, token: &str) -> Socket {
    let url = format!(
        "{}/v1/ws?token={token}",
        app.base.replace("http://", "ws://")
    );
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_cut_and_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(|c| {
        c.limits.header_timeout = std::time::Duration::from_secs(1);
        c.limits.max_connections = 8;
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut slow = Vec::new();
    for _ in 0..24 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    // Each trickling client is disconnected when its header time runs out; the ones beyond the
    // cap waited in the backlog and get the same treatment once accepted.
    for mut s in slow {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(std::time::Duration::from_secs(15), s.read(&mut buf))
            .await
            .expect("a slow-header connection was held past its timeout");
        assert!(matches!(read, Ok(0) | Err(_)) || buf.starts_with(b"HTTP/1.1 408"));
    }
    // An idle keep-alive connection is closed the same way.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), idle.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection stayed open"
    );
    // And the server still answers.
    assert_eq!(app.get_public("/healthz").await.status(), 200);
    app.teardown().await;
}

#[tokio::test]
async fn oversized_headers_get_a_problem_document() {
    let app = TestApp::spawn().await;
    let mut request = app.http.get(format!("{}/v1/account", app.base));
    for i in 0..150 {
        request = request.header(format!("x-filler-{i}"), "x".repeat(300));
    }
    let (status, p) = problem(request.send().await.unwrap()).await;
    assert_eq!(status, 431, "{p}");
    app.teardown().await;
}

#[tokio::test]
async fn each_credential_is_rate_limited_across_its_requests() {
    let app = TestApp::spawn_with(|c| c.limits.requests_per_sec = 5).await;
    let (_, key) = app.customer(10_000_000).await;
    let mut limited = None;
    for _ in 0..40 {
        let resp = app.get(&key, "/v1/account").await;
        if resp.status() == 429 {
            limited = Some(resp);
            break;
        }
    }
    let resp = limited.expect("40 requests at once passed a limit of 5 per second");
    assert_eq!(resp.headers()["retry-after"], "1");
    let (_, p) = problem(resp).await;
    assert!(p["type"].as_str().unwrap().ends_with("rate-limited"));
    // A submit refused by the limit creates nothing.
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let mut refused = 0;
    for _ in 0..20 {
        if app
            .post_json(&key, "/v1/jobs", &forecast_job(2, 3))
            .await
            .status()
            == 429
        {
            refused += 1;
        }
    }
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(refused > 0);
    assert_eq!(after - before, 20 - refused);
    app.teardown().await;
}

#[tokio::test]
async fn urls_carry_tokens_never_api_keys_and_sse_follows_with_one() {
    let app = TestApp::spawn().await;
    let (account, key) = app.customer(10_000_000).await;
    let ws = format!("{}/v1/ws?token={key}", app.base.replace("http://", "ws://"));
    match tokio_tungstenite::connect_async(ws).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!(
            "an API key in the URL opened a socket: {:?}",
            other.map(|_| ())
        ),
    }
    let job: Value = app
        .post_json(&key, "/v1/jobs", &forecast_job(2, 3))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let events = format!("{}/v1/jobs/{id}/events", app.base);
    let resp = app
        .http
        .get(format!("{events}?token={key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let token = token_for(&app, account, 60).await;
    let resp = app
        .http
        .get(format!("{events}?token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    app.teardown().await;
}

/// A client text frame as RFC 6455 lays it out (masked), for writing under tungstenite, which
/// refuses to send anything once it has seen a close.
fn masked_text_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend(u16::try_from(n).expect("a short frame").to_be_bytes());
        }
    }
    frame.extend(mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    frame
}

/// The next text frame on `socket`, as JSON.
async fn next_text(socket: &mut Socket) -> Value {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let next = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("the socket ended: {other:?}"),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), next)
        .await
        .expect("a text frame within 10 s")
}

#[tokio::test]
async fn a_socket_closes_when_its_token_expires_and_charges_nothing_after() {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    let app = TestApp::spawn().await;
    let submit = json!({"op": "submit", "ref": "late", "job": forecast_job(2, 3)}).to_string();

    // The hand-made frame is one the gateway takes: on a live socket it submits a job.
    let (other, other_key) = app.customer(10_000_000).await;
    let mut live = open_socket(&app, &token_for(&app, other, 600).await).await;
    live.get_mut()
        .write_all(&masked_text_frame(&submit))
        .await
        .unwrap();
    let reply = next_text(&mut live).await;
    assert_eq!(reply["event"], "accepted", "{reply}");
    assert_eq!(footprint(&app, &other_key).await.1, 1);

    let (account, key) = app.customer(10_000_000).await;
    let token = token_for(&app, account, 2).await;
    let mut socket = open_socket(&app, &token).await;
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Close(frame) = message {
                return frame;
            }
        }
        None
    })
    .await
    .expect("the socket outlived its token");
    assert_eq!(
        u16::from(closed.unwrap().code),
        xpand::http::ws::CLOSE_TOKEN_EXPIRED
    );
    let before = footprint(&app, &key).await;
    // A client that ignores the close keeps sending: the submit goes out on the connection
    // itself, ahead of the close reply tungstenite has only queued.
    let raw = socket.get_mut();
    if let Err(e) = raw.write_all(&masked_text_frame(&submit)).await {
        // A gateway that already hung up refuses it at the TCP level: as good.
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
    }
    // Nothing was charged or created...
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(footprint(&app, &key).await, before);
    // ...and the gateway hung up without answering.
    let mut after = Vec::new();
    let hung_up = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => after.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(hung_up.is_ok(), "the gateway kept the expired socket open");
    assert!(
        !String::from_utf8_lossy(&after).contains("accepted"),
        "a submit after the close was answered: {}",
        String::from_utf8_lossy(&after)
    );
    app.teardown().await;
}

#[tokio::test]
async fn an_oversized_frame_gets_1009_and_a_burst_does_not_delay_pongs() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let app = TestApp::spawn().await;
    let (account, _) = app.customer(1_000_000_000).await;
    let token = token_for(&app, account, 600).await;
    let mut socket = open_socket(&app, &token).await;
    let big = "x".repeat(app.config.max_body_bytes + 1024);
    socket.send(Message::text(big)).await.unwrap();
    let mut code = None;
    while let Some(Ok(message)) = socket.next().await {
        if let Message::Close(Some(frame)) = message {
            code = Some(u16::from(frame.code));
            break;
        }
    }
    assert_eq!(code, Some(1009));

    // 5,000 submits at once, then a ping: the pong is not queued behind the work.
    let mut socket = open_socket(&app, &token).await;
    let burst = 5_000;
    for i in 0..burst {
        let op = json!({"op": "submit", "ref": i.to_string(), "job": forecast_job(2, 3)});
        socket.feed(Message::text(op.to_string())).await.unwrap();
    }
    socket
        .send(Message::Ping(b"keepalive".to_vec().into()))
        .await
        .unwrap();
    let (mut answered, mut pong_after) = (0, None);
    while answered < burst {
        match tokio::time::timeout(std::time::Duration::from_secs(60), socket.next())
            .await
            .expect("ops went unanswered")
        {
            Some(Ok(Message::Pong(_))) => pong_after = Some(answered),
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["event"] == "accepted" || frame["event"] == "error" {
                    answered += 1;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("the socket ended: {other:?}"),
        }
    }
    let pong_after = pong_after.expect("no pong");
    assert!(
        pong_after < burst - 100,
        "the pong came after {pong_after} of {burst} answers"
    );
    app.teardown().await;
}

async fn upload(app: &TestApp, key: &str, bytes: usize) -> reqwest::Response {
    upload_as(app, key, "application/octet-stream", vec![7u8; bytes]).await
}

async fn upload_as(
    app: &TestApp,
    key: &str,
    content_type: &str,
    body: Vec<u8>,
) -> reqwest::Response {
    app.http
        .post(format!("{}/v1/files", app.base))
        .bearer_auth(key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn storage_is_bounded_by_a_quota_and_files_can_be_deleted() {
    let app = TestApp::spawn_with(|c| c.limits.storage_quota_bytes = 1_000).await;
    let (_, key) = app.customer(10_000_000).await;
    let (_, other) = app.customer(10_000_000).await;
    let first: Value = upload(&app, &key, 600).await.json().await.unwrap();
    let first = first["id"].as_str().unwrap().to_string();
    let (status, p) = problem(upload(&app, &key, 600).await).await;
    assert_eq!(status, 403, "{p}");
    assert!(p["type"].as_str().unwrap().ends_with("quota-exceeded"));
    let files: i64 = sqlx::query_scalar("SELECT count(*) FROM files")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(files, 1, "the refused upload left a row");

    // Only the owner may delete; then the bytes are gone and the quota is free again.
    let path = format!("{}/v1/files/{first}", app.base);
    let delete = |who: &str| app.http.delete(&path).bearer_auth(who.to_string()).send();
    assert_eq!(delete(&other).await.unwrap().status(), 404);
    assert_eq!(
        app.get(&key, &format!("/v1/files/{first}")).await.status(),
        200
    );
    assert_eq!(delete(&key).await.unwrap().status(), 204);
    assert_eq!(
        app.get(&key, &format!("/v1/files/{first}")).await.status(),
        404
    );
    assert_eq!(upload(&app, &key, 600).await.status(), 201);
    app.teardown().await;
}

#[tokio::test]
async fn unfinished_jobs_per_account_are_bounded() {
    // No workers: every job stays queued.
    let app = TestApp::spawn_with(|c| c.limits.max_unfinished_jobs = 2).await;
    let (_, key) = app.customer(10_000_000).await;
    for _ in 0..2 {
        let resp = app.post_json(&key, "/v1/jobs", &forecast_job(2, 3)).await;
        assert_eq!(resp.status(), 201);
    }
    let before = footprint(&app, &key).await;
    let (status, p) = problem(app.post_json(&key, "/v1/jobs", &forecast_job(2, 3)).await).await;
    assert_eq!(status, 403, "{p}");
    assert!(p["type"].as_str().unwrap().ends_with("quota-exceeded"));
    assert_eq!(footprint(&app, &key).await, before);
    // Another account is not held back by this one.
    let (_, other) = app.customer(10_000_000).await;
    assert_eq!(
        app.post_json(&other, "/v1/jobs", &forecast_job(2, 3))
            .await
            .status(),
        201
    );
    app.teardown().await;
}

#[tokio::test]
async fn customer_data_expires_and_the_money_stays() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, key) = app.customer(10_000_000).await;
    let job: Value = app
        .post_json(&key, "/v1/jobs", &forecast_job(4, 3))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let done = app.wait_for_job(&key, id).await;
    assert!(done["output"]["forecasts"].is_array());
    let file: Value = upload(&app, &key, 100).await.json().await.unwrap();
    let file = file["id"].as_str().unwrap();
    // Nothing is due yet under the default retention.
    let retention = app.config.limits.retention;
    let nothing = xpand::retention::expire(&app.db, &app.state.files, retention)
        .await
        .unwrap();
    assert_eq!(nothing, xpand::retention::Expired::default());
    let balances = app.balances(&key).await;

    let expired = xpand::retention::expire(&app.db, &app.state.files, std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!((expired.files, expired.jobs), (1, 1));
    let job = app.get_json(&key, &format!("/v1/jobs/{id}")).await;
    assert!(job["output"].is_null());
    assert!(job["data_expired_at"].is_string());
    assert_eq!(job["cost"], done["cost"]);
    assert_eq!(
        app.get(&key, &format!("/v1/files/{file}")).await.status(),
        404
    );
    let leftover: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shards WHERE job_id = $1::uuid AND (output IS NOT NULL OR task <> '{}')",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(leftover, 0, "a shard still holds the job's rows");
    assert_eq!(app.balances(&key).await, balances);
    app.assert_ledger_invariants().await;
    app.teardown().await;
}

/// A token with `claims`, signed with the gateway's own key: what an attacker holding a token
/// would try by editing it, with the signature made good.
fn signed_token(app: &TestApp, claims: &Value) -> String {
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let der = app.config.gateway_key.signing_key().to_pkcs8_der().unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        claims,
        &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn tokens_speak_only_for_a_live_customer_and_only_for_a_while() {
    let app = TestApp::spawn().await;
    let (account, key) = app.customer(10_000_000).await;
    let key_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM api_keys WHERE account_id = $1")
        .bind(account)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let claims = |sub: uuid::Uuid| {
        json!({"sub": sub, "key": key_id, "scope": "jobs:read jobs:write account:read",
               "iat": now, "exp": now + 600, "iss": "xpand"})
    };
    // The control: these claims, signed this way, are a working token.
    let good = signed_token(&app, &claims(account));
    assert_eq!(app.get(&good, "/v1/account/ledger").await.status(), 200);
    let before = footprint(&app, &key).await;

    let unknown = claims(uuid::Uuid::now_v7());
    let system = claims(xpand::ledger::SYSTEM_ACCOUNT);
    let mut keyless = claims(account);
    keyless.as_object_mut().unwrap().remove("key");
    let mut long_lived = claims(account);
    long_lived["exp"] = json!(now + 2 * 3600);
    let mut not_yet = claims(account);
    not_yet["nbf"] = json!(now + 600);
    for (what, claims) in [
        ("an unknown account", unknown),
        ("the system account", system),
        ("no key", keyless),
        ("a two-hour lifetime", long_lived),
        ("nbf in ten minutes", not_yet),
    ] {
        let token = signed_token(&app, &claims);
        let (status, p) = problem(app.get(&token, "/v1/account/ledger").await).await;
        assert_eq!(status, 401, "ledger with {what}: {p}");
        let (status, p) =
            problem(app.post_json(&token, "/v1/jobs", &forecast_job(2, 3)).await).await;
        assert_eq!(status, 401, "submit with {what}: {p}");
        let (status, p) = problem(upload(&app, &token, 100).await).await;
        assert_eq!(status, 401, "upload with {what}: {p}");
    }
    let mut current = claims(account);
    current["nbf"] = json!(now - 10);
    let current = signed_token(&app, &current);
    assert_eq!(app.get(&current, "/v1/account").await.status(), 200);
    assert_eq!(footprint(&app, &key).await, before);

    // The mint endpoint grants no more than the maximum lifetime.
    let max = app.config.token_ttl.as_secs();
    let resp = app
        .post_json(&key, "/v1/auth/token", &json!({"ttl_seconds": max + 1}))
        .await;
    let (status, p) = problem(resp).await;
    assert_eq!((status, field_of(&p)), (422, "ttl_seconds"), "{p}");
    app.teardown().await;
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_counted_either_way() {
    let app = TestApp::spawn_with(|c| c.limits.requests_per_sec = 5).await;
    let (_, key) = app.customer(10_000_000).await;
    let with_scheme = |scheme: &str| {
        app.http
            .get(format!("{}/v1/account", app.base))
            .header("authorization", format!("{scheme} {key}"))
            .send()
    };
    assert_eq!(with_scheme("bearer").await.unwrap().status(), 200);
    assert_eq!(with_scheme("BEARER").await.unwrap().status(), 200);
    assert_eq!(with_scheme("Basic").await.unwrap().status(), 401);
    let mut limited = false;
    for _ in 0..40 {
        if with_scheme("bearer").await.unwrap().status() == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "lowercase requests escaped the rate limit");
    app.teardown().await;
}
