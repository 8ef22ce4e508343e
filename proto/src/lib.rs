//! vmha's wire contract, package `vmha.v1`, generated from `proto/vmha/v1/*.proto`.

pub mod v1 {
    tonic::include_proto!("vmha.v1");
}

/// Request header carrying the agent's host name until mTLS client certificates replace it.
/// Read in exactly one place on the controller (its `identity` module).
pub const HOST_HEADER: &str = "x-vmha-host";

/// Response header of a controller that does not lead: the endpoint of the one that does
/// (absent while none does). Agents and the CLI go there.
pub const LEADER_HEADER: &str = "x-vmha-leader";

/// Whether `s` can name a host: an RFC 1123 name (letters, digits, '-', '.'), which is also
/// what a TLS certificate can carry. Agents check their own name with it, the controller every
/// name it is told.
pub fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_names() {
        for ok in ["kvm1", "kvm-1.dc2.example.net", "a"] {
            assert!(super::is_host_name(ok), "{ok}");
        }
        for bad in ["", "kvm 1", "-kvm", "kvm.", "kvm1/../x", "kvm_1", &"a".repeat(64)] {
            assert!(!super::is_host_name(bad), "{bad}");
        }
    }
}
