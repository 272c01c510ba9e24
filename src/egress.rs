//! Where the gateway may send requests on a customer's behalf (webhooks). A customer-chosen URL
//! must not reach the gateway's own network: loopback, private, link-local (cloud metadata at
//! 169.254.169.254), multicast and other non-public addresses are refused, unless the operator
//! allow-lists them (`XPAND_WEBHOOK_ALLOW`, for development).
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

impl EgressPolicy {
    /// Why `ip` is refused, or `None` when it may be reached.
    pub fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return None;
        }
        match ip {
            IpAddr::V4(v4) => v4_refusal(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4_refusal(v4),
                None => v6_refusal(v6),
            },
        }
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
                return Err(format!("points at {ip}, a {why} address, which is refused"));
            }
        }
        Ok(url)
    }
}

fn v4_refusal(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_unspecified() || ip.is_broadcast() || a == 0 || a >= 240 {
        Some("reserved")
    } else if a == 198 && (18..20).contains(&b) {
        Some("benchmarking")
    } else {
        None
    }
}

fn v6_refusal(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("reserved")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if first & 0xfe00 == 0xfc00 {
        Some("private")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else {
        None
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
