//! Fleet files for unit tests, as TOML text (no drover crate needed, so any crate's tests can
//! use them): [`web`] builds a fleet of one service `web` with one component `app`, and
//! [`DEMO`] is a fixed file that sets a field of most kinds (what a store must keep).

use std::fmt::Write as _;

/// A fleet `demo` of one service `web` in region `local` (provider `local`): an ingress, and a
/// component `app` with a templated command, args, env, ports and an HTTP health check.
pub const DEMO: &str = r#"
[fleet]
name = "demo"

[regions.local]
provider = "local"

[services.web]
regions = ["local"]
capacity = { min = 1, desired = 2, max = 4 }
ingress = { listen = "127.0.0.1:8080", port = "http" }

[services.web.components.app]
runtime = "process"
version = "v1"
command = "./app-{version}"
args = ["--port", "${port.http}"]
env = { MODE = "prod" }
ports = { http = 9000 }
health = { type = "http", port = "http", path = "/health" }
"#;

/// A fleet `t` of one service `web` in `regions`, each of provider `provider`: capacity min 1,
/// desired 1, max 2, and one component `app` (`runtime = "process"`, version `v1`, command
/// `/bin/true`). The methods change what a test needs; [`Web::toml`] is the text.
pub fn web(provider: &str, regions: &[&str]) -> Web {
    Web {
        name: "t".into(),
        regions: regions
            .iter()
            .map(|r| (r.to_string(), provider.to_string()))
            .collect(),
        service_regions: regions.iter().map(|r| r.to_string()).collect(),
        capacity: (1, 1, 2),
        service: Vec::new(),
        runtime: "process".into(),
        version: "v1".into(),
        command: "/bin/true".into(),
        app: Vec::new(),
    }
}

/// The fleet [`web`] builds.
#[derive(Clone, Debug)]
pub struct Web {
    name: String,
    /// Every region of the fleet, with its provider, in order.
    regions: Vec<(String, String)>,
    /// Those `web` runs in.
    service_regions: Vec<String>,
    capacity: (u32, u32, u32),
    service: Vec<String>,
    runtime: String,
    version: String,
    command: String,
    app: Vec<String>,
}

impl Web {
    /// The fleet's name (`[fleet] name`).
    pub fn name(mut self, name: &str) -> Web {
        self.name = name.into();
        self
    }

    /// One more region of the fleet, which `web` does not run in.
    pub fn region(mut self, name: &str, provider: &str) -> Web {
        self.regions.push((name.into(), provider.into()));
        self
    }

    /// `capacity = { min, desired, max }`.
    pub fn capacity(mut self, min: u32, desired: u32, max: u32) -> Web {
        self.capacity = (min, desired, max);
        self
    }

    /// A line of `[services.web]`, e.g. `rollout = { drain_timeout = "7s" }`.
    pub fn service(mut self, line: &str) -> Web {
        self.service.push(line.into());
        self
    }

    /// The component's `runtime` (`docker` wants an [`app`](Web::app) line `image = ...`).
    pub fn runtime(mut self, runtime: &str) -> Web {
        self.runtime = runtime.into();
        self
    }

    /// The component's `version`.
    pub fn version(mut self, version: &str) -> Web {
        self.version = version.into();
        self
    }

    /// The component's `command`.
    pub fn command(mut self, command: &str) -> Web {
        self.command = command.into();
        self
    }

    /// A line of `[services.web.components.app]`, e.g. `ports = { http = 8080 }`.
    pub fn app(mut self, line: &str) -> Web {
        self.app.push(line.into());
        self
    }

    /// The fleet file.
    pub fn toml(&self) -> String {
        let quoted = |names: &[String]| {
            let q: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
            q.join(", ")
        };
        let mut s = String::new();
        let _ = writeln!(s, "[fleet]\nname = {:?}\n", self.name);
        for (region, provider) in &self.regions {
            let _ = writeln!(s, "[regions.{region}]\nprovider = {provider:?}\n");
        }
        let (min, desired, max) = self.capacity;
        let _ = writeln!(
            s,
            "[services.web]\nregions = [{}]\ncapacity = {{ min = {min}, desired = {desired}, max = {max} }}",
            quoted(&self.service_regions)
        );
        for line in &self.service {
            let _ = writeln!(s, "{line}");
        }
        let _ = writeln!(
            s,
            "\n[services.web.components.app]\nruntime = {:?}\nversion = {:?}\ncommand = {:?}",
            self.runtime, self.version, self.command
        );
        for line in &self.app {
            let _ = writeln!(s, "{line}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_writes_each_setting_where_it_belongs() {
        let text = web("sim", &["a", "b"])
            .name("f")
            .region("c", "local")
            .capacity(0, 3, 5)
            .service(r#"rollout = { drain_timeout = "7s" }"#)
            .runtime("docker")
            .version("v2")
            .command("{drover}")
            .app(r#"image = "app""#)
            .toml();
        assert_eq!(
            text,
            r#"[fleet]
name = "f"

[regions.a]
provider = "sim"

[regions.b]
provider = "sim"

[regions.c]
provider = "local"

[services.web]
regions = ["a", "b"]
capacity = { min = 0, desired = 3, max = 5 }
rollout = { drain_timeout = "7s" }

[services.web.components.app]
runtime = "docker"
version = "v2"
command = "{drover}"
image = "app"
"#
        );
        let plain = web("local", &["local"]).toml();
        assert!(
            plain.starts_with("[fleet]\nname = \"t\"\n\n[regions.local]\nprovider = \"local\"\n"),
            "{plain}"
        );
        assert!(
            plain.ends_with(
                "capacity = { min = 1, desired = 1, max = 2 }\n\n[services.web.components.app]\n\
                 runtime = \"process\"\nversion = \"v1\"\ncommand = \"/bin/true\"\n"
            ),
            "{plain}"
        );
    }

    #[test]
    fn the_fleets_parse_and_validate_as_written() {
        let demo = drover_model::parse_fleet(DEMO, "drover.toml").unwrap();
        let app = &demo.services["web"].components["app"];
        assert_eq!(
            (demo.fleet.name.as_str(), app.ports["http"]),
            ("demo", 9000)
        );
        let text = web("sim", &["a", "b"])
            .region("c", "sim")
            .capacity(1, 3, 5)
            .service(r#"rollout = { drain_timeout = "7s", waves = [["a"], ["b"]] }"#)
            .version("v2")
            .app("ports = { http = 8080 }")
            .toml();
        let f = drover_model::parse_fleet(&text, "drover.toml").unwrap();
        let s = &f.services["web"];
        assert_eq!(s.regions, ["a", "b"]);
        assert_eq!(f.regions.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(
            (s.capacity.min, s.capacity.desired, s.capacity.max),
            (1, 3, 5)
        );
        assert_eq!(s.rollout.drain_timeout.0.as_secs(), 7);
        assert_eq!(s.components["app"].version, "v2");
    }
}
