//! Arbitrary inputs, in arbitrary order, as forged or broken agents and clients could send
//! them (after the controller's validation, which bounds sizes but not meaning): the engine
//! answers every one and never panics, so no message can stop the decision loop.

use proptest::prelude::*;
use vmha_engine::cluster::HostResources;
use vmha_engine::health::Probe;
use vmha_engine::inventory::ReportedDomain;
use vmha_engine::lease::Echo;
use vmha_engine::operation::{Done, OpId, Overrides};
use vmha_engine::step::{Heartbeat, Input, Registration, Request};
use vmha_engine::{ClusterState, Engine, FencingMode, Millis, RunState, Watchdog};

const HOSTS: [&str; 3] = ["kvm1", "kvm2", "kvm9"];
const VMS: [&str; 3] =
    ["00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002", "dns1"];

fn host() -> impl Strategy<Value = String> {
    prop::sample::select(&HOSTS[..]).prop_map(String::from)
}

fn vm() -> impl Strategy<Value = String> {
    prop::sample::select(&VMS[..]).prop_map(String::from)
}

fn run_state() -> impl Strategy<Value = RunState> {
    prop::sample::select(vec![RunState::Running, RunState::Paused, RunState::ShutOff, RunState::Crashed])
}

fn domain() -> impl Strategy<Value = ReportedDomain> {
    (vm(), run_state(), any::<u64>(), any::<u32>()).prop_map(|(uuid, state, memory_kib, vcpus)| {
        ReportedDomain {
            name: format!("vm-{}", &uuid[uuid.len() - 1..]),
            uuid,
            state,
            memory_kib,
            vcpus,
            guest: None,
            probes: Vec::new(),
        }
    })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (vm(), any::<bool>(), any::<Option<i32>>(), prop::option::of(host()), any::<bool>()).prop_map(
            |(vm, protected, priority, prefer, force)| {
                Request::Protection {
                    vm,
                    protected,
                    priority,
                    anti_affinity: None,
                    allowed_hosts: None,
                    preferred_host: prefer,
                    force,
                }
            }
        ),
        (vm(), host(), any::<Option<(u64, u64)>>()).prop_map(|(vm, to, o)| Request::Migrate {
            vm,
            to,
            overrides: o.map(|(bandwidth_mib_s, timeout_ms)| Overrides { bandwidth_mib_s, timeout_ms }),
        }),
        (host(), any::<bool>()).prop_map(|(host, allow_restart)| Request::Drain { host, allow_restart }),
        (host(), any::<bool>()).prop_map(|(host, abort)| Request::Undrain { host, abort }),
        host().prop_map(|host| Request::ConfirmDown { host }),
        (
            host(),
            prop::sample::select(vec![FencingMode::SelfFence, FencingMode::External, FencingMode::Manual])
        )
            .prop_map(|(host, mode)| Request::SetFencing { host, mode }),
        (host(), any::<Option<u64>>())
            .prop_map(|(host, limit_kib)| Request::SetMemoryLimit { host, limit_kib }),
    ]
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        host().prop_map(|host| Input::Register(Registration {
            migration_uri: format!("qemu+tcp://{host}/system"),
            peer_address: format!("{host}:7401"),
            resources: HostResources {
                cpus: 4,
                memory_total_kib: 8 << 20,
                memory_free_kib: 4 << 20,
                cpu_model: "x".into()
            },
            libvirt_version: "9".into(),
            lock_manager: "lockd".into(),
            describe: "fuzz".into(),
            host,
        })),
        (
            host(),
            any::<Option<(u64, u64, u64)>>(),
            any::<bool>(),
            prop::option::of(prop::collection::vec(domain(), 0..4)),
        )
            .prop_map(|(host, echo, armed, domains)| Input::Heartbeat(Heartbeat {
                seq: 0,
                probes_known: echo.map_or(0, |e| e.1),
                echo: echo.map(|(epoch, stamp, held_ms)| Echo { epoch, stamp: Millis(stamp), held_ms }),
                resources: None,
                watchdog: if armed {
                    Watchdog::Armed { device: "/dev/watchdog".into(), timeout_ms: 3_000 }
                } else {
                    Watchdog::Missing("fuzz".into())
                },
                probes: vec![Probe { name: "ping".into(), ok: armed, detail: String::new() }],
                xml: domains
                    .iter()
                    .flatten()
                    .filter(|d| d.vcpus % 2 == 0)
                    // A few disk names between many VMs: some definitions name another's disk.
                    .map(|d| (
                        d.uuid.clone(),
                        "<domain/>".into(),
                        vec![format!("/srv/vms/{}", d.memory_kib % 5)]
                    ))
                    .collect(),
                xml_refused: domains
                    .iter()
                    .flatten()
                    .filter(|d| d.vcpus % 2 == 1)
                    .map(|d| (d.uuid.clone(), format!("disk vda: fuzz {}", d.memory_kib % 3)))
                    .collect(),
                // Any version an agent may claim, the current one or not.
                roster_known: echo.map(|(_, stamp, _)| stamp % 5),
                self_fenced: !armed,
                arrived: None,
                domains,
                host,
            })),
        (host(), 0u64..6, any::<bool>()).prop_map(|(host, seq, ok)| Input::Result {
            host,
            id: OpId::new(1, seq),
            result: if ok { Ok(Done::default()) } else { Err("fuzz".into()) },
        }),
        (0u64..6).prop_map(|seq| Input::Recorded(OpId::new(1, seq))),
        (host(), any::<bool>()).prop_map(|(host, ok)| Input::FenceResult {
            host,
            result: if ok { Ok("off".into()) } else { Err("fuzz".into()) },
        }),
        request().prop_map(|request| Input::Operator { actor: "fuzz".into(), request }),
        Just(Input::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_input_sequence_makes_the_engine_panic(
        inputs in prop::collection::vec((input(), 0u64..20_000), 1..60)
    ) {
        let mut cluster = ClusterState { epoch: 1, ..Default::default() };
        // Tight caps, so that sequences reach them.
        cluster.policy.max_hosts = 2;
        cluster.policy.new_vms_per_minute = 1;
        let mut engine = Engine::new(cluster);
        let mut now = 0u64;
        for (input, dt) in inputs {
            now += dt;
            let _ = engine.step(input, Millis(now));
        }
        // And the clock far ahead: no deadline or age may overflow.
        let _ = engine.step(Input::Tick, Millis(u64::MAX / 2));
    }
}
