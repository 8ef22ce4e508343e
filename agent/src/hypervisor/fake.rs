//! An in-memory [`Hypervisor`] for tests of the agent's logic: domains are rows in a map, a
//! migration moves a row into another fake (its "destination host").

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use vmha_proto::v1::{Domain, DomainState, HostFacts};

use super::{GuestLook, Hypervisor, HypervisorError, JobProgress, MigrateOptions, MigrationStats};

#[derive(Clone, Default)]
pub struct FakeHypervisor {
    domains: Arc<Mutex<BTreeMap<String, Domain>>>,
    /// Destination URI -> the fake host behind it.
    peers: Arc<Mutex<BTreeMap<String, FakeHypervisor>>>,
    /// What `host_facts` says; `None`: a small host (4 CPUs, 8 GiB).
    facts: Arc<Mutex<Option<HostFacts>>>,
    /// What `guest_look` finds and whether the guest answers pings, by UUID (running domains
    /// without an entry have no channel).
    guests: Arc<Mutex<BTreeMap<String, (GuestLook, bool)>>>,
    /// How many times each domain was reset.
    resets: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl FakeHypervisor {
    pub fn add_running(&self, uuid: &str, name: &str) {
        self.domains.lock().unwrap().insert(
            uuid.into(),
            Domain {
                uuid: uuid.into(),
                name: name.into(),
                state: DomainState::Running as i32,
                memory_kib: 65_536,
                vcpus: 1,
                persistent: true,
                xml: format!("<domain><name>{name}</name><uuid>{uuid}</uuid></domain>"),
                guest: None,
            },
        );
    }

    /// What the next `guest_look` of the domain finds, and whether its agent answers.
    pub fn set_guest(&self, uuid: &str, look: GuestLook, answers: bool) {
        self.guests.lock().unwrap().insert(uuid.into(), (look, answers));
    }

    /// How many times the domain was reset (`Hypervisor::reset`).
    pub fn resets(&self, uuid: &str) -> u32 {
        self.resets.lock().unwrap().get(uuid).copied().unwrap_or(0)
    }

    /// Replaces a domain's XML, as an edit with `virsh edit` would.
    pub fn set_xml(&self, uuid: &str, xml: &str) {
        if let Some(d) = self.domains.lock().unwrap().get_mut(uuid) {
            d.xml = xml.into();
        }
    }

    pub fn set_facts(&self, facts: HostFacts) {
        *self.facts.lock().unwrap() = Some(facts);
    }

    pub fn connect_peer(&self, uri: &str, peer: &FakeHypervisor) {
        self.peers.lock().unwrap().insert(uri.into(), peer.clone());
    }

    fn set_state(&self, uuid: &str, state: DomainState) -> Result<(), HypervisorError> {
        let mut d = self.domains.lock().unwrap();
        let dom = d.get_mut(uuid).ok_or_else(|| HypervisorError::NoSuchDomain(uuid.into()))?;
        dom.state = state as i32;
        Ok(())
    }
}

impl Hypervisor for FakeHypervisor {
    fn host_facts(&self) -> Result<HostFacts, HypervisorError> {
        if let Some(f) = self.facts.lock().unwrap().clone() {
            return Ok(f);
        }
        Ok(HostFacts {
            cpus: 4,
            memory_total_kib: 8 << 20,
            memory_free_kib: 4 << 20,
            cpu_model: "fake".into(),
            libvirt_version: "0.0.0".into(),
            hypervisor_version: "0.0.0".into(),
            lock_manager: "none".into(),
        })
    }

    fn domains(&self) -> Result<Vec<Domain>, HypervisorError> {
        Ok(self.domains.lock().unwrap().values().cloned().collect())
    }

    fn define_and_start(&self, xml: &str) -> Result<String, HypervisorError> {
        let tag = |t: &str| {
            xml.split(&format!("<{t}>"))
                .nth(1)
                .and_then(|r| r.split(&format!("</{t}>")).next())
                .map(str::to_string)
                .ok_or_else(|| HypervisorError::Host { op: "define", message: format!("no <{t}>") })
        };
        let (name, uuid) = (tag("name")?, tag("uuid")?);
        self.add_running(&uuid, &name);
        Ok(uuid)
    }

    fn shutdown(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.set_state(uuid, DomainState::ShutOff)
    }

    fn destroy(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.set_state(uuid, DomainState::ShutOff)
    }

    /// Counted (`resets`); the domain runs on.
    fn reset(&self, uuid: &str) -> Result<(), HypervisorError> {
        let running =
            self.domains.lock().unwrap().get(uuid).is_some_and(|d| d.state == DomainState::Running as i32);
        if !running {
            return Err(HypervisorError::Domain {
                op: "virDomainReset",
                domain: uuid.into(),
                message: "Requested operation is not valid: domain is not running".into(),
            });
        }
        *self.resets.lock().unwrap().entry(uuid.to_string()).or_default() += 1;
        Ok(())
    }

    fn start_defined(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.set_state(uuid, DomainState::Running)
    }

    /// Its migrations end at once: there is never a job left to abort.
    fn abort_job(&self, uuid: &str) -> Result<(), HypervisorError> {
        Err(HypervisorError::Domain {
            op: "virDomainAbortJob",
            domain: uuid.into(),
            message: "no job is active".into(),
        })
    }

    fn migrate(
        &self,
        uuid: &str,
        opts: &MigrateOptions,
        progress: &(dyn Fn(JobProgress) + Sync),
    ) -> Result<MigrationStats, HypervisorError> {
        let peer = self.peers.lock().unwrap().get(&opts.dest_uri).cloned().ok_or_else(|| {
            HypervisorError::Domain {
                op: "virDomainMigrateToURI3",
                domain: uuid.into(),
                message: format!("unable to connect to server at '{}'", opts.dest_uri),
            }
        })?;
        let dom = self
            .domains
            .lock()
            .unwrap()
            .remove(uuid)
            .ok_or_else(|| HypervisorError::NoSuchDomain(uuid.into()))?;
        progress(JobProgress { data_total: 100, data_processed: 100, data_remaining: 0, elapsed_ms: 1 });
        peer.domains.lock().unwrap().insert(uuid.into(), dom);
        Ok(MigrationStats { elapsed_ms: 1, downtime_ms: 1, bytes: 100 })
    }

    fn guest_look(&self, uuid: &str) -> Result<Option<GuestLook>, HypervisorError> {
        let running =
            self.domains.lock().unwrap().get(uuid).is_some_and(|d| d.state == DomainState::Running as i32);
        let no_channel = GuestLook { instance: 1, channel: false, activity: Default::default() };
        Ok(running.then(|| self.guests.lock().unwrap().get(uuid).map_or(no_channel, |g| g.0)))
    }

    fn guest_ping(&self, uuid: &str, _timeout: std::time::Duration) -> bool {
        self.guests.lock().unwrap().get(uuid).is_some_and(|g| g.1)
    }
}
