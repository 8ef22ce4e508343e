//! The whole control path on real gRPC and a real PostgreSQL, with agents whose hypervisor is
//! the in-tree fake: report -> store -> operator API -> command -> result. (The same path on
//! real KVM is the lab end-to-end test in cli/tests.)

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{PgServer, pki};
use vmha_agent::config::Config;
use vmha_agent::hypervisor::fake::FakeHypervisor;
use vmha_agent::hypervisor::{Hypervisor, HypervisorError, JobProgress, MigrateOptions, MigrationStats};
use vmha_agent::lease::LeaseShell;
use vmha_agent::session::Agent;
use vmha_controller::access::Access;
use vmha_controller::agent_api::AgentApi;
use vmha_controller::controller::{Controller, DecisionLoop, FenceSettings, MigrationSettings};
use vmha_controller::domain_xml::DomainRules;
use vmha_controller::leadership::Leadership;
use vmha_controller::node::Node;
use vmha_controller::operator_api::OperatorApi;
use vmha_controller::store::Store;
use vmha_engine::step::HostWork;
use vmha_engine::{Policy, Timings};
use vmha_proto::v1::agent_service_server::AgentServiceServer;
use vmha_proto::v1::operator_service_client::OperatorServiceClient;
use vmha_proto::v1::operator_service_server::OperatorServiceServer;
use vmha_proto::v1::*;
use vmha_tls::{Level, Role};

const DNS1: &str = "0d6b3f2e-1c1e-4f7e-9a55-2b8a1f6c0d01";
const WEB1: &str = "0d6b3f2e-1c1e-4f7e-9a55-2b8a1f6c0d02";

type Operator = OperatorServiceClient<tonic::transport::Channel>;

async fn migrate(op: &mut Operator, vm: &str, to: &str) -> Result<Operation, tonic::Status> {
    let req = MigrateRequest { vm: vm.into(), target_host: to.into(), ..Default::default() };
    op.migrate(req).await.map(|r| r.into_inner())
}

/// Follows an operation to its end.
async fn final_state(op: &mut Operator, id: &str) -> Operation {
    let mut updates = op.watch_operation(WatchOperationRequest { id: id.into() }).await.unwrap().into_inner();
    let mut last = None;
    while let Some(u) = updates.message().await.unwrap() {
        last = Some(u);
    }
    last.expect("at least the final state")
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A controller on `database_url` with default timings, once the database can be reached.
async fn open_controller(
    database_url: &str,
    timeout: Duration,
    result_grace: Duration,
) -> (Arc<Controller>, DecisionLoop) {
    let settings =
        MigrationSettings { auto_converge: true, bandwidth_mib_s: 0, postcopy: false, max_downtime_ms: 0 };
    let fence = FenceSettings { command: None, timeout: Duration::from_secs(1) };
    let policy = Policy {
        migration_timeout_ms: timeout.as_millis() as u64,
        result_grace_ms: result_grace.as_millis() as u64,
        ..Policy::default()
    };
    Controller::start_when_reachable(
        database_url,
        Timings::default(),
        policy,
        settings,
        fence,
        Leadership::sole(),
    )
    .await
    .unwrap()
}

/// A controller on a fresh database, serving on a loopback port: its endpoint, and the
/// database server, which stops when the last holder drops it.
async fn start_controller(timeout: Duration, result_grace: Duration) -> (String, Arc<PgServer>) {
    let pg = PgServer::shared();
    let controller = open_controller(&pg.fresh_database(), timeout, result_grace).await;
    (serve(controller).await, pg)
}

/// Runs `controller`'s decision loop and serves it on a loopback port; its endpoint.
async fn serve((controller, decisions): (Arc<Controller>, DecisionLoop)) -> String {
    tokio::spawn(decisions.run(controller.clone()));
    serve_node(Node::sole(controller)).await
}

/// Serves `node`'s APIs on a loopback port; its endpoint.
async fn serve_node(node: Arc<Node>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("https://{}", listener.local_addr().unwrap());
    let incoming = vmha_tls::transport::incoming(listener, &pki::creds(Role::Controller, "ctl1")).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(AgentApi::new(
                node.clone(),
                DomainRules::default(),
                Access::Mtls,
            )))
            .add_service(OperatorServiceServer::new(OperatorApi::new(node, Access::Mtls)))
            .serve_with_incoming(incoming),
    );
    endpoint
}

