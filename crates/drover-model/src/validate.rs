//! Parsing and validation of fleet files, with errors that point at file:line:column.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::fleet::{Component, Fleet, HealthKind, ProviderKind, Region, Runtime, Service};
use crate::subst;

/// One thing wrong with a fleet file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `services.web.capacity.min`; empty for syntax errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FleetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)
    }
}

/// Everything wrong with a fleet file, in file order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct FleetErrors(pub Vec<FleetError>);

impl fmt::Display for FleetErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Parse and validate a fleet file. `file` is the name used in error messages.
pub fn parse_fleet(text: &str, file: &str) -> Result<Fleet, FleetErrors> {
    let fleet: Fleet = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            let field = syntax_field(text, e.span());
            return Err(FleetErrors(vec![FleetError {
                file: file.to_string(),
                line,
                column,
                field,
                message: clean_toml_message(e.message()),
            }]));
        }
    };
    let problems = check(&fleet);
    if problems.is_empty() {
        return Ok(fleet);
    }
    let doc = toml_edit::ImDocument::parse(text.to_string()).ok();
    let mut errors: Vec<FleetError> = problems
        .into_iter()
        .map(|p| {
            let offset = doc
                .as_ref()
                .and_then(|d| locate(d.as_item(), &p.path))
                .unwrap_or(0);
            let (line, column) = line_col(text, offset);
            FleetError {
                file: file.to_string(),
                line,
                column,
                field: p.path.join("."),
                message: p.message,
            }
        })
        .collect();
    errors.sort_by_key(|e| (e.line, e.column));
    Err(FleetErrors(errors))
}

fn clean_toml_message(m: &str) -> String {
    let m = m.trim();
    // serde's "unknown field `x`, expected one of `a`, `b`" is already precise; keep it.
    if let Some(rest) = m.strip_prefix("missing field ") {
        return format!("missing required field {rest}");
    }
    m.to_string()
}

/// For a syntax/type error, the dotted path of the key whose value or name holds the span.
fn syntax_field(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let Ok(doc) = toml_edit::ImDocument::parse(text.to_string()) else {
        return String::new();
    };
    let mut best: Option<(usize, Vec<String>)> = None;
    fn walk(
        item: &toml_edit::Item,
        path: &mut Vec<String>,
        at: usize,
        best: &mut Option<(usize, Vec<String>)>,
    ) {
        if let Some(t) = item.as_table_like() {
            for (k, v) in t.iter() {
                path.push(k.to_string());
                let (key_span, val_span) = t
                    .get_key_value(k)
                    .map(|(key, val)| (key.span(), val.span()))
                    .unwrap_or((None, None));
                for s in [key_span, val_span].into_iter().flatten() {
                    if s.start <= at && at < s.end.max(s.start + 1) {
                        let len = s.end - s.start;
                        if best.as_ref().is_none_or(|(l, _)| len <= *l) {
                            *best = Some((len, path.clone()));
                        }
                    }
                }
                walk(v, path, at, best);
                path.pop();
            }
        }
    }
    walk(doc.as_item(), &mut Vec::new(), span.start, &mut best);
    best.map(|(_, p)| p.join(".")).unwrap_or_default()
}

/// Byte offset of the value at `path` (or of its key, or of the nearest ancestor found).
fn locate(root: &toml_edit::Item, path: &[String]) -> Option<usize> {
    let mut item = root;
    let mut found = None;
    for (depth, seg) in path.iter().enumerate() {
        let next = if let Some(t) = item.as_table_like() {
            match t.get_key_value(seg) {
                Some((k, v)) => {
                    found = v.span().or(k.span()).map(|s| s.start).or(found);
                    if v.is_table() {
                        // A [table] header's span is on the key.
                        found = k.span().map(|s| s.start).or(found);
                    }
                    v
                }
                None => return found,
            }
        } else if let Some(arr) = item.as_array_of_tables() {
            // [[a.b]]: the i-th table; its fields are located inside it.
            let Some(t) = seg.parse::<usize>().ok().and_then(|i| arr.get(i)) else {
                return found;
            };
            found = t.span().map(|s| s.start).or(found);
            return locate_in_table(t, &path[depth + 1..], found);
        } else if let Some(arr) = item.as_array() {
            let Ok(i) = seg.parse::<usize>() else {
                return found;
            };
            match arr.get(i) {
                Some(v) => {
                    found = v.span().map(|s| s.start).or(found);
                    return found;
                }
                None => return found,
            }
        } else {
            return found;
        };
        item = next;
    }
    found
}

