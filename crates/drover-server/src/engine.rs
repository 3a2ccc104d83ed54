//! The engine, the shell around the fleet's world ([`drover_control::world`]): it holds the
//! world behind one lock, takes an input (a heartbeat, an exit, a tick, an API call), has
//! the world plan it, and carries the plan out through the store, the providers, the
//! balancers and discovery. It runs the controller loop; the rules are the world's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use drover_control::{Action, Timing};
use drover_model::api::{FleetStatus, Heartbeat, HeartbeatReply, Revision};
use drover_model::{EventKind, NewEvent, Plan};
use drover_provider::{Exit, LaunchRequest, Provider};
use drover_store::{Store, Write};
use tokio::sync::{broadcast, mpsc, Notify};

use crate::state::{CancelRefused, Change, Group, Record, World};
use crate::ServerError;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct Engine {
    /// Reads go to the store directly; every write goes through `writer`.
    pub(crate) store: Arc<dyn Store>,
    writer: crate::writer::Writer,
    state: Mutex<World>,
    /// Per instance, what wakes its permit long-poll (and no other) when its lifecycle
    /// changes. Taken only while `state` is held (or after it), so an entry is never made
    /// for an instance already gone.
    permit_wakes: Mutex<std::collections::HashMap<String, Arc<Notify>>>,
    /// One provider per region, made when a region first appears.
    providers: Mutex<BTreeMap<String, Arc<dyn Provider>>>,
    pub(crate) factory: crate::ProviderFactory,
    /// The ingresses and targets that balancer processes follow, and their reports.
    pub(crate) balancers: crate::balancer::Balancers,
    /// Service discovery: each group's peers, and which agents applied them.
    pub(crate) peers: crate::peers::Peers,
    /// When the API began to answer (ms since the epoch; 0 before).
    ready_ms: std::sync::atomic::AtomicU64,
    pub(crate) events_tx: broadcast::Sender<drover_model::Event>,
    pub(crate) wake: Notify,
    pub(crate) timing: Timing,
    /// The last error of each group's provider, recorded once until it changes.
    pub(crate) provider_errors: Mutex<BTreeMap<String, String>>,
    /// Serialises writers of desired state (apply, controller ticks).
    pub(crate) write_lock: tokio::sync::Mutex<()>,
    /// Permit long-polls being held now (`/metrics`).
    permit_polls: std::sync::atomic::AtomicUsize,
    /// Controller passes so far (`/metrics`).
    passes: std::sync::atomic::AtomicU64,
    /// Instance views the passes read so far (`/metrics`).
    reconciled: std::sync::atomic::AtomicU64,
    /// The lead this engine acts under (several servers on etcd); none: it always may act.
    authority: std::sync::OnceLock<Arc<crate::ha::Authority>>,
    /// Image tags resolved before the write lock ([`crate::registry::prefetch`]).
    pub(crate) pins: crate::registry::Prefetched,
    /// What artifact fetches found ([`crate::artifact::prefetch`]).
    pub(crate) artifacts: crate::artifact::Checked,
}

/// Counts a held permit long-poll while it lives.
struct HeldPoll<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> HeldPoll<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> HeldPoll<'a> {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HeldPoll(n)
    }
}

impl Drop for HeldPoll<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Engine {
    pub fn new(
        store: Box<dyn Store>,
        timing: Timing,
        factory: crate::ProviderFactory,
    ) -> Result<Engine, ServerError> {
        Engine::new_shared(Arc::from(store), timing, factory)
    }

    /// Like [`Engine::new`], over a store shared with others (the leader's terms, each with
    /// an engine of its own, read the same store).
    pub fn new_shared(
        store: Arc<dyn Store>,
        timing: Timing,
        factory: crate::ProviderFactory,
    ) -> Result<Engine, ServerError> {
        let snap = store.snapshot()?;
        let now = now_ms();
        let revision = snap.revision;
        let mut providers: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
        if let Some(rev) = &revision {
            for (name, region) in &rev.fleet.regions {
                if let Some(p) = factory.make(&rev.fleet.fleet.name, name, region) {
                    providers.insert(name.clone(), p);
                }
            }
        }
        let plans: BTreeMap<String, Plan> =
            snap.plans.into_iter().map(|p| (p.group().0, p)).collect();
        let groups = snap
            .groups
            .into_iter()
            .filter_map(|rec| {
                let plan = plans.get(&rec.group).cloned()?;
                let (provider, ingress) = group_facts(revision.as_ref(), &plan);
                Some(Group {
                    record: rec,
                    plan,
                    provider,
                    ingress,
                })
            })
            .collect();
        // Soft state is rebuilt from heartbeats; until then, a grace period from when the API
        // answers ([`Engine::api_ready`]; from now until then).
        let instances = snap.instances.into_iter().map(|rec| {
            let alive = providers
                .get(region_of(&rec.group))
                .is_some_and(|p| p.adopt(&rec.id));
            (rec, alive)
        });
        let state = World::restore(
            revision,
            groups,
            instances,
            &snap.counters,
            snap.schedules,
            timing.silent_after_ms,
            now,
        );
        let (events_tx, _) = broadcast::channel(4096);
        let publish = events_tx.clone();
        let writer = crate::writer::Writer::start(store.clone(), move |e| {
            tracing::info!(seq = e.seq, kind = e.kind.as_str(), group = ?e.group, instance = ?e.instance, "{}", e.message);
            let _ = publish.send(e.clone());
        })
        .map_err(|e| ServerError::Io("cannot start the store writer".into(), e))?;
        Ok(Engine {
            store,
            writer,
            state: Mutex::new(state),
            permit_wakes: Default::default(),
            providers: Mutex::new(providers),
            factory,
            balancers: crate::balancer::Balancers::new(),
            peers: crate::peers::Peers::new(),
            ready_ms: Default::default(),
            events_tx,
            wake: Notify::new(),
            timing,
            write_lock: tokio::sync::Mutex::new(()),
            provider_errors: Mutex::new(BTreeMap::new()),
            permit_polls: Default::default(),
            passes: Default::default(),
            reconciled: Default::default(),
            authority: Default::default(),
            pins: Default::default(),
            artifacts: Default::default(),
        })
    }

    /// Act only while `authority` holds (a leader's lease): no controller pass and no permit
    /// after it ran out, whatever the engine still holds in memory.
    pub fn set_authority(&self, authority: Arc<crate::ha::Authority>) {
        let _ = self.authority.set(authority);
    }

    /// Whether this engine may act now (always, without an election).
    pub fn may_act(&self) -> bool {
        !matches!(self.authority.get(), Some(a) if !a.holds())
    }

