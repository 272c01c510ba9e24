//! Files: streamed uploads with size and sha256, ranged downloads, owner only, limits enforced
//! while streaming, nothing left behind by a refused upload.

use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::TestApp;

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7919 % 251) as u8).collect()
}

fn stored_objects(app: &TestApp) -> usize {
    let dir = app.config.files_dir.join("files");
    std::fs::read_dir(dir).map_or(0, |d| d.filter_map(Result::ok).count())
}

#[tokio::test]
async fn uploads_stream_in_and_download_whole_or_by_range() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(0).await;
    let (_, other) = app.customer(0).await;
    let bytes = content(3 * 1024 * 1024 + 17);

    // A chunked body, as a browser or backend streaming a video sends it.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let resp = app
        .http
        .post(format!("{}/v1/files", app.base))
        .bearer_auth(&key)
        .header("content-type", "video/mp4")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let file: Value = resp.json().await.unwrap();
    assert_eq!(file["size"], bytes.len());
    assert_eq!(file["sha256"], hex::encode(Sha256::digest(&bytes)));
    assert_eq!(file["content_type"], "video/mp4");
    let id = file["id"].as_str().unwrap();

    let resp = app.get(&key, &format!("/v1/files/{id}")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "video/mp4");
    assert_eq!(resp.headers()["accept-ranges"], "bytes");
    let mut body = resp.bytes_stream();
    let mut downloaded = Vec::new();
    while let Some(chunk) = body.next().await {
        downloaded.extend_from_slice(&chunk.unwrap());
    }
    assert!(downloaded == bytes, "the download is the upload");

    let ranged = |range: &'static str| {
        app.http
            .get(format!("{}/v1/files/{id}", app.base))
            .bearer_auth(&key)
            .header("range", range)
            .send()
    };
    let resp = ranged("bytes=1000-1999").await.unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 1000-1999/{}", bytes.len()).as_str()
    );
    assert_eq!(resp.bytes().await.unwrap(), bytes[1000..2000]);
    let resp = ranged("bytes=-10").await.unwrap();
    assert_eq!(resp.bytes().await.unwrap(), bytes[bytes.len() - 10..]);
    let resp = ranged("bytes=999999999-").await.unwrap();
    assert_eq!(resp.status(), 416);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let resp = ranged("bytes=0-1,5-6").await.unwrap();
    assert_eq!(resp.status(), 422);
    let problem: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "Range", "{problem}");

    assert_eq!(
        app.get(&other, &format!("/v1/files/{id}")).await.status(),
        404
    );
    assert_eq!(
        app.get(&key, &format!("/v1/files/{}", uuid::Uuid::new_v4()))
            .await
            .status(),
        404
    );
    app.teardown().await;
}

/// A download is served as its declared type only when that type is on the gateway's list of
/// video, image and tabular types; anything else (a page, a list of types that a browser reads
/// as HTML) comes back as an opaque attachment, never to be sniffed.
#[tokio::test]
async fn downloads_are_served_only_as_listed_types() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(0).await;
    let page = b"<!doctype html><script>alert(document.domain)</script>".to_vec();
    for (declared, served, disposition) in [
        (
            "image/png, text/html",
            "application/octet-stream",
            "attachment",
        ),
        ("text/html", "application/octet-stream", "attachment"),
        (
            "text/html; charset=utf-8",
            "application/octet-stream",
            "attachment",
        ),
        ("image/svg+xml", "application/octet-stream", "attachment"),
        ("video/mp4x", "application/octet-stream", "attachment"),
        ("text/csv; charset=utf-8", "text/csv", "attachment"),
        ("application/json", "application/json", "attachment"),
        ("Video/MP4", "video/mp4", "inline"),
        ("image/png", "image/png", "inline"),
    ] {
        let resp = app
            .http
            .post(format!("{}/v1/files", app.base))
            .bearer_auth(&key)
            .header("content-type", declared)
            .body(page.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{declared}");
        let file: Value = resp.json().await.unwrap();
        let resp = app
            .get(&key, &format!("/v1/files/{}", file["id"].as_str().unwrap()))
            .await;
        assert_eq!(resp.status(), 200);
        let headers = resp.headers();
        assert_eq!(headers["content-type"], served, "{declared}");
        let given = headers["content-disposition"].to_str().unwrap();
        assert!(given.starts_with(disposition), "{declared}: {given}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{declared}");
        assert_eq!(
            resp.bytes().await.unwrap(),
            page,
            "the bytes are as uploaded"
        );
    }
    app.teardown().await;
}

#[tokio::test]
async fn refused_uploads_leave_nothing_behind() {
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(0).await;
    let limit = app.config.max_upload_bytes as usize;
    // One good upload, so "nothing else" below is measured against a store that is in use.
    let resp = app
        .http
        .post(format!("{}/v1/files", app.base))
        .bearer_auth(&key)
        .body(content(1000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    // Declared too large: refused before reading.
    let resp = app
        .http
        .post(format!("{}/v1/files", app.base))
        .bearer_auth(&key)
        .body(content(limit + 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    // Streamed without a length: refused while streaming, once past the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = content(limit + 100_000)
        .chunks(256 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let resp = app
        .http
        .post(format!("{}/v1/files", app.base))
        .bearer_auth(&key)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    // The server may answer 413 and close before the client finished sending.
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), 413);
        let problem: Value = resp.json().await.unwrap();
        assert_eq!(
            problem["type"],
            "https://xpand.dev/problems/payload-too-large"
        );
    }

    let resp = app
        .http
        .post(format!("{}/v1/files", app.base))
        .bearer_auth(&key)
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);

    let resp = app
        .http
        .post(format!("{}/v1/files", app.base))
        .body(content(10))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM files")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        (rows, stored_objects(&app)),
        (1, 1),
        "only the good upload remains"
    );
    app.teardown().await;
}
