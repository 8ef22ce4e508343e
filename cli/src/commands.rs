//! The verbs, and how a controller answer becomes output and an exit code.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use tonic::Code;
use tonic::transport::Channel;
use vmha_proto::v1::operator_service_client::OperatorServiceClient;
use vmha_proto::v1::*;
use vmha_tls::Transport;
use vmha_tls::transport::Expect;

use crate::output::{self, Format, mib};

const EXIT_HELP: &str = "\
Exit codes: 0 done; 1 the operation ran and failed; 2 bad usage or input; 3 no such VM, host
or operation; 4 refused (the cluster's state does not allow it, nothing changed); 5 the
controller cannot be reached.";

/// Operate a vmha cluster: see hosts and VMs, protect VMs, live-migrate them, read the event log.
#[derive(Debug, Parser)]
#[command(version, about, after_help = EXIT_HELP)]
pub struct Cli {
    /// Controller endpoints, comma-separated: the CLI asks them which one leads (a standby
    /// names it) and talks to the leader; with none leading, a standby answers `vmha status`.
    #[arg(
        long,
        global = true,
        env = "VMHA_CONTROLLER",
        default_value = "https://127.0.0.1:7400",
        value_delimiter = ','
    )]
    controller: Vec<String>,
    /// The cluster CA's certificate.
    #[arg(long, global = true, env = "VMHA_CA", default_value = "/etc/vmha/pki/ca.pem", value_name = "PATH")]
    ca: PathBuf,
    /// Your operator certificate (`vmha ca issue operator NAME --role ROLE`): it names you in
    /// the event log, and its role decides what you may do.
    #[arg(long, global = true, env = "VMHA_CERT", value_name = "PATH")]
    cert: Option<PathBuf>,
    /// Your certificate's private key.
    #[arg(long, global = true, env = "VMHA_KEY", value_name = "PATH")]
    key: Option<PathBuf>,
    /// Development only: plaintext to a controller that runs with --insecure-dev.
    #[arg(long, global = true, env = "VMHA_INSECURE_DEV", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_dev: bool,
    /// Output: a table for people, or JSON for scripts.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// The cluster at a glance: hosts, VMs, protected VMs that are not running.
    Status,
    /// Hosts.
    #[command(subcommand)]
    Host(HostVerb),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmVerb),
    /// Mark a VM as highly available: restarted elsewhere if its host dies.
    Protect {
        /// VM name or libvirt domain UUID.
        vm: String,
        /// Restart order after a host failure: higher first (-1000 to 1000).
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i32>,
        /// VMs of one group never share a host, e.g. both recursive resolvers ("" clears it).
        #[arg(long, value_name = "GROUP")]
        anti_affinity: Option<String>,
        /// Only these hosts may run it, comma-separated ("" allows any again).
        #[arg(long, value_name = "H1,H2", value_delimiter = ',')]
        hosts: Option<Vec<String>>,
        /// Its home: with the controller's --failback-after, it goes back there by live
        /// migration once that host is healthy again ("" clears it).
        #[arg(long, value_name = "HOST")]
        prefer: Option<String>,
        /// Protect it even if losing its host (and the worst others, up to the controller's
        /// --reserve-hosts) would leave a protected VM with nowhere to restart; the override
        /// is recorded and `vmha status` shows it.
        #[arg(long)]
        force: bool,
    },
    /// Where each host's protected VMs would restart if it failed now (and it with the worst
    /// others, up to the controller's --reserve-hosts), and the memory left on each host after.
    #[command(
        after_help = "A what-if that strands a VM is what `vmha protect` refuses and `vmha status` warns of."
    )]
    Capacity,
    /// Stop protecting a VM (it keeps running where it is).
    Unprotect {
        /// VM name or libvirt domain UUID.
        vm: String,
    },
    /// Live-migrate a running VM to another host, with no restart.
    #[command(after_help = "Shows a progress bar while libvirt copies memory, then the result.\n\
        A migration that fails or is cancelled leaves the VM running on its source: vmha never\n\
        falls back to stopping and starting it.\n\
        Examples:\n  vmha migrate dns1 --to kvm2\n  vmha migrate dns1 --cancel")]
    Migrate {
        /// VM name or libvirt domain UUID.
        vm: String,
        /// Target host (see `vmha host ls`).
        #[arg(long, required_unless_present = "cancel", conflicts_with = "cancel")]
        to: Option<String>,
        /// Cancel the VM's live migration in flight instead; it stays on its source.
        #[arg(long)]
        cancel: bool,
        /// Return once the migration has started; follow it with `vmha events`.
        #[arg(long)]
        no_wait: bool,
        /// Bandwidth cap for this migration, MiB/s (default: the controller's).
        #[arg(long, value_name = "MIB_S")]
        bandwidth: Option<u64>,
        /// Abort the migration after this long (e.g. 30s); the VM keeps running where it is.
        #[arg(long, value_parser = humantime_duration)]
        timeout: Option<Duration>,
    },
    /// The cluster CA: make it, issue and renew certificates for hosts, controllers and
    /// operators (works offline, on the machine that keeps the CA's key).
    #[command(subcommand)]
    Ca(crate::ca::CaVerb),
    /// How available each protected VM was: uptime (and nines), outages, MTBF, MTTR, the
    /// longest outage, and planned downtime (stops, migration pauses) kept apart.
    #[command(after_help = "Computed from the outage history the controller keeps in PostgreSQL.\n\
        Availability is uptime / (uptime + unplanned downtime) = MTBF / (MTBF + MTTR).\n\
        Examples:\n  vmha report\n  vmha report --since 7d -o csv > availability.csv")]
    Report {
        /// The window, up to now (e.g. 30d, 12h).
        #[arg(long, value_parser = humantime_duration, default_value = "30d")]
        since: Duration,
    },
    /// Cancel a live migration in flight (its id is in `vmha events` and `-o json` output);
    /// the VM stays on its source, running once. Recorded as cancelled, by you.
    #[command(after_help = "Example: vmha cancel 00000002-0000-0000-0000-000000000007\n\
        To cancel by VM: vmha migrate dns1 --cancel; a whole drain: vmha host undrain kvm2 --abort")]
    Cancel {
        /// The operation's id.
        operation: String,
    },
    /// Print the shell completion script for bash, zsh or fish.
    #[command(after_help = "Examples:\n  vmha completions bash > /etc/bash_completion.d/vmha\n  \
        vmha completions zsh > \"${fpath[1]}/_vmha\"\n  vmha completions fish > ~/.config/fish/completions/vmha.fish")]
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (vmha.1 and one per command, vmha-host-drain.1 ...) into DIR.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
    /// The audit log: what vmha and operators did, and why.
    Events {
        /// How many of the newest events to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Keep printing new events as they happen (Ctrl-C to stop).
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum HostVerb {
    /// List hosts with their liveness, lease, admin state and capacity.
    Ls,
    /// Declare a host dead because you know it is off (powered down, unplugged): its protected
    /// VMs are restarted elsewhere at once. Never do this for a host that may still run.
    #[command(name = "confirm-down")]
    ConfirmDown { host: String },
    /// How a host that stops renewing its lease may be declared dead: `self` (its agent
    /// destroys its protected VMs, the default), `external` (the controller's --fence-command
    /// must confirm it off), `manual` (only `vmha host confirm-down`).
    Fencing {
        host: String,
        #[arg(value_parser = ["self", "external", "manual"])]
        mode: String,
    },
    /// Move every VM off a host by live migration (protected first, bounded concurrency) and
    /// put it in maintenance. A VM that cannot move stays; the drain then ends incomplete and
    /// the host does not enter maintenance. Nothing is ever cold-restarted.
    #[command(
        after_help = "Examples:\n  vmha host drain kvm2 --dry-run   # the plan: each VM, its target, why\n  \
        vmha host drain kvm2             # progress bars until done\n  \
        vmha host drain kvm2 --no-wait   # start and return; re-attach with --wait"
    )]
    Drain {
        host: String,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start the drain and return at once.
        #[arg(long, conflicts_with = "wait")]
        no_wait: bool,
        /// Follow a drain already running (or start one) until it ends.
        #[arg(long)]
        wait: bool,
        /// A VM whose live migration fails on every host may be stopped here and started
        /// elsewhere (a restart: its guest reboots). Without it, such a VM stays.
        #[arg(long)]
        allow_restart: bool,
    },
    /// Return a drained host to service: it takes VMs again. A drain under way starts no new
    /// migration; those in flight run to their end unless --abort cancels them.
    Undrain {
        host: String,
        /// Also cancel the drain's live migrations in flight (their VMs stay on this host).
        #[arg(long)]
        abort: bool,
    },
    /// Forget a retired host (admin). It must hold no lease (stop its agent first) and have no
    /// VMs (drain it first). The controllers then refuse every certificate issued to it so far
    /// (a new one, issued after, adds the host again); `vmha ca revoke host NAME` and `vmha ca
    /// publish` make its peers and their libvirtd refuse them too.
    Remove { host: String },
    /// Cap the memory vmha places on a host (0: no cap), e.g. to keep room for the host OS.
    Limit {
        host: String,
        /// MiB of VMs at most.
        #[arg(long, value_name = "MIB")]
        memory: u64,
    },
}

