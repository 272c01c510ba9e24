//! Short-lived signed URLs through which workers fetch shard inputs and upload shard outputs
//! (video bytes never travel over MQTT).
//!
//! A URL names one assignment and one direction and carries an expiry and an HMAC-SHA256 by the
//! gateway (key derived from its signing key, so every replica can check it). Because
//! assignments are sealed into the public ledger, the URL alone grants nothing: the request must
//! also be signed by the node the assignment went to ([`xpand_protocol::transfer`]), and it works
//! only while that assignment is the shard's current one.
//!
//! What travels through them lives in object storage under the job ([`input_path`],
//! [`output_path`]) until the job ends and its kind discards it.

use hmac::{Hmac, Mac};
use object_store::path::Path as ObjectPath;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use xpand_protocol::NodeKey;

/// Where shard `idx` of `job` keeps the input a node fetches, while the job runs.
pub fn input_path(job: Uuid, idx: i32) -> ObjectPath {
    ObjectPath::from(format!("jobs/{job}/inputs/{idx:05}"))
}

/// Where one attempt at shard `idx` uploads its output. Named by attempt, so a late upload from
/// a node that lost the shard cannot overwrite the accepted one.
pub fn output_path(job: Uuid, idx: i32, assignment: Uuid) -> ObjectPath {
    ObjectPath::from(format!("jobs/{job}/outputs/{idx:05}-{assignment}"))
}

/// Everything a job keeps in object storage while it runs.
pub fn job_prefix(job: Uuid) -> ObjectPath {
    ObjectPath::from(format!("jobs/{job}"))
}

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// GET the shard's input.
    Input,
    /// PUT the shard's output.
    Output,
    /// GET the model a predict shard runs.
    Model,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Input => "input",
            Direction::Output => "output",
            Direction::Model => "model",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlRefused {
    #[error("the transfer URL has expired")]
    Expired,
    #[error("the transfer URL's signature is not valid")]
    BadSignature,
}

#[derive(Clone)]
pub struct TransferUrls {
    key: [u8; 32],
    base: String,
}

impl TransferUrls {
    /// URLs under `base` (the gateway's address as workers reach it, no trailing slash).
    pub fn new(gateway_key: &NodeKey, base: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"xpand-transfer-urls");
        h.update(gateway_key.signing_key().to_bytes());
        Self {
            key: h.finalize().into(),
            base: base.trim_end_matches('/').to_string(),
        }
    }

    /// The URL for `direction` of `assignment`, valid until `expires_at_ms`.
    pub fn url(&self, direction: Direction, assignment: Uuid, expires_at_ms: i64) -> String {
        let sig = hex::encode(
            self.mac(direction, assignment, expires_at_ms)
                .finalize()
                .into_bytes(),
        );
        format!(
            "{}/v1/transfers/{assignment}/{}?exp={expires_at_ms}&sig={sig}",
            self.base,
            direction.as_str()
        )
    }

    /// Checks a URL's expiry and signature.
    pub fn check(
        &self,
        direction: Direction,
        assignment: Uuid,
        expires_at_ms: i64,
        sig_hex: &str,
        now_ms: i64,
    ) -> Result<(), UrlRefused> {
        let sig = hex::decode(sig_hex).map_err(|_| UrlRefused::BadSignature)?;
        self.mac(direction, assignment, expires_at_ms)
            .verify_slice(&sig)
            .map_err(|_| UrlRefused::BadSignature)?;
        if now_ms > expires_at_ms {
            return Err(UrlRefused::Expired);
        }
        Ok(())
    }

    fn mac(&self, direction: Direction, assignment: Uuid, expires_at_ms: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key size");
        mac.update(format!("{}\n{assignment}\n{expires_at_ms}", direction.as_str()).as_bytes());
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(url: &str) -> (i64, String) {
        let q = url.split_once('?').unwrap().1;
        let mut exp = 0;
        let mut sig = String::new();
        for pair in q.split('&') {
            match pair.split_once('=').unwrap() {
                ("exp", v) => exp = v.parse().unwrap(),
                ("sig", v) => sig = v.to_string(),
                _ => {}
            }
        }
        (exp, sig)
    }

    #[test]
    fn urls_check_only_for_their_assignment_direction_and_time() {
        let key = NodeKey::generate();
        let urls = TransferUrls::new(&key, "http://gw:8080/");
        let a = Uuid::new_v4();
        let url = urls.url(Direction::Input, a, 10_000);
        assert!(url.starts_with(&format!(
            "http://gw:8080/v1/transfers/{a}/input?exp=10000&sig="
        )));
        let (exp, sig) = query(&url);
        assert_eq!(urls.check(Direction::Input, a, exp, &sig, 9_999), Ok(()));
        assert_eq!(
            urls.check(Direction::Input, a, exp, &sig, 10_001),
            Err(UrlRefused::Expired)
        );
        assert_eq!(
            urls.check(Direction::Output, a, exp, &sig, 0),
            Err(UrlRefused::BadSignature)
        );
        assert_eq!(
            urls.check(Direction::Input, Uuid::new_v4(), exp, &sig, 0),
            Err(UrlRefused::BadSignature)
        );
        assert_eq!(
            urls.check(Direction::Input, a, exp + 1, &sig, 0),
            Err(UrlRefused::BadSignature)
        );
        let other = TransferUrls::new(&NodeKey::generate(), "http://gw:8080");
        assert_eq!(
            other.check(Direction::Input, a, exp, &sig, 0),
            Err(UrlRefused::BadSignature)
        );
    }
}
