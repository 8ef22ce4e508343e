//! One service probe against a guest's address: does its DNS server answer, its port accept,
//! its HTTP endpoint give the right status, or an operator's command on this host succeed.
//! DNS and HTTP are spoken by hand (a query and a status line are all a probe needs), so the
//! agent carries no resolver or HTTP client for them.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// What one probe checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// A DNS query for `name` (type A, recursion desired) over UDP port 53 of the address; with
    /// `expect`, the answer must contain that IPv4 address among its A records. Without it, any
    /// answer with RCODE NOERROR and at least one answer record passes.
    Dns { name: String, expect: Option<IpAddr> },
    /// A TCP connect to the port of the address.
    Tcp { port: u16 },
    /// An HTTP/1.1 GET of `url` (http:// only; its host part is connected to as given, e.g.
    /// http://10.0.0.5:8080/health); passes when the status code equals `status`.
    Http { url: String, status: u16 },
    /// `/bin/sh -c COMMAND` on this host, with env VMHA_VM (the VM's UUID) and VMHA_ADDRESS
    /// (the address); passes on exit status 0. Its stdout/stderr are captured (the first 200
    /// bytes of stderr, else stdout, go into the failure message).
    Exec { command: String },
}

const DNS_PORT: u16 = 53;
/// Larger than any DNS-over-UDP answer without EDNS (512) and than a usual MTU.
const DNS_REPLY_MAX: usize = 1500;
const HTTP_HEAD_MAX: usize = 4096;
const EXCERPT: usize = 200;

/// Runs the probe once against `address` (an IP address as text, may be empty for Exec)
/// within `timeout`; Ok(()) when it passed, Err(why) otherwise, e.g.
/// "no DNS answer from 10.0.0.5 within 1.0 s", "DNS answer from 10.0.0.5 for lab.vmha has no A record 10.0.0.9 (it has 10.0.0.8)",
/// "TCP connect to 10.0.0.5:53 refused", "HTTP GET http://... answered 503, expected 200",
/// "`CMD` exited with status 1: <stderr excerpt>", "`CMD` still running after 1.0 s: killed".
pub async fn check(kind: &ProbeKind, vm: &str, address: &str, timeout: Duration) -> Result<(), String> {
    let ip = |what: &str| {
        address
            .parse::<IpAddr>()
            .map_err(|_| format!("{what} probe of {vm}: {address:?} is not an IP address"))
    };
    match kind {
        ProbeKind::Dns { name, expect } => {
            dns(name, *expect, SocketAddr::new(ip("DNS")?, DNS_PORT), timeout).await
        }
        ProbeKind::Tcp { port } => tcp(SocketAddr::new(ip("TCP")?, *port), timeout).await,
        ProbeKind::Http { url, status } => http(url, *status, timeout).await,
        ProbeKind::Exec { command } => exec(command, vm, address, timeout).await,
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Operators read these in one status line: no newlines from commands or their output.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// --- DNS ----------------------------------------------------------------------------------

/// Not unguessable, and need not be: the socket is connected to the server, so the id only has
/// to tell our reply from a stray datagram.
fn query_id() -> u16 {
    let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    (n ^ (n >> 16)) as u16
}

fn dns_query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{name:?} is not a DNS name (1 to 253 bytes)"));
    }
    let mut q = id.to_be_bytes().to_vec();
    // RD set: a guest's DNS server is usually a recursor, and the probe asks as its clients do.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name:?} is not a DNS name (a label is empty or over 63 bytes)"));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    Ok(q)
}

/// Past the (possibly compressed) name at `pos`. Pointers are not followed, only stepped
/// over, so a pointer loop in a hostile reply cannot make this spin.
fn skip_name(msg: &[u8], mut pos: usize) -> Result<usize, String> {
    loop {
        let len = *msg.get(pos).ok_or("truncated name")? as usize;
        match len & 0xC0 {
            0 if len == 0 => return Ok(pos + 1),
            0 => pos += 1 + len,
            0xC0 if pos + 1 < msg.len() => return Ok(pos + 2),
            _ => return Err("malformed name".into()),
        }
    }
}

