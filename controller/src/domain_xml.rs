//! Checks on the domain XML agents report, before the controller keeps it. The XML kept is what
//! the controller defines on another host when the VM's host dies, so a host (or whoever
//! forges its heartbeats) could otherwise make another hypervisor run whatever it likes: a
//! passthrough device, a QEMU command line, a disk that is another host's local file.
//!
//! A definition is accepted only if it has no host device passthrough (`<hostdev>`,
//! `<interface type='hostdev'>`, evdev and passthrough input), no element of the `qemu:`
//! namespace (nor of any other namespace outside `<metadata>`), no program libvirt would run
//! (an interface's `<script>`, a filesystem's `<binary path>`), an allowed `<emulator>`, file
//! disks, filesystems and kernel/initrd images under the shared storage, block disks only from
//! the allow-list, network disks only when allowed, no other kind of disk. Paths are compared
//! normalised, as text: a `..` component is refused, symlinks are not followed (the
//! controller does not see the hosts' file systems).
//!
//! Parsing only, no I/O: the check runs in the shell, before the heartbeat reaches the engine.

use std::fmt;

/// Emulators accepted without `--allow-emulator`: where distributions install QEMU.
pub const DEFAULT_EMULATORS: [&str; 3] =
    ["/usr/bin/qemu-system-x86_64", "/usr/bin/kvm", "/usr/libexec/qemu-kvm"];
/// Where distributions install UEFI and BIOS firmware: a `<loader>` or an NVRAM template may
/// be there (or under the shared storage); `--firmware-dir` adds directories.
pub const DEFAULT_FIRMWARE_DIRS: [&str; 5] =
    ["/usr/share/OVMF", "/usr/share/edk2", "/usr/share/AAVMF", "/usr/share/qemu", "/usr/share/seabios"];
/// libvirt's own place for UEFI variable stores: an `<nvram>` may be there (libvirt creates it
/// afresh from its template on a host that lacks it) or under the shared storage.
pub const NVRAM_DIR: &str = "/var/lib/libvirt/qemu/nvram";
const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// Problems named in one refusal; more are counted.
const MAX_PROBLEMS: usize = 8;
/// How deep elements may nest. libvirt's own domain XML nests about 6 deep; the parser and the
/// check's walk recurse, so a host's 4,000-deep document would overflow the stack and abort the
/// controller (standbys too). Counted on the text before anything recurses.
pub const MAX_DEPTH: usize = 64;

/// What the operator allows in a definition (the controller's flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainRules {
    shared_storage: Vec<String>,
    block_devices: Vec<String>,
    network_disks: bool,
    emulators: Vec<String>,
    firmware_dirs: Vec<String>,
}

/// A flag's path that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {path}: {why}")]
pub struct BadRule {
    pub flag: &'static str,
    pub path: String,
    pub why: &'static str,
}

/// One thing wrong with a definition, naming the element.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("the XML does not parse: {0}")]
    Malformed(String),
    #[error("elements nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the root element is <{0}>, not <domain>")]
    NotADomain(String),
    #[error("{0}: host device passthrough is not allowed (the device belongs to one host)")]
    HostDevice(String),
    #[error("{0}: QEMU passthrough (the qemu: namespace) is not allowed")]
    QemuPassthrough(String),
    #[error("{element}: elements of namespace {namespace} are allowed only under <metadata>")]
    Namespace { element: String, namespace: String },
    #[error("{element}: {path} is not an allowed emulator ({allowed}; --allow-emulator adds one)")]
    Emulator { element: String, path: String, allowed: String },
    #[error("{element}: {path} is not under the shared storage ({storage})")]
    NotShared { element: String, path: String, storage: String },
    #[error("{element}: {path} is not a plain absolute path ({why})")]
    BadPath { element: String, path: String, why: &'static str },
    #[error("{element}: block device {path} is not allowed (--allow-block-device)")]
    BlockDevice { element: String, path: String },
    #[error("{0}: network disks are not allowed (--allow-network-disks)")]
    NetworkDisk(String),
    #[error("{element}: type '{kind}' is not allowed ({allowed})")]
    Kind { element: String, kind: String, allowed: &'static str },
    #[error("{element}: {what} is not allowed (libvirt would run it as root on the next host)")]
    Runs { element: String, what: String },
    #[error("<uuid> is {claimed}, but the host reported the definition as VM {reported}")]
    Identity { claimed: String, reported: String },
    #[error("{element}: {what} is not allowed (it would reach into the host the guest runs on)")]
    ReachesHost { element: String, what: String },
}

/// Why a definition is refused: every problem found, at most `MAX_PROBLEMS` named.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Refused(pub Vec<Problem>);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().take(MAX_PROBLEMS).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        if self.0.len() > MAX_PROBLEMS {
            write!(f, "; and {} more", self.0.len() - MAX_PROBLEMS)?;
        }
        Ok(())
    }
}

/// `path` as normalised absolute components: `.` and empty components dropped; relative
/// paths and `..` refused.
fn components(path: &str) -> Result<Vec<&str>, &'static str> {
    if !path.starts_with('/') {
        return Err("not absolute");
    }
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("a '..' component"),
            c if c.contains('\0') => return Err("a NUL byte"),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn normalised(path: &str) -> Result<String, &'static str> {
    Ok(format!("/{}", components(path)?.join("/")))
}

/// Whether `path` lies strictly inside directory `dir` (both normalised).
fn inside(path: &str, dir: &str) -> bool {
    dir == "/" && path != "/"
        || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
}

/// The defaults: no shared storage (so no file disk), no block device, no network disk.
impl Default for DomainRules {
    fn default() -> DomainRules {
        DomainRules::new(&[], &[], false, &[], &[]).expect("the defaults are absolute paths")
    }
}

