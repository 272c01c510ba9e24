//! `/v1/nodes`: the network's worker nodes, their capabilities and earnings.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::Path;
use crate::epochs::{self, NodeScore};
use crate::error::{AppResult, Problem};
use crate::http::auth::Caller;
use crate::http::state::AppState;
use crate::nodes::{self, Node};

/// List the registered nodes.
#[utoipa::path(
    get, path = "/v1/nodes", tag = "nodes", operation_id = "list_nodes",
    responses((status = 200, body = Vec<Node>), (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<AppState>, _caller: Caller) -> AppResult<Json<Vec<Node>>> {
    Ok(Json(nodes::list(&state.db, &state.presence).await?))
}

/// A node with its power scores and rewards in the latest closed epochs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub node: Node,
    /// Newest first, at most 24.
    pub recent_epochs: Vec<NodeScore>,
}

/// One node: capabilities, liveness, shards done and failed, earnings, recent power scores.
#[utoipa::path(
    get, path = "/v1/nodes/{id}", tag = "nodes", operation_id = "get_node",
    params(("id" = String, Path, description = "Node id: hex of its ed25519 public key")),
    responses((status = 200, body = NodeDetail), (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<NodeDetail>> {
    let node = nodes::get(&state.db, &state.presence, &id).await?;
    let recent_epochs = epochs::node_scores(&state.db, &id, 24).await?;
    Ok(Json(NodeDetail {
        node,
        recent_epochs,
    }))
}
