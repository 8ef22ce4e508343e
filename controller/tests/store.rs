//! The store against a real PostgreSQL.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::PgServer;
use uuid::Uuid;

use vmha_controller::journal::{Journal, Write};
use vmha_controller::store::{NewEvent, OperationOutcome, Store, StoreError, op_uuid};
use vmha_engine::Millis;
use vmha_engine::availability::OutageMark;
use vmha_engine::cluster::HostResources;
use vmha_engine::operation::{Done, OpId, OpKind, OpState, Operation, Overrides, Purpose};
use vmha_engine::step::{HostWork, VmWork};
use vmha_engine::{HostView, RunState, VmView, Watchdog};

fn host(name: &str) -> HostView {
    let mut h = HostView::new(name);
    h.migration_uri = format!("qemu+tcp://{name}/system");
    h.resources = HostResources {
        cpus: 2,
        memory_total_kib: 1 << 20,
        memory_free_kib: 1 << 19,
        cpu_model: "x86_64".into(),
    };
    h.libvirt_version = "9.0.0".into();
    h
}

fn vm(uuid: Uuid, host: &str) -> VmView {
    let mut vm = VmView::new(&uuid.to_string(), "dns1");
    vm.host = Some(host.into());
    vm.state = RunState::Running;
    vm.memory_kib = 65_536;
    vm.vcpus = 1;
    vm
}

fn event(message: String) -> NewEvent {
    NewEvent { subject_kind: "vm", subject: "dns1".into(), kind: "vm_state", message, actor: "kvm1".into() }
}

fn op(seq: u64, vm_uuid: Uuid) -> Operation {
    Operation {
        id: OpId::new(1, seq),
        kind: OpKind::Migrate,
        purpose: Purpose::Drain,
        vm_uuid: vm_uuid.to_string(),
        vm_name: "dns1".into(),
        source: "kvm1".into(),
        target: "kvm2".into(),
        actor: "controller".into(),
        state: OpState::Recording,
        error: String::new(),
        deadline: Millis(0),
        overrides: Some(Overrides { bandwidth_mib_s: 1, timeout_ms: 9_000 }),
        inherited: false,
        done: Done::default(),
        cancelled_by: None,
    }
}

#[tokio::test]
async fn the_schema_is_applied_once_and_each_start_takes_a_higher_epoch() {
    let pg = PgServer::shared();
    let url = pg.fresh_database();
    let a = Store::open(&url).await.unwrap();
    let e1 = a.next_epoch().await.unwrap();
    let b = Store::open(&url).await.unwrap();
    let e2 = b.next_epoch().await.unwrap();
    assert!(e2 > e1, "{e2} > {e1}");
}

#[tokio::test]
async fn a_schema_newer_than_this_build_is_refused_with_what_to_do() {
    let pg = PgServer::shared();
    let url = pg.fresh_database();
    Store::open(&url).await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (9999, 'from the future', true, '\\x00', 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let err = Store::open(&url).await.err().expect("refused");
    assert!(matches!(err, StoreError::SchemaTooNew { applied: 9999, .. }), "{err}");
    assert!(err.to_string().contains("newer vmha-controller"), "{err}");
}

#[tokio::test]
async fn an_unreachable_database_is_named_in_the_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://vmha:secret@127.0.0.1:{port}/vmha");
    let err = Store::open(&url).await.err().expect("no server there");
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("--database-url"), "{msg}");
    assert!(!msg.contains("secret"), "password leaked: {msg}");
}

