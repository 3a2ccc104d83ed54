//! The fleet parser never panics, whatever it is given: arbitrary text, TOML-looking text, and
//! the example fleet with bytes changed, removed or inserted. Every result is a fleet or a list
//! of located errors; secrets never appear in an error message.
//!
//! The case count comes from PROPTEST_CASES (default 256 per property here, so `cargo test`
//! stays quick); docs/security.md records a longer run.

use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../../examples/hello/drover.toml");
const SECRET: &str = "s3cret-Value-77";

fn with_secret() -> String {
    EXAMPLE.replace(
        "stop_grace = \"5s\"",
        &format!("stop_grace = \"5s\"\nsecret_env = {{ DB_PASSWORD = \"{SECRET}\" }}"),
    )
}

fn check(text: &str) {
    match drover_model::parse_fleet(text, "fuzz.toml") {
        Ok(fleet) => {
            // Whatever parses also plans and diffs without a panic.
            for (name, svc) in &fleet.services {
                for region in &svc.regions {
                    let _ = drover_model::plan::plan_for(&fleet, name, svc, region);
                }
            }
            let mut changes = drover_model::diff::diff(None, &fleet);
            drover_model::secret::redact_changes(&mut changes);
            let _ = drover_model::secret::redact_toml(text);
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                assert!(e.line >= 1 && e.column >= 1, "{e:?}");
            }
        }
    }
}

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

/// TOML-ish tokens, so that generated text gets past the first character.
fn tomlish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("[fleet]\n".to_string()),
        Just("name = \"x\"\n".to_string()),
        Just("[regions.local]\nprovider = \"local\"\n".to_string()),
        Just("[services.web]\n".to_string()),
        Just("regions = [\"local\"]\n".to_string()),
        Just("capacity = { min = 1, desired = 1, max = 2 }\n".to_string()),
        Just("[services.web.components.app]\n".to_string()),
        Just("runtime = \"process\"\nversion = \"v1\"\n".to_string()),
        Just("secret_env = { K = \"v\" }\n".to_string()),
        Just("env = { A = \"{addr}\" }\n".to_string()),
        Just("ports = { http = 8080 }\n".to_string()),
        Just("health = { type = \"http\", port = \"http\", path = \"/\" }\n".to_string()),
        Just("[[a]]\n".to_string()),
        Just("x = [[[[[[1]]]]]]\n".to_string()),
        Just("{".to_string()),
        Just("\"".to_string()),
        Just("= ".to_string()),
        "[a-z_.]{1,8} = \"[^\"\\\\]{0,8}\"\n",
        "[ -~]{0,12}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        check(&text);
    }

    #[test]
    fn tomlish_text_never_panics(text in tomlish()) {
        check(&text);
    }

    #[test]
    fn the_example_mutated_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..8)
    ) {
        let mut bytes = with_secret().into_bytes();
        for (at, op, b) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = b,
                1 => { bytes.remove(i); }
                _ => bytes.insert(i, b),
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        check(&text);
        // Validation never quotes a secret_env value, and the server's scrubber removes it
        // from any other message.
        if let Err(errors) = drover_model::parse_fleet(&text, "fuzz.toml") {
            let values = drover_model::secret::secret_values_in_text(&text);
            let sc = drover_model::secret::Scrubber::new(values.clone());
            for e in &errors.0 {
                if e.field.contains("secret_env") {
                    prop_assert!(!e.message.contains(SECRET), "{}", e.message);
                }
                for v in values.iter().filter(|v| v.len() >= drover_model::secret::MIN_SCRUB_LEN) {
                    prop_assert!(!sc.scrub(&e.message).contains(v.as_str()));
                }
            }
        }
    }
}

#[test]
fn the_example_with_a_secret_is_valid_and_plans_it_literally() {
    let text = with_secret().replace(SECRET, "p{a}ss}{");
    let fleet = drover_model::parse_fleet(&text, "x.toml").unwrap();
    let svc = &fleet.services["web"];
    let plan = drover_model::plan::plan_for(&fleet, "web", svc, "local");
    // Braces are escaped for the agent's substitution, which gives the literal value back.
    assert_eq!(plan.components[0].env["DB_PASSWORD"], "p{{a}}ss}}{{");
    assert!(drover_model::secret::redact_toml(&text).contains("(secret)"));
}

#[test]
fn a_secret_in_both_env_and_secret_env_is_refused_without_quoting_it() {
    let text = with_secret().replace(
        "stop_grace = \"5s\"",
        &format!("stop_grace = \"5s\"\nenv = {{ DB_PASSWORD = \"{SECRET}\" }}"),
    );
    let e = drover_model::parse_fleet(&text, "x.toml").unwrap_err();
    let s = e.to_string();
    assert!(s.contains("both env and secret_env"), "{s}");
}
