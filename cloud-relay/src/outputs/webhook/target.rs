//! Which addresses a webhook may connect to (SSRF protection).
//!
//! A webhook URL is configuration, but the name in it resolves at delivery time, and DNS
//! can point a public-looking name at `127.0.0.1` or a cloud metadata address. So the
//! check is on the addresses actually connected to, not on the URL text: the HTTP client
//! resolves through [`GuardedResolver`], which refuses the whole name when any of its
//! addresses is not public, and only ever hands the client addresses it checked. A URL
//! whose host is an IP literal is never resolved; [`refusal`] checks it before the call.
//!
//! Not public (refused unless the output has `allow_private = true`): unspecified
//! (`0.0.0.0/8`, `::`), loopback (`127/8`, `::1`), private (RFC 1918 `10/8`,
//! `172.16/12`, `192.168/16`; `fc00::/7`), link-local (`169.254/16`, `fe80::/10`), CGNAT
//! (`100.64/10`), multicast (`224/4`, `ff00::/8`) and broadcast; an IPv6 address that
//! embeds an IPv4 one (`::ffff:a.b.c.d`, `::a.b.c.d`, NAT64 `64:ff9b::/96`) is judged by
//! the embedded address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why `ip` may not be connected to, or `None` when it is a public address.
pub fn not_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => v4_class(v4),
            None => v6_class(v6),
        },
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("carrier-grade NAT")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else {
        None
    }
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if first & 0xfe00 == 0xfc00 {
        Some("private")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`, but not `::` or `::1`) or NAT64 (`64:ff9b::/96`) IPv6 address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..6] == [0; 6] && !ip.is_unspecified() && !ip.is_loopback() {
        return Some(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    None
}

/// Why a URL whose host is the IP literal `ip` is refused, or `None` when it may be used.
pub fn refusal(ip: IpAddr) -> Option<String> {
    not_public(ip).map(|class| {
        format!(
            "refused to connect to {ip}: a {class} address (SSRF protection; set \
             allow_private = true for this output if the receiver is meant to be there)"
        )
    })
}

/// A DNS resolver for the webhook client that refuses names resolving to addresses that
/// are not public.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    /// The output's name, for the log.
    pub output: String,
}

/// A name that resolved to an address that is not public.
#[derive(Debug, thiserror::Error)]
#[error(
    "refused to connect to {host} ({addr}): a {class} address (SSRF protection; set \
     allow_private = true for this output if the receiver is meant to be there)"
)]
pub struct Refused {
    /// The name.
    pub host: String,
    /// The first address that is not public.
    pub addr: IpAddr,
    /// What kind of address it is.
    pub class: &'static str,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let output = self.output.clone();
        Box::pin(async move {
            // Port 0: the client puts the URL's port in.
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some((addr, class)) = addrs
                .iter()
                .find_map(|a| not_public(a.ip()).map(|c| (a.ip(), c)))
            {
                let refused = Refused { host, addr, class };
                tracing::warn!(output = %output, "webhook target {refused}");
                return Err(Box::new(refused) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<&'static str> {
        not_public(s.parse().unwrap())
    }

    #[test]
    fn only_public_addresses_pass() {
        for (ip, want) in [
            ("0.0.0.0", Some("unspecified")),
            ("0.1.2.3", Some("unspecified")),
            ("127.0.0.1", Some("loopback")),
            ("127.255.0.9", Some("loopback")),
            ("10.1.2.3", Some("private")),
            ("172.16.0.1", Some("private")),
            ("172.31.255.255", Some("private")),
            ("192.168.1.1", Some("private")),
            ("169.254.169.254", Some("link-local")),
            ("100.64.0.1", Some("carrier-grade NAT")),
            ("100.127.255.255", Some("carrier-grade NAT")),
            ("224.0.0.1", Some("multicast")),
            ("255.255.255.255", Some("broadcast")),
            ("::", Some("unspecified")),
            ("::1", Some("loopback")),
            ("fc00::1", Some("private")),
            ("fd12:3456::1", Some("private")),
            ("fe80::1", Some("link-local")),
            ("febf::1", Some("link-local")),
            ("ff02::1", Some("multicast")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.0.0.1", Some("private")),
            ("::169.254.169.254", Some("link-local")),
            ("64:ff9b::c0a8:0101", Some("private")),
            ("8.8.8.8", None),
            ("100.63.255.255", None),
            ("100.128.0.0", None),
            ("172.32.0.1", None),
            ("2001:db8::1", None),
            ("2606:4700::1111", None),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::808:808", None),
            ("fec0::1", None),
        ] {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_a_name_that_resolves_to_loopback() {
        let r = GuardedResolver { output: "t".into() };
        let e = match r.resolve("localhost".parse().unwrap()).await {
            Ok(a) => panic!("localhost resolved to {:?}", a.collect::<Vec<_>>()),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("localhost") && e.contains("loopback") && e.contains("allow_private"),
            "{e}"
        );
    }
}
