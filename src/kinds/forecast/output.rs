//! What a worker's forecast output must be, when two agree, and how shards become the job's
//! output: the forecasts, and with levels asked, a band per level that holds each forecast.

use serde_json::{json, Value};
use xpand_protocol::{ForecastInterval, ShardOutput, ShardTask};

use crate::jobs::kind::{PaidSlice, PartialRows};

/// Forecast values of two runs agree within this relative tolerance (CPU and GPU kernels, or
/// two ONNX Runtime builds, differ in the last bits).
const TOLERANCE: f64 = 1e-3;

/// Checks a worker's output has the shape the task asked for, with finite numbers, and a band
/// for each level asked that holds its forecast.
pub fn check_output(task: &ShardTask, output: &ShardOutput) -> Result<(), String> {
    let (
        ShardTask::Forecast {
            series,
            horizon,
            levels,
            ..
        },
        ShardOutput::Forecast {
            forecasts,
            intervals,
        },
    ) = (task, output)
    else {
        return Err("a forecast shard must return a forecast output".into());
    };
    check_rows("forecast", forecasts, series.len(), *horizon)?;
    if intervals.len() != levels.len() {
        return Err(format!(
            "{} intervals returned for {} levels asked",
            intervals.len(),
            levels.len()
        ));
    }
    for (band, level) in intervals.iter().zip(levels) {
        if band.level != *level {
            return Err(format!(
                "interval at {} where {level} was asked",
                band.level
            ));
        }
        check_rows("lower bound", &band.lower, series.len(), *horizon)?;
        check_rows("upper bound", &band.upper, series.len(), *horizon)?;
        let outside = forecasts.iter().enumerate().find_map(|(r, row)| {
            row.iter()
                .enumerate()
                .find(|&(h, f)| !(band.lower[r][h] <= *f && *f <= band.upper[r][h]))
                .map(|(h, _)| (r, h))
        });
        if let Some((r, h)) = outside {
            return Err(format!(
                "row {r} step {h}: the forecast is outside its {level}% interval"
            ));
        }
    }
    // A higher level's band holds a lower level's.
    for narrow in intervals {
        for wide in intervals.iter().filter(|w| w.level > narrow.level) {
            let holds = |r: usize, h: usize| {
                wide.lower[r][h] <= narrow.lower[r][h] && narrow.upper[r][h] <= wide.upper[r][h]
            };
            if !(0..series.len()).all(|r| (0..*horizon as usize).all(|h| holds(r, h))) {
                return Err(format!(
                    "the {}% interval does not hold the {}% one",
                    wide.level, narrow.level
                ));
            }
        }
    }
    Ok(())
}

fn check_rows(what: &str, rows: &[Vec<f64>], expected: usize, horizon: u32) -> Result<(), String> {
    if rows.len() != expected {
        return Err(format!(
            "{} {what} rows returned for {expected} rows sent",
            rows.len()
        ));
    }
    for (i, row) in rows.iter().enumerate() {
        if row.len() != horizon as usize {
            return Err(format!(
                "{what} row {i} has {} values, expected {horizon}",
                row.len()
            ));
        }
        if row.iter().any(|v| !v.is_finite()) {
            return Err(format!("{what} row {i} has a non-finite value"));
        }
    }
    Ok(())
}

/// Two runs gave the same answer: the same shapes, every forecast and bound within
/// [`TOLERANCE`].
pub fn outputs_agree(a: &ShardOutput, b: &ShardOutput) -> bool {
    let (
        ShardOutput::Forecast {
            forecasts: x,
            intervals: xi,
        },
        ShardOutput::Forecast {
            forecasts: y,
            intervals: yi,
        },
    ) = (a, b)
    else {
        return false;
    };
    rows_agree(x, y)
        && xi.len() == yi.len()
        && xi.iter().zip(yi).all(|(p, q)| {
            p.level == q.level && rows_agree(&p.lower, &q.lower) && rows_agree(&p.upper, &q.upper)
        })
}

fn rows_agree(x: &[Vec<f64>], y: &[Vec<f64>]) -> bool {
    x.len() == y.len()
        && x.iter().zip(y).all(|(r, s)| {
            r.len() == s.len()
                && r.iter()
                    .zip(s)
                    .all(|(u, v)| (u - v).abs() <= TOLERANCE * u.abs().max(v.abs()).max(1.0))
        })
}