pub(crate) fn humantime_duration(s: &str) -> Result<Duration, String> {
    let d: Duration = s.parse::<humantime::Duration>().map_err(|e| e.to_string())?.into();
    Ok(d)
}

#[derive(Debug, Subcommand)]
enum VmVerb {
    /// List VMs with their host, state and protection.
    Ls,
    /// One VM in detail: where it runs, and why it is not running or not elsewhere.
    Show {
        /// VM name or libvirt domain UUID.
        vm: String,
    },
    /// Start a VM that is off: one stopped with `vmha vm stop`, a protected VM whose restart
    /// gave up, any VM shut off on a live host. Refused while a copy may still run anywhere
    /// (its host is unreachable but not declared dead), as a restart would be.
    #[command(after_help = "Starts it on its own host if that is up, else where placement finds room.\n\
        Examples:\n  vmha vm start dns1\n  vmha vm start dns1 --on kvm3")]
    Start {
        /// VM name or libvirt domain UUID.
        vm: String,
        /// The host to start it on.
        #[arg(long, value_name = "HOST")]
        on: Option<String>,
        /// Return once the start is queued.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for it to run (e.g. 2m); it is still started after that.
        #[arg(long, value_parser = humantime_duration, default_value = "2m")]
        wait: Duration,
    },
    /// Shut a VM down cleanly (ACPI), and destroy it if it has not stopped within --timeout.
    /// vmha then leaves it off, even if protected, until `vmha vm start` (or until it is
    /// started by hand: vmha then keeps it up again).
    #[command(after_help = "Example: vmha vm stop radius1 --timeout 2m")]
    Stop {
        /// VM name or libvirt domain UUID.
        vm: String,
        /// How long the guest has to shut down before it is destroyed.
        #[arg(long, value_parser = humantime_duration, default_value = "60s")]
        timeout: Duration,
        /// Return once the shutdown is sent.
        #[arg(long)]
        no_wait: bool,
    },
    /// Check a service inside a protected guest: a DNS query, a TCP connect, an HTTP GET, or a
    /// command on its host. A service that fails its probe --failures times in a row, after
    /// it passed since the guest started, gets the guest reset in place (within its reset
    /// budget, like a hung guest). Setting probes needs the admin role.
    #[command(after_help = "Examples:\n  \
        vmha vm probe dns1 dns lab.vmha --address 10.77.0.21 --expect 10.77.0.53\n  \
        vmha vm probe web1 http http://10.77.0.30/health --status 200 --interval 5s\n  \
        vmha vm probe radius1 exec -- radclient -t 1 -r 1 \\$VMHA_ADDRESS status secret\n  \
        vmha vm probe dns1 --remove dns\n  \
        vmha vm probe dns1 --clear")]
    Probe {
        /// VM name or libvirt domain UUID.
        vm: String,
        #[command(subcommand)]
        what: Option<crate::probe::ProbeWhat>,
        /// Remove the probe of this name.
        #[arg(long, value_name = "NAME")]
        remove: Option<String>,
        /// Remove all its probes.
        #[arg(long)]
        clear: bool,
    },
}

