//! Time-series forecasting: the spreadsheet use case (one shard = some rows, one forecast each).
//!
//! Model contract (all sizes from the manifest): inputs `values` and `mask`, float32
//! `[N, context_length]`, one row per series, right-aligned so the last observation sits in the
//! last column; shorter series are left-padded with 0.0 and mask 0.0, longer ones keep their last
//! `context_length` values. Output float32 `[N, max_horizon]`; a shard takes the first `horizon`
//! columns. With interval levels, the manifest's calibration puts a band around each forecast
//! ([`intervals`]).

mod intervals;

use std::sync::{Mutex, PoisonError};

use anyhow::{anyhow, bail, ensure, Context as _};
use ort::session::Session;
use ort::value::Tensor;
use serde::Deserialize;
use xpand_protocol::{ForecastInterval, ShardOutput, ShardTask};

use self::intervals::IntervalTable;
use super::Plugin;
use crate::models::{Dim, Manifest, TensorSpec};

pub const KIND: &str = "forecast";

/// The forecast-specific part of the manifest.
#[derive(Debug, Clone, Deserialize)]
struct ForecastParams {
    /// Observations the model sees per series.
    context_length: usize,
    /// Forecast steps the model produces.
    max_horizon: usize,
    /// Fewest observations a series may have.
    min_history: usize,
    /// How to bound forecasts with prediction intervals; a model without it gives points only.
    #[serde(default)]
    intervals: Option<IntervalTable>,
}

pub struct ForecastPlugin {
    /// `Session::run` needs exclusive access; a shard is one batched run, so one session suffices.
    session: Mutex<Session>,
    params: ForecastParams,
    values_input: String,
    mask_input: String,
    output: String,
}

impl ForecastPlugin {
    /// Checks the manifest against the forecast contract and the session's actual inputs/outputs.
    pub fn new(manifest: &Manifest, session: Session) -> anyhow::Result<Self> {
        let params: ForecastParams =
            serde_json::from_value(serde_json::Value::Object(manifest.params.clone()))
                .context("forecast manifests need context_length, max_horizon and min_history")?;
        ensure!(
            params.context_length >= 1
                && params.max_horizon >= 1
                && (1..=params.context_length).contains(&params.min_history),
            "manifest sizes are inconsistent: {params:?}"
        );
        if let Some(table) = &params.intervals {
            table.check()?;
            ensure!(
                table.backtest <= params.max_horizon
                    && table.backtest + params.min_history <= params.context_length,
                "the interval backtest of {} values does not fit the model's sizes",
                table.backtest
            );
        }
        let [values, mask] = manifest.inputs.as_slice() else {
            bail!("a forecast model takes two inputs (values, mask)");
        };
        let [output] = manifest.outputs.as_slice() else {
            bail!("a forecast model has one output");
        };
        check_batch_matrix(values, params.context_length)?;
        check_batch_matrix(mask, params.context_length)?;
        check_batch_matrix(output, params.max_horizon)?;
        for input in [values, mask] {
            ensure!(
                session.inputs().iter().any(|i| i.name() == input.name),
                "the model has no input named `{}`",
                input.name
            );
        }
        ensure!(
            session.outputs().iter().any(|o| o.name() == output.name),
            "the model has no output named `{}`",
            output.name
        );
        Ok(Self {
            session: Mutex::new(session),
            params,
            values_input: values.name.clone(),
            mask_input: mask.name.clone(),
            output: output.name.clone(),
        })
    }

    fn infer(&self, series: &[&[f64]], horizon: usize) -> anyhow::Result<Vec<Vec<f64>>> {
        let batch = encode(series, &self.params)?;
        let rows = series.len();
        let shape = [rows, self.params.context_length];
        let inputs = ort::inputs![
            self.values_input.as_str() => Tensor::from_array((shape, batch.values))?,
            self.mask_input.as_str() => Tensor::from_array((shape, batch.mask))?,
        ];
        // A panic while holding the lock leaves the session itself intact.
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let outputs = session.run(inputs).context("running the model")?;
        let output = outputs
            .get(&self.output)
            .with_context(|| format!("the model returned no `{}`", self.output))?;
        let (shape, data) = output
            .try_extract_tensor::<f32>()
            .with_context(|| format!("reading `{}` as float32", self.output))?;
        decode(shape, data, rows, horizon)
    }
}