/// The number of answer records and the A addresses among them. Owner names are not compared
/// with the query: a CNAME chain's A records belong to another name and still answer it.
fn parse_reply(msg: &[u8]) -> Result<(usize, Vec<Ipv4Addr>), String> {
    let be16 = |at: usize| msg.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize);
    if msg.len() < 12 || msg[2] & 0x80 == 0 {
        return Err("malformed reply (no DNS response header)".into());
    }
    match msg[3] & 0x0F {
        0 => {}
        rcode => {
            let what = ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"];
            return Err(what.get(rcode as usize).map_or_else(|| format!("RCODE {rcode}"), |w| w.to_string()));
        }
    }
    let (qdcount, ancount) = (be16(4).unwrap_or(0), be16(6).unwrap_or(0));
    let mut pos = 12;
    for _ in 0..qdcount {
        pos = skip_name(msg, pos)? + 4;
    }
    let mut found = Vec::new();
    for _ in 0..ancount {
        pos = skip_name(msg, pos)?;
        let (typ, class, rdlen) = match (be16(pos), be16(pos + 2), be16(pos + 8)) {
            (Some(t), Some(c), Some(l)) => (t, c, l),
            _ => return Err("truncated answer record".into()),
        };
        let rdata = msg.get(pos + 10..pos + 10 + rdlen).ok_or("truncated answer record")?;
        if let (1, 1, [a, b, c, d]) = (typ, class, rdata) {
            found.push(Ipv4Addr::new(*a, *b, *c, *d));
        }
        pos += 10 + rdlen;
    }
    Ok((ancount, found))
}

async fn dns(name: &str, expect: Option<IpAddr>, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let server = addr.ip();
    let expect = match expect {
        Some(IpAddr::V6(a)) => {
            return Err(format!("DNS probe of {server}: expected {a} is not IPv4 (it asks for A records)"));
        }
        Some(IpAddr::V4(a)) => Some(a),
        None => None,
    };
    let id = query_id();
    let query = dns_query(id, name).map_err(|e| format!("DNS probe of {server}: {e}"))?;
    let exchange = async {
        let local: SocketAddr = if addr.is_ipv4() { ([0u8; 4], 0).into() } else { ([0u16; 8], 0).into() };
        let sock = UdpSocket::bind(local).await?;
        sock.connect(addr).await?;
        sock.send(&query).await?;
        let mut buf = [0u8; DNS_REPLY_MAX];
        loop {
            let n = sock.recv(&mut buf).await?;
            // Someone else's (late, stray) datagram: keep waiting for the answer to ours.
            if buf[..n].starts_with(&id.to_be_bytes()) {
                return Ok::<_, std::io::Error>(buf[..n].to_vec());
            }
        }
    };
    let reply = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return Err(format!("no DNS answer from {server} within {}", secs(timeout))),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => {
            return Err(format!(
                "DNS query to {server} refused: nothing listens on UDP port {}",
                addr.port()
            ));
        }
        Ok(Err(e)) => return Err(format!("DNS query to {server} failed: {e}")),
        Ok(Ok(r)) => r,
    };
    let (count, found) =
        parse_reply(&reply).map_err(|e| format!("DNS answer from {server} for {name}: {e}"))?;
    match expect {
        Some(want) if !found.contains(&want) => {
            let has: Vec<String> = found.iter().map(Ipv4Addr::to_string).collect();
            let has = if has.is_empty() { "none".to_string() } else { has.join(", ") };
            Err(format!("DNS answer from {server} for {name} has no A record {want} (it has {has})"))
        }
        None if count == 0 => Err(format!("DNS answer from {server} for {name} has no answer records")),
        _ => Ok(()),
    }
}

// --- TCP and HTTP -------------------------------------------------------------------------

async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => {
            Err(format!("TCP connect to {addr} refused"))
        }
        Ok(Err(e)) => Err(format!("TCP connect to {addr} failed: {e}")),
        Err(_) => Err(format!("TCP connect to {addr} timed out after {}", secs(timeout))),
    }
}

