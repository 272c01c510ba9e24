//! `GET /v1/ws`: one socket, many jobs, for spreadsheet add-ins.
//!
//! Client frames are JSON objects with an `op`: `submit` (auto-subscribes), `subscribe`,
//! `unsubscribe`, `cancel`, `ping`; each may carry a client `ref` that the answer repeats.
//! Server frames: `accepted`, `subscribed`, `unsubscribed`, `cancel_accepted`, `pong`, the job
//! events (`progress`, `partial`, `succeeded`, `failed`, `canceled`), and `error` with a
//! problem object. A bad frame gets an `error`; the socket stays usable.
//!
//! A socket is held to the rules of a request: each op counts against the credential's rate
//! limit (`guard.rs`), the socket takes one of its account's stream places and is closed when
//! its credential ends (`streams.rs`).

use std::collections::HashSet;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::request::Parts;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use utoipa::ToSchema;
use uuid::Uuid;

use super::jobs::submit_job;
use crate::error::{AppError, Problem};
use crate::http::auth::{self, Caller, Scope};
use crate::http::guard;
use crate::http::state::AppState;
use crate::http::streams::{self, Ended};
use crate::jobs::{self, Job, JobEvent, SubmitJob};

/// A client → server frame.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientOp {
    Submit {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        job: SubmitJob,
        #[serde(default)]
        idempotency_key: Option<String>,
    },
    Subscribe {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        job_id: Uuid,
    },
    Unsubscribe {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        job_id: Uuid,
    },
    Cancel {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        job_id: Uuid,
    },
    Ping {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
    },
}

/// A server → client frame that answers an op (job events are sent as `JobEvent`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Reply {
    Accepted {
        #[serde(rename = "ref")]
        reference: Option<String>,
        job: Box<Job>,
    },
    Subscribed {
        #[serde(rename = "ref")]
        reference: Option<String>,
        job: Box<Job>,
    },
    Unsubscribed {
        #[serde(rename = "ref")]
        reference: Option<String>,
        job_id: Uuid,
    },
    /// The answer to `cancel`: the job as the cancel ended it, its `output` holding the rows of
    /// the shards paid for. A socket that follows the job still gets their `partial` events, then
    /// the terminal `canceled` event.
    CancelAccepted {
        #[serde(rename = "ref")]
        reference: Option<String>,
        job: Box<Job>,
    },
    Pong {
        #[serde(rename = "ref")]
        reference: Option<String>,
    },
    Error {
        #[serde(rename = "ref")]
        reference: Option<String>,
        problem: Box<Problem>,
    },
}

#[derive(Debug, Deserialize)]
pub struct WsParams {
    token: Option<String>,
}

/// Close code when the socket's token expires: reconnect with a fresh token.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4401;
/// Close code when the socket's API key (or the key its token was minted from) is revoked, or
/// its account closed: reconnecting with the same credential is refused.
pub const CLOSE_KEY_REVOKED: u16 = 4403;
/// Ops read but not yet answered; past this, ops are refused with a 429 problem, so that a
/// burst cannot queue unbounded work (or delay pongs).
const OPS_QUEUE: usize = 256;
const KEEPALIVE: Duration = Duration::from_secs(20);

/// Open a WebSocket carrying many jobs.
///
/// Authenticate with `Authorization: Bearer` or `?token=<JWT from /v1/auth/token>` (an API key
/// is refused in the URL). A socket opened with a token is closed with code 4401 when the token
/// expires; reconnect with a fresh one. A socket whose API key (or the key its token came from)
/// is revoked is closed with code 4403 within about two seconds. Each op counts against the
/// credential's rate limit (`XPAND_RATE_LIMIT`, shared with REST): an op over it is not run and
/// is answered with an `error` frame whose problem is a 429 with `retry_after`. Each socket
/// takes one of the account's `XPAND_MAX_STREAMS_PER_ACCOUNT` stream places; past them the
/// upgrade is refused with a 429. A frame larger than `XPAND_MAX_BODY_BYTES` closes the socket
/// with 1009. See `ClientOp` for the frames a client sends and `Reply` / `JobEvent` for what it
/// receives.
#[utoipa::path(
    get, path = "/v1/ws", tag = "jobs",
    params(("token" = Option<String>, Query, description = "A token from /v1/auth/token, for clients that cannot set headers (never an API key)")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many requests, or the account's streams are all open", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []), ())
)]
pub async fn upgrade(
    State(state): State<AppState>,
    super::extract::Query(params): super::extract::Query<WsParams>,
    parts: Parts,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, AppError> {
    let caller =
        auth::authenticate_header_or_query(&state, &parts, params.token.as_deref()).await?;
    let ws = ws.map_err(|e| AppError::field("Upgrade", e.body_text()))?;
    let rate_subject = auth::request_credential(&parts.headers, &parts.uri)
        .map(|c| guard::rate_subject(&state, &c))
        .unwrap_or_default();
    let slot = streams::open(&state, &caller).await?;
    let watch = streams::watch(state.clone(), caller.clone(), slot);
    let max = state.config.max_body_bytes;
    let socket = Socket {
        state,
        caller,
        rate_subject,
    };
    Ok(ws
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |ws| serve(socket, ws, watch)))
}

