//! Typed configuration, from flags or the environment, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use xpand_protocol::{BrokerAddress, BrokerLink, NodeKey};

/// The development database `xpand up` creates when missing.
/// Fewest rows in a forecast shard by default: about 15 ms of one CPU thread (a row costs the
/// model about 15 µs), ten times a shard's fixed cost (dispatch, signatures, result, commit).
pub const DEFAULT_FORECAST_ROWS_PER_SHARD: usize = 1024;
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/xpand";

/// Where the gateway's backing services live and how it behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Address the HTTP server listens on.
    #[arg(long, env = "XPAND_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL
    )]
    pub database_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// MQTT broker, `mqtts://host:port` (TLS) or `mqtt://host:port`.
    #[arg(long, env = "MQTT_URL", default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt_url: String,
    /// PEM file of the CAs that sign an mqtts:// broker's certificate [default: the public
    /// web roots built in].
    #[arg(long, env = "XPAND_MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,
    /// Broker hosts that may be reached over plaintext mqtt:// although they are not this
    /// machine (comma-separated), for a broker on a private network.
    #[arg(long, env = "XPAND_MQTT_PLAINTEXT_HOSTS", value_delimiter = ',')]
    pub mqtt_plaintext_hosts: Vec<String>,
    /// Prefix of every MQTT topic (the tree is `{prefix}/v1/...`).
    #[arg(long, env = "XPAND_TOPIC_PREFIX", default_value = "xpand")]
    pub topic_prefix: String,
    /// Prefix of every Redis key and channel.
    #[arg(long, env = "XPAND_REDIS_PREFIX", default_value = "xpand")]
    pub redis_prefix: String,
    /// File holding the gateway's ed25519 seed (hex); it signs assignments and JWTs.
    /// Created with a fresh key when missing.
    #[arg(
        long,
        env = "XPAND_GATEWAY_KEY_FILE",
        default_value = ".xpand/gateway.key"
    )]
    pub gateway_key_file: PathBuf,
    /// File holding the auditor key: a bearer secret that may read every sealed entry and
    /// record and every balance (`xpand verify --auditor-key-file`). Created when missing.
    #[arg(
        long,
        env = "XPAND_AUDITOR_KEY_FILE",
        default_value = ".xpand/auditor.key"
    )]
    pub auditor_key_file: PathBuf,
    /// Seconds a worker holds a shard without progress before it is given to another.
    #[arg(long, env = "XPAND_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,
    /// Seconds a node counts as alive after its last heartbeat.
    #[arg(long, env = "XPAND_NODE_TTL_SECS", default_value_t = 10)]
    pub node_ttl_secs: u64,
    /// Seconds a job may stay unfinished before it fails with a full refund.
    #[arg(long, env = "XPAND_JOB_TIMEOUT_SECS", default_value_t = 900)]
    pub job_timeout_secs: u64,
    /// Times a shard is dispatched before its job fails.
    #[arg(long, env = "XPAND_MAX_SHARD_ATTEMPTS", default_value_t = 5)]
    pub max_shard_attempts: u32,
    /// Largest accepted JSON request body.
    #[arg(long, env = "XPAND_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Longest lifetime of tokens from `POST /v1/auth/token` (60 to 3600 seconds); a token
    /// claiming a longer one is refused.
    #[arg(long, env = "XPAND_TOKEN_TTL_SECS", default_value_t = 900)]
    pub token_ttl_secs: u64,
    /// Seconds between ledger sealing rounds (each seals every unsealed entry into blocks).
    #[arg(long, env = "XPAND_SEAL_INTERVAL_SECS", default_value_t = 10)]
    pub seal_interval_secs: u64,
    /// Epoch length in seconds (power scores and rewards are per epoch).
    #[arg(long, env = "XPAND_EPOCH_SECS", default_value_t = 3600)]
    pub epoch_secs: u64,
    /// Micro-credits newly issued into each epoch's reward pool (when a node earned a share).
    #[arg(long, env = "XPAND_EPOCH_ISSUANCE", default_value_t = 1_000_000)]
    pub epoch_issuance: i64,
    /// Share of the gateway fees earned in an epoch added to its pool, in basis points.
    #[arg(long, env = "XPAND_REWARD_FEE_SHARE_BPS", default_value_t = 5_000)]
    pub reward_fee_share_bps: i64,
    /// Directory that holds uploaded files and job outputs.
    #[arg(long, env = "XPAND_FILES_DIR", default_value = ".xpand/files")]
    pub files_dir: PathBuf,
    /// Object storage URL instead of the local directory, e.g. `s3://bucket/prefix` (any
    /// S3-compatible store; credentials, region and endpoint from the usual `AWS_*` variables,
    /// such as `AWS_ENDPOINT` and `AWS_ALLOW_HTTP` for a local MinIO).
    #[arg(long, env = "XPAND_FILES_URL")]
    pub files_url: Option<String>,
    /// Directory for the gateway's temporary working copies (probing, splitting, joining video).
    #[arg(long, env = "XPAND_SCRATCH_DIR", default_value = ".xpand/scratch")]
    pub scratch_dir: PathBuf,
    /// Base URL workers use to reach this gateway's transfer endpoints (segment downloads and
    /// uploads). Defaults to `http://` and the address the server listens on.
    #[arg(long, env = "XPAND_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Longest accepted video, in seconds.
    #[arg(long, env = "XPAND_MAX_VIDEO_SECS", default_value_t = 600)]
    pub max_video_secs: u64,
    /// Fewest rows in a forecast shard: a bigger grain means fewer round trips per job, a
    /// smaller one spreads a sheet over more nodes and streams it back in more slices.
    #[arg(long, env = "XPAND_FORECAST_ROWS_PER_SHARD", default_value_t = DEFAULT_FORECAST_ROWS_PER_SHARD)]
    pub forecast_rows_per_shard: usize,
    /// About how many input elements a predict shard carries: a model's fixed cost per run
    /// against spreading a job over nodes.
    #[arg(
        long,
        env = "XPAND_PREDICT_ELEMENTS_PER_SHARD",
        default_value_t = 65_536
    )]
    pub predict_elements_per_shard: usize,
    /// Largest accepted upload, in bytes.
    #[arg(long, env = "XPAND_MAX_UPLOAD_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_upload_bytes: u64,
    /// Largest accepted ONNX model, in bytes (it is read whole to be checked).
    #[arg(long, env = "XPAND_MAX_MODEL_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_model_bytes: u64,
    /// Share of shard results checked by a second run on another node, in basis points.
    #[arg(long, env = "XPAND_REDUNDANCY_BPS", default_value_t = 500)]
    pub redundancy_bps: u32,
    /// A node's results are all checked until it has done this many shards.
    #[arg(long, env = "XPAND_VERIFY_NEW_NODE_SHARDS", default_value_t = 20)]
    pub verify_new_node_shards: i64,
    /// A held result whose replica no node has taken this many seconds after it was held (no
    /// eligible live node, or its only checker died) is accepted unverified.
    #[arg(long, env = "XPAND_VERIFY_WAIT_SECS", default_value_t = 20)]
    pub verify_wait_secs: u64,
    /// A running shard gets a speculative copy on another node once it has run this many times
    /// longer than the median of its job's finished shards...
    #[arg(long, env = "XPAND_STRAGGLER_FACTOR", default_value_t = 3.0)]
    pub straggler_factor: f64,
    /// ... and at least this many seconds.
    #[arg(long, env = "XPAND_STRAGGLER_MIN_SECS", default_value_t = 10.0)]
    pub straggler_min_secs: f64,
    /// Place a one-shard job on a node in its submit transaction when a slot is free and no
    /// other shard waits, rather than in a dispatch round after it (`false` leaves every
    /// placement to the dispatcher).
    #[arg(long, env = "XPAND_PLACE_AT_SUBMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub place_at_submit: bool,
    /// Nodes whose last closed epoch scored below this get no shards.
    #[arg(long, env = "XPAND_MIN_POWER_SCORE", default_value_t = -1_000, allow_negative_numbers = true)]
    pub min_power_score: i64,
    /// Messages a node may send per second (all replicas together); more are dropped.
    #[arg(long, env = "XPAND_NODE_MSGS_PER_SEC", default_value_t = 2_000)]
    pub node_msgs_per_sec: u32,
    /// Database connections per gateway.
    #[arg(long, env = "XPAND_DB_POOL", default_value_t = 16)]
    pub db_pool: u32,
    /// Networks webhooks may reach although they are not public (comma-separated CIDRs, e.g.
    /// `127.0.0.0/8` for a receiver on this machine during development). Empty: public only.
    #[arg(long, env = "XPAND_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub webhook_allow: Vec<ipnet::IpNet>,
    /// Web origins whose pages may call the API from a browser (comma-separated, exactly as a
    /// browser sends them: `https://addin.example.com`, `http://127.0.0.1:3000`). Empty: no
    /// cross-origin page may call it.
    #[arg(long, env = "XPAND_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Concurrent HTTP connections; more wait in the listen backlog.
    #[arg(long, env = "XPAND_MAX_CONNECTIONS", default_value_t = Limits::DEFAULT.max_connections)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (also how long an idle keep-alive
    /// connection stays open).
    #[arg(long, env = "XPAND_HEADER_TIMEOUT_SECS", default_value_t = Limits::DEFAULT.header_timeout.as_secs())]
    pub header_timeout_secs: u64,
    /// Seconds a request may take; streams (SSE, WebSocket), file transfers and submits excepted.
    #[arg(long, env = "XPAND_REQUEST_TIMEOUT_SECS", default_value_t = Limits::DEFAULT.request_timeout.as_secs())]
    pub request_timeout_secs: u64,
    /// Requests per second one credential (API key or token) may make, on all replicas.
    #[arg(long, env = "XPAND_RATE_LIMIT", default_value_t = Limits::DEFAULT.requests_per_sec)]
    pub rate_limit: u32,
    /// Open streams (WebSockets and SSE event streams) one account may hold, on all replicas.
    #[arg(long, env = "XPAND_MAX_STREAMS_PER_ACCOUNT", default_value_t = Limits::DEFAULT.max_streams_per_account)]
    pub max_streams_per_account: u32,
    /// Bytes of stored files (uploads and outputs) one account may keep.
    #[arg(long, env = "XPAND_STORAGE_QUOTA_BYTES", default_value_t = Limits::DEFAULT.storage_quota_bytes)]
    pub storage_quota_bytes: i64,
    /// Unfinished (queued or running) jobs one account may have.
    #[arg(long, env = "XPAND_MAX_UNFINISHED_JOBS", default_value_t = Limits::DEFAULT.max_unfinished_jobs)]
    pub max_unfinished_jobs: i64,
    /// Hours files are kept after upload (inputs) or after their job finished (outputs).
    #[arg(long, env = "XPAND_RETENTION_HOURS", default_value_t = Limits::DEFAULT.retention.as_secs() / 3600)]
    pub retention_hours: u64,
}