/// [`locate`] within one table of an array of tables (whose items are tables, not items).
fn locate_in_table(t: &toml_edit::Table, rest: &[String], found: Option<usize>) -> Option<usize> {
    let Some((first, rest)) = rest.split_first() else {
        return found;
    };
    match t.get_key_value(first) {
        Some((k, v)) => {
            let here = v.span().or(k.span()).map(|s| s.start).or(found);
            if rest.is_empty() {
                here
            } else {
                locate(v, rest).or(here)
            }
        }
        None => found,
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

struct Problem {
    path: Vec<String>,
    message: String,
}

fn p(path: &[&str], message: impl Into<String>) -> Problem {
    Problem {
        path: path.iter().map(|s| s.to_string()).collect(),
        message: message.into(),
    }
}

fn p_owned(path: &[String], message: String) -> Problem {
    Problem {
        path: path.to_vec(),
        message,
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

const NAME_RULE: &str =
    "use 1-63 lowercase letters, digits, '-' or '_', starting with a letter or digit";

/// Upper bound on a group's size, to catch typos like `max = 100000`.
pub const MAX_GROUP_SIZE: u32 = 10_000;

fn check(fleet: &Fleet) -> Vec<Problem> {
    let mut out = Vec::new();
    if !valid_name(&fleet.fleet.name) {
        out.push(p(
            &["fleet", "name"],
            format!(
                "{:?} is not a valid fleet name; {NAME_RULE}",
                fleet.fleet.name
            ),
        ));
    }
    if fleet.regions.is_empty() {
        out.push(p(
            &["regions"],
            "no regions declared; add one, e.g. [regions.local] provider = \"local\"",
        ));
    }
    for (name, region) in &fleet.regions {
        if !valid_name(name) {
            out.push(p(
                &["regions", name],
                format!("{name:?} is not a valid region name; {NAME_RULE}"),
            ));
        }
        if region.provider == ProviderKind::Docker {
            out.push(p(
                &["regions", name, "provider"],
                "provider \"docker\" is not available yet; allowed: \"local\", \"aws\", \"sim\" (to run containers, use a component with runtime = \"docker\")",
            ));
        }
        check_aws_region(name, region, &mut out);
        if let Some(user) = &region.run_as {
            if region.provider != ProviderKind::Local {
                out.push(p(
                    &["regions", name, "run_as"],
                    "run_as applies only to provider \"local\"",
                ));
            } else if !valid_user(user) {
                out.push(p(
                    &["regions", name, "run_as"],
                    format!("{user:?} is not a user name or UID[:GID], e.g. \"nobody\" or \"65534:65534\""),
                ));
            }
        }
        if let Some(subnet) = &region.subnet {
            if !matches!(region.provider, ProviderKind::Local | ProviderKind::Sim) {
                out.push(p(
                    &["regions", name, "subnet"],
                    "subnet applies only to providers \"local\" and \"sim\"",
                ));
            } else if crate::ids::parse_loopback_subnet(subnet).is_none() {
                out.push(p(
                    &["regions", name, "subnet"],
                    format!("{subnet:?} is not a loopback /16, e.g. \"127.1.0.0/16\" (127.1.0.0/16 to 127.254.0.0/16)"),
                ));
            }
        }
    }
    // No services is a valid fleet: what `drover destroy` leaves.
    let mut listens: BTreeMap<SocketAddr, String> = BTreeMap::new();
    for (sname, svc) in &fleet.services {
        check_service(fleet, sname, svc, &mut listens, &mut out);
        check_uses(fleet, sname, svc, &mut out);
    }
    out
}

/// A `run_as`: a user name (`[a-z_][a-z0-9_.-]*`, at most 32 bytes) or `UID[:GID]`.
fn valid_user(s: &str) -> bool {
    let numeric = |n: &str| {
        !n.is_empty()
            && n.len() <= 10
            && n.bytes().all(|b| b.is_ascii_digit())
            && n.parse::<u32>().is_ok()
    };
    match s.split_once(':') {
        Some((u, g)) => numeric(u) && numeric(g),
        None if numeric(s) => true,
        None => {
            s.len() <= 32
                && s.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        }
    }
}

/// `uses` (service and component): services of the fleet that run in every region of the
/// user, named once; components that get peers run as processes.
fn check_uses(fleet: &Fleet, s: &str, svc: &Service, out: &mut Vec<Problem>) {
    let mut lists: Vec<(Vec<String>, &Vec<String>, Option<&str>)> = vec![(
        vec!["services".into(), s.into(), "uses".into()],
        &svc.uses,
        None,
    )];
    for (cname, comp) in &svc.components {
        lists.push((
            vec![
                "services".into(),
                s.into(),
                "components".into(),
                cname.clone(),
                "uses".into(),
            ],
            &comp.uses,
            Some(cname.as_str()),
        ));
    }
    for (path, uses, component) in lists {
        let mut seen = BTreeSet::new();
        for (i, name) in uses.iter().enumerate() {
            let mut at = path.clone();
            at.push(i.to_string());
            if !seen.insert(name) {
                out.push(p_owned(&at, format!("{name:?} is named twice")));
                continue;
            }
            let Some(used) = fleet.services.get(name) else {
                out.push(p_owned(
                    &at,
                    format!(
                        "unknown service {name:?}; the fleet's services: {}",
                        names(fleet.services.keys())
                    ),
                ));
                continue;
            };
            if name == s {
                out.push(p_owned(
                    &at,
                    format!("{s} uses itself; name the services it talks to"),
                ));
                continue;
            }
            let missing: Vec<&String> = svc
                .regions
                .iter()
                .filter(|r| !used.regions.contains(r))
                .collect();
            if !missing.is_empty() {
                out.push(p_owned(
                    &at,
                    format!(
                        "{s} runs in {}, where {name} does not run (peers are found in the user's region; {name} runs in: {})",
                        names(missing.into_iter()),
                        names(used.regions.iter())
                    ),
                ));
            }
        }
        if uses.is_empty() {
            continue;
        }
        let docker: Vec<&String> = svc
            .components
            .iter()
            .filter(|(c, comp)| {
                comp.runtime == Runtime::Docker && component.is_none_or(|only| only == c.as_str())
            })
            .map(|(c, _)| c)
            .collect();
        if !docker.is_empty() {
            out.push(p_owned(
                &path,
                format!(
                    "uses is not available to docker components yet ({}); give it to the process components that talk to these services",
                    names(docker.into_iter())
                ),
            ));
        }
    }
}

/// The fields of an `aws` region (and that no other region uses them).
fn check_aws_region(name: &str, region: &Region, out: &mut Vec<Problem>) {
    let aws_only: [(&str, bool); 6] = [
        ("aws_region", region.aws_region.is_some()),
        ("subnets", !region.subnets.is_empty()),
        ("security_groups", !region.security_groups.is_empty()),
        ("ami", region.ami.is_some()),
        ("instance_profile", region.instance_profile.is_some()),
        ("endpoint", region.endpoint.is_some()),
    ];
    if region.provider != ProviderKind::Aws {
        for (field, set) in aws_only {
            if set {
                out.push(p(
                    &["regions", name, field],
                    format!("{field} applies only to provider \"aws\""),
                ));
            }
        }
        return;
    }
    let aws_region = region.aws_region_or(name);
    if !valid_aws_region(aws_region) {
        let at: &[&str] = if region.aws_region.is_some() {
            &["regions", name, "aws_region"]
        } else {
            &["regions", name]
        };
        out.push(p(
            at,
            format!("{aws_region:?} is not an AWS region name (e.g. \"us-east-1\"); set aws_region = \"...\" when the region's own name is not one"),
        ));
    }
    if region.subnets.is_empty() {
        out.push(p(
            &["regions", name, "subnets"],
            "an aws region needs its subnets, e.g. subnets = [\"subnet-0abc...\"]",
        ));
    }
    for (i, s) in region.subnets.iter().enumerate() {
        if !aws_id(s, "subnet-") {
            out.push(p(
                &["regions", name, "subnets", &i.to_string()],
                format!("{s:?} is not a subnet id (subnet-...)"),
            ));
        }
    }
    for (i, s) in region.security_groups.iter().enumerate() {
        if !aws_id(s, "sg-") {
            out.push(p(
                &["regions", name, "security_groups", &i.to_string()],
                format!("{s:?} is not a security group id (sg-...)"),
            ));
        }
    }
    match &region.ami {
        None => out.push(p(
            &["regions", name, "ami"],
            "an aws region needs the AMI its instances boot, e.g. ami = \"ami-0abc...\" (one with the drover agent; see docs/aws.md)",
        )),
        Some(a) if !aws_id(a, "ami-") => out.push(p(
            &["regions", name, "ami"],
            format!("{a:?} is not an AMI id (ami-...)"),
        )),
        _ => {}
    }
    if let Some(e) = &region.endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            out.push(p(
                &["regions", name, "endpoint"],
                format!("{e:?} is not an http:// or https:// URL"),
            ));
        }
    }
}

/// `us-east-1`, `eu-west-3`, `ap-southeast-2`, `us-gov-west-1`, ...
fn valid_aws_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
        && !parts[parts.len() - 1].is_empty()
}

/// `t3.micro`, `c7g.2xlarge`, `u-6tb1.metal`: family.size.
fn valid_instance_type(t: &str) -> bool {
    match t.split_once('.') {
        Some((f, sz)) => {
            !f.is_empty()
                && !sz.is_empty()
                && f.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && sz
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        }
        None => false,
    }
}

/// `prefix` followed by hex digits.
fn aws_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn check_service(
    fleet: &Fleet,
    sname: &str,
    svc: &Service,
    listens: &mut BTreeMap<SocketAddr, String>,
    out: &mut Vec<Problem>,
) {
    let s = sname;
    if let Some(t) = &svc.instance_type {
        let in_aws = svc.regions.iter().any(|r| {
            fleet
                .regions
                .get(r)
                .is_some_and(|r| r.provider == ProviderKind::Aws)
        });
        if !in_aws {
            out.push(p(
                &["services", s, "instance_type"],
                "instance_type applies only to services in an aws region",
            ));
        } else if !valid_instance_type(t) {
            out.push(p(
                &["services", s, "instance_type"],
                format!("{t:?} is not an EC2 instance type (family.size, e.g. \"t3.micro\", \"c7g.large\")"),
            ));
        }
    }
    if !valid_name(s) {
        out.push(p(
            &["services", s],
            format!("{s:?} is not a valid service name; {NAME_RULE}"),
        ));
    }
    if svc.regions.is_empty() {
        out.push(p(
            &["services", s, "regions"],
            "a service needs at least one region",
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, r) in svc.regions.iter().enumerate() {
        let idx = i.to_string();
        if !fleet.regions.contains_key(r) {
            let known: Vec<_> = fleet.regions.keys().map(|k| format!("{k:?}")).collect();
            out.push(p(
                &["services", s, "regions", &idx],
                format!(
                    "unknown region {r:?}; declared regions: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        if !seen.insert(r) {
            out.push(p(
                &["services", s, "regions", &idx],
                format!("region {r:?} is listed twice"),
            ));
        }
    }
    let c = svc.capacity;
    if c.min > c.desired || c.desired > c.max {
        let field = if c.min > c.desired { "min" } else { "desired" };
        out.push(p(
            &["services", s, "capacity", field],
            format!(
                "min = {}, desired = {}, max = {}: need min <= desired <= max",
                c.min, c.desired, c.max
            ),
        ));
    }
    if c.max == 0 {
        out.push(p(
            &["services", s, "capacity", "max"],
            "max must be at least 1",
        ));
    }
    if c.max > MAX_GROUP_SIZE {
        out.push(p(
            &["services", s, "capacity", "max"],
            format!(
                "max = {} is above the limit of {MAX_GROUP_SIZE} instances per group",
                c.max
            ),
        ));
    }
    check_schedules(s, svc, out);
    let r = &svc.rollout;
    if r.max_surge == 0 && r.max_unavailable == 0 {
        out.push(p(
            &["services", s, "rollout", "max_surge"],
            "max_surge and max_unavailable are both 0, so no instance could ever be replaced; set max_surge >= 1 or max_unavailable >= 1",
        ));
    }
    if r.healthy_deadline.0 <= r.min_healthy_time.0 {
        out.push(p(
            &["services", s, "rollout", "healthy_deadline"],
            format!(
                "healthy_deadline ({}) must be longer than min_healthy_time ({})",
                r.healthy_deadline, r.min_healthy_time
            ),
        ));
    }
    if !r.waves.is_empty() {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (k, wave) in r.waves.iter().enumerate() {
            for region in wave {
                let path = [
                    "services".to_string(),
                    s.to_string(),
                    "rollout".into(),
                    "waves".into(),
                    k.to_string(),
                ];
                if region != "*" && !svc.regions.contains(region) {
                    out.push(p_owned(
                        &path,
                        format!(
                            "wave {} names region {region:?}, which {s} does not run in; its regions: {}",
                            k + 1,
                            svc.regions.join(", ")
                        ),
                    ));
                }
                if let Some(first) = seen.insert(region.as_str(), k) {
                    out.push(p_owned(
                        &path,
                        format!(
                            "{region:?} is in wave {} and in wave {}: a region goes in one wave",
                            first + 1,
                            k + 1
                        ),
                    ));
                }
            }
        }
        if !seen.contains_key("*") {
            for region in &svc.regions {
                if !seen.contains_key(region.as_str()) {
                    out.push(p(
                        &["services", s, "rollout", "waves"],
                        format!(
                            "region {region:?} of {s} is in no wave: add it to one, or end with [\"*\"]"
                        ),
                    ));
                }
            }
        }
        if r.wave_bake.0.is_zero() && r.waves.len() > 1 {
            out.push(p(
                &["services", s, "rollout", "wave_bake"],
                "wave_bake = 0s: give a wave time to show trouble, e.g. 10m",
            ));
        }
    }
    if let Some(c) = &r.canary {
        let at = |f: &'static str| ["services", s, "rollout", "canary", f];
        if c.instances.is_some() && c.percent.is_some() {
            out.push(p(
                &at("percent"),
                "give the canary's size as instances or as percent, not both",
            ));
        }
        if c.instances == Some(0) {
            out.push(p(
                &at("instances"),
                "instances = 0: a canary needs at least 1",
            ));
        }
        if r.max_surge == 0 {
            out.push(p(
                &["services", s, "rollout", "canary"],
                "max_surge = 0: canaries serve beside the old instances, within the surge; set rollout.max_surge >= 1",
            ));
        } else if c.instances.is_some_and(|n| n > r.max_surge) {
            out.push(p(
                &at("instances"),
                format!(
                    "instances = {} is more than max_surge = {}: canaries serve beside the old instances, within the surge; raise max_surge or lower instances",
                    c.instances.unwrap_or(0),
                    r.max_surge
                ),
            ));
        }
        if c.percent.is_some_and(|p| p == 0 || p > 100) {
            out.push(p(
                &at("percent"),
                format!("percent = {}: use 1 to 100", c.percent.unwrap_or(0)),
            ));
        }
        if c.bake.0.is_zero() {
            out.push(p(
                &at("bake"),
                "bake = 0s: give the canaries time to serve, e.g. 5m",
            ));
        }
    }
    for (k, m) in r.analysis.metrics.iter().enumerate() {
        let at = |f: &'static str| {
            vec![
                "services".to_string(),
                s.to_string(),
                "rollout".into(),
                "analysis".into(),
                "metrics".into(),
                k.to_string(),
                f.to_string(),
            ]
        };
        let known = svc
            .components
            .values()
            .any(|c| c.custom_metrics.contains_key(&m.metric));
        if !known {
            let names: Vec<&str> = svc
                .components
                .values()
                .flat_map(|c| c.custom_metrics.keys().map(String::as_str))
                .collect();
            out.push(p_owned(
                &at("metric"),
                format!(
                    "no component of {s} reports the custom metric {:?}; its custom_metrics: {}",
                    m.metric,
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        }
        if !(m.max_ratio.is_finite() && m.max_ratio >= 1.0) {
            out.push(p_owned(
                &at("max_ratio"),
                format!("max_ratio = {}: use a number >= 1, e.g. 1.5", m.max_ratio),
            ));
        }
        if !(m.tolerance.is_finite() && m.tolerance >= 0.0) {
            out.push(p_owned(
                &at("tolerance"),
                "tolerance must be a number >= 0".into(),
            ));
        }
    }
    if !r.analysis.is_default() && r.canary.is_none() {
        out.push(p(
            &["services", s, "rollout", "analysis"],
            "analysis judges a canary: add rollout.canary = { instances = 1, bake = \"5m\" }",
        ));
    }
    if let Some(a) = &svc.autoscale {
        let at = |f: &'static str| ["services", s, "autoscale", f];
        match a.custom_name() {
            Some(name) => {
                let known = svc
                    .components
                    .values()
                    .any(|c| c.custom_metrics.contains_key(name));
                if !known {
                    let declared: Vec<&String> = svc
                        .components
                        .values()
                        .flat_map(|c| c.custom_metrics.keys())
                        .collect();
                    out.push(p(
                        &at("metric"),
                        format!(
                            "no component of this service declares custom_metrics.{name}; declared: {}",
                            names(declared.into_iter())
                        ),
                    ));
                }
            }
            None if a.metric == "cpu" => {}
            None => out.push(p(
                &at("metric"),
                format!(
                    "unknown metric {:?}; allowed: \"cpu\" or \"custom:NAME\" (a component's custom_metrics.NAME)",
                    a.metric
                ),
            )),
        }
        if !(a.target.is_finite() && a.target > 0.0) {
            out.push(p(
                &at("target"),
                format!("target {} must be a number above 0", a.target),
            ));
        }
        if !(a.tolerance.is_finite() && (0.0..1.0).contains(&a.tolerance)) {
            out.push(p(
                &at("tolerance"),
                format!(
                    "tolerance {} must be at least 0 and below 1 (0.1 = 10%)",
                    a.tolerance
                ),
            ));
        }
        if c.min == c.max {
            out.push(p(
                &["services", s, "autoscale"],
                format!("capacity.min = capacity.max = {}: there is nothing to scale; widen the range or remove autoscale", c.min),
            ));
        }
    }
    if svc.components.is_empty() {
        out.push(p(
            &["services", s, "components"],
            "a service needs at least one component: add [services.NAME.components.NAME]",
        ));
    }
    // The heartbeat's limits (api::limits): a valid fleet's agents are never refused.
    use crate::api::limits;
    if svc.components.len() > limits::COMPONENTS {
        out.push(p(
            &["services", s, "components"],
            format!(
                "{} components: a service may have at most {} (the most a heartbeat carries)",
                svc.components.len(),
                limits::COMPONENTS
            ),
        ));
    }
    let metric_names: std::collections::BTreeSet<&String> = svc
        .components
        .values()
        .flat_map(|c| c.custom_metrics.keys())
        .collect();
    if metric_names.len() > limits::CUSTOM_METRICS {
        // Located at the first component past the limit.
        let mut seen = std::collections::BTreeSet::new();
        let at = svc.components.iter().find_map(|(cname, c)| {
            c.custom_metrics.keys().for_each(|k| {
                seen.insert(k);
            });
            (seen.len() > limits::CUSTOM_METRICS).then_some(cname.as_str())
        });
        out.push(p(
            &[
                "services",
                s,
                "components",
                at.unwrap_or_default(),
                "custom_metrics",
            ],
            format!(
                "{} custom metrics in service {s}: an instance may report at most {}",
                metric_names.len(),
                limits::CUSTOM_METRICS
            ),
        ));
    }
    // Port numbers are shared by all components of an instance (one address per instance).
    let mut port_owner: BTreeMap<u16, String> = BTreeMap::new();
    for (cname, comp) in &svc.components {
        let base = ["services", s, "components", cname.as_str()];
        if !valid_name(cname) {
            out.push(p(
                &base,
                format!("{cname:?} is not a valid component name; {NAME_RULE}"),
            ));
        }
        if comp.version.trim().is_empty() || comp.version.chars().any(char::is_whitespace) {
            out.push(p(
                &join(&base, &["version"]),
                format!(
                    "version {:?} must be non-empty with no spaces, e.g. \"v1\" or \"1.4.2\"",
                    comp.version
                ),
            ));
        }
        if comp.version.len() > limits::VERSION {
            out.push(p(
                &join(&base, &["version"]),
                format!(
                    "version is {} bytes long: at most {} are allowed",
                    comp.version.len(),
                    limits::VERSION
                ),
            ));
        }
        match comp.runtime {
            Runtime::Process => match &comp.command {
                None => out.push(p(
                    &base,
                    "runtime \"process\" needs a command, e.g. command = \"/usr/bin/myapp\"",
                )),
                Some(cmd) if cmd.trim().is_empty() => {
                    out.push(p(&join(&base, &["command"]), "command is empty"))
                }
                Some(_) => {}
            },
            Runtime::Docker => check_docker(comp, &base, out),
        }
        if comp.runtime != Runtime::Docker {
            check_docker_only_fields(comp, &base, out);
        }
        for (pname, port) in &comp.ports {
            if !valid_name(pname) {
                out.push(p(
                    &join(&base, &["ports", pname]),
                    format!("{pname:?} is not a valid port name; {NAME_RULE}"),
                ));
            }
            if *port == 0 {
                out.push(p(
                    &join(&base, &["ports", pname]),
                    "port 0 is not allowed; use 1-65535",
                ));
            } else if let Some(prev) = port_owner.insert(*port, format!("{cname}.{pname}")) {
                out.push(p(
                    &join(&base, &["ports", pname]),
                    format!(
                        "port {port} is already used by {prev} in this service; every port of an instance must be distinct"
                    ),
                ));
            }
        }
        for k in comp.env.keys() {
            let ok = !k.is_empty()
                && !k.as_bytes()[0].is_ascii_digit()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                out.push(p(
                    &join(&base, &["env", k]),
                    format!("{k:?} is not a valid environment variable name; use letters, digits and '_', not starting with a digit"),
                ));
            }
        }
        // Secret values are never quoted in a message: only their names.
        for (k, v) in &comp.secret_env {
            let ok = !k.is_empty()
                && !k.as_bytes()[0].is_ascii_digit()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                out.push(p(
                    &join(&base, &["secret_env", k]),
                    format!("{k:?} is not a valid environment variable name; use letters, digits and '_', not starting with a digit"),
                ));
            } else if comp.env.contains_key(k) {
                out.push(p(
                    &join(&base, &["secret_env", k]),
                    format!("{k} is in both env and secret_env; keep it in one of them"),
                ));
            } else if v.contains('\0') {
                out.push(p(
                    &join(&base, &["secret_env", k]),
                    format!(
                        "the value of {k} contains a NUL character, which no environment can hold"
                    ),
                ));
            }
        }
        if let Some(a) = &comp.artifact {
            if a.sha256.len() != 64 || !a.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push(p(
                    &join(&base, &["artifact", "sha256"]),
                    format!(
                        "{:?} is not a sha256: expected 64 hex digits (run `sha256sum FILE`)",
                        a.sha256
                    ),
                ));
            }
            if a.url.trim().is_empty() {
                out.push(p(
                    &join(&base, &["artifact", "url"]),
                    "artifact url is empty",
                ));
            } else if a.url.contains("://")
                && !(a.url.starts_with("http://")
                    || a.url.starts_with("https://")
                    || a.url.starts_with("file://"))
            {
                out.push(p(
                    &join(&base, &["artifact", "url"]),
                    format!(
                        "unsupported artifact url {:?}; allowed: http://, https://, file:// or a path",
                        a.url
                    ),
                ));
            } else if !a.url.ends_with(".tar.gz") && !a.url.ends_with(".tgz") {
                out.push(p(
                    &join(&base, &["artifact", "url"]),
                    format!("artifact {:?} must be a .tar.gz (or .tgz) archive", a.url),
                ));
            }
        }
        if let Some(h) = &comp.health {
            let hp = |f: &'static str| join(&base, &["health", f]);
            match h.kind {
                HealthKind::Tcp | HealthKind::Http => match &h.port {
                    None => out.push(p(
                        &join(&base, &["health"]),
                        format!(
                            "a {} health check needs port = \"NAME\" naming one of this component's ports",
                            if h.kind == HealthKind::Tcp { "tcp" } else { "http" }
                        ),
                    )),
                    Some(port) if !comp.ports.contains_key(port) => out.push(p(
                        &hp("port"),
                        format!(
                            "unknown port {port:?}; this component's ports: {}",
                            names(comp.ports.keys())
                        ),
                    )),
                    Some(_) => {}
                },
                HealthKind::Exec => {
                    if h.command.is_empty() || h.command[0].trim().is_empty() {
                        out.push(p(
                            &join(&base, &["health"]),
                            "an exec health check needs command = [\"program\", \"arg\", ...]",
                        ));
                    }
                }
            }
            if h.kind == HealthKind::Http {
                match &h.path {
                    None => out.push(p(
                        &join(&base, &["health"]),
                        "an http health check needs path = \"/...\"",
                    )),
                    Some(path) if !path.starts_with('/') => {
                        out.push(p(&hp("path"), format!("path {path:?} must start with '/'")))
                    }
                    Some(_) => {}
                }
            }
            if h.interval.0.is_zero() {
                out.push(p(&hp("interval"), "interval must be greater than 0"));
            }
            if h.timeout.0.is_zero() || h.timeout.0 > h.interval.0 {
                out.push(p(
                    &hp("timeout"),
                    format!(
                        "timeout ({}) must be greater than 0 and at most the interval ({})",
                        h.timeout, h.interval
                    ),
                ));
            }
            if h.healthy_threshold == 0 {
                out.push(p(&hp("healthy_threshold"), "must be at least 1"));
            }
            if h.unhealthy_threshold == 0 {
                out.push(p(&hp("unhealthy_threshold"), "must be at least 1"));
            }
        }
        for (mname, m) in &comp.custom_metrics {
            if !valid_name(mname) {
                out.push(p(
                    &join(&base, &["custom_metrics", mname]),
                    format!("{mname:?} is not a valid metric name; {NAME_RULE}"),
                ));
            }
            if !comp.ports.contains_key(&m.port) {
                out.push(p(
                    &join(&base, &["custom_metrics", mname, "port"]),
                    format!(
                        "unknown port {:?}; this component's ports: {}",
                        m.port,
                        names(comp.ports.keys())
                    ),
                ));
            }
            if !m.path.starts_with('/') {
                out.push(p(
                    &join(&base, &["custom_metrics", mname, "path"]),
                    format!("path {:?} must start with '/'", m.path),
                ));
            }
        }
        let rp = &comp.restart;
        if rp.max_delay.0 < rp.initial_delay.0 {
            out.push(p(
                &join(&base, &["restart", "max_delay"]),
                format!(
                    "max_delay ({}) must be at least initial_delay ({})",
                    rp.max_delay, rp.initial_delay
                ),
            ));
        }
        if crate::signal_number(&comp.stop_signal).is_none() {
            out.push(p(
                &join(&base, &["stop_signal"]),
                format!(
                    "unknown signal {:?}; allowed: SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGKILL",
                    comp.stop_signal
                ),
            ));
        }
        if let Some(sig) = &comp.drain_signal {
            if crate::drain_signal_number(sig).is_none() {
                let why = if crate::signal_number(sig).is_some() {
                    format!("{sig:?} cannot be a drain signal: it ends the process at once (that is stop_signal's job)")
                } else {
                    format!("unknown signal {sig:?}")
                };
                out.push(p(
                    &join(&base, &["drain_signal"]),
                    format!(
                        "{why}; allowed: {}; or leave drain_signal out",
                        crate::DRAIN_SIGNALS
                    ),
                ));
            }
        }
        // Placeholders must name something the agent knows.
        let ports: Vec<&str> = comp.ports.keys().map(String::as_str).collect();
        let mut texts: Vec<(Vec<&str>, &str)> = Vec::new();
        if let Some(cmd) = &comp.command {
            texts.push((join(&base, &["command"]), cmd));
        }
        let idxs: Vec<String> = (0..comp.args.len()).map(|i| i.to_string()).collect();
        for (i, a) in comp.args.iter().enumerate() {
            texts.push((join(&base, &["args", &idxs[i]]), a));
        }
        for (k, v) in &comp.env {
            texts.push((join(&base, &["env", k]), v));
        }
        if let Some(a) = &comp.artifact {
            texts.push((join(&base, &["artifact", "url"]), &a.url));
        }
        for (path, text) in texts {
            if let Err(e) = subst::check_placeholders(text, &ports) {
                out.push(p(&path, e.to_string()));
            }
        }
    }
    if let Some(ing) = &svc.ingress {
        match ing.listen.parse::<SocketAddr>() {
            Err(_) => out.push(p(
                &["services", s, "ingress", "listen"],
                format!(
                    "{:?} is not an ip:port address, e.g. \"127.0.0.1:8080\"",
                    ing.listen
                ),
            )),
            Ok(addr) => {
                // One listener per group: several regions of a service that are not on AWS
                // (whose ingress is a load balancer of its own) need their own addresses.
                let local: Vec<&String> = svc
                    .regions
                    .iter()
                    .filter(|r| {
                        fleet
                            .regions
                            .get(*r)
                            .is_some_and(|x| x.provider != ProviderKind::Aws)
                    })
                    .collect();
                if local.is_empty() {
                    if let Some(other) = listens.insert(addr, format!("service {s:?}")) {
                        out.push(p(
                            &["services", s, "ingress", "listen"],
                            format!("{addr} is already the ingress of {other}"),
                        ));
                    }
                }
                for region in &local {
                    let (text, path) = match ing.listen_in.get(*region) {
                        Some(t) => (
                            t.clone(),
                            vec![
                                "services".to_string(),
                                s.to_string(),
                                "ingress".into(),
                                "listen_in".into(),
                                region.to_string(),
                            ],
                        ),
                        None => (
                            ing.listen.clone(),
                            vec![
                                "services".to_string(),
                                s.to_string(),
                                "ingress".into(),
                                "listen".into(),
                            ],
                        ),
                    };
                    let Ok(a) = text.parse::<SocketAddr>() else {
                        out.push(p_owned(
                            &path,
                            format!("{text:?} is not an ip:port address, e.g. \"127.0.0.1:8081\""),
                        ));
                        continue;
                    };
                    let who = if local.len() == 1 {
                        format!("service {s:?}")
                    } else {
                        format!("service {s:?} in region {region}")
                    };
                    if let Some(other) = listens.insert(a, who) {
                        out.push(p_owned(
                            &path,
                            format!(
                                "{a} is already the ingress of {other}; each region's group needs its own address: set ingress.listen_in = {{ {region} = \"IP:PORT\" }}"
                            ),
                        ));
                    }
                }
                for region in ing.listen_in.keys() {
                    if !svc.regions.contains(region) {
                        out.push(p(
                            &["services", s, "ingress", "listen_in"],
                            format!("listen_in names region {region:?}, which {s} does not run in"),
                        ));
                    }
                }
            }
        }
        match &ing.component {
            Some(cname) => match svc.components.get(cname) {
                None => out.push(p(
                    &["services", s, "ingress", "component"],
                    format!(
                        "unknown component {cname:?}; this service's components: {}",
                        names(svc.components.keys())
                    ),
                )),
                Some(comp) if !comp.ports.contains_key(&ing.port) => out.push(p(
                    &["services", s, "ingress", "port"],
                    format!(
                        "component {cname:?} has no port {:?}; its ports: {}",
                        ing.port,
                        names(comp.ports.keys())
                    ),
                )),
                Some(_) => {}
            },
            None => {
                let owners: Vec<&String> = svc
                    .components
                    .iter()
                    .filter(|(_, c)| c.ports.contains_key(&ing.port))
                    .map(|(n, _)| n)
                    .collect();
                if owners.is_empty() {
                    out.push(p(
                        &["services", s, "ingress", "port"],
                        format!(
                            "no component of this service has a port named {:?}",
                            ing.port
                        ),
                    ));
                } else if owners.len() > 1 {
                    out.push(p(
                        &["services", s, "ingress", "port"],
                        format!(
                            "several components have a port named {:?} ({}); add component = \"NAME\"",
                            ing.port,
                            names(owners.into_iter())
                        ),
                    ));
                }
            }
        }
    }
}

/// `[[services.NAME.schedule]]`: a cron that fires, an IANA time zone, a duration, bounds
/// that only raise and agree with each other.
fn check_schedules(s: &str, svc: &Service, out: &mut Vec<Problem>) {
    let c = svc.capacity;
    for (i, sch) in svc.schedule.iter().enumerate() {
        let idx = i.to_string();
        let at = |f: &'static str| vec!["services", s, "schedule", idx.as_str(), f];
        let base = ["services", s, "schedule", idx.as_str()];
        match crate::cron::CronTz::parse(&sch.cron, &sch.timezone) {
            Err(e) => {
                let field = if crate::cron::parse_tz(&sch.timezone).is_err() {
                    "timezone"
                } else {
                    "cron"
                };
                out.push(p(&at(field), e.0));
            }
            Ok(cron) if !cron.fires() => out.push(p(
                &at("cron"),
                format!(
                    "{:?} never fires (no date matches it); check the day of month, month and day of week",
                    sch.cron
                ),
            )),
            Ok(_) => {}
        }
        if sch.duration.as_millis() < 60_000 {
            out.push(p(
                &at("duration"),
                format!(
                    "duration = {:?} is shorter than a minute; how long the raised bounds hold, e.g. \"4h\"",
                    sch.duration.to_string()
                ),
            ));
        }
        if sch.min.is_none() && sch.desired.is_none() && sch.max.is_none() {
            out.push(p(
                &base,
                "a schedule raises min, desired or max; set at least one, e.g. min = 20",
            ));
        }
        let max = sch.max.unwrap_or(c.max).max(c.max);
        let max_from = if sch.max.is_some() {
            "the schedule's max"
        } else {
            "capacity.max"
        };
        if let Some(m) = sch.max {
            if m < c.max {
                out.push(p(
                    &at("max"),
                    format!("max = {m} is below capacity.max = {}: a schedule only raises bounds; leave max out or raise it", c.max),
                ));
            } else if m > MAX_GROUP_SIZE {
                out.push(p(
                    &at("max"),
                    format!("max = {m} is above the limit of {MAX_GROUP_SIZE} instances per group"),
                ));
            }
        }
        if let Some(m) = sch.min {
            if m > max {
                out.push(p(
                    &at("min"),
                    format!("min = {m} is above max = {max} ({max_from}); raise max in the schedule or lower min"),
                ));
            }
        }
        if let Some(d) = sch.desired {
            if d > max {
                out.push(p(
                    &at("desired"),
                    format!("desired = {d} is above max = {max} ({max_from}); raise max in the schedule or lower desired"),
                ));
            } else if sch.min.is_some_and(|m| d < m) {
                out.push(p(
                    &at("desired"),
                    format!(
                        "desired = {d} is below the schedule's min = {}; need min <= desired",
                        sch.min.unwrap_or(0)
                    ),
                ));
            }
        }
    }
}

fn join<'a>(base: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend_from_slice(rest);
    v
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<String> = it.map(|s| format!("{s:?}")).collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

/// Settings that only a container has, on a component of another runtime.
fn check_docker_only_fields(comp: &Component, base: &[&str], out: &mut Vec<Problem>) {
    let set: [(&str, bool); 7] = [
        ("network", comp.network.is_some()),
        ("image", comp.image.is_some()),
        ("entrypoint", comp.entrypoint.is_some()),
        ("container_ports", !comp.container_ports.is_empty()),
        ("volumes", !comp.volumes.is_empty()),
        ("cpus", comp.cpus.is_some()),
        ("memory", comp.memory.is_some()),
    ];
    for (field, present) in set {
        if present {
            out.push(p(
                &join(base, &[field]),
                format!("{field} applies only to runtime = \"docker\"; this component's runtime is \"process\""),
            ));
        }
    }
    // A process's output is kept by the agent in rotated files: only their size and count.
    if let Some(log) = &comp.log {
        if log.driver != "json-file" {
            out.push(p(
                &join(base, &["log", "driver"]),
                format!("{:?}: a process component's output is kept by its agent in rotated files; leave driver out (only runtime = \"docker\" takes another log driver)", log.driver),
            ));
        }
        for (k, v) in &log.options {
            let ok = match k.as_str() {
                "max-size" => {
                    crate::image::parse_memory(v).is_some_and(|n| n >= crate::logs::MIN_MAX_SIZE)
                }
                "max-file" => v
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|n| (1..=100).contains(&n)),
                crate::logs::FLIGHT_SIZE_OPTION => flight_size_ok(v),
                _ => {
                    out.push(p(
                        &join(base, &["log", "options", k]),
                        format!("{k:?}: a process component's log takes only max-size (e.g. \"10m\"), max-file (e.g. \"3\") and flight-size (e.g. \"256k\")"),
                    ));
                    continue;
                }
            };
            if !ok {
                out.push(p(
                    &join(base, &["log", "options", k]),
                    match k.as_str() {
                        "max-size" => format!("{v:?} is not a size of at least 64k, e.g. \"10m\""),
                        crate::logs::FLIGHT_SIZE_OPTION => flight_size_error(v),
                        _ => format!("{v:?} is not a number of files from 1 to 100"),
                    },
                ));
            }
        }
    }
}

/// The rules of a `runtime = "docker"` component.
fn check_docker(comp: &Component, base: &[&str], out: &mut Vec<Problem>) {
    use crate::image::{parse_memory, valid_tag, ImageRef};
    let at = |f: &'static str| join(base, &[f]);
    match &comp.image {
        None => out.push(p(
            base,
            "runtime \"docker\" needs an image, e.g. image = \"registry.example.com:5000/web:{version}\" (with no tag, the version is the tag)",
        )),
        Some(image) => {
            if let Err(e) = subst::check_placeholders(image, &[]) {
                out.push(p(&at("image"), e.to_string()));
            } else if image.contains('{')
                && image
                    .replace("{version}", "")
                    .contains(['{', '}'])
            {
                out.push(p(
                    &at("image"),
                    format!("{image:?}: the only placeholder an image may hold is {{version}}"),
                ));
            } else {
                let tag_is_version =
                    ImageRef::parse(image).is_ok_and(|w| w.tag.is_none() && w.digest.is_none());
                let rendered = crate::image::with_version(image, &comp.version);
                if tag_is_version && !valid_tag(&comp.version) {
                    out.push(p(
                        &join(base, &["version"]),
                        format!(
                            "version {:?} is the image's tag here, and is not a valid tag: use 1-128 letters, digits, '_', '.' or '-'",
                            comp.version
                        ),
                    ));
                } else if let Err(e) = ImageRef::parse(&rendered) {
                    out.push(p(
                        &at("image"),
                        format!("{rendered:?} is not a valid image reference: {e}"),
                    ));
                }
            }
        }
    }
    if comp.artifact.is_some() {
        out.push(p(
            &at("artifact"),
            "artifact applies only to runtime \"process\"; a container's files come from its image",
        ));
    }
    if let Some(cmd) = &comp.command {
        if cmd.trim().is_empty() {
            out.push(p(
                &at("command"),
                "command is empty; leave it out to run the image's own CMD",
            ));
        }
    }
    let ports: Vec<&str> = comp.ports.keys().map(String::as_str).collect();
    if let Some(ep) = &comp.entrypoint {
        if ep.is_empty() || ep[0].trim().is_empty() {
            out.push(p(
                &at("entrypoint"),
                "entrypoint is empty; leave it out to keep the image's ENTRYPOINT",
            ));
        }
        for (i, a) in ep.iter().enumerate() {
            if let Err(e) = subst::check_placeholders(a, &ports) {
                let i = i.to_string();
                out.push(p(&join(base, &["entrypoint", &i]), e.to_string()));
            }
        }
    }
    for (name, port) in &comp.container_ports {
        if !comp.ports.contains_key(name) {
            out.push(p(
                &join(base, &["container_ports", name]),
                format!(
                    "unknown port {name:?}: container_ports only moves a port declared in ports; this component's ports: {}",
                    names(comp.ports.keys())
                ),
            ));
        } else if *port == 0 {
            out.push(p(
                &join(base, &["container_ports", name]),
                "port 0 is not allowed; use 1-65535",
            ));
        }
    }
    let mut targets = BTreeSet::new();
    for (i, v) in comp.volumes.iter().enumerate() {
        let idx = i.to_string();
        let path = join(base, &["volumes", &idx]);
        if let Err(e) = subst::check_placeholders(v, &ports) {
            out.push(p(&path, e.to_string()));
            continue;
        }
        let parts: Vec<&str> = v.split(':').collect();
        let (source, target, mode) = match parts.as_slice() {
            [s, t] => (*s, *t, None),
            [s, t, m] => (*s, *t, Some(*m)),
            _ => {
                out.push(p(
                    &path,
                    format!("{v:?} is not SOURCE:TARGET[:ro|rw], e.g. \"{{dir}}/data:/data\" or \"cache:/cache:ro\""),
                ));
                continue;
            }
        };
        let named = !source.starts_with('/') && !source.starts_with('{');
        if source.is_empty()
            || (named
                && !(source.as_bytes()[0].is_ascii_alphanumeric()
                    && source
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))))
        {
            out.push(p(
                &path,
                format!("source {source:?} is neither an absolute host path, a path under {{dir}}, nor a volume name (letters, digits, '_', '.', '-')"),
            ));
        }
        if !target.starts_with('/') {
            out.push(p(
                &path,
                format!("target {target:?} must be an absolute path inside the container"),
            ));
        } else if !targets.insert(target) {
            out.push(p(&path, format!("target {target} is mounted twice")));
        }
        if let Some(m) = mode {
            if m != "ro" && m != "rw" {
                out.push(p(
                    &path,
                    format!("mode {m:?} is not allowed; use \"ro\" or \"rw\""),
                ));
            }
        }
    }
    if let Some(c) = comp.cpus {
        if !(c.is_finite() && c > 0.0 && c <= 1024.0) {
            out.push(p(
                &at("cpus"),
                format!("cpus = {c} must be above 0 (0.5 = half a core) and at most 1024"),
            ));
        }
    }
    if let Some(m) = &comp.memory {
        match parse_memory(m) {
            None => out.push(p(
                &at("memory"),
                format!("{m:?} is not a memory size; use e.g. \"256m\", \"1.5g\" or \"512MiB\""),
            )),
            Some(bytes) if bytes < 6 << 20 => out.push(p(
                &at("memory"),
                format!("memory = {m:?} is below Docker's minimum of 6m"),
            )),
            Some(_) => {}
        }
    }
    if let Some(net) = &comp.network {
        let ok = !net.is_empty()
            && net.as_bytes()[0].is_ascii_alphanumeric()
            && net
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok || net == "none" {
            out.push(p(
                &at("network"),
                format!("{net:?} is not a network for a component: use \"bridge\" (the default), \"host\" or the name of a network of the engine"),
            ));
        } else if net == "host" && !comp.container_ports.is_empty() {
            out.push(p(
                &at("container_ports"),
                "with network = \"host\" the container binds the instance's ports itself: container_ports cannot move them",
            ));
        }
    }
    if let Some(log) = &comp.log {
        let ok = !log.driver.is_empty()
            && log
                .driver
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b));
        if !ok {
            out.push(p(
                &join(base, &["log", "driver"]),
                format!("{:?} is not a log driver name, e.g. \"json-file\", \"local\", \"journald\", \"none\"", log.driver),
            ));
        }
        for (k, v) in &log.options {
            if k.is_empty() || k.contains(char::is_whitespace) {
                out.push(p(
                    &join(base, &["log", "options", k]),
                    format!("{k:?} is not a log option name, e.g. \"max-size\""),
                ));
            } else if k == crate::logs::FLIGHT_SIZE_OPTION && !flight_size_ok(v) {
                out.push(p(&join(base, &["log", "options", k]), flight_size_error(v)));
            }
        }
    }
}

/// A `log.options.flight-size`: a size from 4k to 1m.
fn flight_size_ok(v: &str) -> bool {
    crate::image::parse_memory(v).is_some_and(|n| {
        (crate::logs::FLIGHT_BYTES_MIN as u64..=crate::logs::FLIGHT_BYTES_MAX as u64).contains(&n)
    })
}

fn flight_size_error(v: &str) -> String {
    format!("{v:?} is not a flight recorder size from 4k to 1m, e.g. \"256k\" (the default is 64k)")
}
