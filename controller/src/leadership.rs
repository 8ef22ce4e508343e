//! Leader election: which of the `vmha-controller` processes on one database may act.
//!
//! The leader is the holder of a session-level advisory lock, held on a connection of its own.
//! Why a lock and not a lease row: PostgreSQL itself releases the lock when the session ends
//! (the process died, its host lost power, the server restarted), so a standby takes over as
//! soon as the server knows, with no clock in the database to trust. What the lock alone does
//! not cover is a leader that is alive but stuck (SIGSTOP, a VM pause, a cut link): its session
//! stays open. So every session of ours runs with `idle_session_timeout`: the server ends a
//! session idle that long, and the leader, which proves it holds the lock every `CHECK`, acts
//! only until `RIGHT` after the send of its latest proof. The arithmetic, in
//! `engine/SAFETY.md` ("Leader changes"):
//!
//! - the server can end an idle leader's session no sooner than `IDLE_KILL` after the proof
//!   was sent, and `RIGHT < IDLE_KILL`: a stuck leader has stopped acting before its lock can
//!   be taken that way;
//! - a session can also end early (the server restarted, an administrator terminated it): then
//!   the old leader may act until `RIGHT` after its last proof, which was sent before the lock
//!   was released, so a new leader waits `TAKEOVER_WAIT > RIGHT` after taking the lock before
//!   it acts.
//!
//! On top, every write of the leader is fenced by its epoch in the database (migration 0009),
//! and agents refuse leases, commands and peer answers of an epoch older than the newest they
//! have seen.

use std::os::unix::process::CommandExt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection};

/// The advisory lock's key: "vmha" in ASCII. Below 2^32, so that `pg_locks` shows it as
/// classid 0, objid KEY.
pub const LOCK_KEY: i64 = 0x766d_6861;

/// How often the leader proves it still holds the lock, and a standby tries to take it.
pub const CHECK: Duration = Duration::from_millis(250);
/// How long after the send of its latest proof the leader may act.
pub const RIGHT: Duration = Duration::from_millis(1000);
/// The server ends a session of ours that has been idle this long.
pub const IDLE_KILL: Duration = Duration::from_millis(1500);
/// How long a new leader waits, after taking the lock, before it acts.
pub const TAKEOVER_WAIT: Duration = Duration::from_millis(1250);

const _: () =
    assert!(RIGHT.as_millis() < IDLE_KILL.as_millis() && RIGHT.as_millis() < TAKEOVER_WAIT.as_millis());
const _: () = assert!(CHECK.as_millis() * 2 < RIGHT.as_millis());

/// Time since boot on CLOCK_BOOTTIME. Unlike CLOCK_MONOTONIC (what `Instant` reads) it keeps
/// counting while the machine is suspended, so a leader whose machine slept past `IDLE_KILL`
/// finds its right gone when it wakes. (Nothing inside a paused VM counts the pause: see
/// SAFETY.md "Clocks that stop".)
pub fn boottime() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Until when this process may act as the leader; nothing before it won the lock.
pub struct Leadership {
    /// Milliseconds on CLOCK_BOOTTIME; 0: never.
    until_ms: AtomicU64,
}

impl Leadership {
    pub fn new() -> Arc<Leadership> {
        Arc::new(Leadership { until_ms: AtomicU64::new(0) })
    }

    /// A controller that is the only one by construction (tests of the controller alone).
    pub fn sole() -> Arc<Leadership> {
        Arc::new(Leadership { until_ms: AtomicU64::new(u64::MAX) })
    }

    /// Whether this process may act now: grant leases, declare hosts dead, start operations.
    pub fn acting(&self) -> bool {
        (boottime().as_millis() as u64) < self.until_ms.load(Ordering::SeqCst)
    }

    /// A proof sent at `sent` (on `boottime`) succeeded.
    fn proved(&self, sent: Duration) {
        let until = (sent + RIGHT).as_millis() as u64;
        self.until_ms.fetch_max(until, Ordering::SeqCst);
    }
}

