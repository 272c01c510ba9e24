//! Admission of incoming assignments: who may send them, to whom, and only once.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use uuid::Uuid;
use xpand_protocol::{AnnounceRequest, Assignment, Envelope, EnvelopeError, Stop};

/// How far an assignment's timestamp may be from our clock. Nonces are remembered this long: an
/// older replay already fails the staleness check.
pub const MAX_SKEW_MS: i64 = 60_000;

/// Why an incoming message was dropped without an answer.
#[derive(Debug, thiserror::Error)]
pub enum Dropped {
    #[error("envelope does not verify: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("signed by {0}, not the gateway")]
    NotGateway(String),
    #[error("nonce already seen (replay)")]
    Replay,
    #[error("body is not an assignment: {0}")]
    Malformed(String),
    #[error("addressed to node {0}")]
    OtherNode(String),
    #[error("lease expired {0} ms ago")]
    LeaseExpired(i64),
}

impl Dropped {
    fn label(&self) -> &'static str {
        match self {
            Dropped::Envelope(_) => "envelope",
            Dropped::NotGateway(_) => "not_gateway",
            Dropped::Replay => "replay",
            Dropped::Malformed(_) => "malformed",
            Dropped::OtherNode(_) => "other_node",
            Dropped::LeaseExpired(_) => "lease_expired",
        }
    }
}

/// What a genuine message for this node asks for.
#[derive(Debug)]
pub enum Admitted {
    Run(Box<Assignment>),
    /// A well-addressed assignment whose task this worker cannot parse (a newer kind, say): it
    /// gets a rejection so the gateway can place it elsewhere.
    Unsupported {
        assignment_id: Uuid,
        shard_id: Uuid,
        reason: String,
    },
}

/// The fields needed to answer an assignment whose task did not parse.
#[derive(Deserialize)]
struct AssignmentHeader {
    assignment_id: Uuid,
    shard_id: Uuid,
    node: String,
}

pub struct AssignmentGate {
    node_id: String,
    gateway_key: String,
    /// Nonce → envelope timestamp, for replay detection within the skew window.
    seen_nonces: HashMap<String, i64>,
    dropped: BTreeMap<&'static str, u64>,
}

impl AssignmentGate {
    pub fn new(node_id: &str, gateway_key: &str) -> Self {
        Self {
            node_id: node_id.to_ascii_lowercase(),
            gateway_key: gateway_key.to_ascii_lowercase(),
            seen_nonces: HashMap::new(),
            dropped: BTreeMap::new(),
        }
    }

    /// Checks a payload received on the assignment `topic`; counts what it drops.
    pub fn admit(&mut self, topic: &str, payload: &[u8], now_ms: i64) -> Result<Admitted, Dropped> {
        let result = self.check(topic, payload, now_ms);
        if let Err(dropped) = &result {
            *self.dropped.entry(dropped.label()).or_default() += 1;
        }
        result
    }

