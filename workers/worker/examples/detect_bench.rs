//! The bare CenterFace detector's throughput on a video's frames: decoded up front with ffmpeg,
//! then timed through `FaceDetector::detect_at` alone (CPU ONNX Runtime, as the worker uses it).
//! Prints frames per second on its last line. `--detect-width` scales what the network sees, as
//! the `detect_width` job parameter does; `--boxes` writes each frame's faces as a JSON line
//! (`[[x1, y1, x2, y2, score], …]`, frame coordinates) for `loadtests/video/agreement.py`.
//!
//!   cargo run --release -p xpand-worker --example detect_bench -- clip.mp4 \
//!       [--detect-width 640] [--boxes boxes.jsonl]

use std::io::Write as _;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _};
use xpand_worker::face_detect::FaceDetector;

struct Args {
    clip: String,
    detect_width: Option<u32>,
    boxes: Option<String>,
}

fn args() -> anyhow::Result<Args> {
    let usage = "usage: detect_bench <video> [--detect-width N] [--boxes out.jsonl]";
    let mut args = std::env::args().skip(1);
    let clip = args.next().context(usage)?;
    let (mut detect_width, mut boxes) = (None, None);
    while let Some(flag) = args.next() {
        let value = args.next().context(usage)?;
        match flag.as_str() {
            "--detect-width" => {
                detect_width = Some(value.parse().context("--detect-width takes pixels")?)
            }
            "--boxes" => boxes = Some(value),
            _ => bail!("{usage}"),
        }
    }
    Ok(Args {
        clip,
        detect_width,
        boxes,
    })
}

fn main() -> anyhow::Result<()> {
    let Args {
        clip,
        detect_width,
        boxes,
    } = args()?;
    // The worker's own hardened ffprobe and decoder, which take absolute paths.
    let clip = std::fs::canonicalize(&clip).with_context(|| format!("opening {clip}"))?;
    let (_, width, height, _) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(xpand_media::count_frames(&clip))?;
    let decoded = xpand_media::decoder_command(&clip).output()?;
    ensure!(
        decoded.status.success(),
        "ffmpeg could not decode {}: {}",
        clip.display(),
        xpand_media::log_tail(&decoded.stderr[..])
    );
    let frame = (width * height * 3) as usize;
    let frames: Vec<&[u8]> = decoded.stdout.chunks_exact(frame).collect();
    let detect_width = detect_width.unwrap_or(width);

    let models = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/centerface");
    let detector = FaceDetector::open(models.as_ref(), &xpand_worker::default_ort_dylib_path())?;
    detector.detect_at(frames[0], width, height, 0.2, detect_width)?; // warm-up
    let mut found = Vec::with_capacity(frames.len());
    let started = Instant::now();
    for rgb in &frames {
        found.push(detector.detect_at(rgb, width, height, 0.2, detect_width)?);
    }
    let secs = started.elapsed().as_secs_f64();
    let faces: usize = found.iter().map(Vec::len).sum();
    eprintln!(
        "{} frames of {width}x{height} seen {detect_width} wide, {faces} faces, {secs:.2} s",
        frames.len()
    );
    if let Some(path) = boxes {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {path}"))?,
        );
        for faces in &found {
            let line: Vec<[f32; 5]> = faces
                .iter()
                .map(|f| [f.x1, f.y1, f.x2, f.y2, f.score])
                .collect();
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
        }
        out.flush()?;
    }
    println!("{:.1}", frames.len() as f64 / secs);
    Ok(())
}
