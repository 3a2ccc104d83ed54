//! `--store` for `drover server`, and `drover store copy`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use drover_store::{EtcdConfig, StoreSpec};

use crate::exit;

/// TLS and credentials for an etcd store (`--store etcd://...`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EtcdArgs {
    /// The CA that signed the etcd members' certificates (PEM): TLS to etcd.
    #[arg(long, env = "DROVER_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate for etcd (PEM), for members run with --client-cert-auth ...
    #[arg(long, requires = "etcd_key", env = "DROVER_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// ... and its private key (PEM).
    #[arg(long, requires = "etcd_cert", env = "DROVER_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// `value` parsed, with TLS from the flags and the user and password from
    /// `DROVER_ETCD_USER` / `DROVER_ETCD_PASSWORD` unless the URL names them.
    pub fn spec(&self, value: &str) -> anyhow::Result<StoreSpec> {
        let mut spec = StoreSpec::parse(value).map_err(|e| anyhow::anyhow!("{e}"))?;
        match &mut spec {
            StoreSpec::Etcd(cfg) => self.complete(cfg),
            StoreSpec::Sqlite(_) => {
                if self.etcd_ca.is_some() || self.etcd_cert.is_some() {
                    anyhow::bail!("--etcd-ca, --etcd-cert and --etcd-key go with an etcd:// store, not {value}");
                }
            }
        }
        Ok(spec)
    }

    fn complete(&self, cfg: &mut EtcdConfig) {
        cfg.ca = self.etcd_ca.clone();
        cfg.cert = self.etcd_cert.clone();
        cfg.key = self.etcd_key.clone();
        if cfg.user.is_none() {
            cfg.user = std::env::var("DROVER_ETCD_USER")
                .ok()
                .filter(|u| !u.is_empty());
        }
        if cfg.password.is_none() {
            cfg.password = std::env::var("DROVER_ETCD_PASSWORD").ok();
        }
    }
}

/// The `--store` of `drover server`: none means the SQLite file in the data directory.
pub fn server_store(value: Option<&str>, etcd: &EtcdArgs) -> anyhow::Result<Option<StoreSpec>> {
    value.map(|v| etcd.spec(v)).transpose()
}

#[derive(clap::Subcommand, Debug)]
pub enum StoreCommand {
    /// Copy every revision, plan, group, instance, counter, event and token from one store
    /// to another, then compare the two, record by record.
    ///
    /// e.g. `drover store copy --from sqlite:/var/lib/drover/drover.db --to
    /// etcd://h1:2379,h2:2379,h3:2379` (with the servers stopped). Revision numbers, event
    /// numbers and times stay the same.
    Copy {
        /// The store to copy: sqlite:PATH or etcd://HOST:PORT,...[/PREFIX].
        #[arg(long)]
        from: String,
        /// The store to fill: it must be empty, unless --force.
        #[arg(long)]
        to: String,
        /// Delete what the destination holds first.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

pub fn run(cmd: StoreCommand, json: bool) -> u8 {
    match cmd {
        StoreCommand::Copy {
            from,
            to,
            force,
            etcd,
        } => match copy(&from, &to, force, &etcd, json) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                exit::FAILED
            }
        },
    }
}

fn copy(from: &str, to: &str, force: bool, etcd: &EtcdArgs, json: bool) -> anyhow::Result<u8> {
    let (from_spec, to_spec) = (etcd.spec(from)?, etcd.spec(to)?);
    if from_spec == to_spec {
        anyhow::bail!("--from and --to name the same store ({from_spec})");
    }
    if let StoreSpec::Sqlite(p) = &from_spec {
        if !p.is_file() {
            anyhow::bail!("the source store {} does not exist", p.display());
        }
    }
    if let StoreSpec::Sqlite(p) = &to_spec {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    let source = from_spec
        .open()
        .with_context(|| format!("cannot open the source store {from_spec}"))?;
    if force {
        wipe(&to_spec)?;
    }
    let dest = to_spec
        .open()
        .with_context(|| format!("cannot open the destination store {to_spec}"))?;
    let before = drover_store::copy::counts(&*dest)?;
    if !before.is_empty() {
        anyhow::bail!(
            "the destination store {to_spec} is not empty ({before}); use --force to replace what it holds"
        );
    }
    let t = std::time::Instant::now();
    let moved = drover_store::copy::copy(&*source, &*dest)
        .with_context(|| format!("copying {from_spec} to {to_spec}"))?;
    let copied_in = t.elapsed();
    match drover_store::copy::compare(&*source, &*dest)? {
        Ok(same) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "from": from_spec.to_string(),
                        "to": to_spec.to_string(),
                        "verified": true,
                        "revisions": same.revisions,
                        "plans": same.plans,
                        "groups": same.groups,
                        "instances": same.instances,
                        "counters": same.counters,
                        "events": same.events,
                        "tokens": same.tokens,
                        "copy_ms": copied_in.as_millis() as u64,
                    })
                );
            } else {
                println!(
                    "copied {from_spec} to {to_spec} in {:.1} s: {moved}",
                    copied_in.as_secs_f64()
                );
                println!("verified: both stores hold the same {same}");
            }
            Ok(exit::OK)
        }
        Err(diffs) => {
            eprintln!("error: the copy in {to_spec} differs from {from_spec}:");
            for d in diffs {
                eprintln!("  {d}");
            }
            Ok(exit::FAILED)
        }
    }
}

/// Delete what the store holds (`--force`).
fn wipe(spec: &StoreSpec) -> anyhow::Result<()> {
    match spec {
        StoreSpec::Sqlite(p) => {
            for suffix in ["", "-wal", "-shm"] {
                let f = PathBuf::from(format!("{}{suffix}", p.display()));
                remove_if_there(&f)?;
            }
            Ok(())
        }
        StoreSpec::Etcd(_cfg) => {
            #[cfg(feature = "etcd")]
            {
                drover_store::EtcdStore::open(_cfg)?.wipe()?;
                Ok(())
            }
            #[cfg(not(feature = "etcd"))]
            anyhow::bail!("this drover was built without the etcd store (cargo feature `etcd`)")
        }
    }
}

fn remove_if_there(p: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", p.display())),
    }
}
