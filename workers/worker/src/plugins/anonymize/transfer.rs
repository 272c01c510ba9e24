//! Moving a segment in and out: GET the segment the gateway cut into a local file (up to a size
//! limit), PUT the masked output back, both signed with the node key and under connect, stall
//! and total time limits; and the output's sha256, which the shard's result commits to. Errors
//! never quote a transfer URL, which may carry a signature.

use std::fs::File;
use std::future::Future;
use std::io;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt as _;
use xpand_protocol::{transfer, NodeKey};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A transfer fails when no bytes move for this long...
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// ... or when it takes longer than this in all.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How much of a refusing server's answer goes into the error.
const ERROR_BODY_BYTES: usize = 300;

/// The HTTP client for segment transfers: bounded connect, stall and total times, and no idle
/// connections kept (transfers are large and rare; a kept connection would also tie the client
/// to one runtime).
pub(crate) fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .timeout(TRANSFER_TIMEOUT)
        .pool_max_idle_per_host(0)
        .build()
        .context("building the HTTP client")
}

/// Runs `future` to completion from a blocking thread: on the runtime this thread belongs to
/// (plugins run on tokio's blocking threads), else on a runtime of its own.
pub(crate) fn block_on<F: Future>(future: F) -> anyhow::Result<F::Output> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => Ok(handle.block_on(future)),
        Err(_) => Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for HTTP")?
            .block_on(future)),
    }
}

/// GETs `url` into a new file `to`, signed by `node`; returns its size. An answer other than
/// 2xx, or a body over `limit` bytes, is an error (what was written stays for the caller to
/// remove). Errors never quote the URL, which may carry a signature.
pub async fn download(
    client: &reqwest::Client,
    node: &NodeKey,
    url: &str,
    to: &Path,
    limit: u64,
) -> anyhow::Result<u64> {
    let mut response = signed(client.get(url), node, "GET", url)?
        .send()
        .await
        .map_err(|e| anyhow!(e.without_url()))
        .context("GET failed")?;
    let status = response.status();
    if !status.is_success() {
        bail!("GET answered {status}: {}", error_body(response).await);
    }
    if let Some(length) = response.content_length() {
        ensure!(
            length <= limit,
            "the segment is {length} bytes; at most {limit} are taken"
        );
    }
    let mut file = tokio::fs::File::create(to)
        .await
        .with_context(|| format!("creating {}", to.display()))?;
    let mut total = 0u64;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| anyhow!(e.without_url()))
        .context("reading the segment")?
    {
        total += chunk.len() as u64;
        ensure!(
            total <= limit,
            "the segment is over {limit} bytes, more than is taken"
        );
        file.write_all(&chunk)
            .await
            .with_context(|| format!("writing {}", to.display()))?;
    }
    file.flush()
        .await
        .with_context(|| format!("writing {}", to.display()))?;
    Ok(total)
}

/// PUTs the file `from` (an MP4) to `url` as bytes, signed by `node`, streamed from disk with its
/// length; returns the bytes sent. An answer other than 2xx is an error quoting its status and
/// the start of its body. Errors never quote the URL.
pub async fn upload(
    client: &reqwest::Client,
    node: &NodeKey,
    from: &Path,
    url: &str,
) -> anyhow::Result<u64> {
    let file = tokio::fs::File::open(from)
        .await
        .with_context(|| format!("opening {}", from.display()))?;
    let length = file
        .metadata()
        .await
        .with_context(|| format!("reading {}", from.display()))?
        .len();
    let response = signed(client.put(url), node, "PUT", url)?
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(reqwest::header::CONTENT_LENGTH, length)
        .body(reqwest::Body::from(file))
        .send()
        .await
        .map_err(|e| anyhow!(e.without_url()))
        .context("PUT failed")?;
    let status = response.status();
    if !status.is_success() {
        bail!("PUT answered {status}: {}", error_body(response).await);
    }
    Ok(length)
}

