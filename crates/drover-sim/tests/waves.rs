//! Waves and canary analysis at fleet scale: ten regions of 100 instances each, a deploy that
//! goes wave by wave with a canary judged on a noisy `error_rate` in every region, a server
//! restart mid-wave, a version bad in one region only, and the analysis' wrong verdicts
//! measured over many trials. The simulator checks its invariants at every step (waves: 6 and
//! 7 in `drover-sim/src/sim/waves.rs`).
//!
//! Run with `cargo test -p drover-sim --test waves -- --nocapture` to see the rates.

use drover_model::fleet::{Analysis, AnalysisMetric, Canary, Direction, Rollout};
use drover_model::Dur;
use drover_sim::{group_spec, NoisyMetric, ServiceSpec, Sim};

const BAKE_MS: u64 = 120_000;
const WAVE_BAKE_MS: u64 = 60_000;

fn rollout() -> Rollout {
    Rollout {
        max_surge: 10,
        max_unavailable: 0,
        min_healthy_time: Dur::from_secs(5),
        healthy_deadline: Dur::from_secs(3_600),
        auto_revert: true,
        drain_timeout: Dur::from_secs(3),
        ..Rollout::default()
    }
}

/// `error_rate`: 1% on a good version, `bad` on a degraded one; instances differ by a
/// constant bias (sd `instance_sd`) and every heartbeat's reading is noisy (sd 1 point).
fn metric(bad: f64, instance_sd: f64) -> NoisyMetric {
    NoisyMetric {
        name: "error_rate".into(),
        good: 0.01,
        bad,
        instance_sd,
        sample_sd: 0.01,
    }
}

fn analysis() -> Analysis {
    Analysis {
        metrics: vec![AnalysisMetric {
            metric: "error_rate".into(),
            direction: Direction::Lower,
            max_ratio: 1.5,
            tolerance: 0.005,
        }],
        ..Analysis::default()
    }
}

fn region(n: usize) -> String {
    format!("web/r{n}")
}

/// Ten regions of `desired` instances; waves `[r0], [r1, r2, r3], [*]`; a 5% canary.
fn fleet(seed: u64, regions: usize, desired: u32, metric: NoisyMetric) -> Sim {
    let mut sim = Sim::new(seed);
    for r in 0..regions {
        sim.add_group(group_spec(&region(r), desired, rollout()));
    }
    sim.add_service(ServiceSpec {
        name: "web".into(),
        groups: (0..regions).map(region).collect(),
        waves: vec![vec![region(0)], (1..4.min(regions)).map(region).collect()],
        wave_bake_ms: WAVE_BAKE_MS,
        canary: Some(Canary {
            instances: None,
            percent: Some(5),
            bake: Dur::from_millis(BAKE_MS),
        }),
        analysis: analysis(),
        metric: Some(metric),
    });
    sim
}

fn wave_of(r: usize) -> usize {
    match r {
        0 => 0,
        1..=3 => 1,
        _ => 2,
    }
}

#[test]
fn a_good_version_goes_wave_by_wave_through_ten_regions_across_a_server_restart() {
    let mut sim = fleet(7, 10, 100, metric(0.03, 0.002));
    sim.deploy_service("web", &[]);
    assert!(sim.spec(&region(0)).rollout_open);
    for r in 1..10 {
        assert!(sim.held(&region(r)), "{} waits for its wave", region(r));
        assert_eq!(sim.spec(&region(r)).generation, 1);
    }
    // Run until wave 2's canaries bake, then restart the server mid-wave.
    sim.run_until(
        |s| {
            (1..4).all(|r| {
                s.spec(&region(r))
                    .canary
                    .is_some_and(|c| c.baking_since_ms > 0)
            })
        },
        3_600_000,
    )
    .expect("wave 2 bakes");
    let restart_at = sim.now();
    sim.restart_server();
    sim.run_until(
        |s| (0..10).all(|r| s.spec(&region(r)).generation == 2 && s.converged(&region(r))),
        4 * 3_600_000,
    )
    .unwrap_or_else(|| panic!("every region on generation 2: {:?}", sim.stats()));

    let st = sim.stats();
    assert!(st.rollouts_failed.is_empty(), "{:?}", sim.verdicts());
    assert_eq!(st.reverts, 0);
    assert_eq!(st.terminated_never_healthy + st.terminated_silent, 0);
    assert_eq!(st.restarts, 1);
    // One passing verdict per region; wave 2's were judged after a bake that began again
    // after the restart (the server's windows are soft state).
    let v = sim.verdicts();
    assert_eq!(v.len(), 10, "{v:#?}");
    assert!(v.iter().all(|v| v.pass && !v.bad), "{v:#?}");
    for r in 1..4 {
        let at = v.iter().find(|v| v.group == region(r)).unwrap().at_ms;
        assert!(
            at >= restart_at + BAKE_MS,
            "{} judged on a full window",
            region(r)
        );
    }
    // Wave by wave: every group of a wave began after the last of the earlier waves was done,
    // plus wave_bake.
    let done = |r: usize| {
        st.rollouts_done
            .iter()
            .find(|d| d.group == region(r) && d.generation == 2)
            .map(|d| d.at_ms)
            .unwrap()
    };
    for r in 0..10 {
        let began = sim.spec(&region(r)).generation_since_ms;
        let earlier_done = (0..10).filter(|&e| wave_of(e) < wave_of(r)).map(done).max();
        if let Some(d) = earlier_done {
            assert!(
                began >= d + WAVE_BAKE_MS,
                "{} began at {began} ms, the waves before it were done at {d} ms",
                region(r)
            );
        }
    }
    let total = st.now_ms;
    eprintln!(
        "ten regions x 100, three waves, canary 5% baked {} s, wave_bake {} s, a server \
         restart in wave 2: every region on the new version after {:.0} s of virtual time \
         ({} steps)",
        BAKE_MS / 1000,
        WAVE_BAKE_MS / 1000,
        total as f64 / 1000.0,
        st.steps
    );
}

