//! The operator API behind the `vmha` CLI. Handlers validate, read or change desired state,
//! and return; anything that touches a host goes through the controller as an operation.
//! On the leader, reads of the cluster's state answer from memory; requests that change
//! desired state, start an operation or read the event log are refused with `Unavailable`
//! while PostgreSQL is away. A standby answers reads from what the database last recorded
//! (saying that no controller leads) and refuses every change, naming the leader.

use std::pin::Pin;
use std::sync::Arc;

use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use vmha_engine::event::{Event, EventKind};

use vmha_engine::operation::{OpId, Overrides};
use vmha_engine::step::{Input, Reply, Request as Change, Unconfirmed};
use vmha_engine::{FencingMode, HostLiveness, drain, drain_record};
use vmha_proto::v1::operator_service_server::OperatorService;
use vmha_proto::v1::*;
use vmha_tls::Level;

use crate::access::{Access, Operator};
use crate::controller::Controller;
use crate::errors::{Error, refusal, unexpected};
use crate::journal::Write;
use crate::node::Node;
use crate::rate_limit::{PerCaller, operator_requests};
use crate::{validate, views};

/// The operator API of a controller, and how it knows who calls (see `access`).
pub struct OperatorApi(Arc<Node>, Access, PerCaller);

impl OperatorApi {
    pub fn new(node: Arc<Node>, access: Access) -> OperatorApi {
        OperatorApi(node, access, operator_requests())
    }

    /// Who calls, if they may do `what` (at `needed`) and have not sent too much.
    fn caller<T>(&self, req: &Request<T>, needed: Level, what: &str) -> Result<Operator, Error> {
        let who = self.1.operator(req, needed, what)?;
        self.2.admit(&who.name)?;
        Ok(who)
    }
}

/// An operation just begun, as the API shows it: in flight, or already ended.
fn shown_operation(c: &Controller, id: OpId) -> Result<Operation, Error> {
    c.watch_operation(id).map(|w| w.borrow().clone()).or_else(|| c.ended_operation(id)).ok_or_else(|| {
        Error::NotFound(format!("operation {id} ended before it could be shown; see `vmha events`"))
    })
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "aborted" | "cancelled")
}

impl OperatorApi {
    /// The leader's controller; a standby refuses, naming the leader.
    fn c(&self) -> Result<&Arc<Controller>, Error> {
        self.0.leader()
    }

    /// What a standby can say: who leads (or why none does), and the controllers it knows.
    fn standby_status(&self, caller: String) -> StatusResponse {
        let mut warnings = vec![self.0.leader().err().map(|e| e.to_string()).unwrap_or_default()];
        self.warn_if_insecure(&mut warnings);
        StatusResponse {
            epoch: self.0.who_leads().epoch,
            standby: true,
            warnings,
            database: self.0.database_trouble().unwrap_or_default(),
            insecure_dev: self.1 == Access::InsecureDev,
            caller,
            controllers: self.0.controllers(),
            ..Default::default()
        }
    }

    fn warn_if_insecure(&self, warnings: &mut Vec<String>) {
        if self.1 == Access::InsecureDev {
            warnings.insert(
                0,
                "INSECURE: this controller runs with --insecure-dev: anyone who reaches it can speak for any \
                 host or operator, and start a second copy of any VM. Never run a cluster this way."
                    .into(),
            );
        }
    }

    /// Hands an operator's change to the engine; its refusal becomes the answer.
    async fn change(&self, who: &Operator, request: Change) -> Result<Reply, Error> {
        let c = self.c()?;
        match c.step(Input::Operator { actor: who.name.clone(), request }).await? {
            Reply::Refused(r) => Err(Error::Refused(r)),
            reply => Ok(reply),
        }
    }

    async fn host_view(&self, host: &str) -> Result<Host, Error> {
        let c = self.c()?;
        let now = c.now();
        let named = host.to_string();
        let mut view = c.read(move |s| views::host(s, &named, now)).await?;
        view.cert_not_after = c.host_cert_expiry(host).unwrap_or_default();
        Ok(view)
    }

    /// A VM as `vmha vm show` shows it, after a change.
    async fn vm_view(&self, uuid: &str) -> Result<Vm, Error> {
        let c = self.c()?;
        let now = c.now();
        let uuid = uuid.to_string();
        c.read(move |s| s.vms.get(&uuid).map(|v| views::vm(s, v, now)))
            .await?
            .ok_or_else(|| Error::NotFound("the VM is gone (no host reports it any more)".into()))
    }
}

