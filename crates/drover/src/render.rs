//! Human output: tables for status, events and history, and the diff of an apply.

use comfy_table::{presets::UTF8_BORDERS_ONLY, Cell, ContentArrangement, Table};
use drover_model::api::{ApplyResponse, FleetStatus, RevisionSummary, ScheduleWindow};
use drover_model::Event;

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().map(Cell::new));
    if t.width().is_none() {
        // Not a terminal: wrap long cells at a readable width instead of one endless line.
        t.set_width(140);
    }
    t
}

/// `2026-11-25 17:38:21` (UTC) from milliseconds since the epoch.
pub fn time(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn age(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

fn snake<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Who leads, when several servers share an etcd store (nothing to say for one server).
fn control_plane(h: &drover_model::api::Health) -> Option<String> {
    if h.store != "etcd" {
        return None;
    }
    let me = h.server.as_ref().map(|s| s.url.as_str()).unwrap_or("?");
    Some(match &h.leader {
        Some(l) if h.role == "leader" => format!("control plane: {me} leads ({})\n", l.id),
        Some(l) => format!(
            "control plane: {} leads ({}); {me} is a follower and forwards to it\n",
            l.url, l.id
        ),
        None => format!(
            "control plane: no server leads now ({}); {me} is a candidate\n",
            h.problem.as_deref().unwrap_or("an election is under way")
        ),
    })
}

/// How much of the instances `status` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// Groups only, and how to list their instances.
    Summary,
    /// Every instance in the answer.
    All,
    /// One page of one group's instances (the answer holds that page only).
    Page { page: usize, per_page: usize },
}

pub fn status(s: &FleetStatus, listing: Listing) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut out = String::new();
    if let Some(line) = s.control_plane.as_ref().and_then(control_plane) {
        out.push_str(&line);
    }
    match (&s.fleet, s.revision) {
        (Some(f), Some(r)) => out.push_str(&format!("fleet {f}, revision {r}\n")),
        _ => {
            out.push_str("nothing applied yet: run `drover apply FILE`\n");
            return out;
        }
    }
    let mut groups = table(&[
        "GROUP", "PROVIDER", "GEN", "VERSIONS", "HEALTHY", "DESIRED", "MIN..MAX", "INGRESS",
        "ROLLOUT", "SCALING",
    ]);
    for g in &s.groups {
        let r = &g.rollout;
        let rollout = if r.held && !r.in_progress {
            "held by hand".to_string()
        } else if r.wave_pending && !r.in_progress {
            format!("waits for wave {}", r.wave)
        } else if r.in_progress && r.paused {
            format!(
                "paused at gen {}: {}/{} healthy on it, {} stale",
                g.generation, r.current_healthy, g.desired, r.stale
            )
        } else if r.in_progress {
            format!(
                "{} to gen {}: {}/{} healthy on it, {} stale",
                if r.reverted_from > 0 {
                    "reverting"
                } else {
                    "rolling out"
                },
                g.generation,
                r.current_healthy,
                g.desired,
                r.stale
            )
        } else if r.failed_generation > 0 && r.failed_generation >= g.generation {
            format!("gen {} failed", r.failed_generation)
        } else {
            "-".to_string()
        };
        groups.add_row(vec![
            g.group.clone(),
            g.provider.clone(),
            g.generation.to_string(),
            g.versions.clone(),
            format!("{}/{}", g.healthy, g.desired),
            g.desired.to_string(),
            format!("{}..{}", g.min, g.max),
            g.ingress.clone().unwrap_or_else(|| "-".into()),
            rollout,
            scaling(g),
        ]);
    }
    out.push_str(&groups.to_string());
    out.push('\n');
    for g in &s.groups {
        if let Some(sch) = &g.schedule {
            out.push_str(&group_schedule(&g.group, sch));
        }
    }
    for g in &s.groups {
        let r = &g.rollout;
        if let (Some(why), true) = (&r.failure, r.failed_generation > 0) {
            out.push_str(&format!(
                "{}: rollout to generation {} failed: {}\n",
                g.group, r.failed_generation, why
            ));
        }
    }
    out.push_str(&balancers(s));
    let total: u32 = s
        .groups
        .iter()
        .map(|g| g.rollout.current + g.rollout.stale)
        .sum();
    match listing {
        Listing::Summary => {
            out.push_str(&format!(
                "{total} instances; `drover status GROUP` lists a group's, 100 a page (--page N), `drover status --all` every one\n"
            ));
            return out;
        }
        Listing::Page { page, per_page } => {
            if let Some(g) = s.groups.iter().find(|g| !g.instances.is_empty()) {
                let n = (g.rollout.current + g.rollout.stale) as usize;
                let pages = n.div_ceil(per_page).max(1);
                out.push_str(&format!(
                    "{}: page {page} of {pages} ({n} instances, {per_page} a page){}\n",
                    g.group,
                    if page < pages {
                        format!("; --page {} for the next", page + 1)
                    } else {
                        String::new()
                    }
                ));
            } else {
                out.push_str(&format!("page {page}: no instances\n"));
            }
        }
        Listing::All => {}
    }
    // One row per instance (10,000 in a large fleet): drawn by `Rows` in one pass, in the
    // same style as the other tables, without wrapping.
    let mut inst = Rows::new(&[
        "INSTANCE",
        "GROUP",
        "ADDRESS",
        "GEN",
        "STATE",
        "LB",
        "COMPONENTS",
        "RESTARTS",
        "AGE",
    ]);
    for g in &s.groups {
        for i in &g.instances {
            let restarts: u32 = i.components.iter().map(|c| c.restarts).sum();
            inst.push(vec![
                i.id.clone(),
                i.group.clone(),
                i.addr.clone(),
                i.generation.to_string(),
                snake(&i.state),
                if i.in_rotation { "in" } else { "out" }.to_string(),
                components_cell(&i.components),
                restarts.to_string(),
                age(now, i.launched_at_ms),
            ]);
        }
    }
    inst.render(&mut out);
    out
}

