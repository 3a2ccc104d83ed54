//! Secrets: env values a fleet file marks secret (`secret_env`), and how they are kept out of
//! everything the server shows: API answers (diffs, revisions, plans, status, events), stored
//! summaries and event messages, and error messages.
//!
//! Two layers: structural redaction (every value under a `secret_env` key is replaced by
//! [`REDACTED`], in JSON, in TOML text and in plans), and a [`Scrubber`] that replaces any
//! occurrence of a secret value inside free text (an agent's report, an error message).

use std::borrow::Cow;

use serde_json::Value;

use crate::diff::Change;
use crate::fleet::Fleet;
use crate::plan::Plan;

/// What a secret value is shown as.
pub const REDACTED: &str = "(secret)";

/// The key of the fleet file's table of secret environment variables.
pub const SECRET_ENV: &str = "secret_env";

/// Values shorter than this are not searched for in free text (they would match everywhere);
/// they are still redacted wherever they appear as a `secret_env` value.
pub const MIN_SCRUB_LEN: usize = 4;

/// Every secret value of a fleet.
pub fn secret_values(fleet: &Fleet) -> Vec<String> {
    let mut out: Vec<String> = fleet
        .services
        .values()
        .flat_map(|s| s.components.values())
        .flat_map(|c| c.secret_env.values().cloned())
        .filter(|v| !v.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Replace every value under a `secret_env` key, at any depth.
pub fn redact_json(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == SECRET_ENV {
                    redact_all(child);
                } else {
                    redact_json(child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_json),
        _ => {}
    }
}

/// Replace every leaf value of `v` (the values of a `secret_env` table).
fn redact_all(v: &mut Value) {
    match v {
        Value::Object(map) => map.values_mut().for_each(redact_all),
        Value::Array(items) => items.iter_mut().for_each(redact_all),
        other => *other = Value::String(REDACTED.to_string()),
    }
}

/// Redact the values of changes (field-level diffs) that touch secrets. A changed secret
/// still shows as a change, with both sides redacted.
pub fn redact_changes(changes: &mut [Change]) {
    for c in changes {
        let under_secret = c.path.split('.').any(|seg| seg == SECRET_ENV);
        for side in [&mut c.from, &mut c.to].into_iter().flatten() {
            if under_secret {
                redact_all(side);
            } else {
                redact_json(side);
            }
        }
    }
}

/// A fleet file's text with every `secret_env` value replaced; comments and layout kept.
/// Text that cannot be parsed is not shown at all.
pub fn redact_toml(text: &str) -> String {
    let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else {
        return format!("# {REDACTED}: this text cannot be parsed, so it is not shown\n");
    };
    redact_toml_table(doc.as_table_mut());
    doc.to_string()
}

fn redact_toml_table(t: &mut dyn toml_edit::TableLike) {
    for (k, item) in t.iter_mut() {
        if k.get() == SECRET_ENV {
            redact_toml_item(item);
        } else if let Some(child) = item.as_table_like_mut() {
            redact_toml_table(child);
        } else if let Some(arr) = item.as_array_of_tables_mut() {
            for child in arr.iter_mut() {
                redact_toml_table(child);
            }
        }
    }
}

fn redact_toml_item(item: &mut toml_edit::Item) {
    if let Some(t) = item.as_table_like_mut() {
        for (_, v) in t.iter_mut() {
            redact_toml_item(v);
        }
    } else if let Some(v) = item.as_value_mut() {
        let decor = v.decor().clone();
        *v = toml_edit::Value::from(REDACTED);
        *v.decor_mut() = decor;
    }
}

/// The `secret_env` values found in a fleet file's text, even one that does not validate
/// (for scrubbing its error messages); nothing when it is not TOML at all.
pub fn secret_values_in_text(text: &str) -> Vec<String> {
    fn walk(t: &dyn toml_edit::TableLike, inside: bool, out: &mut Vec<String>) {
        for (k, item) in t.iter() {
            let inside = inside || k == SECRET_ENV;
            if let Some(child) = item.as_table_like() {
                walk(child, inside, out);
            } else if let Some(arr) = item.as_array_of_tables() {
                for child in arr.iter() {
                    walk(child, inside, out);
                }
            } else if inside {
                if let Some(v) = item.as_str() {
                    out.push(v.to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(doc) = text.parse::<toml_edit::DocumentMut>() {
        walk(doc.as_table(), false, &mut out);
    }
    out
}

/// `plan` with the env values that come from the fleet's `secret_env` replaced.
pub fn redact_plan(plan: &mut Plan, fleet: Option<&Fleet>) {
    let svc = fleet.and_then(|f| f.services.get(&plan.service));
    for c in &mut plan.components {
        let secret_keys: Vec<&String> = svc
            .and_then(|s| s.components.get(&c.name))
            .map(|fc| fc.secret_env.keys().collect())
            .unwrap_or_default();
        for (k, v) in c.env.iter_mut() {
            // Without the fleet the plan was made from, nothing tells which values are
            // secret: hide them all.
            if secret_keys.contains(&k) || (svc.is_none() && !v.is_empty()) {
                *v = REDACTED.to_string();
            }
        }
    }
}

/// Escape a literal value for a plan's env (where `{placeholder}` is substituted by the agent).
pub fn escape_braces(s: &str) -> String {
    s.replace('{', "{{").replace('}', "}}")
}

/// Replaces known secret values inside free text.
#[derive(Clone, Debug, Default)]
pub struct Scrubber {
    values: Vec<String>,
}

impl Scrubber {
    pub fn new(values: impl IntoIterator<Item = String>) -> Scrubber {
        let mut values: Vec<String> = values
            .into_iter()
            .filter(|v| v.len() >= MIN_SCRUB_LEN)
            .collect();
        // Longest first, so a secret that contains another is replaced whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Scrubber { values }
    }

    pub fn for_fleet(fleet: Option<&Fleet>) -> Scrubber {
        Scrubber::new(fleet.map(secret_values).unwrap_or_default())
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = Cow::Owned(out.replace(v.as_str(), REDACTED));
            }
        }
        out
    }

    pub fn scrub_in_place(&self, text: &mut String) {
        if let Cow::Owned(s) = self.scrub(text) {
            *text = s;
        }
    }

    /// Scrub a text that comes in pieces (an exec's output chunks), so a secret split across
    /// two pieces is replaced too: returns what may be shown of `held` + `piece` now, and
    /// keeps in `held` the end that may be the start of a secret (the longest end of it that
    /// begins some secret; nothing, mostly). [`Scrubber::finish`] gives the rest at the end.
    pub fn scrub_piece(&self, held: &mut String, piece: &str) -> String {
        held.push_str(piece);
        let buf = std::mem::take(held);
        // The longest end of `buf` that is a proper start of a secret.
        let mut cut = buf.len();
        for v in &self.values {
            if let Some(k) = (1..v.len())
                .rev()
                .find(|k| v.is_char_boundary(*k) && buf.ends_with(&v[..*k]))
            {
                cut = cut.min(buf.len() - k);
            }
        }
        // A whole secret across the cut goes out whole (replaced), not in two parts.
        loop {
            let end = self
                .values
                .iter()
                .flat_map(|v| {
                    buf.match_indices(v.as_str())
                        .map(|(at, m)| (at, at + m.len()))
                        .collect::<Vec<_>>()
                })
                .filter(|(at, end)| *at < cut && *end > cut)
                .map(|(_, end)| end)
                .max();
            match end {
                Some(e) => cut = e,
                None => break,
            }
        }
        *held = buf[cut..].to_string();
        self.scrub(&buf[..cut]).into_owned()
    }

    /// The rest of a text scrubbed piece by piece ([`Scrubber::scrub_piece`]).
    pub fn finish(&self, held: &mut String) -> String {
        let rest = std::mem::take(held);
        self.scrub(&rest).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scrub `pieces` one by one; what was shown.
    fn shown(sc: &Scrubber, pieces: &[&str]) -> String {
        let mut held = String::new();
        let mut out = String::new();
        for p in pieces {
            out.push_str(&sc.scrub_piece(&mut held, p));
        }
        out + &sc.finish(&mut held)
    }

    #[test]
    fn a_secret_split_across_pieces_is_replaced() {
        let sc = Scrubber::new(["hunter22".to_string(), "s3cr3t-välue".to_string()]);
        // Split anywhere, by one or several cuts: never shown, the rest intact.
        let text = "a hunter22 b s3cr3t-välue c hunter22";
        let want = "a (secret) b (secret) c (secret)";
        let bounds: Vec<usize> = (0..=text.len())
            .filter(|i| text.is_char_boundary(*i))
            .collect();
        for &i in &bounds {
            for &j in bounds.iter().filter(|j| **j >= i) {
                let got = shown(&sc, &[&text[..i], &text[i..j], &text[j..]]);
                assert_eq!(got, want, "cut at {i} and {j}");
            }
        }
        // One byte at a time.
        let bytes: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(shown(&sc, &refs), want);
        // Only a possible start of a secret waits; other text goes out at once.
        let mut held = String::new();
        assert_eq!(sc.scrub_piece(&mut held, "$ "), "$ ");
        assert_eq!(sc.scrub_piece(&mut held, "echo hun"), "echo ");
        assert_eq!(held, "hun");
        assert_eq!(sc.scrub_piece(&mut held, "gry"), "hungry");
        assert!(held.is_empty());
        // A secret that never completes is shown as it was at the end.
        assert_eq!(sc.scrub_piece(&mut held, "x hunter2"), "x ");
        assert_eq!(sc.finish(&mut held), "hunter2");
    }

    #[test]
    fn redacts_json_toml_changes_and_text() {
        let mut v = serde_json::json!({"services": {"web": {"components": {"app": {
            "env": {"A": "plain"}, "secret_env": {"DB_PASSWORD": "hunter22"}}}}}});
        redact_json(&mut v);
        let s = v.to_string();
        assert!(!s.contains("hunter22") && s.contains("plain") && s.contains(REDACTED));

        let text = "[services.web.components.app]\nversion = \"v1\" # v\nsecret_env = { DB = \"hunter22\" }\n[services.web.components.app.env]\nA = \"plain\"\n[services.api.components.x.secret_env]\nK = \"s3cr3t-value\" # comment kept\n";
        let r = redact_toml(text);
        assert!(
            !r.contains("hunter22") && !r.contains("s3cr3t-value"),
            "{r}"
        );
        assert!(r.contains("plain") && r.contains("# comment kept"), "{r}");

        let mut changes = vec![
            Change {
                kind: crate::diff::ChangeKind::Changed,
                path: "services.web.components.app.secret_env.DB".into(),
                from: Some("old-secret".into()),
                to: Some("new-secret".into()),
            },
            Change {
                kind: crate::diff::ChangeKind::Added,
                path: "services".into(),
                from: None,
                to: Some(
                    serde_json::json!({"web": {"components": {"app": {"secret_env": {"DB": "hunter22"}}}}}),
                ),
            },
        ];
        redact_changes(&mut changes);
        let s = serde_json::to_string(&changes).unwrap();
        assert!(!s.contains("secret\"") && !s.contains("hunter22"), "{s}");
        assert!(
            !s.contains("old-secret") && !s.contains("new-secret"),
            "{s}"
        );

        let sc = Scrubber::new(["hunter22".to_string(), "ab".to_string()]);
        assert_eq!(sc.scrub("pw=hunter22 ab"), "pw=(secret) ab");
    }
}
