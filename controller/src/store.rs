//! Everything the controller keeps in PostgreSQL: hosts, VMs (desired and last observed
//! state), operations and the event log. Plain queries (no compile-time checked macros), so
//! building needs no database.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::MigrateError;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, Postgres};
use sqlx::{Connection, Transaction};
use uuid::Uuid;
use vmha_engine::availability::{Outage, OutageMark};
use vmha_engine::cluster::HostResources;
use vmha_engine::operation::{Done, OpId, OpKind, OpState, Operation, Overrides, Purpose};
use vmha_engine::step::{HostWork, VmWork};
use vmha_engine::{AdminState, Death, FencingMode, HostView, Millis, RunState, VmView, Watchdog};

use crate::metrics::METRICS;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot reach PostgreSQL at {url}: {source}; check --database-url and that the server runs")]
    Connect { url: String, source: sqlx::Error },
    #[error(
        "the database schema is at migration {applied}, newer than this controller knows \
         (up to {known}); run the newer vmha-controller or restore the database"
    )]
    SchemaTooNew { applied: i64, known: i64 },
    #[error("applying the schema migrations failed: {0}")]
    Migrate(#[source] MigrateError),
    #[error("database query failed ({what}): {source}")]
    Query { what: &'static str, source: sqlx::Error },
    #[error("the database writer has stopped (the controller is shutting down)")]
    WriterStopped,
    #[error(
        "the answer to a commit was lost with its connection, and its transaction {xid} has not \
         ended yet; waiting to learn whether it committed"
    )]
    InDoubt { xid: i64 },
}

impl StoreError {
    /// Whether the database could not be reached (down, restarting, out of connections),
    /// as opposed to refusing what was asked: the former passes, so it is worth retrying.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Connect { source, .. } | StoreError::Query { source, .. } => is_unreachable(source),
            StoreError::Migrate(MigrateError::Execute(source)) => is_unreachable(source),
            // Not yet known to have been written or not: asked again after a pause.
            StoreError::InDoubt { .. } => true,
            StoreError::SchemaTooNew { .. } | StoreError::Migrate(_) | StoreError::WriterStopped => false,
        }
    }

    /// Whether the database refused the write because a newer leader has taken over (the
    /// epoch fence of migration 0009): this controller must stop at once.
    pub fn is_deposed(&self) -> bool {
        match self {
            StoreError::Query { source: sqlx::Error::Database(db), .. } => {
                db.code().is_some_and(|c| c == DEPOSED)
            }
            _ => false,
        }
    }
}

/// The SQLSTATE the epoch fence raises (migrations/0009_leadership.sql).
const DEPOSED: &str = "VH001";

fn is_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        // Class 08: connection exceptions; 57P01-03: the server is shutting down or starting
        // up; 53300: too many connections.
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// The first pause between two attempts at an unreachable database, and the longest.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);

/// Runs `attempt` until it succeeds or fails for another reason than an unreachable
/// database, pausing longer after each failure (up to 5 s); `waiting` hears of each failure
/// that is retried, and the pause that follows it.
pub async fn retry_while_unreachable<T, F>(
    mut attempt: impl FnMut() -> F,
    mut waiting: impl FnMut(&StoreError, Duration),
) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, StoreError>>,
{
    let mut pause = FIRST_RETRY;
    loop {
        match attempt().await {
            Err(e) if e.is_unavailable() => {
                waiting(&e, pause);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LAST_RETRY);
            }
            done => return done,
        }
    }
}

/// A failed query, counted in `vmha_database_errors_total`.
pub(crate) fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| {
        let e = StoreError::Query { what, source };
        METRICS.database_error(&e);
        e
    }
}

fn encode(what: &'static str) -> impl FnOnce(serde_json::Error) -> StoreError {
    move |e| StoreError::Query { what, source: sqlx::Error::Encode(Box::new(e)) }
}

fn decode(what: &'static str) -> impl FnOnce(serde_json::Error) -> StoreError {
    move |e| StoreError::Query { what, source: sqlx::Error::Decode(Box::new(e)) }
}

/// An operation's id as the database stores it.
pub fn op_uuid(id: OpId) -> Uuid {
    Uuid::from_u128(id.0)
}