impl ForecastPlugin {
    /// Forecasts and their bands at each of `levels`. One batched run covers the rows and their
    /// backtests (each row forecast again from all but its last values).
    fn forecast_with_intervals(
        &self,
        rows: &[&[f64]],
        horizon: usize,
        levels: &[f64],
        season_length: Option<u32>,
    ) -> anyhow::Result<ShardOutput> {
        let table = self
            .params
            .intervals
            .as_ref()
            .context("this forecast model has no interval calibration")?;
        for level in levels {
            ensure!(
                table.level_range().contains(level),
                "interval level {level} is outside {:?}",
                table.level_range()
            );
        }
        let backtest_inputs: Vec<Option<&[f64]>> = rows
            .iter()
            .map(|row| table.backtest_input(row, self.params.min_history))
            .collect();
        let mut batch = rows.to_vec();
        batch.extend(backtest_inputs.iter().flatten());
        let mut outputs = self.infer(&batch, horizon.max(table.backtest))?;
        let mut backtests = outputs.split_off(rows.len()).into_iter();
        let forecasts: Vec<Vec<f64>> = outputs
            .into_iter()
            .map(|mut row| {
                row.truncate(horizon);
                row
            })
            .collect();
        let scales: Vec<f64> = rows
            .iter()
            .zip(&backtest_inputs)
            .map(|(row, input)| {
                let backtest = input.and_then(|_| backtests.next());
                let season = season_length.map_or_else(|| table.season(row), |m| m as usize);
                table.scale(row, season, backtest.as_deref())
            })
            .collect();
        let intervals = levels
            .iter()
            .map(|&level| {
                let (lower, upper) = forecasts
                    .iter()
                    .zip(&scales)
                    .map(|(f, &s)| table.bounds(f, s, level, season_length.is_some()))
                    .unzip();
                ForecastInterval {
                    level,
                    lower,
                    upper,
                }
            })
            .collect();
        Ok(ShardOutput::Forecast {
            forecasts,
            intervals,
        })
    }
}

impl Plugin for ForecastPlugin {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn run(
        &self,
        task: &ShardTask,
        progress: &mut dyn FnMut(&ShardOutput) -> bool,
    ) -> anyhow::Result<ShardOutput> {
        let ShardTask::Forecast {
            series,
            horizon,
            levels,
            season_length,
        } = task
        else {
            bail!(
                "a forecast model cannot run `{}` shards",
                super::task_kind(task)
            );
        };
        let horizon = *horizon as usize;
        ensure!(
            (1..=self.params.max_horizon).contains(&horizon),
            "horizon {horizon} is outside 1..={} for this model",
            self.params.max_horizon
        );
        ensure!(!series.is_empty(), "the shard has no rows");
        // The model reads only the trailing context; so do the intervals.
        let rows: Vec<&[f64]> = series
            .iter()
            .map(|row| &row[row.len().saturating_sub(self.params.context_length)..])
            .collect();
        let output = if levels.is_empty() {
            ShardOutput::Forecast {
                forecasts: self.infer(&rows, horizon)?,
                intervals: Vec::new(),
            }
        } else {
            self.forecast_with_intervals(&rows, horizon, levels, *season_length)?
        };
        // One batched run finishes every row at once.
        ensure!(progress(&output), "stopped by the gateway");
        Ok(output)
    }
}

/// Inputs and outputs are float32 `[N, width]` with a dynamic batch dimension.
fn check_batch_matrix(spec: &TensorSpec, width: usize) -> anyhow::Result<()> {
    ensure!(
        spec.dtype == "float32",
        "`{}` is {}, expected float32",
        spec.name,
        spec.dtype
    );
    match spec.shape.as_slice() {
        [Dim::Symbolic(_), Dim::Fixed(w)] if *w == width as u64 => Ok(()),
        shape => bail!("`{}` has shape {shape:?}, expected [N, {width}]", spec.name),
    }
}

/// The model's `values` and `mask` inputs, row-major `[rows, context_length]`.
#[derive(Debug, PartialEq)]
struct Batch {
    values: Vec<f32>,
    mask: Vec<f32>,
}

fn encode<R: AsRef<[f64]>>(series: &[R], params: &ForecastParams) -> anyhow::Result<Batch> {
    let context = params.context_length;
    let mut values = vec![0.0f32; series.len() * context];
    let mut mask = vec![0.0f32; series.len() * context];
    let rows = series
        .iter()
        .zip(values.chunks_exact_mut(context))
        .zip(mask.chunks_exact_mut(context));
    for (index, ((row, values), mask)) in rows.enumerate() {
        let row = row.as_ref();
        ensure!(
            row.len() >= params.min_history,
            "row {index} has {} observations; the model needs at least {}",
            row.len(),
            params.min_history
        );
        let kept = &row[row.len().saturating_sub(context)..];
        let start = context - kept.len();
        for ((&value, slot), observed) in kept
            .iter()
            .zip(&mut values[start..])
            .zip(&mut mask[start..])
        {
            let narrowed = value as f32;
            ensure!(
                narrowed.is_finite(),
                "row {index} holds {value}, which does not fit a 32-bit float"
            );
            *slot = narrowed;
            *observed = 1.0;
        }
    }
    Ok(Batch { values, mask })
}

