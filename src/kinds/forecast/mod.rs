//! Job kind `forecast`: spreadsheet rows of numbers in, the next `horizon` values of each row out.
//! A row may hold blank cells: its ends are trimmed and its gaps filled ([`blanks`]).
//!
//! Map: rows are grouped into shards of at least `rows_per_shard` rows
//! (`XPAND_FORECAST_ROWS_PER_SHARD`, 1,024 by default), at most [`MAX_SHARDS`] shards. A row costs
//! the model about 15 µs and a shard's round trip (dispatch, signatures, result, commit) about
//! a millisecond, so a shard must carry a thousand rows before splitting pays: a 40-row range
//! is one shard, a 10 000-row sheet spreads over ten and streams back in ten slices. Each
//! accepted shard streams its rows at once (a `partial` event).
//! Reduce: shard outputs are concatenated in row order, inline ([`output`]). Two runs agree when
//! every value is within a relative tolerance.
//!
//! With `params.level`, each forecast comes with a band per level that holds it: the worker
//! computes them from a calibration shipped with the model (see `training/intervals.py`).

mod blanks;
mod output;
mod params;
pub mod schema;

use futures::future::BoxFuture;
use serde_json::Value;
use xpand_protocol::{ShardOutput, ShardTask};

pub use self::output::{check_output, reduce};
use self::params::ForecastParams;
use crate::error::{AppError, FieldError};
use crate::jobs::kind::{JobKind, PaidSlice, PartialRows, PlanRequest};
use crate::jobs::{JobPlan, Scheduler, ShardPlan};

/// The `forecast` job kind.
pub struct Forecast {
    /// Fewest rows a shard carries (the grain: compute per shard against its fixed cost).
    pub rows_per_shard: usize,
}

impl JobKind for Forecast {
    fn name(&self) -> &'static str {
        KIND
    }

    fn plan<'a>(
        &'a self,
        _ctx: &'a Scheduler,
        request: PlanRequest<'a>,
    ) -> BoxFuture<'a, Result<JobPlan, AppError>> {
        let planned =
            plan(request.input, request.params, self.rows_per_shard).map_err(AppError::Validation);
        Box::pin(async move { planned })
    }

    fn check_output(&self, task: &ShardTask, output: &ShardOutput) -> Result<(), String> {
        check_output(task, output)
    }

    fn outputs_agree(&self, task: &ShardTask, a: &ShardOutput, b: &ShardOutput) -> bool {
        matches!(task, ShardTask::Forecast { .. }) && output::outputs_agree(a, b)
    }

    fn partial(&self, output: &ShardOutput) -> Option<PartialRows> {
        output::partial(output)
    }

    fn reduce_paid(&self, slices: Vec<PaidSlice>) -> Option<Value> {
        output::reduce_paid(slices)
    }

    fn reduce(&self, outputs: Vec<ShardOutput>) -> anyhow::Result<Value> {
        Ok(reduce(outputs))
    }
}

pub const KIND: &str = "forecast";
/// The model the `forecast` kind runs (see `workers/models/forecast/manifest.json`).
pub const MODEL: &str = "forecast-mlp";
/// Longest horizon the model produces (the manifest's `max_horizon`).
pub const MAX_HORIZON: u64 = 24;
/// Fewest observations a row needs (the manifest's `min_history`).
pub const MIN_HISTORY: usize = 3;
pub const MAX_ROWS: usize = 10_000;
pub const MAX_ROW_LEN: usize = 10_000;
pub const MAX_SHARDS: usize = 64;

/// Unit prices, in micro-credits. The gateway keeps the job fee; workers earn the rest.
pub const PRICE_PER_JOB: i64 = 1_000;
/// Per observation sent to a worker (only the last `context_length` values of a row are used,
/// so only those are charged).
pub const PRICE_PER_INPUT_VALUE: i64 = 1;
/// Per forecast value produced.
pub const PRICE_PER_OUTPUT_VALUE: i64 = 10;
/// With interval levels the model runs twice per row (once more for the backtest that gauges
/// its error), so the row costs twice; any number of levels costs the same.
pub const INTERVALS_PRICE_FACTOR: i64 = 2;
/// The model's context length: the worker reads at most this many trailing values of a row.
pub const CONTEXT_LENGTH: usize = 64;