/// An agent for `name` on the given hypervisor, reporting to `endpoint`; its lease.
fn spawn_agent(name: &str, hv: Arc<dyn Hypervisor>, endpoint: &str) -> Arc<LeaseShell> {
    let cfg = Config {
        metrics_listen: None,
        host_name: name.into(),
        libvirt_uri: "fake://".into(),
        migration_uri: format!("fake://{name}"),
        controllers: vec![endpoint.into()],
        watchdog: None,
        peer_listen: ([127, 0, 0, 1], 0).into(),
        peer_address: "127.0.0.1:1".into(),
        probes: vmha_agent::probes::ProbeConfig::default(),
        state_dir: None,
        tls: None,
        libvirt_crl: "/nonexistent/crl.pem".into(),
        guest_ping_interval: vmha_agent::config::GUEST_PING_INTERVAL,
        allow_exec_probes: true,
    };
    let lease = LeaseShell::new(name, Timings::default(), None);
    let agent = Agent::new(cfg, hv.clone(), lease.clone(), pki::transport(Role::Host, name));
    let interval = vmha_agent::config::GUEST_PING_INTERVAL;
    tokio::spawn(vmha_agent::guest_watch::run(interval, hv, lease.clone(), agent.guests.clone()));
    tokio::spawn(vmha_agent::service_probes::run(agent.guests.clone(), true));
    tokio::spawn(agent.run());
    lease
}

/// A second controller on the same database that does not lead (it never stood for leader
/// here): it answers reads from what the database recorded, saying that no controller leads,
/// and refuses every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_answers_reads_from_the_record_and_refuses_changes() {
    let pg = PgServer::shared();
    let url = pg.fresh_database();
    let leader = serve(open_controller(&url, Duration::from_secs(30), Duration::from_secs(60)).await).await;
    let kvm1 = FakeHypervisor::default();
    kvm1.add_running(DNS1, "dns1");
    spawn_agent("kvm1", Arc::new(kvm1), &leader);
    let standby = Node::new("ctl2".into(), "https://ctl2.invalid:7400".into(), None);
    tokio::spawn(standby.clone().keep_presence(url.clone()));
    let mut op = pki::operator(&serve_node(standby).await, Level::Admin).await;

    let vm = until("the standby to show dns1 as recorded", async || {
        let vm = op.get_vm(GetVmRequest { vm: "dns1".into() }).await.ok()?.into_inner();
        (vm.state == "running").then_some(vm)
    })
    .await;
    assert_eq!((vm.uuid.as_str(), vm.host.as_str()), (DNS1, "kvm1"));
    let vms = op.list_vms(ListVmsRequest {}).await.unwrap().into_inner().vms;
    assert_eq!(vms.len(), 1);
    let hosts = op.list_hosts(ListHostsRequest {}).await.unwrap().into_inner().hosts;
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].state, "unknown", "a standby grants no lease: {:?}", hosts[0]);
    assert!(hosts[0].note.contains("no controller leads"), "{}", hosts[0].note);
    assert_eq!(hosts[0].lease_left_s, None);

    let status = op.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(status.standby && status.hosts.is_empty());
    let who = op.leader(LeaderRequest {}).await.unwrap().into_inner();
    assert_eq!((who.name.as_str(), who.leading), ("ctl2", false));
    let refused = op
        .set_protection(SetProtectionRequest { vm: "dns1".into(), protected: true, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("vmha-controller ctl2"), "{}", refused.message());
}

