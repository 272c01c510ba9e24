//! Integration tests against the real Postgres, Redis and Mosquitto, with real workers running
//! the real ONNX model. One binary (faster to link); each test has its own database and prefixes.

mod admin;
mod architecture;
mod broker_tls;
mod calc;
mod chaos;
mod cli;
mod common;
mod cors;
mod epochs;
mod excel;
mod files;
mod forecast_oracle;
mod fuzz_api;
mod fuzz_inputs;
mod generated_clients;
mod jobs;
mod js_client;
mod keys;
mod ledger_chain;
mod ledger_properties;
mod models;
mod network;
mod ops;
mod predict;
mod protocol;
mod python_sdk;
mod registration;
mod scheduler;
mod security;
mod simulation;
mod sync_wait;
mod up;
mod video;
mod webhooks;
mod websocket;
