//! `xpand verify`: checks the ledger through the gateway's API, in one of three modes, each
//! trusting nothing but the gateway's public key:
//!
//! - **public** (no credential): block signatures, the hash links between blocks, that block
//!   ranges follow each other, and every block's two Merkle roots against the leaf commitments
//!   served for it. Any rewrite of sealed history fails, naming the block where it shows.
//! - **account** (an API key): the public checks, then an inclusion proof for every sealed
//!   entry of the account against a verified block, and that the account's balances equal the
//!   sum of its entries.
//! - **auditor** (the auditor key): the public checks with every leaf recomputed from the
//!   entries and records themselves, then that every ledger account's balance equals its
//!   entries, and that all balances sum to zero.

use std::collections::{HashMap, HashSet};

use ed25519_dalek::VerifyingKey;
use serde::de::DeserializeOwned;

use crate::http::account::{Account, LedgerPage};
use crate::http::ledger::{BlockPage, PublicKey};
use crate::ledger::blocks::AuditSnapshot;
use xpand_chain::{
    self as chain, Block, BlockLeaves, InclusionProof, Sealed, SealedEntry, SealedRecord,
    GENESIS_PREV_HASH,
};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("block {height}: {reason}")]
    Block { height: i64, reason: String },
    #[error("entry {id}: {reason}")]
    Entry { id: i64, reason: String },
    #[error("balances: {0}")]
    Balance(String),
    #[error("gateway key: {0}")]
    Key(String),
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
}

/// Who is verifying, and so how much of the ledger it may read.
#[derive(Debug, Clone)]
pub enum Credential {
    Public,
    /// An API key or token with `account:read`.
    Account(String),
    /// The operator's auditor key.
    Auditor(String),
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    pub public_key: String,
    pub blocks: usize,
    pub entries: usize,
    /// Capability statements, assignments and challenges sealed beside the entries.
    pub records: usize,
    /// Account mode: own entries proven against a verified block, and those not sealed yet.
    pub own_proven: usize,
    pub own_unsealed: usize,
    /// Account and auditor modes: ledger accounts whose balance matched their entries.
    pub balances_checked: usize,
}

impl Report {
    /// What was checked, in words, one line per check.
    pub fn lines(&self, credential: &Credential) -> Vec<String> {
        let mut lines = vec![format!(
            "{} blocks: signed by {}, hash-linked, contiguous",
            self.blocks, self.public_key
        )];
        match credential {
            Credential::Auditor(_) => {
                lines.push(format!(
                    "{} entries and {} records: every leaf recomputed from its content and salt",
                    self.entries, self.records
                ));
                lines.push(format!(
                    "{} ledger accounts: balance = sum of entries; all balances sum to 0",
                    self.balances_checked
                ));
            }
            _ => lines.push(format!(
                "{} entry leaves and {} record leaves: match their blocks' roots",
                self.entries, self.records
            )),
        }
        if let Credential::Account(_) = credential {
            lines.push(format!(
                "your entries: {} proven in verified blocks, {} not sealed yet",
                self.own_proven, self.own_unsealed
            ));
            lines.push("your balances: available and held = sum of your entries".into());
        }
        lines
    }
}

/// Reads the API of the gateway at `base`.
pub struct Verifier {
    base: String,
    http: reqwest::Client,
    key: VerifyingKey,
    public_key: String,
    credential: Credential,
}