/// An error for the operator: one line, and the exit code scripts rely on.
pub struct Failure {
    pub message: String,
    pub exit_code: u8,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Failure {
        let exit_code = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => 2,
            Code::NotFound => 3,
            Code::FailedPrecondition | Code::AlreadyExists | Code::PermissionDenied | Code::Aborted => 4,
            Code::Unavailable | Code::DeadlineExceeded => 5,
            // The connection broke under the call or mid-stream (a controller killed while it
            // answered): it cannot be reached, like any other.
            Code::Unknown
                if std::iter::successors(std::error::Error::source(&s), |e| e.source())
                    .any(|e| e.is::<tonic::transport::Error>() || e.is::<std::io::Error>()) =>
            {
                5
            }
            _ => 1,
        };
        let message = match s.code() {
            // The controller answered, but its database is away: say that, not that the
            // controller is.
            Code::Unavailable if s.message().starts_with("database unavailable") => s.message().to_string(),
            Code::Unavailable => format!("the controller is unavailable: {}", vmha_tls::error_chain(&s)),
            // A transport failure says little at the top ("transport error"): give its causes.
            Code::Unknown => vmha_tls::error_chain(&s),
            _ => s.message().to_string(),
        };
        Failure { message, exit_code }
    }
}

pub type Client = OperatorServiceClient<Channel>;