/// One line per balancer process, or a warning when `local` ingresses have none.
/// An instance's COMPONENTS cell: `name:state` for each (the names as its agent reported
/// them, made printable), or `-`.
fn components_cell(components: &[drover_model::api::ComponentReport]) -> String {
    if components.is_empty() {
        return "-".to_string();
    }
    components
        .iter()
        .map(|c| format!("{}:{}", printable(&c.name), snake(&c.state)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn balancers(s: &FleetStatus) -> String {
    let local_ingress = s
        .groups
        .iter()
        .any(|g| g.provider == "local" && g.ingress.is_some());
    if s.balancers.is_empty() {
        return if local_ingress {
            "balancer: none has reported for a minute: ingresses serve nothing new and drains \
             wait out their timeout; is `drover lb` running? (docs/lb.md)\n"
                .to_string()
        } else {
            String::new()
        };
    }
    let mut out = String::new();
    for b in &s.balancers {
        let mut words = vec![if b.age_ms > 3000 {
            format!("silent for {}s", b.age_ms / 1000)
        } else if b.current {
            "current".to_string()
        } else {
            "catching up".to_string()
        }];
        if !b.accepting {
            words.push("handed over, finishing its connections".into());
        }
        for (listener, e) in &b.errors {
            words.push(format!("cannot open {listener}: {e}"));
        }
        out.push_str(&format!("balancer {}: {}\n", b.lb, words.join("; ")));
    }
    out
}

/// A table drawn like comfy-table's `UTF8_BORDERS_ONLY` preset, in one pass and without
/// wrapping: for lists that grow with the fleet, where comfy-table's per-cell layout costs
/// tens of milliseconds at 10,000 rows.
struct Rows {
    rows: Vec<Vec<String>>,
    widths: Vec<usize>,
}

impl Rows {
    fn new(header: &[&str]) -> Rows {
        let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
        let widths = header.iter().map(|h| h.chars().count()).collect();
        Rows {
            rows: vec![header],
            widths,
        }
    }

    fn push(&mut self, row: Vec<String>) {
        for (w, cell) in self.widths.iter_mut().zip(&row) {
            *w = (*w).max(cell.chars().count());
        }
        self.rows.push(row);
    }

    fn render(&self, out: &mut String) {
        // Each cell is padded by one space on both sides; columns are one space apart.
        let inner: usize =
            self.widths.iter().map(|w| w + 2).sum::<usize>() + self.widths.len().saturating_sub(1);
        let line = |out: &mut String, left: char, fill: char, right: char| {
            out.push(left);
            out.extend(std::iter::repeat_n(fill, inner));
            out.push(right);
            out.push('\n');
        };
        line(out, '┌', '─', '┐');
        for (n, row) in self.rows.iter().enumerate() {
            out.push('│');
            for (i, (cell, w)) in row.iter().zip(&self.widths).enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push(' ');
                out.push_str(cell);
                out.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 1));
            }
            out.push_str("│\n");
            if n == 0 {
                line(out, '╞', '═', '╡');
            }
        }
        line(out, '└', '─', '┘');
    }
}

