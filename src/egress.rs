//! Where the gateway may send requests on a customer's behalf (webhooks). A customer-chosen URL
//! must not reach the gateway's own network: loopback, private, link-local (cloud metadata at
//! 169.254.169.254), multicast and other non-public addresses are refused, unless the operator
//! allow-lists them (`XPAND_WEBHOOK_ALLOW`, for development). An IPv6 address that carries an
//! IPv4 one (IPv4-mapped, -translated or -compatible, NAT64, 6to4, Teredo) is judged as the
//! IPv4 address it reaches: `[64:ff9b::7f00:1]` is loopback.
//!
//! The check runs on the URL at submit, and again on every address a hostname resolves to at
//! delivery: the HTTP client resolves through [`PolicyResolver`] and connects only to the
//! addresses that passed, so a name that later re-points at an internal address (DNS
//! rebinding) is caught at the moment it matters.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// The addresses outbound requests may go to.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    /// Non-public networks allowed anyway.
    pub allow: Vec<IpNet>,
}

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// What kind of address it is: `loopback`, `private`, `link-local`, ...
    pub class: &'static str,
    /// For an IPv6 address that carries an IPv4 one: the mechanism and the refused address.
    pub via: Option<(&'static str, Ipv4Addr)>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some((mechanism, v4)) = self.via {
            write!(f, "the {mechanism} form of {v4}, ")?;
        }
        write!(f, "a {} address", self.class)
    }
}

impl EgressPolicy {
    /// Why `ip` is refused, or `None` when it may be reached. An IPv6 address that carries an
    /// IPv4 one (mapped, compatible, NAT64, 6to4, Teredo) reaches that IPv4 address, so it is
    /// judged as that address (or those addresses, all of which must pass).
    pub fn refusal(&self, ip: IpAddr) -> Option<Refusal> {
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return None;
        }
        let v6 = match ip {
            IpAddr::V4(v4) => return v4_refusal(v4).map(|class| Refusal { class, via: None }),
            IpAddr::V6(v6) => v6,
        };
        let carried = embedded_v4(v6);
        if carried.is_empty() {
            return v6_refusal(v6).map(|class| Refusal { class, via: None });
        }
        carried.into_iter().find_map(|(mechanism, v4)| {
            self.refusal(IpAddr::V4(v4)).map(|r| Refusal {
                class: r.class,
                via: Some((mechanism, v4)),
            })
        })
    }

    /// Checks a URL as given: http(s), a host, and, where the host is an address (in any of
    /// the spellings URL parsing accepts, like `0x7f000001`), a permitted one. Hostnames are
    /// resolved and every address they resolve to must be permitted.
    pub async fn check_url(&self, raw: &str) -> Result<url::Url, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("must be an http(s) URL".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry credentials".into());
        }
        let port = url.port_or_known_default().unwrap_or(80);
        let addresses: Vec<IpAddr> = match url.host() {
            None => return Err("must name a host".into()),
            Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
            Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
            Some(url::Host::Domain(name)) => tokio::net::lookup_host((name, port))
                .await
                .map_err(|_| format!("host {name} does not resolve"))?
                .map(|a| a.ip())
                .collect(),
        };
        for ip in addresses {
            if let Some(why) = self.refusal(ip) {
                return Err(format!("points at {ip}, {why}, which is refused"));
            }
        }
        Ok(url)
    }
}

fn v4_refusal(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_unspecified()
        || ip.is_broadcast()
        || a == 0
        || a >= 240
        || (a, b, c) == (192, 0, 0)
    {
        Some("reserved")
    } else if a == 198 && (18..20).contains(&b) {
        Some("benchmarking")
    } else if matches!((a, b, c), (192, 0, 2) | (198, 51, 100) | (203, 0, 113)) {
        Some("documentation")
    } else {
        None
    }
}

