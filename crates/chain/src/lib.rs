//! The verifiable ledger's cryptography, with no database in sight: the canonical encoding of a
//! sealed entry, Merkle trees and inclusion proofs over entries, block headers, their hashes and
//! signatures, and the proofs that one entry or record is in a signed block ([`proof`]). The
//! gateway uses it to seal and to prove; `xpand verify` (or anyone, with this crate alone) uses
//! it to check what the public API serves, trusting nothing but the gateway's public key.
//!
//! Features: `sqlx` derives `FromRow` for the sealed rows and blocks; `openapi` derives
//! `utoipa::ToSchema` for the types an API document describes.
//!
//! - leaf = sha256(0x00 ‖ canonical entry), inner node = sha256(0x01 ‖ left ‖ right): the prefix
//!   keeps a leaf from passing for an inner node.
//! - An odd node at the end of a level is promoted unchanged to the next level (not paired with
//!   itself), so no two different entry lists share a root.
//! - block hash = sha256(canonical header); the signature is ed25519 over the 32-byte hash.
//! - A leaf is a salted commitment (v2): it hashes a random per-leaf salt with the content, so
//!   the leaf list a block publishes says nothing about whose money moved or what a node was
//!   told, and the owner, given its salt, proves its entry against the root. Leaves sealed
//!   before salts existed (salt `None`) are v1: the hash of the content alone.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

mod proof;

pub use proof::{InclusionProof, RecordProof};

pub type Hash = [u8; 32];

/// `prev_hash` of the first block.
pub const GENESIS_PREV_HASH: Hash = [0; 32];

/// A ledger entry as sealed: with its transaction and account context, so it means something
/// on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
pub struct SealedEntry {
    pub id: i64,
    pub tx_id: i64,
    /// `deposit`, `escrow_hold`, `escrow_release`, `epoch_reward`.
    pub tx_kind: String,
    pub job_id: Option<Uuid>,
    pub epoch: Option<i64>,
    pub ledger_account_id: i64,
    /// The account that owns the ledger account (pseudonymous id).
    pub owner: Uuid,
    /// `available`, `held`, `earnings`, `issuance`, `revenue`.
    pub purpose: String,
    /// Signed micro-credits.
    pub amount: i64,
    pub created_at: DateTime<Utc>,
    /// Hex salt of the leaf's commitment; absent for entries sealed before salting (v1).
    #[serde(default)]
    pub salt: Option<String>,
}

impl SealedEntry {
    /// The exact bytes a leaf commits to.
    pub fn canonical(&self) -> String {
        let version = match &self.salt {
            Some(salt) => format!("xpand-entry-v2|{salt}"),
            None => "xpand-entry-v1".to_string(),
        };
        format!(
            "{version}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
            self.id,
            self.tx_id,
            self.tx_kind,
            self.job_id
                .map_or_else(|| "-".to_string(), |j| j.to_string()),
            self.ledger_account_id,
            self.owner,
            self.purpose,
            self.amount,
            self.created_at.timestamp_micros(),
        )
    }

    pub fn leaf(&self) -> Hash {
        leaf_hash(self.canonical().as_bytes())
    }
}

/// A statement sealed beside the money: a node's capability announce, a shard assignment or a
/// verification challenge, committed to by the sha256 of the signed envelope that travelled
/// over MQTT (the node holds the envelope and can match it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
pub struct SealedRecord {
    pub id: i64,
    /// `capability` (signed by the node), `assignment` or `challenge` (signed by the gateway).
    pub kind: String,
    pub node_id: String,
    /// Hex sha256 of the envelope JSON, byte for byte (v2 records).
    #[serde(default)]
    pub digest: Option<String>,
    /// The envelope itself, only for records sealed before digests (v1).
    #[serde(default)]
    pub envelope: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Hex salt of the leaf's commitment; absent for v1 records.
    #[serde(default)]
    pub salt: Option<String>,
}

