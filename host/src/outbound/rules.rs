//! The allow-list of `[pipeline.http]`: `scheme://host[:port]` rules, a
//! leading `*.` matching subdomains, checked before any connection is made.

use std::fmt;
use std::net::IpAddr;

use anyhow::{Result, bail};

/// `http` or `https`; nothing else is ever sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub(crate) fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// What a rule says about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// Exactly this name (lower case, no trailing dot).
    Name(String),
    /// Any subdomain of this name (`*.example.com` holds `example.com`), at
    /// any depth, but not the name itself.
    Subdomains(String),
    /// Exactly this address.
    Ip(IpAddr),
}

/// One entry of `allowed_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) scheme: Scheme,
    pub(crate) host: HostPattern,
    pub(crate) port: u16,
    /// The rule as written, for logs and the `host` label of the metrics.
    pub(crate) text: String,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The host of a request, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl Host {
    /// Parse the host part of a URL authority (`example.com`, `10.0.0.1`,
    /// `[::1]`). Names are lower-cased and lose one trailing dot, so that
    /// `Hooks.Slack.com.` is the same host as `hooks.slack.com`.
    pub(crate) fn parse(text: &str) -> Result<Self> {
        if let Some(inner) = text.strip_prefix('[') {
            let Some(inner) = inner.strip_suffix(']') else {
                bail!("{text:?}: an IPv6 address needs its closing bracket");
            };
            return match inner.parse::<std::net::Ipv6Addr>() {
                Ok(ip) => Ok(Self::Ip(IpAddr::V6(ip))),
                Err(_) => bail!("{text:?} is not an IPv6 address"),
            };
        }
        if let Ok(ip) = text.parse::<std::net::Ipv4Addr>() {
            return Ok(Self::Ip(IpAddr::V4(ip)));
        }
        let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        valid_name(&name)?;
        Ok(Self::Name(name))
    }
}

/// A DNS name as URLs carry it: dot-separated labels of letters, digits,
/// hyphens and underscores, each 1 to 63 bytes, 253 in all. Anything else
/// (percent-escapes, `@`, spaces) is not a host warren will resolve.
fn valid_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 253 {
        bail!("{name:?} is not a host name (1 to 253 bytes)");
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            bail!("{name:?} is not a host name (label {label:?})");
        }
    }
    Ok(())
}

impl Rule {
    /// Parse `scheme://host[:port]`. The host may be a name, an IPv4 address,
    /// a bracketed IPv6 address, or `*.` followed by a name. A path, query,
    /// fragment or user name is refused: a rule grants an origin, not a
    /// resource, and a path would suggest a restriction warren does not make.
    pub(crate) fn parse(text: &str) -> Result<Self> {
        let Some((scheme, rest)) = text.split_once("://") else {
            bail!("{text:?}: a rule is scheme://host[:port], e.g. \"https://hooks.slack.com\"");
        };
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => bail!("{text:?}: scheme {other:?} is not http or https"),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if let Some(c) = rest.chars().find(|c| matches!(c, '/' | '?' | '#' | '@')) {
            bail!(
                "{text:?}: a rule names scheme, host and port only (found {c:?}; no path, query, \
                 fragment or user)"
            );
        }
        let (host, port) = split_port(rest).map_err(|e| anyhow::anyhow!("{text:?}: {e}"))?;
        let port = port.unwrap_or(scheme.default_port());
        let host = if let Some(parent) = host.strip_prefix("*.") {
            match Host::parse(parent) {
                Ok(Host::Name(n)) => HostPattern::Subdomains(n),
                Ok(Host::Ip(_)) => bail!("{text:?}: a wildcard cannot stand before an IP address"),
                Err(e) => bail!("{text:?}: {e}"),
            }
        } else if host.contains('*') {
            bail!("{text:?}: a wildcard may only be the first label, as in \"*.example.com\"");
        } else {
            match Host::parse(host) {
                Ok(Host::Name(n)) => HostPattern::Name(n),
                Ok(Host::Ip(ip)) => HostPattern::Ip(ip),
                Err(e) => bail!("{text:?}: {e}"),
            }
        };
        Ok(Self {
            scheme,
            host,
            port,
            text: text.to_string(),
        })
    }

