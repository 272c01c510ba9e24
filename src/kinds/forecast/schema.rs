//! The `forecast` kind's shapes in the OpenAPI document, so that a client generated from it
//! gets real types: its input, its parameters with their ranges, and its output. What the
//! schema cannot say (the blank-cell rule, the pairing of a row with its cells) the plan still
//! checks and names.

use serde_json::{json, Value};

use super::params::{LEVELS, MAX_LEVELS, MAX_SEASON_LENGTH};
use super::{MAX_HORIZON, MAX_ROWS, MAX_ROW_LEN, MIN_HISTORY};

/// `(component name, JSON schema)` of the input, the parameters and the output.
pub fn schemas() -> [(&'static str, Value); 3] {
    let level = json!({ "type": "number", "minimum": LEVELS.start(), "maximum": LEVELS.end() });
    let rows = json!({ "type": "array",
        "items": { "type": ["array", "null"], "items": { "type": "number" } } });
    [
        (
            "ForecastInput",
            json!({
                "type": "object",
                "description": "One row per spreadsheet row, oldest value first. A blank cell \
                    (null) is filled between values and dropped at a row's ends; at most 30% of the cells from a row's first value to its last \
                    may be blank.",
                "required": ["series"],
                "additionalProperties": false,
                "properties": { "series": {
                    // The caps (MAX_ROWS rows of MAX_ROW_LEN cells) are in the description,
                    // not `maxItems`: a generator testing the boundary would build a body of
                    // a hundred million cells.
                    "type": "array", "minItems": 1,
                    "description": format!("At most {MAX_ROWS} rows of at most {MAX_ROW_LEN} \
                        cells."),
                    "items": {
                        "type": "array", "minItems": MIN_HISTORY,
                        // (Text of white space only is read as blank too; null is what a
                        // client should send.)
                        "items": { "type": ["number", "null"] },
                    },
                } },
            }),
        ),
        (
            "ForecastParams",
            json!({
                "type": "object",
                "required": ["horizon"],
                "additionalProperties": false,
                "properties": {
                    "horizon": { "type": "integer", "minimum": 1, "maximum": MAX_HORIZON,
                        "description": "Values to forecast per row." },
                    "level": {
                        "description": "Prediction interval level(s), in percent: adds \
                            `intervals` to the output.",
                        "anyOf": [level.clone(), {
                            "type": "array", "minItems": 1, "maxItems": MAX_LEVELS,
                            "uniqueItems": true, "items": level,
                        }],
                    },
                    "season_length": { "type": "integer", "minimum": 1,
                        "maximum": MAX_SEASON_LENGTH,
                        "description": "Values per season; detected when absent." },
                },
            }),
        ),
        (
            "ForecastOutput",
            json!({
                "type": "object",
                "required": ["forecasts"],
                "properties": {
                    "forecasts": {
                        "type": "array",
                        "description": "One row per input row. In a canceled job's output, \
                            null for the rows not paid for.",
                        "items": { "type": ["array", "null"], "items": { "type": "number" } },
                    },
                    "intervals": { "type": "array", "items": {
                        "type": "object", "required": ["level", "lower", "upper"],
                        "properties": {
                            "level": { "type": "number" },
                            "lower": rows.clone(),
                            "upper": rows,
                        },
                    } },
                    "missing": {
                        "type": "array",
                        "description": "A canceled job's rows not paid for.",
                        "items": { "type": "object", "required": ["offset", "rows"],
                            "properties": { "offset": { "type": "integer" },
                                "rows": { "type": "integer" } } },
                    },
                    "unverified_shards": { "type": "array", "items": { "type": "integer" } },
                },
            }),
        ),
    ]
}