/// `request` with the headers by which `node` signs `method` on `url`'s path.
fn signed(
    request: reqwest::RequestBuilder,
    node: &NodeKey,
    method: &str,
    url: &str,
) -> anyhow::Result<reqwest::RequestBuilder> {
    let url = reqwest::Url::parse(url).map_err(|e| anyhow!("the transfer URL is invalid: {e}"))?;
    Ok(transfer::sign_request(node, method, url.path())
        .into_iter()
        .fold(request, |request, (name, value)| {
            request.header(name, value)
        }))
}

/// The start of a refusal's body, as one line.
async fn error_body(response: reqwest::Response) -> String {
    let bytes = response.bytes().await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(ERROR_BODY_BYTES)]);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        "(no body)".into()
    } else {
        line
    }
}

/// Hex sha256 and size of a file.
pub fn file_digest(path: &Path) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let size = io::copy(&mut file, &mut hasher)?;
    Ok((hex::encode(hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
    use tokio::net::TcpListener;
    use xpand_media::clips::{count_frames_blocking, make_sliding_clip};
    use xpand_protocol::{AnonymizeTask, ProgressChain, ShardOutput, ShardTask};

    use super::*;
    use crate::plugins::anonymize::testing::{ffmpeg_children, load_detector, one_at_a_time, task};
    use crate::plugins::anonymize::{AnonymizePlugin, KIND};
    use crate::plugins::Plugin;

    /// What the test server saw of one PUT.
    #[derive(Debug, Default, Clone)]
    struct Put {
        content_type: String,
        content_length: Option<usize>,
        body: Vec<u8>,
    }

    /// A minimal HTTP/1.1 server: GET `/segment` serves `segment`, PUT `/out` stores the body,
    /// PUT `/refuse` reads the body and answers 403, anything else is 404; requests not signed
    /// by `node` are answered 401. One request per connection.
    async fn serve(
        listener: TcpListener,
        node: String,
        segment: Arc<Vec<u8>>,
        puts: Arc<Mutex<Vec<Put>>>,
    ) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (node, segment, puts) = (node.clone(), segment.clone(), puts.clone());
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut request_line = String::new();
                stream.read_line(&mut request_line).await.unwrap();
                let mut headers = HashMap::new();
                loop {
                    let mut line = String::new();
                    stream.read_line(&mut line).await.unwrap();
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap();
                    headers.insert(name.to_ascii_lowercase(), value.trim().to_string());
                }
                let mut parts = request_line.split_whitespace();
                let (method, path) = (parts.next().unwrap(), parts.next().unwrap());
                let content_length = headers.get("content-length").map(|v| v.parse().unwrap());
                let mut body = vec![0; content_length.unwrap_or(0)];
                stream.read_exact(&mut body).await.unwrap();
                let header = |name: &str| headers.get(name).map(String::as_str).unwrap_or("");
                let signed = header(transfer::NODE_HEADER) == node
                    && transfer::verify_request(
                        &node,
                        method,
                        path.split('?').next().unwrap(),
                        header(transfer::TIMESTAMP_HEADER).parse().unwrap_or(0),
                        header(transfer::SIGNATURE_HEADER),
                    )
                    .is_ok();
                let (status, answer): (&str, Vec<u8>) = match (method, path) {
                    _ if !signed => ("401 Unauthorized", b"unsigned".to_vec()),
                    ("GET", "/segment?sig=abc") => ("200 OK", segment.to_vec()),
                    ("PUT", "/out?sig=def") => {
                        puts.lock().unwrap().push(Put {
                            content_type: headers.get("content-type").cloned().unwrap_or_default(),
                            content_length,
                            body,
                        });
                        ("201 Created", Vec::new())
                    }
                    ("PUT", "/refuse") => (
                        "403 Forbidden",
                        b"<Error>\n  <Code>SignatureDoesNotMatch</Code>\n</Error>".to_vec(),
                    ),
                    _ => ("404 Not Found", b"no such thing".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    answer.len()
                );
                let stream = stream.get_mut();
                stream.write_all(head.as_bytes()).await.unwrap();
                stream.write_all(&answer).await.unwrap();
                stream.shutdown().await.unwrap();
            });
        }
    }

    #[test]
    fn run_fetches_masks_and_uploads_with_progress_matching_the_output() {
        let _one = one_at_a_time();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(fetch_mask_and_upload());
    }

    async fn fetch_mask_and_upload() {
        let dir = tempfile::tempdir().unwrap();
        let clip = dir.path().join("seg.mkv");
        make_sliding_clip(&clip, 640, 360, 1, 200);
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let node = NodeKey::generate();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let puts = Arc::new(Mutex::new(Vec::new()));
        let server = tokio::spawn(serve(
            listener,
            node.id().to_string(),
            Arc::new(std::fs::read(&clip).unwrap()),
            puts.clone(),
        ));
        let mut plugin = AnonymizePlugin::new(load_detector(), node.clone()).unwrap();
        plugin.scratch_dir = scratch.clone();
        let plugin = Arc::new(plugin);
        assert_eq!(plugin.kind(), KIND);

        let run = |input: &str, output: &str| {
            let task = ShardTask::Anonymize(AnonymizeTask {
                input_url: format!("{base}{input}"),
                output_url: format!("{base}{output}"),
                frames: 25,
                crf: 23,
                ..task()
            });
            let plugin = plugin.clone();
            // As the worker runs plugins: on a blocking thread of the runtime, with the host's
            // progress chain.
            tokio::task::spawn_blocking(move || {
                let assignment = uuid::Uuid::new_v4();
                let mut chain = ProgressChain::new(assignment);
                let mut done = 0;
                let output = plugin.run(&task, &mut |partial| {
                    let ShardOutput::Anonymize {
                        video_sha256,
                        video_bytes,
                        ..
                    } = partial
                    else {
                        panic!("{partial:?}")
                    };
                    assert!(video_sha256.is_empty() && *video_bytes == 0);
                    for chunk in partial.chunk_bytes() {
                        chain.push(&chunk);
                        done += 1;
                    }
                    true
                })?;
                assert_eq!(done, task.chunks());
                assert_eq!(chain.hex(), output.chain(assignment));
                anyhow::Ok(output)
            })
        };

        let output = run("/segment?sig=abc", "/out?sig=def")
            .await
            .unwrap()
            .unwrap();
        let ShardOutput::Anonymize {
            detections,
            video_sha256,
            video_bytes,
        } = output
        else {
            panic!("{output:?}")
        };
        assert_eq!(detections.len(), 25);
        assert!(detections.iter().filter(|f| !f.is_empty()).count() >= 23);
        let put = puts.lock().unwrap().pop().expect("one upload");
        assert_eq!(put.content_type, "application/octet-stream");
        assert_eq!(put.content_length, Some(put.body.len()));
        assert_eq!(video_bytes, put.body.len() as u64);
        assert_eq!(video_sha256, xpand_protocol::sha256_hex(&put.body));
        let uploaded = dir.path().join("uploaded.mp4");
        std::fs::write(&uploaded, &put.body).unwrap();
        assert_eq!(count_frames_blocking(&uploaded), (25, 640, 360));

        let err = run("/gone", "/out?sig=def").await.unwrap().unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("404") && err.contains("no such thing"),
            "{err}"
        );
        assert!(
            !err.contains("/gone") && !err.contains("127.0.0.1"),
            "{err}"
        );
        let err = run("/segment?sig=abc", "/refuse")
            .await
            .unwrap()
            .unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("403") && err.contains("SignatureDoesNotMatch"),
            "{err}"
        );
        let wrong_kind = ShardTask::Forecast {
            series: vec![vec![1.0]],
            horizon: 1,
            levels: Vec::new(),
            season_length: None,
        };
        assert!(plugin.run(&wrong_kind, &mut |_| true).is_err());

        // Every shard's temporary directory is gone, whether it succeeded or failed.
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
        assert!(puts.lock().unwrap().is_empty());
        assert!(ffmpeg_children().is_empty());
        server.abort();
    }
}