/// An accepted shard's rows, streamed at once, with their bands when levels were asked.
pub fn partial(output: &ShardOutput) -> Option<PartialRows> {
    let ShardOutput::Forecast {
        forecasts,
        intervals,
    } = output
    else {
        return None;
    };
    Some(PartialRows {
        rows: json!(forecasts),
        intervals: (!intervals.is_empty()).then(|| json!(intervals)),
        outputs: None,
    })
}

/// The job's output from its shards' outputs in shard order: `forecasts`, and `intervals`
/// (one per level, rows in the same order) when levels were asked.
pub fn reduce(outputs: Vec<ShardOutput>) -> Value {
    let mut forecasts = Vec::new();
    let mut intervals: Vec<ForecastInterval> = Vec::new();
    for output in outputs {
        let ShardOutput::Forecast {
            forecasts: rows,
            intervals: bands,
        } = output
        else {
            continue;
        };
        forecasts.extend(rows);
        if intervals.is_empty() {
            intervals = bands;
        } else {
            for (all, band) in intervals.iter_mut().zip(bands) {
                all.lower.extend(band.lower);
                all.upper.extend(band.upper);
            }
        }
    }
    match intervals.is_empty() {
        true => json!({ "forecasts": forecasts }),
        false => json!({ "forecasts": forecasts, "intervals": intervals }),
    }
}

