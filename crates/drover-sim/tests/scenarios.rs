//! Fleet-scale scenarios: deploys of up to 1,000 instances, ten regions at once, injected
//! faults, and the steady state, with the simulator's invariants checked at every step.
//!
//! Run with `cargo test -p drover-sim -- --nocapture` to see the measured convergence times.

use drover_control::GroupSpec;
use drover_model::fleet::Rollout;
use drover_model::Dur;
use drover_sim::{group_spec, FailMode, Fault, Sim, SimConfig};

const MIN_HEALTHY_MS: u64 = 5_000;

/// A rollout policy for the tests. `healthy_deadline` is one hour: the controller applies it to
/// the whole rollout, not per instance (see `healthy_rollout_longer_than_healthy_deadline_*`).
fn rollout(max_surge: u32, max_unavailable: u32) -> Rollout {
    Rollout {
        max_surge,
        max_unavailable,
        min_healthy_time: Dur::from_millis(MIN_HEALTHY_MS),
        healthy_deadline: Dur::from_secs(3_600),
        auto_revert: true,
        drain_timeout: Dur::from_secs(3),
        ..Rollout::default()
    }
}

/// The ideal rollout time: ceil(desired / max_surge) batches of (boot + min_healthy_time).
fn ideal_ms(sim: &Sim, spec: &GroupSpec) -> u64 {
    let batches = u64::from(spec.desired.div_ceil(spec.rollout.max_surge));
    batches * (sim.config().boot_ms + spec.rollout.min_healthy_time.as_millis())
}

/// Deploy every group now, run until all converge, and check what a fault-free rollout must
/// give: one RolloutDone per group, no failure, no termination, one permit per old instance.
/// Returns the measured / ideal ratio of the slowest group.
fn deploy_all_and_converge(sim: &mut Sim, groups: &[&str]) -> f64 {
    let start = sim.now();
    let before = sim.stats().clone();
    let mut desired_total = 0u64;
    for g in groups {
        sim.deploy(g);
        desired_total += u64::from(sim.spec(g).desired);
    }
    let took = sim
        .run_until(|s| s.all_converged(), 3_600_000)
        .unwrap_or_else(|| {
            panic!(
                "no convergence within an hour of virtual time: {:?}",
                sim.stats()
            )
        });
    let st = sim.stats();
    assert_eq!(
        st.rollouts_done.len() - before.rollouts_done.len(),
        groups.len()
    );
    assert!(st.rollouts_failed.is_empty(), "{:?}", st.rollouts_failed);
    assert_eq!(st.terminated_never_healthy + st.terminated_silent, 0);
    assert_eq!(st.died, 0);
    assert_eq!(st.launches - before.launches, desired_total);
    assert_eq!(st.permits - before.permits, desired_total);
    let mut worst: f64 = 0.0;
    for g in groups {
        let spec = sim.spec(g).clone();
        let done = st
            .rollouts_done
            .iter()
            .rev()
            .find(|e| e.group == *g)
            .expect("RolloutDone");
        assert_eq!(done.generation, spec.generation);
        assert!(done.at_ms > start);
        let ratio = done.took_ms as f64 / ideal_ms(sim, &spec) as f64;
        worst = worst.max(ratio);
        let s = sim.group_status(g);
        assert_eq!(
            (s.current, s.stale, s.in_rotation),
            (spec.desired as usize, 0, spec.desired as usize)
        );
        assert!(st.max_active_over_desired <= i64::from(spec.rollout.max_surge));
    }
    println!(
        "{} group(s), {desired_total} instances: converged in {:.1} s virtual (ideal {:.1} s for the slowest), worst ratio {worst:.3}, {} steps",
        groups.len(),
        took as f64 / 1000.0,
        groups.iter().map(|g| ideal_ms(sim, &sim.spec(g))).max().unwrap_or(0) as f64 / 1000.0,
        st.steps
    );
    assert!(worst <= 1.5, "convergence took {worst:.3}x the ideal");
    worst
}

