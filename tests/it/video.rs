//! Video anonymization end to end: real uploads, ffprobe/ffmpeg, workers running CenterFace,
//! segments joined with the original audio; and every bad input refused without a trace.
//!
//! Test clips are made by `xpand_media::clips` with ffmpeg from scikit-image's astronaut photo
//! (installed by `scripts/setup-models.sh`), moving and changing size over an animated
//! background, with a tone for audio.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use xpand_media::clips::{decode_frames, make_clip};
use xpand_worker::face_detect::{self, FaceBox, FaceDetector};

use crate::common::{free_port, TestApp};

fn detector() -> FaceDetector {
    FaceDetector::open(
        concat!(env!("CARGO_MANIFEST_DIR"), "/workers/models/centerface").as_ref(),
        &xpand_worker::default_ort_dylib_path(),
    )
    .expect("the CenterFace model loads (make setup installs it)")
}

/// Sum of absolute Laplacians (luma) inside `b`: how much fine detail the region holds.
fn detail(rgb: &[u8], width: u32, b: &FaceBox) -> f64 {
    let w = width as usize;
    let luma = |x: usize, y: usize| {
        let i = (y * w + x) * 3;
        0.299 * f64::from(rgb[i]) + 0.587 * f64::from(rgb[i + 1]) + 0.114 * f64::from(rgb[i + 2])
    };
    let (x1, y1) = (b.x1.max(1.0) as usize, b.y1.max(1.0) as usize);
    let (x2, y2) = (b.x2 as usize, b.y2 as usize);
    let mut sum = 0.0;
    for y in y1..y2.min(rgb.len() / 3 / w - 1) {
        for x in x1..x2.min(w - 1) {
            sum += (4.0 * luma(x, y)
                - luma(x - 1, y)
                - luma(x + 1, y)
                - luma(x, y - 1)
                - luma(x, y + 1))
            .abs();
        }
    }
    sum
}

/// PSNR (dB) between two frames over the pixels outside every box in `masked`.
fn psnr_outside(a: &[u8], b: &[u8], width: u32, masked: &[FaceBox]) -> f64 {
    let w = width as usize;
    let (mut se, mut n) = (0.0f64, 0u64);
    for (i, (pa, pb)) in a.chunks(3).zip(b.chunks(3)).enumerate() {
        let (x, y) = ((i % w) as f32, (i / w) as f32);
        if masked
            .iter()
            .any(|m| x >= m.x1 && x <= m.x2 && y >= m.y1 && y <= m.y2)
        {
            continue;
        }
        for c in 0..3 {
            let d = f64::from(pa[c]) - f64::from(pb[c]);
            se += d * d;
        }
        n += 3;
    }
    10.0 * (255.0f64.powi(2) / (se / n as f64)).log10()
}

async fn upload(app: &TestApp, key: &str, bytes: Vec<u8>, content_type: &str) -> reqwest::Response {
    app.http
        .post(format!("{}/v1/files", app.base))
        .bearer_auth(key)
        .header("content-type", content_type)
        .body(bytes)
        .send()
        .await
        .unwrap()
}

