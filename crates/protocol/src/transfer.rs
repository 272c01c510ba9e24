//! Worker requests to the gateway's transfer URLs (segment downloads, output uploads).
//!
//! The URL itself is signed by the gateway and expires, but assignments (and so the URLs in them)
//! are sealed into the public ledger. So a URL is not enough on its own: the node it was issued
//! to signs each request with its node key, over the method, the URL path and a timestamp.

use ed25519_dalek::{Signature, Signer as _, Verifier as _};

use crate::envelope::{parse_node_id, EnvelopeError, NodeKey};

/// Header carrying the requesting node's id.
pub const NODE_HEADER: &str = "x-xpand-node";
/// Header carrying the request's Unix-ms timestamp.
pub const TIMESTAMP_HEADER: &str = "x-xpand-timestamp";
/// Header carrying the hex ed25519 signature over [`request_message`].
pub const SIGNATURE_HEADER: &str = "x-xpand-signature";

/// The bytes a node signs for one request.
pub fn request_message(method: &str, path: &str, ts_ms: i64) -> Vec<u8> {
    format!("xpand-transfer\n{method}\n{path}\n{ts_ms}").into_bytes()
}

/// The three headers (node, timestamp, signature) for `method` on `path`, now.
pub fn sign_request(key: &NodeKey, method: &str, path: &str) -> [(&'static str, String); 3] {
    let ts = crate::now_ms();
    let sig = key.signing_key().sign(&request_message(method, path, ts));
    [
        (NODE_HEADER, key.id().to_string()),
        (TIMESTAMP_HEADER, ts.to_string()),
        (SIGNATURE_HEADER, hex::encode(sig.to_bytes())),
    ]
}

/// Checks that `node` signed `method` `path` at `ts_ms`.
pub fn verify_request(
    node: &str,
    method: &str,
    path: &str,
    ts_ms: i64,
    signature_hex: &str,
) -> Result<(), EnvelopeError> {
    let key = parse_node_id(node)?;
    let bytes: [u8; 64] = hex::decode(signature_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| EnvelopeError::Malformed("a signature is 64 hex bytes".into()))?;
    key.verify(
        &request_message(method, path, ts_ms),
        &Signature::from_bytes(&bytes),
    )
    .map_err(|_| EnvelopeError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_request_verifies_only_as_signed() {
        let key = NodeKey::generate();
        let [(_, node), (_, ts), (_, sig)] = sign_request(&key, "GET", "/v1/transfers/a/input");
        let ts: i64 = ts.parse().unwrap();
        verify_request(&node, "GET", "/v1/transfers/a/input", ts, &sig).unwrap();
        assert!(verify_request(&node, "PUT", "/v1/transfers/a/input", ts, &sig).is_err());
        assert!(verify_request(&node, "GET", "/v1/transfers/b/input", ts, &sig).is_err());
        assert!(verify_request(&node, "GET", "/v1/transfers/a/input", ts + 1, &sig).is_err());
        let other = NodeKey::generate();
        assert!(verify_request(other.id(), "GET", "/v1/transfers/a/input", ts, &sig).is_err());
        assert!(verify_request(&node, "GET", "/v1/transfers/a/input", ts, "zz").is_err());
    }
}
