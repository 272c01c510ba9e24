//! `xpand-loadtest`: drives `forecast` jobs against a local xpand gateway and reports
//! throughput and latency. See `--help` and `loadtests/README.md`.

mod api;
mod budget;
mod cli;
mod harness;
mod rest;
mod sse;
mod stats;
mod workload;
mod ws;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::api::Gateway;
use crate::budget::Budget;
use crate::cli::{Args, Follow, Mode};
use crate::harness::Harness;
use crate::stats::{Recorder, Setup, Summary};
use crate::workload::{Shape, Workload};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cli::ensure_loopback(&args.url)?;
    let gateway = Gateway::new(args.url.clone(), &args.resolve_api_key()?)?;
    let account = gateway.account().await?;
    eprintln!(
        "account {}: {} micro-credits available",
        account.id, account.available
    );
    let ws_url = match args.mode {
        Mode::Ws => Some(gateway.ws_url().await?),
        Mode::Rest => None,
    };
    let workload = Workload::new(Shape {
        rows: args.rows,
        history: args.history,
        horizon: args.horizon,
        max_fee: args.max_fee,
    });
    let setup = setup(&args);
    eprintln!(
        "driving {} load at {}: {} jobs or {} s, whichever comes first",
        setup.mode, args.url, args.jobs, args.duration
    );
    // The budget's clock starts here, after the setup above.
    let harness = Arc::new(Harness {
        gateway,
        workload,
        budget: Budget::new(args.jobs, Duration::from_secs(args.duration)),
        stats: Recorder::new(),
        job_timeout: Duration::from_secs(args.job_timeout),
    });
    let summary = match (ws_url, args.rate) {
        (None, Some(rate)) => {
            let (follow, every) = (args.follow, Duration::from_millis(args.poll_interval_ms));
            let most = args.max_outstanding;
            harness
                .run(setup, 1, move |h| {
                    rest::open_loop(h, rate, most, follow, every)
                })
                .await
        }
        (Some(_), Some(_)) => anyhow::bail!("--rate (open loop) runs in --mode rest"),
        (None, None) => {
            let (follow, every) = (args.follow, Duration::from_millis(args.poll_interval_ms));
            harness
                .run(setup, args.concurrency, move |h| {
                    rest::client(h, follow, every)
                })
                .await
        }
        (Some(url), None) => {
            let in_flight = args.in_flight as usize;
            harness
                .run(setup, args.concurrency, move |h| {
                    ws::socket(h, url.clone(), in_flight)
                })
                .await
        }
    };

    if args.json {
        eprint!("{summary}");
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{summary}");
    }
    for hint in hints(&summary, &account.id) {
        eprintln!("hint: {hint}");
    }
    Ok(())
}

fn setup(args: &Args) -> Setup {
    let (mode, follow, in_flight) = match args.mode {
        Mode::Rest => {
            let follow = match args.follow {
                Follow::Sse => "sse",
                Follow::Poll => "poll",
                Follow::Wait => "wait",
            };
            ("rest", Some(follow), None)
        }
        Mode::Ws => ("ws", None, Some(args.in_flight)),
    };
    Setup {
        mode,
        follow,
        concurrency: args.concurrency,
        rate: args.rate,
        in_flight,
        rows: args.rows,
        history: args.history,
        horizon: args.horizon,
    }
}

/// What to do about the problems a run hit, where there is something to do.
fn hints(summary: &Summary, account_id: &str) -> Vec<String> {
    let seen = |label: &str| summary.problems.contains_key(label);
    let mut hints = Vec::new();
    if seen("rejected 402 insufficient-funds") {
        hints.push(format!(
            "the account ran out of credit; give it more with \
             `xpand admin deposit {account_id} 1000000000` (micro-credits)"
        ));
    }
    if seen("rejected 402 max-fee-below-quote") {
        hints.push("the jobs cost more than --max-fee; raise it".into());
    }
    if seen("error timed out") {
        hints.push(
            "jobs outlived --job-timeout; are workers connected (`xpand up` starts two)?".into(),
        );
    }
    hints
}
