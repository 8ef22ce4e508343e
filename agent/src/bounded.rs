//! Blocking calls (libvirt, statvfs) that may never return, behind a timeout, with at most one
//! in flight per caller: a wedged libvirtd or a dead NFS server then holds one blocking thread,
//! never one per heartbeat or probe round, and never the caller.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// A blocking call that may never return (libvirtd wedged, a dead NFS server under statvfs).
/// At most one runs at a time per probe, so a hang holds one blocking thread, not one per
/// interval; until it returns, the probe reports how long it has been stuck.
pub struct Blocking<T> {
    stuck: Option<(JoinHandle<T>, Instant)>,
}

pub enum Outcome<T> {
    Done(T),
    /// No answer; the call has been running this long.
    Hung(Duration),
    Panicked(String),
}

impl<T: Send + 'static> Default for Blocking<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Send + 'static> Blocking<T> {
    pub fn new() -> Self {
        Blocking { stuck: None }
    }

    pub async fn call(&mut self, timeout: Duration, f: impl FnOnce() -> T + Send + 'static) -> Outcome<T> {
        if let Some((h, since)) = &self.stuck {
            if !h.is_finished() {
                return Outcome::Hung(since.elapsed());
            }
            // Its late answer is stale: ask again.
            self.stuck = None;
        }
        let since = Instant::now();
        let mut h = tokio::task::spawn_blocking(f);
        match tokio::time::timeout(timeout, &mut h).await {
            Ok(Ok(v)) => Outcome::Done(v),
            Ok(Err(e)) => Outcome::Panicked(e.to_string()),
            Err(_) => {
                self.stuck = Some((h, since));
                Outcome::Hung(since.elapsed())
            }
        }
    }
}
