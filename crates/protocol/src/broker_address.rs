//! Where the MQTT broker is: parsed the same way by the gateway and the workers.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An MQTT broker's host and port, and whether the link is TLS (`mqtts://`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddress {
    /// A plaintext broker address (`mqtt://host:port`).
    pub fn plain(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            tls: false,
        }
    }

    /// Whether the host is this machine: `localhost`, 127.0.0.0/8 or `::1`. An address that
    /// merely maps to loopback (`::ffff:127.0.0.1`, `64:ff9b::7f00:1`) is not: it may be routed.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidBrokerUrl(String);

impl FromStr for BrokerAddress {
    type Err = InvalidBrokerUrl;

    /// Accepts `mqtts://host:port` (or `ssl://`) for TLS, `mqtt://host:port`, `tcp://host:port`
    /// or `host:port` for plaintext; the port defaults to 8883 and 1883. IPv6 hosts go in
    /// brackets (`mqtt://[::1]:1883`).
    fn from_str(url: &str) -> Result<Self, InvalidBrokerUrl> {
        let bad = |why: &str| InvalidBrokerUrl(format!("broker URL `{url}`: {why}"));
        let (tls, rest) = match url.split_once("://") {
            Some(("mqtts" | "ssl", rest)) => (true, rest),
            Some(("mqtt" | "tcp", rest)) => (false, rest),
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "unsupported scheme `{scheme}` (use mqtts://host:port or mqtt://host:port)"
                )))
            }
            None => (false, url),
        };
        let authority = rest.trim_end_matches('/');
        if authority.contains(['/', '@', '?']) {
            return Err(bad("must be just mqtt://host:port"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("unclosed `[`"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(port) => port.parse().map_err(|_| bad("invalid port"))?,
            None if tls => 8883,
            None => 1883,
        };
        Ok(Self {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        let parse = |s: &str| s.parse::<BrokerAddress>().map(|a| (a.host, a.port, a.tls));
        assert_eq!(
            parse("mqtt://127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883, false)
        );
        assert_eq!(
            parse("tcp://broker:2883/").unwrap(),
            ("broker".into(), 2883, false)
        );
        assert_eq!(parse("broker").unwrap(), ("broker".into(), 1883, false));
        assert_eq!(
            parse("mqtt://[::1]:1884").unwrap(),
            ("::1".into(), 1884, false)
        );
        assert_eq!(
            parse("mqtts://broker").unwrap(),
            ("broker".into(), 8883, true)
        );
        assert_eq!(
            parse("ssl://[fd00::7]:9883").unwrap(),
            ("fd00::7".into(), 9883, true)
        );
        assert!(parse("wss://broker").is_err());
        assert!(parse("http://broker").is_err());
        assert!(parse("mqtt://:1883").is_err());
        assert!(parse("mqtt://broker:notaport").is_err());
        assert!(parse("mqtt://user@broker:1883").is_err());
    }

    #[test]
    fn only_this_machine_is_loopback() {
        let loopback = |s: &str| s.parse::<BrokerAddress>().unwrap().is_loopback();
        assert!(loopback("mqtt://127.0.0.1:1883"));
        assert!(loopback("mqtt://127.8.9.1"));
        assert!(loopback("mqtt://[::1]:1883"));
        assert!(loopback("mqtt://LocalHost:1883"));
        assert!(!loopback("mqtt://10.0.0.2"));
        assert!(!loopback("mqtt://emqx:1883"));
        assert!(!loopback("mqtt://localhost.example.com"));
        assert!(!loopback("mqtt://[::ffff:127.0.0.1]"));
        assert!(!loopback("mqtt://[64:ff9b::7f00:1]"));
        assert!(!loopback("mqtt://[::127.0.0.1]"));
    }

    #[test]
    fn addresses_print_as_urls() {
        for url in [
            "mqtts://broker:8883",
            "mqtt://[::1]:1883",
            "mqtt://10.0.0.2:1884",
        ] {
            assert_eq!(url.parse::<BrokerAddress>().unwrap().to_string(), url);
        }
    }
}
