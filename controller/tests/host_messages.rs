//! A fuzz target, run as a property test, for every message the controller decodes from a host
//! (Register, Heartbeat, ReportProgress, ReportResult): bytes as a hostile host with a valid
//! certificate could send them are decoded as the gRPC layer does (prost), made into the
//! engine's inputs as the agent API does (`host_message`), and stepped through the engine as
//! the decision loop does, on a cluster where the sender is registered and runs VMs. Three
//! kinds of input: arbitrary bytes; real messages with bytes flipped, inserted or cut; and
//! well-formed messages whose every field is drawn at random (numbers to 2^64, names, states,
//! nested XML). Nothing may panic (a panic ends the controller: see `main.rs`), and what is
//! refused is refused with a reason.
//!
//! `VMHA_FUZZ_CASES=N` runs N cases per property (2000 by default, a few seconds).

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use prost::Message;
use vmha_controller::domain_xml::DomainRules;
use vmha_controller::host_message;
use vmha_engine::step::{Input, Request};
use vmha_engine::{ClusterState, Engine, Millis};
use vmha_proto::v1::*;

const HOST: &str = "kvm9";
const UUIDS: [&str; 3] = [
    "0d6b3f2e-1c1e-4f7e-9a55-2b8a1f6c0d01",
    "0d6b3f2e-1c1e-4f7e-9a55-2b8a1f6c0d02",
    "0d6b3f2e-1c1e-4f7e-9a55-2b8a1f6c0d03",
];

fn cases() -> u32 {
    std::env::var("VMHA_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2000)
}

fn facts() -> HostFacts {
    HostFacts {
        cpus: 8,
        memory_total_kib: 16 << 20,
        memory_free_kib: 12 << 20,
        cpu_model: "host".into(),
        libvirt_version: "9.0.0".into(),
        hypervisor_version: "7.2.0".into(),
        lock_manager: "lockd".into(),
    }
}

fn register() -> RegisterRequest {
    RegisterRequest {
        migration_uri: format!("qemu+tls://{HOST}/system"),
        facts: Some(facts()),
        agent_version: "0.1.0".into(),
        peer_address: format!("{HOST}:7401"),
    }
}

fn xml(uuid: &str) -> String {
    format!(
        "<domain type='kvm'><name>dns1</name><uuid>{uuid}</uuid><memory>1048576</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type></os><devices><disk type='network' device='disk'>\
         <source protocol='rbd' name='pool/dns1'/><target dev='vda'/></disk></devices></domain>"
    )
}

fn heartbeat() -> HeartbeatRequest {
    HeartbeatRequest {
        seq: 2,
        facts: Some(facts()),
        domains: UUIDS
            .iter()
            .enumerate()
            .map(|(i, u)| Domain {
                uuid: u.to_string(),
                name: format!("vm{i}"),
                state: DomainState::Running as i32,
                memory_kib: 1 << 20,
                vcpus: 1,
                persistent: true,
                xml: xml(u),
                guest: None,
            })
            .collect(),
        watchdog: Some(WatchdogStatus {
            armed: true,
            device: "/dev/watchdog0".into(),
            timeout_ms: 10_000,
            problem: String::new(),
        }),
        probes: vec![ProbeResult { name: "libvirtd".into(), ok: true, detail: "answers".into() }],
        roster_version: Some(0),
        ..Default::default()
    }
}

/// A cluster where `HOST` is registered, has reported its VMs, and one of them is protected:
/// the state a hostile host's messages meet.
fn cluster() -> Engine {
    let rules = rules();
    let mut e = Engine::new(ClusterState::default());
    let reg = host_message::registration(HOST, &register()).expect("a valid registration");
    e.step(Input::Register(reg), Millis(1000));
    let hb = host_message::heartbeat(HOST.into(), &heartbeat(), &rules, Some(Millis(1100))).expect("valid");
    e.step(Input::Heartbeat(hb), Millis(1100));
    e.step(
        Input::Operator {
            actor: "fuzz".into(),
            request: Request::Protection {
                vm: UUIDS[0].into(),
                protected: true,
                priority: None,
                anti_affinity: None,
                allowed_hosts: None,
                preferred_host: None,
                // One host: no room to restart it elsewhere, which admission would refuse.
                force: true,
            },
        },
        Millis(1200),
    );
    e
}

fn rules() -> DomainRules {
    DomainRules::new(&[], &[], true, &[], &[]).expect("valid rules")
}

/// Feeds one decoded message to a fresh `cluster()` as the agent API would, then lets time pass.
fn feed(input: impl FnOnce(&DomainRules) -> Result<Option<Input>, vmha_controller::errors::Error>) {
    let rules = rules();
    match input(&rules) {
        Ok(Some(input)) => {
            let mut e = cluster();
            e.step(input, Millis(1300));
            e.step(Input::Tick, Millis(60_000));
        }
        Ok(None) => {}
        Err(refused) => assert!(!refused.to_string().is_empty(), "a refusal says why"),
    }
}

fn decode_and_feed(kind: u8, bytes: &[u8]) {
    match kind % 4 {
        0 => {
            if let Ok(r) = RegisterRequest::decode(bytes) {
                feed(|_| host_message::registration(HOST, &r).map(|reg| Some(Input::Register(reg))));
            }
        }
        1 => {
            if let Ok(r) = HeartbeatRequest::decode(bytes) {
                feed(|rules| {
                    host_message::heartbeat(HOST.into(), &r, rules, Some(Millis(1300)))
                        .map(|hb| Some(Input::Heartbeat(hb)))
                });
            }
        }
        2 => {
            if let Ok(r) = OperationResult::decode(bytes) {
                feed(|_| {
                    host_message::result(r)
                        .map(|(id, result)| Some(Input::Result { host: HOST.into(), id, result }))
                });
            }
        }
        _ => {
            if let Ok(p) = OperationProgress::decode(bytes) {
                feed(|_| host_message::operation_id(&p.operation_id).map(|_| None));
            }
        }
    }
}

/// A real message of each kind, encoded.
fn sample(kind: u8) -> Vec<u8> {
    match kind % 4 {
        0 => register().encode_to_vec(),
        1 => heartbeat().encode_to_vec(),
        2 => OperationResult { operation_id: "3-17".into(), ok: true, elapsed_ms: 900, ..Default::default() }
            .encode_to_vec(),
        _ => OperationProgress { operation_id: "3-17".into(), data_total: 10, ..Default::default() }
            .encode_to_vec(),
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Cut(usize),
}

fn mutated(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let n = bytes.len().max(1);
        match m {
            Mutation::Flip(i, x) => {
                if let Some(b) = bytes.get_mut(i % n) {
                    *b ^= x;
                }
            }
            Mutation::Insert(i, more) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, more.iter().copied());
            }
            Mutation::Cut(i) => bytes.truncate(i % n),
        }
    }
    bytes
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..12)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        any::<usize>().prop_map(Mutation::Cut),
    ]
}

