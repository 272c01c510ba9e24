//! `/v1/jobs`: submit, read, list, cancel, and follow (SSE).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::{self, error::RecvError};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::extract::{JsonBody, Path, Query};
use crate::error::{AppError, AppResult, Problem};
use crate::events::Published;
use crate::http::auth::{Caller, Scope};
use crate::http::state::AppState;
use crate::jobs::{self, Job, JobEvent, JobStatus, ListFilter, SubmitJob, Submitted};

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The longest `Prefer: wait` honoured, and what a bare `wait` means.
pub(super) const MAX_WAIT: Duration = Duration::from_secs(60);

/// Submit a job.
///
/// Validates the input, quotes a price and escrows it from the caller's balance, then queues
/// the job's shards. With an `Idempotency-Key`, a retry returns the first request's job (200)
/// instead of creating another.
///
/// With `Prefer: wait` (RFC 7240; `wait=N` for at most N seconds, at most 60, the default),
/// the response waits for the job: if it ends in time, the response carries the finished job
/// and its output; otherwise the job as it is then, still running, to follow as usual. The
/// response names the wait it applied in `Preference-Applied`.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body = SubmitJob,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: same key, same job (at most 255 characters)", pattern = r"^[!-~]{1,255}$"),
        ("Prefer" = Option<String>, Header, description = "`wait` or `wait=N` (seconds, at most 60): answer when the job ends, or after N seconds with the job still running", pattern = r"^[ -~]*$"),
    ),
    responses(
        (status = 201, description = "Job created (finished already, with `Prefer: wait`, if it ended in time)", body = Job,
         headers(("Preference-Applied" = String, description = "The wait applied, as `wait=N`, when the request asked for one"))),
        (status = 200, description = "The job an earlier request with this Idempotency-Key created", body = Job),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or bad credentials", body = Problem, content_type = "application/problem+json"),
        (status = 402, description = "Insufficient funds, or max_fee below the quote (nothing was charged)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field or cell", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(req): JsonBody<SubmitJob>,
) -> AppResult<Response> {
    caller.require(Scope::JobsWrite)?;
    let key = idempotency_key(&headers)?;
    let wait = preferred_wait(&headers)?;
    // Subscribed before the submit, so a job that ends at once is not missed.
    let feed = wait.map(|_| state.events.subscribe());
    let (status, mut job) = submit_job(&state, &caller, &req, key.as_deref()).await?;
    let location = format!("/v1/jobs/{}", job.id);
    let mut response_headers = HeaderMap::new();
    response_headers.insert(header::LOCATION, header_value(&location));
    if let (Some(wait), Some(feed)) = (wait, feed) {
        if !job.status.is_terminal() {
            job = wait_for_end(&state, caller.account_id, job, feed, wait).await;
        }
        let applied = format!("wait={}", wait.as_secs());
        response_headers.insert("preference-applied", header_value(&applied));
    }
    Ok((status, response_headers, Json(job)).into_response())
}

fn header_value(text: &str) -> header::HeaderValue {
    header::HeaderValue::from_str(text).expect("ids and numbers are valid header values")
}

/// The wait a `Prefer` header asks for (RFC 7240): `wait` alone is [`MAX_WAIT`], longer waits
/// are cut to it, other preferences are ignored.
fn preferred_wait(headers: &HeaderMap) -> AppResult<Option<Duration>> {
    let bad = || {
        AppError::field(
            "Prefer",
            "wait must be a whole number of seconds, as wait=10",
        )
    };
    let mut wait = None;
    for value in headers.get_all(header::HeaderName::from_static("prefer")) {
        let value = value.to_str().map_err(|_| bad())?;
        for preference in value.split(',') {
            // Parameters after `;` modify a preference; `wait` takes none.
            let token = preference.split(';').next().unwrap_or_default().trim();
            let (name, seconds) = match token.split_once('=') {
                Some((name, seconds)) => (name.trim(), Some(seconds.trim().trim_matches('"'))),
                None => (token, None),
            };
            if !name.eq_ignore_ascii_case("wait") {
                continue;
            }
            let seconds = match seconds {
                None => MAX_WAIT.as_secs(),
                Some(s) => s.parse::<u64>().map_err(|_| bad())?,
            };
            wait = Some(Duration::from_secs(seconds).min(MAX_WAIT));
        }
    }
    Ok(wait)
}

/// The job once it ends, or as it is when `wait` runs out (or the server stops).
pub(super) async fn wait_for_end(
    state: &AppState,
    account: Uuid,
    job: Job,
    mut feed: broadcast::Receiver<Arc<Published>>,
    wait: Duration,
) -> Job {
    let id = job.id;
    let deadline = tokio::time::Instant::now() + wait;
    let read = || jobs::get(&state.db, &state.scheduler.kinds, account, id);
    loop {
        let received = tokio::select! {
            received = feed.recv() => received,
            _ = tokio::time::sleep_until(deadline) => break,
            _ = state.shutdown.wait() => break,
        };
        match received {
            // Read back rather than taken from the event, so the answer is what `GET` shows
            // (a kind may add to it, as video adds frames).
            Ok(p) if p.event.job_id() == id => {
                if let Some(ended) = p.event.finished_job() {
                    return read().await.unwrap_or_else(|_| ended.clone());
                }
            }
            // Fell behind the feed: the job may have ended unseen, so read it.
            Err(RecvError::Lagged(_)) => {
                if let Ok(job) = read().await {
                    if job.status.is_terminal() {
                        return job;
                    }
                }
            }
            Err(RecvError::Closed) => break,
            Ok(_) => {}
        }
    }
    read().await.unwrap_or(job)
}

/// Shared by REST and the WebSocket: submits and, for a new job, wakes the dispatcher.
pub async fn submit_job(
    state: &AppState,
    caller: &Caller,
    req: &SubmitJob,
    key: Option<&str>,
) -> AppResult<(StatusCode, Job)> {
    match jobs::submit(&state.scheduler, caller.account_id, req, key).await? {
        Submitted::Created(job) => {
            state
                .metrics
                .job_transitions
                .with_label_values(&[&job.kind, "queued"])
                .inc();
            state.scheduler.wake_dispatcher();
            Ok((StatusCode::CREATED, job))
        }
        Submitted::Existing(job) => Ok((StatusCode::OK, job)),
    }
}

fn idempotency_key(headers: &HeaderMap) -> AppResult<Option<String>> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 255 => Ok(Some(k.to_string())),
        _ => Err(AppError::field(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        )),
    }
}