impl SealedRecord {
    pub fn canonical(&self) -> String {
        let (id, kind, node, at) = (
            self.id,
            &self.kind,
            &self.node_id,
            self.created_at.timestamp_micros(),
        );
        match &self.salt {
            Some(salt) => format!(
                "xpand-record-v2|{salt}|{id}|{kind}|{node}|{at}|{}",
                self.digest.as_deref().unwrap_or_default()
            ),
            None => format!(
                "xpand-record-v1|{id}|{kind}|{node}|{at}|{}",
                self.envelope.as_deref().unwrap_or_default()
            ),
        }
    }

    pub fn leaf(&self) -> Hash {
        leaf_hash(self.canonical().as_bytes())
    }
}

/// Something sealed in id order under a block's Merkle root.
pub trait Sealed {
    fn id(&self) -> i64;
    fn leaf(&self) -> Hash;
}

impl Sealed for SealedEntry {
    fn id(&self) -> i64 {
        self.id
    }
    fn leaf(&self) -> Hash {
        SealedEntry::leaf(self)
    }
}

impl Sealed for SealedRecord {
    fn id(&self) -> i64 {
        self.id
    }
    fn leaf(&self) -> Hash {
        SealedRecord::leaf(self)
    }
}

/// What a block publishes of its contents: the leaf hashes, in id order. Anyone recomputes the
/// roots from them; the salts keep them from revealing what they commit to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlockLeaves {
    pub height: i64,
    /// Hex leaf hashes of the block's entries.
    pub entries: Vec<String>,
    /// Hex leaf hashes of the block's records.
    pub records: Vec<String>,
}

/// The Merkle root, as hex, of hex leaf hashes; `None` if one is not a hash.
pub fn root_of_hex(leaves: &[String]) -> Option<String> {
    let leaves: Option<Vec<Hash>> = leaves.iter().map(|l| parse_hash(l)).collect();
    Some(hex::encode(merkle_root(&leaves?)))
}

fn leaf_hash(bytes: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(bytes);
    h.finalize().into()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Pairs up one level of the tree; an odd last node moves up unchanged.
fn next_level(level: &[Hash]) -> Vec<Hash> {
    level
        .chunks(2)
        .map(|pair| match pair {
            [l, r] => node_hash(l, r),
            [odd] => *odd,
            _ => unreachable!("chunks(2)"),
        })
        .collect()
}

/// The Merkle root of `leaves` (sha256 of nothing for no leaves; blocks are never empty).
pub fn merkle_root(leaves: &[Hash]) -> Hash {
    if leaves.is_empty() {
        return Sha256::digest([]).into();
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = next_level(&level);
    }
    level[0]
}

/// Which side of the path a sibling hash sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Left,
    Right,
}

/// One step from a leaf towards the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProofStep {
    pub side: Side,
    /// Hex sha256 of the sibling.
    pub hash: String,
}

/// The path from leaf `index` to the root.
pub fn merkle_proof(leaves: &[Hash], mut index: usize) -> Vec<ProofStep> {
    let mut steps = Vec::new();
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        let sibling = index ^ 1;
        if sibling < level.len() {
            steps.push(ProofStep {
                side: if sibling < index {
                    Side::Left
                } else {
                    Side::Right
                },
                hash: hex::encode(level[sibling]),
            });
        }
        level = next_level(&level);
        index /= 2;
    }
    steps
}

/// Folds a proof from `leaf` and compares with `root`.
pub fn verify_proof(leaf: &Hash, steps: &[ProofStep], root: &Hash) -> bool {
    let mut acc = *leaf;
    for step in steps {
        let Some(sibling) = parse_hash(&step.hash) else {
            return false;
        };
        acc = match step.side {
            Side::Left => node_hash(&sibling, &acc),
            Side::Right => node_hash(&acc, &sibling),
        };
    }
    &acc == root
}