/// XML of random shape: nested elements (sometimes deep), attributes, text, and the names the
/// checks look at, around a `<uuid>` that is sometimes the reported one.
fn domain_xml(uuid: &'static str) -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        "[a-z]{1,8}".prop_map(|t| format!("<{t}/>")),
        Just("<disk type='file'><source file='/etc/shadow'/></disk>".to_string()),
        Just("<interface type='direct'><source dev='eth0'/></interface>".to_string()),
        Just("<seclabel type='none'/>".to_string()),
        "[ -~]{0,20}".prop_map(|t| t.replace(['<', '&'], "")),
        Just(format!("<uuid>{uuid}</uuid>")),
    ];
    let tree = leaf.prop_recursive(8, 64, 6, |inner| {
        (
            "(domain|devices|disk|source|os|[a-z]{1,6})",
            "[a-z]{0,6}",
            "[ -~]{0,12}",
            prop::collection::vec(inner, 0..6),
        )
            .prop_map(|(tag, attr, value, kids)| {
                let value = value.replace(['\'', '<', '&'], "");
                let attr = if attr.is_empty() { String::new() } else { format!(" {attr}='{value}'") };
                format!("<{tag}{attr}>{}</{tag}>", kids.concat())
            })
    });
    let depth = 0usize..200;
    (tree, depth).prop_map(|(t, depth)| {
        let (open, close) = ("<x>".repeat(depth), "</x>".repeat(depth));
        format!("<domain type='kvm'>{open}{t}{close}</domain>")
    })
}

