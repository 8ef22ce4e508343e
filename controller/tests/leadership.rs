//! Leader election and epoch fencing against a real PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use support::PgServer;
use vmha_controller::leadership::{self, IDLE_KILL, Replication};
use vmha_controller::store::Store;
use vmha_engine::HostView;
use vmha_engine::availability::OutageMark;

#[tokio::test]
async fn a_deposed_leaders_writes_are_refused_by_the_database() {
    let pg = PgServer::shared();
    let url = pg.fresh_database();
    let base = Store::open(&url).await.unwrap();
    let e1 = base.next_epoch().await.unwrap();
    let old = Store::open_for_epoch(&url, e1).await.unwrap();
    Store::upsert_host(&mut old.connection().await.unwrap(), &HostView::new("kvm1"), "sim")
        .await
        .expect("the leader of the newest epoch writes");

    let e2 = base.next_epoch().await.unwrap();
    let refused = Store::upsert_host(&mut old.connection().await.unwrap(), &HostView::new("kvm2"), "sim")
        .await
        .expect_err("a deposed leader's write");
    assert!(refused.is_deposed(), "{refused}");
    assert!(refused.to_string().contains(&format!("epoch {e1} is deposed")), "{refused}");
    assert!(!refused.is_unavailable(), "not retried as if the database were away");
    // Nor may it record an outage, or empty a table.
    let mark = OutageMark::Began {
        vm_uuid: "0d6b3f2e-1c1e-4f7e-9a55-2b8a1f6c0d01".into(),
        vm_name: "dns1".into(),
        ago_ms: 0,
        planned: false,
        cause: "kvm1 died".into(),
    };
    let refused = Store::mark_outage(&mut old.connection().await.unwrap(), &mark, chrono::Utc::now())
        .await
        .expect_err("a deposed leader's outage");
    assert!(refused.is_deposed(), "{refused}");
    for (table, truncate) in [
        ("hosts", "TRUNCATE hosts CASCADE"),
        ("vms", "TRUNCATE vms CASCADE"),
        ("events", "TRUNCATE events CASCADE"),
        ("outages", "TRUNCATE outages CASCADE"),
    ] {
        let refused = sqlx::query(truncate)
            .execute(&mut *old.connection().await.unwrap())
            .await
            .expect_err("a deposed leader's TRUNCATE");
        assert!(refused.to_string().contains(&format!("epoch {e1} is deposed")), "{table}: {refused}");
    }

    let new = Store::open_for_epoch(&url, e2).await.unwrap();
    Store::upsert_host(&mut new.connection().await.unwrap(), &HostView::new("kvm2"), "sim")
        .await
        .expect("the new leader writes");
    let names: Vec<String> = new.load_hosts().await.unwrap().into_iter().map(|h| h.name).collect();
    assert_eq!(names, ["kvm1", "kvm2"]);
    // A controller's sessions that write for no epoch (a standby's) are refused too, saying why.
    let refused = Store::upsert_host(&mut base.connection().await.unwrap(), &HostView::new("kvm3"), "sim")
        .await
        .expect_err("a write for no epoch");
    assert!(refused.to_string().contains("writes for no epoch"), "{refused}");
    // Sessions that name nothing (tools, migrations) are not fenced.
    let tools = Store::open_for_tools(&url).await.unwrap();
    Store::upsert_host(&mut tools.connection().await.unwrap(), &HostView::new("kvm3"), "sim").await.unwrap();
}

#[tokio::test]
async fn one_controller_leads_and_a_standby_takes_over_when_its_session_ends() {
    let pg = PgServer::shared();
    let url = pg.fresh_database();
    Store::open(&url).await.unwrap();
    let first = leadership::campaign(&url, "ctl1", Replication::SynchronousOnly, |_| {}).await;
    let standby = tokio::spawn({
        let url = url.clone();
        async move { leadership::campaign(&url, "ctl2", Replication::SynchronousOnly, |_| {}).await }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!standby.is_finished(), "the lock is held: the standby waits");
    // The leader's process dies: its connection closes, and PostgreSQL releases the lock.
    let t0 = Instant::now();
    drop(first);
    tokio::time::timeout(Duration::from_secs(2), standby).await.expect("the standby wins").unwrap();
    println!("the standby took the lock {:?} after the leader's session ended", t0.elapsed());
}

#[tokio::test]
async fn a_frozen_leader_loses_the_lock_once_its_session_has_been_idle() {
    let pg = PgServer::shared();
    let url = pg.fresh_database();
    Store::open(&url).await.unwrap();
    // Taken, and then never used again: a leader frozen right after it won.
    let _frozen = leadership::campaign(&url, "ctl1", Replication::SynchronousOnly, |_| {}).await;
    let t0 = Instant::now();
    let url2 = url.clone();
    let standby = tokio::spawn(async move {
        leadership::campaign(&url2, "ctl2", Replication::SynchronousOnly, |_| {}).await
    });
    tokio::time::timeout(IDLE_KILL + Duration::from_secs(2), standby)
        .await
        .expect("PostgreSQL ends the idle session and the standby wins")
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took >= IDLE_KILL - Duration::from_millis(100),
        "not before the session was idle for IDLE_KILL ({took:?})"
    );
}