#[tokio::test]
async fn hosts_and_vms_round_trip_with_desired_state_kept_apart_from_observed() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    let mut db = s.connection().await.unwrap();
    Store::upsert_host(&mut db, &host("kvm1"), "7.2.0").await.unwrap();
    Store::upsert_host(&mut db, &host("kvm2"), "7.2.0").await.unwrap();
    let id = Uuid::new_v4();
    Store::upsert_vm(&mut db, &vm(id, "kvm1")).await.unwrap();
    let mut desired = vm(id, "kvm1");
    desired.protected = true;
    desired.priority = 100;
    desired.anti_affinity = Some("dns".into());
    desired.allowed_hosts = vec!["kvm1".into(), "kvm2".into()];
    Store::set_vm_work(&mut db, &desired.uuid, &VmWork::of(&desired)).await.unwrap();
    Store::set_vm_xml(&mut db, &id.to_string(), "<domain/>").await.unwrap();
    // A later report moves it; protection must survive the observed-state write.
    let mut moved = vm(id, "kvm2");
    moved.protected = false;
    Store::upsert_vm(&mut db, &moved).await.unwrap();
    let armed = Watchdog::Armed { device: "/dev/watchdog".into(), timeout_ms: 3_000 };
    Store::set_watchdog(&mut db, "kvm1", &armed).await.unwrap();
    Store::set_watchdog(&mut db, "kvm2", &Watchdog::Missing("no such device".into())).await.unwrap();
    let hosts = s.load_hosts().await.unwrap();
    assert_eq!(hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["kvm1", "kvm2"]);
    assert_eq!(hosts[0].resources.cpu_model, "x86_64");
    assert_eq!(
        (&hosts[0].watchdog, &hosts[1].watchdog),
        (&armed, &Watchdog::Missing("no such device".into()))
    );
    let vms = s.load_vms().await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!((vms[0].host.as_deref(), vms[0].protected, vms[0].priority), (Some("kvm2"), true, 100));
    assert_eq!(
        (vms[0].anti_affinity.as_deref(), vms[0].allowed_hosts.len(), vms[0].xml.as_str()),
        (Some("dns"), 2, "<domain/>")
    );
    assert_eq!(
        vms[0].state,
        RunState::Unknown,
        "observed state is rebuilt from reports, not trusted from the DB"
    );
}

/// A new leader learns how long no leader watched: the last time any controller said it was
/// alive while leading, kept when that controller stands by again.
#[tokio::test]
async fn the_last_time_a_controller_led_survives_its_return_to_standby() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    assert_eq!(s.last_led_ms_ago().await.unwrap(), None, "nobody has led");
    s.controller_seen("ctl2", "https://ctl2:7400", None).await.unwrap();
    assert_eq!(s.last_led_ms_ago().await.unwrap(), None, "a standby is not a leader");
    s.controller_seen("ctl1", "https://ctl1:7400", Some(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ctl1 restarts and stands by: its row says so, and still when it last led.
    s.controller_seen("ctl1", "https://ctl1:7400", None).await.unwrap();
    let ago = s.last_led_ms_ago().await.unwrap().expect("ctl1 led");
    assert!((300..5_000).contains(&ago), "{ago} ms");
}

/// `vmha report` counts a VM from when it was protected: the time is set when protection
/// begins, kept while other desired state changes, and cleared when it ends.
#[tokio::test]
async fn a_vms_protection_time_is_set_when_it_begins_kept_while_it_lasts_and_cleared() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    let mut db = s.connection().await.unwrap();
    Store::upsert_host(&mut db, &host("kvm1"), "7.2.0").await.unwrap();
    let id = Uuid::new_v4();
    let mut v = vm(id, "kvm1");
    Store::upsert_vm(&mut db, &v).await.unwrap();
    assert!(s.protected_at().await.unwrap().is_empty(), "not protected");
    let before = chrono::Utc::now().timestamp_millis();
    v.protected = true;
    Store::set_vm_work(&mut db, &v.uuid, &VmWork::of(&v)).await.unwrap();
    let at = s.protected_at().await.unwrap()[&v.uuid];
    assert!(
        (before - 1_000..=chrono::Utc::now().timestamp_millis() + 1_000).contains(&at),
        "{at} vs {before}"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    v.priority = 50;
    Store::set_vm_work(&mut db, &v.uuid, &VmWork::of(&v)).await.unwrap();
    assert_eq!(s.protected_at().await.unwrap()[&v.uuid], at, "a new priority is not a new protection");
    v.protected = false;
    Store::set_vm_work(&mut db, &v.uuid, &VmWork::of(&v)).await.unwrap();
    assert!(s.protected_at().await.unwrap().is_empty(), "unprotected");
    v.protected = true;
    Store::set_vm_work(&mut db, &v.uuid, &VmWork::of(&v)).await.unwrap();
    assert!(s.protected_at().await.unwrap()[&v.uuid] > at, "protected again: a new time");
}

#[tokio::test]
async fn operations_record_their_life_and_unfinished_ones_are_handed_to_the_next_controller() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    let mut db = s.connection().await.unwrap();
    let vm_id = Uuid::new_v4();
    let done = op(1, vm_id);
    let id = op_uuid(done.id);
    Store::insert_operation(&mut db, &done, 1).await.unwrap();
    Store::set_operation_running(&mut db, id).await.unwrap();
    Store::set_operation_progress(&mut db, id, 100, 40, 60).await.unwrap();
    Store::finish_operation(
        &mut db,
        id,
        &OperationOutcome {
            state: "succeeded",
            error: String::new(),
            elapsed_ms: 150,
            downtime_ms: 7,
            bytes: 1 << 20,
        },
    )
    .await
    .unwrap();
    let row = s.get_operation(id).await.unwrap().unwrap();
    assert_eq!((row.state.as_str(), row.data_processed, row.downtime_ms), ("succeeded", 40, 7));

    let in_flight = op(2, vm_id);
    Store::insert_operation(&mut db, &in_flight, 1).await.unwrap();
    Store::set_operation_running(&mut db, op_uuid(in_flight.id)).await.unwrap();
    let unfinished = s.unfinished_operations().await.unwrap();
    assert_eq!(unfinished.len(), 1, "only what did not end: {unfinished:?}");
    let u = &unfinished[0];
    assert_eq!(
        (u.id, u.kind, u.purpose, u.overrides, u.vm_uuid.as_str(), u.target.as_str()),
        (
            in_flight.id,
            OpKind::Migrate,
            Purpose::Drain,
            in_flight.overrides,
            in_flight.vm_uuid.as_str(),
            "kvm2"
        )
    );
    assert!(u.inherited, "the next controller knows it did not send it");
    assert_eq!(s.get_operation(Uuid::new_v4()).await.unwrap(), None);
}

