//! From a plan component to what the agent runs: placeholders rendered, environment, directory,
//! and the health probe with its address.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use drover_model::fleet::{HealthCheck, HealthKind, Runtime};
use drover_model::{subst, PlanComponent};

use crate::health::Probe;
use crate::process::Launch;
use crate::AgentError;

/// Who and where this instance is: the values of the placeholders and `DROVER_*` variables.
#[derive(Clone, Debug)]
pub(crate) struct Instance {
    pub instance: String,
    pub group: String,
    pub addr: IpAddr,
    pub dir: PathBuf,
    pub drover_bin: PathBuf,
    pub generation: u64,
    /// Per component that uses other services: `DROVER_PEERS` and `DROVER_DNS`.
    pub peers_env: std::collections::BTreeMap<String, Vec<(String, String)>>,
}

impl Instance {
    /// `dir/<component>`: the component's working directory and `{dir}`.
    pub fn component_dir(&self, comp: &PlanComponent) -> PathBuf {
        self.dir.join(&comp.name)
    }

    /// `dir/<component>.log`: where its stdout and stderr go.
    pub fn log_file(&self, comp: &PlanComponent) -> PathBuf {
        self.dir.join(format!("{}.log", comp.name))
    }

    fn lookup(&self, comp: &PlanComponent, name: &str) -> Option<String> {
        Some(match name {
            "version" => comp.version.clone(),
            "addr" => self.addr.to_string(),
            "instance" => self.instance.clone(),
            "dir" => self.component_dir(comp).display().to_string(),
            "drover" => self.drover_bin.display().to_string(),
            _ => inside_port(comp, name.strip_prefix("port.")?)?.to_string(),
        })
    }

    pub(crate) fn render(&self, comp: &PlanComponent, text: &str) -> Result<String, AgentError> {
        subst::render(text, |n| self.lookup(comp, n)).map_err(|source| AgentError::Placeholder {
            component: comp.name.clone(),
            source,
        })
    }

    /// `DROVER_*` variables, then the component's own env (rendered), which may override them.
    pub(crate) fn env(&self, comp: &PlanComponent) -> Result<Vec<(String, String)>, AgentError> {
        let mut env = vec![
            ("DROVER_INSTANCE".to_string(), self.instance.clone()),
            ("DROVER_GROUP".to_string(), self.group.clone()),
            ("DROVER_ADDR".to_string(), self.addr.to_string()),
            ("DROVER_VERSION".to_string(), comp.version.clone()),
            ("DROVER_GENERATION".to_string(), self.generation.to_string()),
        ];
        env.extend(self.peers_env.get(&comp.name).cloned().unwrap_or_default());
        for name in comp.ports.keys() {
            let port = inside_port(comp, name).unwrap_or_default();
            env.push((port_var(name), port.to_string()));
        }
        for (k, v) in &comp.env {
            env.push((k.clone(), self.render(comp, v)?));
        }
        Ok(env)
    }

    /// The process to start for `comp`.
    pub fn launch(&self, comp: &PlanComponent) -> Result<Launch, AgentError> {
        if comp.runtime != Runtime::Process {
            return Err(AgentError::UnsupportedRuntime {
                component: comp.name.clone(),
                runtime: format!("{:?}", comp.runtime).to_ascii_lowercase(),
            });
        }
        let cwd = self.component_dir(comp);
        let program = resolve(&cwd, &self.render(comp, &comp.command)?);
        let args = comp
            .args
            .iter()
            .map(|a| self.render(comp, a))
            .collect::<Result<_, _>>()?;
        Ok(Launch {
            program,
            args,
            env: self.env(comp)?,
            cwd,
        })
    }

    /// The probe of `comp`'s health check, if it has one.
    pub fn probe(&self, comp: &PlanComponent) -> Result<Option<(Probe, HealthCheck)>, AgentError> {
        let Some(check) = &comp.health else {
            return Ok(None);
        };
        let bad = |reason: String| AgentError::HealthCheck {
            component: comp.name.clone(),
            reason,
        };
        let port = || -> Result<SocketAddr, AgentError> {
            let port =
                match &check.port {
                    Some(name) => *comp.ports.get(name).ok_or_else(|| {
                        bad(format!(
                            "it probes port {name:?}, which the component does not declare"
                        ))
                    })?,
                    None => *comp.ports.values().next().ok_or_else(|| {
                        bad("it needs a port and the component declares none".into())
                    })?,
                };
            Ok(SocketAddr::new(self.addr, port))
        };
        let probe = match check.kind {
            HealthKind::Tcp => Probe::Tcp(port()?),
            HealthKind::Http => Probe::Http {
                addr: port()?,
                path: check.path.clone().unwrap_or_else(|| "/".to_string()),
            },
            HealthKind::Exec => {
                let (first, rest) = check
                    .command
                    .split_first()
                    .ok_or_else(|| bad("an exec check needs a command".into()))?;
                let cwd = self.component_dir(comp);
                Probe::Exec(Launch {
                    program: resolve(&cwd, &self.render(comp, first)?),
                    args: rest
                        .iter()
                        .map(|a| self.render(comp, a))
                        .collect::<Result<_, _>>()?,
                    env: self.env(comp)?,
                    cwd,
                })
            }
        };
        Ok(Some((probe, check.clone())))
    }
}

