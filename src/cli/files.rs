//! `xpand files upload|download|rm`: a video (or any file) in and out of the gateway's store,
//! the way a video job's input goes in and its output comes back. A command of its own because
//! files are bytes, not JSON: both directions stream (a file is never held in memory whole),
//! show a progress bar on a terminal, and check the sha256 the gateway computed against the
//! bytes sent or received; a download lands under its name only once it is whole and checked.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use futures::StreamExt as _;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use reqwest::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{byte_bar, cell, exit, CliResult, Client, Common, Failure};

#[derive(clap::Args, Debug)]
#[command(after_help = super::EXIT_CODES_HELP)]
pub struct FilesArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: FilesCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum FilesCommand {
    /// Upload a file (streamed); prints its id, size and sha256.
    Upload {
        path: PathBuf,
        /// The Content-Type to store (default: from the extension, e.g. .mp4 → video/mp4).
        #[arg(long)]
        content_type: Option<String>,
    },
    /// Download a file (streamed), checked against its sha256.
    Download {
        id: Uuid,
        /// Where to write it (default: the file's id, in this directory; `-`: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Overwrite the output file if it exists.
        #[arg(long)]
        clobber: bool,
    },
    /// Delete a file now.
    Rm { id: Uuid },
}

pub async fn run(args: FilesArgs) -> CliResult<()> {
    let client = Client::new(&args.common)?;
    match args.command {
        FilesCommand::Upload { path, content_type } => upload(&client, &path, content_type).await,
        FilesCommand::Download {
            id,
            output,
            clobber,
        } => download(&client, id, output, clobber).await,
        FilesCommand::Rm { id } => {
            client
                .send(client.request(Method::DELETE, &format!("/v1/files/{id}")))
                .await?;
            if !client.json {
                outln!("deleted file {id}");
            }
            Ok(())
        }
    }
}

/// The Content-Type a file's extension suggests.
fn content_type_of(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "mp4" | "m4v" => "video/mp4",
        "mov" => "video/quicktime",
        "webm" => "video/webm",
        "mkv" => "video/x-matroska",
        "avi" => "video/x-msvideo",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "csv" => "text/csv",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

async fn upload(client: &Client, path: &Path, content_type: Option<String>) -> CliResult<()> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Failure::new(exit::USAGE, format!("opening {}: {e}", path.display())))?;
    let size = file
        .metadata()
        .await
        .map_err(|e| Failure::new(exit::USAGE, format!("reading {}: {e}", path.display())))?
        .len();
    let bar = byte_bar(Some(size), "uploading");
    // The bytes are hashed as they go, to check the sha256 the gateway computed.
    let hasher = std::sync::Arc::new(std::sync::Mutex::new(Sha256::new()));
    let (counted, seen) = (bar.clone(), hasher.clone());
    let stream =
        tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect(move |chunk| {
            if let Ok(bytes) = chunk {
                seen.lock().expect("not poisoned").update(bytes);
                if let Some(bar) = &counted {
                    bar.inc(bytes.len() as u64);
                }
            }
        });
    let content_type = content_type.unwrap_or_else(|| content_type_of(path).to_string());
    let request = client
        .request(Method::POST, "/v1/files")
        .header(CONTENT_TYPE, content_type)
        .header(CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(stream));
    let result = client.json(request).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let info = result?;
    let sent = hex::encode(hasher.lock().expect("not poisoned").clone().finalize());
    if cell(&info, "sha256") != sent {
        return Err(Failure::new(
            exit::ERROR,
            format!(
                "the gateway stored file {} with sha256 {}, but {sent} was sent \
                 (the file changed while uploading?)",
                cell(&info, "id"),
                cell(&info, "sha256")
            ),
        ));
    }
    print_file(client, &info);
    Ok(())
}

fn print_file(client: &Client, info: &Value) {
    if client.json {
        client.print_json(info);
        return;
    }
    outln!("file     {}", cell(info, "id"));
    outln!("size     {} bytes", cell(info, "size"));
    outln!("type     {}", cell(info, "content_type"));
    outln!("sha256   {}", cell(info, "sha256"));
}

async fn download(
    client: &Client,
    id: Uuid,
    output: Option<PathBuf>,
    clobber: bool,
) -> CliResult<()> {
    let to_stdout = output.as_deref() == Some(Path::new("-"));
    let target = output.unwrap_or_else(|| PathBuf::from(id.to_string()));
    if !to_stdout && !clobber && target.exists() {
        return Err(Failure::new(
            exit::ERROR,
            format!("{} exists (--clobber overwrites it)", target.display()),
        ));
    }
    let mut response = client
        .send(client.request(Method::GET, &format!("/v1/files/{id}")))
        .await?;
    // The gateway names a file's sha256 as its ETag.
    let expected = response
        .headers()
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_matches('"').to_string());
    let bar = byte_bar(response.content_length(), "downloading");
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    // Written next to the target and renamed once whole and checked: an interrupted download
    // never leaves a file that looks finished.
    let (mut sink, partial): (Box<dyn std::io::Write>, Option<tempfile::NamedTempFile>) =
        if to_stdout {
            (Box::new(std::io::stdout().lock()), None)
        } else {
            let dir = match target.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let temp = tempfile::Builder::new()
                .prefix(".xpand-download-")
                .tempfile_in(&dir)
                .map_err(|e| {
                    Failure::new(exit::ERROR, format!("writing in {}: {e}", dir.display()))
                })?;
            let file = temp.reopen().map_err(|e| {
                Failure::new(exit::ERROR, format!("writing in {}: {e}", dir.display()))
            })?;
            (Box::new(std::io::BufWriter::new(file)), Some(temp))
        };
    let written = async {
        while let Some(chunk) = response.chunk().await.map_err(|e| client.unreachable(e))? {
            hasher.update(&chunk);
            total += chunk.len() as u64;
            sink.write_all(&chunk)
                .map_err(|e| Failure::new(exit::ERROR, format!("writing the file: {e}")))?;
            if let Some(bar) = &bar {
                bar.inc(chunk.len() as u64);
            }
        }
        sink.flush()
            .map_err(|e| Failure::new(exit::ERROR, format!("writing the file: {e}")))
    }
    .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    written?;
    drop(sink);
    let got = hex::encode(hasher.finalize());
    if let Some(expected) = expected.filter(|e| e.len() == 64) {
        if expected != got {
            return Err(Failure::new(
                exit::ERROR,
                format!("file {id} arrived with sha256 {got}, not {expected}: not saved"),
            ));
        }
    }
    if let Some(partial) = partial {
        partial.persist(&target).map_err(|e| {
            Failure::new(
                exit::ERROR,
                format!("saving {}: {}", target.display(), e.error),
            )
        })?;
        if !client.json {
            outln!("saved {} ({total} bytes, sha256 {got})", target.display());
        }
    }
    Ok(())
}
