//! `xpand account` and `xpand account ledger`: what the account holds and how its money moved.
//! A command of its own because it reads money, not jobs: balances in integer micro-credits as
//! the API gives them (available to spend, held in escrow for unfinished jobs), and the
//! account's ledger entries, newest first, over as many pages as `--limit` asks for.

use reqwest::Method;
use serde_json::{json, Value};

use super::{cell, print_table, short_time, CliResult, Client, Common};

#[derive(clap::Args, Debug)]
#[command(after_help = super::EXIT_CODES_HELP)]
pub struct AccountArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Option<AccountCommand>,
}

#[derive(clap::Subcommand, Debug)]
pub enum AccountCommand {
    /// Your ledger entries, newest first (amounts in micro-credits).
    Ledger {
        /// The most entries to list (pages are fetched as needed).
        #[arg(long, short = 'L', default_value_t = 50)]
        limit: usize,
    },
}

pub async fn run(args: AccountArgs) -> CliResult<()> {
    let client = Client::new(&args.common)?;
    match args.command {
        None => {
            let account = client.get("/v1/account").await?;
            if client.json {
                client.print_json(&account);
            } else {
                outln!("account    {}", cell(&account, "id"));
                outln!("available  {} micro-credits", cell(&account, "available"));
                outln!(
                    "held       {} micro-credits (escrowed for unfinished jobs)",
                    cell(&account, "held")
                );
            }
            Ok(())
        }
        Some(AccountCommand::Ledger { limit }) => ledger(&client, limit).await,
    }
}

async fn ledger(client: &Client, limit: usize) -> CliResult<()> {
    let mut entries: Vec<Value> = Vec::new();
    let mut cursor: Option<i64> = None;
    while entries.len() < limit {
        let mut query = vec![("limit", (limit - entries.len()).min(200).to_string())];
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor.to_string()));
        }
        let page = client
            .json(
                client
                    .request(Method::GET, "/v1/account/ledger")
                    .query(&query),
            )
            .await?;
        entries.extend(page["entries"].as_array().cloned().unwrap_or_default());
        cursor = page["next_cursor"].as_i64();
        if cursor.is_none() {
            break;
        }
    }
    entries.truncate(limit);
    if client.json {
        client.print_json(&json!({ "entries": entries, "next_cursor": cursor }));
        return Ok(());
    }
    if entries.is_empty() {
        eprintln!("no ledger entries");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                cell(e, "id"),
                short_time(e, "created_at"),
                cell(e, "kind"),
                cell(e, "purpose"),
                cell(e, "amount"),
                cell(e, "job_id"),
                cell(e, "memo"),
            ]
        })
        .collect();
    print_table(
        &["ID", "TIME", "KIND", "PURPOSE", "AMOUNT", "JOB", "MEMO"],
        &rows,
    );
    if cursor.is_some() {
        eprintln!("more entries: raise --limit to see them");
    }
    Ok(())
}
