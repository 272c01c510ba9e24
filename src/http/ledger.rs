//! `/v1/ledger`: the sealed, signed ledger. Anyone can check that history was not rewritten
//! (signed, hash-linked headers and their leaf commitments); an account proves its own entries
//! against them; the auditor reads everything. See `crate::ledger::blocks` for who sees what.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::extract::{Path, Query};
use crate::epochs::{self, Epoch};
use crate::error::{AppError, AppResult, Problem};
use crate::http::auth::{Auditor, Caller, LedgerReader, NodeCaller, Scope};
use crate::http::state::AppState;
use crate::jobs;
use crate::ledger::blocks::{self, AuditSnapshot};
use xpand_chain::{Block, BlockLeaves, InclusionProof, RecordProof, SealedEntry, SealedRecord};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PublicKey {
    /// Hex of the gateway's ed25519 public key: it signs blocks, assignments, tokens, webhooks.
    pub public_key: String,
    pub algorithm: String,
}

/// The key that signs ledger blocks.
#[utoipa::path(get, path = "/v1/ledger/public-key", tag = "ledger", responses((status = 200, body = PublicKey)))]
pub async fn public_key(State(state): State<AppState>) -> Json<PublicKey> {
    Json(PublicKey {
        public_key: state.config.gateway_key.id().to_string(),
        algorithm: "ed25519".into(),
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct BlockParams {
    /// Only blocks above this height (default 0: from the first).
    after: Option<i64>,
    /// Page size, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BlockPage {
    /// Ascending by height.
    pub blocks: Vec<Block>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// Sealed blocks, oldest first.
#[utoipa::path(
    get, path = "/v1/ledger/blocks", tag = "ledger", params(BlockParams),
    responses((status = 200, body = BlockPage), (status = 422, body = Problem, content_type = "application/problem+json"))
)]
pub async fn list_blocks(
    State(state): State<AppState>,
    Query(params): Query<BlockParams>,
) -> AppResult<Json<BlockPage>> {
    let limit = super::page_limit(params.limit, 100, 1000)?;
    let mut blocks = blocks::list(&state.db, params.after.unwrap_or(0), limit + 1).await?;
    let next_after = super::next_cursor(&mut blocks, limit, |b| b.height);
    Ok(Json(BlockPage { blocks, next_after }))
}

/// One block: its range, Merkle root, link to the previous block and signature.
#[utoipa::path(
    get, path = "/v1/ledger/blocks/{height}", tag = "ledger",
    params(("height" = i64, Path, description = "Block height, from 1")),
    responses((status = 200, body = Block), (status = 404, body = Problem, content_type = "application/problem+json"))
)]
pub async fn get_block(
    State(state): State<AppState>,
    Path(height): Path<i64>,
) -> AppResult<Json<Block>> {
    blocks::get(&state.db, height)
        .await?
        .map(Json)
        .ok_or(AppError::NotFound("block"))
}

/// A block's leaf hashes, in id order: recompute its two roots from them. Salted, they reveal
/// nothing of the entries and records they commit to.
#[utoipa::path(
    get, path = "/v1/ledger/blocks/{height}/leaves", tag = "ledger",
    params(("height" = i64, Path, description = "Block height, from 1")),
    responses((status = 200, body = BlockLeaves), (status = 404, body = Problem, content_type = "application/problem+json"))
)]
pub async fn block_leaves(
    State(state): State<AppState>,
    Path(height): Path<i64>,
) -> AppResult<Json<BlockLeaves>> {
    let block = sealed_block(&state, height).await?;
    Ok(Json(blocks::leaves(&state.db, &block).await?))
}

async fn sealed_block(state: &AppState, height: i64) -> AppResult<Block> {
    blocks::get(&state.db, height)
        .await?
        .ok_or(AppError::NotFound("block"))
}

