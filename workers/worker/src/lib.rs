//! The xpand worker node.
//!
//! A worker holds an ed25519 identity (its node key), loads ONNX models whose files match their
//! manifests, announces them over MQTT, and runs the shards the gateway assigns it: every
//! assignment must be signed by the gateway's key and addressed to this node, and every message
//! the worker sends (announce, heartbeat, progress, result, reject) is signed with the node key.
//! See `xpand_protocol` for the wire format.
//!
//! Embed a worker (integration tests do) with [`WorkerConfig::new`] and [`run`].

mod assignments;
mod catalog;
mod config;
mod models;
mod onnx;
mod plugins;
mod worker;

pub use config::{
    default_ort_dylib_path, load_node_key, lock_node_key, AcceleratorChoice, WorkerConfig,
    ONNXRUNTIME_VERSION,
};
pub use onnx::environment as onnx_environment;
pub use plugins::face_detect;
pub use worker::run;
pub use xpand_protocol::{BrokerAddress, BrokerLink};