/// (authority for the Host header, host to connect to, port, path).
fn parse_url(url: &str) -> Result<(&str, &str, u16, String), String> {
    let bad = |why: &str| format!("HTTP probe URL {url:?}: {why}");
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        _ => return Err(bad("only http:// URLs are supported")),
    };
    let rest = rest.split('#').next().unwrap_or_default();
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            v6.split_once(']').map(|(h, p)| (h, p.strip_prefix(':'))).ok_or_else(|| bad("unclosed ["))?
        }
        None => authority.split_once(':').map_or((authority, None), |(h, p)| (h, Some(p))),
    };
    if host.is_empty() || authority.contains('@') {
        return Err(bad("no host, or a user part"));
    }
    let port = port.map_or(Ok(80), |p| p.parse::<u16>().map_err(|_| bad("bad port")))?;
    Ok((authority, host, port, path))
}

async fn http(url: &str, status: u16, timeout: Duration) -> Result<(), String> {
    let (authority, host, port, path) = parse_url(url)?;
    let exchange = async {
        let mut s = TcpStream::connect((host, port)).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: vmha-agent\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        // Only the status line matters: stop at its end rather than wait for the whole head.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.contains(&b'\n') && head.len() < HTTP_HEAD_MAX {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n.min(HTTP_HEAD_MAX - head.len())]);
        }
        Ok::<_, std::io::Error>(head)
    };
    let head = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return Err(format!("HTTP GET {url}: no answer within {}", secs(timeout))),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => {
            return Err(format!("HTTP GET {url}: connect to {host} port {port} refused"));
        }
        Ok(Err(e)) => return Err(format!("HTTP GET {url} failed: {e}")),
        Ok(Ok(h)) => h,
    };
    let line = String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or_default());
    let mut words = line.split_whitespace();
    let code = match (words.next(), words.next()) {
        (Some(v), Some(c)) if v.starts_with("HTTP/1.") && c.len() == 3 => c.parse::<u16>().ok(),
        _ => None,
    };
    match code {
        Some(c) if c == status => Ok(()),
        Some(c) => Err(format!("HTTP GET {url} answered {c}, expected {status}")),
        None => Err(format!(
            "HTTP GET {url}: not an HTTP/1.x status line: {:?}",
            one_line(&line.chars().take(80).collect::<String>())
        )),
    }
}

// --- Exec ---------------------------------------------------------------------------------

/// The first bytes of a pipe; the rest is drained so a chatty command never blocks on it.
async fn head(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut keep = Vec::new();
    let Some(mut pipe) = pipe else { return keep };
    let mut buf = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut buf).await
        && n > 0
    {
        keep.extend_from_slice(&buf[..n.min(EXCERPT - keep.len())]);
    }
    keep
}

