//! End to end: `apply` never undoes silently what a command set. After a deploy and a scale,
//! restarting `drover up` with the unchanged example file keeps the deployed version and the
//! count, says so and who set them; `apply --force-file` makes the file win.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn group(up: &Up) -> drover_model::api::GroupStatus {
    up.status().unwrap().groups.remove(0)
}

fn wait_for(up: &Up, what: &str, f: impl Fn(&drover_model::api::GroupStatus) -> bool) {
    let t0 = Instant::now();
    while !up.status().is_some_and(|s| f(&s.groups[0])) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what}: {:#?}",
            up.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn restarting_up_with_the_unchanged_file_keeps_the_deployed_version_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let text = fleet_text(ing, subnet(), 3)
        .replace("min_healthy_time = \"2s\"", "min_healthy_time = \"1s\"");
    let mut up = Up::start(dir.path(), &text, api, ing);
    up.wait_healthy(3, Duration::from_secs(15));
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2", "--wait", "--timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = up.cli(&["scale", "web", "4"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_for(&up, "4 on v2", |g| g.healthy == 4 && g.versions == "app=v2");
    let generation = group(&up).generation;

    // The unchanged file, as `plan` sees it: nothing changes, and the drift is named.
    let (code, out, err) = up.cli(&["plan", "drover.toml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no changes"), "{out}");
    assert!(
        out.contains(
            "kept services.web.components.app.version = v2 (set by deploy web app v2 (revision 2))"
        ),
        "{out}"
    );
    assert!(
        out.contains("kept services.web.capacity.desired (web/local) = 4"),
        "{out}"
    );
    assert!(out.contains("--force-file"), "{out}");

    // Ctrl-C, and `drover up` again with the same file.
    up.signal(libc::SIGINT);
    assert_eq!(up.wait_exit(Duration::from_secs(30)), Some(0));
    let up = Up::start(dir.path(), &text, api, ing);
    up.wait_healthy(4, Duration::from_secs(20));
    let g = group(&up);
    assert_eq!(g.versions, "app=v2", "the deployed version stays");
    assert_eq!(
        g.generation, generation,
        "no new generation: nothing rolls back"
    );
    assert_eq!(g.desired, 4, "the count set by scale stays");
    let said = std::fs::read_to_string(dir.path().join("up.err")).unwrap();
    assert!(said.contains("is unchanged"), "{said}");
    assert!(
        said.contains("kept services.web.components.app.version = v2"),
        "{said}"
    );
    let (_, hist, _) = up.cli(&["history", "--json"]);
    let hist: Vec<serde_json::Value> = serde_json::from_str(&hist).unwrap();
    assert_eq!(hist.len(), 2, "no revision 3: {hist:#?}");
    for i in g.instances.iter() {
        assert_eq!(i.generation, generation, "no instance replaced");
    }

    // A change the file made is applied, and the kept version stays kept beside it.
    let changed = text.replace("max = 6", "max = 7");
    std::fs::write(dir.path().join("drover.toml"), &changed).unwrap();
    let (code, out, err) = up.cli(&["apply", "drover.toml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("applied as revision 3"), "{out}");
    let g = group(&up);
    assert_eq!((g.max, g.versions.as_str(), g.desired), (7, "app=v2", 4));

    // The file wins when asked.
    let (code, out, err) = up.cli(&["apply", "drover.toml", "--force-file"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("file wins: services.web.components.app.version v2 -> v1"),
        "{out}"
    );
    assert!(out.contains("applied as revision 4"), "{out}");
    wait_for(&up, "back on v1 with 3, every instance replaced", |g| {
        g.versions == "app=v1"
            && g.desired == 3
            && g.generation > generation
            && g.instances.len() == 3
            && g.instances
                .iter()
                .all(|i| i.generation == g.generation && i.in_rotation)
    });
}
