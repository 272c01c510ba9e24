//! The OpenAPI document, generated from the handlers' annotations. `openapi/openapi.json` is
//! this document, committed; a test fails when the two differ (`xpand openapi > openapi/openapi.json`).

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::{account, files, jobs, keys, ledger, nodes, ops, transfers, webhooks, ws};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "xpand",
        description = "Gateway of a decentralized AI compute network: submit jobs (spreadsheet forecasts, video face anonymization), escrowed in micro-credits, run by worker nodes. Errors are RFC 9457 problem documents.",
        version = env!("CARGO_PKG_VERSION"),
        license(name = "Apache-2.0")
    ),
    paths(
        jobs::submit, jobs::get, jobs::list, jobs::cancel, jobs::events, ws::upgrade,
        files::upload, files::download, files::delete, transfers::input, transfers::output,
        account::token, account::account, account::ledger_entries,
        keys::list, keys::create, keys::revoke,
        webhooks::register, webhooks::list, webhooks::delete, webhooks::deliveries,
        nodes::list, nodes::get,
        ledger::public_key, ledger::list_blocks, ledger::get_block, ledger::block_leaves,
        ledger::block_entries, ledger::block_records, ledger::audit, ledger::node_records,
        ledger::entry_proof, ledger::settlement_proof, ledger::epoch,
        ops::healthz, ops::readyz, ops::metrics, ops::openapi,
    ),
    components(schemas(ws::ClientOp, ws::Reply, crate::jobs::JobEvent)),
    modifiers(&BearerAuth),
    tags(
        (name = "jobs", description = "Submit and follow jobs (REST, SSE, WebSocket)"),
        (name = "files", description = "Uploads (inputs such as videos) and downloads"),
        (name = "auth", description = "Short-lived tokens for browsers and add-ins"),
        (name = "account", description = "Balances, ledger entries and API keys"),
        (name = "nodes", description = "Worker nodes of the network"),
        (name = "ledger", description = "The sealed, signed, hash-chained ledger and inclusion proofs"),
        (name = "ops", description = "Health, readiness, metrics, this document"),
        (name = "workers", description = "Shard transfers for worker nodes (node-signed requests to URLs from assignments)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "node_signature",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Header(
                utoipa::openapi::security::ApiKeyValue::with_description(
                    "Authorization",
                    "XpandNode <base64 envelope signed by the node over the method, path and query>",
                ),
            )),
        );
    }
}

/// The document as committed: pretty JSON with a trailing newline.
pub fn render() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    s.push('\n');
    s
}