#[tokio::test]
async fn a_hosts_death_drain_and_acknowledged_roster_and_a_vms_restart_survive_a_restart() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    let mut db = s.connection().await.unwrap();
    Store::upsert_host(&mut db, &host("kvm1"), "7.2.0").await.unwrap();
    let id = Uuid::new_v4();
    Store::upsert_vm(&mut db, &vm(id, "kvm1")).await.unwrap();
    let mut h = host("kvm1");
    h.admin = vmha_engine::AdminState::Draining;
    h.dead = Some(vmha_engine::Death { at: Millis(5), cause: "no lease".into() });
    h.drain = Some(vmha_engine::drain_record::Drain {
        cause: vmha_engine::drain_record::DrainCause::Operator,
        allow_restart: true,
        state: vmha_engine::drain_record::DrainState::Draining,
        steps: Vec::new(),
        message: String::new(),
    });
    // What the next leader needs to restart kvm1's VMs without an operator: a roster version
    // of epoch 3 (the upper half) acknowledged, and the version that first listed the VM.
    h.roster_acked = Some((3 << 32) | 17);
    Store::set_host_work(&mut db, "kvm1", &HostWork::of(&h)).await.unwrap();
    let mut v = vm(id, "kvm1");
    v.protected = true;
    v.protected_in = Some((3 << 32) | 12);
    v.recovery = Some(vmha_engine::cluster::Recovery::in_doubt("kvm2", Millis(7)));
    Store::set_vm_work(&mut db, &v.uuid, &VmWork::of(&v)).await.unwrap();

    let loaded = &s.load_hosts().await.unwrap()[0];
    assert_eq!(HostWork::of(loaded), HostWork::of(&h));
    let loaded_vm = &s.load_vms().await.unwrap()[0];
    assert_eq!(VmWork::of(loaded_vm), VmWork::of(&v));
    assert!(loaded_vm.fenced_by(loaded.roster_acked), "kvm1's self-fence covers the VM after a restart");
}