fn domain() -> impl Strategy<Value = Domain> {
    (0..UUIDS.len(), "[ -~]{0,16}", any::<i32>(), any::<u64>(), any::<u32>(), any::<bool>()).prop_flat_map(
        |(i, name, state, memory_kib, vcpus, with_xml)| {
            let xml = if with_xml { domain_xml(UUIDS[i]).boxed() } else { Just(String::new()).boxed() };
            xml.prop_map(move |xml| Domain {
                uuid: UUIDS[i].to_string(),
                name: name.clone(),
                state,
                memory_kib,
                vcpus,
                persistent: true,
                xml,
                // Whatever a host may say of a guest, in range or not.
                guest: Some(vmha_proto::v1::GuestHealth {
                    agent: state,
                    since_answer_ms: memory_kib,
                    quiet_ms: if with_xml { u64::MAX } else { 0 },
                    missed: vcpus,
                    // More results than a VM may have probes, with names and messages of any size.
                    probes: (0..(vcpus % 12))
                        .map(|n| vmha_proto::v1::ServiceProbeResult {
                            name: "p".repeat(n as usize * 9),
                            failures_in_row: vcpus,
                            passed_once: with_xml,
                            last_error: "e".repeat(memory_kib as usize % 5_000),
                        })
                        .collect(),
                }),
            })
        },
    )
}

fn any_facts() -> impl Strategy<Value = HostFacts> {
    (any::<u32>(), any::<u64>(), any::<u64>(), "[ -~]{0,16}").prop_map(|(cpus, total, free, s)| HostFacts {
        cpus,
        memory_total_kib: total,
        memory_free_kib: free,
        cpu_model: s.clone(),
        libvirt_version: s.clone(),
        hypervisor_version: s.clone(),
        lock_manager: s,
    })
}

fn any_heartbeat() -> impl Strategy<Value = HeartbeatRequest> {
    (
        (any::<u64>(), prop::option::of(any_facts()), prop::collection::vec(domain(), 0..4)),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>()),
        (prop::option::of(any::<u64>()), any::<u64>(), any::<bool>(), any::<u32>()),
    )
        .prop_map(
            |(
                (seq, facts, domains),
                (stamp, held, epoch, self_fenced, unknown),
                (roster, crl, armed, timeout),
            )| {
                HeartbeatRequest {
                    seq,
                    facts,
                    domains,
                    echo_stamp_ms: stamp,
                    echo_held_ms: held,
                    echo_epoch: epoch,
                    self_fenced,
                    probes: vec![ProbeResult { name: "libvirtd".into(), ok: armed, detail: String::new() }],
                    domains_unknown: unknown,
                    watchdog: Some(WatchdogStatus {
                        armed,
                        device: "/dev/watchdog0".into(),
                        timeout_ms: u64::from(timeout),
                        problem: String::new(),
                    }),
                    roster_version: roster,
                    crl_number: crl,
                    probes_version: stamp,
                }
            },
        )
}

#[test]
fn the_cluster_the_messages_meet_has_the_host_its_vms_and_a_protected_one() {
    let e = cluster();
    assert!(e.cluster.hosts.contains_key(HOST));
    assert_eq!(e.cluster.vms.len(), UUIDS.len());
    assert!(e.cluster.vms[UUIDS[0]].protected, "dns1 is protected");
    assert!(!e.cluster.vms[UUIDS[0]].xml.is_empty(), "its definition was taken");
    // And a well-formed heartbeat of random values gets as far as the engine often enough to
    // matter: the generator is not refused wholesale.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let rules = rules();
    let taken = (0..200)
        .filter(|_| {
            let hb = any_heartbeat().new_tree(&mut runner).unwrap().current();
            host_message::heartbeat(HOST.into(), &hb, &rules, None).is_ok()
        })
        .count();
    assert!(taken > 50, "only {taken} of 200 random heartbeats pass the checks");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(kind in any::<u8>(), bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        decode_and_feed(kind, &bytes);
    }

    #[test]
    fn damaged_messages_never_panic(kind in any::<u8>(), mutations in prop::collection::vec(mutation(), 1..6)) {
        decode_and_feed(kind, &mutated(sample(kind), &mutations));
    }

    #[test]
    fn heartbeats_with_any_values_never_panic(hb in any_heartbeat()) {
        decode_and_feed(1, &hb.encode_to_vec());
    }

    #[test]
    fn registrations_and_results_with_any_values_never_panic(
        facts in any_facts(),
        uri in "[ -~]{0,40}",
        op in "[0-9-]{0,12}",
        ok in any::<bool>(),
        numbers in (any::<u64>(), any::<u64>(), any::<u64>()),
    ) {
        let r = RegisterRequest { migration_uri: uri.clone(), facts: Some(facts), agent_version: "x".into(), peer_address: uri };
        decode_and_feed(0, &r.encode_to_vec());
        let (elapsed_ms, downtime_ms, bytes) = numbers;
        let res = OperationResult { operation_id: op, ok, elapsed_ms, downtime_ms, bytes, error: String::new() };
        decode_and_feed(2, &res.encode_to_vec());
    }
}
