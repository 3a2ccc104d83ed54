//! The API's JSON decoding never panics: arbitrary bytes, arbitrary JSON values and mutated
//! real requests, for every request body the server decodes. Deep nesting is refused by the
//! depth check before serde sees it.
//!
//! The case count comes from PROPTEST_CASES (default 256 per property); docs/security.md
//! records a longer run.

use drover_model::api::{ApplyRequest, DeployRequest, Heartbeat, RollbackRequest, ScaleRequest};
use drover_model::token::CreateTokenRequest;
use drover_server::api::{decode_body, json_depth, MAX_JSON_DEPTH};
use drover_server::ServerError;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Decode `bytes` as every request type; an error must be a 400 with a message.
fn decode_all(bytes: &[u8]) {
    fn one<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
        if let Err(e) = decode_body::<T>(bytes) {
            assert!(matches!(e, ServerError::BadRequest(_)), "{e:?}");
            assert!(!e.to_string().is_empty());
        }
    }
    one::<ApplyRequest>(bytes);
    one::<DeployRequest>(bytes);
    one::<RollbackRequest>(bytes);
    one::<ScaleRequest>(bytes);
    one::<Heartbeat>(bytes);
    one::<CreateTokenRequest>(bytes);
    one::<serde_json::Value>(bytes);
}

const HEARTBEAT: &str = r#"{"instance":"i-000042","group":"web/local","generation":3,"addr":"127.98.0.1","phase":"running","seq":3,"components":[{"name":"app","version":"v1","state":"healthy","pid":4690,"restarts":0}],"utilization":{"cpu":0.0,"memory_bytes":14098432,"agent_rss_bytes":17694720,"custom":{"rps":1.5}}}"#;
const APPLY: &str = r#"{"file":"drover.toml","toml":"[fleet]\nname = \"hello\"\n","dry_run":true}"#;
const TOKEN: &str = r#"{"scope":"agent","name":"n","group":"web/local"}"#;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "\\PC{0,16}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(8, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("instance".to_string()),
                    Just("group".to_string()),
                    Just("components".to_string()),
                    Just("scope".to_string()),
                    Just("toml".to_string()),
                    "[a-z_]{1,10}"
                ],
                inner,
                0..8
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics(v in json_value()) {
        decode_all(v.to_string().as_bytes());
    }

    #[test]
    fn mutated_requests_never_panic(
        which in 0usize..3,
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..10)
    ) {
        let mut bytes = [HEARTBEAT, APPLY, TOKEN][which].as_bytes().to_vec();
        for (at, op, b) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = b,
                1 => { bytes.remove(i); }
                _ => bytes.insert(i, b),
            }
        }
        decode_all(&bytes);
    }

    #[test]
    fn nesting_is_measured_outside_strings(depth in 0usize..200, in_string in any::<bool>()) {
        let body = if in_string {
            format!("{{\"toml\":\"{}{}\"}}", "[".repeat(depth), "{".repeat(depth))
        } else {
            format!("{}{}", "[".repeat(depth), "]".repeat(depth))
        };
        let d = json_depth(body.as_bytes());
        prop_assert_eq!(d, if in_string { 1 } else { depth });
        let r = decode_body::<serde_json::Value>(body.as_bytes());
        if d > MAX_JSON_DEPTH {
            prop_assert!(r.unwrap_err().to_string().contains("nested deeper"));
        }
    }
}

#[test]
fn real_requests_decode() {
    decode_body::<Heartbeat>(HEARTBEAT.as_bytes()).unwrap();
    decode_body::<ApplyRequest>(APPLY.as_bytes()).unwrap();
    decode_body::<CreateTokenRequest>(TOKEN.as_bytes()).unwrap();
}

#[test]
fn very_deep_nesting_is_refused_without_recursion() {
    // 1,000,000 levels: a recursive parser would overflow its stack.
    let body = "[".repeat(1_000_000);
    let e = decode_body::<serde_json::Value>(body.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("nested deeper than 32"), "{e}");
    let escaped = format!("{{\"toml\":\"\\\"{}\"}}", "[".repeat(100));
    assert_eq!(json_depth(escaped.as_bytes()), 1);
}
