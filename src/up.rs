//! `xpand up`: a whole local network in one command, for development and the load tests.
//! Creates the database if needed, applies migrations, registers the local nodes, starts the
//! gateway and the local `xpand-worker` processes, and prints a dev account's API key (kept in
//! `.xpand/dev-api-key` and reused while it stays valid).
//!
//! One `xpand up` runs per state directory (a lock on `up.lock`, which names the running one's
//! PID and address). Each local worker is supervised: one that exits is reaped and started
//! again under the same node key, with back-off; shutdown stops them all.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context;
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{load_or_create_key, write_private, GatewayArgs};
use crate::shutdown::{self, Shutdown};
use crate::startup::{self, Application};
use crate::{accounts, nodes};

/// First delay before a crashed worker is started again; doubles up to [`MAX_RESTART_DELAY`].
const MIN_RESTART_DELAY: Duration = Duration::from_millis(500);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
/// A worker that ran this long before exiting starts again after the shortest delay.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// How long a stopping worker may take (it finishes running shards for up to 10 s) before it
/// is killed.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(15);

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
    let mut instance = claim_instance(&args.state_dir)?;
    create_database_if_missing(&args.gateway.database_url).await?;
    let mut config = args.gateway.clone().into_config()?;
    // A developer's own machine: webhooks to a receiver on it work without a setting
    // (`XPAND_WEBHOOK_ALLOW`, when given, is kept as it is).
    if config.egress.allow.is_empty() {
        config.egress.allow = vec!["127.0.0.0/8".parse()?, "::1/128".parse()?];
    }

    // Nodes are registered before the gateway subscribes to the broker: it would drop the
    // workers' retained announces of an earlier run as coming from unknown nodes.
    let db = startup::connect_db(&config).await?;
    startup::migrate(&db).await?;
    let mut local = Vec::with_capacity(args.workers);
    for i in 0..args.workers {
        let key_path = args.state_dir.join(format!("worker-{i}.key"));
        let key = load_or_create_key(&key_path)?;
        let name = format!("local-{i}");
        nodes::register(&db, key.id(), &name).await?;
        local.push(LocalWorker::new(&args, &config, key_path, name)?);
    }
    let key_file = args.state_dir.join("dev-api-key");
    let api_key = dev_api_key(&db, &key_file, args.dev_credit).await?;
    db.close().await;

    let app = Application::build(config.clone()).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    instance.set_len(0)?;
    instance.rewind()?;
    writeln!(instance, "pid {}\nurl {base}", std::process::id())?;

    let (stop_workers, workers_stopping) = shutdown::channel();
    let supervisors: Vec<JoinHandle<()>> = local
        .into_iter()
        .map(|w| tokio::spawn(w.supervise(workers_stopping.clone())))
        .collect();

    println!();
    println!("xpand is up at {base}   (docs: {base}/docs)");
    println!("workers: {}", args.workers);
    println!(
        "webhooks may call: {:?} (XPAND_WEBHOOK_ALLOW)",
        config.egress.allow
    );
    println!("dev API key: {api_key}   (also in {})", key_file.display());
    println!(
        "auditor key: in {}   (xpand verify --auditor-key-file ...)",
        args.gateway.auditor_key_file.display()
    );
    println!(
        "try: curl -s -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' \\\n     \
         -d '{{\"kind\":\"forecast\",\"input\":{{\"series\":[[1,2,3,4,5,6,7,8]]}},\"params\":{{\"horizon\":3}},\"max_fee\":100000}}' {base}/v1/jobs"
    );
    println!();

    // Workers and gateway stop together: the workers finish what they run while the gateway
    // still reads their results.
    let result = app
        .run_until_stopped(async move {
            startup::shutdown_signal().await;
            stop_workers.fire();
        })
        .await;
    for supervisor in supervisors {
        let _ = supervisor.await;
    }
    drop(instance);
    result
}

