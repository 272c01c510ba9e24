//! Fixtures the anonymize tests share: the real CenterFace detector (loaded once), specs and
//! tasks, face boxes and pixels, and the checks that no ffmpeg child is left over. Clips are
//! made by `xpand_media::clips`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use xpand_protocol::{AnonymizeTask, MaskStyle};

use super::{time_limit, VideoSpec};
use crate::config::{default_ort_dylib_path, AcceleratorChoice};
use crate::onnx::OnnxRuntime;
use crate::plugins::face_detect::{FaceBox, FaceDetector};

pub(super) fn face(x1: f32, y1: f32, x2: f32, y2: f32) -> FaceBox {
    FaceBox {
        x1,
        y1,
        x2,
        y2,
        score: 0.9,
    }
}

pub(super) fn pixel(frame: &[u8], width: usize, x: usize, y: usize) -> &[u8] {
    &frame[(y * width + x) * 3..][..3]
}

pub(super) fn task() -> AnonymizeTask {
    AnonymizeTask {
        input_url: "http://127.0.0.1:1/in".into(),
        output_url: "http://127.0.0.1:1/out".into(),
        frames: 50,
        width: 640,
        height: 360,
        fps_num: 25,
        fps_den: 1,
        style: MaskStyle::Blur,
        threshold: 0.2,
        detect_width: None,
        crf: 23,
    }
}

/// Tests that start ffmpeg run one at a time, so each can check that none is left over.
static FFMPEG_TESTS: Mutex<()> = Mutex::new(());

pub(super) fn one_at_a_time() -> MutexGuard<'static, ()> {
    FFMPEG_TESTS.lock().unwrap_or_else(PoisonError::into_inner)
}

fn models_dir() -> PathBuf {
    std::env::var_os("XPAND_MODELS_DIR")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

pub(super) fn load_detector() -> FaceDetector {
    let dylib = default_ort_dylib_path();
    assert!(
        dylib.is_file(),
        "ONNX Runtime not found at {}: run scripts/setup-onnxruntime.sh",
        dylib.display()
    );
    let dir = models_dir().join("centerface");
    let model = crate::models::verify(&dir).unwrap_or_else(|e| {
        panic!(
            "no usable CenterFace model in {} ({e:#}): run scripts/setup-models.sh",
            dir.display()
        )
    });
    let runtime = OnnxRuntime::load(&dylib, AcceleratorChoice::Cpu).unwrap();
    FaceDetector::load(&runtime, &model).unwrap()
}

pub(super) fn detector() -> &'static FaceDetector {
    static DETECTOR: OnceLock<FaceDetector> = OnceLock::new();
    DETECTOR.get_or_init(load_detector)
}

/// Our children that are ffmpeg processes, running or not yet reaped.
pub(super) fn ffmpeg_children() -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid ...
            let Some((head, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            head.ends_with("(ffmpeg") && rest.split_whitespace().nth(1) == Some(me.as_str())
        })
        .collect()
}

pub(super) fn spec(frames: u32, width: u32, height: u32, style: MaskStyle) -> VideoSpec {
    VideoSpec {
        frames,
        width,
        height,
        fps_num: 25,
        fps_den: 1,
        style,
        threshold: 0.2,
        detect_width: width,
        crf: 18,
        time_limit: time_limit(frames, width, height),
    }
}
