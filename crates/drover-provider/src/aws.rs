//! The `aws` provider: each group an EC2 Auto Scaling group launching from a launch template
//! (one version per plan generation, the boot document as user-data), each ingress a Network
//! Load Balancer. The controller still decides every launch and every leave: a launch raises
//! the group's desired capacity by one (or claims an instance the group launched on its own)
//! and an instance's id is its EC2 instance id. Only instances in drover's tagged groups are
//! ever claimed or terminated.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_aws::group::{self, AsgView, GroupResources, LaunchSpec};
use drover_aws::ingress::{self, HealthCheck, IngressSpec, Nlb};
use drover_aws::{Clients, Owner};
use drover_model::boot::BootDoc;
use futures::future::BoxFuture;
use tokio::sync::mpsc::UnboundedSender;

use crate::tasks::Tasks;
use crate::{Credentials, Exit, GroupSetup, LaunchRequest, Launched, Provider, ProviderError};

/// One `aws` region of a fleet.
#[derive(Clone, Debug)]
pub struct AwsConfig {
    pub fleet: String,
    /// The drover region's name.
    pub region: String,
    pub aws_region: String,
    pub endpoint: Option<String>,
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    pub ami: String,
    pub instance_profile: Option<String>,
    /// The server's URL as instances reach it (in their boot document).
    pub server_url: String,
    pub heartbeat_interval: Duration,
    /// How often the Auto Scaling groups are read (instances gone, instances launched).
    pub poll: Duration,
    /// An instance in a drover group that no launch claimed for this long is terminated.
    pub orphan_grace: Duration,
    /// How long a launch waits for its instance to appear in the group.
    pub launch_timeout: Duration,
    pub credentials: Credentials,
}

impl AwsConfig {
    pub const DEFAULT_INSTANCE_TYPE: &'static str = "t3.micro";
}

#[derive(Default)]
struct Prepared {
    /// What the group was last prepared with (to skip work when nothing changed).
    key: String,
    generation: u64,
    resources: Option<GroupResources>,
    nlb: Option<Nlb>,
    asg: String,
    owner: Option<Owner>,
}

/// An instance the server knows.
struct Claim {
    /// Its group, once known (an adopted instance's is learnt from the next reading).
    group: Option<String>,
    /// When it was claimed: a reading of the groups older than this says nothing about it.
    at: Instant,
}

#[derive(Default)]
struct Inner {
    groups: HashMap<String, Prepared>,
    /// Instances the server knows (launched or adopted), by id.
    claimed: HashMap<String, Claim>,
    /// The last reading of this region's groups.
    views: Vec<AsgView>,
    /// Unclaimed instances and when they were first seen.
    unclaimed_since: HashMap<String, Instant>,
    /// Leaving instances whose target still drains: id → connections (1 while draining).
    draining: HashMap<String, u64>,
}

/// Provider for one `aws` region.
pub struct AwsProvider {
    cfg: AwsConfig,
    clients: tokio::sync::OnceCell<Clients>,
    inner: Arc<Mutex<Inner>>,
    exits: UnboundedSender<Exit>,
    /// Launches one at a time: each decides from the group's reading which instance is its own.
    launching: tokio::sync::Mutex<()>,
    /// The poller and the drains of leaving instances' targets.
    tasks: Tasks,
}

fn cloud(e: drover_aws::AwsError) -> ProviderError {
    ProviderError::Cloud(e.to_string())
}

impl AwsProvider {
    /// Make the provider and start its poller (needs a tokio runtime).
    pub fn new(cfg: AwsConfig, exits: UnboundedSender<Exit>) -> Arc<AwsProvider> {
        let p = Arc::new(AwsProvider {
            cfg,
            clients: tokio::sync::OnceCell::new(),
            inner: Arc::new(Mutex::new(Inner::default())),
            exits,
            launching: tokio::sync::Mutex::new(()),
            tasks: Tasks::default(),
        });
        let weak = Arc::downgrade(&p);
        let period = p.cfg.poll;
        p.tasks.spawn(async move {
            loop {
                let Some(p) = weak.upgrade() else { return };
                if let Err(e) = p.poll().await {
                    tracing::warn!(region = %p.cfg.region, "reading the Auto Scaling groups: {e}");
                }
                drop(p);
                tokio::time::sleep(period).await;
            }
        });
        p
    }