/// The connection that holds (or tries to take) the lock, and the server process behind it.
pub struct LockSession {
    conn: PgConnection,
    backend: i32,
}

/// What the campaign accepts of the database's replication.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Replication {
    /// Replicas must be synchronous: a failover of PostgreSQL to an asynchronous one can lose
    /// the newest epoch (two leaders with one epoch) or a recorded restart.
    #[default]
    SynchronousOnly,
    /// `--allow-async-replication`: the operator knows no asynchronous replica is ever promoted.
    AllowAsync,
}

/// Why this database must not be led from, as its replication stands (`None`: it may be).
async fn unsafe_replication(conn: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
    let (replicas, standby_names, commit): (i64, String, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_stat_replication), current_setting('synchronous_standby_names'), \
         current_setting('synchronous_commit')",
    )
    .fetch_one(conn)
    .await?;
    Ok(asynchronous(replicas, &standby_names, &commit))
}

/// `unsafe_replication`'s verdict on what the server says.
fn asynchronous(replicas: i64, standby_names: &str, commit: &str) -> Option<String> {
    let waits = !standby_names.trim().is_empty() && !matches!(commit, "off" | "local");
    (replicas > 0 && !waits).then(|| {
        format!(
            "PostgreSQL streams to {replicas} replica(s) without waiting for them (synchronous_standby_names = \
             '{standby_names}', synchronous_commit = {commit}): a failover to one could lose the leader's epoch \
             or a recorded restart, so no controller leads. Make replication synchronous (Patroni: \
             synchronous_mode: true), or start the controllers with --allow-async-replication if no replica is \
             ever promoted"
        )
    })
}

/// Connects a session of ours: ended by the server when idle for `IDLE_KILL`.
async fn session(url: &str, name: &str) -> Result<PgConnection, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?
        .application_name(&format!("vmha-controller {name}"))
        .options([("idle_session_timeout", format!("{}ms", IDLE_KILL.as_millis()))]);
    options.connect().await
}

/// Stands by until this process takes the lock: tries every `CHECK`, reconnecting while the
/// database is away, and not while its replication is unsafe (see `Replication`).
/// `standing_by` runs at every try with why this process cannot lead, if it is not only that
/// another one does (the systemd watchdog is fed from it).
pub async fn campaign(
    url: &str,
    name: &str,
    replication: Replication,
    mut standing_by: impl FnMut(Option<&str>),
) -> LockSession {
    let mut logged = false;
    loop {
        let mut conn = match session(url, name).await {
            Ok(c) => c,
            Err(e) => {
                let why = format!("cannot reach PostgreSQL to stand for leader: {e}");
                if !logged {
                    tracing::warn!("{why}; retrying");
                    logged = true;
                }
                standing_by(Some(&why));
                tokio::time::sleep(CHECK * 2).await;
                continue;
            }
        };
        loop {
            if replication == Replication::SynchronousOnly {
                match unsafe_replication(&mut conn).await {
                    Ok(None) => {}
                    Ok(Some(why)) => {
                        if !logged {
                            tracing::error!("{why}");
                            logged = true;
                        }
                        standing_by(Some(&why));
                        tokio::time::sleep(CHECK * 4).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the database session while standing by; reconnecting");
                        break;
                    }
                }
            }
            let won: Result<(bool, i32), _> =
                sqlx::query_as("SELECT pg_try_advisory_lock($1), pg_backend_pid()")
                    .bind(LOCK_KEY)
                    .fetch_one(&mut conn)
                    .await;
            match won {
                Ok((true, backend)) => return LockSession { conn, backend },
                Ok((false, _)) => standing_by(None),
                Err(e) => {
                    tracing::warn!(error = %e, "lost the database session while standing by; reconnecting");
                    break;
                }
            }
            tokio::time::sleep(CHECK).await;
        }
    }
}

