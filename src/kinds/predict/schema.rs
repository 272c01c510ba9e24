//! The `predict` kind's shapes in the OpenAPI document: the Open Inference Protocol's request
//! body (plus the model) as its input, and its response body as its output. What the schema
//! cannot say (the tensors are the model's, with the shapes it takes) the plan checks and names.

use serde_json::{json, Value};

use crate::registry::Datatype;

fn tensor(with_data: &str) -> Value {
    json!({
        "type": "object",
        "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": { "type": "string" },
            "datatype": { "type": "string", "enum": ["FP32", "FP64", "INT32", "INT64"],
                "description": format!("One of {}.", Datatype::NAMES) },
            "shape": { "type": "array", "minItems": 1, "maxItems": 8,
                "items": { "type": "integer", "minimum": 1 },
                "description": "The first dimension is the rows." },
            "data": { "type": "array", "items": {},
                "description": with_data },
        },
    })
}

/// `(component name, JSON schema)` of the input, the parameters and the output.
pub fn schemas() -> [(&'static str, Value); 3] {
    [
        (
            "PredictInput",
            json!({
                "type": "object",
                "required": ["model", "inputs"],
                "additionalProperties": false,
                "properties": {
                    "model": { "type": "string", "minLength": 1, "maxLength": 128,
                        "description": "A model from `GET /v1/models`." },
                    "version": { "type": "string", "minLength": 1, "maxLength": 128,
                        "description": "`latest` (the default), a sha256 or a prefix of at least 8 hex digits." },
                    "id": { "type": "string", "minLength": 1, "maxLength": 128 },
                    "parameters": { "type": "object" },
                    "inputs": { "type": "array", "minItems": 1, "maxItems": 32,
                        "items": tensor("The elements in row-major order, flat or nested.") },
                    "outputs": { "type": "array", "minItems": 1,
                        "items": { "type": "object", "required": ["name"],
                            "properties": { "name": { "type": "string" } } },
                        "description": "The outputs to return (default: all)." },
                },
            }),
        ),
        (
            "PredictParams",
            json!({ "type": "object", "additionalProperties": false, "maxProperties": 0 }),
        ),
        (
            "PredictOutput",
            json!({
                "type": "object",
                "required": ["outputs"],
                "properties": {
                    "outputs": { "type": "array",
                        "items": tensor("The elements in row-major order, flat.") },
                },
            }),
        ),
    ]
}