/// A row of `operations`.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct OperationRow {
    pub id: Uuid,
    pub kind: String,
    pub vm_uuid: Uuid,
    pub vm_name: String,
    pub source: String,
    pub target: String,
    pub state: String,
    pub epoch: i64,
    pub data_total: i64,
    pub data_processed: i64,
    pub data_remaining: i64,
    pub elapsed_ms: i64,
    pub downtime_ms: i64,
    pub bytes: i64,
    pub error: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A row of `controllers`.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct ControllerRow {
    pub name: String,
    pub endpoint: String,
    pub epoch: Option<i64>,
    pub seen_ms_ago: i64,
}

/// A row of `events`.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub at: chrono::DateTime<chrono::Utc>,
    pub subject_kind: String,
    pub subject: String,
    pub kind: String,
    pub message: String,
    pub actor: String,
}

/// An event to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub subject_kind: &'static str,
    pub subject: String,
    pub kind: &'static str,
    pub message: String,
    pub actor: String,
}

/// How an operation ended, as the agent reported it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperationOutcome {
    pub state: &'static str,
    pub error: String,
    pub elapsed_ms: u64,
    pub downtime_ms: u64,
    pub bytes: u64,
}

/// The database. Reads are its methods; writes (`upsert_host` to `append_event`) take the
/// connection they write on instead, so that the journal can put hundreds of them in one
/// transaction (`begin`), and anyone else can write one on a `connection`.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Brings the schema up to date (refusing one newer than this build) and connects for
    /// what every controller does without leading: reads, its presence, taking an epoch. These
    /// sessions write for no epoch (`vmha.epoch = 'none'`), so the database refuses their
    /// writes to the cluster's tables (migrations/0020).
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Store::open_for_tools(url).await?;
        Store::connect(url, Some("none".into()), 8).await
    }

    /// The leader's connections: each says which epoch it writes for, and the database
    /// refuses its writes to the cluster's tables once a newer leader has taken over.
    pub async fn open_for_epoch(url: &str, epoch: u64) -> Result<Store, StoreError> {
        Store::connect(url, Some(epoch.to_string()), 8).await
    }

    /// Sessions that name no epoch, which the fence does not check: the migrations, and an
    /// administrator's tools and tests. Never a controller's way to write.
    pub async fn open_for_tools(url: &str) -> Result<Store, StoreError> {
        let store = Store::connect(url, None, 8).await?;
        store.migrate().await?;
        Ok(store)
    }

    async fn connect(url: &str, epoch: Option<String>, connections: u32) -> Result<Store, StoreError> {
        let connect = |source| {
            let e = StoreError::Connect { url: redact(url), source };
            METRICS.database_error(&e);
            e
        };
        let mut options = PgConnectOptions::from_str(url).map_err(connect)?;
        if let Some(epoch) = epoch {
            options = options.options([("vmha.epoch", epoch)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            // Also how long a query waits for an unreachable database before its caller hears
            // of it (the pool retries connecting meanwhile).
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await
            .map_err(connect)?;
        Ok(Store { pool })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        match MIGRATOR.run(&self.pool).await {
            Ok(()) => Ok(()),
            Err(MigrateError::VersionMissing(_)) => {
                let applied: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(q("read schema version"))?;
                Err(StoreError::SchemaTooNew { applied, known })
            }
            Err(e) => Err(StoreError::Migrate(e)),
        }
    }

    /// A connection of the pool, for a write on its own (it commits by itself).
    pub async fn connection(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        self.pool.acquire().await.map_err(q("connect"))
    }

    /// A transaction for several writes: all of them are on record once it commits, none if it
    /// does not (dropped, it rolls back).
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(q("begin a transaction"))
    }

    /// The transaction `db` is in, and the server process that runs it (see `committed`).
    pub async fn transaction_id(db: &mut PgConnection) -> Result<(i64, i32), StoreError> {
        sqlx::query_as("SELECT txid_current(), pg_backend_pid()")
            .fetch_one(&mut *db)
            .await
            .map_err(q("read the transaction id"))
    }

    /// Whether transaction `xid` (from `transaction_id`) committed, for a commit whose answer
    /// was lost with its connection. One still in progress is ended first (its server process
    /// `pid` may not have noticed that its client is gone, and would wait for it for as long as
    /// TCP keepalives allow): `InDoubt` until it has.
    pub async fn committed(&self, xid: i64, pid: i32) -> Result<bool, StoreError> {
        let status: Option<String> = sqlx::query_scalar("SELECT txid_status($1)")
            .bind(xid)
            .fetch_one(&self.pool)
            .await
            .map_err(q("ask whether a transaction committed"))?;
        match status.as_deref() {
            Some("committed") => Ok(true),
            Some("in progress") => {
                // The same role may end its own sessions; if it may not, waiting still ends.
                if let Err(e) =
                    sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&self.pool).await
                {
                    tracing::warn!(error = %e, pid, "could not end the session of a lost commit");
                }
                Err(StoreError::InDoubt { xid })
            }
            // NULL: so old that its status is gone, which takes billions of transactions.
            _ => Ok(false),
        }
    }

    /// Says that controller `name` is alive, reachable at `endpoint`, and leads with `epoch`
    /// (`None`: stands by).
    pub async fn controller_seen(
        &self,
        name: &str,
        endpoint: &str,
        epoch: Option<u64>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO controllers (name, endpoint, epoch, led_until)
                 VALUES ($1, $2, $3, CASE WHEN $3 IS NOT NULL THEN now() END)
             ON CONFLICT (name) DO UPDATE SET endpoint = $2, epoch = $3, seen_at = now(),
                 led_until = CASE WHEN $3 IS NOT NULL THEN now() ELSE controllers.led_until END",
        )
        .bind(name)
        .bind(endpoint)
        .bind(epoch.map(|e| e as i64))
        .execute(&self.pool)
        .await
        .map_err(q("record this controller"))?;
        Ok(())
    }

    /// How long ago any controller last said it was alive while leading; `None` if none ever
    /// led. Read by a new leader before it leads: what an earlier leader could have watched.
    pub async fn last_led_ms_ago(&self) -> Result<Option<u64>, StoreError> {
        let ago: Option<i64> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM now() - max(led_until)) * 1000)::bigint FROM controllers",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(q("read when a controller last led"))?;
        Ok(ago.map(|ms| ms.max(0) as u64))
    }

    /// Every controller seen in the last `within`, and the newest epoch: the one that leads
    /// with it is the leader.
    pub async fn controllers(&self, within: Duration) -> Result<(Vec<ControllerRow>, u64), StoreError> {
        let rows = sqlx::query_as::<_, ControllerRow>(
            "SELECT name, endpoint, epoch, (extract(epoch FROM now() - seen_at) * 1000)::bigint AS seen_ms_ago
             FROM controllers WHERE seen_at > now() - $1 * interval '1 millisecond' ORDER BY name",
        )
        .bind(within.as_millis() as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list the controllers"))?;
        let newest: i64 = sqlx::query_scalar("SELECT epoch FROM cluster")
            .fetch_one(&self.pool)
            .await
            .map_err(q("read the epoch"))?;
        Ok((rows, newest as u64))
    }

    /// Takes the next leader epoch (strictly greater than any before it).
    pub async fn next_epoch(&self) -> Result<u64, StoreError> {
        let e: i64 = sqlx::query_scalar("UPDATE cluster SET epoch = epoch + 1 RETURNING epoch")
            .fetch_one(&self.pool)
            .await
            .map_err(q("take epoch"))?;
        Ok(e as u64)
    }

    pub async fn upsert_host(
        db: &mut PgConnection,
        h: &HostView,
        hypervisor_version: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO hosts (name, migration_uri, cpus, memory_total_kib, cpu_model, libvirt_version,
                 hypervisor_version, peer_address)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (name) DO UPDATE SET migration_uri = $2, cpus = $3, memory_total_kib = $4,
                 cpu_model = $5, libvirt_version = $6, hypervisor_version = $7, peer_address = $8",
        )
        .bind(&h.name)
        .bind(&h.migration_uri)
        .bind(h.resources.cpus as i32)
        .bind(h.resources.memory_total_kib as i64)
        .bind(&h.resources.cpu_model)
        .bind(&h.libvirt_version)
        .bind(hypervisor_version)
        .bind(&h.peer_address)
        .execute(&mut *db)
        .await
        .map_err(q("upsert host"))?;
        Ok(())
    }

    /// Writes a host's operator-set state and its work in progress (see `HostWork`).
    pub async fn set_host_work(db: &mut PgConnection, host: &str, w: &HostWork) -> Result<(), StoreError> {
        let drain = w.drain.as_ref().map(serde_json::to_string).transpose().map_err(encode("host drain"))?;
        sqlx::query(
            "UPDATE hosts SET admin_state = $2, memory_limit_kib = $3, fencing = $4, dead_cause = $5, drain = $6,
                 roster_acked = $7, members_acked = $8
             WHERE name = $1",
        )
        .bind(host)
        .bind(w.admin.as_str())
        .bind(w.memory_limit_kib.map(|m| m as i64))
        .bind(w.fencing.as_str())
        .bind(&w.dead)
        .bind(drain)
        .bind(w.roster_acked.map(|v| v as i64))
        // A fingerprint: any u64, kept bit for bit in a bigint.
        .bind(w.members_acked.map(|v| v as i64))
        .execute(&mut *db)
        .await
        .map_err(q("set host work"))?;
        Ok(())
    }

    pub async fn set_watchdog(db: &mut PgConnection, host: &str, w: &Watchdog) -> Result<(), StoreError> {
        let (detail, timeout_ms) = match w {
            Watchdog::Armed { device, timeout_ms } => (device.as_str(), *timeout_ms as i64),
            Watchdog::Missing(why) => (why.as_str(), 0),
            Watchdog::Unknown => ("", 0),
        };
        sqlx::query(
            "UPDATE hosts SET watchdog = $2, watchdog_detail = $3, watchdog_timeout_ms = $4 WHERE name = $1",
        )
        .bind(host)
        .bind(w.as_str())
        .bind(detail)
        .bind(timeout_ms)
        .execute(&mut *db)
        .await
        .map_err(q("set watchdog"))?;
        Ok(())
    }

    pub async fn load_hosts(&self) -> Result<Vec<HostView>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            name: String,
            migration_uri: String,
            admin_state: String,
            cpus: i32,
            memory_total_kib: i64,
            cpu_model: String,
            libvirt_version: String,
            fencing: String,
            peer_address: String,
            memory_limit_kib: Option<i64>,
            watchdog: String,
            watchdog_detail: String,
            watchdog_timeout_ms: i64,
            dead_cause: Option<String>,
            drain: Option<String>,
            roster_acked: Option<i64>,
            members_acked: Option<i64>,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT name, migration_uri, admin_state, cpus, memory_total_kib, cpu_model, libvirt_version,
                 fencing, peer_address, memory_limit_kib, watchdog, watchdog_detail, watchdog_timeout_ms,
                 dead_cause, drain, roster_acked, members_acked
             FROM hosts ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("load hosts"))?;
        rows.into_iter()
            .map(|r| {
                let mut h = HostView::new(&r.name);
                // A restarted controller's clock starts again: the death is dated to its start.
                h.dead = r.dead_cause.map(|cause| Death { at: Millis(0), cause });
                h.drain =
                    r.drain.as_deref().map(serde_json::from_str).transpose().map_err(decode("host drain"))?;
                h.admin = AdminState::parse(&r.admin_state).unwrap_or(AdminState::Active);
                h.migration_uri = r.migration_uri;
                h.peer_address = r.peer_address;
                h.fencing = FencingMode::parse(&r.fencing).unwrap_or(FencingMode::SelfFence);
                h.resources = HostResources {
                    cpus: r.cpus as u32,
                    memory_total_kib: r.memory_total_kib as u64,
                    memory_free_kib: 0,
                    cpu_model: r.cpu_model,
                };
                h.libvirt_version = r.libvirt_version;
                h.memory_limit_kib = r.memory_limit_kib.map(|m| m as u64);
                h.roster_acked = r.roster_acked.map(|v| v as u64);
                h.lease.acked_members = r.members_acked.map(|v| (Millis(0), v as u64));
                h.watchdog = match r.watchdog.as_str() {
                    "armed" => Watchdog::Armed {
                        device: r.watchdog_detail,
                        timeout_ms: r.watchdog_timeout_ms as u64,
                    },
                    "missing" => Watchdog::Missing(r.watchdog_detail),
                    _ => Watchdog::Unknown,
                };
                Ok(h)
            })
            .collect()
    }

    /// Each VM's state as the leader last recorded it, by UUID (a standby shows it; a new
    /// leader starts from `Unknown` instead and waits for reports).
    pub async fn recorded_vm_states(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT uuid, state FROM vms")
            .fetch_all(&self.pool)
            .await
            .map_err(q("read the recorded vm states"))?;
        Ok(rows.into_iter().map(|(u, s)| (u.to_string(), s)).collect())
    }

    pub async fn load_vms(&self) -> Result<Vec<VmView>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            uuid: Uuid,
            name: String,
            memory_kib: i64,
            vcpus: i32,
            protected: bool,
            priority: i32,
            current_host: Option<String>,
            anti_affinity: Option<String>,
            allowed_hosts: Vec<String>,
            xml: String,
            preferred_host: Option<String>,
            recovery: Option<String>,
            admission_override: Option<String>,
            stopped_by: Option<String>,
            state: String,
            protected_in: Option<i64>,
            guest_care: Option<String>,
            probes: Option<String>,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT uuid, name, memory_kib, vcpus, protected, priority, current_host, anti_affinity,
                 allowed_hosts, xml, preferred_host, recovery, admission_override, stopped_by, state,
                 protected_in, guest_care, probes
             FROM vms ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("load vms"))?;
        rows.into_iter()
            .map(|r| {
                let mut vm = VmView::new(&r.uuid.to_string(), &r.name);
                vm.recovery = r
                    .recovery
                    .as_deref()
                    .map(serde_json::from_str)
                    .transpose()
                    .map_err(decode("vm recovery"))?;
                vm.guest_care = r
                    .guest_care
                    .as_deref()
                    .map(serde_json::from_str)
                    .transpose()
                    .map_err(decode("vm guest care"))?
                    .unwrap_or_default();
                vm.probes = r
                    .probes
                    .as_deref()
                    .map(serde_json::from_str)
                    .transpose()
                    .map_err(decode("vm probes"))?
                    .unwrap_or_default();
                // Observed state is rebuilt from reports; until then nobody knows. What was last
                // recorded tells whether a VM stopped meanwhile (`persist::loaded_vm`).
                vm.state = RunState::Unknown;
                vm.recorded_running = RunState::parse(&r.state).is_some_and(|s| s.has_process());
                vm.host = r.current_host;
                vm.memory_kib = r.memory_kib as u64;
                vm.vcpus = r.vcpus as u32;
                vm.protected = r.protected;
                vm.priority = r.priority;
                vm.anti_affinity = r.anti_affinity;
                vm.allowed_hosts = r.allowed_hosts;
                vm.xml = r.xml;
                vm.preferred_host = r.preferred_host;
                vm.admission_override = r.admission_override;
                vm.stopped_by = r.stopped_by;
                vm.protected_in = r.protected_in.map(|v| v as u64);
                Ok(vm)
            })
            .collect()
    }

    /// Writes a VM's observed state and sizes (not its desired state: see `set_protection`).
    pub async fn upsert_vm(db: &mut PgConnection, vm: &VmView) -> Result<(), StoreError> {
        let uuid = Uuid::parse_str(&vm.uuid)
            .map_err(|e| StoreError::Query { what: "upsert vm", source: sqlx::Error::Decode(Box::new(e)) })?;
        sqlx::query(
            "INSERT INTO vms (uuid, name, memory_kib, vcpus, current_host, state)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (uuid) DO UPDATE SET name = $2, memory_kib = $3, vcpus = $4,
                 current_host = $5, updated_at = now(),
                 -- Unknown (a new leader before the first report) keeps the last state a report
                 -- showed: the next leader needs it to tell a VM that stopped meanwhile.
                 state = CASE WHEN $6 = 'unknown' THEN vms.state ELSE $6 END",
        )
        .bind(uuid)
        .bind(&vm.name)
        .bind(vm.memory_kib as i64)
        .bind(vm.vcpus as i32)
        .bind(&vm.host)
        .bind(vm.state.as_str())
        .execute(&mut *db)
        .await
        .map_err(q("upsert vm"))?;
        Ok(())
    }

    /// Writes a VM's desired state (protection, priority, placement rules) and its restart in
    /// progress.
    pub async fn set_vm_work(db: &mut PgConnection, uuid: &str, w: &VmWork) -> Result<(), StoreError> {
        let recovery =
            w.recovery.as_ref().map(serde_json::to_string).transpose().map_err(encode("vm recovery"))?;
        let guest_care = (!w.guest_care.is_default())
            .then(|| serde_json::to_string(&w.guest_care))
            .transpose()
            .map_err(encode("vm guest care"))?;
        let probes = (!w.probes.is_empty())
            .then(|| serde_json::to_string(&w.probes))
            .transpose()
            .map_err(encode("vm probes"))?;
        sqlx::query(
            "UPDATE vms SET protected = $2, priority = $3, anti_affinity = $4, allowed_hosts = $5,
                 preferred_host = $6, recovery = $7, admission_override = $8, stopped_by = $9,
                 protected_in = $10, guest_care = $11, probes = $12, updated_at = now(),
                 -- The old row's protected: set when protection begins, kept while it lasts.
                 protected_at = CASE WHEN NOT $2 THEN NULL
                                     WHEN NOT vms.protected THEN now()
                                     ELSE vms.protected_at END
             WHERE uuid = $1",
        )
        .bind(parse_uuid(uuid)?)
        .bind(w.protected)
        .bind(w.priority)
        .bind(&w.anti_affinity)
        .bind(&w.allowed_hosts)
        .bind(&w.preferred_host)
        .bind(recovery)
        .bind(&w.admission_override)
        .bind(&w.stopped_by)
        .bind(w.protected_in.map(|v| v as i64))
        .bind(guest_care)
        .bind(probes)
        .execute(&mut *db)
        .await
        .map_err(q("set vm work"))?;
        Ok(())
    }

    pub async fn delete_vm(db: &mut PgConnection, uuid: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM vms WHERE uuid = $1")
            .bind(parse_uuid(uuid)?)
            .execute(&mut *db)
            .await
            .map_err(q("delete vm"))?;
        Ok(())
    }

    /// Forgets a removed host. A VM row that still names it (written before the VM moved, in
    /// a queue that is behind) keeps no dangling reference. Both statements or neither: inside
    /// the journal's transaction this is a savepoint, on its own a transaction.
    pub async fn delete_host(db: &mut PgConnection, name: &str) -> Result<(), StoreError> {
        let mut tx = db.begin().await.map_err(q("delete host"))?;
        sqlx::query("UPDATE vms SET current_host = NULL WHERE current_host = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(q("delete host"))?;
        sqlx::query("DELETE FROM hosts WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(q("delete host"))?;
        // With the host gone, so are the certificates issued to it so far (see `removed_hosts`).
        sqlx::query(
            "INSERT INTO removed_hosts (name, removed_at) VALUES ($1, now()) \
             ON CONFLICT (name) DO UPDATE SET removed_at = now()",
        )
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(q("delete host"))?;
        tx.commit().await.map_err(q("delete host"))?;
        Ok(())
    }

    pub async fn set_vm_xml(db: &mut PgConnection, uuid: &str, xml: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE vms SET xml = $2 WHERE uuid = $1")
            .bind(parse_uuid(uuid)?)
            .bind(xml)
            .execute(&mut *db)
            .await
            .map_err(q("store domain XML"))?;
        Ok(())
    }

    /// Writes a new operation down, before its command is sent.
    pub async fn insert_operation(
        db: &mut PgConnection,
        op: &Operation,
        epoch: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO operations (id, kind, vm_uuid, vm_name, source, target, state, epoch, purpose, actor,
                 bandwidth_mib_s, timeout_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(op_uuid(op.id))
        .bind(op.kind.as_str())
        .bind(parse_uuid(&op.vm_uuid)?)
        .bind(&op.vm_name)
        .bind(&op.source)
        .bind(&op.target)
        .bind(op.state.as_str())
        .bind(epoch as i64)
        .bind(op.purpose.as_str())
        .bind(&op.actor)
        .bind(op.overrides.map(|o| o.bandwidth_mib_s as i64))
        .bind(op.overrides.map(|o| o.timeout_ms as i64))
        .execute(&mut *db)
        .await
        .map_err(q("insert operation"))?;
        Ok(())
    }

    pub async fn set_operation_running(db: &mut PgConnection, id: Uuid) -> Result<(), StoreError> {
        sqlx::query("UPDATE operations SET state = 'running' WHERE id = $1 AND state = 'pending'")
            .bind(id)
            .execute(&mut *db)
            .await
            .map_err(q("mark operation running"))?;
        Ok(())
    }

    pub async fn set_operation_progress(
        db: &mut PgConnection,
        id: Uuid,
        total: u64,
        processed: u64,
        remaining: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE operations SET data_total = $2, data_processed = $3, data_remaining = $4
             WHERE id = $1 AND state = 'running'",
        )
        .bind(id)
        .bind(total as i64)
        .bind(processed as i64)
        .bind(remaining as i64)
        .execute(&mut *db)
        .await
        .map_err(q("record progress"))?;
        Ok(())
    }

    pub async fn finish_operation(
        db: &mut PgConnection,
        id: Uuid,
        o: &OperationOutcome,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE operations SET state = $2, error = $3, elapsed_ms = $4, downtime_ms = $5,
                 bytes = $6, finished_at = now()
             WHERE id = $1",
        )
        .bind(id)
        .bind(o.state)
        .bind(&o.error)
        .bind(o.elapsed_ms as i64)
        .bind(o.downtime_ms as i64)
        .bind(o.bytes as i64)
        .execute(&mut *db)
        .await
        .map_err(q("finish operation"))?;
        Ok(())
    }

    pub async fn get_operation(&self, id: Uuid) -> Result<Option<OperationRow>, StoreError> {
        sqlx::query_as("SELECT * FROM operations WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get operation"))
    }

    /// Operations an earlier controller left pending or running: the new one follows them to
    /// their end (from their agents' results and reports) and never sends them again.
    pub async fn unfinished_operations(&self) -> Result<Vec<Operation>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            id: Uuid,
            kind: String,
            vm_uuid: Uuid,
            vm_name: String,
            source: String,
            target: String,
            purpose: String,
            actor: String,
            bandwidth_mib_s: Option<i64>,
            timeout_ms: Option<i64>,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, kind, vm_uuid, vm_name, source, target, purpose, actor, bandwidth_mib_s, timeout_ms
             FROM operations WHERE state IN ('pending', 'running') ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("load unfinished operations"))?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                Some(Operation {
                    id: OpId(r.id.as_u128()),
                    kind: OpKind::parse(&r.kind)?,
                    purpose: Purpose::parse(&r.purpose).unwrap_or(Purpose::Operator),
                    vm_uuid: r.vm_uuid.to_string(),
                    vm_name: r.vm_name,
                    source: r.source,
                    target: r.target,
                    actor: r.actor,
                    state: OpState::Running,
                    error: String::new(),
                    deadline: Millis(0),
                    overrides: match (r.bandwidth_mib_s, r.timeout_ms) {
                        (Some(b), Some(t)) => {
                            Some(Overrides { bandwidth_mib_s: b as u64, timeout_ms: t as u64 })
                        }
                        _ => None,
                    },
                    inherited: true,
                    done: Done::default(),
                    cancelled_by: None,
                })
            })
            .collect())
    }

    pub async fn append_event(db: &mut PgConnection, e: &NewEvent) -> Result<i64, StoreError> {
        sqlx::query_scalar(
            "INSERT INTO events (subject_kind, subject, kind, message, actor) VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(e.subject_kind)
        .bind(&e.subject)
        .bind(e.kind)
        .bind(&e.message)
        .bind(&e.actor)
        .fetch_one(&mut *db)
        .await
        .map_err(q("append event"))
    }

    /// Keeps an outage mark: a new outage unless one is open, the end of the open one, or a
    /// pause over already.
    pub async fn mark_outage(
        db: &mut PgConnection,
        mark: &OutageMark,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StoreError> {
        let since = |ms: u64| at - chrono::Duration::milliseconds(ms as i64);
        let query = match mark {
            OutageMark::Began { vm_uuid, vm_name, ago_ms, planned, cause } => sqlx::query(
                "INSERT INTO outages (vm_uuid, vm_name, started_at, planned, cause) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (vm_uuid) WHERE ended_at IS NULL DO NOTHING",
            )
            .bind(parse_uuid(vm_uuid)?)
            .bind(vm_name)
            .bind(since(*ago_ms))
            .bind(planned)
            .bind(cause),
            OutageMark::Ended { vm_uuid } => {
                sqlx::query("UPDATE outages SET ended_at = $2 WHERE vm_uuid = $1 AND ended_at IS NULL")
                    .bind(parse_uuid(vm_uuid)?)
                    .bind(at)
            }
            OutageMark::Pause { vm_uuid, vm_name, ms, cause } => sqlx::query(
                "INSERT INTO outages (vm_uuid, vm_name, started_at, ended_at, planned, cause)
                 VALUES ($1, $2, $3, $4, true, $5)",
            )
            .bind(parse_uuid(vm_uuid)?)
            .bind(vm_name)
            .bind(since(*ms))
            .bind(at)
            .bind(cause),
        };
        query.execute(&mut *db).await.map_err(q("mark an outage"))?;
        Ok(())
    }

    /// The outages that overlap `[from, to)`, as unix milliseconds, by VM UUID.
    pub async fn outages(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<(String, Outage)>, StoreError> {
        type Time = chrono::DateTime<chrono::Utc>;
        let rows: Vec<(Uuid, Time, Option<Time>, bool)> = sqlx::query_as(
            "SELECT vm_uuid, started_at, ended_at, planned FROM outages
                 WHERE started_at < $2 AND (ended_at IS NULL OR ended_at > $1) ORDER BY started_at",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(q("read the outages"))?;
        Ok(rows
            .into_iter()
            .map(|(u, s, e, planned)| {
                let outage =
                    Outage { start: s.timestamp_millis(), end: e.map(|e| e.timestamp_millis()), planned };
                (u.to_string(), outage)
            })
            .collect())
    }

    /// When each protected VM was protected (in ms since the epoch), for those protected
    /// since the schema recorded it.
    pub async fn protected_at(&self) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        let rows: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> =
            sqlx::query_as("SELECT uuid, protected_at FROM vms WHERE protected AND protected_at IS NOT NULL")
                .fetch_all(&self.pool)
                .await
                .map_err(q("read when VMs were protected"))?;
        Ok(rows.into_iter().map(|(u, at)| (u.to_string(), at.timestamp_millis())).collect())
    }

    /// Keeps `der` as the cluster's CRL unless one with a number as high is on record.
    pub async fn set_crl(db: &mut PgConnection, number: u64, der: &[u8], by: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO crl (number, der, published_by) VALUES ($1, $2, $3) ON CONFLICT (singleton) \
             DO UPDATE SET number = EXCLUDED.number, der = EXCLUDED.der, published_at = now(), \
             published_by = EXCLUDED.published_by WHERE crl.number < EXCLUDED.number",
        )
        .bind(number as i64)
        .bind(der)
        .bind(by)
        .execute(db)
        .await
        .map_err(q("record the CRL"))?;
        Ok(())
    }

    /// The CRL on record, if its number is above `known`.
    pub async fn crl_above(&self, known: u64) -> Result<Option<Vec<u8>>, StoreError> {
        sqlx::query_scalar("SELECT der FROM crl WHERE number > $1")
            .bind(known as i64)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("read the CRL"))
    }

    /// When each removed host was removed (seconds since the Unix epoch).
    pub async fn removed_hosts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows: Vec<(String, chrono::DateTime<chrono::Utc>)> =
            sqlx::query_as("SELECT name, removed_at FROM removed_hosts")
                .fetch_all(&self.pool)
                .await
                .map_err(q("read the removed hosts"))?;
        Ok(rows.into_iter().map(|(n, at)| (n, at.timestamp())).collect())
    }

    /// The newest `limit` events after `after_id`, oldest first.
    pub async fn list_events(&self, after_id: i64, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        sqlx::query_as(
            "SELECT * FROM (SELECT * FROM events WHERE id > $1 ORDER BY id DESC LIMIT $2) e ORDER BY id",
        )
        .bind(after_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list events"))
    }
}

fn parse_uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s)
        .map_err(|e| StoreError::Query { what: "parse VM UUID", source: sqlx::Error::Decode(Box::new(e)) })
}

/// Keeps passwords out of logs and error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(super::redact("postgres://vmha:s3cret@db:5432/vmha"), "postgres://vmha:***@db:5432/vmha");
        assert_eq!(super::redact("postgres://postgres@127.0.0.1/vmha"), "postgres://postgres@127.0.0.1/vmha");
    }
}
