//! The slice of the gateway's public API the load test speaks: job submit and reads, the
//! account, tokens, and the event objects shared by SSE and the WebSocket.

use std::error::Error as StdError;
use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use serde::Deserialize;

use crate::stats::Outcome;

/// An authenticated HTTP client for one gateway.
pub struct Gateway {
    http: reqwest::Client,
    base: Url,
    auth: HeaderValue,
}

#[derive(Debug, Deserialize)]
pub struct Account {
    pub id: String,
    pub available: i64,
}

impl Gateway {
    pub fn new(base: Url, api_key: &str) -> anyhow::Result<Self> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {api_key}"))
            .context("the API key has characters a header cannot carry")?;
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self { http, base, auth })
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("API paths are valid")
    }

    fn get(&self, path: &str) -> RequestBuilder {
        self.http
            .get(self.url(path))
            .header(AUTHORIZATION, self.auth.clone())
    }

    /// `POST /v1/jobs` with a pre-serialised body.
    pub fn submit(&self, body: &str) -> RequestBuilder {
        self.http
            .post(self.url("/v1/jobs"))
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_owned())
    }

    pub fn job(&self, id: &str) -> RequestBuilder {
        self.get(&format!("/v1/jobs/{id}"))
    }

    pub fn job_events(&self, id: &str) -> RequestBuilder {
        self.get(&format!("/v1/jobs/{id}/events"))
    }

    /// Best-effort `POST /v1/jobs/{id}/cancel` for a job we gave up on, so it neither keeps
    /// its escrow nor queues ahead of the next run's jobs.
    pub async fn cancel(&self, id: &str) {
        let _ = self
            .http
            .post(self.url(&format!("/v1/jobs/{id}/cancel")))
            .header(AUTHORIZATION, self.auth.clone())
            .timeout(Duration::from_secs(5))
            .send()
            .await;
    }

    /// Checks the gateway is up and the key works before any load is sent.
    pub async fn account(&self) -> anyhow::Result<Account> {
        let resp = self.get("/v1/account").send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the gateway at {} ({}); is `xpand up` running?",
                self.base,
                describe(&e)
            )
        })?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            bail!("the gateway refused the API key (401); `xpand up` prints the current one");
        }
        let resp = ok_or_problem(resp)
            .await
            .map_err(|p| anyhow::anyhow!("GET /v1/account: {p}"))?;
        Ok(resp.json().await?)
    }

    /// The WebSocket URL, authenticated with a token minted from the API key.
    pub async fn ws_url(&self) -> anyhow::Result<Url> {
        #[derive(Deserialize)]
        struct Token {
            token: String,
        }
        let resp = self
            .http
            .post(self.url("/v1/auth/token"))
            .header(AUTHORIZATION, self.auth.clone())
            .send()
            .await?;
        let resp = ok_or_problem(resp)
            .await
            .map_err(|p| anyhow::anyhow!("POST /v1/auth/token: {p}"))?;
        let Token { token } = resp.json().await?;
        let mut url = self.url("/v1/ws");
        url.set_scheme("ws")
            .expect("http and ws are both special schemes");
        url.query_pairs_mut().append_pair("token", &token);
        Ok(url)
    }
}

/// An RFC 9457 problem, from a refused request's body or a WebSocket `error` frame.
#[derive(Debug, Default, Deserialize)]
pub struct Problem {
    #[serde(rename = "type", default)]
    pub type_uri: String,
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub detail: String,
}

impl Problem {
    /// `https://xpand.dev/problems/insufficient-funds` → `insufficient-funds`.
    pub fn kind(&self) -> &str {
        self.type_uri.rsplit('/').next().unwrap_or_default()
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.kind(), self.detail)
    }
}

impl From<Problem> for Outcome {
    fn from(p: Problem) -> Self {
        Outcome::Rejected {
            status: p.status,
            kind: p.kind().to_owned(),
            detail: p.detail,
        }
    }
}