impl OperatorApi {
    /// A protection covers a VM only once its host's agent knows of it (its self-fence destroys
    /// only what it knows is protected): the answer to `vmha protect` waits until the host has
    /// acknowledged an answer listing it, at most a few heartbeats, and until that
    /// acknowledgement is on record. It is queued for the database in the step that took it;
    /// once committed, a leader that takes over restores it (SAFETY.md 8d), so every protection
    /// `vmha protect` confirmed survives the leader dying together with the VM's host.
    async fn await_protection_known(&self, who: &Operator, vm: &vmha_engine::VmView) {
        let Ok(c) = self.c() else { return };
        let Some(host) = vm.host.clone() else { return };
        let interval = Duration::from_millis(c.timings.heartbeat_interval_ms);
        let deadline = tokio::time::Instant::now() + interval * 3 + Duration::from_secs(1);
        let known = || {
            let (host, uuid) = (host.clone(), vm.uuid.clone());
            // Unprotected meanwhile: nothing to wait for.
            c.read(move |s| {
                s.vms.get(&uuid).is_none_or(|v| {
                    !v.protected || v.fenced_by(s.hosts.get(&host).and_then(|h| h.roster_acked))
                })
            })
        };
        let unconfirmed = |why: Unconfirmed| {
            let (actor, vm, host) = (who.name.clone(), vm.name.clone(), host.clone());
            c.step(Input::ProtectionUnconfirmed { actor, vm, host, why })
        };
        // A controller going down answers no more: stop waiting.
        while !known().await.unwrap_or(true) {
            if tokio::time::Instant::now() >= deadline {
                let _ = unconfirmed(Unconfirmed::NotAcknowledged).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left =
            deadline.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_secs(1));
        if !c.caught_up(left).await {
            let trouble = c.database_trouble().unwrap_or_else(|| format!("no commit in {left:?}"));
            let _ = unconfirmed(Unconfirmed::NotOnRecord(trouble)).await;
        }
    }
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let who = self.caller(&req, Level::Viewer, "reading the status")?;
        let caller = format!("{} ({})", who.name, who.level);
        let Ok(c) = self.c() else { return Ok(Response::new(self.standby_status(caller))) };
        let hosts = self.0.hosts().await?;
        let now = c.now();
        let (vms_total, vms_running, vms_protected, protected_down, quorum, warnings) = c
            .view(move |s| {
                let running = |v: &&vmha_engine::VmView| v.state == vmha_engine::RunState::Running;
                // Only the few that are down get a full view.
                let down: Vec<Vm> = s
                    .vms
                    .values()
                    .filter(|v| v.protected && vmha_engine::recovery::explain(s, &v.uuid, now).is_some())
                    .map(|v| views::vm(s, v, now))
                    .filter(|v| !v.why_not_running.is_empty())
                    .collect();
                (
                    s.vms.len() as u32,
                    s.vms.values().filter(running).count() as u32,
                    s.vms.values().filter(|v| v.protected).count() as u32,
                    down,
                    vmha_engine::lease::has_quorum(s, now),
                    views::warnings(s, now),
                )
            })
            .await?;
        let mut warnings = warnings;
        warnings.extend(views::certificate_warnings(&c.host_cert_expiries(), chrono::Utc::now().timestamp()));
        self.warn_if_insecure(&mut warnings);
        Ok(Response::new(StatusResponse {
            epoch: c.epoch,
            hosts_total: hosts.len() as u32,
            hosts_online: hosts.iter().filter(|h| h.state == HostLiveness::Online.as_str()).count() as u32,
            vms_total,
            vms_running,
            vms_protected,
            protected_not_running: protected_down.len() as u32,
            hosts,
            active_operations: c.active_operations(),
            quorum,
            protected_down,
            leader_clock_ms: now.0,
            warnings,
            database: c.database_trouble().unwrap_or_default(),
            insecure_dev: self.1 == Access::InsecureDev,
            caller,
            controllers: self.0.controllers(),
            standby: false,
        }))
    }

