//! Browser pages on other origins (a spreadsheet add-in's task pane, a web app's front end):
//! closed unless the origin is listed in `XPAND_CORS_ORIGINS`; a listed origin's preflights
//! are answered and its responses, refusals included, are readable; an unlisted origin gets no
//! CORS header and its page cannot read a thing, which headless Chromium confirms.

use std::path::Path;
use std::process::Command;

use reqwest::header::{HeaderMap, ORIGIN};
use reqwest::{Method, StatusCode};

use crate::common::TestApp;

/// A page on its own origin (`http://127.0.0.1:<port>`), as an add-in's task pane would be.
async fn page_server() -> String {
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(|| async {
            axum::response::Html("<!doctype html><title>an add-in's task pane</title>")
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    origin
}

/// The preflight a browser sends before a page's authorized JSON POST.
async fn preflight(app: &TestApp, origin: &str, path: &str) -> (StatusCode, HeaderMap) {
    let resp = app
        .http
        .request(Method::OPTIONS, format!("{}{path}", app.base))
        .header(ORIGIN, origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,idempotency-key,prefer",
        )
        .send()
        .await
        .unwrap();
    (resp.status(), resp.headers().clone())
}

fn allowed_origin(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn no_other_origin_may_call_by_default() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(1_000_000).await;
    let origin = "http://127.0.0.1:1";
    let (status, headers) = preflight(&app, origin, "/v1/jobs").await;
    assert_eq!(allowed_origin(&headers), None, "{status} {headers:?}");
    let resp = app
        .http
        .get(format!("{}/v1/account", app.base))
        .bearer_auth(&key)
        .header(ORIGIN, origin)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "same-origin and server callers are unaffected"
    );
    assert_eq!(allowed_origin(resp.headers()), None);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_origin_calls_the_api_from_a_browser_and_no_other_can() {
    let (listed, unlisted) = (page_server().await, page_server().await);
    let allowed = listed.clone();
    let mut app = TestApp::spawn_with(move |c| c.cors_origins = vec![allowed]).await;
    app.start_worker().await;
    let (_, key) = app.customer(10_000_000).await;

    // What the browser is told, header by header.
    let (status, headers) = preflight(&app, &listed, "/v1/jobs").await;
    assert!(status.is_success(), "{status}");
    assert_eq!(allowed_origin(&headers), Some(listed.as_str()));
    let allowed_headers = headers["access-control-allow-headers"].to_str().unwrap();
    for name in ["authorization", "content-type", "idempotency-key", "prefer"] {
        assert!(allowed_headers.contains(name), "{allowed_headers}");
    }
    assert!(headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    assert_eq!(
        headers.get("access-control-allow-credentials"),
        None,
        "bearer headers only: no origin is invited to send cookies"
    );
    let (_, headers) = preflight(&app, &unlisted, "/v1/jobs").await;
    assert_eq!(allowed_origin(&headers), None);

    // A refusal is readable by the listed page too, and says it varies by origin.
    let resp = app
        .http
        .get(format!("{}/v1/account", app.base))
        .header(ORIGIN, &listed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(allowed_origin(resp.headers()), Some(listed.as_str()));
    assert!(resp.headers()["vary"].to_str().unwrap().contains("origin"));

    // And as a browser sees it.
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/cors.mjs");
    let modules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/node_modules/playwright-core"
    );
    assert!(
        Path::new(modules).is_dir(),
        "playwright-core is missing: run scripts/setup-browser.sh (make test does)"
    );
    let (base, key_arg) = (app.base.clone(), key.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .args([driver, &base, &key_arg, &listed, &unlisted])
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser check failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (available, held) = app.balances(&key).await;
    assert_eq!(held, 0);
    assert!(
        available < 10_000_000,
        "the page's job was paid for: {report}"
    );
    app.teardown().await;
}