    /// Does this rule allow `scheme://host:port`?
    pub(crate) fn matches(&self, scheme: Scheme, host: &Host, port: u16) -> bool {
        if self.scheme != scheme || self.port != port {
            return false;
        }
        match (&self.host, host) {
            (HostPattern::Name(r), Host::Name(h)) => r == h,
            (HostPattern::Ip(r), Host::Ip(h)) => r == h,
            (HostPattern::Subdomains(parent), Host::Name(h)) => h
                .strip_suffix(parent.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            _ => false,
        }
    }

    /// Whether the rule names the host itself (not through a wildcard): such
    /// a host may resolve to private addresses (see `addr::refused_range`).
    pub(crate) fn is_literal(&self) -> bool {
        !matches!(self.host, HostPattern::Subdomains(_))
    }
}

/// `host[:port]` with an optional bracketed IPv6 host.
fn split_port(s: &str) -> Result<(&str, Option<u16>)> {
    let (host, port) = if s.starts_with('[') {
        match s.find(']') {
            Some(end) => {
                let (h, p) = s.split_at(end + 1);
                match p.strip_prefix(':') {
                    Some(p) => (h, Some(p)),
                    None if p.is_empty() => (h, None),
                    None => bail!("unexpected {p:?} after the IPv6 address"),
                }
            }
            None => bail!("an IPv6 address needs its closing bracket"),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    // Digits only, without sign or leading zero: `:+6310` and `:06310` are
    // not how anyone writes port 6310, so they are typos, not that port.
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) && !p.starts_with('0') => {
                Some(n)
            }
            _ => bail!(
                "port {p:?} is not a number from 1 to 65535 (digits, no sign or leading zero)"
            ),
        },
    };
    if host.is_empty() {
        bail!("the host is missing");
    }
    Ok((host, port))
}

/// The allow-list of one pipeline.
#[derive(Debug, Clone, Default)]
pub(crate) struct AllowList {
    rules: Vec<Rule>,
}

