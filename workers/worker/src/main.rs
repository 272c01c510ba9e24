//! `xpand-worker`: runs a worker node until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use xpand_worker::{
    default_ort_dylib_path, load_node_key, lock_node_key, run, AcceleratorChoice, BrokerAddress,
    BrokerLink, WorkerConfig,
};

/// Worker node of the xpand compute network: runs ONNX models on shards the gateway assigns over
/// MQTT. Logs go to stderr (JSON with XPAND_LOG_FORMAT=json; filter with RUST_LOG).
#[derive(Debug, Parser)]
#[command(name = "xpand-worker", version)]
struct Cli {
    /// MQTT broker, as mqtts://host:port (TLS) or mqtt://host:port.
    #[arg(long, env = "XPAND_MQTT_URL", default_value = "mqtt://127.0.0.1:1883")]
    mqtt_url: BrokerAddress,

    /// PEM file of the CAs that sign an mqtts:// broker's certificate [default: the public
    /// web roots built in].
    #[arg(long, env = "XPAND_MQTT_CA_FILE")]
    mqtt_ca_file: Option<PathBuf>,

    /// Broker hosts that may be reached over plaintext mqtt:// although they are not this
    /// machine (comma-separated), for a broker on a private network.
    #[arg(long, env = "XPAND_MQTT_PLAINTEXT_HOSTS", value_delimiter = ',')]
    mqtt_plaintext_hosts: Vec<String>,

    /// Root of the MQTT topic tree.
    #[arg(long, env = "XPAND_TOPIC_PREFIX", default_value = "xpand")]
    topic_prefix: String,

    /// File holding this node's ed25519 key (a 64-hex-digit seed).
    #[arg(long, env = "XPAND_NODE_KEY_FILE")]
    key_file: PathBuf,

    /// Create the key file with a fresh key if it does not exist.
    #[arg(long, env = "XPAND_GENERATE_KEY")]
    generate_key: bool,

    /// Print this node's id (its public key, which the gateway operator registers) and exit.
    #[arg(long)]
    print_node_id: bool,

    /// The gateway's public key (hex); only assignments it signed are run.
    #[arg(
        long,
        env = "XPAND_GATEWAY_KEY",
        required_unless_present = "print_node_id"
    )]
    gateway_key: Option<String>,

    /// Directory with one subdirectory per model, each holding a manifest.json.
    #[arg(long, env = "XPAND_MODELS_DIR", default_value = "workers/models")]
    models_dir: PathBuf,

    /// ONNX Runtime shared library [default: the one scripts/setup-onnxruntime.sh installs].
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_dylib: Option<PathBuf>,

    /// Name shown in the capability announce [default: the host name].
    #[arg(long, env = "XPAND_WORKER_NAME")]
    name: Option<String>,

    /// Shards run at once [default: number of CPU cores].
    #[arg(long, env = "XPAND_MAX_CONCURRENT_SHARDS")]
    max_concurrent_shards: Option<usize>,

    /// Threads each model inference may use [default: ONNX Runtime's, one per core]. Set it
    /// when several workers share a machine, so they do not oversubscribe its cores.
    #[arg(long, env = "XPAND_INFERENCE_THREADS")]
    inference_threads: Option<usize>,

    /// Milliseconds between heartbeats.
    #[arg(long, env = "XPAND_HEARTBEAT_MS", default_value_t = 2000)]
    heartbeat_ms: u64,

    /// Where to run models.
    #[arg(long, env = "XPAND_ACCELERATOR", value_enum, default_value = "auto")]
    accelerator: AcceleratorChoice,

    /// Where customers' models fetched for predict jobs are kept [default: a directory under
    /// the system's temporary one].
    #[arg(long, env = "XPAND_MODEL_CACHE_DIR")]
    model_cache_dir: Option<PathBuf>,

    /// Most megabytes of fetched models kept on disk.
    #[arg(long, env = "XPAND_MODEL_CACHE_MB", default_value_t = 2048)]
    model_cache_mb: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run_cli(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "xpand-worker failed");
            ExitCode::FAILURE
        }
    }
}

async fn run_cli(cli: Cli) -> anyhow::Result<()> {
    let node_key = load_node_key(&cli.key_file, cli.generate_key)?;
    if cli.print_node_id {
        println!("{}", node_key.id());
        return Ok(());
    }
    let _identity = lock_node_key(&cli.key_file)?;
    let gateway_key = cli
        .gateway_key
        .context("--gateway-key (XPAND_GATEWAY_KEY) is required")?;
    let broker = BrokerLink::new(
        cli.mqtt_url,
        cli.mqtt_ca_file.as_deref(),
        &cli.mqtt_plaintext_hosts,
    )?;
    let mut config = WorkerConfig::new(broker, node_key, gateway_key);
    config.topic_prefix = cli.topic_prefix;
    config.models_dir = cli.models_dir;
    config.ort_dylib_path = cli.ort_dylib.unwrap_or_else(default_ort_dylib_path);
    if let Some(name) = cli.name {
        config.name = name;
    }
    if let Some(max) = cli.max_concurrent_shards {
        config.max_concurrent_shards = max;
    }
    config.heartbeat_interval = Duration::from_millis(cli.heartbeat_ms);
    config.accelerator = cli.accelerator;
    config.inference_threads = cli.inference_threads;
    if let Some(dir) = cli.model_cache_dir {
        config.model_cache_dir = dir;
    }
    config.model_cache_bytes = cli.model_cache_mb << 20;
    run(config, shutdown_signal()).await
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("XPAND_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        logs.json().init();
    } else {
        logs.init();
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
