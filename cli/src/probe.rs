//! `vmha vm probe`: how vmha checks a service inside a protected guest.

use std::time::Duration;

use clap::{Args, Subcommand};
use vmha_proto::v1::{GetVmRequest, ServiceProbe, SetProbesRequest, service_probe::Kind};

use crate::commands::{Client, Failure, show_vm};
use crate::output::Format;

#[derive(Debug, Subcommand)]
pub enum ProbeWhat {
    /// A DNS query of NAME (type A) to the guest's address.
    Dns {
        /// The name to ask for.
        #[arg(value_name = "NAME")]
        query: String,
        /// An address the answer must hold.
        #[arg(long, value_name = "IPV4")]
        expect: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// A TCP connect to PORT at the guest's address.
    Tcp {
        port: u16,
        #[command(flatten)]
        common: Common,
    },
    /// An HTTP GET of URL (http:// only).
    Http {
        url: String,
        /// The status it must answer.
        #[arg(long, default_value_t = 200)]
        status: u16,
        #[command(flatten)]
        common: Common,
    },
    /// A command on the host running the VM (`sh -c`, with VMHA_VM (its UUID) and VMHA_ADDRESS set); it
    /// passes when it exits 0. Agents run these only with --allow-exec-probes.
    Exec {
        /// The command and its arguments (after `--`).
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Args)]
pub struct Common {
    /// The guest's IP address (required for dns and tcp).
    #[arg(long, value_name = "IP")]
    address: Option<String>,
    /// The probe's name (default: its kind); a probe of the same name is replaced.
    #[arg(long)]
    name: Option<String>,
    /// How often it runs.
    #[arg(long, value_parser = crate::commands::humantime_duration, default_value = "2s")]
    interval: Duration,
    /// How long one run may take.
    #[arg(long, value_parser = crate::commands::humantime_duration, default_value = "1s")]
    timeout: Duration,
    /// Failures in a row that make the service failing: vmha then resets the guest in place
    /// (within its reset budget), if the probe passed since the guest started.
    #[arg(long, default_value_t = 3)]
    failures: u32,
}

fn probe(what: ProbeWhat) -> ServiceProbe {
    let (kind, default_name, c) = match what {
        ProbeWhat::Dns { query, expect, common } => (
            Kind::Dns(vmha_proto::v1::DnsProbe { name: query, expect: expect.unwrap_or_default() }),
            "dns",
            common,
        ),
        ProbeWhat::Tcp { port, common } => {
            (Kind::Tcp(vmha_proto::v1::TcpProbe { port: port.into() }), "tcp", common)
        }
        ProbeWhat::Http { url, status, common } => {
            (Kind::Http(vmha_proto::v1::HttpProbe { url, status: status.into() }), "http", common)
        }
        ProbeWhat::Exec { command, common } => {
            (Kind::Exec(vmha_proto::v1::ExecProbe { command: command.join(" ") }), "exec", common)
        }
    };
    ServiceProbe {
        name: c.name.unwrap_or_else(|| default_name.into()),
        kind: Some(kind),
        address: c.address.unwrap_or_default(),
        interval_ms: c.interval.as_millis() as u64,
        timeout_ms: c.timeout.as_millis() as u64,
        failures: c.failures,
    }
}

/// Adds (or replaces by name) one probe, removes one, or clears them; prints the VM.
pub async fn run(
    c: &mut Client,
    fmt: Format,
    vm: String,
    what: Option<ProbeWhat>,
    remove: Option<String>,
    clear: bool,
) -> Result<(), Failure> {
    let current = c.get_vm(GetVmRequest { vm: vm.clone() }).await?.into_inner().probe_specs;
    let probes = match (what, remove, clear) {
        (Some(what), None, false) => {
            let p = probe(what);
            let mut probes: Vec<ServiceProbe> = current.into_iter().filter(|q| q.name != p.name).collect();
            probes.push(p);
            probes
        }
        (None, Some(name), false) => {
            if !current.iter().any(|q| q.name == name) {
                return Err(Failure {
                    message: format!("{vm} has no probe named '{name}' (`vmha vm show {vm}` lists them)"),
                    exit_code: 3,
                });
            }
            current.into_iter().filter(|q| q.name != name).collect()
        }
        (None, None, true) => Vec::new(),
        _ => {
            return Err(Failure {
                message: "give one of: a probe to add (dns, tcp, http, exec), --remove NAME, or --clear"
                    .into(),
                exit_code: 2,
            });
        }
    };
    let v = c.set_probes(SetProbesRequest { vm, probes }).await?.into_inner();
    show_vm(fmt, &v);
    Ok(())
}