#[test]
fn thousand_instances_max_surge_50_converge() {
    let mut sim = Sim::new(1);
    sim.add_group(group_spec("web/eu", 1_000, rollout(50, 0)));
    let ratio = deploy_all_and_converge(&mut sim, &["web/eu"]);
    assert!(ratio >= 1.0);
}

#[test]
fn hundred_instances_max_surge_1_converge() {
    let mut sim = Sim::new(2);
    sim.add_group(group_spec("web/eu", 100, rollout(1, 0)));
    deploy_all_and_converge(&mut sim, &["web/eu"]);
}

#[test]
fn max_unavailable_with_surge_converges() {
    let mut sim = Sim::new(3);
    sim.add_group(group_spec("web/eu", 200, rollout(20, 10)));
    deploy_all_and_converge(&mut sim, &["web/eu"]);
}

#[test]
fn ten_regions_of_100_deployed_at_once() {
    let mut sim = Sim::new(4);
    let names: Vec<String> = (0..10).map(|r| format!("core/region-{r}")).collect();
    for n in &names {
        sim.add_group(group_spec(n, 100, rollout(10, 0)));
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    deploy_all_and_converge(&mut sim, &refs);
}

/// A scenario with every kind of fault, for the determinism check.
fn faulty_scenario(seed: u64) -> (u64, drover_sim::Stats) {
    let mut sim = Sim::new(seed);
    sim.add_group(group_spec("web/eu", 200, rollout(20, 0)));
    // Another service: one fleet service has one rollout policy.
    sim.add_group(group_spec("api/us", 100, rollout(5, 2)));
    sim.inject(
        0,
        Fault::BootFailures {
            group: None,
            fraction: 0.05,
            mode: FailMode::Crash,
        },
    );
    sim.inject(
        1_000,
        Fault::Deploy {
            group: "web/eu".into(),
            broken: None,
        },
    );
    sim.inject(
        2_000,
        Fault::Deploy {
            group: "api/us".into(),
            broken: None,
        },
    );
    sim.inject(
        40_000,
        Fault::Silence {
            group: "web/eu".into(),
            count: 3,
        },
    );
    sim.inject(
        50_000,
        Fault::Kill {
            group: "api/us".into(),
            count: 4,
        },
    );
    sim.inject(
        60_000,
        Fault::SetDesired {
            group: "api/us".into(),
            desired: 120,
        },
    );
    sim.run_until(|s| s.now() > 10_000 && s.all_converged(), 3_600_000)
        .expect("converges");
    (sim.stats().decision_hash, sim.stats().clone())
}

#[test]
fn same_seed_same_decisions() {
    let (a, sa) = faulty_scenario(99);
    let (b, sb) = faulty_scenario(99);
    assert_eq!(a, b, "same seed, different decisions");
    assert_eq!(sa, sb);
    let (c, _) = faulty_scenario(100);
    assert_ne!(a, c, "a different seed should change the run");
    println!("decision hash (seed 99): {a:016x}, {} steps", sa.steps);
}

fn boot_failures(mode: FailMode) {
    let mut sim = Sim::new(5);
    sim.add_group(group_spec("web/eu", 300, rollout(15, 0)));
    sim.inject(
        0,
        Fault::BootFailures {
            group: Some("web/eu".into()),
            fraction: 0.05,
            mode,
        },
    );
    sim.deploy("web/eu");
    let took = sim
        .run_until(|s| s.converged("web/eu"), 3_600_000)
        .expect("converges despite 5% failed boots");
    let st = sim.stats();
    let failed = st.terminated_never_healthy + st.died;
    assert!(failed > 0, "some launches should have failed: {st:?}");
    assert_eq!(st.launches, 300 + failed);
    assert_eq!(
        st.permits, 300,
        "every old instance leaves through a permit"
    );
    assert_eq!(st.rollouts_done.len(), 1);
    let ratio = took as f64 / ideal_ms(&sim, &sim.spec("web/eu")) as f64;
    println!(
        "5% boot failures ({mode:?}): {failed} failed of {} launches, converged in {:.1} s, ratio {ratio:.3}",
        st.launches,
        took as f64 / 1000.0
    );
}

#[test]
fn five_percent_of_launches_crash_at_boot() {
    boot_failures(FailMode::Crash);
}

#[test]
fn five_percent_of_launches_hang_at_boot() {
    boot_failures(FailMode::Hang);
}

#[test]
fn three_agents_go_silent_mid_rollout() {
    let mut sim = Sim::new(6);
    sim.add_group(group_spec("web/eu", 200, rollout(20, 0)));
    sim.deploy("web/eu");
    sim.inject(
        30_000,
        Fault::Silence {
            group: "web/eu".into(),
            count: 3,
        },
    );
    sim.run_until(|s| s.converged("web/eu"), 3_600_000)
        .expect("converges");
    let st = sim.stats();
    // Each silent agent is terminated once the server notices, unless a stale one got its
    // permit in its turn before that (it still hears the permit, and leaves).
    assert_eq!(st.terminated_silent + st.permitted_silent, 3, "{st:?}");
    assert!(st.terminated_silent > 0, "{st:?}");
    assert_eq!(st.terminated_never_healthy, 0);
    // A silent stale instance is terminated instead of permitted; a silent fresh one is
    // replaced by one more launch: either way, permits + terminated = launches.
    assert_eq!(st.permits + st.terminated_silent, st.launches, "{st:?}");
    assert_eq!(st.rollouts_done.len(), 1);
}

/// A server restart mid-rollout: records survive, soft state is relearned from heartbeats.
/// Right after the restart, the controller must not hand out more permits than the budget
/// allows, and (checked at every step) must not terminate healthy instances nor take serving
/// capacity below the floor.
fn restart_mid_rollout(replace_unhealthy_after_ms: u64) {
    let mut sim = Sim::new(7);
    let mut spec = group_spec("web/eu", 100, rollout(10, 0));
    spec.replace_unhealthy_after_ms = replace_unhealthy_after_ms;
    sim.add_group(spec);
    sim.deploy("web/eu");
    sim.run_for(40_000);
    let before = sim.group_status("web/eu");
    assert!(
        before.stale > 0 && before.current > 0,
        "mid-rollout: {before:?}"
    );
    sim.inject(sim.now() + 1, Fault::ServerRestart);
    let budget = 10; // max_surge + max_unavailable
                     // Until every agent has been heard from again (one heartbeat period), and a bit more.
    for _ in 0..12 {
        sim.step();
        let s = sim.group_status("web/eu");
        assert!(
            s.draining <= before.draining + budget,
            "t = {} ms: {} draining right after the restart, {} before (budget {budget}): {s:?}",
            sim.now(),
            s.draining,
            before.draining
        );
        assert!(
            s.serving >= s.floor,
            "t = {} ms: serving below floor: {s:?}",
            sim.now()
        );
    }
    sim.run_until(|s| s.converged("web/eu"), 3_600_000)
        .expect("converges after the restart");
    assert_eq!(sim.stats().rollouts_done.len(), 1);
    assert_eq!(sim.stats().terminated_never_healthy, 0);
}

#[test]
fn server_restart_mid_rollout_terminates_healthy_instances() {
    restart_mid_rollout(30_000);
}

#[test]
fn server_restart_mid_rollout_permits_every_stale_instance() {
    restart_mid_rollout(600_000);
}

#[test]
fn server_restart_in_steady_state_keeps_every_instance() {
    let mut sim = Sim::new(8);
    let mut spec = group_spec("web/eu", 100, rollout(10, 0));
    // Longer than the instances' age: the restart grace bug above does not apply.
    spec.replace_unhealthy_after_ms = 600_000_000;
    sim.add_group(spec);
    sim.run_for(10_000);
    sim.restart_server();
    sim.run_for(1_250);
    let s = sim.group_status("web/eu");
    assert_eq!(
        (s.active, s.in_rotation, s.draining),
        (100, 100, 0),
        "{s:?}"
    );
    let st = sim.stats();
    assert_eq!(
        (st.launches, st.permits, st.terminated_never_healthy),
        (0, 0, 0)
    );
}

fn broken_version(mode: FailMode) {
    let mut sim = Sim::new(9);
    let mut r = rollout(5, 0);
    r.healthy_deadline = Dur::from_secs(120);
    sim.add_group(group_spec("web/eu", 20, r));
    let broken = sim.deploy_broken("web/eu", mode);
    let deployed_at = sim.now();
    let mut min_in_rotation = usize::MAX;
    let mut broken_launches = None;
    sim.run_until(
        |s| {
            min_in_rotation = min_in_rotation.min(s.group_status("web/eu").in_rotation);
            if broken_launches.is_none() && !s.stats().rollouts_failed.is_empty() {
                broken_launches = Some(s.stats().launches);
            }
            s.now() > deployed_at && s.converged("web/eu")
        },
        3_600_000,
    )
    .expect("converges back on a good generation");
    let st = sim.stats();
    assert_eq!(st.rollouts_failed.len(), 1, "{st:?}");
    // The launch backoff (500 ms doubling to 30 s after each instance that ended before
    // turning healthy; the world's, `World::launch_failed`) keeps a broken version from a
    // launch storm: 40 launches in the 120 s before the rollout fails (Crash), 205 without it.
    let broken_launches = broken_launches.expect("the rollout failed");
    assert!(
        broken_launches <= 60,
        "{broken_launches} launches of the broken version in 120 s"
    );
    let failed = &st.rollouts_failed[0];
    assert_eq!(failed.generation, broken);
    assert!(failed.took_ms > 120_000 && failed.took_ms <= 120_000 + 2 * sim.config().step_ms);
    assert_eq!(st.reverts, 1);
    let spec = sim.spec("web/eu");
    assert_eq!(
        spec.generation,
        broken + 1,
        "auto-revert made a new generation"
    );
    assert_eq!(st.rollouts_done.len(), 1);
    assert_eq!(st.rollouts_done[0].generation, broken + 1);
    assert!(
        min_in_rotation >= 20,
        "dropped to {min_in_rotation} in rotation"
    );
    // The 20 generation-1 instances, plus (Hang) the broken ones still up at the revert,
    // stale and unhealthy: at most max_surge of them.
    match mode {
        FailMode::Crash => assert_eq!(st.permits, 20),
        FailMode::Hang => assert!((20..=25).contains(&st.permits), "{}", st.permits),
    }
    println!(
        "broken version ({mode:?}): failed after {:.1} s, {broken_launches} broken launches, back on generation {} {:.1} s after the failure",
        failed.took_ms as f64 / 1000.0,
        spec.generation,
        st.rollouts_done[0].took_ms as f64 / 1000.0
    );
}

#[test]
fn broken_version_crashing_fails_then_reverts() {
    broken_version(FailMode::Crash);
}

#[test]
fn broken_version_hanging_fails_then_reverts() {
    broken_version(FailMode::Hang);
}

#[test]
fn dead_instances_are_replaced() {
    let mut sim = Sim::new(10);
    sim.add_group(group_spec("web/eu", 100, rollout(5, 0)));
    sim.run_for(5_000);
    sim.inject(
        sim.now(),
        Fault::Kill {
            group: "web/eu".into(),
            count: 10,
        },
    );
    let first = sim.views()[0].id.clone();
    sim.inject(
        sim.now() + 3_000,
        Fault::KillInstance {
            instance: first.clone(),
        },
    );
    sim.run_for(4_000);
    let took = sim
        .run_until(|s| s.converged("web/eu"), 600_000)
        .expect("replaced");
    let st = sim.stats();
    assert_eq!((st.died, st.launches, st.permits), (11, 11, 0), "{st:?}");
    assert!(!sim.views().iter().any(|v| v.id == first));
    assert!(took < 20_000, "took {took} ms");
}

#[test]
fn scale_out_then_in() {
    let mut sim = Sim::new(11);
    sim.add_group(group_spec("web/eu", 50, rollout(5, 0)));
    sim.set_desired("web/eu", 80);
    sim.run_until(|s| s.converged("web/eu"), 600_000)
        .expect("scaled out");
    assert_eq!(sim.stats().launches, 30);
    assert_eq!(sim.group_status("web/eu").in_rotation, 80);
    sim.set_desired("web/eu", 30);
    sim.run_until(|s| s.converged("web/eu"), 600_000)
        .expect("scaled in");
    let st = sim.stats();
    assert_eq!(st.permits, 50, "scale-in goes through permits");
    assert_eq!(
        st.terminated_never_healthy + st.terminated_silent + st.died,
        0
    );
    assert_eq!(sim.group_status("web/eu").active, 30);
}

#[test]
fn scale_in_during_a_rollout() {
    let mut sim = Sim::new(12);
    sim.add_group(group_spec("web/eu", 100, rollout(10, 0)));
    sim.deploy("web/eu");
    sim.inject(
        30_000,
        Fault::SetDesired {
            group: "web/eu".into(),
            desired: 60,
        },
    );
    sim.run_until(|s| s.converged("web/eu"), 3_600_000)
        .expect("converges");
    assert_eq!(sim.group_status("web/eu").current, 60);
}

#[test]
fn empty_group_is_launched() {
    let mut sim = Sim::new(13);
    sim.add_empty_group(group_spec("web/eu", 40, rollout(5, 0)));
    sim.run_until(|s| s.converged("web/eu"), 600_000)
        .expect("launched");
    assert_eq!(sim.stats().launches, 40);
}

#[test]
fn healthy_rollout_longer_than_healthy_deadline_is_not_failed() {
    let mut sim = Sim::new(14);
    // Default rollout policy: max_surge 1, min_healthy_time 5s, healthy_deadline 60s.
    sim.add_group(group_spec("web/eu", 100, Rollout::default()));
    sim.deploy("web/eu");
    sim.run_until(
        |s| s.converged("web/eu") || !s.stats().rollouts_failed.is_empty(),
        3_600_000,
    );
    assert!(
        sim.stats().rollouts_failed.is_empty(),
        "a rollout whose every new instance turned healthy in ~10 s was declared failed: {:?}",
        sim.stats().rollouts_failed
    );
}

#[test]
fn max_unavailable_without_surge_makes_progress() {
    let mut sim = Sim::new(15);
    sim.add_group(group_spec("web/eu", 10, rollout(0, 1)));
    sim.deploy("web/eu");
    let took = sim.run_until(|s| s.converged("web/eu"), 600_000);
    assert!(took.is_some(), "stuck: {:?}", sim.group_status("web/eu"));
}

#[test]
fn small_config_runs_fast() {
    // A coarse tick changes nothing about correctness.
    let cfg = SimConfig {
        step_ms: 1_000,
        ..SimConfig::default()
    };
    let mut sim = Sim::with_config(16, cfg);
    sim.add_group(group_spec("web/eu", 30, rollout(3, 1)));
    sim.deploy("web/eu");
    sim.run_until(|s| s.converged("web/eu"), 600_000)
        .expect("converges");
}

/// A group of the `aws` provider without surge (`provider_replaces_leavers`): each stale
/// leaver keeps its Auto Scaling group's capacity, the group starts its replacement as it
/// goes, and the controller's launch claims that instance. Returns the rollout's time and
/// the stats.
fn provider_replaces_rollout(
    seed: u64,
    desired: u32,
    max_unavailable: u32,
    replaces: bool,
) -> (u64, drover_sim::Stats) {
    let mut sim = Sim::new(seed);
    let mut spec = group_spec("jobs/use1", desired, rollout(0, max_unavailable));
    spec.provider_replaces_leavers = replaces;
    sim.add_group(spec);
    sim.deploy("jobs/use1");
    let took = sim
        .run_until(|s| s.converged("jobs/use1"), 3_600_000)
        .expect("converges");
    let st = sim.stats().clone();
    assert_eq!(st.rollouts_done.len(), 1);
    assert!(st.rollouts_failed.is_empty());
    assert_eq!(
        (st.launches, st.permits, st.died),
        (u64::from(desired), u64::from(desired), 0)
    );
    assert!(
        st.max_active_over_desired <= 0,
        "no surge: {}",
        st.max_active_over_desired
    );
    (took, st)
}

#[test]
fn without_surge_an_auto_scaling_group_replaces_each_stale_leaver() {
    for (desired, max_unavailable) in [(3, 1), (100, 1), (100, 10)] {
        let (took, st) = provider_replaces_rollout(21, desired, max_unavailable, true);
        let n = u64::from(desired);
        assert_eq!(st.kept_capacity, n, "every stale leaver keeps its capacity");
        assert_eq!(
            st.claimed_from_provider, n,
            "every launch claims the group's own replacement"
        );
        assert_eq!(st.orphans, 0, "nothing is left unclaimed");
        assert_eq!(
            st.max_capacity_over_desired, 0,
            "the Auto Scaling group's capacity never exceeds desired"
        );
        let (took_before, _) = provider_replaces_rollout(21, desired, max_unavailable, false);
        println!(
            "{desired} instances, max_unavailable {max_unavailable}: the provider replaces leavers in {:.1} s, the controller in {:.1} s (virtual)",
            took as f64 / 1000.0,
            took_before as f64 / 1000.0
        );
        // The replacement starts as the leaver goes rather than as it starts draining: at
        // most a drain and two steps later per batch.
        let batches = u64::from(desired.div_ceil(max_unavailable));
        assert!(
            took <= took_before + batches * (Sim::new(0).config().drain_ms + 500),
            "{took} vs {took_before}"
        );
    }
}

#[test]
fn without_surge_on_an_auto_scaling_group_with_faults() {
    let mut sim = Sim::new(22);
    let mut spec = group_spec("jobs/use1", 60, rollout(0, 3));
    spec.provider_replaces_leavers = true;
    sim.add_group(spec);
    sim.deploy("jobs/use1");
    // Instances die mid-rollout (the group replaces them on its own), the server restarts,
    // and the group is scaled in while stale instances are still leaving.
    sim.inject(
        20_000,
        Fault::Kill {
            group: "jobs/use1".into(),
            count: 4,
        },
    );
    sim.inject(40_000, Fault::ServerRestart);
    sim.inject(
        60_000,
        Fault::SetDesired {
            group: "jobs/use1".into(),
            desired: 40,
        },
    );
    sim.run_until(|s| s.converged("jobs/use1"), 3_600_000)
        .expect("converges");
    // Whatever the group started on its own is claimed, or terminated after the grace.
    sim.run_for(drover_sim::ORPHAN_GRACE_MS + 1_000);
    assert!(sim.converged("jobs/use1"));
    let st = sim.stats();
    assert_eq!(sim.group_status("jobs/use1").current, 40);
    assert_eq!(
        sim.provider_capacity("jobs/use1"),
        Some((40, 0)),
        "the group's capacity ends at desired, nothing unclaimed: {st:?}"
    );
    assert!(
        st.kept_capacity > 0 && st.claimed_from_provider > 0,
        "{st:?}"
    );
    println!(
        "with faults: {} launches ({} claimed from the group), {} permits ({} kept the capacity), {} orphans, capacity at most {} over desired",
        st.launches, st.claimed_from_provider, st.permits, st.kept_capacity, st.orphans, st.max_capacity_over_desired
    );
}

/// Issue 15: agents that ignore their permits (hung, or too old) hold a rollout only until
/// their deadline, counted from the permit's stored time: a server restart in between
/// changes nothing. Each is terminated once, by the shared controller rule, never before
/// `leave_within_ms`; the rollout completes.
#[test]
fn leavers_that_ignore_their_permits_are_terminated_at_their_deadline_across_a_restart() {
    let mut sim = Sim::new(11);
    sim.add_group(group_spec("web/eu", 20, rollout(2, 0)));
    sim.inject(
        1_000,
        Fault::IgnorePermits {
            group: "web/eu".into(),
            count: 3,
        },
    );
    sim.run_for(2_000);
    let deployed_at = sim.now();
    sim.deploy("web/eu");
    sim.inject(deployed_at + 20_000, Fault::ServerRestart);
    sim.run_until(|s| s.converged("web/eu"), 3_600_000)
        .expect("converges although 3 leavers ignore their permits");
    let st = sim.stats();
    assert_eq!(st.terminated_overstayed, 3, "{st:?}");
    assert_eq!(
        st.terminated_silent + st.terminated_never_healthy,
        0,
        "{st:?}"
    );
    assert_eq!(st.rollouts_done.len(), 1, "{st:?}");
    assert!(st.rollouts_failed.is_empty());
    assert_eq!(st.permits, 20, "each old instance got one permit");
    // Not before the deadline: the rollout took at least one.
    let within = sim.spec("web/eu").leave_within_ms;
    let took = st.rollouts_done[0].took_ms;
    assert!(took >= within, "done in {took} ms, deadline {within} ms");
}

/// Issue 20's chaos soak: a version that never works is rolled out while faults kill the old
/// instances. Until one new instance turns healthy, no old instance gets a permit, and the
/// old instances that die are replaced on the last good generation: the group never runs
/// dry, and a few seconds after each kill it is back at its desired count in rotation.
/// (Before: the dead ones were replaced on the broken generation and a momentarily
/// unhealthy old one was drained into it, so the group served nothing until the revert.)
#[test]
fn a_broken_version_under_kills_never_leaves_the_group_without_instances() {
    for mode in [FailMode::Crash, FailMode::Hang] {
        let mut sim = Sim::new(21);
        let mut r = rollout(1, 1);
        r.healthy_deadline = Dur::from_secs(60);
        r.fail_after_exits = 0;
        sim.add_group(group_spec("web/eu", 3, r));
        sim.run_until(|s| s.converged("web/eu"), 120_000)
            .expect("up");
        let good = sim.spec("web/eu").generation;
        let broken = sim.deploy_broken("web/eu", mode);
        let t0 = sim.now();
        for k in 0..4u64 {
            sim.inject(
                t0 + 2_000 + k * 12_000,
                Fault::Kill {
                    group: "web/eu".into(),
                    count: 1,
                },
            );
        }
        let mut min_in_rotation = usize::MAX;
        sim.run_until(
            |s| {
                min_in_rotation = min_in_rotation.min(s.group_status("web/eu").in_rotation);
                s.now() > t0 + 50_000
            },
            120_000,
        )
        .expect("runs");
        let st = sim.stats();
        // Each kill took one of 3 and the replacement booted on the good generation: never
        // fewer than 2 in rotation, and no permit for the broken version.
        assert!(
            min_in_rotation >= 2,
            "{mode:?}: dropped to {min_in_rotation}"
        );
        assert_eq!(st.permits, 0, "{mode:?}: {st:?}");
        let on_good = sim
            .views()
            .iter()
            .filter(|v| v.generation == good && v.ever_healthy)
            .count();
        assert_eq!(on_good, 3, "{mode:?}: {:?}", sim.views());
        // Then the rollout fails at its deadline and the revert converges.
        sim.run_until(|s| s.converged("web/eu"), 600_000)
            .expect("converges back");
        let st = sim.stats();
        assert_eq!(st.rollouts_failed.len(), 1, "{mode:?}");
        assert_eq!(st.rollouts_failed[0].generation, broken);
        assert!(sim.spec("web/eu").generation > broken);
    }
}
