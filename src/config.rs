//! Typed configuration, from flags or the environment, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use xpand_protocol::NodeKey;

/// Where the gateway's backing services live and how it behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Address the HTTP server listens on.
    #[arg(long, env = "XPAND_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/xpand"
    )]
    pub database_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// MQTT broker, `mqtt://host:port`.
    #[arg(long, env = "MQTT_URL", default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt_url: String,
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
    /// Lifetime of tokens from `POST /v1/auth/token`.
    #[arg(long, env = "XPAND_TOKEN_TTL_SECS", default_value_t = 900)]
    pub token_ttl_secs: u64,
    /// Database connections per gateway.
    #[arg(long, env = "XPAND_DB_POOL", default_value_t = 16)]
    pub db_pool: u32,
}

/// Validated configuration the application is built from.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: String,
    pub redis_url: String,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    pub topic_prefix: String,
    pub redis_prefix: String,
    pub gateway_key: NodeKey,
    pub lease: Duration,
    pub node_ttl: Duration,
    pub job_timeout: Duration,
    pub max_shard_attempts: u32,
    pub max_body_bytes: usize,
    pub token_ttl: Duration,
    pub db_pool: u32,
}

impl GatewayArgs {
    pub fn into_config(self) -> anyhow::Result<Config> {
        let (mqtt_host, mqtt_port) = parse_mqtt_url(&self.mqtt_url)?;
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
        let gateway_key = load_or_create_key(&self.gateway_key_file)?;
        Ok(Config {
            listen: self.listen,
            database_url: self.database_url,
            redis_url: self.redis_url,
            mqtt_host,
            mqtt_port,
            topic_prefix: self.topic_prefix,
            redis_prefix: self.redis_prefix,
            gateway_key,
            lease: Duration::from_secs(self.lease_secs),
            node_ttl: Duration::from_secs(self.node_ttl_secs.max(1)),
            job_timeout: Duration::from_secs(self.job_timeout_secs),
            max_shard_attempts: self.max_shard_attempts,
            max_body_bytes: self.max_body_bytes,
            token_ttl: Duration::from_secs(self.token_ttl_secs),
            db_pool: self.db_pool,
        })
    }
}

/// Parses `mqtt://host:port` (port defaults to 1883).
pub fn parse_mqtt_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .with_context(|| format!("MQTT_URL must look like mqtt://host:port, got {url:?}"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse()
                .with_context(|| format!("MQTT_URL has a bad port: {url:?}"))?,
        ),
        None => (rest, 1883),
    };
    if host.is_empty() {
        bail!("MQTT_URL has no host: {url:?}");
    }
    Ok((host.to_string(), port))
}

/// Reads an ed25519 seed (hex) from `path`, creating the file with a fresh key if it is missing.
pub fn load_or_create_key(path: &std::path::Path) -> anyhow::Result<NodeKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => NodeKey::from_seed_hex(&text)
            .with_context(|| format!("{} does not hold a 64-hex-digit key seed", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = NodeKey::generate();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            write_private(path, &key.seed_hex())?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls_parse() {
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(
            parse_mqtt_url("mqtt://broker").unwrap(),
            ("broker".into(), 1883)
        );
        assert!(parse_mqtt_url("http://x").is_err());
        assert!(parse_mqtt_url("mqtt://x:notaport").is_err());
    }
}