/// Auditor only: the entries a block covers, in id order, with their salts.
#[utoipa::path(
    get, path = "/v1/ledger/blocks/{height}/entries", tag = "ledger",
    params(("height" = i64, Path, description = "Block height, from 1")),
    responses(
        (status = 200, body = Vec<SealedEntry>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not the auditor key", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn block_entries(
    State(state): State<AppState>,
    _: Auditor,
    Path(height): Path<i64>,
) -> AppResult<Json<Vec<SealedEntry>>> {
    let block = sealed_block(&state, height).await?;
    Ok(Json(blocks::entries(&state.db, &block).await?))
}

/// Auditor only: the capability statements, assignments and challenges a block covers, in id
/// order: digests of their envelopes, with salts.
#[utoipa::path(
    get, path = "/v1/ledger/blocks/{height}/records", tag = "ledger",
    params(("height" = i64, Path, description = "Block height, from 1")),
    responses(
        (status = 200, body = Vec<SealedRecord>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not the auditor key", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn block_records(
    State(state): State<AppState>,
    _: Auditor,
    Path(height): Path<i64>,
) -> AppResult<Json<Vec<SealedRecord>>> {
    let block = sealed_block(&state, height).await?;
    Ok(Json(blocks::records(&state.db, &block).await?))
}

/// Auditor only: every ledger account's balance and the sum of its unsealed entries, at one
/// instant: with the sealed entries, every balance can be recomputed.
#[utoipa::path(
    get, path = "/v1/ledger/audit", tag = "ledger",
    responses(
        (status = 200, body = AuditSnapshot),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not the auditor key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn audit(State(state): State<AppState>, _: Auditor) -> AppResult<Json<AuditSnapshot>> {
    Ok(Json(blocks::audit(&state.db).await?))
}

/// An inclusion proof for one of your ledger entries (any entry, for the auditor): the entry
/// with its salt, the path to its block's root, and the signed block.
#[utoipa::path(
    get, path = "/v1/ledger/entries/{id}/proof", tag = "ledger",
    params(("id" = i64, Path, description = "Ledger entry id")),
    responses(
        (status = 200, body = InclusionProof),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such entry of yours, or not sealed yet (blocks are sealed every few seconds)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn entry_proof(
    State(state): State<AppState>,
    reader: LedgerReader,
    Path(id): Path<i64>,
) -> AppResult<Json<InclusionProof>> {
    blocks::prove(&state.db, id)
        .await?
        // Another account's entry is "not found": its existence is not the caller's business.
        .filter(|proof| reader.may_read(proof.entry.owner))
        .map(Json)
        .ok_or(AppError::NotFound("sealed entry"))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RecordParams {
    /// Only records with a higher id (default 0: from the first).
    after: Option<i64>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecordPage {
    /// The node's sealed records, ascending by id, each with its inclusion proof.
    pub records: Vec<RecordProof>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

/// A node's own sealed records (its capability statements, the assignments and challenges it
/// was sent), with inclusion proofs. The node signs the request with its key
/// (`Authorization: XpandNode <envelope>`); match each digest against the envelope received.
#[utoipa::path(
    get, path = "/v1/nodes/{id}/records", tag = "ledger",
    params(("id" = String, Path, description = "Node id (hex public key)"), RecordParams),
    responses(
        (status = 200, body = RecordPage),
        (status = 401, description = "Not signed by a node", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Signed by another node", body = Problem, content_type = "application/problem+json"),
    ),
    security(("node_signature" = []))
)]
pub async fn node_records(
    State(state): State<AppState>,
    node: NodeCaller,
    Path(id): Path<String>,
    Query(params): Query<RecordParams>,
) -> AppResult<Json<RecordPage>> {
    if node.node_id != id {
        return Err(AppError::Forbidden(
            "the request is signed by another node than the path names".into(),
        ));
    }
    let limit = super::page_limit(params.limit, 50, 200)?;
    let ids =
        blocks::sealed_record_ids(&state.db, &id, params.after.unwrap_or(0), limit + 1).await?;
    let mut records = Vec::with_capacity(ids.len());
    for record in ids {
        records.extend(blocks::prove_record(&state.db, record).await?);
    }
    let next_after = super::next_cursor(&mut records, limit, |r| r.record.id);
    Ok(Json(RecordPage {
        records,
        next_after,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SettlementProof {
    pub job_id: Uuid,
    /// One proof per entry of the job's escrow release (payouts, fee, refund).
    pub proofs: Vec<InclusionProof>,
}

/// Inclusion proofs for how one of your jobs was settled.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/settlement-proof", tag = "ledger",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, body = SettlementProof),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not settled, or not sealed yet", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn settlement_proof(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> AppResult<Json<SettlementProof>> {
    caller.require(Scope::JobsRead)?;
    let job = jobs::get(&state.db, &state.scheduler.kinds, caller.account_id, id).await?;
    let ids = blocks::settlement_entry_ids(&state.db, job.id).await?;
    if ids.is_empty() {
        return Err(AppError::Conflict("the job is not settled yet".into()));
    }
    let mut proofs = Vec::with_capacity(ids.len());
    for entry in ids {
        proofs.push(blocks::prove(&state.db, entry).await?.ok_or_else(|| {
            AppError::Conflict(
                "the settlement is not sealed yet; retry after the next block".into(),
            )
        })?);
    }
    Ok(Json(SettlementProof { job_id: id, proofs }))
}

/// A closed epoch: its reward pool and every node's power score and reward.
#[utoipa::path(
    get, path = "/v1/epochs/{n}", tag = "ledger",
    params(("n" = i64, Path, description = "Epoch number, from 0")),
    responses((status = 200, body = Epoch), (status = 404, description = "Not closed yet", body = Problem, content_type = "application/problem+json"))
)]
pub async fn epoch(State(state): State<AppState>, Path(n): Path<i64>) -> AppResult<Json<Epoch>> {
    Ok(Json(epochs::get(&state.db, n).await?))
}