/// The port a component listens on for its named port: the published port, or, in a
/// container, the container's own port for it (`container_ports`).
fn inside_port(comp: &PlanComponent, name: &str) -> Option<u16> {
    let published = *comp.ports.get(name)?;
    Some(
        comp.docker
            .as_ref()
            .and_then(|d| d.container_ports.get(name).copied())
            .unwrap_or(published),
    )
}

/// `DROVER_PORT_HTTP` for port `http` (`-` becomes `_`).
fn port_var(name: &str) -> String {
    format!(
        "DROVER_PORT_{}",
        name.to_ascii_uppercase().replace('-', "_")
    )
}

/// A relative program path with a `/` (e.g. `bin/app` from an artifact) is taken relative to the
/// component's directory; a bare name is looked up in `PATH`.
fn resolve(cwd: &Path, program: &str) -> PathBuf {
    let p = Path::new(program);
    if p.is_relative() && program.contains('/') {
        cwd.join(p)
    } else {
        p.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::fleet::RestartPolicy;
    use drover_model::Dur;

    fn comp() -> PlanComponent {
        PlanComponent {
            name: "app".into(),
            runtime: Runtime::Process,
            version: "v2".into(),
            command: "bin/app".into(),
            args: vec![
                "--listen".into(),
                "{addr}:{port.http}".into(),
                "{dir}/data".into(),
            ],
            env: [(
                "GREETING".to_string(),
                "hi from {instance} {version}".to_string(),
            )]
            .into_iter()
            .collect(),
            ports: [("http".to_string(), 8080), ("admin-api".to_string(), 9090)]
                .into_iter()
                .collect(),
            artifact: None,
            health: Some(HealthCheck {
                kind: HealthKind::Exec,
                port: None,
                path: None,
                command: vec!["{drover}".into(), "check".into(), "{port.admin-api}".into()],
                interval: Dur::from_secs(1),
                timeout: Dur::from_millis(500),
                healthy_threshold: 1,
                unhealthy_threshold: 3,
            }),
            restart: RestartPolicy::default(),
            stop_grace: Dur::from_secs(1),
            stop_signal: "SIGTERM".into(),
            drain_signal: None,
            docker: None,
            uses: Vec::new(),
            log: None,
            custom_metrics: Default::default(),
        }
    }

    fn inst() -> Instance {
        Instance {
            instance: "i-000003".into(),
            group: "web/local".into(),
            addr: "127.1.0.3".parse().unwrap(),
            dir: "/srv/i-000003".into(),
            drover_bin: "/usr/bin/drover".into(),
            generation: 7,
            peers_env: Default::default(),
        }
    }

    #[test]
    fn renders_command_args_env() {
        let l = inst().launch(&comp()).unwrap();
        assert_eq!(l.program, PathBuf::from("/srv/i-000003/app/bin/app"));
        assert_eq!(
            l.args,
            ["--listen", "127.1.0.3:8080", "/srv/i-000003/app/data"]
        );
        assert_eq!(l.cwd, PathBuf::from("/srv/i-000003/app"));
        let get = |k: &str| l.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("GREETING"), Some("hi from i-000003 v2"));
        assert_eq!(get("DROVER_INSTANCE"), Some("i-000003"));
        assert_eq!(get("DROVER_GROUP"), Some("web/local"));
        assert_eq!(get("DROVER_ADDR"), Some("127.1.0.3"));
        assert_eq!(get("DROVER_VERSION"), Some("v2"));
        assert_eq!(get("DROVER_GENERATION"), Some("7"));
        assert_eq!(get("DROVER_PORT_HTTP"), Some("8080"));
        assert_eq!(get("DROVER_PORT_ADMIN_API"), Some("9090"));
    }

    #[test]
    fn renders_probes() {
        let (p, _) = inst().probe(&comp()).unwrap().unwrap();
        let Probe::Exec(l) = p else { panic!("{p:?}") };
        assert_eq!(l.program, PathBuf::from("/usr/bin/drover"));
        assert_eq!(l.args, ["check", "9090"]);

        let mut c = comp();
        let h = c.health.as_mut().unwrap();
        h.kind = HealthKind::Http;
        h.port = Some("http".into());
        h.path = Some("/healthz".into());
        let (p, _) = inst().probe(&c).unwrap().unwrap();
        assert_eq!(
            p,
            Probe::Http {
                addr: "127.1.0.3:8080".parse().unwrap(),
                path: "/healthz".into()
            }
        );
        c.health.as_mut().unwrap().port = Some("nope".into());
        let e = inst().probe(&c).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn unknown_placeholder_names_component() {
        let mut c = comp();
        c.args.push("{port.nope}".into());
        let e = inst().launch(&c).unwrap_err().to_string();
        assert!(
            e.contains("component app") && e.contains("port.nope"),
            "{e}"
        );
    }

    #[test]
    fn bare_command_uses_path() {
        let mut c = comp();
        c.command = "sleep".into();
        assert_eq!(inst().launch(&c).unwrap().program, PathBuf::from("sleep"));
    }
}