/// How the CLI reaches controllers: with the operator's certificate, or plaintext in
/// `--insecure-dev`.
fn transport(cli: &Cli) -> Result<Transport, Failure> {
    if cli.insecure_dev {
        return Ok(Transport::InsecureDev);
    }
    let (Some(cert), Some(key)) = (cli.cert.clone(), cli.key.clone()) else {
        return Err(Failure {
            message:
                "no operator certificate: pass --cert and --key (or set VMHA_CERT and VMHA_KEY); an admin \
                      makes one with `vmha ca issue operator NAME --role viewer|operator|admin`"
                    .into(),
            exit_code: 2,
        });
    };
    let creds = vmha_tls::Credentials::load(vmha_tls::Paths { ca: cli.ca.clone(), cert, key })
        .map_err(|e| Failure { message: e.to_string(), exit_code: 2 })?;
    Ok(Transport::Mtls(creds))
}

/// The controllers the CLI knows of, and how it reaches them.
pub struct Controllers {
    endpoints: Vec<String>,
    transport: Transport,
}

impl Controllers {
    /// The leader among the known endpoints (or the one a standby names). With no leader
    /// anywhere, a standby: it still answers `vmha status` (who leads, or why none does) and
    /// refuses the rest, saying why.
    pub async fn connect(&self) -> Result<Client, Failure> {
        let mut last = String::new();
        let mut standby = None;
        let mut tried = std::collections::HashSet::new();
        let mut queue: std::collections::VecDeque<String> = self.endpoints.iter().cloned().collect();
        while let Some(e) = queue.pop_front() {
            if !tried.insert(e.clone()) {
                continue;
            }
            let mut client =
                match self.transport.channel(&e, Expect::Controller, Duration::from_secs(3)).await {
                    Ok(ch) => OperatorServiceClient::new(ch),
                    Err(err @ vmha_tls::TlsError::Refused(_)) => {
                        return Err(Failure { message: err.to_string(), exit_code: 2 });
                    }
                    Err(err) => {
                        last = format!("{e}: {err}");
                        continue;
                    }
                };
            match client.leader(LeaderRequest {}).await {
                Ok(r) if r.get_ref().leading => return Ok(client),
                Ok(r) => {
                    let r = r.into_inner();
                    last = format!(
                        "{e}: {}",
                        if r.why_no_leader.is_empty() { "a standby" } else { &r.why_no_leader }
                    );
                    if !r.leader_endpoint.is_empty() {
                        queue.push_front(r.leader_endpoint);
                    }
                    standby.get_or_insert(client);
                }
                Err(s) if matches!(s.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded) => {
                    last = format!("{e}: {}", vmha_tls::error_chain(&s));
                }
                Err(s) => return Err(s.into()),
            }
        }
        standby.ok_or_else(|| Failure {
            message: format!("cannot reach a controller ({last}); set --controller or VMHA_CONTROLLER"),
            exit_code: 5,
        })
    }
}