pub fn parse_hash(s: &str) -> Option<Hash> {
    hex::decode(s).ok()?.try_into().ok()
}

/// A sealed block as the API serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
pub struct Block {
    pub height: i64,
    /// The block covers every entry with `first_entry_id <= id <= last_entry_id` (ids of
    /// rolled-back transactions are simply absent).
    pub first_entry_id: i64,
    pub last_entry_id: i64,
    pub entry_count: i32,
    /// Hex Merkle root of the covered entries' leaves, in id order.
    pub merkle_root: String,
    /// The block also covers records `first_record_id <= id <= last_record_id`.
    pub first_record_id: i64,
    pub last_record_id: i64,
    pub record_count: i32,
    /// Hex Merkle root of the covered records' leaves, in id order.
    pub records_root: String,
    /// Hex hash of the previous block (64 zeros for the first).
    pub prev_hash: String,
    pub sealed_at: DateTime<Utc>,
    /// Hex sha256 of the canonical header.
    pub block_hash: String,
    /// Base64 ed25519 signature of the block hash by the gateway key.
    pub signature: String,
}

impl Block {
    fn canonical_header(&self) -> String {
        format!(
            "xpand-block-v1|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
            self.height,
            self.first_entry_id,
            self.last_entry_id,
            self.entry_count,
            self.merkle_root,
            self.first_record_id,
            self.last_record_id,
            self.record_count,
            self.records_root,
            self.prev_hash,
            self.sealed_at.timestamp_micros(),
        )
    }

    /// The hash the header fields imply (what `block_hash` must be).
    pub fn computed_hash(&self) -> Hash {
        Sha256::digest(self.canonical_header().as_bytes()).into()
    }

    /// Builds and signs a block over `entries` and `records` (each in id order, starting at
    /// `first.0` and `first.1`).
    pub fn seal(
        height: i64,
        first: (i64, i64),
        entries: &[SealedEntry],
        records: &[SealedRecord],
        prev_hash: &Hash,
        sealed_at: DateTime<Utc>,
        key: &SigningKey,
    ) -> Self {
        let entry_leaves: Vec<Hash> = entries.iter().map(SealedEntry::leaf).collect();
        let record_leaves: Vec<Hash> = records.iter().map(SealedRecord::leaf).collect();
        let mut block = Block {
            height,
            first_entry_id: first.0,
            last_entry_id: entries.last().map_or(first.0 - 1, |e| e.id),
            entry_count: entries.len() as i32,
            merkle_root: hex::encode(merkle_root(&entry_leaves)),
            first_record_id: first.1,
            last_record_id: records.last().map_or(first.1 - 1, |r| r.id),
            record_count: records.len() as i32,
            records_root: hex::encode(merkle_root(&record_leaves)),
            prev_hash: hex::encode(prev_hash),
            // Postgres keeps microseconds; sign exactly what will be read back.
            sealed_at: DateTime::from_timestamp_micros(sealed_at.timestamp_micros())
                .unwrap_or(sealed_at),
            block_hash: String::new(),
            signature: String::new(),
        };
        let hash = block.computed_hash();
        block.block_hash = hex::encode(hash);
        block.signature = B64.encode(key.sign(&hash).to_bytes());
        block
    }