    async fn capacity(&self, req: Request<CapacityRequest>) -> Result<Response<CapacityReply>, Status> {
        self.caller(&req, Level::Viewer, "asking for the capacity")?;
        let c = self.c()?;
        let now = c.now();
        let (reserve_hosts, what_ifs) =
            c.view(move |s| (s.policy.reserve_hosts, vmha_engine::admission::capacity(s, now))).await?;
        Ok(Response::new(CapacityReply {
            reserve_hosts: reserve_hosts as u32,
            what_ifs: what_ifs.iter().map(views::what_if).collect(),
        }))
    }

    async fn leader(&self, req: Request<LeaderRequest>) -> Result<Response<LeaderReply>, Status> {
        self.caller(&req, Level::Viewer, "asking who leads")?;
        Ok(Response::new(self.0.who_leads()))
    }

    async fn list_hosts(
        &self,
        req: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        self.caller(&req, Level::Viewer, "listing hosts")?;
        Ok(Response::new(ListHostsResponse { hosts: self.0.hosts().await? }))
    }

    async fn list_vms(&self, req: Request<ListVmsRequest>) -> Result<Response<ListVmsResponse>, Status> {
        self.caller(&req, Level::Viewer, "listing VMs")?;
        let (mut vms, recorded) =
            self.0.state(|s, now| s.vms.values().map(|v| views::vm(s, v, now)).collect::<Vec<_>>()).await?;
        if recorded {
            vms = vms.into_iter().map(views::as_recorded_vm).collect();
        }
        vms.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
        Ok(Response::new(ListVmsResponse { vms }))
    }

    async fn get_vm(&self, req: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        self.caller(&req, Level::Viewer, "showing a VM")?;
        let key = validate::vm_ref(&req.get_ref().vm)?.to_string();
        let (vm, recorded) = self
            .0
            .state(move |s, now| {
                s.find_vm(&key).map(|v| Vm { elsewhere: views::elsewhere(s, v, now), ..views::vm(s, v, now) })
            })
            .await?;
        let vm = if recorded { vm.map(views::as_recorded_vm) } else { vm };
        vm.map(Response::new).map_err(refusal)
    }

    async fn set_protection(&self, req: Request<SetProtectionRequest>) -> Result<Response<Vm>, Status> {
        let who = self.caller(&req, Level::Operator, "changing a VM's protection")?;
        let c = self.c()?;
        let r = req.into_inner();
        let key = validate::vm_ref(&r.vm)?;
        let priority = r.priority.map(validate::priority).transpose()?;
        let group = r.anti_affinity.as_deref().map(validate::group).transpose()?;
        if let Some(p) = r.preferred_host.as_deref().filter(|p| !p.is_empty()) {
            validate::host_name(p)?;
        }
        for h in &r.allowed_hosts {
            validate::host_name(h)?;
        }
        c.require_database("changing a VM's protection")?;
        let named = key.to_string();
        let was_protected =
            c.read(move |s| s.find_vm(&named).map(|v| v.protected)).await?.map_err(refusal)?;
        let reply = self
            .change(
                &who,
                Change::Protection {
                    vm: key.to_string(),
                    protected: r.protected,
                    priority,
                    anti_affinity: group.map(str::to_string),
                    allowed_hosts: r.set_allowed_hosts.then(|| r.allowed_hosts.clone()),
                    preferred_host: r.preferred_host.clone(),
                    force: r.force,
                },
            )
            .await?;
        let Reply::Vm(uuid) = reply else { return Err(unexpected("set_protection", &reply).into()) };
        let vm = c
            .read({
                let uuid = uuid.clone();
                move |s| s.vms.get(&uuid).cloned()
            })
            .await?
            .ok_or_else(|| Error::NotFound(format!("VM {uuid} is gone")))?;
        if vm.protected && !was_protected {
            self.await_protection_known(&who, &vm).await;
        } else {
            // An unprotect or a new priority the answer confirmed is one a leader that takes
            // over a moment later finds on record (a few milliseconds while the database answers).
            c.caught_up(Duration::from_secs(3)).await;
        }
        Ok(Response::new(self.vm_view(&vm.uuid).await?))
    }