#[tokio::test]
async fn events_are_listed_newest_window_oldest_first_and_followable() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    let mut db = s.connection().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(Store::append_event(&mut db, &event(format!("event {i}"))).await.unwrap());
    }
    let last_two = s.list_events(0, 2).await.unwrap();
    assert_eq!(last_two.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["event 1", "event 2"]);
    let after_first = s.list_events(ids[0], 100).await.unwrap();
    assert_eq!(after_first.len(), 2);
    assert!(s.list_events(ids[2], 100).await.unwrap().is_empty());
}

#[tokio::test]
async fn outages_open_once_per_vm_end_when_it_runs_again_and_are_read_by_window() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    let mut db = s.connection().await.unwrap();
    let uuid = Uuid::new_v4().to_string();
    let t0 = chrono::Utc::now() - chrono::Duration::hours(1);
    let at = |secs: i64| t0 + chrono::Duration::seconds(secs);
    let began = |ago_ms: u64, planned: bool| OutageMark::Began {
        vm_uuid: uuid.clone(),
        vm_name: "dns1".into(),
        ago_ms,
        planned,
        cause: "kvm1 died".into(),
    };
    let ended = OutageMark::Ended { vm_uuid: uuid.clone() };
    // Down from 6 s before it was marked at 10 s; a second begin while open is nothing.
    Store::mark_outage(&mut db, &began(6_000, false), at(10)).await.unwrap();
    Store::mark_outage(&mut db, &began(0, true), at(12)).await.unwrap();
    Store::mark_outage(&mut db, &ended, at(16)).await.unwrap();
    // An end with none open is nothing; a live migration's pause is one already over.
    Store::mark_outage(&mut db, &ended, at(20)).await.unwrap();
    let pause = OutageMark::Pause {
        vm_uuid: uuid.clone(),
        vm_name: "dns1".into(),
        ms: 30,
        cause: "live migration".into(),
    };
    Store::mark_outage(&mut db, &pause, at(30)).await.unwrap();
    Store::mark_outage(&mut db, &began(0, true), at(40)).await.unwrap();
    let all = s.outages(at(0), at(100)).await.unwrap();
    let spans: Vec<(i64, Option<i64>, bool)> = all
        .iter()
        .map(|(u, o)| {
            assert_eq!(u, &uuid);
            (o.start - at(0).timestamp_millis(), o.end.map(|e| e - at(0).timestamp_millis()), o.planned)
        })
        .collect();
    assert_eq!(spans, [(4_000, Some(16_000), false), (29_970, Some(30_000), true), (40_000, None, true)]);
    // By window: only what overlaps it.
    let later = s.outages(at(25), at(35)).await.unwrap();
    assert_eq!(later.len(), 1, "{later:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_must_be_recorded_first_waits_out_an_outage_and_queued_writes_keep_their_order() {
    let pg = PgServer::private();
    let url = pg.fresh_database();
    let s = Store::open_for_tools(&url).await.unwrap();
    // A connection of its own, not kept across the outage.
    Store::upsert_host(&mut s.connection().await.unwrap(), &host("kvm1"), "7.2.0").await.unwrap();
    let journal = Arc::new(Journal::start(s.clone()));
    let id = Uuid::new_v4();
    tokio::task::block_in_place(|| pg.stop());

    let mut running = vm(id, "kvm1");
    journal.write(Write::vm(&running));
    running.state = RunState::ShutOff;
    journal.write(Write::vm(&running));
    let started = op(1, id);
    let recording = tokio::spawn(journal.record(Write::Operation { op: started.clone(), epoch: 1 }));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!recording.is_finished(), "an operation was on record, or given up, without a database");
    let why = journal.trouble().expect("the journal says why it waits");
    assert!(why.starts_with("waiting for the database") && why.contains("3 writes queued"), "{why}");
    assert!(why.contains("1 restarts or migrations held"), "{why}");

    tokio::task::block_in_place(|| pg.resume());
    tokio::time::timeout(Duration::from_secs(20), recording)
        .await
        .expect("recorded once it was back")
        .unwrap()
        .unwrap();
    assert_eq!(journal.trouble(), None);
    assert_eq!(s.get_operation(op_uuid(started.id)).await.unwrap().map(|o| o.state), Some("pending".into()));
    let state: String = sqlx::query_scalar("SELECT state FROM vms WHERE uuid = $1")
        .bind(id)
        .fetch_one(&sqlx::PgPool::connect(&url).await.unwrap())
        .await
        .unwrap();
    assert_eq!(state, "shut_off", "the later snapshot is the one kept");
}

