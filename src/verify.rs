//! `xpand verify`: checks the whole ledger through the public API alone — block signatures
//! under the gateway key, the hash links between blocks, that block ranges follow each other,
//! and every block's Merkle roots against the entries and records the API serves for it — and checks
//! inclusion proofs for chosen entries. Any rewrite of sealed history fails, naming the block
//! (or entry) where it shows.

use ed25519_dalek::VerifyingKey;
use serde::de::DeserializeOwned;

use crate::http::ledger::{BlockPage, PublicKey};
use crate::ledger::blocks::InclusionProof;
use crate::ledger::chain::{self, Hash, Sealed, SealedEntry, SealedRecord, GENESIS_PREV_HASH};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("block {height}: {reason}")]
    Block { height: i64, reason: String },
    #[error("entry {id}: {reason}")]
    Entry { id: i64, reason: String },
    #[error("gateway key: {0}")]
    Key(String),
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub public_key: String,
    pub blocks: usize,
    pub entries: usize,
    /// Capability statements and assignments sealed beside the entries.
    pub records: usize,
}

/// Reads the public API of the gateway at `base`.
pub struct Verifier {
    base: String,
    http: reqwest::Client,
    key: VerifyingKey,
    public_key: String,
}

impl Verifier {
    /// Fetches the gateway's key; with `pinned`, refuses a server that presents another one.
    pub async fn connect(base: &str, pinned: Option<&str>) -> Result<Self, VerifyError> {
        let http = reqwest::Client::new();
        let base = base.trim_end_matches('/').to_string();
        let served: PublicKey = fetch(&http, &format!("{base}/v1/ledger/public-key")).await?;
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
        })
    }

    /// Walks every block from the first.
    pub async fn verify_chain(&self) -> Result<Report, VerifyError> {
        let (mut prev_hash, mut prev_height) = (GENESIS_PREV_HASH, 0i64);
        let (mut next_entry, mut next_record) = (1i64, 1i64);
        let mut report = Report {
            public_key: self.public_key.clone(),
            blocks: 0,
            entries: 0,
            records: 0,
        };
        loop {
            let page: BlockPage = fetch(
                &self.http,
                &format!(
                    "{}/v1/ledger/blocks?after={prev_height}&limit=1000",
                    self.base
                ),
            )
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
                let entries: Vec<SealedEntry> = fetch(
                    &self.http,
                    &format!("{}/v1/ledger/blocks/{height}/entries", self.base),
                )
                .await?;
                let entry_range = Range {
                    what: ("entry", "entries", "Merkle root"),
                    first: block.first_entry_id,
                    last: block.last_entry_id,
                    count: block.entry_count,
                    root: &block.merkle_root,
                };
                check_sealed(entry_range, &entries).map_err(fail)?;
                let records: Vec<SealedRecord> = fetch(
                    &self.http,
                    &format!("{}/v1/ledger/blocks/{height}/records", self.base),
                )
                .await?;
                let record_range = Range {
                    what: ("record", "records", "records root"),
                    first: block.first_record_id,
                    last: block.last_record_id,
                    count: block.record_count,
                    root: &block.records_root,
                };
                check_sealed(record_range, &records).map_err(fail)?;
                report.blocks += 1;
                report.entries += entries.len();
                report.records += records.len();
                prev_hash = chain::parse_hash(&block.block_hash).expect("verified hash");
                prev_height = height;
                next_entry = block.last_entry_id + 1;
                next_record = block.last_record_id + 1;
            }
            if page.next_after.is_none() {
                return Ok(report);
            }
        }
    }

    /// Checks the inclusion proof the API serves for entry `id`.
    pub async fn verify_entry(&self, id: i64) -> Result<InclusionProof, VerifyError> {
        let proof: InclusionProof = fetch(
            &self.http,
            &format!("{}/v1/ledger/entries/{id}/proof", self.base),
        )
        .await?;
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
}

/// What a block says it covers of one kind of sealed item.
struct Range<'a> {
    /// e.g. `entry`, `entries`, `Merkle root`
    what: (&'a str, &'a str, &'a str),
    first: i64,
    last: i64,
    count: i32,
    root: &'a str,
}

/// The served items must be in range, in order, as many as sealed, and hash to the root.
fn check_sealed<T: Sealed>(range: Range, items: &[T]) -> Result<(), String> {
    let Range {
        what: (one, many, root_name),
        first,
        last,
        count,
        root,
    } = range;
    let mut previous = first - 1;
    for item in items {
        if item.id() <= previous || item.id() > last {
            return Err(format!(
                "{one} {} is out of order or out of range",
                item.id()
            ));
        }
        previous = item.id();
    }
    if items.len() != count as usize {
        return Err(format!(
            "{} {many} are served for {many} {first}..={last}, but {count} were sealed",
            items.len()
        ));
    }
    let leaves: Vec<Hash> = items.iter().map(Sealed::leaf).collect();
    if hex::encode(chain::merkle_root(&leaves)) != root {
        return Err(format!(
            "{many} {first}..={last} as served do not match the sealed {root_name}: one was changed"
        ));
    }
    Ok(())
}

async fn fetch<T: DeserializeOwned>(http: &reqwest::Client, url: &str) -> Result<T, VerifyError> {
    let fail = |reason: String| VerifyError::Fetch {
        url: url.to_string(),
        reason,
    };
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    resp.json().await.map_err(|e| fail(e.to_string()))
}
