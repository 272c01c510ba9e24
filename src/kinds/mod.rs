//! The job kinds this gateway runs, each in its own folder behind [`crate::jobs::JobKind`].
//!
//! Adding a kind: a folder here implementing the trait, and one line in [`registry`] and in
//! [`schemas`]. A kind
//! whose shards carry a new kind of task or output also adds its variants to the wire types in
//! `xpand-protocol` and a plugin to the worker.

pub mod anonymize;
pub mod forecast;
pub mod predict;

use crate::config::Config;
use crate::jobs::Kinds;
use crate::transfers::TransferUrls;

/// What each kind takes and gives, for the OpenAPI document: its name and the `(component,
/// JSON schema)` of its input, its parameters and its output.
pub fn schemas() -> [(&'static str, [(&'static str, serde_json::Value); 3]); 3] {
    [
        (forecast::KIND, forecast::schema::schemas()),
        (anonymize::KIND, anonymize::schema::schemas()),
        (predict::KIND, predict::schema::schemas()),
    ]
}

/// Every kind this gateway accepts, configured.
pub fn registry(config: &Config, transfers: TransferUrls) -> Kinds {
    Kinds::default()
        .with(forecast::Forecast {
            rows_per_shard: config.forecast_rows_per_shard,
        })
        .with(predict::Predict {
            elements_per_shard: config.predict_elements_per_shard,
            transfers: transfers.clone(),
            url_lifetime: config.scheduling.job_timeout,
        })
        .with(anonymize::Anonymize {
            transfers,
            url_lifetime: config.scheduling.job_timeout,
            scratch_dir: config.scratch_dir.clone(),
            max_video_seconds: config.max_video_seconds,
        })
}
