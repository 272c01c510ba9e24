//! Standard Webhooks signatures: what a receiver checks with any of the specification's
//! libraries. The signed content is `{id}.{timestamp}.{body}`.
//! An endpoint's own `whsec_` secret signs with HMAC-SHA256 (`v1,<base64>`); a URL registered
//! nowhere is signed with the gateway's ed25519 key (`v1a,<base64>`), which anyone can check
//! with the key `GET /v1/ledger/public-key` (or `xpand gateway-key`) gives.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ed25519_dalek::Signer as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use xpand_protocol::NodeKey;

/// The prefix of an endpoint secret.
const SECRET_PREFIX: &str = "whsec_";

/// A new endpoint secret: `whsec_` and 24 random bytes in base64.
pub fn new_secret() -> String {
    let mut key = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", B64.encode(key))
}

/// The `webhook-signature` header of one message.
pub fn sign(
    endpoint_secret: Option<&str>,
    gateway: &NodeKey,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    match endpoint_secret {
        Some(secret) => {
            let key = B64
                .decode(secret.trim_start_matches(SECRET_PREFIX))
                .expect("endpoint secrets are the gateway's own base64");
            let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key");
            mac.update(&content);
            format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
        }
        None => format!(
            "v1a,{}",
            B64.encode(gateway.signing_key().sign(&content).to_bytes())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier};

    /// The specification's own test vector (as its reference libraries test it).
    #[test]
    fn hmac_signatures_match_the_specification_vector() {
        let gateway = NodeKey::generate();
        let signature = sign(
            Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            &gateway,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn gateway_signatures_check_with_the_public_key_only() {
        let gateway = NodeKey::generate();
        let signature = sign(None, &gateway, "msg_1", 1700000000, b"{}");
        let raw = B64.decode(signature.strip_prefix("v1a,").unwrap()).unwrap();
        let signature = Signature::from_slice(&raw).unwrap();
        let public = gateway.signing_key().verifying_key();
        assert!(public.verify(b"msg_1.1700000000.{}", &signature).is_ok());
        assert!(public.verify(b"msg_1.1700000001.{}", &signature).is_err());
        assert!(new_secret().starts_with("whsec_") && new_secret() != new_secret());
    }
}
