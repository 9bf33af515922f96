//! Addresses a plugin may not reach through a name: warren's own machine, the
//! cloud metadata service, the private network. A name that resolves into one
//! of these ranges is refused unless the allow-list names the host literally.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The range `ip` lies in, if it is one a plugin must not reach through DNS.
pub(crate) fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_range(v4),
        IpAddr::V6(v6) => v6_range(v6),
    }
}

fn v4_range(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    let range = if ip.is_unspecified() || o[0] == 0 {
        "unspecified (0.0.0.0/8)"
    } else if ip.is_loopback() {
        "loopback (127.0.0.0/8)"
    } else if ip.is_link_local() {
        // 169.254.169.254 is the metadata service of AWS, GCP and Azure.
        "link-local (169.254.0.0/16, cloud metadata)"
    } else if ip.is_private() {
        "private (RFC 1918)"
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        "shared address space (100.64.0.0/10, carrier-grade NAT)"
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        "IETF protocol assignments (192.0.0.0/24)"
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        "benchmarking (198.18.0.0/15)"
    } else if ip.is_multicast() {
        "multicast (224.0.0.0/4)"
    } else if o[0] >= 240 {
        "reserved (240.0.0.0/4, broadcast)"
    } else {
        return None;
    };
    Some(range)
}

fn v6_range(ip: Ipv6Addr) -> Option<&'static str> {
    // Addresses that carry an IPv4 address are judged by it: an
    // IPv4-mapped ::ffff:127.0.0.1 reaches 127.0.0.1.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_range(v4);
    }
    let s = ip.segments();
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) embed an IPv4 address too.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return v4_range(embedded_v4(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return v4_range(embedded_v4(s[1], s[2]));
    }
    let range = if ip.is_unspecified() {
        "unspecified (::)"
    } else if ip.is_loopback() {
        "loopback (::1)"
    } else if (s[0] & 0xffc0) == 0xfe80 {
        "link-local (fe80::/10)"
    } else if (s[0] & 0xfe00) == 0xfc00 {
        "unique local (fc00::/7)"
    } else if (s[0] & 0xffc0) == 0xfec0 {
        "site-local (fec0::/10)"
    } else if ip.is_multicast() {
        "multicast (ff00::/8)"
    } else if s[0..6] == [0, 0, 0, 0, 0, 0] {
        // ::a.b.c.d, the deprecated IPv4-compatible form.
        return v4_range(embedded_v4(s[6], s[7]));
    } else {
        return None;
    };
    Some(range)
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::refused_range;

    #[test]
    fn internal_ranges_are_refused_and_public_ones_are_not() {
        for ip in [
            "127.0.0.1",
            "127.8.9.10",
            "0.0.0.0",
            "169.254.169.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.1",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::10.0.0.1",
            "2002:7f00:1::",
            "::127.0.0.1",
        ] {
            assert!(refused_range(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(refused_range(ip.parse().unwrap()), None, "{ip}");
        }
    }
}