async fn exec(command: &str, vm: &str, address: &str, timeout: Duration) -> Result<(), String> {
    let cmd = one_line(command);
    let mut child = tokio::process::Command::new("/bin/sh")
        .args(["-c", command])
        .env("VMHA_VM", vm)
        .env("VMHA_ADDRESS", address)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout also kills what the shell started (radclient
        // under a wrapper), not only the shell; kill_on_drop covers a caller giving up on us.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start /bin/sh for `{cmd}`: {e}"))?;
    let pgid = child.id().and_then(|p| i32::try_from(p).ok());
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let outcome =
        tokio::time::timeout(timeout, async { tokio::join!(child.wait(), head(out), head(err)) }).await;
    let (status, out, err) = match outcome {
        Ok((Ok(status), out, err)) => (status, out, err),
        Ok((Err(e), ..)) => return Err(format!("cannot wait for `{cmd}`: {e}")),
        Err(_) => {
            // The shell is not reaped yet, so the group id is still this command's.
            if let Some(pgid) = pgid {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            let _ = child.wait().await;
            return Err(format!("`{cmd}` still running after {}: killed", secs(timeout)));
        }
    };
    if status.success() {
        return Ok(());
    }
    let how = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        (None, None) => format!("failed ({status})"),
    };
    let excerpt = one_line(&String::from_utf8_lossy(if err.trim_ascii().is_empty() { &out } else { &err }));
    if excerpt.is_empty() { Err(format!("`{cmd}` {how}")) } else { Err(format!("`{cmd}` {how}: {excerpt}")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const T: Duration = Duration::from_secs(2);

    /// A one-shot DNS server on 127.0.0.1: answers the first query with what `reply` makes of it.
    async fn responder(reply: impl FnOnce(&[u8]) -> Vec<u8> + Send + 'static) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
            sock.send_to(&reply(&buf[..n]), peer).await.unwrap();
        });
        addr
    }

    /// A reply echoing the question, with one A record per address under a compressed name.
    fn answer(query: &[u8], rcode: u8, addrs: &[[u8; 4]]) -> Vec<u8> {
        let mut r = query[..2].to_vec();
        r.extend_from_slice(&[0x81, 0x80 | rcode, 0, 1, 0, addrs.len() as u8, 0, 0, 0, 0]);
        r.extend_from_slice(&query[12..]);
        for a in addrs {
            r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0x0E, 0x10, 0, 4]);
            r.extend_from_slice(a);
        }
        r
    }

    #[tokio::test]
    async fn dns_with_matching_a_record_passes() {
        let addr = responder(|q| answer(q, 0, &[[10, 0, 0, 8], [10, 0, 0, 9]])).await;
        dns("lab.vmha", Some("10.0.0.9".parse().unwrap()), addr, T).await.unwrap();
        let addr = responder(|q| answer(q, 0, &[[10, 0, 0, 8]])).await;
        dns("lab.vmha.", None, addr, T).await.unwrap();
    }

    #[tokio::test]
    async fn dns_with_other_a_record_names_both() {
        let addr = responder(|q| answer(q, 0, &[[10, 0, 0, 8]])).await;
        let e = dns("lab.vmha", Some("10.0.0.9".parse().unwrap()), addr, T).await.unwrap_err();
        assert_eq!(e, "DNS answer from 127.0.0.1 for lab.vmha has no A record 10.0.0.9 (it has 10.0.0.8)");
    }

    #[tokio::test]
    async fn dns_silent_server_times_out() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let e = dns("lab.vmha", None, silent.local_addr().unwrap(), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(e, "no DNS answer from 127.0.0.1 within 0.2 s");
        let closed = silent.local_addr().unwrap();
        drop(silent);
        assert!(
            dns("lab.vmha", None, closed, T).await.unwrap_err().starts_with("DNS query to 127.0.0.1 refused")
        );
    }

    #[tokio::test]
    async fn dns_truncated_or_garbage_reply_fails() {
        let addr = responder(|q| {
            let r = answer(q, 0, &[[10, 0, 0, 8]]);
            r[..r.len() - 3].to_vec()
        })
        .await;
        let e = dns("lab.vmha", None, addr, T).await.unwrap_err();
        assert_eq!(e, "DNS answer from 127.0.0.1 for lab.vmha: truncated answer record");
        let addr = responder(|q| [&q[..2], &b"garbage, not DNS"[..]].concat()).await;
        assert!(dns("lab.vmha", None, addr, T).await.unwrap_err().contains("malformed"));
        // No prefix of a good reply, nor any byte soup, may panic the parser.
        let good = answer(&dns_query(7, "a.example").unwrap(), 0, &[[1, 2, 3, 4]]);
        assert!(parse_reply(&good).is_ok());
        for n in 0..good.len() {
            assert!(parse_reply(&good[..n]).is_err(), "prefix {n}");
        }
        let mut x = 0x2545_F491u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..5000 {
            let len = next() % 64;
            let soup: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = parse_reply(&[&[0, 0, 0x81, 0x80, 0, 1, 0, 3, 0, 0, 0, 0][..], &soup].concat());
        }
    }

    #[tokio::test]
    async fn dns_nxdomain_fails() {
        let addr = responder(|q| answer(q, 3, &[])).await;
        let e = dns("nope.vmha", None, addr, T).await.unwrap_err();
        assert_eq!(e, "DNS answer from 127.0.0.1 for nope.vmha: NXDOMAIN");
    }

    #[test]
    fn dns_query_rejects_bad_names() {
        assert!(dns_query(1, &format!("{}.vmha", "a".repeat(64))).is_err());
        assert!(dns_query(1, &format!("{0}.{0}.{0}.{0}", "a".repeat(63))).is_err());
        assert!(dns_query(1, "a..b").is_err());
        assert!(dns_query(1, "").is_err());
        let q = dns_query(0x1234, "lab.vmha").unwrap();
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..], b"\x03lab\x04vmha\x00\x00\x01\x00\x01");
    }

    #[tokio::test]
    async fn tcp_open_port_passes_and_closed_fails() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let kind = ProbeKind::Tcp { port };
        check(&kind, "vm1", "127.0.0.1", T).await.unwrap();
        drop(l);
        let e = check(&kind, "vm1", "127.0.0.1", T).await.unwrap_err();
        assert_eq!(e, format!("TCP connect to 127.0.0.1:{port} refused"));
        assert!(check(&kind, "vm1", "", T).await.unwrap_err().contains("not an IP address"));
    }

    /// An HTTP server on 127.0.0.1 that answers one request with `status_line`.
    async fn http_server(status_line: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                req.extend_from_slice(&buf[..n]);
            }
            let req = String::from_utf8(req).unwrap();
            assert!(
                req.starts_with(&format!("GET /health?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n")),
                "{req}"
            );
            s.write_all(format!("{status_line}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await.unwrap();
        });
        port
    }

    #[tokio::test]
    async fn http_status_is_compared() {
        let url = format!("http://127.0.0.1:{}/health?x=1", http_server("HTTP/1.1 200 OK").await);
        check(&ProbeKind::Http { url, status: 200 }, "vm1", "", T).await.unwrap();
        let url = format!("http://127.0.0.1:{}/health?x=1", http_server("HTTP/1.1 503 Unavailable").await);
        let e = check(&ProbeKind::Http { url: url.clone(), status: 200 }, "vm1", "", T).await.unwrap_err();
        assert_eq!(e, format!("HTTP GET {url} answered 503, expected 200"));
    }

    #[tokio::test]
    async fn http_bad_url_fails() {
        for url in ["ftp://x/", "http://", "http://h:99999/", "http://[::1/"] {
            let e = check(&ProbeKind::Http { url: url.into(), status: 200 }, "vm1", "", T).await.unwrap_err();
            assert!(e.starts_with("HTTP probe URL"), "{e}");
        }
        assert_eq!(parse_url("http://[::1]:8080").unwrap(), ("[::1]:8080", "::1", 8080, "/".into()));
        assert_eq!(parse_url("HTTP://h/a#f").unwrap(), ("h", "h", 80, "/a".into()));
    }

    fn exec_kind(command: &str) -> ProbeKind {
        ProbeKind::Exec { command: command.into() }
    }

    #[tokio::test]
    async fn exec_exit_status_decides() {
        check(&exec_kind("true"), "vm1", "", T).await.unwrap();
        let e = check(&exec_kind("exit 3"), "vm1", "", T).await.unwrap_err();
        assert_eq!(e, "`exit 3` exited with status 3");
    }

    #[tokio::test]
    async fn exec_failure_shows_output_and_env() {
        let cmd = r#"echo "$VMHA_VM $VMHA_ADDRESS" >&2; exit 1"#;
        let e = check(&exec_kind(cmd), "web1", "10.0.0.5", T).await.unwrap_err();
        assert_eq!(e, format!("`{cmd}` exited with status 1: web1 10.0.0.5"));
        let e = check(&exec_kind("echo out; exit 1"), "web1", "", T).await.unwrap_err();
        assert!(e.ends_with(": out"), "{e}");
    }

    #[tokio::test]
    async fn exec_timeout_kills() {
        let start = std::time::Instant::now();
        let e = check(&exec_kind("sleep 5"), "vm1", "", Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(e, "`sleep 5` still running after 0.2 s: killed");
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
