//! The xpand gateway. Start with `ARCHITECTURE.md` for the map.

pub mod accounts;
pub mod broker;
pub mod cli;
pub mod config;
pub mod egress;
pub mod epochs;
pub mod error;
pub mod events;
pub mod files;
pub mod http;
pub mod jobs;
pub mod kinds;
pub mod ledger;
pub mod metrics;
pub mod nodes;
pub mod presence;
pub mod registry;
pub mod retention;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
pub mod transfers;
pub mod up;
pub mod verify;
pub mod webhooks;
