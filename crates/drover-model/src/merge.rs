//! The three-way merge of an apply (kubectl's last-applied configuration, for drover's
//! fields): from the file as last applied, the file applied now and the live fleet, a field
//! that commands change (a component's version: deploy, rollback, automatic revert; a
//! service's presence: destroy) takes the file's value only where the file changed it since
//! it was last applied. Elsewhere the live value stays and the disagreement is reported.

use std::collections::BTreeMap;

use crate::api::Drift;
use crate::fleet::Fleet;

/// What to keep of the live fleet, and what to report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Merge {
    /// `(service, component, live version)` to put in place of the file's version.
    pub keep_versions: Vec<(String, String, String)>,
    /// Services the file still has but that a command removed: they stay removed.
    pub keep_removed: Vec<String>,
    /// Every disagreement, kept or not.
    pub drift: Vec<Drift>,
}

/// The key of a component's version in [`crate::api::LastApplied::set_by`].
pub fn version_field(service: &str, component: &str) -> String {
    format!("services.{service}.components.{component}.version")
}

/// The key of a service's presence in [`crate::api::LastApplied::set_by`].
pub fn service_field(service: &str) -> String {
    format!("services.{service}")
}

/// Merge `file` onto `live` with `base` (the file as last applied) as the common ancestor.
/// With `force`, the file wins everywhere; the drift is still reported, with `kept: false`.
/// Without a base (nothing applied yet, or only a revision from before the merge existed and
/// no live fleet) nothing is kept.
pub fn three_way(
    base: Option<&Fleet>,
    file: &Fleet,
    live: Option<&Fleet>,
    set_by: &BTreeMap<String, String>,
    force: bool,
) -> Merge {
    let mut m = Merge::default();
    let (Some(base), Some(live)) = (base, live) else {
        return m;
    };
    let who = |key: &str| {
        set_by
            .get(key)
            .cloned()
            .unwrap_or_else(|| "a command since the file was last applied".to_string())
    };
    for (sname, svc) in &file.services {
        let Some(base_svc) = base.services.get(sname) else {
            // New in the file (or back in it): the file's.
            continue;
        };
        let Some(live_svc) = live.services.get(sname) else {
            // The file had it before and still has it; a command removed it.
            let key = service_field(sname);
            m.drift.push(Drift {
                field: key.clone(),
                file: "present".into(),
                live: "(absent)".into(),
                set_by: who(&key),
                kept: !force,
            });
            if !force {
                m.keep_removed.push(sname.clone());
            }
            continue;
        };
        for (cname, comp) in &svc.components {
            let (Some(base_c), Some(live_c)) = (
                base_svc.components.get(cname),
                live_svc.components.get(cname),
            ) else {
                continue;
            };
            let file_changed_it = base_c.version != comp.version;
            if file_changed_it || live_c.version == comp.version {
                continue;
            }
            let key = version_field(sname, cname);
            m.drift.push(Drift {
                field: key.clone(),
                file: comp.version.clone(),
                live: live_c.version.clone(),
                set_by: who(&key),
                kept: !force,
            });
            if !force {
                m.keep_versions
                    .push((sname.clone(), cname.clone(), live_c.version.clone()));
            }
        }
    }
    m
}

/// The `set_by` of a revision made by a command (`why`, as revision `number`): the old one,
/// plus every version and service that changed between `live` and `new`.
pub fn commanded(
    old: &BTreeMap<String, String>,
    live: Option<&Fleet>,
    new: &Fleet,
    why: &str,
    number: u64,
) -> BTreeMap<String, String> {
    let mut out = old.clone();
    let Some(live) = live else {
        return out;
    };
    let by = format!("{why} (revision {number})");
    for (sname, live_svc) in &live.services {
        let Some(svc) = new.services.get(sname) else {
            out.insert(service_field(sname), by.clone());
            continue;
        };
        for (cname, live_c) in &live_svc.components {
            if svc
                .components
                .get(cname)
                .is_some_and(|c| c.version != live_c.version)
            {
                out.insert(version_field(sname, cname), by.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"[fleet]
name = "hello"

[regions.local]
provider = "local"

[services.web]
regions = ["local"]
capacity = { min = 1, desired = 2, max = 3 }

[services.web.components.app]
runtime = "process"
version = "v1"
command = "/bin/true"

[services.api]
regions = ["local"]
capacity = { min = 1, desired = 1, max = 2 }

[services.api.components.srv]
runtime = "process"
version = "a1"
command = "/bin/true"
"#;

    fn fleet(text: &str) -> Fleet {
        crate::parse_fleet(text, "drover.toml").unwrap()
    }

    #[test]
    fn a_version_a_command_set_stays_unless_the_file_changed_it() {
        let base = fleet(FILE);
        let live = fleet(&FILE.replace("\"v1\"", "\"v2\""));
        let set_by: BTreeMap<String, String> = [(
            version_field("web", "app"),
            "deploy web app v2 (revision 2)".to_string(),
        )]
        .into_iter()
        .collect();
        // The unchanged file: v2 stays, and the drift names the deploy.
        let m = three_way(Some(&base), &base, Some(&live), &set_by, false);
        assert_eq!(
            m.keep_versions,
            vec![("web".into(), "app".into(), "v2".into())]
        );
        assert_eq!(m.drift.len(), 1);
        assert_eq!(m.drift[0].file, "v1");
        assert_eq!(m.drift[0].live, "v2");
        assert_eq!(m.drift[0].set_by, "deploy web app v2 (revision 2)");
        assert!(m.drift[0].kept);
        // The file changed the version since: the file's wins, no drift.
        let newer = fleet(&FILE.replace("\"v1\"", "\"v3\""));
        let m = three_way(Some(&base), &newer, Some(&live), &set_by, false);
        assert!(m.keep_versions.is_empty() && m.drift.is_empty(), "{m:?}");
        // Forced: the file wins and says what it overrides.
        let m = three_way(Some(&base), &base, Some(&live), &set_by, true);
        assert!(m.keep_versions.is_empty());
        assert!(!m.drift[0].kept);
        // Another service's version the file changed is the file's, whatever else drifts.
        let both = fleet(&FILE.replace("\"a1\"", "\"a2\""));
        let m = three_way(Some(&base), &both, Some(&live), &set_by, false);
        assert_eq!(m.keep_versions.len(), 1);
    }

    #[test]
    fn a_destroyed_service_stays_destroyed_unless_forced() {
        let base = fleet(FILE);
        let live_text = FILE[..FILE.find("[services.api]").unwrap()].to_string();
        let live = fleet(&live_text);
        let m = three_way(Some(&base), &base, Some(&live), &BTreeMap::new(), false);
        assert_eq!(m.keep_removed, vec!["api".to_string()]);
        assert_eq!(m.drift[0].field, "services.api");
        let m = three_way(Some(&base), &base, Some(&live), &BTreeMap::new(), true);
        assert!(m.keep_removed.is_empty());
        // Nothing to merge on the first apply.
        assert_eq!(
            three_way(None, &base, None, &BTreeMap::new(), false),
            Merge::default()
        );
    }

    #[test]
    fn commands_record_what_they_set() {
        let live = fleet(FILE);
        let new = fleet(&FILE.replace("\"v1\"", "\"v2\""));
        let s = commanded(&BTreeMap::new(), Some(&live), &new, "deploy web app v2", 2);
        assert_eq!(
            s.get(&version_field("web", "app")).map(String::as_str),
            Some("deploy web app v2 (revision 2)")
        );
        assert!(!s.contains_key(&version_field("api", "srv")));
    }
}