    /// Checks the header hashes to `block_hash` and the gateway signed it.
    pub fn verify_signature(&self, key: &VerifyingKey) -> Result<(), String> {
        let hash = self.computed_hash();
        if hex::encode(hash) != self.block_hash {
            return Err("the header does not hash to block_hash".into());
        }
        let sig = B64
            .decode(&self.signature)
            .ok()
            .and_then(|s| Signature::from_slice(&s).ok())
            .ok_or("the signature is not a base64 ed25519 signature")?;
        key.verify(&hash, &sig)
            .map_err(|_| "the signature does not verify under the gateway key".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("entry {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn every_leaf_proves_against_the_root_for_every_size() {
        for n in 1..=33 {
            let leaves = leaves(n);
            let root = merkle_root(&leaves);
            for (i, leaf) in leaves.iter().enumerate() {
                let proof = merkle_proof(&leaves, i);
                assert!(verify_proof(leaf, &proof, &root), "n={n} i={i}");
                let wrong = leaf_hash(b"not in the tree");
                assert!(!verify_proof(&wrong, &proof, &root));
            }
        }
    }

    #[test]
    fn changing_removing_or_swapping_entries_changes_the_root() {
        let base = leaves(7);
        let root = merkle_root(&base);
        let mut changed = base.clone();
        changed[3] = leaf_hash(b"tampered");
        assert_ne!(merkle_root(&changed), root);
        let mut removed = base.clone();
        removed.remove(6);
        assert_ne!(merkle_root(&removed), root);
        let mut swapped = base.clone();
        swapped.swap(1, 2);
        assert_ne!(merkle_root(&swapped), root);
        // Odd promotion, not duplication: [a,b,c] and [a,b,c,c] differ.
        let three = leaves(3);
        let mut four = three.clone();
        four.push(three[2]);
        assert_ne!(merkle_root(&three), merkle_root(&four));
    }

    #[test]
    fn a_salted_leaf_hides_its_entry_and_v1_leaves_still_hash_as_before() {
        let entry = SealedEntry {
            id: 1,
            tx_id: 1,
            tx_kind: "deposit".into(),
            job_id: None,
            epoch: None,
            ledger_account_id: 2,
            owner: Uuid::nil(),
            purpose: "available".into(),
            amount: 5,
            created_at: DateTime::from_timestamp_micros(1_000_000).unwrap(),
            salt: None,
        };
        // The v1 encoding is frozen: blocks sealed before salting must keep their roots.
        assert_eq!(
            entry.canonical(),
            format!(
                "xpand-entry-v1|1|1|deposit|-|2|{}|available|5|1000000",
                Uuid::nil()
            )
        );
        let salted = |salt: &str| SealedEntry {
            salt: Some(salt.into()),
            ..entry.clone()
        };
        assert_ne!(salted("aa").leaf(), salted("bb").leaf());
        assert_ne!(salted("aa").leaf(), entry.leaf());
        let record = SealedRecord {
            id: 3,
            kind: "assignment".into(),
            node_id: "n".into(),
            digest: Some("d".into()),
            envelope: None,
            created_at: entry.created_at,
            salt: Some("s".into()),
        };
        assert_eq!(
            record.canonical(),
            "xpand-record-v2|s|3|assignment|n|1000000|d"
        );
    }

    #[test]
    fn blocks_sign_their_header() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let entry = SealedEntry {
            id: 5,
            tx_id: 2,
            tx_kind: "deposit".into(),
            job_id: None,
            epoch: None,
            ledger_account_id: 3,
            owner: Uuid::nil(),
            purpose: "available".into(),
            amount: 100,
            created_at: Utc::now(),
            salt: Some("5a17".into()),
        };
        let block = Block::seal(
            1,
            (1, 1),
            &[entry],
            &[],
            &GENESIS_PREV_HASH,
            Utc::now(),
            &key,
        );
        assert_eq!((block.last_entry_id, block.last_record_id), (5, 0));
        block.verify_signature(&key.verifying_key()).unwrap();
        let mut forged = block.clone();
        forged.merkle_root = hex::encode([9u8; 32]);
        assert!(forged.verify_signature(&key.verifying_key()).is_err());
        let mut forged = block.clone();
        forged.record_count = 1;
        assert!(forged.verify_signature(&key.verifying_key()).is_err());
        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(block.verify_signature(&other.verifying_key()).is_err());
    }

    /// Hashes computed once outside this crate (Python's hashlib and `cryptography`, from the
    /// encoding the module doc states) and frozen here: a change to the encoding of a leaf, the
    /// tree, a header or a signature fails this test instead of passing every round trip.
    /// Sealed blocks must keep verifying, so these never change.
    #[test]
    fn known_vectors_pin_leaves_roots_and_block_signatures() {
        let at = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678901Z")
            .unwrap()
            .with_timezone(&Utc);
        let v1 = SealedEntry {
            id: 1,
            tx_id: 1,
            tx_kind: "deposit".into(),
            job_id: None,
            epoch: None,
            ledger_account_id: 2,
            owner: Uuid::nil(),
            purpose: "available".into(),
            amount: 5,
            created_at: DateTime::from_timestamp_micros(1_000_000).unwrap(),
            salt: None,
        };
        let v2 = SealedEntry {
            id: 2,
            tx_id: 7,
            tx_kind: "escrow_release".into(),
            job_id: Some("6f1c2b9a-0d3e-4c5f-8a7b-1e2d3c4b5a69".parse().unwrap()),
            epoch: Some(3),
            ledger_account_id: 9,
            owner: "0d9e8f7a-6b5c-4d3e-9f2a-1b0c9d8e7f6a".parse().unwrap(),
            purpose: "earnings".into(),
            amount: -1250,
            created_at: at,
            salt: Some("5a17".into()),
        };
        let r1 = SealedRecord {
            id: 3,
            kind: "capability".into(),
            node_id: "node-a".into(),
            digest: None,
            envelope: Some(r#"{"v":1}"#.into()),
            created_at: DateTime::from_timestamp_micros(1_000_000).unwrap(),
            salt: None,
        };
        let r2 = SealedRecord {
            id: 4,
            kind: "assignment".into(),
            node_id: "node-b".into(),
            digest: Some("ab".repeat(32)),
            envelope: None,
            created_at: at,
            salt: Some("c0ffee".into()),
        };
        let leaves = [v1.leaf(), v2.leaf(), r1.leaf(), r2.leaf()].map(hex::encode);
        assert_eq!(
            leaves,
            [
                "a7fc96a899eade2cbdb1510ae41bb77e4436356623caa62884bb3838cc772ea0",
                "95d5bb77b3983c387b817048a5603ba67f0b936cba608ae26b76e2dadd4baf95",
                "3a9221b75256bcd2772ee5fa378e2b3a72da3bfc7014d60699a24cf82f4f3059",
                "68c2d31f07d8ba50a42f874fb50bf3b00a0bd2ab34da83e4251a6f081146495a",
            ]
        );
        // Five leaves: the fifth is promoted twice, unpaired.
        let mut five = leaves.to_vec();
        five.push(hex::encode(leaf_hash(b"x")));
        assert_eq!(
            root_of_hex(&five).unwrap(),
            "9b071af420a9161080e3145a8812d0f25f352065df9b95ff8c978bfa1908a735"
        );
        assert_eq!(
            hex::encode(merkle_root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );

        let key = SigningKey::from_bytes(&[7; 32]);
        let block = Block::seal(2, (1, 3), &[v1, v2], &[r1, r2], &[0xab; 32], at, &key);
        assert_eq!(
            (block.merkle_root.as_str(), block.records_root.as_str()),
            (
                "fb6b42fa8ba04797b8c2fcddf5d78a6d0958d8ad9fb677dda6b9f61f4f6702f1",
                "f39cae4c2549abe53f7c086b0aaf086f4bc5cf061d07b0a488dc4def6850f4e4"
            )
        );
        assert_eq!(
            block.block_hash,
            "2b89e52ce2abb86d34bdd9daac474288945b4ca19d755e98575b692c6692fa8c"
        );
        assert_eq!(
            block.signature,
            "sTstyalZuUuWyrpnArbMLsGt0MpGDtQ6TOc/tplw6lO6JrR6AADcol2Q+Qg1YGOBeMCkfi6irfPptv1/02rTCQ=="
        );
        block.verify_signature(&key.verifying_key()).unwrap();
    }
}
