//! `xpand`: the gateway binary. `xpand up` runs a whole local network for development;
//! `xpand serve` runs one production gateway replica; `xpand jobs|files|account` are the user
//! commands, a client of a running gateway's API (`src/cli/`, docs/cli.md).

use anyhow::Context;
use clap::{Parser, Subcommand};
use uuid::Uuid;
use xpand::config::{GatewayArgs, DEFAULT_DATABASE_URL};
use xpand::startup::{self, Application};
use xpand::verify::{Credential, Verifier};
use xpand::{accounts, cli, ledger, nodes, telemetry, up};

#[derive(Parser)]
#[command(
    name = "xpand",
    version,
    about = "Gateway of the xpand AI compute network"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Jobs on a running gateway: submit, get, watch, cancel, list.
    Jobs(xpand::cli::jobs::JobsArgs),
    /// Files on a running gateway: upload, download, rm.
    Files(xpand::cli::files::FilesArgs),
    /// Your ONNX models in the registry: push, list, show, rm.
    Models(xpand::cli::models::ModelsArgs),
    /// Your balance (available and held); `account ledger`: your ledger entries.
    Account(xpand::cli::account::AccountArgs),
    /// Development: migrate, run the gateway and local workers, print a dev API key.
    Up(up::UpArgs),
    /// Run one gateway replica (production).
    Serve(GatewayArgs),
    /// Apply database migrations and exit.
    Migrate {
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = DEFAULT_DATABASE_URL
        )]
        database_url: String,
    },
    /// Print the OpenAPI document (what `openapi/openapi.json` must contain).
    Openapi,
    /// Print the gateway's public key (hex), which workers need as `--gateway-key`.
    GatewayKey {
        /// The key file `serve` uses; created with a fresh key when missing.
        #[arg(
            long,
            env = "XPAND_GATEWAY_KEY_FILE",
            default_value = ".xpand/gateway.key"
        )]
        key_file: std::path::PathBuf,
    },
    /// Verify the ledger through a gateway's API: signatures, hash links and Merkle roots for
    /// anyone; with `--api-key`, also every entry of that account and its balances; with
    /// `--auditor-key-file`, every entry, record and balance. Exits 1 when anything fails.
    Verify {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Expected gateway public key (hex); without it, the served key is trusted and printed.
        #[arg(long)]
        public_key: Option<String>,
        /// Account mode: an API key (or token with account:read) of the account to check.
        #[arg(long, env = "XPAND_API_KEY", conflicts_with = "auditor_key_file")]
        api_key: Option<String>,
        /// Auditor mode: the file holding the gateway's auditor key.
        #[arg(long)]
        auditor_key_file: Option<std::path::PathBuf>,
        /// Also check the inclusion proof of these ledger entry ids (yours, or any as auditor).
        #[arg(long)]
        entry: Vec<i64>,
    },
    /// Administration: accounts, deposits, nodes.
    Admin {
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = DEFAULT_DATABASE_URL
        )]
        database_url: String,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a customer account; prints its id and API key.
    CreateAccount {
        #[arg(long, default_value = "customer")]
        name: String,
        /// Opening balance in micro-credits.
        #[arg(long, default_value_t = 0)]
        credit: i64,
    },
    /// Credit an account (the stand-in for an on-chain payment oracle).
    Deposit {
        account: Uuid,
        /// Micro-credits.
        amount: i64,
        #[arg(long, default_value = "admin deposit")]
        memo: String,
    },
    /// Register a worker node's public key (`xpand-worker --print-node-id`), so its messages
    /// are accepted.
    RegisterNode {
        node_id: String,
        #[arg(long, default_value = "node")]
        name: String,
    },
    /// Ban a node: its messages are dropped and it gets no more work.
    BanNode { node_id: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The user commands print only what they mean to: no log lines (tracing writes to stdout).
    let command = match Cli::parse().command {
        Command::Jobs(args) => std::process::exit(cli::run(cli::jobs::run(args)).await),
        Command::Files(args) => std::process::exit(cli::run(cli::files::run(args)).await),
        Command::Models(args) => std::process::exit(cli::run(cli::models::run(args)).await),
        Command::Account(args) => std::process::exit(cli::run(cli::account::run(args)).await),
        other => other,
    };
    telemetry::init();
    match command {
        Command::Jobs(_) | Command::Files(_) | Command::Models(_) | Command::Account(_) => {
            unreachable!("the user commands exited above")
        }
        Command::Up(args) => up::run(args).await,
        Command::Serve(args) => {
            let app = Application::build(args.into_config()?).await?;
            tracing::info!(port = app.port(), "xpand gateway listening");
            app.run_until_stopped(startup::shutdown_signal()).await
        }
        Command::Migrate { database_url } => {
            let db = sqlx::PgPool::connect(&database_url)
                .await
                .with_context(|| format!("connecting to {database_url}"))?;
            startup::migrate(&db).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Openapi => {
            print!("{}", xpand::http::openapi::render());
            Ok(())
        }
        Command::Verify {
            url,
            public_key,
            api_key,
            auditor_key_file,
            entry,
        } => {
            let credential = match (api_key, auditor_key_file) {
                (Some(key), _) => Credential::Account(key),
                (None, Some(file)) => Credential::Auditor(
                    std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?
                        .trim()
                        .to_string(),
                ),
                (None, None) => Credential::Public,
            };
            verify(&url, public_key.as_deref(), credential, &entry).await
        }
        Command::GatewayKey { key_file } => {
            println!("{}", xpand::config::load_or_create_key(&key_file)?.id());
            Ok(())
        }
        Command::Admin {
            database_url,
            command,
        } => {
            let db = sqlx::PgPool::connect(&database_url)
                .await
                .with_context(|| format!("connecting to {database_url}"))?;
            startup::migrate(&db).await?;
            admin(&db, command).await
        }
    }
}

async fn verify(
    url: &str,
    public_key: Option<&str>,
    credential: Credential,
    entries: &[i64],
) -> anyhow::Result<()> {
    let mode = match credential {
        Credential::Public => "public",
        Credential::Account(_) => "account",
        Credential::Auditor(_) => "auditor",
    };
    let outcome = async {
        let verifier = Verifier::connect(url, public_key, credential.clone()).await?;
        let report = verifier.verify().await?;
        for &id in entries {
            let proof = verifier.verify_entry(id).await?;
            println!("entry {id}: included in block {}", proof.block.height);
        }
        Ok::<_, xpand::verify::VerifyError>(report)
    }
    .await;
    match outcome {
        Ok(report) => {
            println!("ledger verified ({mode} mode):");
            for line in report.lines(&credential) {
                println!("  {line}");
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("ledger verification FAILED ({mode} mode): {e}");
            std::process::exit(1);
        }
    }
}

async fn admin(db: &sqlx::PgPool, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::CreateAccount { name, credit } => {
            anyhow::ensure!(credit >= 0, "--credit must be >= 0");
            let (id, key) = accounts::create_customer(db, &name, credit).await?;
            println!("account {id}\napi key {key}");
        }
        AdminCommand::Deposit {
            account,
            amount,
            memo,
        } => {
            anyhow::ensure!(amount > 0, "the amount must be > 0 micro-credits");
            anyhow::ensure!(
                accounts::exists(db, account).await?,
                "no customer account {account}"
            );
            let mut tx = db.begin().await?;
            ledger::deposit(&mut tx, account, amount, &memo).await?;
            tx.commit().await?;
            let b = ledger::balances(db, account).await?;
            println!("deposited {amount}; available {}", b.available);
        }
        AdminCommand::RegisterNode { node_id, name } => {
            let account = nodes::register(db, &node_id, &name).await?;
            println!("node {node_id} registered; earnings go to account {account}");
        }
        AdminCommand::BanNode { node_id } => {
            anyhow::ensure!(nodes::ban(db, &node_id).await?, "no node {node_id}");
            println!("node {node_id} banned");
        }
    }
    Ok(())
}