/// What one socket runs on.
struct Socket {
    state: AppState,
    caller: Caller,
    /// Whom its ops count against (`guard::rate_subject` of its credential).
    rate_subject: String,
}

/// Three tasks per socket, so that keepalive never waits behind work: a reader that is always
/// reading (tungstenite answers pings as it reads) and queues ops; this task, which runs ops
/// and forwards job events; and a writer that sends what both produce, plus keepalive pings.
/// `watch` (holding the socket's stream place) ends it when the credential ends.
async fn serve(socket: Socket, ws: WebSocket, watch: impl std::future::Future<Output = Ended>) {
    let Socket { state, caller, .. } = &socket;
    let (sink, stream) = ws.split();
    let (out, outgoing) = mpsc::channel::<Message>(OPS_QUEUE);
    let (ops, mut queued) = mpsc::channel::<axum::extract::ws::Utf8Bytes>(OPS_QUEUE);
    let writer = tokio::spawn(write_frames(sink, outgoing));
    let reader = tokio::spawn(read_frames(stream, ops, out.clone()));
    let mut feed = state.events.subscribe();
    let mut subscribed: HashSet<Uuid> = HashSet::new();
    tokio::pin!(watch);
    loop {
        let frames: Vec<String> = tokio::select! {
            text = queued.recv() => match text {
                Some(text) => handle_frame(&socket, &mut subscribed, text.as_bytes()).await,
                None => break,
            },
            event = feed.recv() => match event {
                Ok(p) if p.account_id == caller.account_id && subscribed.contains(&p.event.job_id()) => {
                    if p.event.is_terminal() {
                        subscribed.remove(&p.event.job_id());
                    }
                    vec![to_frame(&p.event)]
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => resync(state, caller, &mut subscribed).await,
                Err(RecvError::Closed) => break,
            },
            ended = &mut watch => {
                let _ = out.send(match ended {
                    Ended::TokenExpired => close(CLOSE_TOKEN_EXPIRED, "token expired; reconnect with a fresh token"),
                    Ended::Revoked => close(CLOSE_KEY_REVOKED, "api key revoked"),
                }).await;
                break;
            }
            _ = state.shutdown.wait() => {
                let _ = out.send(close(close_code::AWAY, "server shutting down")).await;
                break;
            }
        };
        for frame in frames {
            if out.send(Message::Text(frame.into())).await.is_err() {
                break;
            }
        }
    }
    reader.abort();
    drop(out);
    let _ = writer.await;
}

/// Answers one client frame: parsed, counted against the rate limit (an op over it is not
/// run), its credential checked, then run.
async fn handle_frame(socket: &Socket, subscribed: &mut HashSet<Uuid>, text: &[u8]) -> Vec<String> {
    let value: Value = match super::extract::parse_json(text) {
        Ok(v) => v,
        Err(e) => return vec![error_frame(None, e)],
    };
    let reference = value.get("ref").and_then(Value::as_str).map(str::to_owned);
    if let Err(limited) = guard::rate_limit(&socket.state, &socket.rate_subject).await {
        return vec![error_frame(reference, limited)];
    }
    // Between a revocation and the close, ops are refused already.
    if let Some(ended) = streams::ended(&socket.state, &socket.caller).await {
        return vec![error_frame(reference, ended.error())];
    }
    let op: ClientOp = match serde_path_to_error::deserialize(value) {
        Ok(op) => op,
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." { "op".into() } else { path };
            return vec![error_frame(
                reference,
                AppError::field(field, e.inner().to_string()),
            )];
        }
    };
    match run_op(&socket.state, &socket.caller, subscribed, op).await {
        Ok(frames) => frames,
        Err(e) => vec![error_frame(reference, e)],
    }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

async fn read_frames(
    mut stream: futures::stream::SplitStream<WebSocket>,
    ops: mpsc::Sender<axum::extract::ws::Utf8Bytes>,
    out: mpsc::Sender<Message>,
) {
    while let Some(message) = stream.next().await {
        match message {
            Ok(Message::Text(text)) => match ops.try_send(text) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(text)) => {
                    let reference = serde_json::from_slice::<Value>(text.as_bytes())
                        .ok()
                        .and_then(|v| v.get("ref").and_then(Value::as_str).map(str::to_owned));
                    let busy = AppError::RateLimited {
                        limit: OPS_QUEUE as u32,
                        retry_after: 1,
                    };
                    // Every op is answered; waiting here only happens when the client
                    // does not read, and then it would not see a pong either.
                    let _ = out
                        .send(Message::Text(error_frame(reference, busy).into()))
                        .await;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            },
            Ok(Message::Binary(_)) => {
                let refusal = AppError::field("frame", "send JSON text frames");
                let _ = out
                    .send(Message::Text(error_frame(None, refusal).into()))
                    .await;
            }
            Ok(Message::Close(_)) => return,
            Ok(_) => {}
            Err(e) => {
                // tungstenite refuses an oversized frame before reading it: say so with 1009.
                let text = e.to_string();
                if text.contains("too long") || text.contains("too big") {
                    let _ = out
                        .send(close(close_code::SIZE, "frame larger than the limit"))
                        .await;
                }
                return;
            }
        }
    }
}