    async fn clients(&self) -> &Clients {
        self.clients
            .get_or_init(|| Clients::connect(&self.cfg.aws_region, self.cfg.endpoint.as_deref()))
            .await
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn owner(&self, service: &str) -> Owner {
        Owner {
            fleet: self.cfg.fleet.clone(),
            service: service.to_string(),
            region: self.cfg.region.clone(),
        }
    }

    /// Read the region's groups: report claimed instances that are gone, terminate instances
    /// no launch claimed within the grace.
    async fn poll(&self) -> Result<(), ProviderError> {
        let c = self.clients().await;
        let read_at = Instant::now();
        let views = group::describe_fleet(c, &self.cfg.fleet, &self.cfg.region)
            .await
            .map_err(cloud)?;
        let mut gone = Vec::new();
        let mut orphans = Vec::new();
        {
            let mut inner = self.inner();
            let live: HashMap<&str, (&str, &str)> = views
                .iter()
                .flat_map(|v| {
                    v.instances
                        .iter()
                        .filter(|i| !i.leaving())
                        .map(move |i| (i.id.as_str(), (v.name.as_str(), i.lifecycle.as_str())))
                })
                .collect();
            let all: HashMap<&str, &str> = views
                .iter()
                .flat_map(|v| {
                    v.instances
                        .iter()
                        .map(|i| (i.id.as_str(), i.lifecycle.as_str()))
                })
                .collect();
            let Inner {
                claimed,
                unclaimed_since,
                draining,
                ..
            } = &mut *inner;
            claimed.retain(|id, claim| {
                if let Some((asg, _)) = live.get(id.as_str()) {
                    if claim.group.is_none() {
                        claim.group = views
                            .iter()
                            .find(|v| v.name == *asg)
                            .map(|v| v.owner.group());
                    }
                    true
                } else if claim.at >= read_at {
                    // Claimed after this reading was taken: not evidence of anything.
                    true
                } else {
                    let status = match all.get(id.as_str()) {
                        Some(l) => format!("terminated at AWS (lifecycle {l})"),
                        None => "terminated at AWS (no longer in its Auto Scaling group)".into(),
                    };
                    gone.push(Exit {
                        instance: id.clone(),
                        status,
                    });
                    draining.remove(id);
                    false
                }
            });
            let now = Instant::now();
            unclaimed_since.retain(|id, _| live.contains_key(id.as_str()));
            for id in live.keys() {
                if claimed.contains_key(*id) {
                    unclaimed_since.remove(*id);
                    continue;
                }
                let since = *unclaimed_since.entry(id.to_string()).or_insert(now);
                if now.duration_since(since) >= self.cfg.orphan_grace {
                    orphans.push(id.to_string());
                    unclaimed_since.remove(*id);
                }
            }
            inner.views = views;
        }
        for e in gone {
            let _ = self.exits.send(e);
        }
        for id in orphans {
            tracing::warn!(instance = %id, region = %self.cfg.region,
                "terminating an instance of a drover group that no launch claimed");
            if let Err(e) = group::terminate(c, &id, true).await {
                tracing::warn!(instance = %id, "{e}");
            }
        }
        Ok(())
    }

    fn boot_doc(&self, spec: &GroupSetup) -> Result<String, ProviderError> {
        let (ca_pem, ca_sha256) = match &self.cfg.credentials.ca {
            Some(ca) => (
                Some(
                    std::fs::read_to_string(&ca.file)
                        .map_err(|e| ProviderError::Io(ca.file.clone(), e))?,
                ),
                Some(ca.sha256.clone()),
            ),
            None => (None, None),
        };
        let doc = BootDoc {
            server: self.cfg.server_url.clone(),
            group: spec.group.clone(),
            token: self.cfg.credentials.token(&spec.group),
            ca_pem,
            ca_sha256,
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            aws_region: self.cfg.aws_region.clone(),
            decrement_on_leave: spec.decrement_on_leave,
            generation: spec.plan.generation,
            plan: Some(spec.plan.clone()),
        };
        let text = doc.encode();
        // EC2 takes up to 16 KiB of user-data (base64 of it); a larger plan is fetched.
        if text.len() * 4 / 3 > 16 * 1024 {
            return Ok(BootDoc { plan: None, ..doc }.encode());
        }
        Ok(text)
    }

    async fn prepare_group(&self, spec: GroupSetup) -> Result<Vec<String>, ProviderError> {
        let owner = self.owner(&spec.service);
        let user_data = self.boot_doc(&spec)?;
        let instance_type = spec
            .instance_type
            .clone()
            .unwrap_or_else(|| AwsConfig::DEFAULT_INSTANCE_TYPE.to_string());
        let key = format!(
            "{}|{instance_type}|{}|{:?}|{user_data}",
            spec.plan.generation, spec.max_size, spec.ingress
        );
        if self
            .inner()
            .groups
            .get(&spec.group)
            .is_some_and(|g| g.key == key)
        {
            return Ok(Vec::new());
        }
        let c = self.clients().await;
        let mut done = Vec::new();
        let before = self
            .inner()
            .groups
            .get(&spec.group)
            .and_then(|g| g.resources.clone());
        let res = group::ensure_launch_template(
            c,
            &LaunchSpec {
                owner: owner.clone(),
                generation: spec.plan.generation,
                ami: self.cfg.ami.clone(),
                instance_type: instance_type.clone(),
                security_groups: self.cfg.security_groups.clone(),
                instance_profile: self.cfg.instance_profile.clone(),
                user_data,
            },
        )
        .await
        .map_err(cloud)?;
        if before.as_ref() != Some(&res) {
            done.push(format!(
                "launch template {} ({}) version {} boots generation {} ({instance_type})",
                owner.asg_name(),
                res.launch_template_id,
                res.version,
                spec.plan.generation
            ));
        }
        let had_nlb = self
            .inner()
            .groups
            .get(&spec.group)
            .and_then(|g| g.nlb.clone());
        let nlb = match &spec.ingress {
            Some(i) => {
                let nlb = ingress::ensure(
                    c,
                    &IngressSpec {
                        owner: owner.clone(),
                        listen_port: i.listen_port,
                        target_port: i.target_port,
                        subnets: self.cfg.subnets.clone(),
                        health: Some(HealthCheck {
                            http_path: i.http_path.clone(),
                            interval_s: i.interval.as_secs().max(1) as u32,
                            healthy: i.rise,
                            unhealthy: i.fall,
                        }),
                        deregistration_delay_s: i.drain.as_secs(),
                    },
                )
                .await
                .map_err(cloud)?;
                if had_nlb.as_ref() != Some(&nlb) {
                    done.push(format!(
                        "network load balancer {} ({}) listens on port {} for target group {} (port {})",
                        owner.elb_name(),
                        nlb.dns_name,
                        i.listen_port,
                        nlb.target_group_arn,
                        i.target_port
                    ));
                }
                Some(nlb)
            }
            None => None,
        };
        let tgs: Vec<String> = nlb.iter().map(|n| n.target_group_arn.clone()).collect();
        group::ensure_asg(c, &owner, &res, &self.cfg.subnets, spec.max_size, &tgs)
            .await
            .map_err(cloud)?;
        if before.is_none() {
            done.push(format!(
                "Auto Scaling group {} launches version {} (max {}, subnets {})",
                owner.asg_name(),
                res.version,
                spec.max_size,
                self.cfg.subnets.join(", ")
            ));
        }
        self.inner().groups.insert(
            spec.group.clone(),
            Prepared {
                key,
                generation: spec.plan.generation,
                resources: Some(res),
                nlb,
                asg: owner.asg_name(),
                owner: Some(owner),
            },
        );
        Ok(done)
    }

    async fn launch_one(&self, req: LaunchRequest) -> Result<Launched, ProviderError> {
        let _one = self.launching.lock().await;
        let (asg, version, owner) = {
            let inner = self.inner();
            let g = inner
                .groups
                .get(&req.group)
                .filter(|g| g.generation == req.plan.generation)
                .ok_or_else(|| {
                    ProviderError::Launch(format!(
                        "group {} has no launch template version for generation {} yet",
                        req.group, req.plan.generation
                    ))
                })?;
            (
                g.asg.clone(),
                g.resources.as_ref().map(|r| r.version.to_string()),
                g.owner.clone(),
            )
        };
        let c = self.clients().await;
        let deadline = Instant::now() + self.cfg.launch_timeout;
        let mut raised = false;
        // Instances seen in the group that booted another generation (e.g. launched before
        // the template changed): never claimed here; the orphan sweep removes them.
        let mut other = BTreeSet::new();
        loop {
            let view = group::describe(c, Some(&asg))
                .await
                .map_err(cloud)?
                .into_iter()
                .next()
                .ok_or_else(|| {
                    ProviderError::Launch(format!("Auto Scaling group {asg} is gone"))
                })?;
            let live: Vec<_> = view.instances.iter().filter(|i| !i.leaving()).collect();
            let candidates: Vec<String> = {
                let inner = self.inner();
                live.iter()
                    .filter(|i| {
                        !inner.claimed.contains_key(&i.id)
                            && !other.contains(&i.id)
                            && (i.version.is_none() || i.version == version)
                    })
                    .map(|i| i.id.clone())
                    .collect()
            };
            if !candidates.is_empty() {
                // The instance's own tags say what it booted and whose it is.
                let facts = group::instances(c, &candidates).await.map_err(cloud)?;
                for id in candidates {
                    let f = facts.get(&id);
                    let mine = f.is_some_and(|f| {
                        f.owner == owner && f.generation == Some(req.plan.generation)
                    });
                    if !mine {
                        other.insert(id);
                        continue;
                    }
                    let mut inner = self.inner();
                    if inner.claimed.contains_key(&id) {
                        continue;
                    }
                    inner.claimed.insert(
                        id.clone(),
                        Claim {
                            group: Some(req.group.clone()),
                            at: Instant::now(),
                        },
                    );
                    return Ok(Launched {
                        provider_id: id.clone(),
                        addr: f
                            .and_then(|f| f.addr)
                            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                        instance: Some(id),
                        // A launch template's boot document is shared by the whole group.
                        own_token: false,
                    });
                }
            }
            // Raise the capacity once, unless a launch is already under way (the group has
            // fewer instances than its capacity: it is starting one, e.g. to replace a leaver
            // that kept its capacity). Raised by one at AWS, not set to a count read here: an
            // instance leaving meanwhile with its capacity lowers it in between.
            let pending = view.desired as usize > live.len() - other.len().min(live.len());
            if !raised && !pending {
                if view.desired >= view.max {
                    return Err(ProviderError::Launch(format!(
                        "Auto Scaling group {asg} is at its maximum size ({})",
                        view.max
                    )));
                }
                group::add_one(c, &asg).await.map_err(cloud)?;
                raised = true;
            }
            if Instant::now() > deadline {
                return Err(ProviderError::Launch(format!(
                    "no new instance appeared in Auto Scaling group {asg} within {:?} (see its activity history)",
                    self.cfg.launch_timeout
                )));
            }
            tokio::time::sleep(self.cfg.poll.min(Duration::from_millis(500))).await;
        }
    }

    async fn sweep_groups(&self, keep: BTreeSet<String>) -> Result<Vec<String>, ProviderError> {
        let candidates: BTreeMap<String, Owner> = {
            let inner = self.inner();
            let busy: BTreeSet<&str> = inner
                .claimed
                .values()
                .filter_map(|c| c.group.as_deref())
                .collect();
            let mut out = BTreeMap::new();
            for v in &inner.views {
                let g = v.owner.group();
                if !keep.contains(&g) && !busy.contains(g.as_str()) {
                    out.insert(g, v.owner.clone());
                }
            }
            for (g, p) in &inner.groups {
                if let (false, false, Some(o)) =
                    (keep.contains(g), busy.contains(g.as_str()), &p.owner)
                {
                    out.insert(g.clone(), o.clone());
                }
            }
            out
        };
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.clients().await;
        let mut done = Vec::new();
        for (g, owner) in candidates {
            let removed = group::destroy(c, &owner).await.map_err(cloud)?;
            {
                let mut inner = self.inner();
                inner.groups.remove(&g);
                inner.views.retain(|v| v.owner != owner);
            }
            if !removed.is_empty() {
                done.push(format!("{g} removed: {}", removed.join(", ")));
            }
        }
        Ok(done)
    }

    fn start_drain(&self, instance: &str) {
        let tg = {
            let mut inner = self.inner();
            let group = inner.claimed.get(instance).and_then(|c| c.group.clone());
            let tg = group
                .and_then(|g| inner.groups.get(&g))
                .and_then(|p| p.nlb.as_ref())
                .map(|n| n.target_group_arn.clone());
            if tg.is_some() {
                inner.draining.insert(instance.to_string(), 1);
            }
            tg
        };
        let Some(tg) = tg else { return };
        let inner = self.inner.clone();
        let id = instance.to_string();
        let c = self.clients.get().cloned();
        let poll = self.cfg.poll.min(Duration::from_secs(1));
        self.tasks.spawn(async move {
            let Some(c) = c else { return };
            if let Err(e) = ingress::deregister(&c, &tg, &id).await {
                tracing::warn!(instance = %id, "deregistering from the load balancer: {e}");
            }
            loop {
                match ingress::target_state(&c, &tg, &id).await {
                    Ok(Some(s)) if s == "draining" => {}
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(instance = %id, "reading target health: {e}");
                        break;
                    }
                }
                tokio::time::sleep(poll).await;
            }
            inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .draining
                .insert(id, 0);
        });
    }
}