    async fn drain(&self, req: Request<DrainRequest>) -> Result<Response<DrainPlan>, Status> {
        let who = match (req.get_ref().dry_run, req.get_ref().allow_restart) {
            (true, _) => self.caller(&req, Level::Viewer, "a drain's dry run")?,
            (false, true) => self.caller(&req, Level::Admin, "drain --allow-restart")?,
            (false, false) => self.caller(&req, Level::Operator, "drain")?,
        };
        let c = self.c()?;
        let r = req.into_inner();
        let host = validate::host_name(&r.host)?.to_string();
        let now = c.now();
        if r.dry_run {
            let named = host.clone();
            let (steps, short) = c
                .read(move |s| {
                    drain::plan(s, &named, now).map(|steps| {
                        let moves: Vec<(String, String)> = (steps.iter())
                            .filter_map(|st| st.planned.clone().map(|t| (st.vm_uuid.clone(), t)))
                            .collect();
                        let short = vmha_engine::admission::after_drain(s, &named, &moves, now);
                        (steps, short)
                    })
                })
                .await?
                .map_err(refusal)?;
            let d = drain_record::Drain {
                cause: drain_record::DrainCause::Operator,
                allow_restart: r.allow_restart,
                state: drain_record::DrainState::Planned,
                steps,
                message: "dry run: nothing changed".into(),
            };
            let mut plan = views::drain(&host, &d);
            plan.warnings = (short.iter())
                .map(|w| format!("once {host} is drained, the host reserve is short: {}", w.shortfall()))
                .collect();
            return Ok(Response::new(plan));
        }
        c.require_database("draining a host")?;
        self.change(&who, Change::Drain { host: host.clone(), allow_restart: r.allow_restart }).await?;
        let plan = c
            .read(move |s| s.hosts.get(&host).and_then(|h| h.drain.as_ref()).map(|d| views::drain(&host, d)))
            .await?;
        Ok(Response::new(plan.unwrap_or_default()))
    }

    async fn undrain(&self, req: Request<UndrainRequest>) -> Result<Response<Host>, Status> {
        let who = self.caller(&req, Level::Operator, "undraining a host")?;
        let c = self.c()?;
        let host = validate::host_name(&req.get_ref().host)?.to_string();
        c.require_database("undraining a host")?;
        self.change(&who, Change::Undrain { host: host.clone(), abort: req.get_ref().abort }).await?;
        Ok(Response::new(self.host_view(&host).await?))
    }

    async fn set_memory_limit(&self, req: Request<SetMemoryLimitRequest>) -> Result<Response<Host>, Status> {
        let who = self.caller(&req, Level::Operator, "setting a host's memory limit")?;
        let c = self.c()?;
        let r = req.into_inner();
        let host = validate::host_name(&r.host)?.to_string();
        let mib = validate::at_most(
            "the memory limit (MiB)",
            r.memory_limit_mib,
            validate::caps::MEMORY_LIMIT_MIB,
        )?;
        let limit = (mib > 0).then_some(mib * 1024);
        c.require_database("setting a host's memory limit")?;
        self.change(&who, Change::SetMemoryLimit { host: host.clone(), limit_kib: limit }).await?;
        Ok(Response::new(self.host_view(&host).await?))
    }

    async fn remove_host(
        &self,
        req: Request<RemoveHostRequest>,
    ) -> Result<Response<RemoveHostResponse>, Status> {
        let who = self.caller(&req, Level::Admin, "removing a host")?;
        let c = self.c()?;
        let host = validate::host_name(&req.get_ref().host)?.to_string();
        c.require_database("removing a host")?;
        self.change(&who, Change::RemoveHost { host: host.clone() }).await?;
        self.0.removed_now(&host);
        Ok(Response::new(RemoveHostResponse {
            message: format!(
                "{host} removed; the controllers refuse the certificates issued to it so far (a new one, \
                 `vmha ca issue host {host}`, adds it again). For its peers' and libvirt's sake too, revoke \
                 them where the CA is: `vmha ca revoke host {host}` and `vmha ca publish`"
            ),
        }))
    }