impl Verifier {
    /// Fetches the gateway's key; with `pinned`, refuses a server that presents another one.
    pub async fn connect(
        base: &str,
        pinned: Option<&str>,
        credential: Credential,
    ) -> Result<Self, VerifyError> {
        let base = base.trim_end_matches('/').to_string();
        let http = reqwest::Client::new();
        let url = format!("{base}/v1/ledger/public-key");
        let resp = http
            .get(&url)
            .send()
            .await
            .map_err(|e| VerifyError::Fetch {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let served: PublicKey = decode(&url, resp).await?;
        if let Some(pinned) = pinned {
            if !pinned.eq_ignore_ascii_case(&served.public_key) {
                return Err(VerifyError::Key(format!(
                    "the server presents {}, not the pinned {pinned}",
                    served.public_key
                )));
            }
        }
        let key = xpand_protocol::parse_node_id(&served.public_key)
            .map_err(|e| VerifyError::Key(e.to_string()))?;
        Ok(Self {
            base,
            http,
            key,
            public_key: served.public_key,
            credential,
        })
    }

    /// Runs every check this verifier's credential allows.
    pub async fn verify(&self) -> Result<Report, VerifyError> {
        // The auditor's snapshot is taken first: the chain walked afterwards covers at least
        // the entries it counts as sealed.
        let snapshot = match &self.credential {
            Credential::Auditor(_) => Some(self.fetch::<AuditSnapshot>("/v1/ledger/audit").await?),
            _ => None,
        };
        let mut walk = Walk {
            sealed_through: snapshot.as_ref().map_or(0, |s| s.sealed_through),
            ..Walk::default()
        };
        self.verify_chain(&mut walk).await?;
        let mut report = walk.report;
        report.public_key = self.public_key.clone();
        if let Some(snapshot) = snapshot {
            report.balances_checked = check_audit(&snapshot, &walk.sums)?;
        }
        if let Credential::Account(_) = self.credential {
            self.verify_own_entries(&walk.block_hashes, &mut report)
                .await?;
        }
        Ok(report)
    }

    async fn verify_chain(&self, walk: &mut Walk) -> Result<(), VerifyError> {
        let (mut prev_hash, mut prev_height) = (GENESIS_PREV_HASH, 0i64);
        let (mut next_entry, mut next_record) = (1i64, 1i64);
        loop {
            let page: BlockPage = self
                .fetch(&format!("/v1/ledger/blocks?after={prev_height}&limit=1000"))
                .await?;
            for block in &page.blocks {
                let height = block.height;
                let fail = |reason: String| VerifyError::Block { height, reason };
                if height != prev_height + 1 {
                    return Err(fail(format!("follows block {prev_height}")));
                }
                block.verify_signature(&self.key).map_err(fail)?;
                if block.prev_hash != hex::encode(prev_hash) {
                    return Err(fail(format!("does not link to block {prev_height}'s hash")));
                }
                if block.first_entry_id != next_entry || block.first_record_id != next_record {
                    return Err(fail(format!(
                        "starts at entry {} and record {}, but block {prev_height} ended at {} and {}",
                        block.first_entry_id,
                        block.first_record_id,
                        next_entry - 1,
                        next_record - 1
                    )));
                }
                self.verify_contents(block, walk).await.map_err(fail)?;
                walk.report.blocks += 1;
                walk.block_hashes.insert(block.block_hash.clone());
                prev_hash = chain::parse_hash(&block.block_hash).expect("verified hash");
                prev_height = height;
                next_entry = block.last_entry_id + 1;
                next_record = block.last_record_id + 1;
            }
            if page.next_after.is_none() {
                return Ok(());
            }
        }
    }

    /// Checks a block's roots: from its leaves, or (auditor) from the items themselves.
    async fn verify_contents(&self, block: &Block, walk: &mut Walk) -> Result<(), String> {
        let height = block.height;
        let (entry_leaves, record_leaves) = if let Credential::Auditor(_) = self.credential {
            let entries: Vec<SealedEntry> = self
                .fetch(&format!("/v1/ledger/blocks/{height}/entries"))
                .await
                .map_err(|e| e.to_string())?;
            let records: Vec<SealedRecord> = self
                .fetch(&format!("/v1/ledger/blocks/{height}/records"))
                .await
                .map_err(|e| e.to_string())?;
            in_range("entry", &entries, block.first_entry_id, block.last_entry_id)?;
            in_range(
                "record",
                &records,
                block.first_record_id,
                block.last_record_id,
            )?;
            for e in entries.iter().filter(|e| e.id <= walk.sealed_through) {
                *walk.sums.entry(e.ledger_account_id).or_default() += e.amount;
            }
            (hex_leaves(&entries), hex_leaves(&records))
        } else {
            let leaves: BlockLeaves = self
                .fetch(&format!("/v1/ledger/blocks/{height}/leaves"))
                .await
                .map_err(|e| e.to_string())?;
            (leaves.entries, leaves.records)
        };
        check_root(
            ("entries", "Merkle root"),
            &entry_leaves,
            block.entry_count,
            &block.merkle_root,
        )?;
        check_root(
            ("records", "records root"),
            &record_leaves,
            block.record_count,
            &block.records_root,
        )?;
        walk.report.entries += entry_leaves.len();
        walk.report.records += record_leaves.len();
        Ok(())
    }

    /// Account mode: proves every sealed entry of the account and checks its balances. The
    /// balances are read before and after the entries and must not move in between.
    async fn verify_own_entries(
        &self,
        verified_blocks: &HashSet<String>,
        report: &mut Report,
    ) -> Result<(), VerifyError> {
        for _attempt in 0..5 {
            let before: Account = self.fetch("/v1/account").await?;
            let entries = self.own_entries().await?;
            let after: Account = self.fetch("/v1/account").await?;
            if (before.available, before.held) != (after.available, after.held) {
                continue;
            }
            let sum = |purpose: &str| -> i64 {
                entries
                    .iter()
                    .filter(|e| e.purpose == purpose)
                    .map(|e| e.amount)
                    .sum()
            };
            if (sum("available"), sum("held")) != (after.available, after.held) {
                return Err(VerifyError::Balance(format!(
                    "the account holds available {} and held {}, but its entries sum to {} and {}",
                    after.available,
                    after.held,
                    sum("available"),
                    sum("held")
                )));
            }
            report.balances_checked = 2;
            for entry in &entries {
                match self.fetch_proof(entry.id).await? {
                    Some(proof) => {
                        let fail = |reason: String| VerifyError::Entry {
                            id: entry.id,
                            reason,
                        };
                        proof.verify(&self.key).map_err(fail)?;
                        if !verified_blocks.contains(&proof.block.block_hash) {
                            return Err(fail(format!(
                                "proves against block {}, which is not in the verified chain",
                                proof.block.height
                            )));
                        }
                        if proof.entry.amount != entry.amount || proof.entry.id != entry.id {
                            return Err(fail("the proof is of a different entry".into()));
                        }
                        report.own_proven += 1;
                    }
                    None => report.own_unsealed += 1,
                }
            }
            return Ok(());
        }
        Err(VerifyError::Balance(
            "the balances kept moving while the entries were read; retry when the account is idle"
                .into(),
        ))
    }

    async fn own_entries(&self) -> Result<Vec<crate::ledger::LedgerEntry>, VerifyError> {
        let mut all = Vec::new();
        let mut cursor: Option<i64> = None;
        loop {
            let path = match cursor {
                Some(c) => format!("/v1/account/ledger?limit=200&cursor={c}"),
                None => "/v1/account/ledger?limit=200".to_string(),
            };
            let page: LedgerPage = self.fetch(&path).await?;
            all.extend(page.entries);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(all),
            }
        }
    }

    /// The served inclusion proof for entry `id`, or `None` while it is not sealed.
    async fn fetch_proof(&self, id: i64) -> Result<Option<InclusionProof>, VerifyError> {
        let url = format!("{}/v1/ledger/entries/{id}/proof", self.base);
        let resp = self.request(&url).await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        decode(&url, resp).await.map(Some)
    }

    /// Checks the inclusion proof the API serves for entry `id` (the caller's own, or any for
    /// the auditor).
    pub async fn verify_entry(&self, id: i64) -> Result<InclusionProof, VerifyError> {
        let proof = self
            .fetch_proof(id)
            .await?
            .ok_or_else(|| VerifyError::Entry {
                id,
                reason: "no sealed entry of yours has this id".into(),
            })?;
        if proof.entry.id != id {
            return Err(VerifyError::Entry {
                id,
                reason: format!("the server proved entry {} instead", proof.entry.id),
            });
        }
        proof
            .verify(&self.key)
            .map_err(|reason| VerifyError::Entry { id, reason })?;
        Ok(proof)
    }

    /// GETs `url` with the credential. Proving an account's entries takes a request per entry,
    /// more than the gateway's rate limit allows in a second: a 429 is waited out for its
    /// `Retry-After` and the request made again, so verification paces itself to the limit.
    async fn request(&self, url: &str) -> Result<reqwest::Response, VerifyError> {
        let mut waited = 0;
        loop {
            let mut request = self.http.get(url);
            match &self.credential {
                Credential::Public => {}
                Credential::Account(key) | Credential::Auditor(key) => {
                    request = request.bearer_auth(key);
                }
            }
            let resp = request.send().await.map_err(|e| VerifyError::Fetch {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
            if resp.status() != reqwest::StatusCode::TOO_MANY_REQUESTS || waited == MAX_WAITS {
                return Ok(resp);
            }
            waited += 1;
            tokio::time::sleep(retry_after(&resp)).await;
        }
    }

    async fn fetch<T: DeserializeOwned>(&self, path: &str) -> Result<T, VerifyError> {
        let url = format!("{}{path}", self.base);
        let resp = self.request(&url).await?;
        decode(&url, resp).await
    }
}

/// How many times one request waits out a 429 before its answer counts as a failure.
const MAX_WAITS: u32 = 30;

/// How long a 429 asks to wait (`Retry-After` in seconds, 1 when absent or unreadable, a
/// minute at most).
fn retry_after(resp: &reqwest::Response) -> std::time::Duration {
    let seconds = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .unwrap_or(1);
    std::time::Duration::from_secs(seconds.clamp(1, 60))
}

/// What walking the chain gathered.
#[derive(Default)]
struct Walk {
    report: Report,
    block_hashes: HashSet<String>,
    /// Auditor mode: the sum per ledger account of the entries sealed when the snapshot was
    /// taken (ids up to `sealed_through`).
    sums: HashMap<i64, i64>,
    sealed_through: i64,
}

async fn decode<T: DeserializeOwned>(url: &str, resp: reqwest::Response) -> Result<T, VerifyError> {
    let fail = |reason: String| VerifyError::Fetch {
        url: url.to_string(),
        reason,
    };
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    resp.json().await.map_err(|e| fail(e.to_string()))
}

fn hex_leaves<T: Sealed>(items: &[T]) -> Vec<String> {
    items.iter().map(|i| hex::encode(i.leaf())).collect()
}

/// The served items must be in id order and within the block's range.
fn in_range<T: Sealed>(what: &str, items: &[T], first: i64, last: i64) -> Result<(), String> {
    let mut previous = first - 1;
    for item in items {
        if item.id() <= previous || item.id() > last {
            return Err(format!(
                "{what} {} is out of order or out of range",
                item.id()
            ));
        }
        previous = item.id();
    }
    Ok(())
}

/// As many leaves as sealed, hashing to the root.
fn check_root(
    (many, root_name): (&str, &str),
    leaves: &[String],
    count: i32,
    root: &str,
) -> Result<(), String> {
    if leaves.len() != count as usize {
        return Err(format!(
            "{} {many} are served, but {count} were sealed",
            leaves.len()
        ));
    }
    if chain::root_of_hex(leaves).as_deref() != Some(root) {
        return Err(format!(
            "the {many} as served do not match the sealed {root_name}: one was changed"
        ));
    }
    Ok(())
}

/// Every balance must be its verified sealed entries plus its unsealed ones; all sum to zero.
fn check_audit(snapshot: &AuditSnapshot, sealed: &HashMap<i64, i64>) -> Result<usize, VerifyError> {
    let mut total = 0i64;
    for account in &snapshot.accounts {
        let sealed_sum = sealed.get(&account.ledger_account_id).copied().unwrap_or(0);
        if sealed_sum + account.unsealed != account.balance {
            return Err(VerifyError::Balance(format!(
                "ledger account {} ({} of {}) holds {}, but its sealed entries sum to {} and its unsealed ones to {}",
                account.ledger_account_id,
                account.purpose,
                account.owner,
                account.balance,
                sealed_sum,
                account.unsealed
            )));
        }
        total += account.balance;
    }
    if total != 0 {
        return Err(VerifyError::Balance(format!(
            "all balances sum to {total}, not 0"
        )));
    }
    Ok(snapshot.accounts.len())
}