impl DomainRules {
    /// Rules from the controller's flags; the emulators and firmware directories add to the
    /// defaults. Every path must be absolute without `..`.
    pub fn new(
        shared_storage: &[std::path::PathBuf],
        block_devices: &[std::path::PathBuf],
        network_disks: bool,
        emulators: &[std::path::PathBuf],
        firmware_dirs: &[std::path::PathBuf],
    ) -> Result<DomainRules, BadRule> {
        let paths = |flag: &'static str, given: &[std::path::PathBuf], defaults: &[&str]| {
            let mut out: Vec<String> = defaults.iter().map(|d| d.to_string()).collect();
            for p in given {
                let text = p.to_string_lossy();
                let n = normalised(&text).map_err(|why| BadRule { flag, path: text.to_string(), why })?;
                if !out.contains(&n) {
                    out.push(n);
                }
            }
            Ok(out)
        };
        Ok(DomainRules {
            shared_storage: paths("--shared-storage", shared_storage, &[])?,
            block_devices: paths("--allow-block-device", block_devices, &[])?,
            network_disks,
            emulators: paths("--allow-emulator", emulators, &DEFAULT_EMULATORS)?,
            firmware_dirs: paths("--firmware-dir", firmware_dirs, &DEFAULT_FIRMWARE_DIRS)?,
        })
    }

    /// What the shared storage is, for refusals.
    fn storage(&self) -> String {
        if self.shared_storage.is_empty() {
            "no --shared-storage is configured, so no file is".into()
        } else {
            format!("--shared-storage {}", self.shared_storage.join(", "))
        }
    }

    /// Accepts `xml` as the definition of VM `uuid` (as its host reported it), with the
    /// writable disks it uses (which the engine keeps to one VM each), or says everything
    /// wrong with it. The definition's own `<uuid>` must be that one: a failover would
    /// otherwise start, on another host, whatever VM the definition names.
    pub fn check(&self, xml: &str, uuid: &str) -> Result<Vec<String>, Refused> {
        if nesting_exceeds(xml, MAX_DEPTH) {
            return Err(Refused(vec![Problem::TooDeep]));
        }
        let doc = match roxmltree::Document::parse(xml) {
            Ok(doc) => doc,
            Err(e) => return Err(Refused(vec![Problem::Malformed(e.to_string())])),
        };
        let mut c = Check { rules: self, problems: Vec::new(), disks: Vec::new() };
        let root = doc.root_element();
        let claimed = child(root, "uuid").map(text).unwrap_or("");
        if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
            c.problems.push(Problem::NotADomain(root.tag_name().name().to_string()));
        } else if !claimed.eq_ignore_ascii_case(uuid) {
            let claimed =
                if claimed.is_empty() { "missing".to_string() } else { claimed.chars().take(64).collect() };
            c.problems.push(Problem::Identity { claimed, reported: uuid.to_string() });
        }
        c.walk(root);
        if c.problems.is_empty() { Ok(c.disks) } else { Err(Refused(c.problems)) }
    }
}

/// The writable disks of a definition accepted before (one loaded from the database), as
/// `DomainRules::check` reads them; none if it does not parse.
pub fn disks(xml: &str) -> Vec<String> {
    if nesting_exceeds(xml, MAX_DEPTH) {
        return Vec::new();
    }
    let Ok(doc) = roxmltree::Document::parse(xml) else { return Vec::new() };
    // As the checks' walk finds them: not under <metadata>, which libvirt does not read.
    doc.descendants()
        .filter(|n| n.has_tag_name("disk") && !n.ancestors().any(|a| a.has_tag_name("metadata")))
        .filter_map(writable_disk)
        .collect()
}

/// What a `<disk>` writes to, naming it as no other disk could: its normalised file or
/// device path, or `protocol:name` of a network image. None for a CD-ROM or floppy, or a
/// disk marked `<readonly/>` or `<shareable/>` (a base image or cluster disk many VMs use).
fn writable_disk(e: Node) -> Option<String> {
    if matches!(attr(e, "device"), Some("cdrom" | "floppy"))
        || child(e, "readonly").is_some()
        || child(e, "shareable").is_some()
    {
        return None;
    }
    let source = child(e, "source")?;
    match attr(e, "type").unwrap_or("file") {
        "file" => normalised(attr(source, "file")?).ok(),
        "block" => normalised(attr(source, "dev")?).ok(),
        "network" => Some(format!("{}:{}", attr(source, "protocol").unwrap_or("?"), attr(source, "name")?)),
        _ => None,
    }
}

/// Whether elements in `xml` nest deeper than `max`, read from the text without recursion.
/// It may count too deep for text that is not XML (which the parser refuses anyway), never too
/// shallow: every `<` that does not start a comment, CDATA section, processing instruction,
/// declaration or end tag opens an element unless its tag ends in `/>`.
fn nesting_exceeds(xml: &str, max: usize) -> bool {
    let b = xml.as_bytes();
    let skip_past = |from: usize, end: &[u8]| {
        b[from..].windows(end.len()).position(|w| w == end).map_or(b.len(), |p| from + p + end.len())
    };
    let (mut i, mut depth) = (0, 0usize);
    while let Some(p) = b[i..].iter().position(|&c| c == b'<') {
        i += p;
        let rest = &b[i..];
        if rest.starts_with(b"<!--") {
            i = skip_past(i + 4, b"-->");
        } else if rest.starts_with(b"<![CDATA[") {
            i = skip_past(i + 9, b"]]>");
        } else if rest.starts_with(b"<?") {
            i = skip_past(i + 2, b"?>");
        } else if rest.starts_with(b"</") {
            depth = depth.saturating_sub(1);
            i = skip_past(i + 2, b">");
        } else if rest.starts_with(b"<!") {
            i = skip_past(i + 2, b">");
        } else {
            // A start tag: to its `>`, stepping over quoted attribute values.
            let (mut j, mut quote) = (i + 1, None);
            while j < b.len() {
                match (quote, b[j]) {
                    (None, q @ (b'"' | b'\'')) => quote = Some(q),
                    (Some(q), c) if c == q => quote = None,
                    (None, b'>') => break,
                    _ => {}
                }
                j += 1;
            }
            if !(j < b.len() && b[j - 1] == b'/') {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            i = j + 1;
        }
        if i >= b.len() {
            break;
        }
    }
    false
}

struct Check<'r> {
    rules: &'r DomainRules,
    problems: Vec<Problem>,
    /// The writable disks it uses (`writable_disk`).
    disks: Vec<String>,
}

