//! `xpand up`: a whole local network in one command, for development and the load tests.
//! Creates the database if needed, applies migrations, starts the gateway, registers and starts
//! local `xpand-worker` processes, and prints a dev account's API key (kept in
//! `.xpand/dev-api-key` and reused while it stays valid).

use std::path::{Path, PathBuf};

use anyhow::Context;
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};

use crate::config::{load_or_create_key, write_private, GatewayArgs};
use crate::startup::{self, Application};
use crate::{accounts, nodes};

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Local workers to start.
    #[arg(long, env = "XPAND_LOCAL_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Opening balance of the dev account, in micro-credits.
    #[arg(long, default_value_t = 1_000_000_000)]
    pub dev_credit: i64,
    /// Directory for local state: keys, the dev API key.
    #[arg(long, default_value = ".xpand")]
    pub state_dir: PathBuf,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    create_database_if_missing(&args.gateway.database_url).await?;
    let config = args.gateway.clone().into_config()?;
    let app = Application::build(config.clone()).await?;
    let db = app.state().db.clone();

    let key_file = args.state_dir.join("dev-api-key");
    let api_key = dev_api_key(&db, &key_file, args.dev_credit).await?;

    let mut workers = Vec::with_capacity(args.workers);
    for i in 0..args.workers {
        let key_path = args.state_dir.join(format!("worker-{i}.key"));
        let key = load_or_create_key(&key_path)?;
        let name = format!("local-{i}");
        nodes::register(&db, key.id(), &name).await?;
        workers.push(spawn_worker(&args, &config, &key_path, &name)?);
    }

    let base = format!("http://127.0.0.1:{}", app.port());
    println!();
    println!("xpand is up at {base}   (docs: {base}/docs)");
    println!("workers: {}", args.workers);
    println!("dev API key: {api_key}   (also in {})", key_file.display());
    println!(
        "try: curl -s -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' \\\n     \
         -d '{{\"kind\":\"forecast\",\"input\":{{\"series\":[[1,2,3,4,5,6,7,8]]}},\"params\":{{\"horizon\":3}},\"max_fee\":100000}}' {base}/v1/jobs"
    );
    println!();

    let result = app.run_until_stopped(startup::shutdown_signal()).await;
    for mut w in workers {
        let _ = w.start_kill();
        let _ = w.wait().await;
    }
    result
}

/// Reuses the key in `path` if it still authenticates, else creates a funded dev account.
async fn dev_api_key(db: &sqlx::PgPool, path: &Path, credit: i64) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim().to_string();
        if accounts::account_for_key(db, &existing).await?.is_some() {
            return Ok(existing);
        }
    }
    let (_, key) = accounts::create_customer(db, "dev", credit).await?;
    write_private(path, &key)?;
    Ok(key)
}

fn spawn_worker(
    args: &UpArgs,
    config: &crate::config::Config,
    key_path: &Path,
    name: &str,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locating the xpand executable")?;
    let worker = exe.with_file_name("xpand-worker");
    anyhow::ensure!(
        worker.exists(),
        "{} not found: build the workspace (`cargo build --workspace`) first",
        worker.display()
    );
    Command::new(&worker)
        .arg("--key-file")
        .arg(key_path)
        .arg("--gateway-key")
        .arg(config.gateway_key.id())
        .arg("--name")
        .arg(name)
        // Local workers share this machine's cores: split them rather than oversubscribe.
        .arg("--inference-threads")
        .arg(inference_threads(args.workers).to_string())
        .env("XPAND_MQTT_URL", &args.gateway.mqtt_url)
        .env("XPAND_TOPIC_PREFIX", &config.topic_prefix)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", worker.display()))
}

/// Inference threads for each of `workers` local workers: the cores, shared out.
fn inference_threads(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / workers.max(1)).max(1)
}

/// Creates the database named in `url` when it does not exist (connecting to `postgres`).
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    let (server, name) = url
        .rsplit_once('/')
        .context("DATABASE_URL has no database name")?;
    let name = name.split('?').next().unwrap_or(name);
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "database name {name:?} must be letters, digits and underscores"
    );
    let mut conn = PgConnection::connect(&format!("{server}/postgres"))
        .await
        .with_context(|| format!("connecting to {server}/postgres"))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
    }
    Ok(())
}