/// Validates `input`/`params` and maps the job into shards. Every problem is reported, each
/// naming its field or cell, so a spreadsheet can highlight them all at once.
pub fn plan(
    input: &Value,
    params: &Value,
    rows_per_shard: usize,
) -> Result<JobPlan, Vec<FieldError>> {
    let mut errors = Vec::new();
    let params = ForecastParams::parse(params, &mut errors);
    let series = parse_series(input, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let (series, params) = (series.expect("no errors"), params.expect("no errors"));
    Ok(JobPlan {
        model: MODEL.into(),
        gateway_fee: PRICE_PER_JOB,
        royalty: None,
        // The rows travel in the shards' tasks and nothing reads them back from the job.
        input_record: Some(serde_json::json!({})),
        shards: shard(series, &params, rows_per_shard),
        staged: Vec::new(),
        reads: Vec::new(),
    })
}

fn parse_series(input: &Value, errors: &mut Vec<FieldError>) -> Option<Vec<Vec<f64>>> {
    if let Some(obj) = input.as_object() {
        for key in obj.keys().filter(|k| *k != "series") {
            errors.push(FieldError::new(
                format!("input.{key}"),
                "is not a forecast input",
            ));
        }
    }
    let Some(rows) = input.get("series") else {
        errors.push(FieldError::new("input.series", "is required"));
        return None;
    };
    let Some(rows) = rows.as_array() else {
        errors.push(FieldError::new(
            "input.series",
            "must be an array of rows, each an array of numbers",
        ));
        return None;
    };
    if rows.is_empty() {
        errors.push(FieldError::new(
            "input.series",
            "must have at least one row",
        ));
        return None;
    }
    if rows.len() > MAX_ROWS {
        errors.push(FieldError::new(
            "input.series",
            format!("has {} rows; at most {MAX_ROWS} are allowed", rows.len()),
        ));
        return None;
    }
    let before = errors.len();
    let mut series = Vec::with_capacity(rows.len());
    for (r, row) in rows.iter().enumerate() {
        let field = format!("input.series[{r}]");
        let Some(cells) = row.as_array() else {
            errors.push(FieldError {
                row: Some(r),
                ..FieldError::new(field, "must be an array of numbers")
            });
            continue;
        };
        let row_error = |detail: String| FieldError {
            row: Some(r),
            ..FieldError::new(field.clone(), detail)
        };
        if cells.len() > MAX_ROW_LEN {
            let detail = format!("has {} cells; at most {MAX_ROW_LEN}", cells.len());
            errors.push(row_error(detail));
            continue;
        }
        let mut values = Vec::with_capacity(cells.len());
        let errors_before_row = errors.len();
        for (c, cell) in cells.iter().enumerate() {
            match cell.as_f64() {
                // serde_json never yields a non-finite f64, but a huge literal could overflow
                // the model's f32: refuse it here rather than fail on the worker.
                Some(v) if v.abs() < 1e30 => values.push(Some(v)),
                Some(_) => errors.push(FieldError::cell(r, c, "is too large (|x| must be < 1e30)")),
                None if blanks::is_blank(cell) => values.push(None),
                None => errors.push(FieldError::cell(
                    r,
                    c,
                    format!("must be a number or blank, got {}", json_type(cell)),
                )),
            }
            // A sheet full of text would produce one error per cell; 100 locate the problem.
            if errors.len() - before >= 100 {
                return None;
            }
        }
        if errors.len() > errors_before_row {
            continue;
        }
        let observed = values.iter().flatten().count();
        if observed < MIN_HISTORY {
            let detail = format!("has {observed} values; a row needs at least {MIN_HISTORY}");
            errors.push(row_error(detail));
            continue;
        }
        match blanks::complete(&values) {
            Ok(completed) => series.push(completed),
            Err(blanks::Incomplete::TooManyMissing { column, allowed }) => {
                errors.push(FieldError::cell(
                    r,
                    column,
                    format!(
                        "is blank, one more than the {allowed} blanks this row may have \
                         (at most {}% of the cells from its first value to its last)",
                        blanks::MAX_MISSING_PERCENT
                    ),
                ))
            }
            Err(blanks::Incomplete::Empty) => errors.push(row_error("has no values".into())),
        }
    }
    (errors.len() == before).then_some(series)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "an empty cell (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn shard(series: Vec<Vec<f64>>, params: &ForecastParams, rows_per_shard: usize) -> Vec<ShardPlan> {
    let rows = series.len();
    let per_shard = rows_per_shard.max(1).max(rows.div_ceil(MAX_SHARDS));
    let mut shards = Vec::with_capacity(rows.div_ceil(per_shard));
    let mut offset = 0;
    let mut rows_iter = series.into_iter();
    while offset < rows {
        let chunk: Vec<Vec<f64>> = rows_iter
            .by_ref()
            .take(per_shard)
            .map(|mut row| {
                // The model reads only the trailing context; don't ship (or charge) the rest.
                if row.len() > CONTEXT_LENGTH {
                    row.drain(..row.len() - CONTEXT_LENGTH);
                }
                row
            })
            .collect();
        let inputs: i64 = chunk.iter().map(|r| r.len() as i64).sum();
        let outputs = chunk.len() as i64 * i64::from(params.horizon);
        let mut fee = inputs * PRICE_PER_INPUT_VALUE + outputs * PRICE_PER_OUTPUT_VALUE;
        if !params.levels.is_empty() {
            fee *= INTERVALS_PRICE_FACTOR;
        }
        let count = chunk.len();
        shards.push(ShardPlan {
            row_offset: offset as i32,
            row_count: count as i32,
            fee,
            task: ShardTask::Forecast {
                series: chunk,
                horizon: params.horizon,
                levels: params.levels.clone(),
                season_length: params.season_length,
            },
        });
        offset += count;
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_FORECAST_ROWS_PER_SHARD;
    use serde_json::json;

    #[test]
    fn forty_rows_in_shards_of_eight_make_five_in_order() {
        let rows: Vec<Vec<f64>> = (0..40).map(|i| vec![i as f64; 70]).collect();
        let plan = plan(&json!({ "series": rows }), &json!({ "horizon": 12 }), 8).unwrap();
        assert_eq!(plan.shards.len(), 5);
        assert_eq!(
            plan.shards.iter().map(|s| s.row_offset).collect::<Vec<_>>(),
            vec![0, 8, 16, 24, 32]
        );
        let ShardTask::Forecast {
            series,
            horizon,
            levels,
            ..
        } = &plan.shards[1].task
        else {
            panic!("forecast plans have forecast shards");
        };
        assert_eq!((*horizon, levels.len()), (12, 0));
        assert_eq!(series[0], vec![8.0; CONTEXT_LENGTH]);
        // 8 rows × 64 inputs × 1 + 8 rows × 12 × 10
        assert_eq!(plan.shards[0].fee, 8 * 64 + 8 * 12 * 10);
        assert_eq!(plan.quote(), 1_000 + 5 * (8 * 64 + 8 * 12 * 10));
    }

    #[test]
    fn levels_and_the_season_reach_every_shard_and_double_its_price() {
        let rows: Vec<Vec<f64>> = (0..16).map(|i| vec![i as f64; 10]).collect();
        let params = json!({ "horizon": 3, "level": [80, 95], "season_length": 4 });
        let plan = plan(&json!({ "series": rows }), &params, 8).unwrap();
        assert_eq!(plan.shards.len(), 2);
        for shard in &plan.shards {
            let ShardTask::Forecast {
                levels,
                season_length,
                ..
            } = &shard.task
            else {
                panic!("forecast plans have forecast shards");
            };
            assert_eq!(
                (levels.as_slice(), *season_length),
                (&[80.0, 95.0][..], Some(4))
            );
            assert_eq!(shard.fee, 2 * (8 * 10 + 8 * 3 * 10));
        }
    }

    #[test]
    fn many_rows_are_capped_at_max_shards() {
        let rows: Vec<Vec<f64>> = (0..10_000).map(|_| vec![1.0, 2.0, 3.0]).collect();
        let plan = plan(&json!({ "series": rows }), &json!({ "horizon": 1 }), 8).unwrap();
        assert_eq!(plan.shards.len(), MAX_SHARDS);
        assert_eq!(plan.shards.iter().map(|s| s.row_count).sum::<i32>(), 10_000);
    }

    #[test]
    fn the_default_grain_keeps_a_sheet_whole_and_spreads_a_big_one() {
        let sheet = |n: usize| json!({ "series": vec![vec![1.0, 2.0, 3.0]; n] });
        let params = json!({ "horizon": 2 });
        let small = plan(&sheet(40), &params, DEFAULT_FORECAST_ROWS_PER_SHARD).unwrap();
        assert_eq!(small.shards.len(), 1);
        let big = plan(&sheet(10_000), &params, DEFAULT_FORECAST_ROWS_PER_SHARD).unwrap();
        assert_eq!(big.shards.len(), 10);
        assert!(big.shards.iter().all(|s| s.row_count <= 1024));
    }

    #[test]
    fn bad_cells_are_named_by_row_and_column() {
        let errors = plan(
            &json!({ "series": [[1, 2, 3], [4, "x", 6, true, null]] }),
            &json!({ "horizon": 3 }),
            DEFAULT_FORECAST_ROWS_PER_SHARD,
        )
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].field, "input.series[1][1]");
        assert_eq!((errors[0].row, errors[0].column), (Some(1), Some(1)));
        assert_eq!(errors[1].field, "input.series[1][3]");
    }

    #[test]
    fn blank_cells_are_completed_or_the_row_is_refused_at_the_blank_too_many() {
        let input = json!({ "series": [
            [null, 1, "", 3, 4, 5, 6, "  ", null],
            [7, 8, 9],
        ] });
        let plan = plan(&input, &json!({ "horizon": 2 }), 8).unwrap();
        let ShardTask::Forecast { series, .. } = &plan.shards[0].task else {
            panic!("forecast plans have forecast shards");
        };
        assert_eq!(series[0], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(series[1], vec![7.0, 8.0, 9.0]);
        let errors = plan_errors(json!({ "series": [[1, null, null, 4, 5, 6]] }));
        assert_eq!(errors[0].field, "input.series[0][2]", "{errors:?}");
        assert!(errors[0].detail.contains("30%"), "{}", errors[0].detail);
        let errors = plan_errors(json!({ "series": [[1, null, 2, null, null]] }));
        assert_eq!(errors[0].field, "input.series[0]");
        assert!(
            errors[0].detail.contains("has 2 values"),
            "{}",
            errors[0].detail
        );
        let errors = plan_errors(json!({ "series": [[null, ""]] }));
        assert_eq!(errors[0].field, "input.series[0]");
    }

    fn plan_errors(input: Value) -> Vec<FieldError> {
        plan(&input, &json!({ "horizon": 2 }), 8).unwrap_err()
    }

    #[test]
    fn params_and_shapes_are_checked() {
        let ok = json!({ "series": [[1, 2, 3]] });
        let errors = plan(&ok, &json!({ "level": 80 }), 8).unwrap_err();
        assert_eq!(errors[0].field, "params.horizon");
        for (input, field) in [
            (json!({}), "input.series"),
            (json!({ "series": [] }), "input.series"),
            (json!({ "series": [[1, 2]] }), "input.series[0]"),
            (json!({ "series": [5] }), "input.series[0]"),
            (json!({ "series": [[1, 2, 1e300]] }), "input.series[0][2]"),
        ] {
            let errors = plan(
                &input,
                &json!({ "horizon": 2 }),
                DEFAULT_FORECAST_ROWS_PER_SHARD,
            )
            .unwrap_err();
            assert_eq!(errors[0].field, field, "{input}");
        }
    }
}