    async fn publish_crl(
        &self,
        req: Request<PublishCrlRequest>,
    ) -> Result<Response<PublishCrlReply>, Status> {
        let who = self.caller(&req, Level::Admin, "publishing a CRL")?;
        let c = self.c()?;
        c.require_database("publishing a CRL")?;
        let der = req.into_inner().crl;
        let taken = self.0.accept_crl(&der)?;
        let crl = self.0.crl().ok_or_else(|| Error::Invalid("the CRL was not taken".into()))?;
        if !taken && crl.der() != der.as_slice() {
            return Err(Error::Precondition(format!(
                "this CRL is older than CRL {} in use: make a new one with `vmha ca revoke`",
                crl.number
            ))
            .into());
        }
        c.record(Write::Crl { number: crl.number, der: crl.der().to_vec(), by: who.name.clone() })
            .await
            .map_err(Error::Store)?;
        let message = if taken {
            c.event(
                Event::controller(
                    &self.0.name,
                    EventKind::CrlPublished,
                    format!("CRL {} published: {} certificates revoked", crl.number, crl.len()),
                )
                .by(&who.name),
            );
            format!(
                "CRL {} is in use: the controllers refuse the {} certificates it revokes, and every agent takes it \
                 with its next heartbeat answer (and gives it to its libvirtd)",
                crl.number,
                crl.len()
            )
        } else {
            format!("CRL {} was in use already", crl.number)
        };
        Ok(Response::new(PublishCrlReply { number: crl.number, revoked: crl.len() as u32, message }))
    }

    async fn confirm_down(&self, req: Request<ConfirmDownRequest>) -> Result<Response<Host>, Status> {
        let who = self.caller(&req, Level::Admin, "confirm-down")?;
        let c = self.c()?;
        let host = validate::host_name(&req.get_ref().host)?.to_string();
        c.require_database("confirming a host is down")?;
        self.change(&who, Change::ConfirmDown { host: host.clone() }).await?;
        Ok(Response::new(self.host_view(&host).await?))
    }

    async fn set_fencing(&self, req: Request<SetFencingRequest>) -> Result<Response<Host>, Status> {
        let who = self.caller(&req, Level::Admin, "changing a host's fencing mode")?;
        let c = self.c()?;
        let r = req.into_inner();
        let host = validate::host_name(&r.host)?.to_string();
        let mode = FencingMode::parse(&r.mode).ok_or_else(|| {
            Error::Invalid(format!("fencing mode '{}' is not one of self, external, manual", r.mode))
        })?;
        if mode == FencingMode::External && c.fence.command.is_none() {
            return Err(Error::Precondition(
                "external fencing needs the controller's --fence-command; nothing changed".into(),
            )
            .into());
        }
        c.require_database("setting a host's fencing mode")?;
        self.change(&who, Change::SetFencing { host: host.clone(), mode }).await?;
        Ok(Response::new(self.host_view(&host).await?))
    }

    async fn migrate(&self, req: Request<MigrateRequest>) -> Result<Response<Operation>, Status> {
        let who = self.caller(&req, Level::Operator, "migrate")?;
        let c = self.c()?;
        let r = req.into_inner();
        let key = validate::vm_ref(&r.vm)?;
        let target = validate::host_name(&r.target_host)?;
        validate::at_most("the bandwidth (MiB/s)", r.bandwidth_mib_s, validate::caps::BANDWIDTH_MIB_S)?;
        validate::at_most("the timeout (ms)", r.timeout_ms, validate::caps::MIGRATION_TIMEOUT_MS)?;
        c.require_database("starting a migration")?;
        // The engine's policy holds the default timeout (its deadlines count on it).
        let default_timeout = c.read(|s| s.policy.migration_timeout_ms).await?;
        let overrides = (r.bandwidth_mib_s > 0 || r.timeout_ms > 0).then(|| Overrides {
            bandwidth_mib_s: if r.bandwidth_mib_s > 0 {
                r.bandwidth_mib_s
            } else {
                c.migration.bandwidth_mib_s
            },
            timeout_ms: if r.timeout_ms > 0 { r.timeout_ms } else { default_timeout },
        });
        let reply = self
            .change(&who, Change::Migrate { vm: key.to_string(), to: target.to_string(), overrides })
            .await?;
        let Reply::Operation(id) = reply else { return Err(unexpected("migrate", &reply).into()) };
        Ok(Response::new(shown_operation(c, id)?))
    }