/// What a new leader relies on is on record by the time `vmha protect` answers: the host's
/// acknowledgement of a roster listing the VM, and the membership its agent counts votes
/// among. A leader that dies together with the host a moment later leaves nothing only it knew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_new_leader_needs_is_on_record_when_protect_answers() {
    let pg = PgServer::shared();
    let url = pg.fresh_database();
    let endpoint = serve(open_controller(&url, Duration::from_secs(30), Duration::from_secs(60)).await).await;
    let kvm1 = FakeHypervisor::default();
    kvm1.add_running(DNS1, "dns1");
    spawn_agent("kvm1", Arc::new(kvm1), &endpoint);
    spawn_agent("kvm2", Arc::new(FakeHypervisor::default()), &endpoint);
    let mut op = pki::operator(&endpoint, Level::Admin).await;
    until("dns1 reported on kvm1 and both hosts online", async || {
        let hosts = op.list_hosts(ListHostsRequest {}).await.ok()?.into_inner().hosts;
        let vm = op.get_vm(GetVmRequest { vm: "dns1".into() }).await.ok()?.into_inner();
        (vm.state == "running" && hosts.iter().filter(|h| h.state == "online").count() == 2).then_some(())
    })
    .await;
    let record = Store::open(&url).await.unwrap();
    for round in 0..3 {
        for protected in [true, false] {
            let req = SetProtectionRequest { vm: "dns1".into(), protected, ..Default::default() };
            op.set_protection(req).await.unwrap();
            let host = record.load_hosts().await.unwrap().into_iter().find(|h| h.name == "kvm1").unwrap();
            let vm = record.load_vms().await.unwrap().into_iter().find(|v| v.uuid == DNS1).unwrap();
            assert_eq!(vm.protected, protected, "round {round}");
            if protected {
                assert!(
                    vm.fenced_by(host.roster_acked),
                    "round {round}: the record shows kvm1 acknowledged roster {:?}, dns1 protected in {:?}",
                    host.roster_acked,
                    vm.protected_in
                );
            }
            assert!(
                HostWork::of(&host).members_acked.is_some(),
                "round {round}: no membership on record for kvm1"
            );
        }
    }
    let events =
        op.list_events(ListEventsRequest { limit: 100, after_id: 0 }).await.unwrap().into_inner().events;
    assert!(
        !events.iter().any(|e| e.kind == "protection_unconfirmed"),
        "every protect was confirmed: {:?}",
        events.iter().map(|e| &e.message).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_migrates_a_reported_vm_and_sees_it_recorded() {
    let (endpoint, _db) = start_controller(Duration::from_secs(30), Duration::from_secs(60)).await;
    let (kvm1, kvm2) = (FakeHypervisor::default(), FakeHypervisor::default());
    kvm1.add_running(DNS1, "dns1");
    kvm1.connect_peer("fake://kvm2", &kvm2);
    spawn_agent("kvm1", Arc::new(kvm1.clone()), &endpoint);
    spawn_agent("kvm2", Arc::new(kvm2.clone()), &endpoint);

    let mut op = pki::operator(&endpoint, Level::Admin).await;
    let vm = until("dns1 reported on kvm1 and both hosts online", async || {
        let hosts = op.list_hosts(ListHostsRequest {}).await.ok()?.into_inner().hosts;
        let vm = op.get_vm(GetVmRequest { vm: "dns1".into() }).await.ok()?.into_inner();
        (hosts.iter().filter(|h| h.state == "online").count() == 2).then_some(vm)
    })
    .await;
    assert_eq!((vm.uuid.as_str(), vm.host.as_str(), vm.state.as_str()), (DNS1, "kvm1", "running"));

    let vm = op
        .set_protection(SetProtectionRequest {
            vm: "dns1".into(),
            protected: true,
            priority: Some(100),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(vm.protected && vm.priority == 100);

    let started = migrate(&mut op, "dns1", "kvm2").await.unwrap();
    assert_eq!((started.source.as_str(), started.target.as_str()), ("kvm1", "kvm2"));
    let last = final_state(&mut op, &started.id).await;
    assert_eq!(last.state, "succeeded", "{last:?}");
    assert_eq!(last.bytes, 100);

    // The fake hosts agree, and so does the controller, without waiting for a heartbeat.
    assert!(kvm1.domains().unwrap().is_empty());
    assert_eq!(kvm2.domains().unwrap()[0].uuid, DNS1);
    let vm = op.get_vm(GetVmRequest { vm: DNS1.into() }).await.unwrap().into_inner();
    assert_eq!((vm.host.as_str(), vm.protected, vm.priority), ("kvm2", true, 100));

    let events =
        op.list_events(ListEventsRequest { limit: 100, after_id: 0 }).await.unwrap().into_inner().events;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    for k in
        ["agent_connected", "vm_discovered", "vm_protected", "migration_requested", "migration_succeeded"]
    {
        assert!(kinds.contains(&k), "no {k} in {kinds:?}");
    }
    let done = events.iter().find(|e| e.kind == "migration_succeeded").unwrap();
    assert!(done.message.contains("dns1 live-migrated from kvm1 to kvm2"), "{}", done.message);

    // Refusals change nothing and say why.
    let e = migrate(&mut op, "nosuchvm", "kvm1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("nosuchvm"), "{}", e.message());
    let e = migrate(&mut op, "dns1", "kvm2").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("already runs on kvm2"), "{}", e.message());
    let e = migrate(&mut op, "dns1", "kvm9").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // A failing migration is recorded as failed and the VM stays.
    let failing = migrate(&mut op, "dns1", "kvm1").await.unwrap();
    let last = final_state(&mut op, &failing.id).await;
    assert_eq!(last.state, "failed");
    assert!(last.error.contains("unable to connect"), "{}", last.error);
    assert_eq!(op.get_vm(GetVmRequest { vm: "dns1".into() }).await.unwrap().into_inner().host, "kvm2");
}

/// A definition the controller refuses (a passthrough device) costs its host nothing: it
/// keeps its lease, and the event log says once why the VM cannot be restarted elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_definition_is_logged_once_and_its_host_keeps_its_lease() {
    let (endpoint, _db) = start_controller(Duration::from_secs(30), Duration::from_secs(60)).await;
    let kvm1 = FakeHypervisor::default();
    kvm1.add_running(DNS1, "dns1");
    kvm1.set_xml(
        DNS1,
        &format!(
            "<domain type='kvm'><name>dns1</name><uuid>{DNS1}</uuid><devices>\
             <hostdev mode='subsystem' type='pci' managed='yes'/></devices></domain>"
        ),
    );
    spawn_agent("kvm1", Arc::new(kvm1.clone()), &endpoint);
    let mut op = pki::operator(&endpoint, Level::Admin).await;
    let refused = until("the definition refused", async || {
        let events =
            op.list_events(ListEventsRequest { limit: 100, after_id: 0 }).await.ok()?.into_inner().events;
        let refused: Vec<Event> = events.into_iter().filter(|e| e.kind == "definition_refused").collect();
        (!refused.is_empty()).then_some(refused)
    })
    .await;
    assert!(
        refused[0].message.starts_with(
            "definition of VM dns1 reported by host kvm1 refused: hostdev (type pci): host device passthrough"
        ),
        "{}",
        refused[0].message
    );
    // Heartbeats go on, and earn leases; the refusal is not repeated.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hosts = op.list_hosts(ListHostsRequest {}).await.unwrap().into_inner().hosts;
    assert_eq!(hosts[0].state, "online", "{hosts:?}");
    let events =
        op.list_events(ListEventsRequest { limit: 1000, after_id: 0 }).await.unwrap().into_inner().events;
    assert_eq!(events.iter().filter(|e| e.kind == "definition_refused").count(), 1);
}

/// A hypervisor whose migrations hang, as when an agent stops mid-command.
struct Hanging(FakeHypervisor);

impl Hypervisor for Hanging {
    fn host_facts(&self) -> Result<HostFacts, HypervisorError> {
        self.0.host_facts()
    }
    fn domains(&self) -> Result<Vec<Domain>, HypervisorError> {
        self.0.domains()
    }
    fn define_and_start(&self, xml: &str) -> Result<String, HypervisorError> {
        self.0.define_and_start(xml)
    }
    fn shutdown(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.0.shutdown(uuid)
    }
    fn destroy(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.0.destroy(uuid)
    }
    fn abort_job(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.0.abort_job(uuid)
    }
    fn reset(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.0.reset(uuid)
    }
    fn start_defined(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.0.start_defined(uuid)
    }
    fn migrate(
        &self,
        uuid: &str,
        _: &MigrateOptions,
        _: &(dyn Fn(JobProgress) + Sync),
    ) -> Result<MigrationStats, HypervisorError> {
        std::thread::sleep(Duration::from_secs(4));
        Err(HypervisorError::NoSuchDomain(uuid.into()))
    }
    fn guest_look(&self, uuid: &str) -> Result<Option<vmha_agent::hypervisor::GuestLook>, HypervisorError> {
        self.0.guest_look(uuid)
    }
    fn guest_ping(&self, uuid: &str, timeout: Duration) -> bool {
        self.0.guest_ping(uuid, timeout)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_whose_agent_never_answers_is_failed_and_frees_the_vm() {
    let (endpoint, _db) = start_controller(Duration::from_secs(1), Duration::from_secs(1)).await;
    let kvm1 = FakeHypervisor::default();
    kvm1.add_running(DNS1, "dns1");
    spawn_agent("kvm1", Arc::new(Hanging(kvm1)), &endpoint);
    spawn_agent("kvm2", Arc::new(FakeHypervisor::default()), &endpoint);
    let mut op = pki::operator(&endpoint, Level::Admin).await;
    until("both hosts online with dns1", async || {
        let hosts = op.list_hosts(ListHostsRequest {}).await.ok()?.into_inner().hosts;
        op.get_vm(GetVmRequest { vm: "dns1".into() }).await.ok()?;
        (hosts.iter().filter(|h| h.state == "online").count() == 2).then_some(())
    })
    .await;
    let started = migrate(&mut op, "dns1", "kvm2").await.unwrap();
    let last = final_state(&mut op, &started.id).await;
    assert_eq!(last.state, "failed");
    assert!(last.error.contains("no result from the agent on kvm1"), "{}", last.error);
    // The VM is free again: a new request is not refused as busy.
    let again = migrate(&mut op, "dns1", "kvm2").await;
    assert!(
        again.as_ref().is_ok_and(|o| o.state != "failed")
            || again.as_ref().is_err_and(|e| !e.message().contains("busy")),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_fences_nobody_and_what_changed_meanwhile_is_written_after() {
    let pg = PgServer::private();
    let url = pg.fresh_database();
    let endpoint = serve(open_controller(&url, Duration::from_secs(30), Duration::from_secs(60)).await).await;
    let (kvm1, kvm2) = (FakeHypervisor::default(), FakeHypervisor::default());
    kvm1.add_running(DNS1, "dns1");
    kvm1.add_running(WEB1, "web1");
    let leases = [
        spawn_agent("kvm1", Arc::new(kvm1.clone()), &endpoint),
        spawn_agent("kvm2", Arc::new(kvm2.clone()), &endpoint),
    ];
    let mut op = pki::operator(&endpoint, Level::Admin).await;
    until("both hosts online with dns1 and web1", async || {
        let hosts = op.list_hosts(ListHostsRequest {}).await.ok()?.into_inner().hosts;
        op.get_vm(GetVmRequest { vm: "web1".into() }).await.ok()?;
        op.get_vm(GetVmRequest { vm: "dns1".into() }).await.ok()?;
        (hosts.iter().filter(|h| h.state == "online").count() == 2).then_some(())
    })
    .await;
    let protect = |vm: &str| SetProtectionRequest { vm: vm.into(), protected: true, ..Default::default() };
    op.set_protection(protect("dns1")).await.unwrap();

    tokio::task::block_in_place(|| pg.stop());
    let stopped = std::time::Instant::now();
    // A read the controller cannot answer from memory says the database is the problem.
    let e = op.list_events(ListEventsRequest { limit: 10, after_id: 0 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().starts_with("database unavailable"), "{}", e.message());

    // The change kvm1 reports next cannot be written; it is seen all the same.
    kvm1.destroy(WEB1).unwrap();
    let down = until("vmha status names the database problem", async || {
        let s = op.status(StatusRequest {}).await.ok()?.into_inner();
        (!s.database.is_empty()).then_some(s.database)
    })
    .await;
    assert!(down.starts_with("waiting for the database"), "{down}");
    let web1 = op.get_vm(GetVmRequest { vm: "web1".into() }).await.unwrap().into_inner();
    assert_eq!(web1.state, "shut_off");
    // Requests that need the database are refused, changing nothing, and say what to do.
    let e = op.set_protection(protect("web1")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("database unavailable") && e.message().contains("vmha status"),
        "{}",
        e.message()
    );
    assert!(!op.get_vm(GetVmRequest { vm: "web1".into() }).await.unwrap().into_inner().protected);

    // Through the outage (longer than a lease), both hosts keep earning leases.
    let lease_ttl_ms = Timings::default().lease_ttl_ms as i64;
    while stopped.elapsed() < Duration::from_millis(lease_ttl_ms as u64 + 2_000) {
        let hosts = op.list_hosts(ListHostsRequest {}).await.unwrap().into_inner().hosts;
        assert!(hosts.iter().all(|h| h.state == "online"), "{hosts:?}");
        for (host, lease) in ["kvm1", "kvm2"].iter().zip(&leases) {
            let left = lease.upper_remaining_ms();
            assert!(left > lease_ttl_ms / 3 && !lease.self_fenced(), "{host}'s lease runs out in {left} ms");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dns1 = kvm1.domains().unwrap().into_iter().find(|d| d.uuid == DNS1).expect("dns1 still defined");
    assert_eq!(dns1.state, DomainState::Running as i32, "protected dns1 was stopped");

    tokio::task::block_in_place(|| pg.resume());
    until("the queued writes reach the database", async || {
        let s = op.status(StatusRequest {}).await.ok()?.into_inner();
        s.database.is_empty().then_some(())
    })
    .await;
    let events =
        op.list_events(ListEventsRequest { limit: 1000, after_id: 0 }).await.unwrap().into_inner().events;
    let at = |kind: &str, subject: &str| {
        events.iter().position(|e| e.kind == kind && e.subject == subject).unwrap_or_else(|| {
            panic!(
                "no {kind} event for {subject} in {:?}",
                events.iter().map(|e| &e.kind).collect::<Vec<_>>()
            )
        })
    };
    assert!(at("vm_discovered", "web1") < at("vm_protected", "dns1"));
    assert!(at("vm_protected", "dns1") < at("vm_state", "web1"));
    let shut = &events[at("vm_state", "web1")];
    assert_eq!(
        (shut.message.as_str(), shut.actor.as_str()),
        ("web1 on kvm1 is now shut_off (was running)", "kvm1")
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let state: String = sqlx::query_scalar("SELECT state FROM vms WHERE uuid = $1::uuid")
        .bind(WEB1)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "shut_off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_started_while_the_database_is_down_comes_up_when_it_is() {
    let pg = PgServer::private();
    let url = pg.fresh_database();
    tokio::task::block_in_place(|| pg.stop());
    let starting = tokio::spawn({
        let url = url.clone();
        async move { open_controller(&url, Duration::from_secs(30), Duration::from_secs(60)).await }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!starting.is_finished(), "the controller gave up (or started) without its database");
    tokio::task::block_in_place(|| pg.resume());
    let (controller, _) = tokio::time::timeout(Duration::from_secs(20), starting)
        .await
        .expect("started once the database was")
        .unwrap();
    let events = controller.store.list_events(0, 10).await.unwrap();
    assert!(events.iter().any(|e| e.kind == "controller_started"), "{events:?}");
}

/// Under systemd (`Type=notify`, `WatchdogSec`) the real binary says READY=1 once it serves and
/// WATCHDOG=1 while its decision loop runs; timings that break the safety rule keep it from
/// starting, with what to change.
#[tokio::test(flavor = "multi_thread")]
async fn the_controller_says_ready_and_its_loop_runs_and_refuses_unsafe_timings() {
    use std::os::unix::net::UnixDatagram;
    let pg = PgServer::shared();
    let url = pg.fresh_database();
    let dir = std::env::temp_dir().join(format!("vmha-ctl-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    vmha_tls::ca::init(&dir, 1).unwrap();
    let issue = |role, name: &str| {
        let req = vmha_tls::ca::Request { role, name: name.into(), dns: vec![], ips: vec![], days: 1 };
        let issued = vmha_tls::ca::issue(&dir, &dir.join("pki"), &req).unwrap();
        let ca = dir.join(vmha_tls::ca::CA_CERT);
        [ca, issued.cert, issued.key].map(|p| p.to_str().unwrap().to_string())
    };
    let [ca, cert, key] = issue(Role::Controller, "ctl1");
    let tls = ["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key].map(String::from);
    let mut controller = std::process::Command::new(env!("CARGO_BIN_EXE_vmha-controller"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--database-url", &url])
        .args(&tls)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let seen = tokio::task::block_in_place(|| {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
            if seen.iter().any(|m| m.contains("READY=1"))
                && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3
            {
                break;
            }
        }
        seen
    });
    controller.kill().unwrap();
    controller.wait().unwrap();
    let [_, host_cert, host_key] = issue(Role::Host, "kvm1");
    let impostor = std::process::Command::new(env!("CARGO_BIN_EXE_vmha-controller"))
        .args(["--database-url", &url, "--tls-ca", &ca, "--tls-cert", &host_cert, "--tls-key", &host_key])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&impostor.stderr);
    assert!(!impostor.status.success());
    assert!(stderr.contains("is the certificate of host kvm1, not of a controller"), "{stderr}");
    assert!(seen.iter().any(|m| m.contains("READY=1")), "no READY=1 in {seen:?}");
    assert!(
        seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "no steady WATCHDOG=1 in {seen:?}"
    );

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_vmha-controller"))
        .args(["--database-url", &url, "--lease-ttl", "2s"])
        .args(&tls)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("lease TTL 2000 ms must be at least 3 heartbeat intervals"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A protected guest whose agent answered, then falls silent with no I/O of its own, is reset
/// in place by its host's agent, once; `vmha vm show` and the events say so, and the reset
/// counts against its budget in the database (a new leader keeps counting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_guest_is_reset_in_place_once_and_its_budget_is_on_record() {
    use vmha_agent::hypervisor::{Activity, GuestLook};
    let pg = PgServer::shared();
    let url = pg.fresh_database();
    let endpoint = serve(open_controller(&url, Duration::from_secs(30), Duration::from_secs(60)).await).await;
    let kvm1 = FakeHypervisor::default();
    kvm1.add_running(DNS1, "dns1");
    let look = |io_ops| GuestLook { instance: 1, channel: true, activity: Activity { cpu_ns: 1, io_ops } };
    kvm1.set_guest(DNS1, look(1), true);
    spawn_agent("kvm1", Arc::new(kvm1.clone()), &endpoint);
    spawn_agent("kvm2", Arc::new(FakeHypervisor::default()), &endpoint);
    let mut op = pki::operator(&endpoint, Level::Admin).await;
    until("dns1 reported on kvm1 and both hosts online", async || {
        let hosts = op.list_hosts(ListHostsRequest {}).await.ok()?.into_inner().hosts;
        let vm = op.get_vm(GetVmRequest { vm: "dns1".into() }).await.ok()?.into_inner();
        (vm.state == "running" && hosts.iter().filter(|h| h.state == "online").count() == 2).then_some(())
    })
    .await;
    // A host whose heartbeat comes late on a loaded machine is suspect for a moment, and the
    // reserve check then refuses, as it should: the operator's retry goes through.
    let req = SetProtectionRequest { vm: "dns1".into(), protected: true, ..Default::default() };
    until("dns1 protected", async || op.set_protection(req.clone()).await.ok().map(|_| ())).await;
    until("dns1's guest agent answering", async || {
        let vm = op.get_vm(GetVmRequest { vm: "dns1".into() }).await.ok()?.into_inner();
        vm.guest.starts_with("answering").then_some(())
    })
    .await;
    // A kernel panic: no answers, and its counters stand still.
    kvm1.set_guest(DNS1, look(1), false);
    let mut waited = Duration::ZERO;
    while kvm1.resets(DNS1) == 0 {
        if waited >= Duration::from_secs(30) {
            let vm = op.get_vm(GetVmRequest { vm: "dns1".into() }).await.unwrap().into_inner();
            let events = op
                .list_events(ListEventsRequest { limit: 1000, after_id: 0 })
                .await
                .unwrap()
                .into_inner()
                .events;
            panic!("dns1 was not reset within 30 s of its silence: {vm:?} {events:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        waited += Duration::from_millis(200);
    }
    assert!(waited >= Duration::from_secs(8), "reset after {waited:?}: before the 10 s failure interval");
    let vm = op.get_vm(GetVmRequest { vm: "dns1".into() }).await.unwrap().into_inner();
    assert!(vm.guest_resets.starts_with("1 of 3 this hour"), "{vm:?}");
    assert_eq!(vm.guest_alarm, "");
    let events =
        op.list_events(ListEventsRequest { limit: 1000, after_id: 0 }).await.unwrap().into_inner().events;
    let hung: Vec<&Event> = events.iter().filter(|e| e.kind == "guest_hung").collect();
    assert_eq!(hung.len(), 1, "{events:?}");
    assert!(hung[0].message.contains("no disk or network I/O of its own for"), "{}", hung[0].message);
    // Still silent, but it has not answered since its reset: it has the boot grace (60 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(kvm1.resets(DNS1), 1, "reset once");
    let stored = Store::open(&url).await.unwrap().load_vms().await.unwrap();
    let care = &stored.iter().find(|v| v.uuid == DNS1).unwrap().guest_care;
    assert_eq!((care.resets.len(), care.answered_since_reset), (1, false), "{care:?}");
}

/// A service probe end to end: only an admin may set one, a bad one is refused with the
/// reason, the agent of the VM's host runs it, and a service that worked and then fails it as
/// declared gets its guest reset in place; the event names the probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_fails_its_probe_after_it_worked_gets_its_guest_reset() {
    use vmha_agent::hypervisor::{Activity, GuestLook};
    let (endpoint, _db) = start_controller(Duration::from_secs(30), Duration::from_secs(60)).await;
    let kvm1 = FakeHypervisor::default();
    kvm1.add_running(DNS1, "dns1");
    let busy = GuestLook { instance: 1, channel: true, activity: Activity { cpu_ns: 1, io_ops: 1 } };
    kvm1.set_guest(DNS1, busy, true);
    spawn_agent("kvm1", Arc::new(kvm1.clone()), &endpoint);
    spawn_agent("kvm2", Arc::new(FakeHypervisor::default()), &endpoint);
    let mut admin = pki::operator(&endpoint, Level::Admin).await;
    until("dns1 reported on kvm1 and both hosts online", async || {
        let hosts = admin.list_hosts(ListHostsRequest {}).await.ok()?.into_inner().hosts;
        let vm = admin.get_vm(GetVmRequest { vm: "dns1".into() }).await.ok()?.into_inner();
        (vm.state == "running" && hosts.iter().filter(|h| h.state == "online").count() == 2).then_some(())
    })
    .await;
    let req = SetProtectionRequest { vm: "dns1".into(), protected: true, ..Default::default() };
    admin.set_protection(req).await.unwrap();
    // The guest's service: a TCP port that answers until the listener goes.
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    let tcp = |address: &str| ServiceProbe {
        name: "svc".into(),
        kind: Some(service_probe::Kind::Tcp(TcpProbe { port: port.into() })),
        address: address.into(),
        interval_ms: 1_000,
        timeout_ms: 500,
        failures: 2,
    };
    let mut operator = pki::operator(&endpoint, Level::Operator).await;
    let set = |probes| SetProbesRequest { vm: "dns1".into(), probes };
    let refused = operator.set_probes(set(vec![tcp("127.0.0.1")])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = admin.set_probes(set(vec![tcp("dns1")])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("'dns1' is not the guest's IP address"), "{}", refused.message());
    let vm = admin.set_probes(set(vec![tcp("127.0.0.1")])).await.unwrap().into_inner();
    assert_eq!(vm.probe_specs.len(), 1);
    until("the probe to pass on kvm1", async || {
        let vm = admin.get_vm(GetVmRequest { vm: "dns1".into() }).await.ok()?.into_inner();
        vm.probes.first().is_some_and(|p| p.ends_with(": passing")).then_some(())
    })
    .await;
    drop(service);
    until("dns1 to be reset for its failing service", async || (kvm1.resets(DNS1) == 1).then_some(())).await;
    let events =
        admin.list_events(ListEventsRequest { limit: 1000, after_id: 0 }).await.unwrap().into_inner().events;
    let hung: Vec<&Event> = events.iter().filter(|e| e.kind == "guest_hung").collect();
    assert_eq!(hung.len(), 1, "{events:?}");
    assert!(
        hung[0].message.contains("its svc probe failed 2 times in a row (svc: tcp 127.0.0.1:"),
        "{}",
        hung[0].message
    );
    assert!(events.iter().any(|e| e.kind == "probes_set" && e.actor.contains("admin")), "{events:?}");
    // It has not passed since the reset: shown as failing, and given the boot grace (60 s)
    // before the reset counts as not having helped.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(kvm1.resets(DNS1), 1);
    let vm = admin.get_vm(GetVmRequest { vm: "dns1".into() }).await.unwrap().into_inner();
    assert!(
        vm.probes[0].contains("FAILING") && vm.probes[0].contains("(not passed since the guest started)"),
        "{vm:?}"
    );
}
