//! The `anonymize` kind's shapes in the OpenAPI document, so that a client generated from it
//! gets real types: its input (an uploaded file), its parameters with their ranges, and its
//! output. What the schema cannot say (the file is a decodable video within the limits) the
//! plan checks and names.

use serde_json::{json, Value};

use super::plan::{MIN_DETECT_WIDTH, QUALITIES};
use super::MAX_WIDTH;

/// `(component name, JSON schema)` of the input, the parameters and the output.
pub fn schemas() -> [(&'static str, Value); 3] {
    let qualities: Vec<&str> = QUALITIES.iter().map(|(name, _)| *name).collect();
    [
        (
            "AnonymizeInput",
            json!({
                "type": "object",
                "required": ["file"],
                "additionalProperties": false,
                "properties": { "file": { "type": "string", "format": "uuid",
                    "description": "A video uploaded with `POST /v1/files`." } },
            }),
        ),
        (
            "AnonymizeParams",
            json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "targets": { "type": "array", "minItems": 1,
                        "items": { "type": "string", "enum": ["faces"] } },
                    "style": { "type": "string", "enum": ["blur", "mosaic", "solid"] },
                    "threshold": { "type": "number", "minimum": 0.01, "maximum": 0.99,
                        "description": "Detection score from which a face is masked (0.2)." },
                    "quality": { "type": "string", "enum": qualities },
                    "detect_width": { "type": "integer", "minimum": MIN_DETECT_WIDTH,
                        "maximum": MAX_WIDTH,
                        "description": "Width frames are scaled to for detection \
                            (default: the frame's)." },
                },
            }),
        ),
        (
            "AnonymizeOutput",
            json!({
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": { "type": "string", "format": "uuid",
                        "description": "The masked video: `GET /v1/files/{file}`." },
                    "size": { "type": "integer" },
                    "sha256": { "type": "string" },
                    "frames": { "type": "integer" },
                    "width": { "type": "integer" },
                    "height": { "type": "integer" },
                    "duration_seconds": { "type": "number" },
                    "segments": { "type": "integer" },
                    "faces_masked": { "type": "integer" },
                    "audio": { "type": "boolean" },
                    "unverified_shards": { "type": "array", "items": { "type": "integer" } },
                },
            }),
        ),
    ]
}
