//! API keys an owner controls (issue "Nothing for free, nothing after revocation"): created
//! with a name and scopes, listed without their secrets, revoked by their owner only, and a
//! revocation that reaches every door within about a second or two: REST, tokens minted from the
//! key, and event streams and WebSockets already open with either, on any replica.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;
use xpand::accounts::{ApiKey, Scope};
use xpand::http::account::TokenResponse;
use xpand::http::keys::{CreatedKey, KeyList};
use xpand::jobs::Job;

use crate::common::{forecast_job, problem, read, TestApp};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn create_key(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.post_json(key, "/v1/account/keys", &body).await
}

async fn revoke(app: &TestApp, key: &str, id: Uuid) -> reqwest::Response {
    app.http
        .delete(format!("{}/v1/account/keys/{id}", app.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

async fn mint(app: &TestApp, key: &str) -> String {
    let resp = app.post_json(key, "/v1/auth/token", &json!({})).await;
    assert_eq!(resp.status(), 200);
    read::<TokenResponse>(resp).await.token
}

/// A WebSocket on `base`, its credential in the header (an API key) or the URL (a token).
async fn socket(base: &str, credential: &str) -> Socket {
    let ws = base.replace("http://", "ws://");
    let request = if credential.starts_with("xp_") {
        let mut request = format!("{ws}/v1/ws").into_client_request().unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {credential}").parse().unwrap(),
        );
        request
    } else {
        format!("{ws}/v1/ws?token={credential}")
            .into_client_request()
            .unwrap()
    };
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// Reads `socket` until the server closes it: the close code and reason, and when.
async fn closed(mut socket: Socket) -> (u16, String, Instant) {
    tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(message) = socket.next().await {
            if let Ok(Message::Close(Some(frame))) = message {
                return (
                    u16::from(frame.code),
                    frame.reason.to_string(),
                    Instant::now(),
                );
            }
        }
        panic!("the socket ended without a close frame");
    })
    .await
    .expect("the socket stayed open 15 s")
}

/// An SSE stream of job `id`, its credential in the header (an API key) or the URL (a token).
async fn events(app: &TestApp, credential: &str, id: Uuid) -> reqwest::Response {
    let url = format!("{}/v1/jobs/{id}/events", app.base);
    let request = if credential.starts_with("xp_") {
        app.http.get(url).bearer_auth(credential)
    } else {
        app.http.get(format!("{url}?token={credential}"))
    };
    let resp = request.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

/// Reads an SSE stream until it ends: the `data` of its last `event: error` (the problem that
/// ended it), and when it ended.
async fn stream_end(resp: reqwest::Response) -> (Value, Instant) {
    tokio::time::timeout(Duration::from_secs(15), async {
        let mut body = resp.bytes_stream();
        let mut text = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        let ended = Instant::now();
        let error = text
            .split("\n\n")
            .filter(|event| event.lines().any(|l| l == "event: error"))
            .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
            .last()
            .unwrap_or_else(|| panic!("the stream ended without an error event: {text}"));
        (serde_json::from_str(error).unwrap(), ended)
    })
    .await
    .expect("the stream stayed open 15 s")
}

#[tokio::test]
async fn an_owner_creates_lists_and_revokes_a_key_and_every_door_shuts() {
    let app = TestApp::spawn().await;
    let replica = app.replica().await;
    let (_, owner) = app.customer(50_000_000).await;

    let resp = create_key(
        &app,
        &owner,
        json!({"name": "ci runner", "scopes": ["jobs:write", "jobs:read"]}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let created: CreatedKey = read(resp).await;
    let key = created.key.clone();
    assert!(key.starts_with("xp_") && key.starts_with(&created.api_key.prefix));
    assert_eq!(created.api_key.name, "ci runner");
    assert_eq!(created.api_key.scopes, [Scope::JobsRead, Scope::JobsWrite]);
    assert!(created.api_key.revoked_at.is_none());
    assert!(created.api_key.last_used_at.is_none());

    // The key works within its scopes, and only those.
    let (status, job) = app.submit(&key, &forecast_job(2, 3)).await;
    assert_eq!(status, 201);
    assert_eq!(app.get(&key, "/v1/account").await.status(), 403);
    let resp = app
        .post_json(&key, "/v1/auth/token", &json!({"scopes": ["account:read"]}))
        .await;
    assert_eq!(resp.status(), 403, "a token got a scope its key lacks");
    let token = mint(&app, &key).await;
    assert_eq!(app.get(&token, "/v1/account").await.status(), 403);
    assert_eq!(app.get(&token, "/v1/jobs").await.status(), 200);

    // Listed, the secrets never are.
    let resp = app.get(&owner, "/v1/account/keys").await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(!text.contains(&key[3..]) && !text.contains(&owner[3..]));
    let list: KeyList = serde_json::from_str(&text).unwrap();
    assert_eq!(list.keys.len(), 2);
    assert!(list.keys.iter().any(|k| k.id == created.api_key.id));
    // Its use is recorded (off the request's path, so soon rather than at once).
    let used = Instant::now();
    loop {
        let list: KeyList = app.get_as(&owner, "/v1/account/keys").await;
        let listed = list.keys.iter().find(|k| k.id == created.api_key.id);
        if listed.unwrap().last_used_at.is_some() {
            break;
        }
        assert!(
            used.elapsed() < Duration::from_secs(3),
            "the key's use was not recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every door the key and its token opened: event streams and sockets, on this replica
    // and on another, where only the cache's freshness bounds how late the news arrives.
    let sse_key = events(&app, &key, job.id).await;
    let sse_token = events(&app, &token, job.id).await;
    let ws_key = socket(&app.base, &key).await;
    let ws_token = socket(&app.base, &token).await;
    let ws_replica = socket(&replica.base, &token).await;
    let (before, held_before) = app.balances(&owner).await;
    // Let every stream settle into its watch before the revocation.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let resp = revoke(&app, &owner, created.api_key.id).await;
    let revoked_at = Instant::now();
    assert_eq!(resp.status(), 200);
    let revoked: ApiKey = read(resp).await;
    assert!(revoked.revoked_at.is_some());

    let (sse_key, sse_token, ws_key, ws_token, ws_replica) = tokio::join!(
        stream_end(sse_key),
        stream_end(sse_token),
        closed(ws_key),
        closed(ws_token),
        closed(ws_replica),
    );
    for (door, (p, at)) in [("SSE (API key)", sse_key), ("SSE (token)", sse_token)] {
        let took = at - revoked_at;
        println!("revocation to close, {door}: {} ms", took.as_millis());
        assert_eq!(p["status"], 401, "{door}: {p}");
        assert!(p["detail"].as_str().unwrap().contains("revoked"), "{p}");
        assert!(took < Duration::from_millis(2_500), "{door} took {took:?}");
    }
    for (door, (code, reason, at)) in [
        ("WebSocket (API key)", ws_key),
        ("WebSocket (token)", ws_token),
        ("WebSocket (token, other replica)", ws_replica),
    ] {
        let took = at - revoked_at;
        println!("revocation to close, {door}: {} ms", took.as_millis());
        assert_eq!(code, xpand::http::ws::CLOSE_KEY_REVOKED, "{door}");
        assert_eq!(reason, "api key revoked");
        assert!(took < Duration::from_millis(2_500), "{door} took {took:?}");
    }

    // REST with the key or its token: 401, and nothing is charged.
    assert_eq!(app.get(&key, "/v1/jobs").await.status(), 401);
    assert_eq!(app.get(&token, "/v1/jobs").await.status(), 401);
    let resp = app.post_json(&key, "/v1/jobs", &forecast_job(2, 3)).await;
    assert_eq!(problem(resp).await.status, 401);
    let resp = app.post_json(&token, "/v1/jobs", &forecast_job(2, 3)).await;
    assert_eq!(problem(resp).await.status, 401);
    assert_eq!(app.balances(&owner).await, (before, held_before));
    // New doors stay shut too.
    let url = format!(
        "{}/v1/ws?token={token}",
        replica.base.replace("http://", "ws://")
    );
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");

    // The list shows it revoked; revoking again changes nothing.
    let list: KeyList = app.get_as(&owner, "/v1/account/keys").await;
    let listed = list
        .keys
        .iter()
        .find(|k| k.id == created.api_key.id)
        .unwrap();
    assert_eq!(listed.revoked_at, revoked.revoked_at);
    let again: ApiKey = read(revoke(&app, &owner, created.api_key.id).await).await;
    assert_eq!(again.revoked_at, revoked.revoked_at);
    // The owner's own key was never touched.
    let _: Job = app.get_as(&owner, &format!("/v1/jobs/{}", job.id)).await;
    replica.stop().await;
    app.teardown().await;
}

#[tokio::test]
async fn another_account_can_neither_see_nor_revoke_my_key() {
    let app = TestApp::spawn().await;
    let (_, mine) = app.customer(10_000_000).await;
    let (_, theirs) = app.customer(10_000_000).await;
    let created: CreatedKey = read(create_key(&app, &mine, json!({"name": "laptop"})).await).await;
    assert_eq!(created.api_key.scopes, Scope::ALL);

    let list: KeyList = app.get_as(&theirs, "/v1/account/keys").await;
    assert!(list.keys.iter().all(|k| k.id != created.api_key.id));
    assert_eq!(list.keys.len(), 1);
    let p = problem(revoke(&app, &theirs, created.api_key.id).await).await;
    assert_eq!(p.status, 404);
    // An id that is nobody's reads the same.
    let p = problem(revoke(&app, &theirs, Uuid::now_v7()).await).await;
    assert_eq!(p.status, 404);
    assert_eq!(app.get(&created.key, "/v1/account").await.status(), 200);
    app.teardown().await;
}

#[tokio::test]
async fn keys_cannot_grant_more_than_they_hold_and_bad_requests_name_the_field() {
    let app = TestApp::spawn().await;
    let (_, owner) = app.customer(10_000_000).await;
    let manager: CreatedKey = read(
        create_key(
            &app,
            &owner,
            json!({"name": "manager", "scopes": ["account:read", "jobs:read"]}),
        )
        .await,
    )
    .await;
    let worker: CreatedKey = read(
        create_key(
            &app,
            &owner,
            json!({"name": "worker", "scopes": ["jobs:write"]}),
        )
        .await,
    )
    .await;

    // More than the creating key holds: refused, and nothing is created.
    let p = problem(
        create_key(
            &app,
            &manager.key,
            json!({"name": "escalate", "scopes": ["jobs:write"]}),
        )
        .await,
    )
    .await;
    assert_eq!(p.status, 403, "{p:?}");
    assert!(p.detail.contains("jobs:write"));
    // By default a new key gets its creator's scopes, not all.
    let child: CreatedKey =
        read(create_key(&app, &manager.key, json!({"name": "child"})).await).await;
    assert_eq!(child.api_key.scopes, [Scope::JobsRead, Scope::AccountRead]);
    // Without account:read, a key manages nothing; nor does a token, whatever its scopes.
    let p = problem(create_key(&app, &worker.key, json!({"name": "w2"})).await).await;
    assert_eq!(p.status, 403);
    let p = problem(revoke(&app, &worker.key, child.api_key.id).await).await;
    assert_eq!(p.status, 403);
    let token = mint(&app, &owner).await;
    let p = problem(create_key(&app, &token, json!({"name": "from a token"})).await).await;
    assert_eq!(p.status, 403);
    let p = problem(revoke(&app, &token, child.api_key.id).await).await;
    assert_eq!(p.status, 403);
    assert_eq!(app.get(&token, "/v1/account/keys").await.status(), 200);

    for (body, field) in [
        (json!({"name": ""}), "name"),
        (json!({"name": "   "}), "name"),
        (json!({"name": "x".repeat(65)}), "name"),
        (json!({"name": "bell\u{7}"}), "name"),
        (json!({"scopes": ["jobs:read"]}), "name"),
        (json!({"name": "n", "scopes": []}), "scopes"),
        (json!({"name": "n", "scopes": ["admin"]}), "scopes[0]"),
        (json!({"name": "n", "scopes": "jobs:read"}), "scopes"),
        (json!({"name": "n", "owner": "someone"}), "owner"),
    ] {
        let p = problem(create_key(&app, &owner, body.clone()).await).await;
        assert_eq!(p.status, 422, "{body}: {p:?}");
        assert!(
            p.errors.iter().any(|e| e.field == field),
            "{body}: expected field {field}, got {p:?}"
        );
    }
    let list: KeyList = app.get_as(&owner, "/v1/account/keys").await;
    assert_eq!(list.keys.len(), 4, "a refused request created a key");
    let child = list.keys.iter().find(|k| k.id == child.api_key.id);
    assert_eq!(child.unwrap().last_used_at, None, "a key never used");
    app.teardown().await;
}

#[tokio::test]
async fn an_event_stream_ends_when_its_token_expires() {
    let app = TestApp::spawn().await;
    let (account, key) = app.customer(10_000_000).await;
    let (_, job) = app.submit(&key, &forecast_job(2, 3)).await;
    let key_id: Uuid = sqlx::query_scalar("SELECT id FROM api_keys WHERE account_id = $1")
        .bind(account)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let token = app
        .state
        .jwt
        .issue(account, key_id, &Scope::ALL, Duration::from_secs(2))
        .unwrap();
    let opened = Instant::now();
    let (p, ended) = stream_end(events(&app, &token, job.id).await).await;
    assert_eq!(p["status"], 401, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("expired"), "{p}");
    let lived = ended - opened;
    assert!(
        lived > Duration::from_millis(900) && lived < Duration::from_secs(4),
        "a 2 s token's stream lived {lived:?}"
    );
    app.teardown().await;
}
