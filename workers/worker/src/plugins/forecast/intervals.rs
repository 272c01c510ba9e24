//! Prediction intervals around the model's forecasts: `forecast ± q(level) · s · step^growth`.
//!
//! The network gives one value per step; the band comes from a calibration its trainer ships in
//! the manifest (`intervals`): a split-conformal multiplier `q` per integer level and a `growth`
//! exponent, once for a season detected here and once for a season the caller gave. `s` is the
//! row's own error scale: the geometric mean of how much the row moves in a season and how wrong
//! the model was when it forecast the row's last values again (a backtest, one more batched
//! run). This file mirrors `training/intervals.py`, which calibrated the table with exactly
//! these rules; a difference between the two would make the stated coverage untrue.

use anyhow::ensure;
use serde::Deserialize;

/// The manifest's `intervals` table.
#[derive(Debug, Clone, Deserialize)]
pub struct IntervalTable {
    /// Lowest and highest level the multipliers cover, one per integer level.
    levels: [u32; 2],
    /// Longest season [`Self::season`] looks for.
    max_season: usize,
    /// Autocorrelation of the differences that counts as a season.
    min_season_acf: f64,
    /// Trailing values the model forecasts again to gauge its error.
    pub backtest: usize,
    season_detected: Calibration,
    season_given: Calibration,
}

#[derive(Debug, Clone, Deserialize)]
struct Calibration {
    growth: f64,
    multipliers: Vec<f64>,
}

impl IntervalTable {
    /// A table the worker can trust to give finite, ordered bounds.
    pub fn check(&self) -> anyhow::Result<()> {
        let [low, high] = self.levels;
        ensure!(
            0 < low && low < high && high < 100,
            "interval levels {low}..{high} are not within 1..99"
        );
        ensure!(
            self.backtest >= 1,
            "the interval backtest must cover a value"
        );
        for calibration in [&self.season_detected, &self.season_given] {
            ensure!(
                calibration.multipliers.len() == (high - low + 1) as usize,
                "an interval table needs one multiplier per level from {low} to {high}"
            );
            ensure!(
                calibration.growth.is_finite()
                    && calibration
                        .multipliers
                        .iter()
                        .all(|q| q.is_finite() && *q >= 0.0)
                    && calibration.multipliers.windows(2).all(|w| w[0] <= w[1]),
                "interval multipliers must be finite, non-negative and rise with the level"
            );
        }
        Ok(())
    }

    /// The levels a task may ask for.
    pub fn level_range(&self) -> std::ops::RangeInclusive<f64> {
        f64::from(self.levels[0])..=f64::from(self.levels[1])
    }

    /// The season of a row (the lag from 2 to `max_season` at which its first differences
    /// correlate best with themselves, when that beats `min_season_acf`), else 1.
    pub fn season(&self, row: &[f64]) -> usize {
        let diffs: Vec<f64> = row.windows(2).map(|w| w[1] - w[0]).collect();
        if diffs.len() < 8 {
            return 1;
        }
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let centred: Vec<f64> = diffs.iter().map(|d| d - mean).collect();
        let energy: f64 = centred.iter().map(|d| d * d).sum();
        if energy <= 0.0 {
            return 1;
        }
        let (mut best, mut best_acf) = (1, self.min_season_acf);
        for lag in 2..=self.max_season.min(centred.len() / 2) {
            let acf = centred[lag..]
                .iter()
                .zip(&centred)
                .map(|(a, b)| a * b)
                .sum::<f64>()
                / energy;
            if acf > best_acf {
                (best, best_acf) = (lag, acf);
            }
        }
        best
    }

    /// The part of a row the model forecasts again for the backtest: all but its last
    /// `backtest` values, when that leaves `min_history`.
    pub fn backtest_input<'r>(&self, row: &'r [f64], min_history: usize) -> Option<&'r [f64]> {
        (row.len() >= self.backtest + min_history).then(|| &row[..row.len() - self.backtest])
    }

    /// The row's error scale: sqrt(season scale × backtest mean absolute error), or the season
    /// scale alone without a backtest. `backtest` is the model's forecast from
    /// [`Self::backtest_input`]. 0 (a constant row) gives a band of no width.
    pub fn scale(&self, row: &[f64], season: usize, backtest: Option<&[f64]>) -> f64 {
        let season_scale = season_scale(row, season);
        match backtest {
            None => season_scale,
            Some(forecast) => {
                let actual = &row[row.len() - self.backtest..];
                let error = actual
                    .iter()
                    .zip(forecast)
                    .map(|(a, f)| (a - f).abs())
                    .sum::<f64>()
                    / self.backtest as f64;
                (season_scale * error).sqrt()
            }
        }
    }

    /// Lower and upper bounds around `forecast` (steps 1, 2, …) at `level`, for a row of error
    /// scale `scale`. `season_given`: whether the caller named the season.
    pub fn bounds(
        &self,
        forecast: &[f64],
        scale: f64,
        level: f64,
        season_given: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let calibration = match season_given {
            true => &self.season_given,
            false => &self.season_detected,
        };
        let at = (level - f64::from(self.levels[0]))
            .clamp(0.0, (self.levels[1] - self.levels[0]) as f64);
        let (below, above) = (at.floor() as usize, at.ceil() as usize);
        let q = &calibration.multipliers;
        let multiplier = q[below] + (q[above] - q[below]) * (at - below as f64);
        forecast
            .iter()
            .enumerate()
            .map(|(step, f)| {
                let width = multiplier * scale * ((step + 1) as f64).powf(calibration.growth);
                (f - width, f + width)
            })
            .unzip()
    }
}