    async fn report(&self, req: Request<ReportRequest>) -> Result<Response<ReportReply>, Status> {
        self.caller(&req, Level::Viewer, "the availability report")?;
        let since_s = req.get_ref().since_s;
        validate::at_most("the report's window (s)", since_s, validate::caps::REPORT_WINDOW_S)?;
        let node = &self.0;
        let store = node.store().ok_or_else(|| Error::DatabaseAway {
            what: "the availability report".into(),
            why: "not connected yet".into(),
        })?;
        // What the leader marked before this request is in the history it reads.
        if let Ok(c) = self.c() {
            c.caught_up(Duration::from_secs(3)).await;
        }
        let to = chrono::Utc::now();
        let from = to - chrono::Duration::seconds(since_s.max(1) as i64);
        let outages = store.outages(from, to).await.map_err(Error::from)?;
        let protected_at = store.protected_at().await.map_err(Error::from)?;
        let (vms, _) = self
            .0
            .state(|s, _| {
                s.vms
                    .values()
                    .filter(|v| v.protected)
                    .map(|v| (v.uuid.clone(), v.name.clone()))
                    .collect::<Vec<_>>()
            })
            .await?;
        Ok(Response::new(views::report(from, to, vms, &outages, &protected_at)))
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<Operation>, Status> {
        let who = self.caller(&req, Level::Operator, "cancelling a migration")?;
        let c = self.c()?;
        let r = req.into_inner();
        let (op, vm) = match (r.operation.is_empty(), r.vm.is_empty()) {
            (false, true) => {
                let id = OpId::parse(&r.operation).ok_or_else(|| {
                    Error::Invalid(format!(
                        "'{}' is not an operation id (a UUID, as `vmha events` shows)",
                        r.operation
                    ))
                })?;
                (Some(id), None)
            }
            (true, false) => (None, Some(validate::vm_ref(&r.vm)?.to_string())),
            _ => {
                return Err(Error::Invalid(
                    "name the operation or the VM whose migration to cancel, not both".into(),
                )
                .into());
            }
        };
        c.require_database("cancelling a migration")?;
        let reply = self.change(&who, Change::Cancel { op, vm }).await?;
        let Reply::Operation(id) = reply else { return Err(unexpected("cancel", &reply).into()) };
        Ok(Response::new(shown_operation(c, id)?))
    }

    async fn set_probes(&self, req: Request<SetProbesRequest>) -> Result<Response<Vm>, Status> {
        // Exec probes run commands on the hosts: only an admin may set probes.
        let who = self.caller(&req, Level::Admin, "setting a VM's service probes")?;
        let c = self.c()?;
        let r = req.into_inner();
        let key = validate::vm_ref(&r.vm)?.to_string();
        let probes = (r.probes.iter())
            .map(crate::service_probes::from_api)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Status::invalid_argument)?;
        c.require_database("setting a VM's service probes")?;
        let reply = self.change(&who, Change::SetProbes { vm: key, probes }).await?;
        let Reply::Vm(uuid) = reply else { return Err(unexpected("set_probes", &reply).into()) };
        Ok(Response::new(self.vm_view(&uuid).await?))
    }

    async fn start_vm(&self, req: Request<StartVmRequest>) -> Result<Response<Vm>, Status> {
        let who = self.caller(&req, Level::Operator, "starting a VM")?;
        let c = self.c()?;
        let r = req.into_inner();
        let key = validate::vm_ref(&r.vm)?.to_string();
        let on = (!r.on.is_empty()).then(|| validate::host_name(&r.on).map(str::to_string)).transpose()?;
        c.require_database("starting a VM")?;
        let reply = self.change(&who, Change::StartVm { vm: key, on }).await?;
        let Reply::Vm(uuid) = reply else { return Err(unexpected("start_vm", &reply).into()) };
        Ok(Response::new(self.vm_view(&uuid).await?))
    }

    async fn stop_vm(&self, req: Request<StopVmRequest>) -> Result<Response<StopVmReply>, Status> {
        let who = self.caller(&req, Level::Operator, "stopping a VM")?;
        let c = self.c()?;
        let r = req.into_inner();
        let key = validate::vm_ref(&r.vm)?.to_string();
        validate::at_most("the shutdown timeout (ms)", r.timeout_ms, validate::caps::SHUTDOWN_TIMEOUT_MS)?;
        c.require_database("stopping a VM")?;
        let reply = self.change(&who, Change::StopVm { vm: key, timeout_ms: r.timeout_ms }).await?;
        let (uuid, operation) = match reply {
            Reply::Vm(uuid) => (uuid, None),
            Reply::Operation(id) => {
                let op = shown_operation(c, id)?;
                (op.vm_uuid.clone(), Some(op))
            }
            other => return Err(unexpected("stop_vm", &other).into()),
        };
        Ok(Response::new(StopVmReply { vm: Some(self.vm_view(&uuid).await?), operation }))
    }

