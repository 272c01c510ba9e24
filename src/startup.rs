//! Builds the application from a [`Config`] and runs it until a shutdown signal.
//!
//! Shutdown order: stop accepting HTTP and close streams; stop dispatching; give workers a
//! short grace period to deliver results for shards already out (anything still out after that
//! is handed back by its lease lapsing, to whichever replica is alive); then stop the rest.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use std::sync::Arc;

use crate::broker::{self, Broker, Inbound};
use crate::config::Config;
use crate::epochs::{EpochClock, EpochCloser};
use crate::events::EventHub;
use crate::http::auth::JwtKeys;
use crate::http::credentials::Credentials;
use crate::http::state::{AppState, Inner};
use crate::jobs::{dispatch, sweep, Scheduler, SchedulerParts};
use crate::metrics::Metrics;
use crate::nodes::{self, NodeDirectory};
use crate::presence::RedisPresence;
use crate::shutdown::{self, Trigger};
use crate::transfers::TransferUrls;
use crate::webhooks::{self, Deliverer};

/// How long a stopping gateway keeps reading results for shards already dispatched.
const DRAIN: Duration = Duration::from_secs(5);

pub struct Application {
    listener: TcpListener,
    state: AppState,
    stop_streams: Trigger,
    stop_dispatch: Trigger,
    stop_background: Trigger,
    dispatcher: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

/// How long Postgres lets a session sit idle inside a transaction before ending it. A gateway's
/// transactions take milliseconds; one that stops talking mid-transaction (a network partition,
/// a frozen process) would otherwise keep its row locks, a customer's balance or the revenue
/// account, and stall every other replica until the partition heals.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "5s";

pub async fn connect_db(config: &Config) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(config.db_pool)
        .acquire_timeout(Duration::from_secs(5))
        // A SET per connection rather than a startup option, which PgBouncer refuses.
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query(&format!(
                    "SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'"
                ))
                .execute(conn)
                .await
                .map(drop)
            })
        })
        .connect(&config.database_url)
        .await
        .with_context(|| format!("connecting to Postgres at {}", config.database_url))
}

pub async fn migrate(db: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("./migrations")
        .run(db)
        .await
        .context("applying migrations")
}

/// The gateway wired but not running: Postgres with migrations applied, Redis, an MQTT client
/// that sends nothing until its event loop is polled, the scheduler built on their adapters.
/// [`Application::build`] starts the loops; the scheduler simulation drives the domain through
/// the same handles by hand.
pub struct Connected {
    pub state: AppState,
    pub scheduler: Scheduler,
    /// Turns worker messages into calls on the scheduler.
    pub inbound: Inbound,
    pub presence: RedisPresence,
    pub eventloop: rumqttc::v5::EventLoop,
    directory: Arc<NodeDirectory>,
    epoch_clock: EpochClock,
    redis_client: redis::Client,
    stop_streams: Trigger,
}

impl Connected {
    /// `public_url` is where workers fetch and upload transfers (the gateway's own address
    /// unless `XPAND_PUBLIC_URL` says otherwise).
    pub async fn connect(config: Config, public_url: &str) -> anyhow::Result<Self> {
        let db = connect_db(&config).await?;
        migrate(&db).await?;
        let redis_client = redis::Client::open(config.redis_url.as_str())
            .with_context(|| format!("bad REDIS_URL {}", config.redis_url))?;
        // Bounded: a request on a connection that died silently must fail (and reconnect), not
        // hang the dispatcher or the message admission that wait on it.
        let redis_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_max_delay(2_000);
        let redis =
            redis::aio::ConnectionManager::new_with_config(redis_client.clone(), redis_config)
                .await
                .with_context(|| format!("connecting to Redis at {}", config.redis_url))?;
        let (broker, eventloop) = Broker::new(&config);
        let (stop_streams, streams) = shutdown::channel();
        let epoch_clock = EpochClock::load(&db, config.epoch_length).await?;
        std::fs::create_dir_all(&config.scratch_dir)
            .with_context(|| format!("creating {}", config.scratch_dir.display()))?;
        let transfers = TransferUrls::new(&config.gateway_key, public_url);
        let files = crate::files::open_store(&config)?;
        let presence = RedisPresence::new(
            redis.clone(),
            &config.redis_prefix,
            config.node_ttl,
            epoch_clock,
        );
        let events = EventHub::new(redis.clone(), &config.redis_prefix);
        let metrics = Metrics::new();
        let scheduler = Scheduler::new(SchedulerParts {
            db: db.clone(),
            rules: config.scheduling,
            kinds: crate::kinds::registry(&config, transfers.clone()),
            presence: Arc::new(presence.clone()),
            link: Arc::new(broker.clone()),
            events: Arc::new(events.clone()),
            metrics: metrics.clone(),
            files: files.clone(),
            egress: config.egress.clone(),
            max_unfinished_jobs: config.limits.max_unfinished_jobs,
            gateway_key: config.gateway_key.clone(),
            challenge_topic: format!("{}/v1/challenges", config.topic_prefix),
        });
        let directory = Arc::new(NodeDirectory::default());
        let inbound = Inbound {
            broker: broker.clone(),
            scheduler: scheduler.clone(),
            directory: directory.clone(),
            presence: presence.clone(),
            redis: redis.clone(),
            redis_prefix: config.redis_prefix.clone(),
            node_msgs_per_sec: config.node_msgs_per_sec,
        };
        let state = AppState::new(Inner {
            jwt: JwtKeys::new(&config.gateway_key, config.token_ttl)?,
            credentials: Credentials::new(db.clone()),
            transfers,
            files,
            presence: presence.clone(),
            events,
            scheduler: scheduler.clone(),
            config,
            db,
            redis,
            broker,
            metrics,
            shutdown: streams,
        });
        Ok(Self {
            state,
            scheduler,
            inbound,
            presence,
            eventloop,
            directory,
            epoch_clock,
            redis_client,
            stop_streams,
        })
    }
}

