//! A forecast job's `params`: how far to forecast, at which interval levels, with which season.
//! Every problem is named by its field, so a spreadsheet can point at the argument.

use serde_json::Value;

use super::{CONTEXT_LENGTH, MAX_HORIZON};
use crate::error::FieldError;

/// Interval levels the model's calibration covers (percent).
pub const LEVELS: std::ops::RangeInclusive<f64> = 50.0..=99.0;
/// Most interval levels one job may ask for.
pub const MAX_LEVELS: usize = 4;
/// Longest season the model can use: the worker reads a row's last [`CONTEXT_LENGTH`] values,
/// and a season needs at least two of them a season apart.
pub const MAX_SEASON_LENGTH: u64 = CONTEXT_LENGTH as u64 - 1;

#[derive(Debug, Clone, PartialEq)]
pub struct ForecastParams {
    pub horizon: u32,
    /// Interval levels, in the order asked; empty for forecasts alone.
    pub levels: Vec<f64>,
    /// The season the caller named; the worker detects one when absent.
    pub season_length: Option<u32>,
}

impl ForecastParams {
    /// The parameters, or `None` with each problem pushed to `errors`.
    pub fn parse(params: &Value, errors: &mut Vec<FieldError>) -> Option<Self> {
        let before = errors.len();
        if let Some(obj) = params.as_object() {
            for key in obj
                .keys()
                .filter(|k| !["horizon", "level", "season_length"].contains(&k.as_str()))
            {
                errors.push(FieldError::new(
                    format!("params.{key}"),
                    "is not a forecast parameter",
                ));
            }
        }
        let horizon = match params.get("horizon") {
            None => {
                errors.push(FieldError::new("params.horizon", "is required"));
                None
            }
            Some(h) => match h.as_u64() {
                Some(h) if (1..=MAX_HORIZON).contains(&h) => Some(h as u32),
                _ => {
                    errors.push(FieldError::new(
                        "params.horizon",
                        format!("must be an integer from 1 to {MAX_HORIZON}"),
                    ));
                    None
                }
            },
        };
        let levels = match params.get("level") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                if items.is_empty() || items.len() > MAX_LEVELS {
                    errors.push(FieldError::new(
                        "params.level",
                        format!("must list 1 to {MAX_LEVELS} levels"),
                    ));
                }
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| level(item, format!("params.level[{i}]"), errors))
                    .collect()
            }
            Some(item) => level(item, "params.level".into(), errors)
                .into_iter()
                .collect(),
        };
        if let Some(i) = (1..levels.len()).find(|&i| levels[..i].contains(&levels[i])) {
            errors.push(FieldError::new(
                format!("params.level[{i}]"),
                "repeats a level already asked for",
            ));
        }
        let season_length = match params.get("season_length") {
            None | Some(Value::Null) => None,
            Some(m) => match m.as_u64() {
                Some(m) if (1..=MAX_SEASON_LENGTH).contains(&m) => Some(m as u32),
                _ => {
                    errors.push(FieldError::new(
                        "params.season_length",
                        format!(
                            "must be an integer from 1 to {MAX_SEASON_LENGTH} (values per season; \
                             leave it out to have the season detected)"
                        ),
                    ));
                    None
                }
            },
        };
        (errors.len() == before).then(|| Self {
            horizon: horizon.expect("no errors"),
            levels,
            season_length,
        })
    }
}

/// One interval level in percent (80 for 80 %).
fn level(item: &Value, field: String, errors: &mut Vec<FieldError>) -> Option<f64> {
    match item.as_f64() {
        Some(l) if LEVELS.contains(&l) => Some(l),
        Some(l) if l > 0.0 && l < 1.0 => {
            let percent = l * 100.0;
            errors.push(FieldError::new(
                field,
                format!("is a percent from 50 to 99: write {percent} for {l}"),
            ));
            None
        }
        _ => {
            errors.push(FieldError::new(
                field,
                "must be a percent from 50 to 99 (80 for an 80% interval)",
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(params: Value) -> Vec<String> {
        let mut errors = Vec::new();
        assert_eq!(
            ForecastParams::parse(&params, &mut errors),
            None,
            "{params}"
        );
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn levels_and_seasons_are_read_in_the_order_asked() {
        let mut errors = Vec::new();
        let params = json!({ "horizon": 3, "level": [95, 80.5], "season_length": 12 });
        let parsed = ForecastParams::parse(&params, &mut errors).unwrap();
        assert_eq!(parsed.levels, [95.0, 80.5]);
        assert_eq!(parsed.season_length, Some(12));
        let one = ForecastParams::parse(&json!({ "horizon": 1, "level": 80 }), &mut errors);
        assert_eq!(one.unwrap().levels, [80.0]);
        let none = ForecastParams::parse(&json!({ "horizon": 1, "level": null }), &mut errors);
        assert_eq!(
            none.unwrap(),
            ForecastParams {
                horizon: 1,
                levels: vec![],
                season_length: None
            }
        );
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn each_bad_parameter_is_named() {
        for (params, field) in [
            (json!({}), "params.horizon"),
            (json!({ "horizon": 0 }), "params.horizon"),
            (json!({ "horizon": 25 }), "params.horizon"),
            (json!({ "horizon": 2.5 }), "params.horizon"),
            (json!({ "horizon": 2, "speed": 1 }), "params.speed"),
            (json!({ "horizon": 2, "level": 100 }), "params.level"),
            (json!({ "horizon": 2, "level": 0.8 }), "params.level"),
            (json!({ "horizon": 2, "level": "80" }), "params.level"),
            (
                json!({ "horizon": 2, "level": [80, 40] }),
                "params.level[1]",
            ),
            (
                json!({ "horizon": 2, "level": [80, 80] }),
                "params.level[1]",
            ),
            (json!({ "horizon": 2, "level": [] }), "params.level"),
            (
                json!({ "horizon": 2, "level": [50, 60, 70, 80, 90] }),
                "params.level",
            ),
            (
                json!({ "horizon": 2, "season_length": 0 }),
                "params.season_length",
            ),
            (
                json!({ "horizon": 2, "season_length": 64 }),
                "params.season_length",
            ),
            (
                json!({ "horizon": 2, "season_length": 12.5 }),
                "params.season_length",
            ),
        ] {
            assert_eq!(fields(params.clone()), [field], "{params}");
        }
        let mut errors = Vec::new();
        ForecastParams::parse(&json!({ "horizon": 2, "level": 0.8 }), &mut errors);
        assert!(
            errors[0].detail.contains("write 80 for 0.8"),
            "{}",
            errors[0].detail
        );
    }
}