fn v6_refusal(ip: Ipv6Addr) -> Option<&'static str> {
    let [first, second, third, fourth, ..] = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() || (first, second, third, fourth) == (0x100, 0, 0, 0) {
        Some("reserved")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if first & 0xfe00 == 0xfc00 {
        Some("private")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if first & 0xffc0 == 0xfec0 {
        Some("site-local")
    } else if (first, second) == (0x2001, 0xdb8) {
        Some("documentation")
    } else {
        None
    }
}

/// The IPv4 addresses an IPv6 address carries, each with the mechanism that carries it: where
/// a packet to it ends up (through the host's dual stack, a NAT64 gateway, a 6to4 relay or a
/// Teredo server). Empty for a native IPv6 address.
fn embedded_v4(ip: Ipv6Addr) -> Vec<(&'static str, Ipv4Addr)> {
    let o = ip.octets();
    let at = |i: usize| Ipv4Addr::new(o[i], o[i + 1], o[i + 2], o[i + 3]);
    match ip.segments() {
        // ::ffff:a.b.c.d (RFC 4291) and SIIT's ::ffff:0:a.b.c.d (RFC 2765).
        [0, 0, 0, 0, 0, 0xffff, ..] => vec![("IPv4-mapped", at(12))],
        [0, 0, 0, 0, 0xffff, 0, ..] => vec![("IPv4-translated", at(12))],
        // ::a.b.c.d (RFC 4291, deprecated); :: and ::1 keep their IPv6 meaning.
        [0, 0, 0, 0, 0, 0, ..] if !ip.is_unspecified() && !ip.is_loopback() => {
            vec![("IPv4-compatible", at(12))]
        }
        // The well-known NAT64 prefix 64:ff9b::/96 (RFC 6052).
        [0x64, 0xff9b, 0, 0, 0, 0, ..] => vec![("NAT64", at(12))],
        // The local-use 64:ff9b:1::/48 (RFC 8215) may hold any RFC 6052 prefix length from /48
        // to /96 (bits 64..72 are skipped): every reading must pass.
        [0x64, 0xff9b, 1, ..] => vec![
            ("NAT64", Ipv4Addr::new(o[6], o[7], o[9], o[10])),
            ("NAT64", Ipv4Addr::new(o[7], o[9], o[10], o[11])),
            ("NAT64", at(9)),
            ("NAT64", at(12)),
        ],
        // 6to4 (RFC 3056): 2002:AABB:CCDD::/48.
        [0x2002, ..] => vec![("6to4", at(2))],
        // Teredo (RFC 4380): 2001:0:server:flags:port:client, the client's bits inverted.
        [0x2001, 0, ..] => vec![
            ("Teredo server", at(4)),
            ("Teredo client", Ipv4Addr::from(!u32::from(at(12)))),
        ],
        _ => Vec::new(),
    }
}

/// A resolver for the HTTP client that drops refused addresses, and fails when none is left.
pub struct PolicyResolver(pub Arc<EgressPolicy>);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let permitted: Vec<SocketAddr> = resolved
                .filter(|a| policy.refusal(a.ip()).is_none())
                .collect();
            if permitted.is_empty() {
                return Err(format!("{host} resolves only to refused addresses").into());
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn internal_addresses_are_refused_in_every_spelling() {
        let policy = EgressPolicy::default();
        for url in [
            "http://127.0.0.1:6379/",
            "http://localhost/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[2002:7f00:1::]/",
            "http://224.0.0.1/",
            "http://0.0.0.0/",
            "ftp://93.184.216.34/",
            "http://user:pw@93.184.216.34/",
        ] {
            assert!(policy.check_url(url).await.is_err(), "{url} was accepted");
        }
        for url in ["http://93.184.216.34/hook", "https://[2606:4700::1]/"] {
            assert!(policy.check_url(url).await.is_ok(), "{url} was refused");
        }
        let dev = EgressPolicy {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
        };
        assert!(dev.check_url("http://127.0.0.1:9000/").await.is_ok());
        assert!(dev.check_url("http://10.0.0.1/").await.is_err());
    }

    /// Each IPv6 form that carries an IPv4 address is judged as that address: refused when it
    /// is internal, allowed when it is public.
    #[test]
    fn transition_addresses_are_judged_by_the_ipv4_address_inside() {
        let policy = EgressPolicy::default();
        let judged = |ip: &str| {
            policy
                .refusal(ip.parse().unwrap())
                .map(|r| (r.class, r.via.map(|(m, v4)| (m, v4.to_string()))))
        };
        let via = |class, mechanism, v4: &str| Some((class, Some((mechanism, v4.to_string()))));
        for (ip, expected) in [
            (
                "::ffff:127.0.0.1",
                via("loopback", "IPv4-mapped", "127.0.0.1"),
            ),
            (
                "::ffff:0:10.0.0.1",
                via("private", "IPv4-translated", "10.0.0.1"),
            ),
            (
                "::127.0.0.1",
                via("loopback", "IPv4-compatible", "127.0.0.1"),
            ),
            ("::10.0.0.1", via("private", "IPv4-compatible", "10.0.0.1")),
            ("64:ff9b::7f00:1", via("loopback", "NAT64", "127.0.0.1")),
            ("64:ff9b::a00:1", via("private", "NAT64", "10.0.0.1")),
            (
                "64:ff9b::a9fe:a9fe",
                via("link-local", "NAT64", "169.254.169.254"),
            ),
            ("64:ff9b:1::7f00:1", via("reserved", "NAT64", "0.0.0.0")),
            // Local-use NAT64, public at /96 but 10.93.93.93 read at /48.
            (
                "64:ff9b:1:a5d:5d:5d5d:5db8:d822",
                via("private", "NAT64", "10.93.93.93"),
            ),
            ("2002:7f00:1::", via("loopback", "6to4", "127.0.0.1")),
            (
                "2002:a9fe:a9fe::1",
                via("link-local", "6to4", "169.254.169.254"),
            ),
            // Teredo: public server 65.54.227.120, client 127.0.0.1 (bits inverted).
            (
                "2001:0:4136:e378:8000:63bf:80ff:fffe",
                via("loopback", "Teredo client", "127.0.0.1"),
            ),
            // Teredo: server 10.0.0.1, public client 93.184.216.34.
            (
                "2001:0:a00:1:8000:63bf:a247:27dd",
                via("private", "Teredo server", "10.0.0.1"),
            ),
            ("::", Some(("reserved", None))),
            ("::1", Some(("loopback", None))),
            ("2001:db8::1", Some(("documentation", None))),
            ("100::1", Some(("reserved", None))),
            ("fec0::1", Some(("site-local", None))),
            // The same forms of the public 93.184.216.34, and a native address.
            ("::ffff:93.184.216.34", None),
            ("::93.184.216.34", None),
            ("64:ff9b::5db8:d822", None),
            ("64:ff9b:1:5d5d:5d:5d5d:5db8:d822", None),
            ("2002:5db8:d822::1", None),
            ("2001:0:4136:e378:8000:63bf:a247:27dd", None),
            ("2606:4700::1", None),
        ] {
            assert_eq!(judged(ip), expected, "{ip}");
        }

        // An allowed IPv4 network is allowed in every form; its neighbours are not.
        let dev = EgressPolicy {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
        };
        for ip in ["::ffff:127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::"] {
            assert_eq!(dev.refusal(ip.parse().unwrap()), None, "{ip}");
        }
        assert!(dev.refusal("64:ff9b::a00:1".parse().unwrap()).is_some());
    }

    #[tokio::test]
    async fn a_refused_transition_address_is_named_with_the_address_inside() {
        let why = EgressPolicy::default()
            .check_url("http://[64:ff9b::7f00:1]/hook")
            .await
            .unwrap_err();
        assert_eq!(
            why,
            "points at 64:ff9b::7f00:1, the NAT64 form of 127.0.0.1, a loopback address, \
             which is refused"
        );
    }

    /// DNS rebinding: a name that passed at submit and now resolves to loopback. The client
    /// resolves through the policy, so it never connects.
    #[tokio::test]
    async fn the_client_never_connects_to_a_refused_address_a_name_resolves_to() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(PolicyResolver(Arc::new(EgressPolicy::default()))))
            .build()
            .unwrap();
        let sent = client
            .post(format!("http://localhost:{port}/hook"))
            .send()
            .await;
        assert!(sent.is_err());
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "the refused address was connected to");
    }
}