impl Application {
    /// Connects to Postgres (applying migrations), Redis and the broker, binds the listener and
    /// starts the background loops.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let bound = listener.local_addr().context("reading the bound address")?;
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"));
        let Connected {
            state,
            scheduler,
            inbound,
            presence,
            eventloop,
            directory,
            epoch_clock,
            redis_client,
            stop_streams,
        } = Connected::connect(config, &public_url).await?;
        let (stop_dispatch, dispatching) = shutdown::channel();
        let (stop_background, background) = shutdown::channel();
        let config = &state.config;
        let db = &state.db;
        let signing_key = config.gateway_key.signing_key().clone();
        let closer = EpochCloser {
            db: db.clone(),
            clock: epoch_clock,
            presence: Arc::new(presence),
            pool: config.pool,
            key: signing_key.clone(),
        };
        let deliverer = Deliverer {
            db: db.clone(),
            key: config.gateway_key.clone(),
            egress: config.egress.clone(),
        };
        let tasks = vec![
            tokio::spawn(nodes::run_directory_listener(
                db.clone(),
                directory,
                background.clone(),
            )),
            tokio::spawn(broker::run_inbound(inbound, eventloop, background.clone())),
            tokio::spawn(broker::follow_database(
                state.broker.clone(),
                db.clone(),
                background.clone(),
            )),
            tokio::spawn(
                state
                    .events
                    .clone()
                    .run_subscriber(redis_client, background.clone()),
            ),
            tokio::spawn(sweep::run_sweeper(scheduler.clone(), background.clone())),
            tokio::spawn(webhooks::run_deliverer(deliverer, background.clone())),
            tokio::spawn(crate::retention::run_expirer(
                db.clone(),
                state.files.clone(),
                config.limits.retention,
                background.clone(),
            )),
            tokio::spawn(crate::ledger::blocks::run_sealer(
                db.clone(),
                signing_key,
                config.seal_interval,
                background.clone(),
            )),
            tokio::spawn(closer.run(background)),
        ];
        let dispatcher = tokio::spawn(dispatch::run_dispatcher(scheduler, dispatching));
        Ok(Self {
            listener,
            state,
            stop_streams,
            stop_dispatch,
            stop_background,
            dispatcher,
            background: tasks,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
            .port()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `signal` resolves, then shuts down in order (see the module docs).
    pub async fn run_until_stopped(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let router = crate::http::router(self.state.clone());
        let stop_streams = self.stop_streams;
        crate::http::serve::serve(
            self.listener,
            router,
            &self.state.config.limits,
            async move {
                signal.await;
                tracing::info!("shutting down: no new requests");
                stop_streams.fire();
            },
        )
        .await;

        self.stop_dispatch.fire();
        let _ = self.dispatcher.await;
        let deadline = tokio::time::Instant::now() + DRAIN;
        while tokio::time::Instant::now() < deadline {
            let out: i64 =
                sqlx::query_scalar("SELECT count(*) FROM shards WHERE status = 'assigned'")
                    .fetch_one(&self.state.db)
                    .await
                    .unwrap_or(0);
            if out == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.stop_background.fire();
        for task in self.background {
            let _ = task.await;
        }
        self.state.broker.disconnect().await;
        self.state.db.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
