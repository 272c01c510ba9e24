//! Extractors whose rejections are problem documents: a malformed body, a wrong type or a bad
//! path never reaches the client as axum's plain-text error.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{AppError, FieldError};
use crate::http::state::AppState;

/// A JSON body, size-limited by `XPAND_MAX_BODY_BYTES`. Syntax errors are 400
/// `malformed-json`; type errors are 422 naming the field's path (e.g. `max_fee`).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        let bytes = read_json_body(req, state).await?;
        object_body(&bytes)?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Like [`JsonBody`], but an empty body stands for `T::default()`.
pub struct JsonBodyOrDefault<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<AppState> for JsonBodyOrDefault<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        let bytes = read_json_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBodyOrDefault(T::default()));
        }
        object_body(&bytes)?;
        parse_json(&bytes).map(JsonBodyOrDefault)
    }
}

/// Every body the API takes is a JSON object. (serde reads a struct from an array too, by
/// position: `[null, null]` would pass for `{}`.)
fn object_body(bytes: &[u8]) -> Result<(), AppError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => Ok(()),
        Some(_) => Err(AppError::field("body", "must be a JSON object")),
    }
}

/// Reads a body of at most `XPAND_MAX_BODY_BYTES` whose declared type, if any, is JSON.
async fn read_json_body(req: Request, state: &AppState) -> Result<axum::body::Bytes, AppError> {
    let limit = state.config.max_body_bytes;
    if let Some(ct) = req.headers().get(axum::http::header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default();
        if !ct.starts_with("application/json") && !ct.contains("+json") {
            return Err(AppError::field("Content-Type", "must be application/json"));
        }
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| AppError::PayloadTooLarge { limit })
}

/// Parses JSON the way [`JsonBody`] does (the WebSocket uses it for frames): one value and
/// nothing after it, and no NUL character in any string or key (Postgres text cannot hold one).
/// A whole number written as a float (`221.0`) is read as the integer it is, as JSON Schema
/// reads it; generated clients and Python's `json` write them.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = match serde_path_to_error::deserialize(&mut *de) {
        Ok(value) => {
            de.end().map_err(|_| {
                AppError::MalformedJson("the body continues after the JSON value".into())
            })?;
            value
        }
        Err(e)
            if e.inner()
                .to_string()
                .starts_with("invalid type: floating point") =>
        {
            let mut tree: Value = serde_json::from_slice(bytes)
                .map_err(|e| AppError::MalformedJson(e.to_string()))?;
            whole_floats_as_integers(&mut tree);
            serde_path_to_error::deserialize(tree).map_err(rejection)?
        }
        Err(e) => return Err(rejection(e)),
    };
    // Raw control characters are invalid JSON, so a NUL can only arrive escaped.
    if bytes.windows(6).any(|w| w == b"\\u0000") {
        let tree: Value =
            serde_json::from_slice(bytes).map_err(|e| AppError::MalformedJson(e.to_string()))?;
        if let Some(field) = nul_path(&tree, String::new()) {
            return Err(AppError::field(field, "must not contain a NUL character"));
        }
    }
    Ok(value)
}

/// Rewrites every float with no fraction, within the range a double holds exactly, as an
/// integer. (A float field still reads an integer.)
fn whole_floats_as_integers(value: &mut Value) {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match value {
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if x.fract() == 0.0 && x.abs() <= EXACT {
                *value = Value::from(x as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_floats_as_integers),
        Value::Object(map) => map.values_mut().for_each(whole_floats_as_integers),
        _ => {}
    }
}

/// The path of the first string or key holding a NUL, e.g. `input.series[0]` or `webhook`.
fn nul_path(value: &Value, path: String) -> Option<String> {
    let at = |suffix: String| {
        if path.is_empty() {
            suffix.trim_start_matches('.').to_string()
        } else {
            format!("{path}{suffix}")
        }
    };
    match value {
        Value::String(s) if s.contains('\0') => {
            Some(if path.is_empty() { "body".into() } else { path })
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_path(v, at(format!("[{i}]")))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(at(format!(".{}", k.replace('\0', "\\u0000"))))
            } else {
                nul_path(v, at(format!(".{k}")))
            }
        }),
        _ => None,
    }
}

/// A body serde could not read: a syntax error is `malformed-json`, anything else names the
/// field's path.
fn rejection(e: serde_path_to_error::Error<serde_json::Error>) -> AppError {
    let inner = e.inner();
    if inner.is_syntax() || inner.is_eof() {
        AppError::MalformedJson(inner.to_string())
    } else {
        let path = e.path().to_string();
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        AppError::Validation(vec![FieldError::new(field, inner.to_string())])
    }
}

/// `axum::extract::Path` with a problem rejection; a NUL in the path is refused.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Path<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        if contains_nul(parts.uri.path()) {
            return Err(AppError::field("path", "must not contain a NUL character"));
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| AppError::field("path", e.body_text()))
    }
}

/// `axum::extract::Query` with a problem rejection naming the parameter; a NUL is refused.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Query<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let query = parts.uri.query().unwrap_or_default();
        if let Some((name, _)) = url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, v)| k.contains('\0') || v.contains('\0'))
        {
            return Err(AppError::field(
                name.replace('\0', "\\u0000"),
                "must not contain a NUL character",
            ));
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| AppError::field("query", e.body_text()))
    }
}

/// Whether a percent-encoded path decodes to something with a NUL in it.
fn contains_nul(path: &str) -> bool {
    path.as_bytes().windows(3).any(|w| w == b"%00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct Body {
        n: u64,
        x: f64,
        rows: Vec<Vec<i32>>,
    }

    #[test]
    fn whole_floats_read_as_integers_and_fractions_are_refused_by_field() {
        let body: Body = parse_json(br#"{"n": 221.0, "x": 2, "rows": [[1, -3.0]]}"#).unwrap();
        assert_eq!((body.n, body.x, body.rows), (221, 2.0, vec![vec![1, -3]]));
        for (json, field) in [
            (r#"{"n": 221.5, "x": 1, "rows": []}"#, "n"),
            (r#"{"n": 1e300, "x": 1, "rows": []}"#, "n"),
            (r#"{"n": 1, "x": 1, "rows": [[0.5]]}"#, "rows[0][0]"),
        ] {
            match parse_json::<Body>(json.as_bytes()) {
                Err(AppError::Validation(errors)) => assert_eq!(errors[0].field, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
        assert!(matches!(
            parse_json::<Body>(br#"{"n": 1.0, "x": 1, "rows": []} {}"#),
            Err(AppError::MalformedJson(_))
        ));
    }
}
