//! [`Hypervisor`] over libvirt, through the `virt` crate.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::{Domain as VirtDomain, DomainState as VirtState, MigrateParameters};
use virt::enumutil::Enum;
use virt::sys;
use vmha_proto::v1::{Domain, DomainState, HostFacts};

use super::{
    Activity, GuestLook, Hypervisor, HypervisorError, JobProgress, MigrateOptions, MigrationStats, jobstats,
};

/// How often a running migration's job statistics are sampled.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

pub struct Libvirt {
    uri: String,
    /// Reopened when libvirtd restarts; each call takes its own reference, so a long call (a
    /// migration) never blocks the heartbeat's calls.
    conn: Mutex<Option<Connect>>,
}

impl Libvirt {
    pub fn new(uri: impl Into<String>) -> Libvirt {
        Libvirt { uri: uri.into(), conn: Mutex::new(None) }
    }

    fn conn(&self) -> Result<Connect, HypervisorError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref()
            && c.is_alive().unwrap_or(false)
        {
            return Ok(c.clone());
        }
        let c = Connect::open(Some(&self.uri)).map_err(|e| HypervisorError::Connect {
            uri: self.uri.clone(),
            message: e.message().to_string(),
        })?;
        *slot = Some(c.clone());
        Ok(c)
    }

    fn lookup(&self, uuid: &str) -> Result<VirtDomain, HypervisorError> {
        let conn = self.conn()?;
        conn.lookup_domain_by_uuid_string(uuid).map_err(|_| HypervisorError::NoSuchDomain(uuid.to_string()))
    }
}

fn domain_err(op: &'static str, domain: &str) -> impl FnOnce(virt::error::Error) -> HypervisorError {
    let domain = domain.to_string();
    move |e| HypervisorError::Domain { op, domain, message: e.message().to_string() }
}

fn host_err(op: &'static str) -> impl FnOnce(virt::error::Error) -> HypervisorError {
    move |e| HypervisorError::Host { op, message: e.message().to_string() }
}

/// libvirt encodes versions as major * 1_000_000 + minor * 1_000 + release.
fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1_000) % 1_000, v % 1_000)
}

fn map_state(s: virt::domain::DomainStateEnum) -> DomainState {
    match s {
        Enum::Known(VirtState::Running) => DomainState::Running,
        Enum::Known(VirtState::Blocked) => DomainState::Blocked,
        Enum::Known(VirtState::Paused) => DomainState::Paused,
        Enum::Known(VirtState::Shutdown) => DomainState::ShuttingDown,
        Enum::Known(VirtState::Shutoff) => DomainState::ShutOff,
        Enum::Known(VirtState::Crashed) => DomainState::Crashed,
        Enum::Known(VirtState::PMSuspended) => DomainState::Suspended,
        Enum::Known(VirtState::NoState) | Enum::Unknown(_) => DomainState::Unspecified,
    }
}

impl Hypervisor for Libvirt {
    fn host_facts(&self) -> Result<HostFacts, HypervisorError> {
        let conn = self.conn()?;
        let node = conn.node_info().map_err(host_err("virNodeGetInfo"))?;
        let free = conn.free_memory().map_err(host_err("virNodeGetFreeMemory"))?;
        Ok(HostFacts {
            cpus: node.cpus,
            memory_total_kib: node.memory,
            memory_free_kib: free / 1024,
            cpu_model: node.model,
            libvirt_version: version_string(conn.lib_version().map_err(host_err("virConnectGetLibVersion"))?),
            hypervisor_version: version_string(conn.hyp_version().map_err(host_err("virConnectGetVersion"))?),
            lock_manager: crate::lockmgr::detect(
                std::path::Path::new("/etc/libvirt/qemu.conf"),
                std::path::Path::new("/run/libvirt"),
            ),
        })
    }

    fn domains(&self) -> Result<Vec<Domain>, HypervisorError> {
        let conn = self.conn()?;
        let doms = conn.list_all_domains(0).map_err(host_err("virConnectListAllDomains"))?;
        let mut out = Vec::with_capacity(doms.len());
        for d in doms {
            // A domain can vanish between the listing and these calls (undefined by a finished
            // migration); skip it rather than fail the whole report.
            let (Ok(uuid), Ok(name), Ok(info)) = (d.uuid_string(), d.name(), d.info()) else {
                continue;
            };
            let persistent = d.is_persistent().unwrap_or(false);
            // The inactive definition is what another host must define to start it.
            let xml =
                d.xml_desc(if persistent { sys::VIR_DOMAIN_XML_INACTIVE } else { 0 }).unwrap_or_default();
            out.push(Domain {
                uuid,
                name,
                state: map_state(info.state) as i32,
                memory_kib: info.max_mem,
                vcpus: info.nr_virt_cpu,
                persistent,
                xml,
                guest: None,
            });
        }
        Ok(out)
    }