/// The metric, its target and why the count is what it is.
fn scaling(g: &drover_model::api::GroupStatus) -> String {
    let why = format!("set by {}", g.desired_reason);
    match &g.autoscale {
        None => why,
        Some(a) => {
            let observed = a
                .observed
                .map(|o| format!("{o:.2}"))
                .unwrap_or_else(|| "no data".into());
            format!(
                "{} {observed} / target {:.2} over {} instance(s); {why}",
                a.metric, a.target, a.measured
            )
        }
    }
}

/// `s` safe for a terminal: control characters (escape sequences, carriage returns, bells:
/// what an agent or a component may put in a message) shown as `\u{..}`, not sent.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

pub fn event_line(e: &Event) -> String {
    format!(
        "{:>6}  {}  {:<12} {:<12} {:<9} {}",
        e.seq,
        time(e.at_ms),
        e.kind.as_str(),
        e.group.as_deref().unwrap_or("-"),
        e.instance.as_deref().unwrap_or("-"),
        printable(&e.message)
    )
}

pub fn events(events: &[Event]) -> String {
    let mut t = table(&["SEQ", "TIME (UTC)", "KIND", "GROUP", "INSTANCE", "MESSAGE"]);
    for e in events {
        t.add_row(vec![
            e.seq.to_string(),
            time(e.at_ms),
            e.kind.as_str().to_string(),
            e.group.clone().unwrap_or_else(|| "-".into()),
            e.instance.clone().unwrap_or_else(|| "-".into()),
            printable(&e.message).into_owned(),
        ]);
    }
    t.to_string()
}

pub fn history(revs: &[RevisionSummary]) -> String {
    let mut t = table(&["REVISION", "APPLIED (UTC)", "FILE", "CHANGES"]);
    for r in revs {
        t.add_row(vec![
            r.number.to_string(),
            time(r.applied_at_ms),
            r.file.clone(),
            r.summary.clone(),
        ]);
    }
    t.to_string()
}

/// A window's time in its own zone: `Sat 2026-10-31 17:00 GMT`.
fn at(ms: u64, tz: &str) -> String {
    let tz = drover_model::cron::parse_tz(tz).unwrap_or(drover_model::cron::Tz::UTC);
    drover_model::cron::format_in(ms, tz)
}

fn bounds(w: &ScheduleWindow) -> String {
    let mut parts = Vec::new();
    for (k, v) in [("min", w.min), ("desired", w.desired), ("max", w.max)] {
        if let Some(v) = v {
            parts.push(format!("{k} {v}"));
        }
    }
    parts.join(", ")
}

fn window(w: &ScheduleWindow) -> String {
    let tz = drover_model::cron::parse_tz(&w.timezone).unwrap_or(drover_model::cron::Tz::UTC);
    format!(
        "{} ({}) from {} until {}",
        w.what,
        bounds(w),
        at(w.start_ms, &w.timezone),
        drover_model::cron::format_until(w.end_ms, w.start_ms, tz)
    )
}

