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
    let info: Value = app
        .http
        .post(format!("{}/v1/files", app.base))
        .bearer_auth(&key)
        .header("content-type", "text/html")
        .body("<script>alert(document.cookie)</script>")
        .send()
        .await
        .unwrap()
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
