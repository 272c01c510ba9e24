//! Running ffmpeg and ffprobe: the arguments every run starts with (quiet, never reading the
//! terminal, local files through whitelisted demuxers only), paths that cannot read as options
//! or other protocols, and one-shot runs under [`TOOL_TIME_LIMIT`] with a short stderr kept for
//! error messages. The rest of the crate builds its command lines from these, so the hardening
//! is written once.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;

use anyhow::Context as _;
use tokio::process::Command;

use crate::{TOOL_TIME_LIMIT, VIDEO_DEMUXERS};

/// The ffmpeg and ffprobe binaries, looked up on `PATH`.
pub(crate) const FFMPEG: &str = "ffmpeg";
pub(crate) const FFPROBE: &str = "ffprobe";
/// Keep this much of a tool's stderr for error messages.
const STDERR_LIMIT: usize = 2_000;

/// ffmpeg's first options: quiet but for errors, never reading stdin.
pub(crate) const QUIET: [&str; 4] = ["-nostdin", "-hide_banner", "-loglevel", "error"];

/// Options that confine the next input to the `protocols` and `demuxers` named (both
/// comma-separated ffmpeg names).
pub(crate) fn whitelists<'a>(protocols: &'a str, demuxers: &'a str) -> [&'a str; 4] {
    [
        "-protocol_whitelist",
        protocols,
        "-format_whitelist",
        demuxers,
    ]
}

/// ffmpeg's arguments up to its first `-i`: quiet but for errors, local files only, through
/// the demuxers in `demuxers`.
pub(crate) fn ffmpeg_reading(demuxers: &str) -> Vec<String> {
    QUIET
        .iter()
        .chain(&whitelists("file", demuxers))
        .chain(&["-i"])
        .map(|a| a.to_string())
        .collect()
}

/// `path` as an argument: UTF-8 and absolute.
pub(crate) fn path_arg(path: &Path) -> anyhow::Result<String> {
    let s = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    // A leading '-' would read as an option; ffmpeg's own `file:` prefix would not stop a
    // relative path starting with one either, so keep paths absolute.
    anyhow::ensure!(path.is_absolute(), "{s} is not an absolute path");
    Ok(s.to_string())
}

/// `file:<path>`, so ffmpeg never reads a path as another protocol or an option.
pub fn file_url(path: &Path) -> OsString {
    let mut url = OsString::from("file:");
    url.push(path);
    url
}

/// The first message in a tool's stderr, without ffmpeg's `[h264 @ 0x55...]` context prefix
/// and the local path (which means nothing to the caller).
pub(crate) fn first_line(stderr: &str) -> String {
    let line = stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no detail");
    let line = match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
        Some((_, rest)) => rest,
        None => line,
    };
    let line = line.rsplit_once(": ").map_or(
        line,
        |(head, tail)| {
            if head.starts_with('/') {
                tail
            } else {
                line
            }
        },
    );
    line.chars().take(300).collect()
}

pub(crate) struct Output {
    pub(crate) success: bool,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: String,
}

/// ffprobe on the local file `input`, quiet but for errors, through the whitelists.
pub(crate) async fn ffprobe(args: &[&str], input: &Path) -> anyhow::Result<Output> {
    let mut all: Vec<String> = ["-v", "error"]
        .iter()
        .chain(&whitelists("file", VIDEO_DEMUXERS))
        .chain(args)
        .map(|a| a.to_string())
        .collect();
    all.push(path_arg(input)?);
    run_args(FFPROBE, &all).await
}

/// Runs `tool` with `args` under [`TOOL_TIME_LIMIT`]; the process is killed when it runs over
/// (or this future is dropped).
pub(crate) async fn run_args(tool: &str, args: &[String]) -> anyhow::Result<Output> {
    let child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {tool} (is ffmpeg installed? `make setup` does it)"))?;
    let out = tokio::time::timeout(TOOL_TIME_LIMIT, child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("{tool} ran longer than {TOOL_TIME_LIMIT:?}; killed"))?
        .with_context(|| format!("running {tool}"))?;
    let stderr: String = String::from_utf8_lossy(&out.stderr)
        .chars()
        .take(STDERR_LIMIT)
        .collect();
    Ok(Output {
        success: out.status.success(),
        stdout: out.stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_messages_lose_their_context_prefix_and_our_paths() {
        assert_eq!(
            first_line("\n[hls @ 0x55ffa67a64c0] Format not on whitelist 'mov'\nmore"),
            "Format not on whitelist 'mov'"
        );
        assert_eq!(
            first_line("/tmp/xpand/video-1/original: Invalid data found"),
            "Invalid data found"
        );
        assert_eq!(first_line(""), "no detail");
    }

    #[test]
    fn every_read_names_its_protocols_and_demuxers_before_its_input() {
        assert_eq!(
            ffmpeg_reading("concat,mov"),
            [
                "-nostdin",
                "-hide_banner",
                "-loglevel",
                "error",
                "-protocol_whitelist",
                "file",
                "-format_whitelist",
                "concat,mov",
                "-i"
            ]
        );
    }

    #[test]
    fn paths_are_absolute_utf8_or_behind_the_file_protocol() {
        assert!(path_arg(Path::new("-i.mp4")).is_err());
        assert!(path_arg(Path::new("clip.mp4")).is_err());
        assert_eq!(
            path_arg(Path::new("/tmp/clip.mp4")).unwrap(),
            "/tmp/clip.mp4"
        );
        assert_eq!(file_url(Path::new("-y")), "file:-y");
        assert_eq!(file_url(Path::new("http://x/y")), "file:http://x/y");
    }
}