/// Splits the `[rows, width]` output into rows of the first `horizon` values.
fn decode(
    shape: &[i64],
    data: &[f32],
    rows: usize,
    horizon: usize,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let width = match shape {
        [n, w] if *n == rows as i64 && *w >= horizon as i64 => *w as usize,
        _ => bail!("the model returned shape {shape:?}; expected [{rows}, >= {horizon}]"),
    };
    ensure!(
        data.len() == rows * width,
        "the model returned {} values for shape {shape:?}",
        data.len()
    );
    data.chunks_exact(width)
        .enumerate()
        .map(|(index, row)| {
            row[..horizon]
                .iter()
                .map(|&v| match v.is_finite() {
                    true => Ok(f64::from(v)),
                    false => Err(anyhow!(
                        "the model produced a non-finite forecast ({v}) for row {index}"
                    )),
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{default_ort_dylib_path, AcceleratorChoice};
    use crate::onnx::OnnxRuntime;

    const PARAMS: ForecastParams = ForecastParams {
        context_length: 4,
        max_horizon: 2,
        min_history: 3,
        intervals: None,
    };

    #[test]
    fn rows_are_right_aligned_left_padded_and_truncated_to_the_context() {
        let batch = encode(
            &[
                vec![1.0, 2.0, 3.0],
                vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                vec![-1.5, 0.0, 2.5, 7.0],
            ],
            &PARAMS,
        )
        .unwrap();
        assert_eq!(
            batch.values,
            [
                [0.0, 1.0, 2.0, 3.0],
                [3.0, 4.0, 5.0, 6.0],
                [-1.5, 0.0, 2.5, 7.0]
            ]
            .concat()
        );
        assert_eq!(
            batch.mask,
            [[0.0, 1.0, 1.0, 1.0], [1.0; 4], [1.0; 4]].concat()
        );
    }

    #[test]
    fn short_rows_and_values_beyond_f32_are_refused() {
        let err = encode(&[vec![1.0, 2.0, 3.0], vec![1.0, 2.0]], &PARAMS).unwrap_err();
        assert!(
            err.to_string().contains("row 1 has 2 observations"),
            "{err}"
        );
        assert!(encode(&[vec![1.0, 2.0, 1e300]], &PARAMS).is_err());
        // Values dropped by the context window do not matter.
        assert!(encode(&[vec![1e300, 1.0, 2.0, 3.0, 4.0]], &PARAMS).is_ok());
    }

    #[test]
    fn outputs_are_cut_to_the_horizon_and_must_be_finite() {
        let data = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(
            decode(&[2, 3], &data, 2, 2).unwrap(),
            [vec![1.0, 2.0], vec![4.0, 5.0]]
        );
        assert!(decode(&[3, 2], &data, 2, 2).is_err());
        assert!(decode(&[2, 3], &data, 2, 4).is_err());
        assert!(decode(&[2, 3], &[1.0, f32::NAN, 0.0, 0.0, 0.0, 0.0], 2, 2).is_err());
        // A non-finite value past the horizon is never read.
        assert!(decode(&[2, 3], &[1.0, 1.0, f32::NAN, 0.0, 0.0, 0.0], 2, 2).is_ok());
    }

    /// `XPAND_MODELS_DIR` (as for the binary), else the repository's `workers/models`.
    fn models_dir() -> std::path::PathBuf {
        std::env::var_os("XPAND_MODELS_DIR")
            .map(Into::into)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"))
    }

    /// Runs the real model with the real ONNX Runtime on a seasonal series.
    #[test]
    fn the_real_model_forecasts_a_seasonal_series() {
        let dylib = default_ort_dylib_path();
        assert!(
            dylib.is_file(),
            "ONNX Runtime not found at {}: run scripts/setup-onnxruntime.sh",
            dylib.display()
        );
        let model_dir = models_dir().join("forecast");
        let model = crate::models::verify(&model_dir).unwrap_or_else(|e| {
            panic!(
                "no usable forecast model in {} ({e:#}): workers/models/forecast comes from \
                 training/train_forecast.py; also run scripts/setup-onnxruntime.sh",
                model_dir.display()
            )
        });
        let runtime = OnnxRuntime::load(&dylib, AcceleratorChoice::Cpu).unwrap();
        let (session, _) = runtime.session(&model.bytes).unwrap();
        let plugin = ForecastPlugin::new(&model.manifest, session).unwrap();

        let period = 12.0;
        let season =
            |t: usize| 100.0 + 20.0 * (2.0 * std::f64::consts::PI * t as f64 / period).sin();
        let history: Vec<f64> = (0..96).map(season).collect();
        let horizon = 12;
        let task = ShardTask::Forecast {
            series: vec![
                history.clone(),
                history[90..].to_vec(),
                history[..40].to_vec(),
            ],
            horizon: horizon as u32,
            levels: Vec::new(),
            season_length: None,
        };
        let mut reported = Vec::new();
        let output = plugin
            .run(&task, &mut |done| {
                reported.push(done.clone());
                true
            })
            .unwrap();
        assert_eq!(reported, std::slice::from_ref(&output));
        let ShardOutput::Forecast { forecasts, .. } = output else {
            panic!("not a forecast output: {output:?}");
        };
        assert_eq!(forecasts.len(), 3);
        assert!(forecasts
            .iter()
            .all(|row| row.len() == horizon && row.iter().all(|v| v.is_finite())));

        let truth: Vec<f64> = (96..96 + horizon).map(season).collect();
        let forecast = &forecasts[0];
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        let (mf, mt) = (mean(forecast), mean(&truth));
        let covariance: f64 = forecast
            .iter()
            .zip(&truth)
            .map(|(f, t)| (f - mf) * (t - mt))
            .sum();
        let spread = |xs: &[f64], m: f64| xs.iter().map(|x| (x - m).powi(2)).sum::<f64>().sqrt();
        let correlation = covariance / (spread(forecast, mf) * spread(&truth, mt));
        let mean_abs_error = mean(
            &forecast
                .iter()
                .zip(&truth)
                .map(|(f, t)| (f - t).abs())
                .collect::<Vec<_>>(),
        );
        assert!(
            correlation > 0.8 && mean_abs_error < 10.0,
            "forecast {forecast:?} does not follow the season {truth:?} \
             (correlation {correlation:.3}, mean absolute error {mean_abs_error:.2})"
        );

        // With levels: each forecast inside its bands, the wider level outside the narrower,
        // the same points as without levels.
        let with_levels = ShardTask::Forecast {
            series: vec![history.clone(), history[..40].to_vec(), vec![5.0; 20]],
            horizon: horizon as u32,
            levels: vec![80.0, 95.0],
            season_length: None,
        };
        let ShardOutput::Forecast {
            forecasts: points,
            intervals,
        } = plugin.run(&with_levels, &mut |_| true).unwrap()
        else {
            panic!("not a forecast output");
        };
        assert_eq!(points[0], forecasts[0]);
        assert_eq!(points[1], forecasts[2]);
        let [eighty, ninety_five] = intervals.as_slice() else {
            panic!("two levels asked, {} bands", intervals.len());
        };
        assert_eq!((eighty.level, ninety_five.level), (80.0, 95.0));
        for (row, f) in points.iter().enumerate() {
            for (step, f) in f.iter().enumerate() {
                let (lo80, hi80) = (eighty.lower[row][step], eighty.upper[row][step]);
                let (lo95, hi95) = (ninety_five.lower[row][step], ninety_five.upper[row][step]);
                assert!(
                    lo95 <= lo80 && lo80 <= *f && f <= &hi80 && hi80 <= hi95,
                    "row {row} step {step}: {lo95} {lo80} {f} {hi80} {hi95}"
                );
            }
        }
        // A seasonal row gets a band that follows the season, not a flat one; a constant row's
        // band has no width.
        assert!(eighty.upper[0][0] > eighty.lower[0][0]);
        assert!((eighty.upper[2][0] - eighty.lower[2][0]).abs() < 1e-3);
        let outside = ShardTask::Forecast {
            series: vec![history.clone()],
            horizon: 4,
            levels: vec![99.5],
            season_length: Some(12),
        };
        let err = plugin.run(&outside, &mut |_| true).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");

        let too_far = ShardTask::Forecast {
            series: vec![history],
            horizon: 1000,
            levels: Vec::new(),
            season_length: None,
        };
        assert!(plugin.run(&too_far, &mut |_| true).is_err());
    }
}
