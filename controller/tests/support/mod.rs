//! A real PostgreSQL for tests: initdb into a temp dir, run as user `postgres` when the tests
//! run as root (PostgreSQL refuses root), on a free loopback port; stopped and removed when the
//! last test using it drops its handle.

#![allow(dead_code)] // each test file uses part of this

pub mod pki;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    versions.pop().expect("an initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

impl PgServer {
    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out =
            cmd.args(args).current_dir(&self.dir).output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start() -> PgServer {
        // A fresh, randomly named directory: a name made of the process id can be one a crashed
        // earlier run left behind (ids are reused), and initdb refuses a directory in use.
        // Removed by `Drop`.
        let dir =
            tempfile::Builder::new().prefix("vmha-test-pg-").tempdir().expect("a temporary directory").keep();
        let as_postgres = is_root();
        if as_postgres {
            let ok = Command::new("chown").args(["postgres:postgres"]).arg(&dir).status().unwrap().success();
            assert!(ok, "chown {dir:?} to postgres");
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let server = PgServer { dir, bin: pg_bin(), port, as_postgres };
        let data = server.data();
        server.run("initdb", &["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"]);
        server.resume();
        server
    }

    fn data(&self) -> String {
        self.dir.join("data").to_str().unwrap().to_string()
    }

    /// Stops the server as an operator would (`pg_ctl stop -m fast`: sessions are ended).
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    /// Starts the server again on the same port and data, and waits until it takes sessions.
    pub fn resume(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        self.run("pg_ctl", &["-D", &self.data(), "-o", &opts, "-l", log.to_str().unwrap(), "-w", "start"]);
    }

    /// The server all tests of this process share while any of them holds it.
    pub fn shared() -> Arc<PgServer> {
        let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.upgrade() {
            return s;
        }
        let s = Arc::new(PgServer::start());
        *slot = Arc::downgrade(&s);
        s
    }

    /// A server for one test alone, for a test that stops it.
    pub fn private() -> Arc<PgServer> {
        Arc::new(PgServer::start())
    }

    /// A new, empty database; its URL.
    pub fn fresh_database(&self) -> String {
        let name = format!("t{}", NEXT_DB.fetch_add(1, Ordering::SeqCst));
        let port = self.port.to_string();
        self.run("createdb", &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", &name]);
        self.url(&name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let stop = |s: &PgServer| s.run("pg_ctl", &["-D", &s.data(), "-m", "immediate", "-w", "stop"]);
        // A test that failed while its server was stopped leaves nothing to stop.
        let running = self.dir.join("data/postmaster.pid").exists();
        if running && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stop(self))).is_err() {
            eprintln!("could not stop the test PostgreSQL in {}", self.dir.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
