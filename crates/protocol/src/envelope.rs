//! Signed envelopes: the only thing that travels over MQTT.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::RngCore;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The JSON form of a signed message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope format version.
    pub v: u8,
    /// Hex of the signer's 32-byte ed25519 public key: its node id.
    pub signer: String,
    /// Unix time in milliseconds at signing.
    pub ts: i64,
    /// 16 random bytes, hex; with `signer` it names the message for replay detection.
    pub nonce: String,
    /// Base64 of the body's exact bytes (JSON of one message type).
    pub body: String,
    /// Base64 of the ed25519 signature over [`signing_input`].
    pub sig: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("unsupported envelope version {0}")]
    Version(u8),
    #[error("signature does not verify")]
    BadSignature,
    #[error("message is stale or from the future (skew {skew_ms} ms)")]
    Stale { skew_ms: i64 },
    #[error("malformed body: {0}")]
    Body(String),
}

/// What the signature covers. The topic is included so a message cannot be moved to another
/// topic (another node's, or another message kind's) and still verify.
fn signing_input(topic: &str, signer: &str, ts: i64, nonce: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + topic.len() + signer.len() + body.len());
    for part in [
        b"xpand-envelope-v1".as_slice(),
        topic.as_bytes(),
        signer.as_bytes(),
    ] {
        m.extend_from_slice(part);
        m.push(0);
    }
    m.extend_from_slice(ts.to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(nonce.as_bytes());
    m.push(0);
    m.extend_from_slice(body);
    m
}

/// An ed25519 identity: a worker's node deed, or the gateway's signing key.
#[derive(Clone)]
pub struct NodeKey {
    signing: SigningKey,
    id: String,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey").field("id", &self.id).finish()
    }
}

impl NodeKey {
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        Self::from_seed(seed)
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(&seed);
        let id = hex::encode(signing.verifying_key().as_bytes());
        Self { signing, id }
    }

    /// Parses a 64-hex-digit seed (the format key files use).
    pub fn from_seed_hex(s: &str) -> Result<Self, EnvelopeError> {
        let bytes = hex::decode(s.trim()).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| EnvelopeError::Malformed("a key seed is 32 bytes".into()))?;
        Ok(Self::from_seed(seed))
    }

    /// Reads a key file: the 64-hex-digit seed, surrounding whitespace ignored.
    pub fn read_file(path: &std::path::Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Self::from_seed_hex(&text).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} does not hold a 64-hex-digit ed25519 seed",
                    path.display()
                ),
            )
        })
    }

    /// Writes a fresh key to a new file (never overwriting one, never seen half written),
    /// readable by its owner only, creating missing parent directories.
    pub fn create_file(path: &std::path::Path) -> std::io::Result<Self> {
        let key = Self::generate();
        let contents = format!("{}\n", key.seed_hex());
        if crate::key_file::create_once(path, contents.as_bytes())? {
            Ok(key)
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ))
        }
    }

    pub fn seed_hex(&self) -> String {
        hex::encode(self.signing.to_bytes())
    }

    /// The node id: hex of the public key.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// Signs `body` for `topic` now, returning the envelope's JSON bytes (the MQTT payload).
    pub fn seal<T: Serialize>(&self, topic: &str, body: &T) -> Vec<u8> {
        let body = serde_json::to_vec(body).expect("protocol messages always serialize");
        self.seal_bytes(topic, &body, now_ms())
    }

    /// Signs exact body bytes with an explicit timestamp (tests use it to forge stale messages).
    pub fn seal_bytes(&self, topic: &str, body: &[u8], ts: i64) -> Vec<u8> {
        let mut nonce = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let nonce = hex::encode(nonce);
        let sig = self
            .signing
            .sign(&signing_input(topic, &self.id, ts, &nonce, body));
        let env = Envelope {
            v: 1,
            signer: self.id.clone(),
            ts,
            nonce,
            body: B64.encode(body),
            sig: B64.encode(sig.to_bytes()),
        };
        serde_json::to_vec(&env).expect("envelope serializes")
    }
}

/// The scheme of a node's signed HTTP request: `Authorization: XpandNode <base64 envelope>`.
pub const NODE_AUTH_SCHEME: &str = "XpandNode";

/// What a node's HTTP request signature covers in place of a topic: the method and the path
/// with its query, so a signature lifted from one request does not authorise another.
fn request_topic(method: &str, path_and_query: &str) -> String {
    format!("http {method} {path_and_query}")
}