/// Mean |x_t − x_{t−m}| over the row (lag 1 when m is 1, too long for the row, or gives 0).
fn season_scale(row: &[f64], season: usize) -> f64 {
    let lags = if season > 1 { vec![season, 1] } else { vec![1] };
    for lag in lags {
        if row.len() > lag {
            let sum: f64 = row[lag..].iter().zip(row).map(|(a, b)| (a - b).abs()).sum();
            let scale = sum / (row.len() - lag) as f64;
            if scale > 0.0 {
                return scale;
            }
        }
    }
    0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> IntervalTable {
        serde_json::from_value(serde_json::json!({
            "levels": [50, 99], "max_season": 32, "min_season_acf": 0.3, "backtest": 8,
            "season_detected": {"growth": 0.5, "multipliers": (50..=99).map(|l| l as f64 / 50.0).collect::<Vec<_>>()},
            "season_given": {"growth": 0.0, "multipliers": vec![1.0; 50]},
        }))
        .unwrap()
    }

    /// The same vectors `training/intervals.py` gives (season 12 for a monthly sine, 1 for a
    /// trend and for a short row; the scales by hand).
    #[test]
    fn seasons_and_scales_match_the_calibration_script() {
        let table = table();
        table.check().unwrap();
        let sine: Vec<f64> = (0..64)
            .map(|t| 100.0 + 20.0 * (2.0 * std::f64::consts::PI * t as f64 / 12.0).sin())
            .collect();
        assert_eq!(table.season(&sine), 12);
        let trend: Vec<f64> = (0..64).map(|t| 3.0 * t as f64 + (t % 2) as f64).collect();
        assert_eq!(table.season(&trend), 2);
        let line: Vec<f64> = (0..64).map(|t| 3.0 * t as f64).collect();
        assert_eq!(table.season(&line), 1);
        assert_eq!(table.season(&[1.0, 2.0, 3.0]), 1);
        // A row that repeats exactly at its season: the lag-1 scale steps in.
        let pattern: Vec<f64> = (0..30).map(|t| (t % 3) as f64).collect();
        assert_eq!(season_scale(&pattern, 3), season_scale(&pattern, 1));
        assert_eq!(season_scale(&line, 1), 3.0);
        assert_eq!(season_scale(&[5.0; 10], 1), 0.0);
        let backtest = [24.0, 24.0, 24.0, 24.0, 24.0, 24.0, 24.0, 24.0];
        let row: Vec<f64> = (0..10).map(|t| 3.0 * t as f64).collect();
        // season scale 3; backtest error: mean |6, 9, …, 27 − 24| = 66 / 8
        assert!(
            (table.scale(&row, 1, Some(&backtest)) - (3.0 * 66.0 / 8.0f64).sqrt()).abs() < 1e-12
        );
        assert_eq!(table.backtest_input(&row, 3), None);
        assert_eq!(
            table.backtest_input(&[0.0; 11], 3).map(<[f64]>::len),
            Some(3)
        );
    }

    #[test]
    fn bands_widen_with_the_step_and_the_level_and_hold_the_forecast() {
        let table = table();
        let (lower, upper) = table.bounds(&[10.0, 10.0, 10.0, 10.0], 2.0, 80.0, false);
        // q(80) = 1.6, width 1.6 · 2 · sqrt(step)
        assert!((upper[0] - 13.2).abs() < 1e-12 && (lower[0] - 6.8).abs() < 1e-12);
        assert!((upper[3] - (10.0 + 6.4)).abs() < 1e-12);
        // between two levels the multiplier is interpolated
        let (_, at) = table.bounds(&[0.0], 1.0, 80.5, false);
        assert!((at[0] - 1.61).abs() < 1e-12);
        let (_, given) = table.bounds(&[0.0, 0.0], 1.0, 95.0, true);
        assert_eq!(given, [1.0, 1.0]);
        // no width for a constant row
        assert_eq!(
            table.bounds(&[7.0], 0.0, 99.0, false),
            (vec![7.0], vec![7.0])
        );
    }

    #[test]
    fn a_table_that_could_give_crossed_or_infinite_bounds_is_refused() {
        let mut bad = table();
        bad.season_given.multipliers[3] = -1.0;
        assert!(bad.check().is_err());
        let mut short = table();
        short.season_detected.multipliers.pop();
        assert!(short.check().is_err());
    }
}