/// What one client or account may use: the defenses against abuse of the public surface.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub requests_per_sec: u32,
    pub max_streams_per_account: u32,
    pub storage_quota_bytes: i64,
    pub max_unfinished_jobs: i64,
    pub retention: Duration,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        max_connections: 1024,
        header_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        requests_per_sec: 100,
        max_streams_per_account: 64,
        storage_quota_bytes: 10 * 1024 * 1024 * 1024,
        max_unfinished_jobs: 1000,
        retention: Duration::from_secs(7 * 24 * 3600),
    };
}

/// Validated configuration the application is built from.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: String,
    pub redis_url: String,
    pub mqtt: BrokerLink,
    pub topic_prefix: String,
    pub redis_prefix: String,
    pub gateway_key: NodeKey,
    /// The auditor's bearer secret (see `GatewayArgs::auditor_key_file`).
    pub auditor_key: String,
    pub node_ttl: Duration,
    pub max_body_bytes: usize,
    pub token_ttl: Duration,
    pub seal_interval: Duration,
    pub epoch_length: Duration,
    pub pool: PoolConfig,
    pub files_dir: PathBuf,
    pub files_url: Option<String>,
    pub scratch_dir: PathBuf,
    pub public_url: Option<String>,
    pub max_video_seconds: u64,
    pub forecast_rows_per_shard: usize,
    pub predict_elements_per_shard: usize,
    pub max_upload_bytes: u64,
    pub max_model_bytes: u64,
    pub node_msgs_per_sec: u32,
    pub scheduling: Scheduling,
    pub db_pool: u32,
    pub egress: crate::egress::EgressPolicy,
    /// Origins allowed to call the API from a browser page, each as `scheme://host[:port]`.
    pub cors_origins: Vec<String>,
    pub limits: Limits,
}