/// One line per controller: which leads (with its epoch), which stand by.
fn controllers_lines(controllers: &[ControllerInfo]) {
    for c in controllers {
        match c.role.as_str() {
            "leader" => println!("controller {} leads at {} (epoch {})", c.name, c.endpoint, c.epoch),
            _ => println!("controller {} stands by at {}", c.name, c.endpoint),
        }
    }
}

pub async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let fmt = cli.output;
    if fmt == Format::Csv && !matches!(cli.command, Verb::Report { .. }) {
        return Err(Failure {
            message: "-o csv is for `vmha report`; other commands show a table or JSON".into(),
            exit_code: 2,
        });
    }
    match &cli.command {
        Verb::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "vmha", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Verb::Manpages { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            std::fs::create_dir_all(dir).and_then(|_| clap_mangen::generate_to(cmd, dir)).map_err(|e| {
                Failure {
                    message: format!("cannot write the man pages into {}: {e}", dir.display()),
                    exit_code: 1,
                }
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let cli = match cli.command {
        Verb::Ca(verb) if !verb.needs_controller() => {
            crate::ca::run(verb, fmt)?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => cli,
    };
    let controllers = Controllers { endpoints: cli.controller.clone(), transport: transport(&cli)? };
    let mut c = controllers.connect().await?;
    match cli.command {
        Verb::Ca(crate::ca::CaVerb::Publish { crl }) => {
            let der = crate::ca::read_crl(&crl)?;
            let r = c.publish_crl(PublishCrlRequest { crl: der }).await?.into_inner();
            match fmt {
                Format::Json => output::json(&r),
                Format::Table | Format::Csv => println!("{}", r.message),
            }
        }
        Verb::Ca(_) | Verb::Completions { .. } | Verb::Manpages { .. } => {
            unreachable!("these need no controller: handled above")
        }
        Verb::Capacity => {
            let r = c.capacity(CapacityRequest {}).await?.into_inner();
            match fmt {
                Format::Json => output::json(&r),
                Format::Table | Format::Csv => show_capacity(&r),
            }
        }
        Verb::Status => {
            let s = c.status(StatusRequest {}).await?.into_inner();
            match fmt {
                Format::Json => output::json(&s),
                Format::Table | Format::Csv if s.standby => {
                    println!("no controller leads; this answer is from a standby");
                    controllers_lines(&s.controllers);
                    if !s.database.is_empty() {
                        println!("database: {}", s.database);
                    }
                    for w in &s.warnings {
                        println!("WARNING: {w}");
                    }
                }
                Format::Table | Format::Csv => {
                    println!(
                        "epoch {}  quorum {}  hosts {}/{} online  VMs {} running of {}  protected {} ({} not running)",
                        s.epoch,
                        if s.quorum { "yes" } else { "NO" },
                        s.hosts_online,
                        s.hosts_total,
                        s.vms_running,
                        s.vms_total,
                        s.vms_protected,
                        s.protected_not_running
                    );
                    println!("you are {}", s.caller);
                    controllers_lines(&s.controllers);
                    if !s.database.is_empty() {
                        println!("database: {} (leases and heartbeats go on from memory)", s.database);
                    }
                    for w in &s.warnings {
                        println!("WARNING: {w}");
                    }
                    host_table(&s.hosts);
                    for h in &s.hosts {
                        if !h.note.is_empty() {
                            println!("{}: {}", h.name, h.note);
                        }
                        for p in h.probes.iter().filter(|p| !p.ok) {
                            println!("{}: probe {} failing: {}", h.name, p.name, p.detail);
                        }
                        if let Some(d) = h.drain.as_ref().filter(|d| d.state != "done") {
                            println!("{}: drain {}: {}", h.name, d.state, d.message);
                        }
                    }
                    for v in &s.protected_down {
                        println!("protected {} is not running: {}", v.name, v.why_not_running);
                    }
                }
            }
        }
        Verb::Host(HostVerb::Ls) => {
            let hosts = c.list_hosts(ListHostsRequest {}).await?.into_inner().hosts;
            match fmt {
                Format::Json => output::json(&hosts),
                Format::Table | Format::Csv => host_table(&hosts),
            }
        }
        Verb::Vm(VmVerb::Ls) => {
            let vms = c.list_vms(ListVmsRequest {}).await?.into_inner().vms;
            match fmt {
                Format::Json => output::json(&vms),
                Format::Table | Format::Csv => output::table(
                    &["NAME", "HOST", "STATE", "MEMORY", "VCPUS", "PROTECTED", "PRIORITY", "UUID"],
                    vms.iter().map(vm_row).collect(),
                ),
            }
        }
        Verb::Vm(VmVerb::Show { vm }) => {
            let v = c.get_vm(GetVmRequest { vm }).await?.into_inner();
            show_vm(fmt, &v);
        }
        Verb::Vm(VmVerb::Start { vm, on, no_wait, wait }) => {
            return crate::power::start(&mut c, fmt, vm, on, no_wait, wait).await;
        }
        Verb::Vm(VmVerb::Stop { vm, timeout, no_wait }) => {
            return crate::power::stop(&mut c, fmt, vm, timeout, no_wait).await;
        }
        Verb::Vm(VmVerb::Probe { vm, what, remove, clear }) => {
            crate::probe::run(&mut c, fmt, vm, what, remove, clear).await?;
        }
        Verb::Protect { vm, priority, anti_affinity, hosts, prefer, force } => {
            let allowed_hosts: Vec<String> =
                hosts.clone().unwrap_or_default().into_iter().filter(|h| !h.is_empty()).collect();
            let req = SetProtectionRequest {
                vm,
                protected: true,
                priority,
                anti_affinity,
                set_allowed_hosts: hosts.is_some(),
                allowed_hosts,
                preferred_host: prefer,
                force,
            };
            let v = c.set_protection(req).await?.into_inner();
            show_vm(fmt, &v);
        }
        Verb::Unprotect { vm } => {
            let req = SetProtectionRequest { vm, protected: false, ..Default::default() };
            let v = c.set_protection(req).await?.into_inner();
            show_vm(fmt, &v);
        }
        Verb::Host(HostVerb::ConfirmDown { host }) => {
            let h = c.confirm_down(ConfirmDownRequest { host }).await?.into_inner();
            match fmt {
                Format::Json => output::json(&h),
                Format::Table | Format::Csv => println!("{} is {}: {}", h.name, h.state, h.note),
            }
        }
        Verb::Host(HostVerb::Drain { host, dry_run, no_wait, wait, allow_restart }) => {
            return crate::drain::run(&controllers, &mut c, fmt, host, dry_run, no_wait, wait, allow_restart)
                .await;
        }
        Verb::Host(HostVerb::Remove { host }) => {
            let r = c.remove_host(RemoveHostRequest { host }).await?.into_inner();
            match fmt {
                Format::Json => output::json(&r),
                Format::Table | Format::Csv => println!("{}", r.message),
            }
        }
        Verb::Host(HostVerb::Undrain { host, abort }) => {
            let h = c.undrain(UndrainRequest { host, abort }).await?.into_inner();
            match fmt {
                Format::Json => output::json(&h),
                Format::Table | Format::Csv => println!("{} is {} ({})", h.name, h.admin_state, h.state),
            }
        }
        Verb::Host(HostVerb::Limit { host, memory }) => {
            let req = SetMemoryLimitRequest { host, memory_limit_mib: memory };
            let h = c.set_memory_limit(req).await?.into_inner();
            let limit = if h.memory_limit_mib == 0 { "none".into() } else { mib(h.memory_limit_mib) };
            match fmt {
                Format::Json => output::json(&h),
                Format::Table | Format::Csv => println!("{}: memory limit {limit}", h.name),
            }
        }
        Verb::Host(HostVerb::Fencing { host, mode }) => {
            let h = c.set_fencing(SetFencingRequest { host, mode }).await?.into_inner();
            match fmt {
                Format::Json => output::json(&h),
                Format::Table | Format::Csv => println!("{}: fencing {}", h.name, h.fencing),
            }
        }
        Verb::Migrate { vm, cancel: true, no_wait, .. } => {
            let op = c.cancel(CancelRequest { operation: String::new(), vm }).await?.into_inner();
            return finish_cancel(&mut c, op, fmt, no_wait).await;
        }
        Verb::Cancel { operation } => {
            let op = c.cancel(CancelRequest { operation, vm: String::new() }).await?.into_inner();
            return finish_cancel(&mut c, op, fmt, false).await;
        }
        Verb::Migrate { vm, to, no_wait, bandwidth, timeout, .. } => {
            let req = MigrateRequest {
                vm,
                target_host: to.unwrap_or_default(),
                bandwidth_mib_s: bandwidth.unwrap_or(0),
                timeout_ms: timeout.map_or(0, |t| t.as_millis() as u64),
            };
            let op = c.migrate(req).await?.into_inner();
            let op = if no_wait { op } else { follow_operation(&mut c, op, fmt).await? };
            match fmt {
                Format::Json => output::json(&op),
                Format::Table | Format::Csv => println!("{}", describe_operation(&op)),
            }
            if ended(&op.state) && op.state != "succeeded" {
                return Ok(ExitCode::from(1));
            }
        }
        Verb::Report { since } => {
            let r = c.report(ReportRequest { since_s: since.as_secs() }).await?.into_inner();
            crate::report::show(fmt, &r);
        }
        Verb::Events { limit, follow } => {
            let mut after = 0;
            let mut limit = limit;
            loop {
                let events =
                    c.list_events(ListEventsRequest { limit, after_id: after }).await?.into_inner().events;
                for e in &events {
                    match fmt {
                        Format::Json => println!("{}", serde_json::to_string(e).expect("serialisable")),
                        Format::Table | Format::Csv => println!(
                            "{}  {:<10} {:<20} {}  [{}]",
                            e.at, e.subject_kind, e.subject, e.message, e.actor
                        ),
                    }
                }
                after = events.last().map_or(after, |e| e.id);
                if !follow {
                    break;
                }
                limit = 1000;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn host_table(hosts: &[Host]) {
    output::table(
        &[
            "HOST",
            "STATE",
            "LEASE",
            "ADMIN",
            "HEALTH",
            "FENCING",
            "WATCHDOG",
            "LOCKS",
            "VMS",
            "CPUS",
            "MEMORY FREE/TOTAL",
            "HEARTBEAT",
            "CERT EXPIRES",
        ],
        hosts
            .iter()
            .map(|h| {
                vec![
                    h.name.clone(),
                    h.state.clone(),
                    h.lease_left_s.map_or("none".into(), |l| {
                        if l >= 0.0 { format!("{l:.1}s left") } else { format!("expired {:.1}s ago", -l) }
                    }),
                    h.admin_state.clone(),
                    h.health.clone(),
                    h.fencing.clone(),
                    h.watchdog.clone(),
                    h.lock_manager.clone(),
                    h.vms_running.to_string(),
                    h.cpus.to_string(),
                    format!("{} / {}", mib(h.memory_free_mib), mib(h.memory_total_mib)),
                    h.heartbeat_age_s.map_or("never".into(), |a| format!("{a:.1}s ago")),
                    if h.cert_not_after == 0 {
                        "unknown".into()
                    } else {
                        crate::ca::expiry(h.cert_not_after)
                    },
                ]
            })
            .collect(),
    );
}

fn vm_row(v: &Vm) -> Vec<String> {
    vec![
        v.name.clone(),
        if v.host.is_empty() { "-".into() } else { v.host.clone() },
        v.state.clone(),
        mib(v.memory_mib),
        v.vcpus.to_string(),
        if v.protected { "yes".into() } else { "no".into() },
        v.priority.to_string(),
        v.uuid.clone(),
    ]
}

fn show_capacity(r: &CapacityReply) {
    println!("reserve: {} host(s) (the controller's --reserve-hosts)", r.reserve_hosts);
    if r.what_ifs.is_empty() {
        println!("no host runs a protected VM");
    }
    for w in &r.what_ifs {
        let verdict = if w.covered { "every protected VM restarts" } else { "SHORT: some would not restart" };
        println!("\nif {} failed: {verdict}", w.lost.join(" and "));
        let rows = (w.restarts.iter())
            .map(|p| {
                let to = if p.target.is_empty() {
                    format!("nowhere: {}", p.why_nowhere)
                } else {
                    p.target.clone()
                };
                vec![p.vm.clone(), to]
            })
            .collect();
        output::table(&["VM", "WOULD RESTART ON"], rows);
        let left: Vec<String> =
            w.headroom.iter().map(|h| format!("{} {} MiB", h.host, h.memory_left_mib)).collect();
        println!("memory left after: {}", if left.is_empty() { "no host".into() } else { left.join(", ") });
    }
}

pub(crate) fn show_vm(fmt: Format, v: &Vm) {
    match fmt {
        Format::Json => output::json(v),
        Format::Table | Format::Csv => {
            let row = vm_row(v);
            let keys = ["name", "host", "state", "memory", "vcpus", "protected", "priority", "uuid"];
            for (k, val) in keys.iter().zip(row) {
                println!("{k:>14}: {val}");
            }
            let extra = [
                ("anti-affinity", v.anti_affinity.clone()),
                ("allowed hosts", v.allowed_hosts.join(",")),
                ("preferred host", v.preferred_host.clone()),
                ("not running", v.why_not_running.clone()),
                ("stopped by", v.stopped_by.clone()),
                ("FORCED", v.admission_override.clone()),
                ("failback waits", v.failback_waits.clone()),
                ("guest agent", v.guest.clone()),
                ("guest resets", v.guest_resets.clone()),
                ("GUEST ALARM", v.guest_alarm.clone()),
            ];
            for (k, val) in extra.iter().filter(|(_, val)| !val.is_empty()) {
                println!("{k:>14}: {val}");
            }
            for (i, p) in v.probes.iter().enumerate() {
                println!("{:>14}: {p}", if i == 0 { "probes" } else { "" });
            }
            for (i, why) in v.elsewhere.iter().enumerate() {
                println!("{:>14}: {why}", if i == 0 { "not elsewhere" } else { "" });
            }
        }
    }
}

/// Whether an operation in this state has ended.
pub(crate) fn ended(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "aborted" | "cancelled")
}

/// Follows a cancelled migration to its end: exit 0 once it is cancelled (the VM on its
/// source), 1 if it succeeded before the cancel took.
async fn finish_cancel(
    c: &mut Client,
    op: Operation,
    fmt: Format,
    no_wait: bool,
) -> Result<ExitCode, Failure> {
    let op = if no_wait { op } else { follow_operation(c, op, fmt).await? };
    match fmt {
        Format::Json => output::json(&op),
        Format::Table | Format::Csv => println!("{}", describe_operation(&op)),
    }
    Ok(if no_wait || op.state == "cancelled" { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn describe_operation(op: &Operation) -> String {
    match op.state.as_str() {
        "succeeded" => format!(
            "{} migrated from {} to {} in {} ms (downtime {} ms, {} sent)",
            op.vm,
            op.source,
            op.target,
            op.elapsed_ms,
            op.downtime_ms,
            mib(op.bytes >> 20)
        ),
        "cancelled" => format!(
            "migration of {} from {} to {} {}; {} stays on {}",
            op.vm, op.source, op.target, op.error, op.vm, op.source
        ),
        "failed" | "aborted" => format!(
            "migration of {} from {} to {} {}: {}; {} stays on {}",
            op.vm, op.source, op.target, op.state, op.error, op.vm, op.source
        ),
        s => {
            format!("migration of {} from {} to {} is {s} (operation {})", op.vm, op.source, op.target, op.id)
        }
    }
}

/// Follows the operation to its end, drawing a progress bar on a terminal.
async fn follow_operation(c: &mut Client, op: Operation, fmt: Format) -> Result<Operation, Failure> {
    let bar = if fmt == Format::Table { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("{} {} -> {}", op.vm, op.source, op.target));
    let mut stream = c.watch_operation(WatchOperationRequest { id: op.id.clone() }).await?.into_inner();
    let mut last = op;
    while let Some(update) = stream.message().await? {
        if update.data_total > 0 {
            bar.set_length(update.data_total);
            bar.set_position(update.data_processed);
        }
        let done = ended(&update.state);
        last = update;
        if done {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(last)
}

#[cfg(test)]
mod tests {
    /// clap checks its definitions only when a command is built: two options of one name (a
    /// command's own `--cert` and the global one) would panic the first operator who ran it.
    #[test]
    fn every_command_line_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