async fn write_frames(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut outgoing: mpsc::Receiver<Message>,
) {
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.tick().await;
    loop {
        let message = tokio::select! {
            message = outgoing.recv() => match message {
                Some(message) => message,
                None => return,
            },
            _ = keepalive.tick() => Message::Ping(Default::default()),
        };
        let closing = matches!(message, Message::Close(_));
        if sink.send(message).await.is_err() || closing {
            return;
        }
    }
}

/// After falling behind the feed, re-read every followed job and send its state.
async fn resync(state: &AppState, caller: &Caller, subscribed: &mut HashSet<Uuid>) -> Vec<String> {
    let mut frames = Vec::new();
    for id in subscribed.clone() {
        if let Ok(job) = jobs::get(&state.db, &state.scheduler.kinds, caller.account_id, id).await {
            if let Some(end) = JobEvent::finished(job.clone()) {
                subscribed.remove(&id);
                frames.push(to_frame(&end));
            } else {
                frames.push(to_frame(&JobEvent::Progress {
                    job_id: id,
                    status: job.status,
                    shards_done: job.progress.shards_done,
                    shards_total: job.progress.shards_total,
                }));
            }
        }
    }
    frames
}

async fn run_op(
    state: &AppState,
    caller: &Caller,
    subscribed: &mut HashSet<Uuid>,
    op: ClientOp,
) -> Result<Vec<String>, AppError> {
    let reply = match op {
        ClientOp::Submit {
            reference,
            job,
            idempotency_key,
        } => {
            caller.require(Scope::JobsWrite)?;
            if idempotency_key
                .as_ref()
                .is_some_and(|k| k.is_empty() || k.len() > 255)
            {
                return Err(AppError::field(
                    "idempotency_key",
                    "must be 1 to 255 characters",
                ));
            }
            let (_, job) = submit_job(state, caller, &job, idempotency_key.as_deref()).await?;
            // Subscribed before this frame is answered: the feed buffers any event that
            // arrived meanwhile, and the loop matches it against the set after we return.
            if !job.status.is_terminal() {
                subscribed.insert(job.id);
            }
            let terminal = JobEvent::finished(job.clone());
            let mut frames = vec![to_frame(&Reply::Accepted {
                reference,
                job: Box::new(job),
            })];
            // An idempotent replay of a finished job: say how it ended.
            frames.extend(terminal.map(|e| to_frame(&e)));
            return Ok(frames);
        }
        ClientOp::Subscribe { reference, job_id } => {
            caller.require(Scope::JobsRead)?;
            let job =
                jobs::get(&state.db, &state.scheduler.kinds, caller.account_id, job_id).await?;
            let terminal = JobEvent::finished(job.clone());
            if terminal.is_none() {
                subscribed.insert(job_id);
            }
            let mut frames = vec![to_frame(&Reply::Subscribed {
                reference,
                job: Box::new(job),
            })];
            frames.extend(terminal.map(|e| to_frame(&e)));
            return Ok(frames);
        }
        ClientOp::Unsubscribe { reference, job_id } => {
            subscribed.remove(&job_id);
            Reply::Unsubscribed { reference, job_id }
        }
        ClientOp::Cancel { reference, job_id } => {
            caller.require(Scope::JobsWrite)?;
            let job = jobs::settlement::cancel(&state.scheduler, caller.account_id, job_id).await?;
            // A follower keeps following: the partials of shards done before the cancel are
            // still on their way through the feed, and its `canceled` event comes after them.
            Reply::CancelAccepted {
                reference,
                job: Box::new(job),
            }
        }
        ClientOp::Ping { reference } => Reply::Pong { reference },
    };
    Ok(vec![to_frame(&reply)])
}

fn to_frame<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("frames serialize")
}

fn error_frame(reference: Option<String>, error: AppError) -> String {
    let error = error.settled();
    if let AppError::Internal(e) = &error {
        tracing::error!(error = ?e, "websocket op failed");
    }
    to_frame(&Reply::Error {
        reference,
        problem: Box::new(error.problem()),
    })
}