/// The rules the job scheduler runs by: leases, retries, verification sampling, stragglers.
#[derive(Debug, Clone, Copy)]
pub struct Scheduling {
    /// How long an assigned shard stays with its node without progress.
    pub lease: Duration,
    /// How long a job may take from submit to a terminal state.
    pub job_timeout: Duration,
    /// Runs of a shard before its job fails.
    pub max_shard_attempts: u32,
    /// Share of primary results held for a replica's check, in basis points.
    pub redundancy_bps: u32,
    /// A node's results are all checked until it has done this many shards.
    pub verify_new_node_shards: i64,
    /// How long a held result waits for a check before it is accepted unverified.
    pub verify_wait: Duration,
    /// Nodes whose last epoch scored below this get no work.
    pub min_power_score: i64,
    /// A primary running this many times its job's median gets a speculative copy...
    pub straggler_factor: f64,
    /// ...once it has run at least this long.
    pub straggler_min_secs: f64,
    /// Whether a one-shard job may be placed in its submit transaction.
    pub place_at_submit: bool,
}

/// What an epoch's reward pool holds.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Newly issued micro-credits per epoch.
    pub issuance: i64,
    /// Share of the epoch's gateway fees added to the pool, in basis points.
    pub fee_share_bps: i64,
}

impl GatewayArgs {
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mqtt_address: BrokerAddress = self
            .mqtt_url
            .parse()
            .context("MQTT_URL must look like mqtts://host:port or mqtt://host:port")?;
        let mqtt = BrokerLink::new(
            mqtt_address,
            self.mqtt_ca_file.as_deref(),
            &self.mqtt_plaintext_hosts,
        )?;
        if !self.database_url.starts_with("postgres") {
            bail!(
                "DATABASE_URL must be a postgres:// URL, got {:?}",
                self.database_url
            );
        }
        if !self.redis_url.starts_with("redis://") {
            bail!("REDIS_URL must be a redis:// URL, got {:?}", self.redis_url);
        }
        for (name, prefix) in [
            ("XPAND_TOPIC_PREFIX", &self.topic_prefix),
            ("XPAND_REDIS_PREFIX", &self.redis_prefix),
        ] {
            if prefix.is_empty() || prefix.contains(['+', '#', ' ']) {
                bail!("{name} must be non-empty without spaces, '+' or '#', got {prefix:?}");
            }
        }
        if self.lease_secs == 0 || self.job_timeout_secs == 0 || self.max_shard_attempts == 0 {
            bail!(
                "XPAND_LEASE_SECS, XPAND_JOB_TIMEOUT_SECS and XPAND_MAX_SHARD_ATTEMPTS must be > 0"
            );
        }
        if self.epoch_secs < 10 {
            bail!("XPAND_EPOCH_SECS must be at least 10 (one uptime slot)");
        }
        if self.epoch_issuance < 0 || !(0..=10_000).contains(&self.reward_fee_share_bps) {
            bail!("XPAND_EPOCH_ISSUANCE must be >= 0 and XPAND_REWARD_FEE_SHARE_BPS 0..=10000");
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("XPAND_PUBLIC_URL must be an http(s) URL, got {url:?}");
            }
        }
        if self.redundancy_bps > 10_000 || self.verify_new_node_shards < 0 {
            bail!("XPAND_REDUNDANCY_BPS must be 0..=10000 and XPAND_VERIFY_NEW_NODE_SHARDS >= 0");
        }
        if !(self.straggler_factor >= 1.0 && self.straggler_min_secs >= 0.0) {
            bail!("XPAND_STRAGGLER_FACTOR must be >= 1 and XPAND_STRAGGLER_MIN_SECS >= 0");
        }
        if self.max_video_secs == 0 {
            bail!("XPAND_MAX_VIDEO_SECS must be > 0");
        }
        if self.forecast_rows_per_shard == 0 || self.predict_elements_per_shard == 0 {
            bail!("XPAND_FORECAST_ROWS_PER_SHARD and XPAND_PREDICT_ELEMENTS_PER_SHARD must be > 0");
        }
        if self.max_connections == 0 || self.header_timeout_secs == 0 || self.rate_limit == 0 {
            bail!(
                "XPAND_MAX_CONNECTIONS, XPAND_HEADER_TIMEOUT_SECS and XPAND_RATE_LIMIT must be > 0"
            );
        }
        if self.max_streams_per_account == 0 {
            bail!("XPAND_MAX_STREAMS_PER_ACCOUNT must be > 0");
        }
        if !(60..=3600).contains(&self.token_ttl_secs) {
            bail!("XPAND_TOKEN_TTL_SECS must be from 60 to 3600");
        }
        if self.request_timeout_secs == 0 || self.retention_hours == 0 {
            bail!("XPAND_REQUEST_TIMEOUT_SECS and XPAND_RETENTION_HOURS must be > 0");
        }
        let cors_origins = self
            .cors_origins
            .iter()
            .map(|o| web_origin(o))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let gateway_key = load_or_create_key(&self.gateway_key_file)?;
        let auditor_key = load_or_create_secret(&self.auditor_key_file, AUDITOR_KEY_PREFIX)?;
        Ok(Config {
            listen: self.listen,
            database_url: self.database_url,
            redis_url: self.redis_url,
            mqtt,
            topic_prefix: self.topic_prefix,
            redis_prefix: self.redis_prefix,
            gateway_key,
            auditor_key,
            node_ttl: Duration::from_secs(self.node_ttl_secs.max(1)),
            max_body_bytes: self.max_body_bytes,
            token_ttl: Duration::from_secs(self.token_ttl_secs),
            seal_interval: Duration::from_secs(self.seal_interval_secs.max(1)),
            epoch_length: Duration::from_secs(self.epoch_secs),
            pool: PoolConfig {
                issuance: self.epoch_issuance,
                fee_share_bps: self.reward_fee_share_bps,
            },
            files_dir: self.files_dir,
            files_url: self.files_url,
            scratch_dir: self.scratch_dir,
            public_url: self.public_url,
            max_video_seconds: self.max_video_secs,
            forecast_rows_per_shard: self.forecast_rows_per_shard,
            predict_elements_per_shard: self.predict_elements_per_shard,
            max_upload_bytes: self.max_upload_bytes,
            max_model_bytes: self.max_model_bytes,
            node_msgs_per_sec: self.node_msgs_per_sec,
            scheduling: Scheduling {
                lease: Duration::from_secs(self.lease_secs),
                job_timeout: Duration::from_secs(self.job_timeout_secs),
                max_shard_attempts: self.max_shard_attempts,
                redundancy_bps: self.redundancy_bps,
                verify_new_node_shards: self.verify_new_node_shards,
                verify_wait: Duration::from_secs(self.verify_wait_secs),
                min_power_score: self.min_power_score,
                straggler_factor: self.straggler_factor,
                straggler_min_secs: self.straggler_min_secs,
                place_at_submit: self.place_at_submit,
            },
            db_pool: self.db_pool,
            egress: crate::egress::EgressPolicy {
                allow: self.webhook_allow,
            },
            cors_origins,
            limits: Limits {
                max_connections: self.max_connections,
                header_timeout: Duration::from_secs(self.header_timeout_secs),
                request_timeout: Duration::from_secs(self.request_timeout_secs),
                requests_per_sec: self.rate_limit,
                max_streams_per_account: self.max_streams_per_account,
                storage_quota_bytes: self.storage_quota_bytes,
                max_unfinished_jobs: self.max_unfinished_jobs,
                retention: Duration::from_secs(self.retention_hours * 3600),
            },
        })
    }
}