    type WatchOperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send + 'static>>;

    async fn watch_operation(
        &self,
        req: Request<WatchOperationRequest>,
    ) -> Result<Response<Self::WatchOperationStream>, Status> {
        self.caller(&req, Level::Viewer, "following an operation")?;
        let c = self.c()?;
        let id = OpId::parse(&req.get_ref().id)
            .ok_or_else(|| Error::Invalid(format!("'{}' is not an operation id", req.get_ref().id)))?;
        let live = c.watch_operation(id);
        let controller = c.clone();
        let stream = async_stream(controller, id, live);
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchDrainStream = Pin<Box<dyn Stream<Item = Result<DrainProgress, Status>> + Send + 'static>>;

    async fn watch_drain(
        &self,
        req: Request<WatchDrainRequest>,
    ) -> Result<Response<Self::WatchDrainStream>, Status> {
        self.caller(&req, Level::Viewer, "following a drain")?;
        let c = self.c()?.clone();
        let host = validate::host_name(&req.get_ref().host)?.to_string();
        let named = host.clone();
        if !c.read(move |s| s.hosts.contains_key(&named)).await? {
            return Err(Error::NotFound(format!(
                "no host named '{host}' is known; `vmha host ls` lists the hosts"
            ))
            .into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut changed = c.watch_work();
        tokio::spawn(async move {
            loop {
                changed.borrow_and_update();
                let named = host.clone();
                let drain = match c.read(move |s| s.hosts.get(&named).and_then(|h| h.drain.clone())).await {
                    Ok(d) => d.map(|d| views::drain(&host, &d)),
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let operations = c
                    .active_operations()
                    .into_iter()
                    .filter(|o| o.kind == "migrate" && o.source == host)
                    .collect();
                let draining = drain.as_ref().is_some_and(|d| d.state == "draining");
                if tx.send(Ok(DrainProgress { drain, operations })).await.is_err() || !draining {
                    return;
                }
                // At most ten a second, however often migrations report.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if changed.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_events(
        &self,
        req: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        self.caller(&req, Level::Viewer, "reading events")?;
        let r = req.into_inner();
        let limit = if r.limit == 0 { 50 } else { r.limit.min(10_000) };
        let rows = match self.c() {
            Ok(c) => {
                c.require_database("listing events")?;
                // The events of what the operator just did (a migration that ended) may still be
                // queued.
                c.caught_up(Duration::from_secs(3)).await;
                c.store.list_events(r.after_id, limit).await.map_err(Error::from)?
            }
            // A standby reads the log too (while a new leader takes over, say).
            Err(not_leader) => {
                let store = self.0.store().ok_or(not_leader)?;
                store.list_events(r.after_id, limit).await.map_err(Error::from)?
            }
        };
        Ok(Response::new(ListEventsResponse { events: rows.iter().map(views::event).collect() }))
    }
}

/// The operation's state now, then each change, ending with its final state. An operation
/// that already ended is answered from memory if it ended lately, else read from the store.
fn async_stream(
    c: Arc<Controller>,
    id: OpId,
    live: Option<tokio::sync::watch::Receiver<Operation>>,
) -> impl Stream<Item = Result<Operation, Status>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        if let Some(mut w) = live {
            loop {
                let op = w.borrow_and_update().clone();
                let done = is_terminal(&op.state);
                if tx.send(Ok(op)).await.is_err() || done {
                    return;
                }
                if w.changed().await.is_err() {
                    // The sender is gone: the operation ended.
                    break;
                }
            }
        }
        let msg = match c.ended_operation(id) {
            Some(op) => Ok(op),
            None => match c.store.get_operation(crate::store::op_uuid(id)).await {
                Ok(Some(row)) => Ok(views::operation(&row)),
                Ok(None) => Err(Error::NotFound(format!("no operation {id}")).into()),
                Err(e) => Err(Error::Store(e).into()),
            },
        };
        let _ = tx.send(msg).await;
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