/// Get one of your jobs.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs", operation_id = "get_job",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, body = Job),
        (status = 404, description = "No such job for this account", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> AppResult<Json<Job>> {
    caller.require(Scope::JobsRead)?;
    Ok(Json(
        jobs::get(&state.db, &state.scheduler.kinds, caller.account_id, id).await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only jobs in this status.
    status: Option<JobStatus>,
    /// Only jobs of this kind.
    kind: Option<String>,
    /// `next_cursor` from the previous page.
    cursor: Option<Uuid>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

/// List your jobs, newest first.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs", operation_id = "list_jobs",
    params(ListParams),
    responses(
        (status = 200, body = JobPage),
        (status = 422, description = "Bad filter", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<ListParams>,
) -> AppResult<Json<JobPage>> {
    caller.require(Scope::JobsRead)?;
    let limit = super::page_limit(params.limit, 20, 100)?;
    let filter = ListFilter {
        status: params.status,
        kind: params.kind,
        before: params.cursor,
        limit: limit + 1,
    };
    let mut jobs = jobs::list(&state.db, caller.account_id, &filter).await?;
    let next_cursor = super::next_cursor(&mut jobs, limit, |j| j.id);
    Ok(Json(JobPage { jobs, next_cursor }))
}

/// Cancel a job: stops its shards, pays nodes for shards already done, refunds the rest.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "Canceled", body = Job),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job already finished", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> AppResult<Json<Job>> {
    caller.require(Scope::JobsWrite)?;
    Ok(Json(
        jobs::settlement::cancel(&state.scheduler, caller.account_id, id).await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// A token from `/v1/auth/token`, for a browser's `EventSource`, which cannot set headers
    /// (never an API key: URLs are logged).
    token: Option<String>,
}

/// Follow a job as Server-Sent Events.
///
/// The first event is the job's current state (`progress`, or its terminal event); then
/// `progress`, `partial` and finally `succeeded`, `failed` or `canceled`, after which the stream
/// ends. Each SSE `data` is a JSON `JobEvent`; the SSE `event` field repeats its `event` tag.
///
/// The stream is held to its credential: when the token expires, or the API key (or the key
/// the token was minted from) is revoked, it ends within about two seconds with an
/// `event: error` whose `data` is a 401 problem document saying which. Each stream takes one of
/// the account's `XPAND_MAX_STREAMS_PER_ACCOUNT` places (shared with WebSockets); past them
/// the request is refused with a 429.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id"), EventsParams),
    responses(
        (status = 200, description = "An event stream of JobEvent", content_type = "text/event-stream", body = JobEvent),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many requests, or the account's streams are all open", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    Query(params): Query<EventsParams>,
    parts: axum::http::request::Parts,
) -> AppResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let caller =
        crate::http::auth::authenticate_header_or_query(&state, &parts, params.token.as_deref())
            .await?;
    caller.require(Scope::JobsRead)?;
    // Subscribe before reading the job, so nothing between the read and the feed is lost.
    let mut feed = state.events.subscribe();
    let job = jobs::get(&state.db, &state.scheduler.kinds, caller.account_id, id).await?;
    let slot = crate::http::streams::open(&state, &caller).await?;
    let watch = crate::http::streams::watch(state.clone(), caller.clone(), slot);
    let db = state.db.clone();
    let kinds = state.scheduler.kinds.clone();
    let shutdown = state.shutdown.clone();
    let account = caller.account_id;
    let stream = async_stream(move |tx| async move {
        let first = JobEvent::finished(job.clone()).unwrap_or(JobEvent::Progress {
            job_id: job.id,
            status: job.status,
            shards_done: job.progress.shards_done,
            shards_total: job.progress.shards_total,
        });
        let done = first.is_terminal();
        if tx.send(sse_event(&first)).await.is_err() || done {
            return;
        }
        tokio::pin!(watch);
        loop {
            let received = tokio::select! {
                received = feed.recv() => received,
                // The credential ended: say why, and end.
                ended = &mut watch => {
                    let _ = tx.send(sse_problem(&ended.error().problem())).await;
                    return;
                }
                // The client went away: stop waiting for events nobody will read.
                _ = tx.closed() => return,
                // The server is stopping: end the stream so the connection can close.
                _ = shutdown.wait() => return,
            };
            match received {
                Ok(p) if p.event.job_id() == id => {
                    if tx.send(sse_event(&p.event)).await.is_err() || p.event.is_terminal() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    // Fell behind the feed: resynchronise from the database.
                    if let Ok(job) = jobs::get(&db, &kinds, account, id).await {
                        if let Some(end) = JobEvent::finished(job) {
                            let _ = tx.send(sse_event(&end)).await;
                            return;
                        }
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn sse_event(event: &JobEvent) -> Result<Event, Infallible> {
    let data = serde_json::to_string(event).expect("events serialize");
    let name = serde_json::to_value(event)
        .ok()
        .and_then(|v| v["event"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Ok(Event::default().event(name).data(data))
}

/// The `event: error` that ends a stream refused midway.
fn sse_problem(problem: &Problem) -> Result<Event, Infallible> {
    let data = serde_json::to_string(problem).expect("problems serialize");
    Ok(Event::default().event("error").data(data))
}

/// A stream fed by a task through a bounded channel (ends when the task returns).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