/// A job that ended early: every row in place, `null` where its shard was not done, the
/// bands likewise, and `missing` naming the row ranges not paid for (`{offset, rows}`).
pub fn reduce_paid(slices: Vec<PaidSlice>) -> Option<Value> {
    if slices.iter().all(|s| s.output.is_none()) {
        return None;
    }
    /// Rows in place, `None` where not paid for.
    type Rows = Vec<Option<Vec<f64>>>;
    let mut forecasts: Rows = Vec::new();
    let mut bands: Vec<(f64, Rows, Rows)> = Vec::new();
    let mut missing = Vec::new();
    for slice in &slices {
        let rows = slice.row_count.max(0) as usize;
        match &slice.output {
            Some(ShardOutput::Forecast {
                forecasts: done,
                intervals,
            }) => {
                forecasts.extend(done.iter().cloned().map(Some));
                if bands.is_empty() {
                    bands = intervals
                        .iter()
                        .map(|b| {
                            (
                                b.level,
                                vec![None; forecasts.len() - done.len()],
                                vec![None; forecasts.len() - done.len()],
                            )
                        })
                        .collect();
                }
                for ((_, lower, upper), band) in bands.iter_mut().zip(intervals) {
                    lower.extend(band.lower.iter().cloned().map(Some));
                    upper.extend(band.upper.iter().cloned().map(Some));
                }
            }
            _ => {
                missing.push(json!({ "offset": slice.row_offset, "rows": rows }));
                forecasts.extend(std::iter::repeat_n(None, rows));
                for (_, lower, upper) in &mut bands {
                    lower.extend(std::iter::repeat_n(None, rows));
                    upper.extend(std::iter::repeat_n(None, rows));
                }
            }
        }
    }
    let mut output = json!({ "forecasts": forecasts, "missing": missing });
    if !bands.is_empty() {
        output["intervals"] = bands
            .into_iter()
            .map(|(level, lower, upper)| json!({ "level": level, "lower": lower, "upper": upper }))
            .collect();
    }
    Some(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(rows: usize, levels: &[f64]) -> ShardTask {
        ShardTask::Forecast {
            series: vec![vec![1.0; 3]; rows],
            horizon: 2,
            levels: levels.to_vec(),
            season_length: None,
        }
    }

    fn forecast(rows: &[&[f64]], bands: &[(f64, f64)]) -> ShardOutput {
        let forecasts: Vec<Vec<f64>> = rows.iter().map(|r| r.to_vec()).collect();
        let intervals = bands
            .iter()
            .map(|&(level, width)| ForecastInterval {
                level,
                lower: forecasts
                    .iter()
                    .map(|r| r.iter().map(|f| f - width).collect())
                    .collect(),
                upper: forecasts
                    .iter()
                    .map(|r| r.iter().map(|f| f + width).collect())
                    .collect(),
            })
            .collect();
        ShardOutput::Forecast {
            forecasts,
            intervals,
        }
    }

    #[test]
    fn outputs_are_checked_and_reduced_in_order() {
        let good = forecast(&[&[1.0, 2.0], &[3.0, 4.0]], &[]);
        assert!(check_output(&task(2, &[]), &good).is_ok());
        let short = forecast(&[&[1.0, 2.0]], &[]);
        assert!(check_output(&task(2, &[]), &short).is_err());
        let nan = forecast(&[&[1.0, f64::NAN], &[3.0, 4.0]], &[]);
        assert!(check_output(&task(2, &[]), &nan).is_err());
        let second = forecast(&[&[5.0, 6.0]], &[]);
        assert_eq!(
            reduce(vec![good, second]),
            json!({ "forecasts": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]] })
        );
    }

    #[test]
    fn bands_must_be_the_levels_asked_and_hold_their_forecast() {
        let asked = task(1, &[80.0, 95.0]);
        let good = forecast(&[&[1.0, 2.0]], &[(80.0, 1.0), (95.0, 2.0)]);
        assert_eq!(check_output(&asked, &good), Ok(()));
        let missing = forecast(&[&[1.0, 2.0]], &[(80.0, 1.0)]);
        assert!(check_output(&asked, &missing).is_err());
        let wrong_level = forecast(&[&[1.0, 2.0]], &[(80.0, 1.0), (90.0, 2.0)]);
        assert!(check_output(&asked, &wrong_level).is_err());
        let crossed = forecast(&[&[1.0, 2.0]], &[(80.0, 1.0), (95.0, -0.5)]);
        let err = check_output(&asked, &crossed).unwrap_err();
        assert!(err.contains("outside its 95% interval"), "{err}");
        let nested_wrong = forecast(&[&[1.0, 2.0]], &[(80.0, 2.0), (95.0, 1.0)]);
        let err = check_output(&asked, &nested_wrong).unwrap_err();
        assert!(err.contains("95% interval does not hold the 80%"), "{err}");
        let unasked = forecast(&[&[1.0, 2.0]], &[(80.0, 1.0)]);
        assert!(check_output(&task(1, &[]), &unasked).is_err());

        let second = forecast(&[&[3.0, 4.0]], &[(80.0, 1.0), (95.0, 2.0)]);
        let out = reduce(vec![good.clone(), second]);
        assert_eq!(out["forecasts"], json!([[1.0, 2.0], [3.0, 4.0]]));
        assert_eq!(out["intervals"][1]["level"], json!(95.0));
        assert_eq!(
            out["intervals"][1]["lower"],
            json!([[-1.0, 0.0], [1.0, 2.0]])
        );
        assert_eq!(
            out["intervals"][0]["upper"],
            json!([[2.0, 3.0], [4.0, 5.0]])
        );
        let slice = partial(&good).unwrap();
        assert_eq!(slice.rows, json!([[1.0, 2.0]]));
        assert_eq!(slice.intervals.unwrap()[0]["lower"], json!([[0.0, 1.0]]));
        assert_eq!(partial(&forecast(&[&[1.0]], &[])).unwrap().intervals, None);
    }

    #[test]
    fn an_early_end_keeps_the_paid_rows_in_place_and_marks_the_rest() {
        let slice = |offset: i32, output: Option<ShardOutput>| PaidSlice {
            row_offset: offset,
            row_count: 1,
            output,
        };
        let done = |v: f64| Some(forecast(&[&[v, v]], &[(80.0, 1.0)]));
        let out = reduce_paid(vec![slice(0, None), slice(1, done(5.0)), slice(2, None)]).unwrap();
        assert_eq!(out["forecasts"], json!([null, [5.0, 5.0], null]));
        assert_eq!(
            out["missing"],
            json!([{ "offset": 0, "rows": 1 }, { "offset": 2, "rows": 1 }])
        );
        assert_eq!(
            out["intervals"][0]["lower"],
            json!([null, [4.0, 4.0], null])
        );
        assert_eq!(
            out["intervals"][0]["upper"],
            json!([null, [6.0, 6.0], null])
        );
        assert_eq!(reduce_paid(vec![slice(0, None)]), None);
        let all = reduce_paid(vec![slice(0, done(1.0))]).unwrap();
        assert_eq!(all["missing"], json!([]));
    }

    #[test]
    fn forecasts_and_bounds_agree_within_tolerance_only() {
        let one = |v: f64, w: f64| forecast(&[&[100.0, v]], &[(80.0, w)]);
        assert!(outputs_agree(&one(0.5, 1.0), &one(0.5004, 1.0005)));
        assert!(!outputs_agree(&one(0.5, 1.0), &one(1.5, 1.0)));
        assert!(!outputs_agree(&one(0.5, 1.0), &one(0.5, 1.5)));
        assert!(!outputs_agree(
            &forecast(&[&[100.0]], &[]),
            &forecast(&[&[100.0, 1.0]], &[])
        ));
    }
}