type Node<'a, 'i> = roxmltree::Node<'a, 'i>;

/// The element's own attribute (no namespace).
fn attr<'a>(n: Node<'a, '_>, name: &str) -> Option<&'a str> {
    n.attribute(name)
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| c.is_element() && c.tag_name().name() == name)
}

fn text<'a>(n: Node<'a, '_>) -> &'a str {
    n.text().unwrap_or("").trim()
}

impl Check<'_> {
    /// Every element but `<metadata>`'s content (opaque to libvirt: only the qemu namespace is
    /// refused there too).
    fn walk(&mut self, n: Node) {
        for e in n.children().filter(|c| c.is_element()) {
            let name = e.tag_name().name();
            if e.tag_name().namespace() == Some(QEMU_NAMESPACE)
                || e.attributes().any(|a| a.namespace() == Some(QEMU_NAMESPACE))
            {
                self.problems.push(Problem::QemuPassthrough(format!("<qemu:{name}>")));
                continue;
            }
            if name == "metadata" && e.tag_name().namespace().is_none() {
                self.metadata(e);
                continue;
            }
            if let Some(ns) = e.tag_name().namespace() {
                self.problems
                    .push(Problem::Namespace { element: format!("<{name}>"), namespace: ns.to_string() });
                continue;
            }
            match name {
                "hostdev" => {
                    let kind = attr(e, "type").unwrap_or("?");
                    self.problems.push(Problem::HostDevice(format!("hostdev (type {kind})")));
                    continue;
                }
                "emulator" => self.emulator(e),
                "disk" => self.disk(e),
                "filesystem" => self.filesystem(e),
                "interface" => self.interface(e),
                "input" if matches!(attr(e, "type"), Some("passthrough" | "evdev")) => {
                    self.problems
                        .push(Problem::HostDevice(format!("input (type {})", attr(e, "type").unwrap_or(""))));
                    continue;
                }
                "os" => self.os(e),
                "seclabel" if matches!(attr(e, "type"), Some("none" | "static")) => {
                    let what = match attr(e, "type") {
                        Some("none") => "a security label of type 'none' (no confinement)",
                        _ => "a static security label (a fixed user or context, root's among them)",
                    };
                    self.reaches("<seclabel>", what);
                    continue;
                }
                "serial" | "console" | "parallel" | "channel" => self.character_device(e),
                "tpm" if child(e, "backend").and_then(|b| attr(b, "type")) == Some("passthrough") => {
                    self.reaches("<tpm>", "the host's TPM (backend passthrough)")
                }
                "smartcard" if attr(e, "mode").is_some_and(|m| m.starts_with("host")) => {
                    self.reaches("<smartcard>", "the host's smartcard reader (mode host)")
                }
                "shmem" => self.reaches("<shmem>", "memory shared with the host"),
                "graphics" => self.graphics(e),
                _ => {}
            }
            self.walk(e);
        }
    }

    fn reaches(&mut self, element: &str, what: &str) {
        self.problems.push(Problem::ReachesHost { element: element.into(), what: what.into() });
    }

    /// A serial port, console or channel: a pseudo-terminal, a socket libvirt makes for it, or
    /// the network; never a host file, device or pipe.
    fn character_device(&mut self, e: Node) {
        let element = format!("<{}>", e.tag_name().name());
        let path = child(e, "source").and_then(|s| attr(s, "path"));
        match attr(e, "type") {
            Some(kind @ ("file" | "dev" | "pipe")) => {
                let what = format!("type '{kind}' ({})", path.unwrap_or("a host path"));
                self.reaches(&element, &what)
            }
            Some("unix") => {
                let libvirts = |p: &str| {
                    normalised(p).is_ok_and(|n| {
                        ["/var/lib/libvirt/qemu", "/run/libvirt/qemu"].iter().any(|d| inside(&n, d))
                    })
                };
                if let Some(p) = path.filter(|p| !libvirts(p)) {
                    self.reaches(
                        &element,
                        &format!("a socket at {p} (libvirt's own are under /var/lib/libvirt/qemu)"),
                    )
                }
            }
            _ => {}
        }
    }

    /// A VNC or SPICE display listening on every address of whichever host runs the guest.
    fn graphics(&mut self, e: Node) {
        let listens = attr(e, "listen").into_iter().chain(
            e.children()
                .filter(|c| c.is_element() && c.tag_name().name() == "listen")
                .filter_map(|l| attr(l, "address")),
        );
        for a in listens.filter(|a| matches!(a.trim(), "0.0.0.0" | "::" | "[::]" | "*")) {
            let kind = attr(e, "type").unwrap_or("?");
            self.reaches(
                "<graphics>",
                &format!("a {kind} display on all addresses ({a}); listen on 127.0.0.1"),
            );
        }
    }

    fn metadata(&mut self, n: Node) {
        for e in n.descendants().filter(|d| d.is_element()) {
            if e.tag_name().namespace() == Some(QEMU_NAMESPACE) {
                self.problems.push(Problem::QemuPassthrough(format!("<qemu:{}>", e.tag_name().name())));
            }
        }
    }

    fn path(&mut self, element: &str, path: &str) -> Option<String> {
        match normalised(path) {
            Ok(p) => Some(p),
            Err(why) => {
                self.problems.push(Problem::BadPath { element: element.into(), path: path.into(), why });
                None
            }
        }
    }

    /// `path` must lie under the shared storage or one of `also`.
    fn shared(&mut self, element: &str, path: &str, also: &[&str]) {
        let Some(p) = self.path(element, path) else { return };
        let rules = self.rules;
        if rules.shared_storage.iter().map(String::as_str).chain(also.iter().copied()).any(|d| inside(&p, d))
        {
            return;
        }
        let mut storage = rules.storage();
        if !also.is_empty() {
            storage += &format!(", nor under {}", also.join(", "));
        }
        self.problems.push(Problem::NotShared { element: element.into(), path: path.into(), storage });
    }

    fn block(&mut self, element: &str, dev: &str) {
        let Some(p) = self.path(element, dev) else { return };
        if !self.rules.block_devices.contains(&p) {
            self.problems.push(Problem::BlockDevice { element: element.into(), path: dev.into() });
        }
    }

    fn emulator(&mut self, e: Node) {
        let path = text(e);
        if let Some(p) = self.path("emulator", path)
            && !self.rules.emulators.contains(&p)
        {
            self.problems.push(Problem::Emulator {
                element: "emulator".into(),
                path: path.into(),
                allowed: self.rules.emulators.join(", "),
            });
        }
    }

    /// A disk and the images it names: its source, its backing chain, an external data file.
    fn disk(&mut self, e: Node) {
        let element = match child(e, "target").and_then(|t| attr(t, "dev")) {
            Some(dev) => format!("disk {dev}"),
            None => "disk".to_string(),
        };
        self.disks.extend(writable_disk(e));
        for n in e.descendants().filter(|n| {
            n.is_element() && matches!(n.tag_name().name(), "disk" | "backingStore" | "dataStore" | "mirror")
        }) {
            // `<backingStore/>`: the chain ends here.
            if n.tag_name().name() == "backingStore" && !n.has_children() && attr(n, "type").is_none() {
                continue;
            }
            let source = child(n, "source");
            // An older block job's mirror names its file on itself.
            if let Some(f) = attr(n, "file") {
                self.shared(&element, f, &[]);
            }
            match attr(n, "type").unwrap_or("file") {
                kind @ ("file" | "block") => self.backed_by(&element, kind, source),
                "network" => {
                    if !self.rules.network_disks {
                        self.problems.push(Problem::NetworkDisk(element.clone()));
                    }
                }
                kind => self.problems.push(Problem::Kind {
                    element: element.clone(),
                    kind: kind.into(),
                    allowed: "only file, block and network disks",
                }),
            }
        }
    }

    /// A file-backed source must be on the shared storage, a block device on the allow-list.
    fn backed_by(&mut self, element: &str, kind: &str, source: Option<Node>) {
        if kind == "file" {
            if let Some(f) = source.and_then(|s| attr(s, "file")) {
                self.shared(element, f, &[]);
            }
        } else if let Some(d) = source.and_then(|s| attr(s, "dev")) {
            self.block(element, d);
        }
    }

    fn filesystem(&mut self, e: Node) {
        let element = match child(e, "target").and_then(|t| attr(t, "dir")) {
            Some(dir) => format!("filesystem {dir}"),
            None => "filesystem".to_string(),
        };
        let source = child(e, "source");
        match attr(e, "type").unwrap_or("mount") {
            "mount" => {
                if let Some(d) = source.and_then(|s| attr(s, "dir")) {
                    self.shared(&element, d, &[]);
                }
            }
            kind @ ("file" | "block") => self.backed_by(&element, kind, source),
            kind => self.problems.push(Problem::Kind {
                element: element.clone(),
                kind: kind.into(),
                allowed: "only mount, file and block filesystems",
            }),
        }
        if let Some(b) = child(e, "binary").and_then(|b| attr(b, "path")) {
            self.problems.push(Problem::Runs { element, what: format!("virtiofsd binary {b}") });
        }
    }

    fn interface(&mut self, e: Node) {
        let element = match child(e, "mac").and_then(|m| attr(m, "address")) {
            Some(mac) => format!("interface {mac}"),
            None => "interface".to_string(),
        };
        match attr(e, "type") {
            Some("hostdev") => self.problems.push(Problem::HostDevice(format!("{element} (type hostdev)"))),
            Some("direct") => self.reaches(&element, "type 'direct' (macvtap on one host's network card)"),
            _ => {}
        }
        for s in ["script", "downscript"] {
            if let Some(p) = child(e, s).and_then(|s| attr(s, "path")) {
                self.problems.push(Problem::Runs { element: element.clone(), what: format!("{s} {p}") });
            }
        }
    }

    /// Boot images: a kernel, initrd or device tree under the shared storage; firmware also
    /// where distributions install it; UEFI variables also where libvirt keeps them.
    fn os(&mut self, e: Node) {
        let firmware: Vec<String> = self.rules.firmware_dirs.clone();
        let firmware: Vec<&str> = firmware.iter().map(String::as_str).collect();
        for n in e.children().filter(|c| c.is_element()) {
            let name = n.tag_name().name();
            let element = format!("<{name}>");
            match name {
                "kernel" | "initrd" | "dtb" => self.shared(&element, text(n), &[]),
                "loader" if !text(n).is_empty() => self.shared(&element, text(n), &firmware),
                "nvram" => {
                    if !text(n).is_empty() {
                        self.shared(&element, text(n), &[NVRAM_DIR]);
                    }
                    if let Some(f) = child(n, "source").and_then(|s| attr(s, "file")) {
                        self.shared(&element, f, &[NVRAM_DIR]);
                    }
                    if let Some(t) = attr(n, "template") {
                        self.shared("<nvram> template", t, &firmware);
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The UUID in `dumpxml`, and in the generated domains below.
    pub(super) const UUID: &str = "0f3c3a2e-1111-4222-8333-944455556666";

    fn rules(storage: &[&str], block: &[&str], network: bool) -> DomainRules {
        let p = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        DomainRules::new(&p(storage), &p(block), network, &[], &[]).unwrap()
    }

    /// `virsh dumpxml` of a lab guest (see deploy/lab/up's guest_xml), with `devices` in place of
    /// its disk.
    fn dumpxml(devices: &str) -> String {
        format!(
            r#"<domain type='kvm' id='3'>
  <name>web1</name>
  <uuid>0f3c3a2e-1111-4222-8333-944455556666</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>131072</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-i440fx-8.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {devices}
    <controller type='usb' index='0' model='piix3-uhci'>
      <alias name='usb'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <interface type='network'>
      <mac address='52:54:00:6b:3c:58'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <source path='/dev/pts/3'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='pty' tty='/dev/pts/3'>
      <target type='serial' port='0'/>
    </console>
    <input type='mouse' bus='ps2'/>
    <memballoon model='virtio'/>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'/>
</domain>
"#
        )
    }

    fn file_disk(path: &str) -> String {
        format!(
            r#"<disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{path}' index='1'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>"#
        )
    }

    fn refusal(r: &DomainRules, xml: &str) -> String {
        r.check(xml, UUID).expect_err("refused").to_string()
    }

    #[test]
    fn the_labs_guest_on_shared_storage_is_accepted() {
        let lab = rules(&["/srv/vmstore/images"], &[], false);
        lab.check(&dumpxml(&file_disk("/srv/vmstore/images/web1.qcow2")), UUID).unwrap();
        lab.check(&dumpxml(&file_disk("/srv/vmstore//images/./web1.qcow2")), UUID).unwrap();
        lab.check(&dumpxml(""), UUID).unwrap();
        // An empty CD-ROM drive names no file.
        lab.check(&dumpxml("<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>"), UUID)
            .unwrap();
    }

    #[test]
    fn a_file_outside_the_shared_storage_is_refused_saying_where_it_should_be() {
        let r = rules(&["/srv/vms"], &[], false);
        assert_eq!(
            refusal(&r, &dumpxml(&file_disk("/var/lib/libvirt/images/x.qcow2"))),
            "disk vda: /var/lib/libvirt/images/x.qcow2 is not under the shared storage (--shared-storage /srv/vms)"
        );
        // The storage directory itself, and a sibling that shares its prefix, are not under it.
        assert!(r.check(&dumpxml(&file_disk("/srv/vms")), UUID).is_err());
        assert!(r.check(&dumpxml(&file_disk("/srv/vms2/a.qcow2")), UUID).is_err());
        let none = DomainRules::default();
        assert!(refusal(&none, &dumpxml(&file_disk("/srv/vms/a.qcow2"))).contains("no --shared-storage"));
        // A backing file counts too.
        let chain = "<disk type='file' device='disk'><source file='/srv/vms/top.qcow2'/>
            <backingStore type='file' index='2'><format type='qcow2'/><source file='/etc/shadow'/>
            <backingStore/></backingStore><target dev='vdb' bus='virtio'/></disk>";
        assert!(refusal(&r, &dumpxml(chain)).starts_with("disk vdb: /etc/shadow is not under"));
    }

    #[test]
    fn dot_dot_and_relative_paths_are_refused() {
        let r = rules(&["/srv/vms"], &[], false);
        assert_eq!(
            refusal(&r, &dumpxml(&file_disk("/srv/vms/../../etc/shadow"))),
            "disk vda: /srv/vms/../../etc/shadow is not a plain absolute path (a '..' component)"
        );
        assert!(refusal(&r, &dumpxml(&file_disk("srv/vms/a.qcow2"))).contains("not absolute"));
        assert!(DomainRules::new(&[PathBuf::from("/srv/../etc")], &[], false, &[], &[]).is_err());
    }

    #[test]
    fn host_devices_are_refused() {
        let r = rules(&["/srv/vms"], &[], false);
        let hostdev = "<hostdev mode='subsystem' type='pci' managed='yes'>
            <source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>";
        assert!(refusal(&r, &dumpxml(hostdev)).starts_with("hostdev (type pci): host device passthrough"));
        let vf = "<interface type='hostdev' managed='yes'><mac address='52:54:00:00:00:01'/>
            <source><address type='pci' domain='0x0000' bus='0x04' slot='0x10' function='0x1'/></source></interface>";
        assert!(refusal(&r, &dumpxml(vf)).contains("interface 52:54:00:00:00:01 (type hostdev)"));
        let evdev = "<input type='evdev'><source dev='/dev/input/event3'/></input>";
        assert!(refusal(&r, &dumpxml(evdev)).contains("input (type evdev)"));
    }

    #[test]
    fn block_disks_only_from_the_allow_list_and_network_disks_only_when_allowed() {
        let block =
            "<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none' io='native'/>
            <source dev='/dev/sdb' index='2'/><backingStore/><target dev='vdb' bus='virtio'/></disk>";
        assert_eq!(
            refusal(&rules(&["/srv/vms"], &[], false), &dumpxml(block)),
            "disk vdb: block device /dev/sdb is not allowed (--allow-block-device)"
        );
        rules(&[], &["/dev/sdb"], false).check(&dumpxml(block), UUID).unwrap();
        let rbd = "<disk type='network' device='disk'><driver name='qemu' type='raw'/>
            <source protocol='rbd' name='vms/web1'><host name='ceph1' port='6789'/></source>
            <target dev='vdc' bus='virtio'/></disk>";
        assert!(refusal(&rules(&[], &[], false), &dumpxml(rbd)).contains("--allow-network-disks"));
        rules(&[], &[], true).check(&dumpxml(rbd), UUID).unwrap();
        let volume = "<disk type='volume' device='disk'><source pool='default' volume='x.qcow2'/>
            <target dev='vdd' bus='virtio'/></disk>";
        assert!(
            refusal(&rules(&["/srv/vms"], &[], true), &dumpxml(volume))
                .contains("type 'volume' is not allowed")
        );
    }

    #[test]
    fn qemu_passthrough_and_foreign_namespaces_are_refused() {
        let r = rules(&["/srv/vms"], &[], false);
        let xml = dumpxml("").replace(
            "<domain type='kvm' id='3'>",
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
        );
        let xml = xml.replace(
            "</domain>",
            "<qemu:commandline><qemu:arg value='-device'/><qemu:arg value='x'/></qemu:commandline></domain>",
        );
        assert_eq!(
            refusal(&r, &xml),
            "<qemu:commandline>: QEMU passthrough (the qemu: namespace) is not allowed"
        );
        let other = dumpxml("<x:thing xmlns:x='urn:x'/>");
        assert!(refusal(&r, &other).contains("allowed only under <metadata>"));
        // The default namespace does not hide a domain from the checks.
        let hidden = "<domain xmlns='http://libvirt.org/schemas/domain/qemu/1.0'><name>x</name></domain>";
        assert!(r.check(hidden, UUID).is_err());
    }

    #[test]
    fn only_allowed_emulators_and_no_programs_for_libvirt_to_run() {
        let r = rules(&["/srv/vms"], &[], false);
        let xml = dumpxml("").replace("/usr/bin/qemu-system-x86_64", "/tmp/evil");
        assert!(refusal(&r, &xml).starts_with("emulator: /tmp/evil is not an allowed emulator"));
        let extra = DomainRules::new(&[], &[], false, &[PathBuf::from("/tmp/evil")], &[]).unwrap();
        extra.check(&xml, UUID).unwrap();
        let script = "<interface type='ethernet'><mac address='52:54:00:00:00:02'/>
            <script path='/usr/sbin/reboot'/></interface>";
        assert!(refusal(&r, &dumpxml(script)).contains("script /usr/sbin/reboot is not allowed"));
        let fs = "<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/>
            <binary path='/tmp/virtiofsd'/><source dir='/srv/vms/share'/><target dir='share'/></filesystem>";
        assert!(refusal(&r, &dumpxml(fs)).contains("virtiofsd binary /tmp/virtiofsd"));
        let fs_out = "<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>";
        assert!(refusal(&r, &dumpxml(fs_out)).starts_with("filesystem root: / is not under"));
    }

    #[test]
    fn a_definition_must_name_the_vm_it_was_reported_as() {
        let r = rules(&["/srv/vms"], &[], false);
        r.check(&dumpxml(""), &UUID.to_uppercase()).unwrap();
        let other = "5a5a5a5a-0000-4000-8000-000000000001";
        assert_eq!(
            r.check(&dumpxml(""), other).unwrap_err().to_string(),
            format!("<uuid> is {UUID}, but the host reported the definition as VM {other}")
        );
        let without = dumpxml("").replace(&format!("<uuid>{UUID}</uuid>"), "");
        assert!(refusal(&r, &without).starts_with("<uuid> is missing"));
    }

    #[test]
    fn the_writable_disks_are_named_once_and_shared_ones_not_at_all() {
        let r = rules(&["/srv/vms"], &["/dev/disk/by-id/lun"], true);
        let xml = dumpxml(&format!(
            "{}<disk type='file' device='cdrom'><source file='/srv/vms/debian.iso'/><target dev='hdc'/></disk>\
             <disk type='file'><source file='/srv/vms/base.qcow2'/><readonly/><target dev='vdb'/></disk>\
             <disk type='block'><source dev='/dev/disk/by-id/./lun'/><shareable/><target dev='vdc'/></disk>\
             <disk type='block'><source dev='/dev//disk/by-id/lun'/><target dev='vdd'/></disk>\
             <disk type='network'><source protocol='rbd' name='pool/web1'/><target dev='vde'/></disk>",
            file_disk("/srv/vms/./web1.qcow2").replace(
                "<backingStore/>",
                "<backingStore type='file'><source file='/srv/vms/base.qcow2'/></backingStore>"
            )
        ));
        let named = ["/srv/vms/web1.qcow2", "/dev/disk/by-id/lun", "rbd:pool/web1"];
        assert_eq!(r.check(&xml, UUID).unwrap(), named);
        assert_eq!(disks(&xml), named, "as read back from the database");
        assert!(disks("<domain><disk").is_empty());
        let in_metadata = dumpxml("").replace(
            "<metadata>",
            "<metadata><disk type='file'><source file='/srv/vms/other.qcow2'/></disk>",
        );
        assert!(disks(&in_metadata).is_empty(), "libvirt does not read <metadata>");
    }

    #[test]
    fn what_reaches_into_the_host_is_refused() {
        let r = rules(&["/srv/vms"], &[], false);
        let with = |extra: &str| dumpxml(extra);
        let seclabel = dumpxml("").replace(
            "<seclabel type='dynamic' model='apparmor' relabel='yes'/>",
            "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>",
        );
        assert!(refusal(&r, &seclabel).starts_with("<seclabel>: a static security label"));
        let unconfined = dumpxml("")
            .replace("<seclabel type='dynamic' model='apparmor' relabel='yes'/>", "<seclabel type='none'/>");
        assert!(refusal(&r, &unconfined).contains("(no confinement)"));
        for (xml, says) in [
            (
                "<serial type='file'><source path='/etc/shadow'/></serial>",
                "<serial>: type 'file' (/etc/shadow)",
            ),
            ("<console type='dev'><source path='/dev/sda'/></console>", "<console>: type 'dev' (/dev/sda)"),
            (
                "<channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/../../../../root/s'/></channel>",
                "<channel>: a socket at /var/lib/libvirt/qemu/../../../../root/s",
            ),
            ("<tpm model='tpm-crb'><backend type='passthrough'/></tpm>", "<tpm>: the host's TPM"),
            (
                "<interface type='direct'><mac address='52:54:00:00:00:09'/></interface>",
                "interface 52:54:00:00:00:09",
            ),
            ("<smartcard mode='host-certificates'/>", "<smartcard>: the host's smartcard reader"),
            ("<shmem name='ivshmem'/>", "<shmem>: memory shared with the host"),
            ("<graphics type='spice' listen='0.0.0.0'/>", "a spice display on all addresses (0.0.0.0)"),
        ] {
            let refused = refusal(&r, &with(xml));
            assert!(refused.contains(says), "{xml}: {refused}");
            assert!(refused.contains("is not allowed"), "{refused}");
        }
        // What libvirt writes for a guest agent channel, and a display on loopback, are fine.
        r.check(
            &with(
                "<channel type='unix'><source mode='bind' \
                 path='/var/lib/libvirt/qemu/channel/target/domain-3-web1/org.qemu.guest_agent.0'/>\
                 <target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
                 <graphics type='vnc' port='5900' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics>",
            ),
            UUID,
        )
        .unwrap();
    }

    #[test]
    fn boot_images_firmware_and_nvram() {
        let r = rules(&["/srv/vms"], &[], false);
        let with_os = |os: &str| dumpxml("").replace("<boot dev='hd'/>", os);
        r.check(&with_os(
            "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
             <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>",
        ), UUID)
        .unwrap();
        r.check(
            &with_os("<kernel>/srv/vms/boot/vmlinuz</kernel><initrd>/srv/vms/boot/initrd.img</initrd>"),
            UUID,
        )
        .unwrap();
        assert!(
            refusal(&r, &with_os("<kernel>/boot/vmlinuz</kernel>")).starts_with("<kernel>: /boot/vmlinuz")
        );
        assert!(refusal(&r, &with_os("<loader>/tmp/fw.fd</loader>")).contains("nor under /usr/share/OVMF"));
        assert!(refusal(&r, &with_os("<nvram>/etc/passwd</nvram>")).contains(NVRAM_DIR));
    }

    #[test]
    fn malformed_xml_and_entities_are_refused() {
        let r = rules(&["/srv/vms"], &[], false);
        assert!(refusal(&r, "").contains("does not parse"));
        assert!(refusal(&r, "<domain><name>x</domain>").contains("does not parse"));
        let laughs = "<!DOCTYPE domain [<!ENTITY a 'aaaa'>]><domain><name>&a;</name></domain>";
        assert!(refusal(&r, laughs).contains("does not parse"));
        assert_eq!(refusal(&r, "<network/>"), "the root element is <network>, not <domain>");
        // Every problem is named, a bounded number of them.
        let many = dumpxml(&"<hostdev type='usb'/>".repeat(20));
        assert!(refusal(&r, &many).ends_with("and 12 more"));
    }

    /// A 4,000-deep document (28 kB) once overflowed the stack of every controller.
    #[test]
    fn deep_nesting_is_refused_before_anything_recurses() {
        let r = rules(&["/srv/vms"], &[], false);
        let deep = |n: usize| dumpxml(&format!("{}{}", "<a x='>'>".repeat(n), "</a>".repeat(n)));
        assert_eq!(refusal(&r, &deep(4_000)), format!("elements nest deeper than {MAX_DEPTH} levels"));
        assert_eq!(refusal(&r, &deep(100_000)), format!("elements nest deeper than {MAX_DEPTH} levels"));
        // Within the bound, nesting alone refuses nothing.
        r.check(&deep(50), UUID).unwrap();
        // Self-closed tags, comments, CDATA and quoted `>` or `/>` open nothing.
        let flat = dumpxml(&format!(
            "<metadata>{}</metadata>",
            "<m:x xmlns:m='urn:m' v='/>'/><!-- <a><a> --><![CDATA[<a><a>]]>".repeat(200)
        ));
        r.check(&flat, UUID).unwrap();
    }
}

/// Arbitrary text, and domains assembled at random from devices whose fate is known: the
/// check never panics, and accepts exactly the definitions whose every device is allowed.
#[cfg(test)]
mod arbitrary_input {
    use proptest::prelude::*;
    use std::path::PathBuf;

    use super::tests::UUID;
    use super::*;

    const STORAGE: &str = "/srv/vms";
    const BLOCK: &str = "/dev/disk/by-id/shared-lun";

    /// A device, and whether the rules (storage /srv/vms, block BLOCK, network disks as
    /// given) allow it.
    fn device(network_ok: bool) -> impl Strategy<Value = (String, bool)> {
        let part = prop::sample::select(vec!["srv", "vms", "etc", "..", ".", "", "a.qcow2", "images"]);
        let file = prop::collection::vec(part, 0..6).prop_map(|parts| {
            let path = format!("/{}", parts.join("/"));
            let ok = !parts.contains(&"..") && {
                let kept: Vec<&str> = parts.iter().copied().filter(|p| !matches!(*p, "" | ".")).collect();
                kept.len() > 2 && kept[..2] == ["srv", "vms"]
            };
            (format!("<disk type='file' device='disk'><source file='{path}'/><target dev='vda'/></disk>"), ok)
        });
        let block = prop::sample::select(vec![
            (BLOCK, true),
            ("/dev//disk/by-id/./shared-lun", true),
            ("/dev/sdb", false),
            ("/dev/disk/by-id/../sdb", false),
        ])
        .prop_map(|(dev, ok)| {
            (format!("<disk type='block'><source dev='{dev}'/><target dev='vdb'/></disk>"), ok)
        });
        let emulator = prop::sample::select(vec![
            ("/usr/bin/kvm", true),
            ("/usr/libexec/qemu-kvm", true),
            ("/usr/bin/../bin/kvm", false),
            ("/tmp/qemu", false),
        ])
        .prop_map(|(e, ok)| (format!("<emulator>{e}</emulator>"), ok));
        prop_oneof![
            file,
            block,
            emulator,
            Just(("<disk type='network'><source protocol='rbd' name='p/i'/></disk>".to_string(), network_ok)),
            Just(("<disk type='dir'><source dir='/srv/vms/d'/></disk>".to_string(), false)),
            Just(("<hostdev mode='subsystem' type='pci'/>".to_string(), false)),
            Just(("<interface type='hostdev'/>".to_string(), false)),
            Just(("<interface type='bridge'><source bridge='br0'/></interface>".to_string(), true)),
            Just((
                "<q:commandline xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'/>".to_string(),
                false
            )),
            Just(("<memballoon model='virtio'/>".to_string(), true)),
            Just(("<serial type='pty'><target port='0'/></serial>".to_string(), true)),
            Just(("<serial type='file'><source path='/etc/shadow'/></serial>".to_string(), false)),
            Just(("<console type='dev'><source path='/dev/sda'/></console>".to_string(), false)),
            Just((
                "<channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/x.0'/></channel>"
                    .to_string(),
                true
            )),
            Just(("<channel type='unix'><source mode='bind' path='/root/sock'/></channel>".to_string(), false)),
            Just(("<tpm model='tpm-crb'><backend type='passthrough'/></tpm>".to_string(), false)),
            Just(("<tpm model='tpm-crb'><backend type='emulator'/></tpm>".to_string(), true)),
            Just(("<interface type='direct'><source dev='eth0' mode='bridge'/></interface>".to_string(), false)),
            Just(("<smartcard mode='host'/>".to_string(), false)),
            Just(("<shmem name='x'/>".to_string(), false)),
            Just(("<graphics type='vnc' listen='0.0.0.0'/>".to_string(), false)),
            Just(("<graphics type='vnc'><listen type='address' address='::'/></graphics>".to_string(), false)),
            Just(("<graphics type='vnc' listen='127.0.0.1'/>".to_string(), true)),
        ]
    }

    fn domain() -> impl Strategy<Value = (String, bool, bool)> {
        any::<bool>().prop_flat_map(|network_ok| {
            prop::collection::vec(device(network_ok), 0..8).prop_map(move |devices| {
                let ok = devices.iter().all(|(_, ok)| *ok);
                let body: String = devices.into_iter().map(|(d, _)| d).collect();
                (
                    format!("<domain type='kvm'><name>x</name><uuid>{UUID}</uuid><devices>{body}</devices></domain>"),
                    network_ok,
                    ok,
                )
            })
        })
    }

    fn rules(network_ok: bool) -> DomainRules {
        DomainRules::new(&[PathBuf::from(STORAGE)], &[PathBuf::from(BLOCK)], network_ok, &[], &[]).unwrap()
    }

    proptest! {
        #[test]
        fn arbitrary_text_is_refused_or_accepted_without_panicking(s in ".{0,400}") {
            if let Err(e) = rules(true).check(&s, UUID) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        #[test]
        fn nesting_at_any_depth_never_aborts(depth in 0usize..3_000, tag in "[a-z]{1,6}", attrs in "( [a-z]{1,4}='[^'<]{0,6}'){0,3}", close in any::<bool>()) {
            let open = format!("<{tag}{attrs}>").repeat(depth);
            let end = if close { format!("</{tag}>").repeat(depth) } else { String::new() };
            let xml = format!("<domain type='kvm'><name>x</name><uuid>{UUID}</uuid><devices>{open}{end}</devices></domain>");
            let result = rules(true).check(&xml, UUID);
            if depth + 2 > MAX_DEPTH {
                prop_assert_eq!(result, Err(Refused(vec![Problem::TooDeep])));
            }
        }

        #[test]
        fn arbitrary_xml_like_text_never_panics(s in "(<[a-z:]{1,8}( [a-z:]{1,6}='[^'<]{0,12}')*/?>|</[a-z:]{1,8}>|[^<&]{0,8}){0,30}") {
            let _ = rules(false).check(&format!("<domain>{s}</domain>"), UUID);
        }

        #[test]
        fn a_domain_is_accepted_exactly_when_each_device_is_allowed((xml, network_ok, ok) in domain()) {
            let verdict = rules(network_ok).check(&xml, UUID);
            prop_assert_eq!(verdict.is_ok(), ok, "{}: {:?}", xml, verdict);
            if let Err(e) = verdict {
                prop_assert!(!e.0.is_empty() && !e.to_string().is_empty());
            }
        }
    }
}