#[test]
fn a_version_bad_in_one_region_is_caught_there_and_the_later_waves_never_get_it() {
    let mut sim = fleet(11, 10, 100, metric(0.03, 0.002));
    // Bad in r2 only (wave 2): r0 passes, then r2's canary fails.
    sim.deploy_service("web", &["web/r2"]);
    sim.run_until(|s| !s.stats().rollouts_failed.is_empty(), 4 * 3_600_000)
        .expect("the bad region fails its rollout");
    let failed = sim.stats().rollouts_failed[0].clone();
    assert_eq!(failed.group, "web/r2");
    let v: Vec<_> = sim.verdicts().iter().filter(|v| !v.pass).collect();
    assert_eq!(v.len(), 1, "{:#?}", sim.verdicts());
    assert!(v[0].bad && v[0].numbers.contains("error_rate"), "{v:#?}");
    // Everything the deploy reached goes back; the last wave never moves.
    sim.run_until(
        |s| (0..10).all(|r| s.converged(&region(r)) && !s.held(&region(r))),
        4 * 3_600_000,
    )
    .expect("the fleet settles after the revert");
    for r in 0..4 {
        let spec = sim.spec(&region(r));
        assert_eq!(
            spec.generation,
            3,
            "{} reverted to a new generation with the old content",
            region(r)
        );
    }
    for r in 4..10 {
        assert_eq!(
            sim.spec(&region(r)).generation,
            1,
            "{} (last wave) never launched the change",
            region(r)
        );
    }
    assert_eq!(sim.stats().reverts, 4);
    assert_eq!(sim.stats().rollouts_failed.len(), 1);
    eprintln!(
        "bad in web/r2 only: caught {:.0} s after the deploy by its canary; r0, r1, r2, r3 \
         reverted; r4..r9 never launched it",
        failed.at_ms as f64 / 1000.0
    );
}

/// One canary judgement in one region of 100 instances: the verdict's pass.
fn trial(seed: u64, bad: bool, m: &NoisyMetric) -> bool {
    let mut sim = fleet(seed, 1, 100, m.clone());
    sim.deploy_service("web", if bad { &["web/r0"] } else { &[] });
    sim.run_until(|s| !s.verdicts().is_empty(), 3_600_000)
        .expect("a verdict");
    let v = &sim.verdicts()[0];
    assert_eq!(v.bad, bad);
    v.pass
}

/// False failures and false passes over `trials` trials each.
fn rates(m: &NoisyMetric, trials: u64, seed: u64) -> (usize, usize) {
    let false_fail = (0..trials).filter(|&s| !trial(seed + s, false, m)).count();
    let false_pass = (0..trials)
        .filter(|&s| trial(seed + 10_000 + s, true, m))
        .count();
    (false_fail, false_pass)
}

#[test]
fn noisy_metrics_the_analysis_rarely_fails_a_good_version_or_passes_a_bad_one() {
    // A bad version raises the error rate from 1% to 2.5%, past the limit of 1.5x the
    // baseline + 0.5 point (2%); every reading is noisy (sd 1 point) and instances differ by
    // a constant bias: the more they differ, the more the mean of 5 canaries wanders.
    let trials = 60u64;
    let mut seen = Vec::new();
    for (k, instance_sd) in [0.002, 0.004, 0.008].into_iter().enumerate() {
        let (ff, fp) = rates(&metric(0.025, instance_sd), trials, 1_000 * (k as u64 + 1));
        eprintln!(
            "error_rate good 1%, bad 2.5%, reading sd 1 pt, instance sd {:.1} pt; 5 canaries \
             of 100, {} s bake, limit 1.5x + 0.5 pt; {trials} trials each: a good version \
             failed {ff} ({:.1}%), a bad one passed {fp} ({:.1}%)",
            instance_sd * 100.0,
            BAKE_MS / 1000,
            ff as f64 * 100.0 / trials as f64,
            fp as f64 * 100.0 / trials as f64
        );
        seen.push((ff, fp));
    }
    // Instances that differ by 0.2 or 0.4 point: the analysis is right every time or
    // nearly (the canary's mean is within a few tenths of a point of the truth).
    for &(ff, fp) in &seen[..2] {
        assert!(ff as f64 <= 0.05 * trials as f64, "false failures {ff}");
        assert!(fp as f64 <= 0.05 * trials as f64, "false passes {fp}");
    }
    // At 0.8 point the limit is within the canary mean's spread: wrong verdicts appear,
    // and never fewer than with less noise.
    let errors: Vec<usize> = seen.iter().map(|(ff, fp)| ff + fp).collect();
    assert!(errors[2] >= errors[0], "{errors:?}");
}