/// Passes a 2xx response through; turns anything else into its [`Problem`] (whose status is
/// the HTTP status, whatever the body says).
pub async fn ok_or_problem(resp: Response) -> Result<Response, Problem> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    let problem = serde_json::from_str(&body).unwrap_or_else(|_| Problem {
        detail: body.chars().take(200).collect(),
        ..Problem::default()
    });
    Err(Problem {
        status: status.as_u16(),
        ..problem
    })
}

/// The fields of a Job the load test reads.
#[derive(Debug, Deserialize)]
pub struct Job {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub error: Option<JobError>,
}

#[derive(Debug, Deserialize)]
pub struct JobError {
    pub code: String,
}

impl Job {
    /// How the job ended, or `None` while it is queued or running.
    pub fn outcome(&self) -> Option<Outcome> {
        match self.status.as_str() {
            "succeeded" => Some(Outcome::Succeeded),
            "failed" => Some(Outcome::Failed(
                self.error
                    .as_ref()
                    .map_or_else(|| "unknown".into(), |e| e.code.clone()),
            )),
            "canceled" => Some(Outcome::Failed("canceled".into())),
            _ => None,
        }
    }
}

/// A server event, as SSE `data` or a WebSocket text frame (only the variants we act on).
#[derive(Debug, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ServerEvent {
    Accepted {
        #[serde(rename = "ref")]
        reference: Option<String>,
        job: Job,
    },
    Error {
        #[serde(rename = "ref")]
        reference: Option<String>,
        problem: Problem,
    },
    Partial {},
    Succeeded {
        job: Job,
    },
    Failed {
        job: Job,
    },
    Canceled {
        job: Job,
    },
    /// `progress`, `pong` and anything added later.
    #[serde(other)]
    Other,
}

impl ServerEvent {
    /// For `succeeded`, `failed` and `canceled`: the job and how it ended.
    pub fn end(&self) -> Option<(&str, Outcome)> {
        match self {
            ServerEvent::Succeeded { job }
            | ServerEvent::Failed { job }
            | ServerEvent::Canceled { job } => Some((&job.id, job.outcome()?)),
            _ => None,
        }
    }
}

/// An error with its causes, e.g. `error sending request: connection refused`.
pub fn describe(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_gateways_events() {
        let accepted: ServerEvent = serde_json::from_str(
            r#"{"event":"accepted","ref":"7","job":{"id":"j1","kind":"forecast","status":"queued","progress":{"shards_total":5,"shards_done":0}}}"#,
        )
        .unwrap();
        assert!(
            matches!(accepted, ServerEvent::Accepted { reference: Some(r), job } if r == "7" && job.id == "j1")
        );

        let partial: ServerEvent = serde_json::from_str(
            r#"{"event":"partial","job_id":"j1","shard":0,"offset":0,"rows":[[1.0]]}"#,
        )
        .unwrap();
        assert!(matches!(partial, ServerEvent::Partial {}));

        let progress: ServerEvent = serde_json::from_str(
            r#"{"event":"progress","job_id":"j1","status":"running","shards_done":1,"shards_total":5}"#,
        )
        .unwrap();
        assert!(matches!(progress, ServerEvent::Other));

        let failed: ServerEvent = serde_json::from_str(
            r#"{"event":"failed","job":{"id":"j1","status":"failed","error":{"code":"timed_out","message":"m"}}}"#,
        )
        .unwrap();
        let (id, outcome) = failed.end().unwrap();
        assert_eq!(id, "j1");
        assert_eq!(outcome, Outcome::Failed("timed_out".into()));

        let error: ServerEvent = serde_json::from_str(
            r#"{"event":"error","ref":"8","problem":{"type":"https://xpand.dev/problems/insufficient-funds","title":"Insufficient funds","status":402,"detail":"d"}}"#,
        )
        .unwrap();
        assert!(
            matches!(error, ServerEvent::Error { reference: Some(r), problem } if r == "8" && problem.kind() == "insufficient-funds" && problem.status == 402)
        );
    }
}