/// Reads an ed25519 seed (hex) from `path`, creating the file with a fresh key if it is missing.
/// Replicas starting together on a shared volume end up with the same key.
pub fn load_or_create_key(path: &std::path::Path) -> anyhow::Result<NodeKey> {
    if !path.exists() {
        match NodeKey::create_file(path) {
            Ok(key) => return Ok(key),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {} // another made it
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
    NodeKey::read_file(path).with_context(|| format!("reading {}", path.display()))
}

/// How an auditor key starts, so it is never mistaken for an API key.
pub const AUDITOR_KEY_PREFIX: &str = "xpa_";

/// Reads a bearer secret from `path`, creating it (owner-readable only) when missing.
/// Replicas starting together on a shared volume end up with the same secret.
pub fn load_or_create_secret(path: &std::path::Path, prefix: &str) -> anyhow::Result<String> {
    if !path.exists() {
        let secret = format!("{prefix}{}", hex::encode(rand::random::<[u8; 32]>()));
        if xpand_protocol::key_file::create_once(path, secret.as_bytes())
            .with_context(|| format!("creating {}", path.display()))?
        {
            return Ok(secret);
        }
    }
    let secret =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let secret = secret.trim().to_string();
    anyhow::ensure!(
        secret.len() >= 32,
        "{} must hold a secret of at least 32 characters",
        path.display()
    );
    Ok(secret)
}

/// Writes a secret readable by its owner only.
pub fn write_private(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// A web origin as browsers send it in `Origin`: `scheme://host[:port]`, lowercase, without the
/// scheme's default port. Anything else (a path, a wildcard, credentials, `null`) is refused: an
/// allowed origin must name exactly one site.
pub fn web_origin(text: &str) -> anyhow::Result<String> {
    let text = text.trim();
    let url = url::Url::parse(text).with_context(|| {
        format!("XPAND_CORS_ORIGINS: {text:?} is not an origin like https://host")
    })?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.contains('*'))
        && url.username().is_empty()
        && url.password().is_none()
        && url.path() == "/"
        && !text.ends_with('/')
        && url.query().is_none()
        && url.fragment().is_none();
    if !plain {
        bail!("XPAND_CORS_ORIGINS: {text:?} must be scheme://host[:port] and nothing else");
    }
    Ok(url.origin().ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::web_origin;

    #[test]
    fn cors_origins_are_exact_sites_in_the_form_browsers_send() {
        assert_eq!(
            web_origin("https://AddIn.example.com").unwrap(),
            "https://addin.example.com"
        );
        assert_eq!(
            web_origin("https://addin.example.com:443").unwrap(),
            "https://addin.example.com"
        );
        assert_eq!(
            web_origin(" http://127.0.0.1:3000 ").unwrap(),
            "http://127.0.0.1:3000"
        );
        assert_eq!(
            web_origin("http://[::1]:8000").unwrap(),
            "http://[::1]:8000"
        );
        for refused in [
            "*",
            "null",
            "https://*.example.com",
            "https://example.com/",
            "https://example.com/addin",
            "https://user@example.com",
            "https://example.com?x=1",
            "ftp://example.com",
            "example.com",
            "",
        ] {
            assert!(web_origin(refused).is_err(), "{refused:?} was accepted");
        }
    }
}