/// `web/local: schedule active: ...; next: ...` under the status table.
fn group_schedule(group: &str, s: &drover_model::api::GroupSchedule) -> String {
    let mut out = String::new();
    match &s.active {
        Some(w) => out.push_str(&format!(
            "{group}: schedule active: {} (the file's capacity: {}..{})\n",
            window(w),
            s.base_min,
            s.base_max
        )),
        None => out.push_str(&format!("{group}: no schedule active\n")),
    }
    if let Some(w) = &s.next {
        out.push_str(&format!("{group}: next schedule: {}\n", window(w)));
    }
    out
}

/// What `drover scale --at` stored.
pub fn scheduled(o: &drover_model::api::ScheduledScale) -> String {
    let tz = drover_model::cron::parse_tz(&o.timezone).unwrap_or(drover_model::cron::Tz::UTC);
    format!(
        "scheduled {}: {} to at least {} from {} until {} (cancel with `drover schedule cancel {}`)",
        o.id,
        o.region
            .as_ref()
            .map(|r| format!("{}/{r}", o.service))
            .unwrap_or_else(|| o.service.clone()),
        o.desired,
        drover_model::cron::format_in(o.start_ms, tz),
        drover_model::cron::format_in(o.end_ms, tz),
        o.id
    )
}

/// `drover schedule list`.
pub fn schedules(l: &drover_model::api::ScheduleList) -> String {
    if l.schedules.is_empty() {
        return "no schedules: add [[services.NAME.schedule]] to the fleet file, or run `drover scale SERVICE N --at TIME --for DURATION`".into();
    }
    let mut t = table(&[
        "ID",
        "SERVICE",
        "STATE",
        "BOUNDS",
        "WHAT",
        "ACTIVE UNTIL / NEXT",
    ]);
    for e in &l.schedules {
        let when = match (&e.active, e.next.first()) {
            (Some(w), _) => format!("until {}", at(w.end_ms, &w.timezone)),
            (None, Some(_)) => e
                .next
                .iter()
                .map(|n| at(n.start_ms, &n.timezone))
                .collect::<Vec<_>>()
                .join(", "),
            (None, None) => "-".into(),
        };
        let b = ScheduleWindow {
            id: String::new(),
            what: String::new(),
            start_ms: 0,
            end_ms: 0,
            min: e.min,
            desired: e.desired,
            max: e.max,
            timezone: String::new(),
        };
        t.add_row(vec![
            e.id.clone(),
            match &e.region {
                Some(r) => format!("{}/{r}", e.service),
                None => e.service.clone(),
            },
            e.state.clone(),
            bounds(&b),
            e.what.clone(),
            when,
        ]);
    }
    t.to_string()
}

pub fn apply(r: &ApplyResponse, dry_run: bool) {
    print!("{}", drift(&r.drift));
    if r.changes.is_empty() {
        println!("no changes: revision {} is current", r.revision);
        return;
    }
    for c in &r.changes {
        println!("  {c}");
    }
    for p in &r.plan_changes {
        println!("  plan {p}");
    }
    // By wave: each starts once the ones before it are done (and baked).
    let mut rollouts: Vec<&drover_model::api::RolloutPlan> = r.rollouts.iter().collect();
    rollouts.sort_by_key(|ro| (ro.wave, ro.group.clone()));
    let mut eta_before = 0u64;
    let mut wave_end = 0u64;
    let mut current_wave = 0u32;
    for ro in rollouts {
        if ro.wave != current_wave {
            eta_before += wave_end;
            wave_end = 0;
            current_wave = ro.wave;
        }
        wave_end = wave_end.max(ro.estimated_ms);
        let wave = if ro.wave == 0 {
            String::new()
        } else if eta_before == 0 {
            format!(" (wave {})", ro.wave)
        } else {
            format!(
                " (wave {}: after the waves before it, about {}, and wave_bake)",
                ro.wave,
                drover_model::Dur::from_millis(eta_before / 1000 * 1000)
            )
        };
        println!(
            "  rollout {}{wave}: generation {} -> {}: {} instance(s) replaced in {} batch(es), about {}",
            ro.group,
            ro.from_generation,
            ro.to_generation,
            ro.replaced,
            ro.batches,
            drover_model::Dur::from_millis(ro.estimated_ms / 1000 * 1000)
        );
    }
    for f in &r.schedules {
        println!("  schedule {}: {}; next firings:", f.id, f.what);
        for w in &f.next {
            println!(
                "    {} until {} ({})",
                at(w.start_ms, &w.timezone),
                at(w.end_ms, &w.timezone),
                bounds(w)
            );
        }
    }
    if dry_run || !r.applied {
        println!("dry run: nothing was stored");
    } else {
        println!("applied as revision {}", r.revision);
    }
}