impl NodeKey {
    /// An `Authorization` header value that proves this node sends `method path_and_query` now
    /// (a node operator reading its own sealed records, for instance).
    pub fn request_authorization(&self, method: &str, path_and_query: &str) -> String {
        let envelope = self.seal_bytes(&request_topic(method, path_and_query), b"", now_ms());
        format!("{NODE_AUTH_SCHEME} {}", B64.encode(envelope))
    }
}

/// Checks a node's `Authorization` header for `method path_and_query`: returns the signer.
pub fn open_request_authorization(
    header: &str,
    method: &str,
    path_and_query: &str,
    max_skew_ms: i64,
) -> Result<OpenedEnvelope, EnvelopeError> {
    let encoded = header
        .strip_prefix(NODE_AUTH_SCHEME)
        .map(str::trim)
        .ok_or_else(|| EnvelopeError::Malformed(format!("not {NODE_AUTH_SCHEME}")))?;
    let envelope = B64
        .decode(encoded)
        .map_err(|_| EnvelopeError::Malformed("the envelope is not base64".into()))?;
    Envelope::open(
        &envelope,
        &request_topic(method, path_and_query),
        now_ms(),
        max_skew_ms,
    )
}

/// Parses a hex node id into its public key.
pub fn parse_node_id(id: &str) -> Result<VerifyingKey, EnvelopeError> {
    let bytes =
        hex::decode(id).map_err(|_| EnvelopeError::Malformed("node id is not hex".into()))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| EnvelopeError::Malformed("node id is not 32 bytes".into()))?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| EnvelopeError::Malformed("node id is not an ed25519 key".into()))
}

/// An envelope whose signature verified. Whether the signer may speak (known, not banned) and
/// whether the nonce is fresh is the receiver's business.
#[derive(Debug, Clone)]
pub struct OpenedEnvelope {
    pub signer: String,
    pub ts: i64,
    pub nonce: String,
    pub body: Vec<u8>,
}

impl OpenedEnvelope {
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, EnvelopeError> {
        serde_json::from_slice(&self.body).map_err(|e| EnvelopeError::Body(e.to_string()))
    }
}