/// Takes `up.lock` in `state_dir` for this process, or says which `xpand up` holds it.
fn claim_instance(state_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = state_dir.join("up.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let field = |name: &str| {
                holder
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                    .unwrap_or("unknown")
                    .to_string()
            };
            let pid = field("pid");
            anyhow::bail!(
                "xpand up is already running from {} (PID {pid}, {}); stop it first \
                 (Ctrl-C in its terminal, or `kill {pid}`), or give this one another --state-dir",
                state_dir.display(),
                field("url"),
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// One supervised local worker: how to start it, and its name for the logs.
struct LocalWorker {
    name: String,
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    envs: Vec<(&'static str, String)>,
}

impl LocalWorker {
    fn new(
        args: &UpArgs,
        config: &crate::config::Config,
        key_path: PathBuf,
        name: String,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the xpand executable")?;
        let program = exe.with_file_name("xpand-worker");
        anyhow::ensure!(
            program.exists(),
            "{} not found: build the workspace (`cargo build --workspace`) first",
            program.display()
        );
        Ok(Self {
            args: vec![
                "--key-file".into(),
                key_path.into(),
                "--gateway-key".into(),
                config.gateway_key.id().into(),
                "--name".into(),
                name.clone().into(),
                // Local workers share this machine's cores: split them rather than oversubscribe.
                "--inference-threads".into(),
                inference_threads(args.workers).to_string().into(),
            ],
            envs: [
                ("XPAND_MQTT_URL", args.gateway.mqtt_url.clone()),
                ("XPAND_TOPIC_PREFIX", config.topic_prefix.clone()),
                (
                    "XPAND_MQTT_PLAINTEXT_HOSTS",
                    args.gateway.mqtt_plaintext_hosts.join(","),
                ),
            ]
            .into_iter()
            .chain(
                (args.gateway.mqtt_ca_file.as_ref())
                    .map(|ca| ("XPAND_MQTT_CA_FILE", ca.display().to_string())),
            )
            .collect(),
            name,
            program,
        })
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            // Its own process group: a Ctrl-C in the terminal reaches `xpand up` alone, which
            // then stops the workers itself (and does not mistake their exit for a crash).
            .process_group(0)
            .kill_on_drop(true);
        // If `xpand up` itself dies (even by SIGKILL) the kernel tells the worker to stop, so
        // no orphan keeps the node identity while a new `xpand up` starts. (Linux sends it when
        // the spawning *thread* ends; tokio's runtime threads live as long as `xpand up`.)
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.spawn()
    }

    /// Runs the worker until `stopping`, starting it again whenever it exits.
    async fn supervise(self, stopping: Shutdown) {
        let mut delay = MIN_RESTART_DELAY;
        loop {
            let started = Instant::now();
            let exit = match self.spawn() {
                Ok(mut child) => {
                    tracing::info!(worker = %self.name, pid = child.id(), "local worker started");
                    tokio::select! {
                        exit = child.wait() => exit,
                        _ = stopping.wait() => {
                            stop(&self.name, child).await;
                            return;
                        }
                    }
                }
                Err(e) => Err(e),
            };
            if started.elapsed() >= STABLE_RUN {
                delay = MIN_RESTART_DELAY;
            }
            match exit {
                Ok(status) => {
                    tracing::warn!(worker = %self.name, status = %describe(status), restart_in = ?delay, "local worker exited; restarting it")
                }
                Err(e) => {
                    tracing::error!(worker = %self.name, error = %e, restart_in = ?delay, "could not run the local worker; retrying")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopping.wait() => return,
            }
            delay = (delay * 2).min(MAX_RESTART_DELAY);
        }
    }
}

/// Asks a worker to stop (SIGTERM: it finishes its shards and disconnects), killing it if it
/// takes longer than [`WORKER_STOP_GRACE`].
async fn stop(name: &str, mut child: Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling a child we have not reaped yet, so the PID is still ours.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(WORKER_STOP_GRACE, child.wait()).await {
        Ok(_) => tracing::info!(worker = %name, "local worker stopped"),
        Err(_) => {
            tracing::warn!(worker = %name, "local worker did not stop in time; killing it");
            let _ = child.kill().await;
        }
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Reuses the key in `path` if it still authenticates, else creates a funded dev account.
async fn dev_api_key(db: &sqlx::PgPool, path: &Path, credit: i64) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim().to_string();
        if accounts::grant_by_hash(db, &accounts::hash_key(&existing))
            .await?
            .is_some()
        {
            return Ok(existing);
        }
    }
    let (_, key) = accounts::create_customer(db, "dev", credit).await?;
    write_private(path, &key)?;
    Ok(key)
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