/// The trait is implemented on the shared handle so the poller can hold it weakly.
pub struct Aws(pub Arc<AwsProvider>);

impl Provider for Aws {
    fn kind(&self) -> &'static str {
        "aws"
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<Launched, ProviderError>> {
        Box::pin(self.0.launch_one(req))
    }

    fn terminate(
        &self,
        instance: &str,
        _grace: Duration,
    ) -> BoxFuture<'_, Result<(), ProviderError>> {
        let id = instance.to_string();
        Box::pin(async move {
            if !self.0.inner().claimed.contains_key(&id) {
                return Err(ProviderError::Cloud(format!(
                    "{id} is not an instance of a drover Auto Scaling group; not terminating it"
                )));
            }
            let c = self.0.clients().await;
            // The instance's system shuts down: the agent gets SIGTERM and stops its
            // components within their grace.
            group::terminate(c, &id, true).await.map_err(cloud)
        })
    }

    fn alive(&self, instance: &str) -> bool {
        self.0.inner().claimed.contains_key(instance)
    }

    fn adopt(&self, instance: &str) -> bool {
        // Taken on trust until the next reading of the groups says otherwise.
        self.0.inner().claimed.insert(
            instance.to_string(),
            Claim {
                group: None,
                at: Instant::now(),
            },
        );
        true
    }

    fn shutdown(&self, _grace: Duration) -> BoxFuture<'_, ()> {
        // Instances on EC2 outlive the server (static stability); `drover destroy` removes them.
        Box::pin(async {})
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.0.tasks.close())
    }

    fn prepare(&self, spec: GroupSetup) -> BoxFuture<'_, Result<Vec<String>, ProviderError>> {
        Box::pin(self.0.prepare_group(spec))
    }

    fn sweep(&self, keep: BTreeSet<String>) -> BoxFuture<'_, Result<Vec<String>, ProviderError>> {
        Box::pin(self.0.sweep_groups(keep))
    }

    fn balances(&self) -> bool {
        true
    }

    fn deregister(&self, instance: &str) {
        self.0.start_drain(instance);
    }

    fn draining(&self, instance: &str) -> Option<u64> {
        let inner = self.0.inner();
        let group = inner.claimed.get(instance).and_then(|c| c.group.clone());
        let has_nlb = group
            .and_then(|g| inner.groups.get(&g))
            .is_some_and(|p| p.nlb.is_some());
        has_nlb.then(|| inner.draining.get(instance).copied().unwrap_or(0))
    }
}