    /// Every region's provider, out of the lock.
    fn all_providers(&self) -> Vec<Arc<dyn Provider>> {
        self.providers
            .lock()
            .expect("providers lock")
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn providers_by_region(&self) -> Vec<(String, Arc<dyn Provider>)> {
        self.providers
            .lock()
            .expect("providers lock")
            .iter()
            .map(|(r, p)| (r.clone(), p.clone()))
            .collect()
    }

    /// The API answers from now on: the silence of every instance loaded from the store (and
    /// not heard from yet) counts from now, plus a grace, not from when the store was read.
    pub fn api_ready(&self) {
        let now = now_ms();
        self.ready_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
        self.state().api_ready(now);
    }

    pub(crate) fn provider(&self, region: &str) -> Option<Arc<dyn Provider>> {
        self.providers
            .lock()
            .expect("providers lock")
            .get(region)
            .cloned()
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, World> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commit writes with the store writer's next group; returns once they are durable (the
    /// events they carry are published then).
    pub(crate) async fn commit(
        &self,
        writes: Vec<Write>,
    ) -> Result<drover_store::Committed, ServerError> {
        Ok(self.writer.commit(writes, now_ms()).await?)
    }

    /// Record events on their own, without waiting: they are written with the writer's next
    /// group (soft state: health changes, rotation, failed launches).
    pub fn record(&self, events: Vec<NewEvent>) {
        self.writer
            .submit(events.into_iter().map(Write::Event).collect(), now_ms());
    }

    /// Resolves once every write queued so far is durable.
    pub async fn flush(&self) {
        self.writer.flush().await;
    }

    /// Stop the instances a provider still runs that no record names: launched by a server
    /// that stopped before it could record them (the id counter is stored before each
    /// launch, the record after it). They were never in rotation; nothing else would ever
    /// stop them. Each one is an event.
    pub async fn reap_unrecorded(&self) {
        let known: std::collections::BTreeSet<String> =
            self.state().instances.keys().cloned().collect();
        let providers = self.all_providers();
        let grace = Duration::from_millis(crate::state::DEFAULT_STOP_GRACE_MS);
        for p in providers {
            for id in p.unrecorded(&known) {
                let message = match p.terminate(&id, grace).await {
                    Ok(()) => format!(
                        "{id} runs but was never recorded (a server stopped between its launch and its record): terminating it"
                    ),
                    Err(e) => format!("{id} runs but was never recorded; terminating it failed: {e}"),
                };
                tracing::warn!(instance = %id, "{message}");
                self.record(vec![
                    NewEvent::new(EventKind::Terminating, message).instance(&id)
                ]);
            }
        }
    }

    /// Put the ingress of every group that has one in the balancers' config.
    pub fn open_ingresses(&self) {
        let wanted: Vec<(
            String,
            SocketAddr,
            drover_model::api::Balance,
            Option<drover_lb::HealthCheckConfig>,
        )> = {
            let st = self.state();
            st.groups
                .values()
                .filter_map(|g| {
                    let (a, _) = g.ingress?;
                    let svc = st.service(g);
                    let balance = svc
                        .and_then(|s| s.ingress.as_ref())
                        .map(|i| i.balance)
                        .unwrap_or_default();
                    Some((
                        g.record.group.clone(),
                        a,
                        balance,
                        svc.and_then(balancer_health),
                    ))
                })
                .collect()
        };
        for (group, addr, balance, health) in wanted {
            let created = self.balancers.set_listener(
                &group,
                addr,
                balance,
                health.as_ref().map(crate::balancer::wire_health),
            );
            if created {
                // Its targets go to it at the next pass.
                self.state().published.remove(&group);
            }
        }
    }

    /// Refuse an ingress address that is neither the balancers' already nor free: a port
    /// that another program holds (the balancer could not open it).
    pub(crate) fn check_ingress(&self, group: &str, addr: SocketAddr) -> Result<(), ServerError> {
        if addr.port() == 0 || self.balancers.listens_on(addr) {
            return Ok(());
        }
        probe_bind(addr).map_err(|source| ServerError::IngressInUse {
            group: group.to_string(),
            addr,
            source,
        })
    }

    pub(crate) fn close_ingress(&self, group: &str) {
        self.balancers.remove_listener(group);
        self.state().published.remove(group);
    }

    /// The balancers' counters (`/metrics`).
    pub fn balancer_stats(&self) -> Vec<drover_lb::ListenerStats> {
        self.balancers.stats()
    }

    /// Every instance listed, read a chunk at a time ([`crate::status`]).
    pub fn status(&self) -> FleetStatus {
        crate::status::fleet_status(self, &crate::state::Listing::All)
    }

    pub fn current_revision(&self) -> Option<Revision> {
        self.state().revision.clone()
    }

    // ---------------------------------------------------------------- apply

    /// Make a provider for every region of `fleet` that has none yet.
    pub(crate) fn ensure_providers(&self, fleet: &drover_model::Fleet) -> Result<(), ServerError> {
        let mut providers = self.providers.lock().expect("providers lock");
        for (name, region) in &fleet.regions {
            if providers.contains_key(name) {
                continue;
            }
            match self.factory.make(&fleet.fleet.name, name, region) {
                Some(p) => {
                    providers.insert(name.clone(), p);
                }
                None => {
                    return Err(ServerError::Conflict(format!(
                        "provider {:?} of region {name} is not available in this build{}",
                        region.provider.as_str(),
                        if region.provider == drover_model::fleet::ProviderKind::Aws {
                            "; build drover with `cargo build --release --features aws`"
                        } else {
                            ""
                        }
                    )))
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ heartbeats

    pub fn heartbeat(&self, hb: Heartbeat) -> Result<HeartbeatReply, ServerError> {
        let now = now_ms();
        let (wake, reply) = {
            let mut st = self.state();
            let step = st
                .heartbeat(hb, now)
                .map_err(|_| ServerError::NotThisInstance)?;
            // Queued (never waited for) under the lock: events in the order of the changes.
            self.record(step.events);
            (step.wake, step.reply)
        };
        if wake {
            self.wake.notify_one();
        }
        Ok(reply)
    }

    /// The provider saw an instance end.
    pub fn exited(&self, exit: Exit) {
        if self.state().exited(&exit.instance) {
            tracing::debug!(instance = %exit.instance, status = %exit.status, "instance exited");
        }
        self.wake.notify_one();
    }

    // ------------------------------------------------------------ controller

    /// One controller pass: autoscale, decide, then carry out the decision. Returns how long
    /// its planning took (reconciles and publishing: the CPU a pass costs, without the
    /// commits, launches and other I/O it waited for).
    pub async fn tick(self: &Arc<Self>) -> Duration {
        let _w = self.write_lock.lock().await;
        if !self.may_act() {
            return Duration::ZERO;
        }
        self.passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Launch configurations at the providers first: nothing of a new generation launches,
        // and no stale instance leaves, before its group's provider knows the plan.
        self.prepare_groups().await;
        let now = now_ms();
        if let Err(e) = self.schedule_pass(now).await {
            tracing::error!("schedules: {e}");
        }
        if let Err(e) = self.autoscale(now).await {
            tracing::error!("autoscale: {e}");
        }
        // The passes of a tick, in their order ([`drover_control::world::TickPasses`]): a
        // pass that lets instances go frees surge room, and the next launches their
        // replacements now. Each pass reconciles only the groups that need it
        // (`World::reconcile_due`).
        let mut passes = drover_control::world::TickPasses::default();
        let mut planning = Duration::ZERO;
        while passes.wants_pass() {
            let t = std::time::Instant::now();
            let decision = self.reconcile_due(now);
            planning += t.elapsed();
            let step = passes.take(decision);
            if let Some(suspect) = step.suspect {
                self.note_suspicion(&suspect);
            }
            for action in step.actions {
                if let Err(e) = self.act(action, now).await {
                    tracing::error!("controller action failed: {e}");
                }
            }
        }
        let targets = passes.targets();
        let t = std::time::Instant::now();
        self.update_targets(targets);
        planning += t.elapsed();
        self.check_rebuilt();
        if let Err(e) = self.release_waves(now).await {
            tracing::error!("waves: {e}");
        }
        self.sweep_providers().await;
        planning
    }

    /// Reconcile the groups that need it now ([`World::reconcile_due`]), one group per hold
    /// of the state lock: a heartbeat waits at most for one group's reconcile.
    fn reconcile_due(&self, now: u64) -> drover_control::Decision {
        let due = self.state().due(now);
        let mut pass = crate::state::Pass::default();
        for group in due {
            self.state()
                .reconcile_one(&group, now, &self.timing, &mut pass);
        }
        self.state().end_pass(&mut pass);
        self.reconciled
            .fetch_add(pass.instances as u64, std::sync::atomic::Ordering::Relaxed);
        pass.decision
    }

    /// Instance views read by controller passes so far (`/metrics`: a pass costs what
    /// changed, so this grows with changes, not with the fleet).
    pub fn reconciled(&self) -> u64 {
        self.reconciled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Let the fleet's change reach the next wave of each service whose earlier waves are
    /// done (`drover_control::waves::release`). The caller holds the write lock.
    async fn release_waves(&self, now: u64) -> Result<(), ServerError> {
        let releases = self.state().wave_releases(now);
        for (wave, groups) in releases {
            let Some(rev) = self.current_revision() else {
                return Ok(());
            };
            self.apply_locked(
                drover_model::api::ApplyRequest {
                    file: rev.file.clone(),
                    toml: rev.toml.clone(),
                    dry_run: false,
                    force_file: false,
                },
                crate::apply::Origin::Wave { wave, groups },
            )
            .await?;
        }
        Ok(())
    }

    /// The view is rebuilt once every instance restored from the store whose agent is alive
    /// has reported to this server, or [`RESTART_GRACE_MS`] after the API began to answer:
    /// from then on the balancers may take the targets as complete.
    fn check_rebuilt(&self) {
        if self.balancers.rebuilt() {
            return;
        }
        let ready = self.ready_ms.load(std::sync::atomic::Ordering::Relaxed);
        if self.state().rebuilt(now_ms(), ready) {
            self.balancers.set_rebuilt();
        }
    }

    /// Run the schedule rules of every group that has schedules
    /// ([`drover_control::schedule::step`]); store their memory, record the windows that
    /// began or ended, and the counts they set.
    async fn schedule_pass(&self, now: u64) -> Result<(), ServerError> {
        let change = self.state().schedule_step(now);
        self.carry_out_change(change).await
    }

    /// Run the autoscaler of every group that has a policy ([`World::autoscale_step`]);
    /// store and record its changes.
    async fn autoscale(&self, now: u64) -> Result<(), ServerError> {
        let change = self.state().autoscale_step(now);
        self.carry_out_change(change).await
    }

    /// Set the desired count of a service's groups (`drover scale`). Autoscaling goes on
    /// from the new count.
    pub async fn scale(
        &self,
        req: drover_model::api::ScaleRequest,
    ) -> Result<drover_model::api::ScaleResponse, ServerError> {
        let _w = self.write_lock.lock().await;
        let now = now_ms();
        let (change, changed) = {
            let st = self.state();
            let svc = crate::state::service_in(&st, &req.service, req.region.as_deref())?;
            st.plan_scale(&svc, &req, now)
                .map_err(ServerError::BadRequest)?
        };
        self.carry_out_change(change).await?;
        self.wake.notify_one();
        Ok(drover_model::api::ScaleResponse { groups: changed })
    }

    /// Store a one-off scheduled change (`drover scale web 50 --at ... --for 3h`).
    pub async fn schedule_once(
        &self,
        req: drover_model::api::ScheduleRequest,
    ) -> Result<drover_model::api::ScheduledScale, ServerError> {
        let _w = self.write_lock.lock().await;
        let now = now_ms();
        let (once, records) = {
            let st = self.state();
            crate::state::service_in(&st, &req.service, req.region.as_deref())?;
            st.plan_schedule_once(&req, now)
                .map_err(ServerError::BadRequest)?
        };
        self.commit(records.into_iter().map(write_of).collect())
            .await?;
        self.state().keep_schedule(once.clone());
        self.wake.notify_one();
        Ok(once)
    }

    /// Cancel a one-off scheduled change; if it holds now, its bounds drop at the next pass.
    pub async fn cancel_schedule(
        &self,
        id: &str,
    ) -> Result<drover_model::api::ScheduledScale, ServerError> {
        let _w = self.write_lock.lock().await;
        let now = now_ms();
        let Ok(n) = id.parse::<u64>() else {
            return Err(ServerError::NotOneOffSchedule(id.to_string()));
        };
        let planned = self.state().plan_cancel(n, now);
        let (once, records) = planned.map_err(|e| match e {
            CancelRefused::NoSchedule => ServerError::NoSchedule(n),
            CancelRefused::Cancelled => ServerError::ScheduleCancelled(n),
            CancelRefused::Ended => ServerError::ScheduleEnded(n),
        })?;
        self.commit(records.into_iter().map(write_of).collect())
            .await?;
        self.state().keep_schedule(once.clone());
        self.wake.notify_one();
        Ok(once)
    }

    /// Every schedule: the fleet file's, and the one-offs (ended and cancelled ones too).
    pub fn list_schedules(&self) -> drover_model::api::ScheduleList {
        self.state().schedule_list(now_ms())
    }

    /// Take one instance out of its group's balancer at once.
    fn remove_target(&self, group: &str, instance: &str) {
        self.balancers.remove_target(group, instance);
        self.peers.remove(group, instance);
    }

    /// Give the balancers and discovery the targets a pass decided ([`World::publish`]).
    fn update_targets(&self, targets: BTreeMap<String, Vec<String>>) {
        let (published, events) = self.state().publish(targets);
        for p in published {
            if let Some(peers) = p.peers {
                self.peers.set(&p.group, peers);
            }
            if let Some((list, leaving)) = p.balancer {
                self.balancers.set_targets(&p.group, list, leaving);
            }
        }
        self.record(events);
    }

    async fn act(self: &Arc<Self>, action: Action, now: u64) -> Result<(), ServerError> {
        match action {
            Action::Launch { .. }
            | Action::Forget { .. }
            | Action::Terminate { .. }
            | Action::Permit { .. } => {
                let effects = self.state().effects_of(&action, now);
                self.carry_out(effects, now).await
            }
            Action::RolloutDone { group, generation } => {
                let change = self.state().rollout_done(&group, generation, now);
                match change {
                    Some(change) => self.carry_out_change(change).await,
                    None => Ok(()),
                }
            }
            Action::RolloutFailed {
                group,
                generation,
                reason,
                instance,
            } => {
                self.rollout_failed(&group, generation, &reason, instance.as_deref())
                    .await
            }
            Action::CanaryBaking { group, generation } => {
                self.canary_baking(&group, generation, now).await
            }
            Action::CanaryAnalyse { group, generation } => {
                self.canary_analyse(&group, generation, now).await
            }
        }
    }

    /// Carry out an action's effects (`drover_control::effects`), in their order: what
    /// goes to the store is committed first, in one batch (an event with its change), then
    /// memory follows, then the balancers, the agents and the providers.
    async fn carry_out(
        &self,
        effects: Vec<drover_control::effects::Effect>,
        now: u64,
    ) -> Result<(), ServerError> {
        use drover_control::effects::Effect;
        let (commits, records) = self.state().stage_effects(&effects, now);
        if !commits.is_empty() {
            self.commit(commits.into_iter().map(write_of).collect())
                .await?;
        }
        self.state().set_instances(records);
        for e in effects {
            match e {
                Effect::Remove { instance } => {
                    self.state().instances.remove(&instance);
                    self.balancers.forget_instance(&instance);
                    self.peers.forget(&instance);
                    // A long-poll still held for it ends (404) rather than at its deadline.
                    if let Some(w) = self.permit_wakes.lock().unwrap().remove(&instance) {
                        w.notify_waiters();
                    }
                }
                Effect::OutOfRotation { group, instance } => {
                    self.remove_target(&group, &instance);
                    if let Some(p) = self.provider(region_of(&group)) {
                        p.deregister(&instance);
                    }
                }
                Effect::WakePermitPoll { instance } => self.wake_permit_poll(&instance),
                Effect::ProviderTerminate { instance } => {
                    let group = self
                        .state()
                        .instances
                        .get(&instance)
                        .map(|i| i.record.group.clone());
                    if let Some(group) = group {
                        let grace = self.stop_grace(&group);
                        if let Some(p) = self.provider(region_of(&group)) {
                            p.terminate(&instance, grace).await?;
                        }
                    }
                }
                Effect::Launch { group, generation } => self.launch(&group, generation).await?,
                Effect::LaunchFailed { group } => {
                    tracing::warn!(%group, "instance ended before turning healthy; backing off launches")
                }
                Effect::SetPhase { .. } | Effect::Event { .. } => {}
            }
        }
        Ok(())
    }

    /// A rollout failed: record why, and go back to the last good generation with
    /// `auto_revert`. The caller holds the write lock.
    /// A rollout failed; `instance`: the new instance whose output tells why (the event
    /// names it and says where its last lines are: live, or the flight recorder's).
    pub(crate) async fn rollout_failed(
        &self,
        group: &str,
        generation: u64,
        reason: &str,
        instance: Option<&str>,
    ) -> Result<(), ServerError> {
        let planned = self
            .state()
            .rollout_failed(group, generation, reason, instance);
        let Some((change, after)) = planned else {
            return Ok(());
        };
        self.carry_out_change(change).await?;
        if let drover_control::rollout::AfterFailure::Revert { to } = after {
            self.auto_revert(group, generation, to).await?;
        }
        Ok(())
    }

    /// Carry out a step's change ([`drover_control::world::Change`]): store its records in
    /// one commit, then, only once they are stored, take its memory (a failed commit leaves
    /// memory as the store has it; the caller holds the write lock).
    pub(crate) async fn carry_out_change(&self, change: Change) -> Result<(), ServerError> {
        if !change.commits.is_empty() {
            self.commit(change.commits.into_iter().map(write_of).collect())
                .await?;
        }
        self.state().accept(change.staged);
        Ok(())
    }

    /// Wake the permit long-poll of `instance` (only its own).
    fn wake_permit_poll(&self, instance: &str) {
        let wake = self.permit_wakes.lock().unwrap().get(instance).cloned();
        if let Some(w) = wake {
            w.notify_waiters();
        }
    }

    /// Wait up to `wait` for `instance` to hold a permit (the agent's long-poll). Woken only
    /// by a change of this instance's lifecycle: a permit costs one wake-up, not one per
    /// waiting long-poll.
    pub async fn wait_permit(
        &self,
        instance: &str,
        wait: Duration,
    ) -> Result<drover_model::api::PermitReply, ServerError> {
        let wake = {
            let st = self.state();
            if !st.instances.contains_key(instance) {
                return Err(ServerError::NoInstance(instance.to_string()));
            }
            // Made while the instance is known (see `permit_wakes`).
            self.permit_wakes
                .lock()
                .unwrap()
                .entry(instance.to_string())
                .or_default()
                .clone()
        };
        let _held = HeldPoll::new(&self.permit_polls);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the look below, so a wake in between is not missed.
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // Decided as the permit is answered, from the group as it is now.
            let Some(permit) = self.state().permit_of(instance) else {
                return Err(ServerError::NoInstance(instance.to_string()));
            };
            if let Some((decrement, drain_timeout_ms)) = permit {
                // A deposed or paused leader hands out nothing, even a permit it stored.
                if !self.may_act() {
                    return Err(ServerError::LeaseLost);
                }
                return Ok(drover_model::api::PermitReply {
                    permit: true,
                    drain_timeout_ms,
                    reason: Some(format!("{} holds a permit", instance)),
                    decrement: Some(decrement),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(drover_model::api::PermitReply::default());
                }
                _ = &mut woken => {}
            }
        }
    }

    /// Permit long-polls held open now.
    pub fn permit_polls(&self) -> usize {
        self.permit_polls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Record when the self-suspicion guard starts and stops holding a group.
    fn note_suspicion(&self, now_suspect: &[String]) {
        let events = self.state().note_suspicion(now_suspect);
        for e in &events {
            tracing::warn!(group = ?e.group, "{}", e.message);
        }
        self.record(events);
    }

    /// The store writer's counters (commits, records, group commit latency).
    pub fn writer_stats(&self) -> &crate::writer::WriterStats {
        self.writer.stats()
    }

    /// Controller passes ([`Engine::tick`]) so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Open balancer connections to an instance (the agent waits for 0 before stopping).
    pub fn connections(&self, instance: &str) -> Result<u64, ServerError> {
        let group = self
            .state()
            .instances
            .get(instance)
            .map(|i| i.record.group.clone())
            .ok_or_else(|| ServerError::NoInstance(instance.to_string()))?;
        if let Some(n) = self
            .provider(region_of(&group))
            .and_then(|p| p.draining(instance))
        {
            return Ok(n);
        }
        let open = self
            .balancers
            .open_connections(&group, instance)
            .map_err(|e| ServerError::Unavailable(e.0))?;
        // Not before every agent whose components use this service dropped it.
        let consumers = self.state().peer_consumers(&group);
        self.peers
            .dropped_by(instance, &consumers)
            .map_err(ServerError::Unavailable)?;
        Ok(open)
    }

    /// `GET /v1/agent/peers`: the peers of the services `instance`'s components use, once
    /// the version is past `version` (or after `wait`); `version` is what its agent applied.
    pub async fn wait_peers(
        &self,
        instance: &str,
        epoch: &str,
        version: u64,
        wait: Duration,
    ) -> Result<drover_model::api::PeersReply, ServerError> {
        let services = self
            .state()
            .used_services(instance)
            .ok_or_else(|| ServerError::NoInstance(instance.to_string()))?;
        // A version of another epoch (before a restart or failover) proves nothing: the
        // agent has applied none of this run's sets yet; answer at once.
        if epoch != self.peers.epoch() {
            self.peers.ack(instance, 0);
            return Ok(self.peers.reply(&services));
        }
        self.peers.ack(instance, version);
        self.peers.wait(version, wait).await;
        Ok(self.peers.reply(&services))
    }

    fn stop_grace(&self, group: &str) -> Duration {
        Duration::from_millis(self.state().stop_grace_ms(group))
    }

    async fn launch(&self, group: &str, generation: u64) -> Result<(), ServerError> {
        // The launch's own clock: a long pass must not stamp late launches with its start time.
        let now = now_ms();
        let Some(ticket) = self.state().begin_launch(group, generation) else {
            return Ok(());
        };
        let plan = match ticket.plan.clone() {
            Some(p) => p,
            None => match self.store.plan(group, generation)? {
                Some(p) => p,
                None => {
                    return Err(ServerError::Internal(format!(
                        "no plan generation {generation} of {group} in the store to launch"
                    )))
                }
            },
        };
        let Some(provider) = self.provider(&plan.region) else {
            return Err(ServerError::Internal(format!(
                "no provider for region {}",
                plan.region
            )));
        };
        // Persist the counter first: an id is never reused, even after a crash mid-launch.
        self.commit(vec![Write::Counter {
            name: "instance_seq".into(),
            value: ticket.seq,
        }])
        .await?;
        let launched = provider
            .launch(LaunchRequest {
                instance: ticket.instance.clone(),
                seq: ticket.seq,
                group: group.to_string(),
                plan: plan.clone(),
            })
            .await;
        let launched = match launched {
            Ok(l) => l,
            Err(e) => {
                self.record(vec![World::launch_refused(&ticket, &e.to_string())]);
                return Err(e.into());
            }
        };
        let launched = drover_control::world::Launched {
            // A provider that names its instances (EC2) gives the id the agent reports with.
            id: launched.instance.clone().unwrap_or(ticket.instance.clone()),
            addr: launched.addr,
            provider_id: launched.provider_id.clone(),
            own_token: launched.own_token,
        };
        let (rec, records) = World::launched(&ticket, &plan, &launched, now);
        if let Err(e) = self
            .commit(records.into_iter().map(write_of).collect())
            .await
        {
            // Unrecorded, nobody would adopt it and the next pass would launch another: it
            // goes now, through its provider, with its grace.
            let stopped = provider
                .terminate(&launched.id, self.stop_grace(group))
                .await
                .map_err(|t| t.to_string());
            let event = World::launch_unrecorded(
                &ticket,
                &launched,
                &e.to_string(),
                stopped.as_ref().map(|_| ()).map_err(String::as_str),
            );
            tracing::warn!(instance = %launched.id, "{}", event.message);
            self.record(vec![event]);
            return Err(e);
        }
        let alive = provider.alive(&launched.id);
        self.state().adopt(rec, alive, now);
        Ok(())
    }

    /// The controller loop: a tick every `period`, or sooner when woken.
    pub async fn run(
        self: Arc<Self>,
        period: Duration,
        mut exits: mpsc::UnboundedReceiver<Exit>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            while let Ok(exit) = exits.try_recv() {
                self.exited(exit);
            }
            let started = tokio::time::Instant::now();
            let gap = tick_gap(self.tick().await);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(period) => {}
                _ = self.wake.notified() => {}
                Some(exit) = exits.recv() => self.exited(exit),
            }
            // Woken early: wakes that come in a burst (a start or restart wave, thousands of
            // first heartbeats) make one pass, not one each that holds the state lock.
            tokio::time::sleep_until(started + gap).await;
        }
    }

    /// Stop every instance (if `stop_instances`).
    pub async fn shutdown(&self, grace: Duration, stop_instances: bool) {
        let providers = self.all_providers();
        for p in providers {
            if stop_instances {
                p.shutdown(grace).await;
            }
            // Its watchers and timers end with the term (an adopting server starts its own).
            p.close().await;
        }
    }
}

/// The store's write for a step's record.
pub(crate) fn write_of(r: Record) -> Write {
    match r {
        Record::Group(g) => Write::Group(g),
        Record::Instance(i) => Write::Instance(i),
        Record::RemoveInstance(id) => Write::RemoveInstance(id),
        Record::Counter { name, value } => Write::Counter { name, value },
        Record::Schedule(o) => Write::Schedule(o),
        Record::Event(e) => Write::Event(e),
    }
}

/// Whether a listener could be opened on `addr` now (`SO_REUSEADDR`, as the balancer binds).
fn probe_bind(addr: SocketAddr) -> std::io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1)
}

/// Shortest time from the start of one controller pass to the next (a pass woken early waits
/// for this): a health change is acted on within this, and a burst of them costs one pass.
const MIN_TICK_GAP: Duration = Duration::from_millis(50);

/// How many times a pass's planning (its reconciles and publishing, not the I/O it waits
/// for) the next woken pass waits from its start: planning woken back to back takes at most
/// a fifth of the time (a restart wave at 50,000 instances changes every group's views and
/// targets in every pass, and passes 20 times a second took the CPU the heartbeats needed).
/// A pass that plans in a few milliseconds is still followed within [`MIN_TICK_GAP`].
const PASS_SHARE: u32 = 5;

/// Longest gap between a pass's start and the next woken one, however long it planned.
const MAX_TICK_GAP: Duration = Duration::from_millis(500);

/// The time from one pass's start to the next woken pass: [`PASS_SHARE`] times its planning,
/// within [`MIN_TICK_GAP`] and [`MAX_TICK_GAP`].
fn tick_gap(planning: Duration) -> Duration {
    (planning * PASS_SHARE).clamp(MIN_TICK_GAP, MAX_TICK_GAP)
}

pub(crate) fn region_of(group: &str) -> &str {
    drover_model::GroupId::region_of(group)
}

fn group_facts(rev: Option<&Revision>, plan: &Plan) -> (String, Option<(SocketAddr, u16)>) {
    match rev {
        Some(r) => {
            drover_control::world::provider_and_ingress(&r.fleet, &plan.service, &plan.region)
        }
        None => (String::new(), None),
    }
}

/// The balancer's own active check of a service's targets: the ingress component's health
/// check when it is tcp or http on the ingress port, with its thresholds as rise and fall
/// (HAProxy's semantics). Otherwise (exec, another port, none) the balancer relies on the
/// agents' reports alone.
pub(crate) fn balancer_health(
    svc: &drover_model::fleet::Service,
) -> Option<drover_lb::HealthCheckConfig> {
    let (component, port, _) = drover_model::Fleet::ingress_target(svc)?;
    let h = svc.components.get(component)?.health.as_ref()?;
    if h.port.as_deref() != Some(port) {
        return None;
    }
    let kind = match h.kind {
        drover_model::fleet::HealthKind::Http => drover_lb::HealthCheckKind::Http {
            path: h.path.clone().unwrap_or_else(|| "/".into()),
        },
        drover_model::fleet::HealthKind::Tcp => drover_lb::HealthCheckKind::Tcp,
        drover_model::fleet::HealthKind::Exec => return None,
    };
    Some(drover_lb::HealthCheckConfig {
        kind,
        interval: h.interval.0,
        timeout: h.timeout.0.min(h.interval.0),
        rise: h.healthy_threshold.max(1),
        fall: h.unhealthy_threshold.max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::tests::Slow;
    use drover_control::world::RESTART_GRACE_MS;
    use drover_model::api::{AgentPhase, ComponentReport, ComponentState, Utilization};
    use drover_store::{EventFilter, RolloutRecord, SqliteStore};
    use drover_store::{GroupRecord, InstanceRecord, Lifecycle};
    use std::time::Instant;

    /// `web` in region `local` (provider `local`): capacity 1, 1, 2, one process `app`.
    fn local_web() -> drover_test_support::fleets::Web {
        drover_test_support::fleets::web("local", &["local"])
    }

    /// An engine over a store whose every commit takes `delay`, holding two instances
    /// (`i-000001`, `i-000002`, restored from the store as after a restart).
    fn engine(dir: &std::path::Path, delay: Duration) -> (Engine, Arc<Slow>) {
        engine_with(dir, delay, &local_web().toml())
    }

    /// [`engine`], with `toml` as the fleet file (a [`local_web`] with other details).
    fn engine_with(dir: &std::path::Path, delay: Duration, toml: &str) -> (Engine, Arc<Slow>) {
        let inner = SqliteStore::open(&dir.join("drover.db")).unwrap();
        let fleet = drover_model::parse_fleet(toml, "drover.toml").unwrap();
        let mut plan = drover_model::plan::plan_for(&fleet, "web", &fleet.services["web"], "local");
        plan.generation = 1;
        plan.revision = 1;
        inner
            .commit(
                vec![
                    Write::Revision {
                        file: "drover.toml".into(),
                        summary: "test".into(),
                        toml: toml.into(),
                        fleet: fleet.clone(),
                        last_applied: None,
                    },
                    Write::Group(GroupRecord {
                        group: "web/local".into(),
                        desired: 1,
                        desired_reason: "apply".into(),
                        generation: 1,
                        rollout: RolloutRecord::default(),
                    }),
                    Write::Plan(plan),
                    Write::Instance(InstanceRecord {
                        id: "i-000001".into(),
                        group: "web/local".into(),
                        generation: 1,
                        addr: "127.0.0.1".into(),
                        provider_id: "test".into(),
                        launched_at_ms: 1,
                        lifecycle: Lifecycle::Active,
                        permit_at_ms: None,
                        own_token: false,
                    }),
                    Write::Instance(InstanceRecord {
                        id: "i-000002".into(),
                        group: "web/local".into(),
                        generation: 1,
                        addr: "127.0.0.2".into(),
                        provider_id: "test".into(),
                        launched_at_ms: 2,
                        lifecycle: Lifecycle::Active,
                        permit_at_ms: None,
                        own_token: false,
                    }),
                ],
                1,
            )
            .unwrap();
        let slow = Arc::new(Slow {
            inner,
            delay,
            groups: std::sync::Mutex::new(Vec::new()),
            fail: Default::default(),
            refuse_instances: Default::default(),
        });
        let store: Box<dyn Store> = Box::new(SlowRef(slow.clone()));
        let e = Engine::new(
            store,
            Timing {
                leave_within_ms: 30_000,
                silent_after_ms: 5000,
            },
            crate::ProviderFactory::for_tests(dir),
        )
        .unwrap();
        (e, slow)
    }

    /// `Box<dyn Store>` over a shared [`Slow`].
    struct SlowRef(Arc<Slow>);

    impl Store for SlowRef {
        fn commit(
            &self,
            w: Vec<Write>,
            now: u64,
        ) -> Result<drover_store::Committed, drover_store::StoreError> {
            self.0.commit(w, now)
        }
        fn commit_many(
            &self,
            b: Vec<(Vec<Write>, u64)>,
        ) -> Vec<Result<drover_store::Committed, drover_store::StoreError>> {
            self.0.commit_many(b)
        }
        fn snapshot(&self) -> Result<drover_store::Snapshot, drover_store::StoreError> {
            self.0.snapshot()
        }
        fn revision(&self, n: u64) -> Result<Option<Revision>, drover_store::StoreError> {
            self.0.revision(n)
        }
        fn revisions(
            &self,
        ) -> Result<Vec<drover_model::api::RevisionSummary>, drover_store::StoreError> {
            self.0.revisions()
        }
        fn plan(&self, g: &str, n: u64) -> Result<Option<Plan>, drover_store::StoreError> {
            self.0.plan(g, n)
        }
        fn events(
            &self,
            f: &EventFilter,
        ) -> Result<Vec<drover_model::Event>, drover_store::StoreError> {
            self.0.events(f)
        }
        fn tokens(&self) -> Result<Vec<drover_store::TokenRecord>, drover_store::StoreError> {
            self.0.tokens()
        }
        fn keep_secret(
            &self,
            name: &str,
            candidate: &[u8],
        ) -> Result<Vec<u8>, drover_store::StoreError> {
            self.0.keep_secret(name, candidate)
        }
        fn secrets(&self) -> Result<Vec<(String, Vec<u8>)>, drover_store::StoreError> {
            self.0.secrets()
        }
    }

    fn beat(seq: u64, state: ComponentState) -> Heartbeat {
        Heartbeat {
            instance: "i-000001".into(),
            group: "web/local".into(),
            generation: 1,
            addr: "127.0.0.1".into(),
            phase: AgentPhase::Running,
            seq,
            components: vec![ComponentReport {
                name: "app".into(),
                version: "v1".into(),
                state,
                pid: Some(42),
                restarts: 0,
                last_exit: None,
                message: None,
                last_output: None,
            }],
            utilization: Utilization::default(),
            drained: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_heartbeat_does_not_wait_for_the_fsync_of_its_events() {
        let dir = tempfile::tempdir().unwrap();
        let (e, slow) = engine(dir.path(), Duration::from_millis(400));
        let e = Arc::new(e);
        // A durable commit (an API change) is being written: 400 ms.
        let busy = {
            let e = e.clone();
            tokio::spawn(async move {
                e.commit(vec![Write::Event(NewEvent::new(
                    EventKind::Server,
                    "a durable change",
                ))])
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        // Restored: the first heartbeat rebuilds health without an event; the next two are
        // health changes, each an event.
        let r = e.heartbeat(beat(1, ComponentState::Healthy)).unwrap();
        assert!(r.known);
        assert_eq!(r.leave_soon, Some(false));
        e.heartbeat(beat(2, ComponentState::Unhealthy)).unwrap();
        e.heartbeat(beat(3, ComponentState::Healthy)).unwrap();
        let took = t.elapsed();
        eprintln!("three heartbeats (two health changes) took {took:?} with a 400 ms fsync");
        assert!(took < Duration::from_millis(100), "{took:?}");
        // The durable commit waited for its fsync.
        busy.await.unwrap().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(300));
        // The events are written with a later group, in order.
        e.flush().await;
        let kinds: Vec<EventKind> = slow
            .inner
            .events(&EventFilter::default())
            .unwrap()
            .into_iter()
            .map(|ev| ev.kind)
            .collect();
        assert_eq!(
            kinds,
            [EventKind::Server, EventKind::Unhealthy, EventKind::Healthy]
        );
    }

    /// Instances restored after a restart whose agents are gone are replaced, but their loss
    /// is no evidence of a broken version: launches are not backed off. The same loss of an
    /// instance this server launched, never healthy, is.
    /// Issue 20, item 2: an apply whose image tag lives on a registry that never answers
    /// does not hold up the controller: the tag is looked up before the write lock, so a
    /// pass runs at once while the look-up waits; the apply then fails, saying why, and
    /// changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_registry_does_not_stall_the_controller() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), Duration::ZERO);
        let e = Arc::new(e);
        // A registry that takes connections and never answers.
        let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = hang.local_addr().unwrap().port();
        let toml = local_web()
            .runtime("docker")
            .app(&format!("image = \"127.0.0.1:{port}/app\""))
            .toml();
        let apply = {
            let e = e.clone();
            tokio::spawn(async move {
                e.apply(drover_model::api::ApplyRequest {
                    file: "drover.toml".into(),
                    toml,
                    dry_run: false,
                    force_file: false,
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!apply.is_finished());
        let t0 = Instant::now();
        tokio::time::timeout(Duration::from_secs(2), e.tick())
            .await
            .expect("a controller pass waited for the registry");
        assert!(t0.elapsed() < Duration::from_secs(2));
        let err = apply.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("nothing was changed"), "{err}");
        assert_eq!(e.current_revision().unwrap().number, 1);
        drop(hang);
    }

    /// [`local_web`] at `version`, with an artifact for `app`: `url` and `sha256`.
    fn with_artifact(url: &str, sha256: &str, version: &str) -> String {
        local_web()
            .version(version)
            .app(&format!(
                "artifact = {{ url = \"{url}\", sha256 = \"{sha256}\" }}"
            ))
            .toml()
    }

    /// Issue 20, item 2: an apply whose artifact host never answers holds up no controller
    /// pass: the artifact is fetched before the write lock, and the check under the lock
    /// answers from what that fetch found (a failure too), fetching nothing again. Passes
    /// run at once all along; the apply fails, saying why, and changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_artifact_host_does_not_stall_the_controller() {
        use drover_test_support::fake_http::{Answer, FakeHttp};
        let dir = tempfile::tempdir().unwrap();
        let (mut e, _) = engine(dir.path(), Duration::ZERO);
        let fetch = Duration::from_millis(1500);
        e.artifacts = crate::artifact::Checked::new(fetch, 1 << 20, crate::artifact::FAILURE_FRESH);
        let e = Arc::new(e);
        let host = FakeHttp::start(|_| Answer::Hold).await;
        let toml = with_artifact(
            &format!("{}/app-{{version}}.tar.gz", host.url()),
            &"0".repeat(64),
            "v2",
        );
        let t0 = Instant::now();
        let apply = {
            let e = e.clone();
            tokio::spawn(async move {
                e.apply(drover_model::api::ApplyRequest {
                    file: "drover.toml".into(),
                    toml,
                    dry_run: false,
                    force_file: false,
                })
                .await
            })
        };
        // Controller passes, one after another, until the apply is done: none waits.
        let mut passes = 0;
        while !apply.is_finished() {
            let t = Instant::now();
            tokio::time::timeout(Duration::from_secs(5), e.tick())
                .await
                .expect("a controller pass waited for the artifact host");
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "a pass took {:?}: it waited for the write lock an artifact fetch held",
                t.elapsed()
            );
            passes += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(passes > 10, "{passes}");
        let err = apply.await.unwrap().unwrap_err().to_string();
        assert!(
            err.contains("nothing was changed") && err.contains("no complete answer within"),
            "{err}"
        );
        assert_eq!(
            host.count("GET", "/app-v2.tar.gz"),
            1,
            "the check under the lock fetched the artifact again"
        );
        assert!(t0.elapsed() < fetch * 2, "{:?}", t0.elapsed());
        assert_eq!(e.current_revision().unwrap().number, 1);
    }

    /// Issue 20, item 2: an artifact a stored plan already names needs no fetch, after a
    /// restart too (nothing fetched is remembered then): a later wave (another group runs
    /// it) and a rollback (the group's earlier plan had it) pass while its host hangs,
    /// holding the write lock for no fetch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_later_wave_or_a_rollback_after_a_restart_fetches_no_artifact() {
        use drover_test_support::fake_http::{Answer, FakeHttp};
        use sha2::Digest as _;
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let (mut e, slow) = engine(dir.path(), Duration::ZERO);
        let short = || {
            crate::artifact::Checked::new(
                Duration::from_millis(1500),
                1 << 20,
                crate::artifact::FAILURE_FRESH,
            )
        };
        e.artifacts = short();
        let hang = Arc::new(AtomicBool::new(false));
        let host = {
            let hang = hang.clone();
            FakeHttp::start(move |_| {
                if hang.load(Ordering::SeqCst) {
                    Answer::Hold
                } else {
                    Answer::Json(200, "the archive".into())
                }
            })
            .await
        };
        let sha = hex::encode(sha2::Sha256::digest(b"the archive"));
        let url = format!("{}/app-{{version}}.tar.gz", host.url());
        let apply = |version: &str| drover_model::api::ApplyRequest {
            file: "drover.toml".into(),
            toml: with_artifact(&url, &sha, version),
            dry_run: false,
            force_file: false,
        };
        e.apply(apply("v2")).await.unwrap();
        e.apply(apply("v3")).await.unwrap();
        assert_eq!(host.count("GET", "/app-v2.tar.gz"), 1);
        assert_eq!(host.count("GET", "/app-v3.tar.gz"), 1);
        assert_eq!(e.state().groups["web/local"].record.generation, 3);
        // A restart: a new engine on the same store remembers no fetch (its tokens are the
        // same: the factory's).
        let factory = e.factory;
        let mut e = Engine::new(
            Box::new(SlowRef(slow.clone())),
            Timing {
                leave_within_ms: 30_000,
                silent_after_ms: 5000,
            },
            factory,
        )
        .unwrap();
        e.artifacts = short();
        hang.store(true, Ordering::SeqCst);
        // A later wave: another group's new plan has the artifact a group runs.
        let groups = e.state().groups.clone();
        let mut wave = groups["web/local"].plan.clone();
        wave.region = "far".into();
        wave.generation = 1;
        let t = Instant::now();
        crate::artifact::check_new_artifacts(&e, &groups, &wave)
            .await
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(host.count("GET", "/app-v3.tar.gz"), 1, "fetched again");
        // The same file again: what a group runs is not fetched before the lock either.
        let t = Instant::now();
        assert!(!e.apply(apply("v3")).await.unwrap().applied);
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(host.count("GET", "/app-v3.tar.gz"), 1, "fetched again");
        // A rollback: the group's earlier plan had it.
        let t = Instant::now();
        let back = e
            .rollback(drover_model::api::RollbackRequest {
                service: "web".into(),
                dry_run: false,
            })
            .await
            .unwrap();
        assert!(back.applied);
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(host.count("GET", "/app-v2.tar.gz"), 1, "fetched again");
        let g = e.state().groups["web/local"].clone();
        assert_eq!(g.plan.components[0].version, "v2");
        assert_eq!(g.record.generation, 4);
        // A version no plan named is still fetched, and its hanging host refuses it.
        let err = e.apply(apply("v4")).await.unwrap_err().to_string();
        assert!(err.contains("no complete answer within"), "{err}");
    }

    /// Issue 20, item 10: a change the store refused is not in memory either. `drover scale`
    /// while the store is down fails, and the controller keeps acting on the stored count;
    /// once the store is back the same change is taken, in both.
    #[tokio::test]
    async fn a_change_the_store_refused_leaves_memory_as_stored() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let (e, slow) = engine(dir.path(), Duration::ZERO);
        let scale = || drover_model::api::ScaleRequest {
            service: "web".into(),
            region: None,
            desired: 2,
        };
        slow.fail.store(true, Ordering::SeqCst);
        assert!(e.scale(scale()).await.is_err());
        let desired = |e: &Engine| e.state().groups["web/local"].record.desired;
        assert_eq!(desired(&e), 1, "memory took a change the store refused");
        assert!(
            !e.state().autoscale.contains_key("web/local"),
            "the autoscaler heard of a manual count that was not stored"
        );
        // A rollout record refused by the store: memory keeps the stored one.
        let before = e.state().groups["web/local"].record.clone();
        assert!(e
            .rollout_failed("web/local", 1, "test", None)
            .await
            .is_err());
        assert_eq!(e.state().groups["web/local"].record, before);

        slow.fail.store(false, Ordering::SeqCst);
        e.scale(scale()).await.unwrap();
        assert_eq!(desired(&e), 2);
        let stored = slow.inner.snapshot().unwrap();
        assert_eq!(stored.groups[0].desired, 2);
    }

    /// Issue 20, item 10: a launch whose record the store refuses is not left running
    /// unadopted until a restart (while the next pass launches another): its provider
    /// terminates it at once, and an event says why.
    #[tokio::test]
    async fn a_launch_the_store_refused_to_record_is_terminated() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let toml = drover_test_support::fleets::web("sim", &["local"]).toml();
        let (e, slow) = engine_with(dir.path(), Duration::ZERO, &toml);
        e.state().instance_seq = 10;
        slow.refuse_instances.store(true, Ordering::SeqCst);
        let err = e.launch("web/local", 1).await.unwrap_err().to_string();
        assert!(err.contains("refused"), "{err}");
        let provider = e.provider("local").unwrap();
        assert!(
            !provider.alive("i-000011"),
            "a launch nobody recorded still runs"
        );
        assert!(!e.state().instances.contains_key("i-000011"));
        e.flush().await;
        let events = slow.inner.events(&EventFilter::default()).unwrap();
        let said = events.iter().find(|ev| {
            ev.kind == EventKind::Terminating && ev.instance.as_deref() == Some("i-000011")
        });
        let said = said.map(|ev| ev.message.as_str()).unwrap_or_default();
        assert!(
            said.contains("store refused its record") && said.contains("terminating it"),
            "{events:?}"
        );
        // Once the store takes records again, a launch is recorded and adopted.
        slow.refuse_instances.store(false, Ordering::SeqCst);
        e.launch("web/local", 1).await.unwrap();
        assert!(provider.alive("i-000012"));
        assert!(e.state().instances.contains_key("i-000012"));
    }

    #[tokio::test]
    async fn losing_restored_instances_does_not_back_off_launches() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), Duration::ZERO);
        let e = Arc::new(e);
        e.api_ready();
        let forget = |id: &str| Action::Forget {
            instance: id.into(),
            reason: "its agent is no longer running".into(),
        };
        assert!(e.state().instances["i-000001"].soft.restored);
        e.act(forget("i-000001"), now_ms()).await.unwrap();
        assert!(!e.state().instances.contains_key("i-000001"));
        let backoff = e.state().launch_backoff.clone();
        assert!(backoff.is_empty(), "{backoff:?}");
        // Not restored (launched by this server), never healthy: a boot failure.
        e.state()
            .instances
            .get_mut("i-000002")
            .unwrap()
            .soft
            .restored = false;
        e.act(forget("i-000002"), now_ms()).await.unwrap();
        assert_eq!(e.state().launch_backoff["web/local"].failures, 1);
    }

    /// Long messages and too many custom metrics are cut, not refused: the instance is
    /// heard, with its texts within the limits; what identifies it is still checked.
    #[tokio::test]
    async fn an_oversized_heartbeat_is_clamped_not_refused() {
        use drover_model::api::limits;
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), Duration::ZERO);
        let mut hb = beat(1, ComponentState::Unhealthy);
        hb.components[0].message = Some("m".repeat(1 << 20));
        hb.components[0].last_output = Some("o".repeat(limits::TEXT + 1));
        for i in 0..200 {
            hb.utilization.custom.insert(format!("m{i:03}"), 1.0);
        }
        crate::api::admit_heartbeat(&e, &mut hb).unwrap();
        let c = &hb.components[0];
        assert!(c.message.as_ref().unwrap().len() <= limits::TEXT);
        assert!(c.last_output.as_ref().unwrap().len() <= limits::TEXT);
        assert_eq!(hb.utilization.custom.len(), limits::CUSTOM_METRICS);
        assert!(e.heartbeat(hb).unwrap().known);
        let stored = e.state().instances["i-000001"].soft.components[0]
            .message
            .clone();
        assert!(stored.unwrap().len() <= limits::TEXT);
        // An identity out of bounds is still refused.
        let mut hb = beat(2, ComponentState::Healthy);
        hb.components[0].version = "v".repeat(limits::VERSION + 1);
        let err = crate::api::admit_heartbeat(&e, &mut hb).unwrap_err();
        assert!(matches!(err, ServerError::BadRequest(_)), "{err}");
    }

    /// An agent that flaps (healthy, unhealthy, restarts up and down) on every heartbeat
    /// causes at most the per-minute budget of events; the rest is counted and said once.
    #[tokio::test]
    async fn a_flapping_instance_cannot_flood_the_store_with_events() {
        use crate::state::EVENTS_PER_INSTANCE_PER_MINUTE;
        let dir = tempfile::tempdir().unwrap();
        let (e, slow) = engine(dir.path(), Duration::ZERO);
        for seq in 1..=400u64 {
            let state = if seq % 2 == 0 {
                ComponentState::Healthy
            } else {
                ComponentState::Unhealthy
            };
            let mut hb = beat(seq, state);
            hb.components[0].restarts = (seq % 2) as u32;
            hb.components[0].message = Some("m".repeat(100_000));
            e.heartbeat(hb).unwrap();
        }
        e.flush().await;
        let mine = |ev: &drover_model::Event| ev.instance.as_deref() == Some("i-000001");
        let stored: Vec<_> = slow
            .inner
            .events(&EventFilter::default())
            .unwrap()
            .into_iter()
            .filter(mine)
            .collect();
        assert_eq!(
            stored.len() as u32,
            EVENTS_PER_INSTANCE_PER_MINUTE,
            "{}",
            stored.len()
        );
        assert!(stored
            .iter()
            .all(|ev| ev.message.len() <= drover_model::event::EVENT_TEXT_MAX));
        // A minute later, the next event says how many were left out.
        let mut st = e.state();
        let budget = &mut st.instances.get_mut("i-000001").unwrap().soft.budget;
        let later = budget.admit(
            vec![NewEvent::new(EventKind::Healthy, "x")],
            now_ms() + 61_000,
            "web/local",
            "i-000001",
        );
        assert_eq!(later.len(), 2);
        assert!(
            later[0].message.contains("were not recorded"),
            "{}",
            later[0].message
        );
    }

    /// Issue 20, item 11: two revokes at once of the last two admin tokens (each commit slow)
    /// leave one: the second sees the first done and is refused.
    #[tokio::test]
    async fn concurrent_revokes_never_leave_no_admin_token() {
        use drover_model::token::TokenScope;
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), Duration::from_millis(150));
        let a = e
            .auth()
            .create(&e, TokenScope::Admin, None, None)
            .await
            .unwrap();
        let b = e
            .auth()
            .create(&e, TokenScope::Admin, None, None)
            .await
            .unwrap();
        let (ra, rb) = tokio::join!(
            e.auth().revoke(&e, &a.info.id),
            e.auth().revoke(&e, &b.info.id)
        );
        assert!(ra.is_ok() != rb.is_ok(), "{ra:?} {rb:?}");
        let left = e
            .auth()
            .list()
            .into_iter()
            .filter(|t| t.scope == TokenScope::Admin && t.revoked_at_ms.is_none())
            .count();
        assert_eq!(left, 1);
    }

    /// Issue 20, item 10: the first admin token's file is written before its hash is
    /// committed; a crash between the commit and the file's rename is finished on the next
    /// start (never a stored admin token that nobody has).
    #[tokio::test]
    async fn the_first_admin_token_is_never_stored_without_its_file() {
        use drover_model::token::TokenScope;
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), Duration::ZERO);
        let data = dir.path();
        let path = e.auth().ensure_admin(&e, data).await.unwrap().unwrap();
        assert!(!data.join("admin.token.new").exists());
        let token = std::fs::read_to_string(&path).unwrap();
        let v = axum::http::HeaderValue::from_str(&format!("Bearer {}", token.trim())).unwrap();
        assert_eq!(
            e.auth().authenticate(Some(&v)).unwrap().scope,
            TokenScope::Admin
        );
        // A crash after the commit, before the rename: the pending file is there.
        std::fs::remove_file(&path).unwrap();
        let secret = format!("drover_admin_{}", "a".repeat(64));
        std::fs::write(data.join("admin.token.new"), format!("{secret}\n")).unwrap();
        e.auth()
            .create_with(
                &e,
                TokenScope::Admin,
                None,
                None,
                crate::auth::Secret::Given(secret.clone()),
            )
            .await
            .unwrap();
        let again = e.auth().ensure_admin(&e, data).await.unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(again).unwrap().trim(), secret);
        assert!(!data.join("admin.token.new").exists());
        // Nothing pending and an admin token stored: nothing to write.
        assert_eq!(e.auth().ensure_admin(&e, data).await.unwrap(), None);
    }

    #[tokio::test]
    async fn silence_after_a_restart_counts_from_when_the_api_answers() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), Duration::ZERO);
        let loaded = e.state().instances["i-000001"].soft.clone();
        assert!(loaded.restored);
        // A slow start (say, a large store read): the API answers later.
        tokio::time::sleep(Duration::from_millis(300)).await;
        e.api_ready();
        let ready = e.state().instances["i-000001"].soft.clone();
        assert!(ready.watched_since_ms >= loaded.watched_since_ms + 300);
        assert!(ready.last_seen_ms >= loaded.last_seen_ms + 300);
        assert_eq!(
            ready.last_seen_ms,
            ready.watched_since_ms + RESTART_GRACE_MS
        );
    }

    #[tokio::test]
    async fn stale_and_permitted_instances_are_told_to_leave_soon() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), Duration::ZERO);
        let hint = |seq| e.heartbeat(beat(seq, ComponentState::Healthy)).unwrap();
        assert_eq!(hint(1).leave_soon, Some(false));
        // A new generation: the instance is stale.
        e.state()
            .groups
            .get_mut("web/local")
            .unwrap()
            .record
            .generation = 2;
        assert_eq!(hint(2).leave_soon, Some(true));
        // Current again (a revert), then holding a permit.
        e.state()
            .groups
            .get_mut("web/local")
            .unwrap()
            .record
            .generation = 1;
        assert_eq!(hint(3).leave_soon, Some(false));
        e.state()
            .instances
            .get_mut("i-000001")
            .unwrap()
            .record
            .lifecycle = Lifecycle::Draining;
        assert_eq!(hint(4).leave_soon, Some(true));
        // Unknown instances are not asked to poll.
        let mut other = beat(1, ComponentState::Healthy);
        other.instance = "i-000099".into();
        let r = e.heartbeat(other).unwrap();
        assert_eq!((r.known, r.leave_soon), (false, Some(false)));
    }

    /// A leader whose lease ran out answers no permit (even one it stored) and makes no
    /// controller pass: only while its authority holds.
    #[tokio::test]
    async fn an_engine_whose_lease_ran_out_hands_out_no_permit_and_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), Duration::ZERO);
        let e = Arc::new(e);
        e.state()
            .instances
            .get_mut("i-000001")
            .unwrap()
            .record
            .lifecycle = Lifecycle::Draining;
        let authority = Arc::new(crate::ha::Authority::new(
            std::time::Instant::now() + Duration::from_secs(60),
        ));
        e.set_authority(authority.clone());
        assert!(e.may_act());
        let r = e.wait_permit("i-000001", Duration::ZERO).await.unwrap();
        assert!(r.permit, "while the lease holds");

        authority.revoke();
        assert!(!e.may_act());
        let err = e.wait_permit("i-000001", Duration::ZERO).await.unwrap_err();
        assert!(matches!(err, ServerError::LeaseLost), "{err}");
        assert!(err.to_string().contains("no longer leads"), "{err}");
        // No controller pass: a group short of instances gets none launched.
        e.state()
            .groups
            .get_mut("web/local")
            .unwrap()
            .record
            .desired = 4;
        let (passes, seq) = (e.passes(), e.state().instance_seq);
        e.tick().await;
        assert_eq!(e.passes(), passes, "no pass without authority");
        assert_eq!(e.state().instance_seq, seq, "no launch without authority");
        assert_eq!(e.state().instances.len(), 2);
    }

    #[tokio::test]
    async fn a_permit_says_whether_the_leaver_keeps_its_groups_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), Duration::ZERO);
        // Two instances of generation 1, both running; i-000001 holds a permit.
        {
            let mut st = e.state();
            st.instances.for_each_mut(|i| i.alive = true);
            st.instances.get_mut("i-000001").unwrap().record.lifecycle = Lifecycle::Draining;
            let g = st.groups.get_mut("web/local").unwrap();
            g.record.desired = 2;
            g.record.generation = 2;
        }
        let set = |provider: &str, max_surge: u32, desired: u32| {
            let mut st = e.state();
            let g = st.groups.get_mut("web/local").unwrap();
            g.provider = provider.into();
            g.record.desired = desired;
            let rev = st.revision.as_mut().unwrap();
            rev.fleet.services.get_mut("web").unwrap().rollout.max_surge = max_surge;
        };
        let decrement = || async {
            let r = e.wait_permit("i-000001", Duration::ZERO).await.unwrap();
            assert!(r.permit);
            r.decrement
        };
        // Replace mode: aws without surge, a stale leaver, the group within desired.
        set("aws", 0, 2);
        assert_eq!(decrement().await, Some(false));
        assert!(e.state().specs()[0].provider_replaces_leavers);
        // With surge, on another provider, or a surplus: the capacity goes with it.
        set("aws", 1, 2);
        assert_eq!(decrement().await, Some(true));
        assert!(!e.state().specs()[0].provider_replaces_leavers);
        set("local", 0, 2);
        assert_eq!(decrement().await, Some(true));
        set("aws", 0, 1);
        assert_eq!(decrement().await, Some(true));
        // Not stale (current generation, e.g. a scale-in leaver).
        set("aws", 0, 2);
        e.state()
            .groups
            .get_mut("web/local")
            .unwrap()
            .record
            .generation = 1;
        assert_eq!(decrement().await, Some(true));
        // Being terminated by the server.
        e.state()
            .groups
            .get_mut("web/local")
            .unwrap()
            .record
            .generation = 2;
        e.state()
            .instances
            .get_mut("i-000001")
            .unwrap()
            .record
            .lifecycle = Lifecycle::Terminating;
        assert_eq!(decrement().await, Some(true));
        // No permit: nothing said.
        let r = e.wait_permit("i-000002", Duration::ZERO).await.unwrap();
        assert_eq!((r.permit, r.decrement), (false, None));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_permit_wakes_its_own_long_poll_only() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), Duration::ZERO);
        let e = Arc::new(e);
        let poll = |id: &'static str, wait: Duration| {
            let e = e.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                (e.wait_permit(id, wait).await.unwrap(), t.elapsed())
            })
        };
        let one = poll("i-000001", Duration::from_secs(5));
        let two = poll("i-000002", Duration::from_millis(700));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(e.permit_polls(), 2);
        // Granted as the controller does (`drover_control::effects`): lifecycle stored, out
        // of rotation, then the instance's own wake.
        e.state().instances.get_mut("i-000001").unwrap().alive = true;
        let t = Instant::now();
        let at = now_ms();
        e.act(
            Action::Permit {
                instance: "i-000001".into(),
                reason: "test".into(),
            },
            at,
        )
        .await
        .unwrap();
        let rec = e.state().instances["i-000001"].record.clone();
        assert_eq!(
            (rec.lifecycle, rec.permit_at_ms),
            (Lifecycle::Draining, Some(at))
        );
        let (reply, _) = one.await.unwrap();
        let took = t.elapsed();
        assert!(reply.permit, "{reply:?}");
        assert!(took < Duration::from_millis(100), "{took:?}");
        // The other long-poll was not answered: it runs to its own deadline.
        assert_eq!(e.permit_polls(), 1);
        let (reply, held) = two.await.unwrap();
        assert!(!reply.permit);
        assert!(held >= Duration::from_millis(700), "{held:?}");
        assert_eq!(e.permit_polls(), 0);
        // Unknown instance: 404 at once.
        assert!(matches!(
            e.wait_permit("i-000099", Duration::from_secs(5)).await,
            Err(ServerError::NoInstance(_))
        ));
    }

    #[test]
    fn a_long_pass_waits_longer_before_the_next_woken_one() {
        assert_eq!(tick_gap(Duration::from_millis(2)), MIN_TICK_GAP);
        assert_eq!(
            tick_gap(Duration::from_millis(30)),
            Duration::from_millis(150)
        );
        assert_eq!(tick_gap(Duration::from_secs(4)), MAX_TICK_GAP);
    }

    #[tokio::test]
    async fn a_burst_of_wakes_makes_few_controller_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), Duration::ZERO);
        let e = Arc::new(e);
        let stop = tokio_util::sync::CancellationToken::new();
        let (_exits_tx, exits) = mpsc::unbounded_channel();
        let run = tokio::spawn(e.clone().run(Duration::from_secs(60), exits, stop.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = e.passes();
        let t = Instant::now();
        // 500 health changes a millisecond or so apart (a restart wave), each waking the
        // controller.
        for _ in 0..500 {
            e.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let spent = t.elapsed();
        let passes = e.passes() - before;
        eprintln!("500 wakes over {spent:?}: {passes} passes");
        // At most one pass per MIN_TICK_GAP (50 ms), and at least one.
        let most = (spent.as_millis() / MIN_TICK_GAP.as_millis()) as u64 + 2;
        assert!(
            (1..=most).contains(&passes),
            "{passes} passes, at most {most}"
        );
        stop.cancel();
        run.await.unwrap();
    }

    /// A wave release stores no revision: the plans it makes are the current revision's. An
    /// automatic revert of a region the release reached, after a later change stored the
    /// next revision, rebuilds that region's good generation from the revision it names:
    /// the good versions come back, and the regions held by hand do not get the broken one
    /// (the revert read the broken revision's text, reverted nothing and let the held
    /// groups go on to it).
    #[tokio::test]
    async fn an_automatic_revert_after_a_wave_release_restores_the_good_versions() {
        let waves = drover_test_support::fleets::web("sim", &["a", "b", "c"])
            .service(r#"rollout = { waves = [["a"], ["b", "c"]], wave_bake = "1s" }"#)
            .toml();
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("drover.db")).unwrap();
        let e = Arc::new(
            Engine::new(
                Box::new(store),
                Timing {
                    leave_within_ms: 30_000,
                    silent_after_ms: 5000,
                },
                crate::ProviderFactory::for_tests(dir.path()),
            )
            .unwrap(),
        );
        let done = |group: &str, generation: u64| Action::RolloutDone {
            group: group.into(),
            generation,
        };
        let deploy = |version: &str, regions: &[&str]| drover_model::api::DeployRequest {
            service: "web".into(),
            component: "app".into(),
            version: version.into(),
            dry_run: false,
            regions: regions.iter().map(|r| r.to_string()).collect(),
        };
        let runs = |e: &Engine, g: &str| {
            let st = e.state();
            let g = &st.groups[g];
            (g.record.generation, g.plan.versions())
        };
        e.apply(drover_model::api::ApplyRequest {
            file: "drover.toml".into(),
            toml: waves,
            dry_run: false,
            force_file: false,
        })
        .await
        .unwrap();
        for g in ["web/a", "web/b", "web/c"] {
            e.act(done(g, 1), now_ms()).await.unwrap();
        }
        // v2 wave by wave: a now (revision 2), then b and c released by the tick.
        assert_eq!(e.deploy(deploy("v2", &[])).await.unwrap().revision, 2);
        e.act(done("web/a", 2), now_ms()).await.unwrap();
        e.release_waves(now_ms() + 2_000).await.unwrap();
        assert_eq!(e.current_revision().unwrap().number, 2);
        for g in ["web/b", "web/c"] {
            assert_eq!(runs(&e, g), (2, "app=v2".to_string()), "{g}");
            assert_eq!(
                e.state().groups[g].plan.revision,
                2,
                "{g}: released in revision 2"
            );
            e.act(done(g, 2), now_ms()).await.unwrap();
        }
        // v3 to c by hand (revision 3): a and b held on v2. It fails; c goes back to v2.
        assert_eq!(e.deploy(deploy("v3", &["c"])).await.unwrap().revision, 3);
        assert_eq!(runs(&e, "web/c"), (3, "app=v3".to_string()));
        e.rollout_failed("web/c", 3, "test", None).await.unwrap();
        let rev = e.current_revision().unwrap();
        assert_eq!(rev.number, 4, "the revert is a revision of its own");
        assert_eq!(rev.fleet.services["web"].components["app"].version, "v2");
        assert_eq!(runs(&e, "web/c"), (4, "app=v2".to_string()));
        assert_eq!(e.state().groups["web/c"].record.rollout.reverted_from, 3);
        for g in ["web/a", "web/b"] {
            assert_eq!(runs(&e, g), (2, "app=v2".to_string()), "{g}: never on v3");
            let r = &e.state().groups[g].record.rollout;
            assert!(!r.held && !r.wave_pending, "{g}: {r:?}");
        }
    }
}
