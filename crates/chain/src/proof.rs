//! Proofs that one sealed entry (or record) is in the ledger: the item with its salt, its
//! path to the block's Merkle root, and the signed block. Checking one needs only the
//! gateway's public key.

use serde::{Deserialize, Serialize};

use crate::{Block, ProofStep, Sealed, SealedEntry, SealedRecord};

/// Everything needed to check that one entry is in the ledger, given only the gateway's key:
/// the entry with its salt, the path to its block's Merkle root, and the signed block.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InclusionProof {
    pub entry: SealedEntry,
    /// Leaf position in the block, in id order.
    pub index: usize,
    pub path: Vec<ProofStep>,
    pub block: Block,
}

impl InclusionProof {
    /// Checks the path leads from the entry to the block's root, and the block's signature.
    pub fn verify(&self, key: &ed25519_dalek::VerifyingKey) -> Result<(), String> {
        let range = self.block.first_entry_id..=self.block.last_entry_id;
        verify_inclusion(
            &self.entry,
            &range,
            &self.path,
            &self.block.merkle_root,
            &self.block,
            key,
        )
    }
}

/// The same for a record: what a node operator checks its assignments against.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecordProof {
    pub record: SealedRecord,
    pub index: usize,
    pub path: Vec<ProofStep>,
    pub block: Block,
}

impl RecordProof {
    pub fn verify(&self, key: &ed25519_dalek::VerifyingKey) -> Result<(), String> {
        let range = self.block.first_record_id..=self.block.last_record_id;
        verify_inclusion(
            &self.record,
            &range,
            &self.path,
            &self.block.records_root,
            &self.block,
            key,
        )
    }
}

fn verify_inclusion(
    item: &dyn Sealed,
    range: &std::ops::RangeInclusive<i64>,
    path: &[ProofStep],
    root: &str,
    block: &Block,
    key: &ed25519_dalek::VerifyingKey,
) -> Result<(), String> {
    block.verify_signature(key)?;
    let root = crate::parse_hash(root).ok_or("the block's root is not a hash")?;
    if !range.contains(&item.id()) {
        return Err(format!(
            "{} is outside block {}'s range",
            item.id(),
            block.height
        ));
    }
    if crate::verify_proof(&item.leaf(), path, &root) {
        Ok(())
    } else {
        Err(format!(
            "{} does not prove against block {}'s root",
            item.id(),
            block.height
        ))
    }
}