async fn upload_file(app: &TestApp, key: &str, path: &Path) -> String {
    let resp = upload(app, key, std::fs::read(path).unwrap(), "video/mp4").await;
    assert_eq!(resp.status(), 201);
    resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn anonymize_job(file: &str, params: Value) -> Value {
    json!({"kind": "anonymize", "input": {"file": file}, "params": params, "max_fee": 10_000_000})
}

/// Submits an anonymize job for `file`, which must be accepted; returns the job.
async fn submit_anonymize(app: &TestApp, key: &str, file: &str, params: Value) -> Value {
    let resp = app
        .post_json(key, "/v1/jobs", &anonymize_job(file, params))
        .await;
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert_eq!(status, 201, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn wait_long(app: &TestApp, key: &str, id: &str) -> Value {
    tokio::time::timeout(Duration::from_secs(240), async {
        loop {
            let job = app.get_json(key, &format!("/v1/jobs/{id}")).await;
            if ["succeeded", "failed", "canceled"].contains(&job["status"].as_str().unwrap()) {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the video job ends within 4 minutes")
}

/// Every object in the store but the uploaded files: what jobs staged. It walks the store's
/// root and must find the uploads (each test here uploads first), so a store laid out anew
/// cannot read as empty.
fn staged_objects(app: &TestApp) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("the store's directories are readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let root = &app.config.files_dir;
    let uploads = root.join("files");
    let mut out = Vec::new();
    walk(root, &mut out);
    assert!(
        out.iter().any(|p| p.starts_with(&uploads)),
        "no upload under {}: the walk does not see the store",
        uploads.display()
    );
    out.retain(|p| !p.starts_with(&uploads));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faces_are_masked_across_segments_and_the_audio_survives() {
    let mut app = TestApp::spawn().await;
    let nodes = [app.start_worker().await, app.start_worker().await];
    let (_, key) = app.customer(10_000_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (width, height) = (640, 360);
    let clip = make_clip(dir.path(), width, height, 4, true);
    let file = upload_file(&app, &key, &clip).await;

    // The detector sees the frames at half their width: every face full resolution finds must
    // still be masked (checked below with the full-resolution detector).
    let job = submit_anonymize(
        &app,
        &key,
        &file,
        json!({"style": "blur", "detect_width": 320}),
    )
    .await;
    let id = job["id"].as_str().unwrap();
    // The segments are staged under the job while it runs (so their absence below means
    // they were deleted).
    let staged = staged_objects(&app);
    assert!(
        staged.iter().any(|p| p.to_string_lossy().contains(id)),
        "no segment staged for {id}: {staged:?}"
    );
    let scaled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shards
         WHERE job_id = $1::uuid AND jsonb_path_exists(task, '$.**.detect_width ? (@ == 320)')",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(scaled, job["progress"]["shards_total"].as_i64().unwrap());
    let quote = job["quote"].as_i64().unwrap();
    // 100 frames of 640x360 at 20 µc per megapixel-frame (461), each segment rounded up, plus
    // the job fee.
    let segments = job["progress"]["shards_total"].as_i64().unwrap();
    assert!(
        (2_000 + 461..=2_000 + 461 + segments).contains(&quote),
        "{job}"
    );
    let segments = job["progress"]["shards_total"].as_i64().unwrap();
    assert!(
        segments >= 2,
        "two workers get several segments, got {segments}"
    );

    let job = wait_long(&app, &key, id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["cost"].as_i64(), Some(quote));
    let output = &job["output"];
    assert_eq!(output["frames"], 100);
    assert_eq!(job["progress"]["frames_total"], 100, "{job}");
    assert_eq!(job["progress"]["frames_done"], 100, "{job}");
    assert_eq!(output["segments"].as_i64(), Some(segments));
    assert_eq!(output["audio"], true);
    assert!(output["faces_masked"].as_i64().unwrap() >= 90, "{output}");

    // The result is a new file of the caller's.
    let out_id = output["file"].as_str().unwrap();
    let resp = app.get(&key, &format!("/v1/files/{out_id}")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "video/mp4");
    let masked = dir.path().join("masked.mp4");
    std::fs::write(&masked, resp.bytes().await.unwrap()).unwrap();

    let before = xpand_media::probe(&clip).await.unwrap();
    let after = xpand_media::probe(&masked).await.unwrap();
    assert_eq!(after.frames, before.frames);
    assert_eq!((after.width, after.height), (before.width, before.height));
    assert!((after.duration_seconds - before.duration_seconds).abs() < 0.1);
    assert_eq!(after.audio_codec.as_deref(), Some("aac"));
    assert_eq!(after.codec, "h264");

    // Where a face was, it is gone; everything else is nearly unchanged (which also shows the
    // segments are in order: the background moves every frame).
    let detector = detector();
    let input = decode_frames(&clip, width, height);
    let result = decode_frames(&masked, width, height);
    let (mut faces, mut found_after, mut ratios) = (0, 0, Vec::new());
    for (i, (a, b)) in input.iter().zip(&result).enumerate().step_by(4) {
        let found = detector.detect(a, width, height, 0.5).unwrap();
        assert!(!found.is_empty(), "frame {i} of the test clip shows a face");
        faces += 1;
        if !detector.detect(b, width, height, 0.5).unwrap().is_empty() {
            found_after += 1;
        }
        for face in &found {
            ratios.push(detail(b, width, face) / detail(a, width, face));
        }
        let masked: Vec<FaceBox> = found
            .iter()
            .map(|f| face_detect::scale_box(*f, 1.5, width, height))
            .collect();
        let psnr = psnr_outside(a, b, width, &masked);
        assert!(
            psnr > 30.0,
            "frame {i}: outside the faces PSNR is {psnr:.1} dB"
        );
    }
    assert_eq!(
        found_after, 0,
        "the detector still finds faces in {found_after}/{faces} frames"
    );
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    assert!(
        mean < 0.3,
        "face regions kept {:.0}% of their detail",
        mean * 100.0
    );

    // Workers were paid per segment, exactly what the caller was charged less the job fee.
    let paid: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(fee), 0)::bigint FROM shards WHERE job_id = $1::uuid AND status = 'done'",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(paid, quote - 2_000);
    let earners: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT node_id) FROM shards WHERE job_id = $1::uuid AND node_id = ANY($2)",
    )
    .bind(id)
    .bind(&nodes[..])
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(earners >= 1);
    app.assert_ledger_invariants().await;
    // Segments and uploads are deleted once the job ends.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(staged_objects(&app), Vec::<PathBuf>::new());
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_videos_are_refused_and_leave_nothing_behind() {
    let app = TestApp::spawn_with(|c| c.max_video_seconds = 3).await;
    let (_, key) = app.customer(10_000_000).await;
    let (_, stranger) = app.customer(10_000_000).await;
    let dir = tempfile::tempdir().unwrap();
    let long_clip = make_clip(dir.path(), 320, 240, 4, false);
    let short_clip = make_clip(dir.path(), 320, 240, 2, true);
    let bytes = std::fs::read(&short_clip).unwrap();

    let mut cases: Vec<(&str, String)> = Vec::new();
    let text = upload(
        &app,
        &key,
        b"just some words, not a video".to_vec(),
        "text/plain",
    )
    .await;
    cases.push((
        "not a video",
        text.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .into(),
    ));
    let mut truncated = bytes.clone();
    truncated.truncate(bytes.len() / 2);
    let resp = upload(&app, &key, truncated, "video/mp4").await;
    cases.push((
        "truncated",
        resp.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .into(),
    ));
    let playlist_url =
        "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n";
    let resp = upload(
        &app,
        &key,
        playlist_url.into(),
        "application/vnd.apple.mpegurl",
    )
    .await;
    cases.push((
        "playlist of a URL",
        resp.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .into(),
    ));
    let playlist_file = format!(
        "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{}\n#EXT-X-ENDLIST\n",
        short_clip.display()
    );
    let resp = upload(
        &app,
        &key,
        playlist_file.into_bytes(),
        "application/vnd.apple.mpegurl",
    )
    .await;
    cases.push((
        "playlist of a local file",
        resp.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .into(),
    ));
    let concat_list = format!("ffconcat version 1.0\nfile {}\n", short_clip.display());
    let resp = upload(&app, &key, concat_list.into_bytes(), "text/plain").await;
    cases.push((
        "concat list",
        resp.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .into(),
    ));
    cases.push(("too long", upload_file(&app, &key, &long_clip).await));
    cases.push((
        "another account's file",
        upload_file(&app, &stranger, &short_clip).await,
    ));
    cases.push(("no such file", uuid::Uuid::now_v7().to_string()));

    let balance = app.balances(&key).await;
    for (case, file) in &cases {
        let resp = app
            .post_json(&key, "/v1/jobs", &anonymize_job(file, json!({})))
            .await;
        assert_eq!(resp.status(), 422, "{case}");
        let problem: Value = resp.json().await.unwrap();
        assert_eq!(
            problem["errors"][0]["field"], "input.file",
            "{case}: {problem}"
        );
        eprintln!("{case}: {}", problem["errors"][0]["detail"]);
    }
    let resp = app
        .post_json(
            &key,
            "/v1/jobs",
            &anonymize_job(
                &cases[0].1,
                json!({"style": "pixelate", "targets": ["plates"], "detect_width": 100}),
            ),
        )
        .await;
    assert_eq!(resp.status(), 422);
    let problem: Value = resp.json().await.unwrap();
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["params.detect_width", "params.style", "params.targets"]
    );
    // Empty (and over the size limit, see files.rs): refused at upload already.
    assert_eq!(
        upload(&app, &key, Vec::new(), "video/mp4").await.status(),
        422
    );
    // A job that costs more than max_fee is refused after the video was cut: nothing stays.
    let file = upload_file(&app, &key, &short_clip).await;
    let mut job = anonymize_job(&file, json!({}));
    job["max_fee"] = json!(10);
    let resp = app.post_json(&key, "/v1/jobs", &job).await;
    assert_eq!(resp.status(), 402);

    assert_eq!(app.balances(&key).await, balance, "no money moved");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "no half-made job");
    assert_eq!(staged_objects(&app), Vec::<PathBuf>::new());
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_no_worker_can_decode_fails_the_job_with_a_refund() {
    let mut app = TestApp::spawn_with(|c| c.scheduling.max_shard_attempts = 2).await;
    app.start_worker().await;
    let (_, key) = app.customer(10_000_000).await;
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(dir.path(), 320, 240, 2, false);
    // A few flipped bits inside the coded frames: the container, its index and every NAL unit's
    // length stay intact, so the probe and the cut pass, but decoding fails.
    let mut bytes = std::fs::read(&clip).unwrap();
    let len = bytes.len();
    for i in (len / 4..len * 3 / 4).step_by(1000) {
        bytes[i] ^= 0x5a;
    }
    let resp = upload(&app, &key, bytes, "video/mp4").await;
    let file = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (available, _) = app.balances(&key).await;
    let job = submit_anonymize(&app, &key, &file, json!({})).await;
    let job = wait_long(&app, &key, job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "shard_attempts_exhausted");
    assert_eq!(app.balances(&key).await, (available, 0), "fully refunded");
    app.assert_ledger_invariants().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(staged_objects(&app), Vec::<PathBuf>::new());
    app.teardown().await;
}

/// A damaged upload of `seconds` at 320x240 that probes and cuts but does not decode: a few
/// flipped bits inside the coded frames keep the container, its index and every NAL unit's
/// length intact.
fn undecodable_clip(dir: &Path, seconds: u32) -> Vec<u8> {
    let clip = make_clip(dir, 320, 240, seconds, false);
    let mut bytes = std::fs::read(&clip).unwrap();
    let len = bytes.len();
    for i in (len / 4..len * 3 / 4).step_by(1000) {
        bytes[i] ^= 0x5a;
    }
    bytes
}

/// The smallest topology a new user runs, with an input every node refuses: the job fails as
/// soon as the second node confirms the first (not after every attempt), each bad segment was
/// sent exactly twice, and the caller pays only for segments that nodes did finish, which
/// those nodes are paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_both_workers_cannot_decode_fails_the_job_once_the_second_confirms() {
    let mut app = TestApp::spawn().await;
    assert!(app.config.scheduling.max_shard_attempts > 2);
    app.start_worker().await;
    app.start_worker().await;
    let (_, key) = app.customer(10_000_000).await;
    let dir = tempfile::tempdir().unwrap();
    let resp = upload(&app, &key, undecodable_clip(dir.path(), 2), "video/mp4").await;
    assert_eq!(resp.status(), 201);
    let file = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (available, _) = app.balances(&key).await;
    let submitted = std::time::Instant::now();
    let job = submit_anonymize(&app, &key, &file, json!({})).await;
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let job = wait_long(&app, &key, &id.to_string()).await;
    let took = submitted.elapsed();
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "input_unusable", "{job}");

    // Every refused segment went to both nodes once, and to nobody after.
    let refused: Vec<(i32, i32, Vec<String>, Vec<String>)> = sqlx::query_as(
        "SELECT idx, attempts, excluded_nodes, input_refused_by FROM shards
         WHERE job_id = $1 AND cardinality(input_refused_by) > 0",
    )
    .bind(id)
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert!(!refused.is_empty(), "some segment was refused");
    let both = refused
        .iter()
        .filter(|(_, attempts, excluded, by)| {
            *attempts == 2 && excluded.len() == 2 && by.len() == 2
        })
        .count();
    assert_eq!(
        both, 1,
        "one segment refused by both nodes ends it: {refused:?}"
    );
    let max_attempts: i32 =
        sqlx::query_scalar("SELECT max(attempts) FROM shards WHERE job_id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(max_attempts <= 2, "a segment was sent {max_attempts} times");
    let dispatched: i64 =
        sqlx::query_scalar("SELECT count(*) FROM chain_records WHERE kind = 'assignment'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    let segments: i64 = sqlx::query_scalar("SELECT count(*) FROM shards WHERE job_id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(
        dispatched <= 2 * segments,
        "{dispatched} assignments sealed for {segments} segments"
    );
    eprintln!(
        "undecodable video: failed {:.1} s after submit, {dispatched} assignments for \
         {segments} segments",
        took.as_secs_f64()
    );

    // The caller pays for the segments nodes finished, and the nodes get exactly that.
    let done_fees: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(fee), 0)::bigint FROM shards
         WHERE job_id = $1 AND status = 'done' AND replica_of IS NULL",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(job["cost"].as_i64(), Some(done_fees), "{job}");
    assert_eq!(app.balances(&key).await, (available - done_fees, 0));
    let earned: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(e.amount), 0)::bigint FROM ledger_entries e
         JOIN ledger_transactions t ON t.id = e.tx_id
         JOIN ledger_accounts a ON a.id = e.ledger_account_id
         WHERE t.job_id = $1 AND t.kind = 'escrow_release' AND a.purpose = 'earnings'",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(earned, done_fees, "nodes paid for their finished segments");
    app.assert_ledger_invariants().await;
    crate::common::assert_every_job_settled(&app.db).await;
    app.teardown().await;
}

/// A file an unfinished job reads can be deleted neither by its owner (409 naming the job) nor
/// by retention; once the job ends, both may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_in_use_is_kept_until_its_job_ends() {
    // No worker: the job waits in the queue with its input in use.
    let app = TestApp::spawn().await;
    let (_, key) = app.customer(10_000_000).await;
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(dir.path(), 320, 240, 1, false);
    let file = upload_file(&app, &key, &clip).await;
    let job = submit_anonymize(&app, &key, &file, json!({})).await;
    let job_id = job["id"].as_str().unwrap();

    let delete = || async {
        app.http
            .delete(format!("{}/v1/files/{file}", app.base))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
    };
    let refused = delete().await;
    assert_eq!(refused.status(), 409);
    let problem = crate::common::problem(refused).await;
    assert!(
        problem.detail.contains(job_id),
        "the refusal names the job: {problem:?}"
    );
    // Retention of zero: everything is due, but not a file in use.
    let store = app.state.scheduler.files.clone();
    xpand::retention::expire(&app.db, &store, Duration::ZERO)
        .await
        .unwrap();
    let resp = app.get(&key, &format!("/v1/files/{file}")).await;
    assert_eq!(resp.status(), 200, "retention kept the file in use");

    let resp = app
        .post_json(&key, &format!("/v1/jobs/{job_id}/cancel"), &json!({}))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(delete().await.status(), 204);
    assert_eq!(
        app.get(&key, &format!("/v1/files/{file}")).await.status(),
        404
    );
    app.teardown().await;
}

/// The web page, driven by headless Chromium: pick a file, follow the job, play the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_anonymizes_a_video_that_then_plays() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, key) = app.customer(10_000_000).await;
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(dir.path(), 320, 240, 2, true);
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/anonymize.mjs");
    let modules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/node_modules/playwright-core"
    );
    assert!(
        Path::new(modules).is_dir(),
        "playwright-core is missing: run scripts/setup-browser.sh (make setup does)"
    );
    let base = app.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .args([driver, &base, &key, clip.to_str().unwrap(), "2.0"])
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    app.teardown().await;
}

/// The same path on an S3-compatible object store (moto's server, from PyPI) instead of the
/// local directory: uploads, segments, worker transfers, the joined output, clean-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_job_runs_on_an_s3_compatible_store() {
    let moto = concat!(env!("HOME"), "/.cache/xpand/moto-venv/bin/moto_server");
    assert!(
        Path::new(moto).is_file(),
        "moto_server is missing: run scripts/setup-s3-emulator.sh (make test does)"
    );
    let port = free_port();
    let mut server = tokio::process::Command::new(moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while http.put(format!("{endpoint}/videos")).send().await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("moto starts");
    // Nextest runs each test in its own process, so these reach only this gateway.
    for (name, value) in [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ] {
        std::env::set_var(name, value);
    }
    let mut app = TestApp::spawn_with(|c| c.files_url = Some("s3://videos/xpand".into())).await;
    app.start_worker().await;
    let (_, key) = app.customer(10_000_000).await;
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(dir.path(), 320, 240, 2, true);
    let file = upload_file(&app, &key, &clip).await;
    let job = submit_anonymize(&app, &key, &file, json!({"style": "solid"})).await;
    let job = wait_long(&app, &key, job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let out = app
        .get(
            &key,
            &format!("/v1/files/{}", job["output"]["file"].as_str().unwrap()),
        )
        .await;
    assert_eq!(out.status(), 200);
    let masked = dir.path().join("masked.mp4");
    std::fs::write(&masked, out.bytes().await.unwrap()).unwrap();
    let probe = xpand_media::probe(&masked).await.unwrap();
    assert_eq!(
        (probe.frames, probe.audio_codec.as_deref()),
        (50, Some("aac"))
    );
    // The objects really are in the bucket (nothing on local disk), and the job's staging is gone.
    assert!(!app.config.files_dir.join("files").exists());
    let listing = http
        .get(format!("{endpoint}/videos?list-type=2&prefix=xpand/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listing.contains(&format!("xpand/files/{file}")),
        "{listing}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listing = http
        .get(format!("{endpoint}/videos?list-type=2&prefix=xpand/jobs/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!listing.contains("<Key>"), "{listing}");
    app.teardown().await;
    let _ = server.kill().await;
}

/// A video job canceled while its segments run: the segments done so far are paid, the rest
/// refunded, no more segments are done after the cancel, and every staged segment is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_job_canceled_mid_run_pays_done_segments_and_cleans_up() {
    let mut app = TestApp::spawn().await;
    app.start_worker().await;
    let (_, key) = app.customer(10_000_000).await;
    let dir = tempfile::tempdir().unwrap();
    // Two segments per slot of the one worker: the job runs in two waves.
    let clip = make_clip(dir.path(), 320, 240, 12, false);
    let file = upload_file(&app, &key, &clip).await;
    let (available, _) = app.balances(&key).await;
    let job = submit_anonymize(&app, &key, &file, json!({})).await;
    let id = job["id"].as_str().unwrap().to_string();
    let segments = job["progress"]["shards_total"].as_i64().unwrap();
    assert!(segments >= 8, "{job}");
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let job = app.get_json(&key, &format!("/v1/jobs/{id}")).await;
            if job["progress"]["shards_done"].as_i64().unwrap() >= 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a first segment is done");
    let resp = app
        .post_json(&key, &format!("/v1/jobs/{id}/cancel"), &json!({}))
        .await;
    let status = resp.status();
    let canceled: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{canceled}");
    assert_eq!(canceled["status"], "canceled", "{canceled}");

    let done_fees = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT count(*), COALESCE(sum(fee), 0)::bigint FROM shards
             WHERE job_id = $1::uuid AND status = 'done'",
        )
        .bind(&id)
        .fetch_one(&app.db)
        .await
        .unwrap()
    };
    let (done, paid) = done_fees().await;
    assert!(
        (1..segments).contains(&done),
        "{done} of {segments} segments done"
    );
    assert_eq!(
        canceled["cost"].as_i64(),
        Some(paid),
        "the done segments are paid"
    );
    assert_eq!(
        app.balances(&key).await,
        (available - paid, 0),
        "the rest refunded"
    );

    // What the worker still finishes is dropped, and the job's staged objects go.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        done_fees().await,
        (done, paid),
        "a segment was done after the cancel"
    );
    tokio::time::timeout(Duration::from_secs(15), async {
        while !staged_objects(&app).is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("staged objects stay: {:?}", staged_objects(&app)));
    crate::common::assert_every_job_settled(&app.db).await;
    app.assert_ledger_invariants().await;
    app.teardown().await;
}