#[tokio::test]
async fn a_reader_who_waits_for_the_journal_sees_what_was_queued_before() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    let journal = Journal::start(s.clone());
    for i in 0..20 {
        journal.write(Write::Event(event(format!("event {i}"))));
    }
    journal.caught_up().await;
    let listed = s.list_events(0, 100).await.unwrap();
    assert_eq!(listed.len(), 20);
    assert_eq!(listed[19].message, "event 19");
}

/// How many transactions wrote the events there are (each row keeps the id of the transaction
/// that wrote it): exact, where the statistics views (pg_stat_database) lag.
async fn transactions_that_wrote_events(s: &Store) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM events")
        .fetch_one(&mut *s.connection().await.unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_burst_of_writes_is_written_in_order_in_few_transactions() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    Store::upsert_host(&mut s.connection().await.unwrap(), &host("kvm1"), "7.2.0").await.unwrap();
    let journal = Journal::start(s.clone());
    // Discovery: each VM found running, its XML, an event; then a later report that it shut off.
    const VMS: usize = 2_000;
    let ids: Vec<Uuid> = (0..VMS).map(|_| Uuid::new_v4()).collect();
    let t0 = std::time::Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let mut v = vm(*id, "kvm1");
        journal.write(Write::vm(&v));
        journal.write(Write::VmXml { uuid: id.to_string(), xml: format!("<domain>{i}</domain>") });
        journal.write(Write::Event(event(format!("found {i}"))));
        v.state = RunState::ShutOff;
        journal.write(Write::vm(&v));
        journal.write(Write::Event(event(format!("shut off {i}"))));
    }
    journal.caught_up().await;
    let took = t0.elapsed();
    let writes = VMS * 5;
    println!(
        "{writes} queued writes written in {took:?}: {:.0} writes/s ({:.0} VMs/s at 3 writes each)",
        writes as f64 / took.as_secs_f64(),
        writes as f64 / 3.0 / took.as_secs_f64()
    );

    let events = s.list_events(0, (VMS * 2) as u32).await.unwrap();
    let expected: Vec<String> =
        (0..VMS).flat_map(|i| [format!("found {i}"), format!("shut off {i}")]).collect();
    assert_eq!(events.iter().map(|e| &e.message).collect::<Vec<_>>(), expected.iter().collect::<Vec<_>>());
    let vms: Vec<(Uuid, String, String)> = sqlx::query_as("SELECT uuid, state, xml FROM vms")
        .fetch_all(&mut *s.connection().await.unwrap())
        .await
        .unwrap();
    assert_eq!(vms.len(), VMS);
    let position = |u: &Uuid| ids.iter().position(|id| id == u).unwrap();
    for (uuid, state, xml) in &vms {
        assert_eq!(state, "shut_off", "the later snapshot is the one kept");
        assert_eq!(xml, &format!("<domain>{}</domain>", position(uuid)));
    }
    let transactions = transactions_that_wrote_events(&s).await;
    println!("{} events written by {transactions} transactions", events.len());
    assert!(
        transactions as usize <= writes / vmha_controller::journal::BATCH + 1,
        "{transactions} transactions for {writes} writes"
    );
}