impl AllowList {
    pub(crate) fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Self> {
        let rules = rules
            .iter()
            .map(|r| Rule::parse(r.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { rules })
    }

    /// The first rule allowing the request, preferring one that names the
    /// host literally (so that `http://localhost:8025` is found even when a
    /// wildcard rule would match too).
    pub(crate) fn find(&self, scheme: Scheme, host: &Host, port: u16) -> Option<&Rule> {
        let mut hits = self.rules.iter().filter(|r| r.matches(scheme, host, port));
        let first = hits.next()?;
        if first.is_literal() {
            return Some(first);
        }
        Some(hits.find(|r| r.is_literal()).unwrap_or(first))
    }

    /// Why no rule matched, for the log: a rule for the host with another
    /// scheme or port says more than "not allowed".
    pub(crate) fn explain_miss(&self, scheme: Scheme, host: &Host, port: u16) -> String {
        let near = self.rules.iter().find(|r| {
            [Scheme::Http, Scheme::Https]
                .iter()
                .any(|&s| r.matches(s, host, r.port))
                && (r.scheme != scheme || r.port != port)
        });
        match near {
            Some(r) => format!(
                "rule {} allows this host only as {}://…:{} (request: {}://…:{port})",
                r.text,
                r.scheme.label(),
                r.port,
                scheme.label()
            ),
            None if self.rules.is_empty() => {
                "outbound HTTP is not granted to this pipeline (no [pipeline.http] allowed_hosts)"
                    .to_string()
            }
            None => "no allowed_hosts rule names this host".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap()
    }

    #[test]
    fn rules_parse_with_default_ports() {
        let r = Rule::parse("https://hooks.slack.com").unwrap();
        assert_eq!(r.port, 443);
        assert_eq!(r.host, HostPattern::Name("hooks.slack.com".into()));
        assert_eq!(Rule::parse("http://127.0.0.1:8025").unwrap().port, 8025);
        assert_eq!(Rule::parse("HTTP://Example.COM/").unwrap().port, 80);
        let v6 = Rule::parse("http://[::1]:9000").unwrap();
        assert_eq!(v6.host, HostPattern::Ip("::1".parse().unwrap()));
        assert_eq!(v6.port, 9000);
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for (rule, says) in [
            ("hooks.slack.com", "scheme://host"),
            ("ftp://example.com", "not http or https"),
            ("https://example.com/hooks", "no path"),
            ("https://example.com?x=1", "no path"),
            ("https://user@example.com", "no path"),
            ("https://ex*ample.com", "first label"),
            ("https://a.*.example.com", "first label"),
            ("https://*.10.0.0.1", "IP address"),
            ("https://example.com:0", "1 to 65535"),
            ("https://example.com:99999", "1 to 65535"),
            ("https://example.com:", "1 to 65535"),
            ("http://127.0.0.1:+6310", "1 to 65535"),
            ("http://127.0.0.1:06310", "1 to 65535"),
            ("http://127.0.0.1:-1", "1 to 65535"),
            ("http://[::1]:+6310", "1 to 65535"),
            ("http://[::1]:06310", "1 to 65535"),
            ("http://127.0.0.1: 6310", "1 to 65535"),
            ("https://:443", "host is missing"),
            ("https://[::1", "closing bracket"),
            ("https://exa mple.com", "not a host name"),
            ("https://*.", "not a host name"),
        ] {
            let err = Rule::parse(rule).unwrap_err().to_string();
            assert!(err.contains(says), "{rule}: {err}");
        }
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let r = Rule::parse("https://*.s3.amazonaws.com").unwrap();
        assert!(r.matches(Scheme::Https, &host("bucket.s3.amazonaws.com"), 443));
        assert!(r.matches(Scheme::Https, &host("a.b.s3.amazonaws.com"), 443));
        assert!(r.matches(Scheme::Https, &host("Bucket.S3.amazonaws.com."), 443));
        assert!(!r.matches(Scheme::Https, &host("s3.amazonaws.com"), 443));
        assert!(!r.matches(Scheme::Https, &host("evils3.amazonaws.com"), 443));
        assert!(!r.matches(Scheme::Https, &host("s3.amazonaws.com.evil.com"), 443));
        assert!(!r.matches(Scheme::Http, &host("bucket.s3.amazonaws.com"), 443));
        assert!(!r.matches(Scheme::Https, &host("bucket.s3.amazonaws.com"), 8443));
        assert!(!r.is_literal());
    }

    #[test]
    fn scheme_host_and_port_must_all_match() {
        let list = AllowList::parse(&["https://hooks.slack.com", "http://127.0.0.1:8025"]).unwrap();
        let slack = host("hooks.slack.com");
        assert!(list.find(Scheme::Https, &slack, 443).is_some());
        assert!(list.find(Scheme::Http, &slack, 80).is_none());
        assert!(list.find(Scheme::Https, &slack, 8443).is_none());
        let local = host("127.0.0.1");
        assert!(list.find(Scheme::Http, &local, 8025).is_some());
        assert!(list.find(Scheme::Http, &local, 8026).is_none());
        // A name is not its address, nor the reverse.
        assert!(list.find(Scheme::Http, &host("localhost"), 8025).is_none());
        assert!(
            list.explain_miss(Scheme::Http, &slack, 80)
                .contains("only as https")
        );
        assert!(
            list.explain_miss(Scheme::Https, &host("evil.com"), 443)
                .contains("no allowed_hosts rule")
        );
        assert!(
            AllowList::default()
                .explain_miss(Scheme::Https, &slack, 443)
                .contains("not granted")
        );
    }

    #[test]
    fn a_literal_rule_is_preferred_over_a_wildcard() {
        let list =
            AllowList::parse(&["http://*.internal.test:80", "http://api.internal.test"]).unwrap();
        let hit = list
            .find(Scheme::Http, &host("api.internal.test"), 80)
            .unwrap();
        assert_eq!(hit.text, "http://api.internal.test");
        assert!(hit.is_literal());
    }
}