impl Envelope {
    /// Parses and verifies a payload received on `topic`. `max_skew_ms` bounds how old (or how
    /// far in the future) `ts` may be relative to `now_ms`.
    pub fn open(
        payload: &[u8],
        topic: &str,
        now_ms: i64,
        max_skew_ms: i64,
    ) -> Result<OpenedEnvelope, EnvelopeError> {
        let env: Envelope =
            serde_json::from_slice(payload).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if env.v != 1 {
            return Err(EnvelopeError::Version(env.v));
        }
        let key = parse_node_id(&env.signer)?;
        let body = B64
            .decode(&env.body)
            .map_err(|_| EnvelopeError::Malformed("body is not base64".into()))?;
        let sig = B64
            .decode(&env.sig)
            .map_err(|_| EnvelopeError::Malformed("sig is not base64".into()))?;
        let sig = Signature::from_slice(&sig).map_err(|_| EnvelopeError::BadSignature)?;
        key.verify(
            &signing_input(topic, &env.signer, env.ts, &env.nonce, &body),
            &sig,
        )
        .map_err(|_| EnvelopeError::BadSignature)?;
        // Saturating: `ts` is the sender's to choose, including i64::MIN.
        let skew_ms = now_ms.saturating_sub(env.ts);
        if skew_ms.saturating_abs() > max_skew_ms {
            return Err(EnvelopeError::Stale { skew_ms });
        }
        if env.nonce.len() != 32 || !env.nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(EnvelopeError::Malformed(
                "nonce must be 16 bytes of hex".into(),
            ));
        }
        Ok(OpenedEnvelope {
            signer: env.signer,
            ts: env.ts,
            nonce: env.nonce,
            body,
        })
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_message_opens_and_tampering_fails() {
        let key = NodeKey::generate();
        let payload = key.seal("p/v1/up/x/result", &serde_json::json!({"a": 1}));
        let opened = Envelope::open(&payload, "p/v1/up/x/result", now_ms(), 30_000).unwrap();
        assert_eq!(opened.signer, key.id());
        assert_eq!(opened.body, br#"{"a":1}"#);

        // Same bytes on another topic: the signature covers the topic.
        assert_eq!(
            Envelope::open(&payload, "p/v1/up/x/heartbeat", now_ms(), 30_000).unwrap_err(),
            EnvelopeError::BadSignature
        );

        // Body swapped under the signature.
        let mut env: Envelope = serde_json::from_slice(&payload).unwrap();
        env.body = B64.encode(br#"{"a":2}"#);
        let forged = serde_json::to_vec(&env).unwrap();
        assert_eq!(
            Envelope::open(&forged, "p/v1/up/x/result", now_ms(), 30_000).unwrap_err(),
            EnvelopeError::BadSignature
        );

        // Signer swapped: another key's id with the first key's signature.
        let other = NodeKey::generate();
        env = serde_json::from_slice(&payload).unwrap();
        env.signer = other.id().to_string();
        let forged = serde_json::to_vec(&env).unwrap();
        assert_eq!(
            Envelope::open(&forged, "p/v1/up/x/result", now_ms(), 30_000).unwrap_err(),
            EnvelopeError::BadSignature
        );
    }

    #[test]
    fn stale_messages_are_refused() {
        let key = NodeKey::generate();
        let old = key.seal_bytes("t", b"{}", now_ms() - 120_000);
        assert!(matches!(
            Envelope::open(&old, "t", now_ms(), 30_000),
            Err(EnvelopeError::Stale { .. })
        ));
    }

    #[test]
    fn key_files_are_created_once_and_read_back() {
        let dir = std::env::temp_dir().join(format!("xpand-key-{}", uuid::Uuid::new_v4()));
        let path = dir.join("nested/node.key");
        let created = NodeKey::create_file(&path).unwrap();
        assert_eq!(NodeKey::read_file(&path).unwrap().id(), created.id());
        assert!(
            NodeKey::create_file(&path).is_err(),
            "never overwrites a key"
        );
        std::fs::write(&path, "not a key").unwrap();
        assert!(NodeKey::read_file(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn extreme_timestamps_are_stale_not_a_panic() {
        let key = NodeKey::generate();
        for ts in [i64::MIN, i64::MAX] {
            let msg = key.seal_bytes("t", b"{}", ts);
            assert!(matches!(
                Envelope::open(&msg, "t", now_ms(), 30_000),
                Err(EnvelopeError::Stale { .. })
            ));
            // With no freshness bound (retained announces) it opens.
            assert!(Envelope::open(&msg, "t", now_ms(), i64::MAX).is_ok());
        }
    }

    #[test]
    fn seeds_round_trip() {
        let key = NodeKey::generate();
        let again = NodeKey::from_seed_hex(&key.seed_hex()).unwrap();
        assert_eq!(key.id(), again.id());
        assert!(NodeKey::from_seed_hex("zz").is_err());
    }

    /// An envelope made outside this crate (Python's `cryptography`, from the layout of
    /// [`signing_input`]) with a fixed key, time and nonce, frozen here: it must open, this
    /// crate must sign the same bytes the same way, and its JSON must keep its digest (sealed
    /// records commit to it). A change of the signed layout or the JSON fails here.
    #[test]
    fn a_known_envelope_opens_and_its_encoding_is_frozen() {
        const ID: &str = "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c";
        const SIG: &str = "38WbqSlUifuCpKuz7In8wx5zAJWVm5P20cFT6FZ1irTcU308LNviV7UCcfA8be1/1t4KMe1Kq3zKM0vJp4cvAw==";
        let json = format!(
            r#"{{"v":1,"signer":"{ID}","ts":1767225600000,"nonce":"00112233445566778899aabbccddeeff","body":"eyJhIjoxfQ==","sig":"{SIG}"}}"#
        );
        let topic = format!("xpand/v1/up/{ID}/result");
        let (ts, nonce) = (1_767_225_600_000, "00112233445566778899aabbccddeeff");

        let key = NodeKey::from_seed([7; 32]);
        assert_eq!(key.id(), ID);
        let sig = key
            .signing_key()
            .sign(&signing_input(&topic, ID, ts, nonce, br#"{"a":1}"#));
        assert_eq!(B64.encode(sig.to_bytes()), SIG);

        let opened = Envelope::open(json.as_bytes(), &topic, ts, 30_000).unwrap();
        assert_eq!((opened.signer.as_str(), opened.nonce.as_str()), (ID, nonce));
        assert_eq!(opened.body, br#"{"a":1}"#);
        let envelope: Envelope = serde_json::from_str(&json).unwrap();
        let again = serde_json::to_vec(&envelope).unwrap();
        assert_eq!(String::from_utf8(again).unwrap(), json);
        assert_eq!(
            crate::sha256_hex(json.as_bytes()),
            "cb693a61138ca0bfae299e3f1edb2ca5635378f30726a84020f7adae1b336c90"
        );
    }
}
