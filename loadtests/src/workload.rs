//! The jobs to submit: `forecast` requests over plausible seasonal series, like a spreadsheet
//! range of monthly figures.

use std::f64::consts::TAU;

use serde_json::json;

/// Cells across all pre-built variants; bounds memory when `--rows` × `--history` is huge.
const MAX_PREBUILT_CELLS: u64 = 4_000_000;
/// Distinct request bodies, cycled through so consecutive jobs don't carry identical data.
const MAX_VARIANTS: u64 = 32;

#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub rows: u32,
    pub history: u32,
    pub horizon: u32,
    pub max_fee: i64,
}

/// Pre-serialised job bodies, so generating load costs the client next to nothing.
pub struct Workload {
    bodies: Vec<String>,
}

impl Workload {
    pub fn new(shape: Shape) -> Self {
        let cells = u64::from(shape.rows) * u64::from(shape.history);
        let variants = (MAX_PREBUILT_CELLS / cells.max(1)).clamp(1, MAX_VARIANTS);
        let bodies = (0..variants)
            .map(|seed| {
                let mut rng = SplitMix64(seed);
                let series: Vec<Vec<f64>> = (0..shape.rows)
                    .map(|_| seasonal_row(&mut rng, shape.history as usize))
                    .collect();
                json!({
                    "kind": "forecast",
                    "input": { "series": series },
                    "params": { "horizon": shape.horizon },
                    "max_fee": shape.max_fee,
                })
                .to_string()
            })
            .collect();
        Self { bodies }
    }

    /// The `POST /v1/jobs` body for job number `seq`.
    pub fn body(&self, seq: u64) -> &str {
        &self.bodies[(seq % self.bodies.len() as u64) as usize]
    }

    /// The WebSocket `submit` frame for job number `seq`, tagged with `reference`.
    pub fn submit_frame(&self, seq: u64, reference: &str) -> String {
        // `reference` is ours (digits only), so plain formatting needs no escaping.
        format!(
            r#"{{"op":"submit","ref":"{reference}","job":{}}}"#,
            self.body(seq)
        )
    }
}

/// Level + trend + one seasonal cycle + noise, rounded to cents, always positive.
fn seasonal_row(rng: &mut SplitMix64, len: usize) -> Vec<f64> {
    const PERIODS: [f64; 4] = [4.0, 7.0, 12.0, 24.0];
    let level = 50.0 + 450.0 * rng.unit();
    let trend = level * 0.01 * (rng.unit() - 0.5);
    let amplitude = level * (0.05 + 0.25 * rng.unit());
    let period = PERIODS[(rng.next_u64() % PERIODS.len() as u64) as usize];
    let phase = TAU * rng.unit();
    (0..len)
        .map(|t| {
            let t = t as f64;
            let noise = level * 0.03 * (rng.unit() - 0.5) * 2.0;
            let v = level + trend * t + amplitude * (TAU * t / period + phase).sin() + noise;
            (v.max(0.01) * 100.0).round() / 100.0
        })
        .collect()
}

/// SplitMix64: tiny, deterministic, and plenty random for test data.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const SHAPE: Shape = Shape {
        rows: 40,
        history: 48,
        horizon: 12,
        max_fee: 1_000,
    };

    #[test]
    fn bodies_have_the_requested_shape() {
        let workload = Workload::new(SHAPE);
        let body: Value = serde_json::from_str(workload.body(7)).unwrap();
        assert_eq!(body["kind"], "forecast");
        assert_eq!(body["params"]["horizon"], 12);
        assert_eq!(body["max_fee"], 1_000);
        let series = body["input"]["series"].as_array().unwrap();
        assert_eq!(series.len(), 40);
        for row in series {
            let row = row.as_array().unwrap();
            assert_eq!(row.len(), 48);
            assert!(row.iter().all(|v| v.as_f64().unwrap() > 0.0));
        }
    }

    #[test]
    fn deterministic_and_varied() {
        let a = Workload::new(SHAPE);
        let b = Workload::new(SHAPE);
        assert_eq!(a.body(3), b.body(3));
        assert_ne!(a.body(0), a.body(1));
        assert_eq!(a.body(0), a.body(MAX_VARIANTS));
    }

    #[test]
    fn huge_jobs_are_built_once() {
        let workload = Workload::new(Shape {
            rows: 2_000,
            history: 2_000,
            ..SHAPE
        });
        assert_eq!(workload.bodies.len(), 1);
    }

    #[test]
    fn submit_frame_wraps_the_body() {
        let workload = Workload::new(SHAPE);
        let frame: Value = serde_json::from_str(&workload.submit_frame(5, "5")).unwrap();
        assert_eq!(frame["op"], "submit");
        assert_eq!(frame["ref"], "5");
        let body: Value = serde_json::from_str(workload.body(5)).unwrap();
        assert_eq!(frame["job"], body);
    }
}