    fn define_and_start(&self, xml: &str) -> Result<String, HypervisorError> {
        let conn = self.conn()?;
        let dom = conn.define_domain_xml(xml).map_err(host_err("virDomainDefineXML"))?;
        let uuid = dom.uuid_string().map_err(host_err("virDomainGetUUIDString"))?;
        dom.create().map_err(domain_err("virDomainCreate", &uuid))?;
        Ok(uuid)
    }

    fn shutdown(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.lookup(uuid)?.shutdown().map_err(domain_err("virDomainShutdown", uuid))
    }

    fn destroy(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.lookup(uuid)?.destroy().map_err(domain_err("virDomainDestroy", uuid))
    }

    fn reset(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.lookup(uuid)?.reset().map_err(domain_err("virDomainReset", uuid))
    }

    fn start_defined(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.lookup(uuid)?.create().map_err(domain_err("virDomainCreate", uuid))
    }

    fn abort_job(&self, uuid: &str) -> Result<(), HypervisorError> {
        jobstats::abort(&self.lookup(uuid)?).map_err(domain_err("virDomainAbortJob", uuid))
    }

    fn migrate(
        &self,
        uuid: &str,
        opts: &MigrateOptions,
        progress: &(dyn Fn(JobProgress) + Sync),
    ) -> Result<MigrationStats, HypervisorError> {
        let dom = self.lookup(uuid)?;
        let persistent = dom.is_persistent().unwrap_or(false);
        // UNDEFINE_SOURCE is left out on purpose: it removes the source domain the moment the
        // migration ends, and with it the completed job's statistics (downtime, bytes). The
        // source definition is undefined below instead, right after those are read.
        let mut flags = sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PEER2PEER | sys::VIR_MIGRATE_PERSIST_DEST;
        if opts.auto_converge {
            flags |= sys::VIR_MIGRATE_AUTO_CONVERGE;
        }
        if opts.postcopy {
            flags |= sys::VIR_MIGRATE_POSTCOPY;
        }
        if let Some(ms) = opts.max_downtime_ms
            && let Err(e) = dom.migrate_set_max_downtime(ms, 0)
        {
            tracing::warn!(domain = uuid, error = %e.message(), "could not set the maximum downtime; libvirt's default applies");
        }
        // Post-copy, when allowed, starts once pre-copy has had a fair chance to converge.
        let postcopy_after = opts.postcopy.then(|| opts.timeout.map_or(Duration::from_secs(10), |t| t / 2));
        let switched = &AtomicBool::new(false);
        let params = MigrateParameters { bandwidth: opts.bandwidth_mib_s, ..Default::default() };
        let started = Instant::now();
        let timed_out = &AtomicBool::new(false);
        let dom_ref = &dom;
        let dom_uuid = uuid.to_string();
        // Dropping `stop` wakes the sampler at once: a sleep would hold the finished
        // migration hostage for up to one sampling period.
        let (stop, stopped) = mpsc::channel::<()>();
        let result = std::thread::scope(|s| {
            s.spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(PROGRESS_EVERY) {
                    if let Ok(j) = jobstats::read(dom_ref, false)
                        && j.is_active()
                    {
                        progress(JobProgress {
                            data_total: j.data_total,
                            data_processed: j.data_processed,
                            data_remaining: j.data_remaining,
                            elapsed_ms: started.elapsed().as_millis() as u64,
                        });
                    }
                    if postcopy_after.is_some_and(|a| started.elapsed() > a) && !switched.swap(true, Ordering::Relaxed) {
                        match jobstats::start_post_copy(dom_ref) {
                            Ok(()) => tracing::info!(domain = %dom_uuid, "switched to post-copy"),
                            Err(e) => tracing::warn!(domain = %dom_uuid, error = %e.message(), "post-copy switch failed"),
                        }
                    }
                    if opts.timeout.is_some_and(|t| started.elapsed() > t)
                        && !timed_out.swap(true, Ordering::Relaxed)
                    {
                        let _ = jobstats::abort(dom_ref);
                    }
                }
            });
            let r = dom.migrate_to_uri3(Some(&opts.dest_uri), params, flags);
            drop(stop);
            r
        });
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if let Err(e) = result {
            if timed_out.load(Ordering::Relaxed) {
                return Err(HypervisorError::MigrationTimedOut {
                    domain: uuid.to_string(),
                    timeout: opts.timeout.unwrap_or_default(),
                });
            }
            return Err(domain_err("virDomainMigrateToURI3", uuid)(e));
        }
        let completed = jobstats::read(&dom, true).unwrap_or_default();
        if persistent {
            // The guest runs on the destination now; a leftover inactive definition here would
            // only confuse operators and the inventory. Failure is reported, not fatal.
            if let Err(e) = dom.undefine() {
                tracing::warn!(domain = uuid, error = %e.message(), "migrated, but undefining the source copy failed");
            }
        }
        Ok(MigrationStats { elapsed_ms, downtime_ms: completed.downtime_ms, bytes: completed.data_processed })
    }

    fn guest_look(&self, uuid: &str) -> Result<Option<GuestLook>, HypervisorError> {
        let dom = match self.lookup(uuid) {
            Ok(d) => d,
            Err(HypervisorError::NoSuchDomain(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let info = dom.info().map_err(domain_err("virDomainGetInfo", uuid))?;
        // Blocked is running too: a vCPU waiting on I/O.
        if !matches!(map_state(info.state), DomainState::Running | DomainState::Blocked) {
            return Ok(None);
        }
        let instance = dom.id().unwrap_or(0);
        let xml = dom.xml_desc(0).map_err(domain_err("virDomainGetXMLDesc", uuid))?;
        let devices = GuestDevices::of(&xml);
        // libvirt gives a tap's counters as the guest sees them: tx is what the guest sent.
        let sent: u64 = devices
            .nics
            .iter()
            .filter_map(|n| dom.interface_stats(n).ok())
            .map(|s| s.tx_packets.max(0) as u64)
            .sum();
        let disk: u64 = devices
            .disks
            .iter()
            .filter_map(|d| dom.block_stats(d).ok())
            .map(|b| (b.rd_req.max(0) + b.wr_req.max(0)) as u64)
            .sum();
        Ok(Some(GuestLook {
            instance,
            channel: devices.agent_channel,
            activity: Activity { cpu_ns: info.cpu_time, io_ops: sent + disk },
        }))
    }

    fn guest_ping(&self, uuid: &str, timeout: Duration) -> bool {
        // libvirt counts the timeout in whole seconds.
        let secs = timeout.as_secs().max(1) as i32;
        self.lookup(uuid).is_ok_and(|d| d.qemu_agent_command(r#"{"execute":"guest-ping"}"#, secs, 0).is_ok())
    }
}

/// What `guest_check` needs from a running domain's XML.
#[derive(Debug, Default, PartialEq, Eq)]
struct GuestDevices {
    agent_channel: bool,
    /// The host-side names of its NICs (`<target dev='vnet0'/>`).
    nics: Vec<String>,
    /// Its disks' target names (`vda`).
    disks: Vec<String>,
}

impl GuestDevices {
    fn of(xml: &str) -> GuestDevices {
        let mut out = GuestDevices::default();
        let Ok(doc) = roxmltree::Document::parse(xml) else { return out };
        fn target<'a, 'i>(n: roxmltree::Node<'a, 'i>) -> Option<roxmltree::Node<'a, 'i>> {
            n.children().find(|c| c.has_tag_name("target"))
        }
        for dev in doc.descendants().filter(|n| n.has_tag_name("devices")).flat_map(|d| d.children()) {
            match dev.tag_name().name() {
                "channel" => {
                    out.agent_channel |=
                        target(dev).and_then(|t| t.attribute("name")) == Some("org.qemu.guest_agent.0")
                }
                "interface" => {
                    out.nics.extend(target(dev).and_then(|t| t.attribute("dev")).map(str::to_string))
                }
                "disk" => out.disks.extend(target(dev).and_then(|t| t.attribute("dev")).map(str::to_string)),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn libvirt_versions_read_as_dotted() {
        assert_eq!(super::version_string(9_000_000), "9.0.0");
        assert_eq!(super::version_string(7_002_013), "7.2.13");
    }

    #[test]
    fn a_running_domains_xml_names_its_agent_channel_nics_and_disks() {
        let xml = "<domain><devices>\
            <disk type='file'><source file='/san/dns1.qcow2'/><target dev='vda' bus='virtio'/></disk>\
            <interface type='bridge'><source bridge='br0'/><target dev='vnet3'/></interface>\
            <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>\
            <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>\
            </devices></domain>";
        let d = super::GuestDevices::of(xml);
        assert!(d.agent_channel);
        assert_eq!(d.nics, ["vnet3"]);
        assert_eq!(d.disks, ["vda"]);
        let none = super::GuestDevices::of("<domain><devices><serial type='pty'/></devices></domain>");
        assert!(!none.agent_channel && none.nics.is_empty() && none.disks.is_empty());
    }
}