impl LockSession {
    /// Proves every `CHECK` that the lock is still held, extending `right`; deposes this
    /// process the first time it cannot.
    pub async fn hold(mut self, right: Arc<Leadership>) -> ! {
        let mut tick = tokio::time::interval(CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let sent = boottime();
            let held = tokio::time::timeout(
                RIGHT,
                sqlx::query_as::<_, (bool, i32)>(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = 0
                         AND objid = $1::bigint::oid AND objsubid = 1 AND pid = pg_backend_pid() AND granted),
                         pg_backend_pid()",
                )
                .bind(LOCK_KEY)
                .fetch_one(&mut self.conn),
            )
            .await;
            match held {
                // A transaction-mode pooler (PgBouncer's pool_mode = transaction) hands each
                // statement to whichever server process is free: a session lock means nothing
                // through it, and every controller would "win" it.
                Ok(Ok((_, backend))) if backend != self.backend => depose(&format!(
                    "the leader lock's session moved from server process {} to {backend}: a connection pooler \
                     in transaction mode sits between vmha and PostgreSQL, and session locks do not work through \
                     it; connect the controllers to PostgreSQL directly (or through session pooling)",
                    self.backend
                )),
                Ok(Ok((true, _))) => right.proved(sent),
                Ok(Ok((false, _))) => {
                    depose("the leader lock is no longer held by this controller's session")
                }
                Ok(Err(e)) => depose(&format!("lost the database session that holds the leader lock: {e}")),
                Err(_) => depose(&format!(
                    "the database did not confirm the leader lock within {} ms",
                    RIGHT.as_millis()
                )),
            }
        }
    }
}

/// Stops acting as the leader for good: this process starts over as a standby (the same
/// process id, a fresh image), so nothing it had queued (writes, commands, fence runs)
/// survives. A deposed leader is never resumed.
pub fn depose(why: &str) -> ! {
    tracing::error!("{why}; this controller stops acting and starts again as a standby");
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "vmha-controller".into());
    // The binary's own path (not /proc/self/exe), so the process keeps its name.
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let err = std::process::Command::new(exe).arg0(arg0).args(args).exec();
    // exec returns only when it failed: exit instead, and let systemd start it again.
    eprintln!("vmha-controller: cannot start again as a standby ({err}); exiting");
    std::process::exit(75);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_that_are_not_waited_for_keep_every_controller_from_leading() {
        assert_eq!(asynchronous(0, "", "on"), None, "no replica");
        assert_eq!(asynchronous(1, "\"pg2\"", "on"), None, "a synchronous one");
        assert_eq!(asynchronous(2, "ANY 1 (pg2, pg3)", "remote_apply"), None);
        let why = asynchronous(1, "", "on").expect("an asynchronous replica");
        assert!(why.contains("--allow-async-replication") && why.contains("1 replica"), "{why}");
        assert!(asynchronous(1, "pg2", "local").is_some(), "commits that do not wait for it");
        assert!(asynchronous(1, "pg2", "off").is_some());
    }

    #[test]
    fn a_proof_gives_the_right_to_act_for_right_from_its_send() {
        let l = Leadership::new();
        assert!(!l.acting(), "nothing before the lock is won");
        l.proved(boottime());
        assert!(l.acting());
        let stale = Leadership::new();
        stale.proved(boottime().saturating_sub(RIGHT * 2));
        assert!(!stale.acting(), "a proof sent more than RIGHT ago gives nothing");
        // An older proof never shortens the right.
        l.proved(Duration::ZERO);
        assert!(l.acting());
    }

    /// CLOCK_BOOTTIME counts at least what CLOCK_MONOTONIC counts (and the time suspended).
    #[test]
    fn the_right_is_measured_on_a_clock_that_counts_suspends() {
        let mut mono = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut mono) };
        let mono = Duration::new(mono.tv_sec as u64, mono.tv_nsec as u32);
        assert!(boottime() >= mono, "{:?} < {mono:?}", boottime());
    }
}
