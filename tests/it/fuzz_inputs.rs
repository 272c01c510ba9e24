//! Property-based fuzzing of the two parsers that take untrusted bytes: the submit validator
//! (a body from any client) and the envelope parser (a payload from any MQTT publisher). Neither
//! may panic; the validator refuses with named fields; the parser never accepts a signature
//! over anything but what was signed.

use proptest::prelude::*;
use serde_json::Value;
use xpand::http::extract::parse_json;
use xpand::jobs::SubmitJob;
use xpand::kinds::forecast;
use xpand_protocol::{Envelope, NodeKey};

/// Arbitrary JSON, biased towards the shapes a submission has.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z\\u{0}-\\u{7f}]{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("series".to_string()),
                    Just("horizon".to_string()),
                    Just("kind".to_string()),
                    Just("input".to_string()),
                    Just("params".to_string()),
                    Just("max_fee".to_string()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn the_submit_validator_refuses_by_field_and_never_panics(input in json(), params in json()) {
        match forecast::plan(&input, &params, xpand::config::DEFAULT_FORECAST_ROWS_PER_SHARD) {
            Ok(plan) => prop_assert!(!plan.shards.is_empty()),
            Err(errors) => {
                prop_assert!(!errors.is_empty());
                for e in errors {
                    prop_assert!(e.field.starts_with("input") || e.field.starts_with("params"), "{}", e.field);
                }
            }
        }
        let body = serde_json::json!({"kind": "forecast", "input": input, "params": params, "max_fee": 1});
        let _ = parse_json::<SubmitJob>(body.to_string().as_bytes());
    }

    #[test]
    fn raw_bytes_never_panic_the_body_parser(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_json::<SubmitJob>(&bytes);
    }

    #[test]
    fn envelopes_open_only_as_signed(
        body in prop::collection::vec(any::<u8>(), 0..64),
        flip in any::<prop::sample::Index>(),
        garbage in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let key = NodeKey::from_seed([3; 32]);
        let topic = "xpand/v1/up/n/result";
        let sealed = key.seal_bytes(topic, &body, xpand_protocol::now_ms());
        let opened = Envelope::open(&sealed, topic, xpand_protocol::now_ms(), 60_000).unwrap();
        prop_assert_eq!(&opened.body, &body);
        prop_assert!(Envelope::open(&sealed, "xpand/v1/up/n/heartbeat", xpand_protocol::now_ms(), 60_000).is_err());
        // Any one changed byte either breaks the JSON or the signature; it never opens as
        // something else.
        let mut tampered = sealed.clone();
        let i = flip.index(tampered.len());
        tampered[i] ^= 0x01;
        if let Ok(o) = Envelope::open(&tampered, topic, xpand_protocol::now_ms(), 60_000) {
            prop_assert_eq!(o.body, body);
        }
        let _ = Envelope::open(&garbage, topic, xpand_protocol::now_ms(), 60_000);
    }
}
