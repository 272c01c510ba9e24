//! The wire protocol between the xpand gateway and its worker nodes.
//!
//! Both sides depend on this crate, so a message can only mean one thing. Every MQTT payload is an
//! [`Envelope`]: the signer's public key, a timestamp, a nonce, the body's exact bytes and an
//! ed25519 signature over all of them *and the topic*, so a signature lifted from one topic (say a
//! heartbeat) cannot be replayed on another (say a result). Replay and staleness are checked by
//! the receiver (it owns the nonce store); this crate checks the cryptography.

pub mod broker_address;
pub mod broker_link;
pub mod envelope;
pub mod key_file;
pub mod messages;
pub mod topics;
pub mod transfer;

pub use broker_address::{BrokerAddress, InvalidBrokerUrl};
pub use broker_link::{BrokerLink, BrokerLinkError};
pub use envelope::{
    now_ms, open_request_authorization, parse_node_id, Envelope, EnvelopeError, NodeKey,
    OpenedEnvelope, NODE_AUTH_SCHEME,
};
pub use messages::*;
pub use topics::{Topics, UpKind};

/// Protocol version; it is part of every topic and of every signed message.
pub const PROTOCOL_VERSION: &str = "v1";

/// Hex-encoded sha256 of some bytes; results commit to their output with it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}