/// Where the file and the live state disagree: what stays, who set it, how to make the file win.
pub fn drift(d: &[drover_model::api::Drift]) -> String {
    let mut out = String::new();
    for x in d {
        if x.kept {
            out.push_str(&format!(
                "  kept {} = {} (set by {}); the file says {} but did not change it since it was last applied\n",
                x.field, x.live, x.set_by, x.file
            ));
        } else {
            out.push_str(&format!(
                "  file wins: {} {} -> {} (was set by {})\n",
                x.field, x.live, x.file, x.set_by
            ));
        }
    }
    if d.iter().any(|x| x.kept) {
        out.push_str("  (to make the file win: apply --force-file)\n");
    }
    out
}

/// The token table: ids, names, scopes, groups and times; never a secret.
pub fn tokens(tokens: &[drover_model::token::TokenInfo]) -> String {
    let mut t = table(&["ID", "NAME", "SCOPE", "GROUP", "CREATED", "REVOKED"]);
    for k in tokens {
        t.add_row(vec![
            Cell::new(&k.id),
            Cell::new(&k.name),
            Cell::new(k.scope.as_str()),
            Cell::new(k.group.as_deref().unwrap_or("-")),
            Cell::new(time(k.created_at_ms)),
            Cell::new(k.revoked_at_ms.map(time).unwrap_or_else(|| "-".into())),
        ]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_time() {
        assert_eq!(super::time(0), "1970-01-01 00:00:00");
        assert_eq!(super::time(1_795_627_101_000), "2026-11-25 17:18:21");
    }
}

#[cfg(test)]
mod printable_tests {
    use super::*;

    /// Issue 20, item 11: agent-supplied text reaches the terminal without its escapes.
    #[test]
    fn event_text_is_printed_without_control_characters() {
        let e = Event {
            seq: 1,
            at_ms: 0,
            kind: drover_model::EventKind::Unhealthy,
            group: None,
            instance: None,
            message: "app is unhealthy (\u{1b}]0;pwned\u{7}\u{1b}[2J\rok)".into(),
        };
        for out in [event_line(&e), events(std::slice::from_ref(&e))] {
            assert!(
                !out.contains('\u{1b}') && !out.contains('\u{7}') && !out.contains('\r'),
                "{out:?}"
            );
            assert!(out.contains("\\u{1b}"), "{out}");
        }
        assert_eq!(printable("plain"), "plain");
    }

    /// Component names come from heartbeats: `drover status` shows them without escapes.
    #[test]
    fn component_names_are_printed_without_control_characters() {
        let c = |name: &str| drover_model::api::ComponentReport {
            name: name.into(),
            version: "v1".into(),
            state: drover_model::api::ComponentState::Healthy,
            pid: None,
            restarts: 0,
            last_exit: None,
            message: None,
            last_output: None,
        };
        let out = components_cell(&[c("app"), c("x\u{1b}[2J\u{1b}]0;pwned\u{7}")]);
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        assert_eq!(out, "app:healthy x\\u{1b}[2J\\u{1b}]0;pwned\\u{7}:healthy");
        assert_eq!(components_cell(&[]), "-");
    }
}