#[tokio::test]
async fn a_refused_write_in_a_batch_is_skipped_alone() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    Store::upsert_host(&mut s.connection().await.unwrap(), &host("kvm1"), "7.2.0").await.unwrap();
    let journal = Journal::start(s.clone());
    let id = Uuid::new_v4();
    // All queued before the writer first runs (this runtime has one thread): one batch.
    for i in 0..100 {
        journal.write(Write::Event(event(format!("before {i}"))));
    }
    journal.write(Write::vm(&vm(id, "kvm1")));
    // The database refuses it (CHECK on subject_kind), in the middle of the transaction.
    let bad = NewEvent { subject_kind: "planet", ..event("refused".into()) };
    let refused = journal.record(Write::Event(bad));
    // One the controller refuses before asking the database.
    let unparsable = journal.record(Write::VmXml { uuid: "not a uuid".into(), xml: "<domain/>".into() });
    journal.write(Write::VmXml { uuid: id.to_string(), xml: "<domain/>".into() });
    for i in 0..100 {
        journal.write(Write::Event(event(format!("after {i}"))));
    }
    let refused = refused.await.expect_err("a check violation is refused");
    assert!(!refused.is_unavailable() && !refused.is_deposed(), "{refused}");
    unparsable.await.expect_err("no such UUID");
    journal.caught_up().await;

    let events = s.list_events(0, 1_000).await.unwrap();
    let expected: Vec<String> =
        (0..100).map(|i| format!("before {i}")).chain((0..100).map(|i| format!("after {i}"))).collect();
    assert_eq!(events.iter().map(|e| &e.message).collect::<Vec<_>>(), expected.iter().collect::<Vec<_>>());
    let vms = s.load_vms().await.unwrap();
    assert_eq!((vms.len(), vms[0].xml.as_str()), (1, "<domain/>"));
    assert_eq!(transactions_that_wrote_events(&s).await, 1, "the others still written together");
}

#[tokio::test]
async fn a_record_is_answered_only_once_its_transaction_has_committed() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    let journal = Journal::start(s.clone());
    // Another session holds the events table: the writer's transaction inserts the operation,
    // then waits at the event after it, and cannot commit.
    let mut lock = s.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let started = op(1, Uuid::new_v4());
    let recording = tokio::spawn(journal.record(Write::Operation { op: started.clone(), epoch: 1 }));
    journal.write(Write::Event(event("operation started".into())));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!recording.is_finished(), "answered before its transaction committed");
    assert_eq!(s.get_operation(op_uuid(started.id)).await.unwrap(), None, "not committed yet");

    lock.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), recording).await.expect("answered").unwrap().unwrap();
    let row = s.get_operation(op_uuid(started.id)).await.unwrap().expect("on record when answered");
    assert_eq!(row.state, "pending");
    assert_eq!(transactions_that_wrote_events(&s).await, 1);
}

#[tokio::test]
async fn a_commit_whose_answer_was_lost_is_looked_up_not_guessed() {
    let pg = PgServer::shared();
    let s = Store::open_for_tools(&pg.fresh_database()).await.unwrap();
    let mut done = s.begin().await.unwrap();
    let (xid, pid) = Store::transaction_id(&mut done).await.unwrap();
    Store::append_event(&mut done, &event("committed".into())).await.unwrap();
    done.commit().await.unwrap();
    assert!(s.committed(xid, pid).await.unwrap());

    // Still open, as a transaction is whose client vanished before the server noticed: its
    // session is ended, and it is then known not to have committed.
    let mut open = s.begin().await.unwrap();
    let (xid, pid) = Store::transaction_id(&mut open).await.unwrap();
    Store::append_event(&mut open, &event("never committed".into())).await.unwrap();
    let err = s.committed(xid, pid).await.expect_err("in progress");
    assert!(matches!(err, StoreError::InDoubt { .. }) && err.is_unavailable(), "{err}");
    let t0 = std::time::Instant::now();
    while s.committed(xid, pid).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(5), "its session was ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!s.committed(xid, pid).await.unwrap());
    assert!(open.commit().await.is_err(), "its connection was closed");
    assert_eq!(s.list_events(0, 10).await.unwrap().len(), 1);
}
