//! ffprobe and ffmpeg, hardened, in one place for every part of xpand that touches video: the
//! gateway probes, cuts and joins uploads with it, the worker decodes and re-encodes segments
//! through it, and both test suites make their clips with it (feature `test-clips`).
//!
//! The tools only ever read local files the caller wrote itself, only through the `file`
//! protocol (and `pipe` for the worker's frame pipes) and only with the container demuxers named
//! here: a crafted playlist or concat list cannot make them fetch a URL or read another file.
//! Paths are passed so that none reads as an option or another protocol. The gateway's runs
//! each have a time limit ([`TOOL_TIME_LIMIT`]) and are killed when they run over or their
//! caller goes away; the worker's long-running frame pipes are held in [`Children`], which kills
//! and reaps them, and the worker stops them at its own per-segment limit.
//!
//! - `probe`: what a video holds ([`probe`], [`count_frames`]);
//! - `edit`: cutting at keyframes and joining by stream copy ([`split`], [`concat_with_audio`]);
//! - `stream`: ffmpeg decoding to and encoding from raw RGB frames on pipes
//!   ([`decoder_command`], [`encoder_command`]);
//! - `tool`: the arguments every run starts with, path handling, running under a time limit;
//! - [`clips`]: test clips (feature `test-clips`).

use std::time::Duration;

#[cfg(feature = "test-clips")]
pub mod clips;
mod edit;
mod probe;
mod stream;
mod tool;

pub use edit::{concat_with_audio, split};
pub use probe::{count_frames, probe, ProbeError, VideoProbe};
pub use stream::{
    decoder_command, encoder_command, log_tail, Children, RawFrames, LOG_TAIL_BYTES,
    SEGMENT_DEMUXERS,
};
pub use tool::file_url;

/// Demuxers an uploaded video may be read with (matched against ffmpeg's demuxer names, so
/// `mov` covers MP4/MOV/M4V and `matroska` covers WebM). No playlist or list formats.
pub const VIDEO_DEMUXERS: &str = "mov,matroska,webm,avi,mpegts";
/// How long one probe or stream copy may take.
pub const TOOL_TIME_LIMIT: Duration = Duration::from_secs(120);