    /// Drops so far, by reason.
    pub fn dropped(&self) -> &BTreeMap<&'static str, u64> {
        &self.dropped
    }

    /// Checks a payload received on the stop `topic`: signed by the gateway, fresh, new and
    /// addressed to this node.
    pub fn admit_stop(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<Stop, Dropped> {
        self.admit_addressed(topic, payload, now_ms, |stop: &Stop| &stop.node)
    }

    /// Checks a request to announce again, as [`AssignmentGate::admit_stop`] checks a stop.
    pub fn admit_announce_request(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<AnnounceRequest, Dropped> {
        self.admit_addressed(topic, payload, now_ms, |r: &AnnounceRequest| &r.node)
    }

    /// Opens a gateway message of type `T` and checks it names this node; counts what it drops.
    fn admit_addressed<T: serde::de::DeserializeOwned>(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: i64,
        addressee: impl Fn(&T) -> &str,
    ) -> Result<T, Dropped> {
        let result = self.open(topic, payload, now_ms).and_then(|opened| {
            let body: T = opened
                .parse()
                .map_err(|e| Dropped::Malformed(e.to_string()))?;
            self.check_addressee(addressee(&body))?;
            Ok(body)
        });
        if let Err(dropped) = &result {
            *self.dropped.entry(dropped.label()).or_default() += 1;
        }
        result
    }

    /// Opens an envelope from the gateway, refusing other signers, stale messages and replays.
    fn open(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<xpand_protocol::OpenedEnvelope, Dropped> {
        let opened = Envelope::open(payload, topic, now_ms, MAX_SKEW_MS)?;
        if opened.signer != self.gateway_key {
            return Err(Dropped::NotGateway(opened.signer));
        }
        self.seen_nonces.retain(|_, ts| *ts >= now_ms - MAX_SKEW_MS);
        if self
            .seen_nonces
            .insert(opened.nonce.clone(), opened.ts)
            .is_some()
        {
            return Err(Dropped::Replay);
        }
        Ok(opened)
    }

    fn check(&mut self, topic: &str, payload: &[u8], now_ms: i64) -> Result<Admitted, Dropped> {
        let opened = self.open(topic, payload, now_ms)?;
        let assignment: Assignment = match opened.parse() {
            Ok(assignment) => assignment,
            Err(error) => {
                let header: AssignmentHeader = opened
                    .parse()
                    .map_err(|e| Dropped::Malformed(e.to_string()))?;
                self.check_addressee(&header.node)?;
                return Ok(Admitted::Unsupported {
                    assignment_id: header.assignment_id,
                    shard_id: header.shard_id,
                    reason: format!("unsupported assignment: {error}"),
                });
            }
        };
        self.check_addressee(&assignment.node)?;
        if assignment.lease_expires_at_ms <= now_ms {
            return Err(Dropped::LeaseExpired(
                now_ms - assignment.lease_expires_at_ms,
            ));
        }
        Ok(Admitted::Run(Box::new(assignment)))
    }

    fn check_addressee(&self, node: &str) -> Result<(), Dropped> {
        if node.eq_ignore_ascii_case(&self.node_id) {
            Ok(())
        } else {
            Err(Dropped::OtherNode(node.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use xpand_protocol::{now_ms, NodeKey, ShardTask, Topics};

    use super::*;

    struct Fixture {
        gateway: NodeKey,
        node: NodeKey,
        topic: String,
        gate: AssignmentGate,
    }

    fn fixture() -> Fixture {
        let gateway = NodeKey::generate();
        let node = NodeKey::generate();
        let topic = Topics::new("test").assign(node.id());
        let gate = AssignmentGate::new(node.id(), gateway.id());
        Fixture {
            gateway,
            node,
            topic,
            gate,
        }
    }

    fn assignment(node: &str, lease_expires_at_ms: i64) -> Assignment {
        Assignment {
            assignment_id: Uuid::new_v4(),
            job_id: Uuid::new_v4(),
            shard_id: Uuid::new_v4(),
            node: node.to_string(),
            model: "forecast-mlp".into(),
            lease_expires_at_ms,
            task: ShardTask::Forecast {
                series: vec![vec![1.0, 2.0, 3.0]],
                horizon: 2,
                levels: Vec::new(),
                season_length: None,
            },
        }
    }

    #[test]
    fn a_fresh_assignment_from_the_gateway_is_admitted() {
        let mut f = fixture();
        let sent = assignment(f.node.id(), now_ms() + 30_000);
        let payload = f.gateway.seal(&f.topic, &sent);
        match f.gate.admit(&f.topic, &payload, now_ms()) {
            Ok(Admitted::Run(got)) => assert_eq!(*got, sent),
            other => panic!("expected a runnable assignment, got {other:?}"),
        }
        assert!(f.gate.dropped().is_empty());
    }

    #[test]
    fn wrong_signer_wrong_node_replay_and_expired_lease_are_dropped() {
        let mut f = fixture();
        let now = now_ms();

        let forged = NodeKey::generate().seal(&f.topic, &assignment(f.node.id(), now + 30_000));
        assert!(matches!(
            f.gate.admit(&f.topic, &forged, now),
            Err(Dropped::NotGateway(_))
        ));

        let elsewhere = f.gateway.seal(
            &f.topic,
            &assignment(NodeKey::generate().id(), now + 30_000),
        );
        assert!(matches!(
            f.gate.admit(&f.topic, &elsewhere, now),
            Err(Dropped::OtherNode(_))
        ));

        let good = f
            .gateway
            .seal(&f.topic, &assignment(f.node.id(), now + 30_000));
        assert!(matches!(
            f.gate.admit(&f.topic, &good, now),
            Ok(Admitted::Run(_))
        ));
        assert!(matches!(
            f.gate.admit(&f.topic, &good, now + 1),
            Err(Dropped::Replay)
        ));

        let expired = f.gateway.seal(&f.topic, &assignment(f.node.id(), now - 1));
        assert!(matches!(
            f.gate.admit(&f.topic, &expired, now),
            Err(Dropped::LeaseExpired(1))
        ));

        let stale = f.gateway.seal_bytes(
            &f.topic,
            &serde_json::to_vec(&assignment(f.node.id(), now + 30_000)).unwrap(),
            now - 2 * MAX_SKEW_MS,
        );
        assert!(matches!(
            f.gate.admit(&f.topic, &stale, now),
            Err(Dropped::Envelope(_))
        ));

        let other_topic = Topics::new("test").assign(NodeKey::generate().id());
        let moved = f
            .gateway
            .seal(&other_topic, &assignment(f.node.id(), now + 30_000));
        assert!(matches!(
            f.gate.admit(&f.topic, &moved, now),
            Err(Dropped::Envelope(_))
        ));

        assert!(matches!(
            f.gate.admit(&f.topic, b"not json", now),
            Err(Dropped::Envelope(_))
        ));

        let counts: Vec<_> = f.gate.dropped().iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(
            counts,
            [
                ("envelope", 3),
                ("lease_expired", 1),
                ("not_gateway", 1),
                ("other_node", 1),
                ("replay", 1)
            ]
        );
    }

    #[test]
    fn stops_are_admitted_only_from_the_gateway_for_this_node_once() {
        let mut f = fixture();
        let topic = Topics::new("test").stop(f.node.id());
        let stop = |node: &str| Stop {
            assignment_id: Uuid::new_v4(),
            shard_id: Uuid::new_v4(),
            node: node.to_string(),
            reason: "test".into(),
        };
        let sent = stop(f.node.id());
        let payload = f.gateway.seal(&topic, &sent);
        assert_eq!(f.gate.admit_stop(&topic, &payload, now_ms()).unwrap(), sent);
        assert!(matches!(
            f.gate.admit_stop(&topic, &payload, now_ms()),
            Err(Dropped::Replay)
        ));
        let forged = NodeKey::generate().seal(&topic, &stop(f.node.id()));
        assert!(matches!(
            f.gate.admit_stop(&topic, &forged, now_ms()),
            Err(Dropped::NotGateway(_))
        ));
        let elsewhere = f.gateway.seal(&topic, &stop(NodeKey::generate().id()));
        assert!(matches!(
            f.gate.admit_stop(&topic, &elsewhere, now_ms()),
            Err(Dropped::OtherNode(_))
        ));
    }

    #[test]
    fn an_unknown_task_kind_for_this_node_is_answered_not_dropped() {
        let mut f = fixture();
        let mut body = serde_json::to_value(assignment(f.node.id(), now_ms() + 30_000)).unwrap();
        body["task"] = serde_json::json!({"kind": "transcribe", "file": "abc"});
        let payload = f.gateway.seal(&f.topic, &body);
        match f.gate.admit(&f.topic, &payload, now_ms()) {
            Ok(Admitted::Unsupported { reason, .. }) => {
                assert!(reason.contains("transcribe"), "{reason}")
            }
            other => panic!("expected an unsupported assignment, got {other:?}"),
        }

        let payload = f
            .gateway
            .seal(&f.topic, &serde_json::json!({"hello": "world"}));
        assert!(matches!(
            f.gate.admit(&f.topic, &payload, now_ms()),
            Err(Dropped::Malformed(_))
        ));
    }
}
