//! Identifiers: groups (`service/region`) and instances (`i-000001`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// One service in one region: `web/local`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GroupId(pub String);

impl GroupId {
    pub fn new(service: &str, region: &str) -> GroupId {
        GroupId(format!("{service}/{region}"))
    }
    pub fn service(&self) -> &str {
        GroupId::service_of(&self.0)
    }
    pub fn region(&self) -> &str {
        GroupId::region_of(&self.0)
    }
    /// The service of a group id held as a string (`web` of `web/local`). The one place a
    /// group id is taken apart.
    pub fn service_of(group: &str) -> &str {
        group.split_once('/').map_or(group, |(s, _)| s)
    }
    /// The region of a group id held as a string (`local` of `web/local`; empty without one).
    pub fn region_of(group: &str) -> &str {
        group.split_once('/').map_or("", |(_, r)| r)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Instance ids are `i-` and a zero-padded sequence number, unique for the life of a data directory.
pub fn instance_id(seq: u64) -> String {
    format!("i-{seq:06}")
}

/// The second octet of a loopback /16 written `127.B.0.0/16` (B in 1..=254).
pub fn parse_loopback_subnet(s: &str) -> Option<u8> {
    let rest = s.strip_prefix("127.")?.strip_suffix(".0.0/16")?;
    let b: u8 = rest.parse().ok()?;
    (1..=254).contains(&b).then_some(b)
}

/// The `n`-th instance address (n from 1) in the loopback block `127.B.0.0/16`: `127.B.x.y`,
/// y in 1..=254. Wraps after 65,024 addresses.
pub fn loopback_addr(block: u8, n: u64) -> std::net::Ipv4Addr {
    let i = (n.saturating_sub(1)) % (256 * 254);
    std::net::Ipv4Addr::new(127, block, (i / 254) as u8, (i % 254) as u8 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_distinct_and_valid() {
        assert_eq!(loopback_addr(1, 1).to_string(), "127.1.0.1");
        assert_eq!(loopback_addr(1, 254).to_string(), "127.1.0.254");
        assert_eq!(loopback_addr(1, 255).to_string(), "127.1.1.1");
        let set: std::collections::BTreeSet<_> = (1..=2000).map(|n| loopback_addr(7, n)).collect();
        assert_eq!(set.len(), 2000);
        assert_eq!(parse_loopback_subnet("127.9.0.0/16"), Some(9));
        assert_eq!(parse_loopback_subnet("127.0.0.0/16"), None);
        assert_eq!(parse_loopback_subnet("10.0.0.0/16"), None);
    }
}
