//! What changed between two fleet revisions, field by field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fleet::Fleet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    Changed,
}

/// One changed field, e.g. `services.web.components.app.version: "v1" -> "v2"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub kind: ChangeKind,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Value>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
        match self.kind {
            ChangeKind::Added => write!(f, "+ {} = {}", self.path, show(&self.to)),
            ChangeKind::Removed => write!(f, "- {} (was {})", self.path, show(&self.from)),
            ChangeKind::Changed => write!(
                f,
                "~ {}: {} -> {}",
                self.path,
                show(&self.from),
                show(&self.to)
            ),
        }
    }
}

/// Field-level differences from `old` (None: nothing applied yet) to `new`.
pub fn diff(old: Option<&Fleet>, new: &Fleet) -> Vec<Change> {
    let new_v = serde_json::to_value(new).unwrap_or(Value::Null);
    let old_v = match old {
        Some(o) => serde_json::to_value(o).unwrap_or(Value::Null),
        None => Value::Object(Default::default()),
    };
    let mut out = Vec::new();
    walk(&old_v, &new_v, &mut String::new(), &mut out);
    out
}

fn walk(old: &Value, new: &Value, path: &mut String, out: &mut Vec<Change>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let len = path.len();
                push_seg(path, k);
                match b.get(k) {
                    Some(vb) => walk(va, vb, path, out),
                    None => out.push(Change {
                        kind: ChangeKind::Removed,
                        path: path.clone(),
                        from: Some(va.clone()),
                        to: None,
                    }),
                }
                path.truncate(len);
            }
            for (k, vb) in b {
                if !a.contains_key(k) {
                    let len = path.len();
                    push_seg(path, k);
                    out.push(Change {
                        kind: ChangeKind::Added,
                        path: path.clone(),
                        from: None,
                        to: Some(vb.clone()),
                    });
                    path.truncate(len);
                }
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(Change {
            kind: ChangeKind::Changed,
            path: path.clone(),
            from: Some(a.clone()),
            to: Some(b.clone()),
        }),
    }
}

fn push_seg(path: &mut String, k: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(k);
}
