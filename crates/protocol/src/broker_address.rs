//! Where the MQTT broker is: parsed the same way by the gateway and the workers.

use std::str::FromStr;

/// An MQTT broker's host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidBrokerUrl(String);

impl FromStr for BrokerAddress {
    type Err = InvalidBrokerUrl;

    /// Accepts `mqtt://host:port`, `tcp://host:port` or `host:port`; the port defaults to 1883.
    /// IPv6 hosts go in brackets (`mqtt://[::1]:1883`).
    fn from_str(url: &str) -> Result<Self, InvalidBrokerUrl> {
        let bad = |why: &str| InvalidBrokerUrl(format!("broker URL `{url}`: {why}"));
        let rest = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "unsupported scheme `{scheme}` (use mqtt://host:port)"
                )))
            }
            None => url,
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
            None => 1883,
        };
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        let parse = |s: &str| s.parse::<BrokerAddress>().map(|a| (a.host, a.port));
        assert_eq!(
            parse("mqtt://127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(
            parse("tcp://broker:2883/").unwrap(),
            ("broker".into(), 2883)
        );
        assert_eq!(parse("broker").unwrap(), ("broker".into(), 1883));
        assert_eq!(parse("mqtt://[::1]:1884").unwrap(), ("::1".into(), 1884));
        assert!(parse("mqtts://broker:8883").is_err());
        assert!(parse("http://broker").is_err());
        assert!(parse("mqtt://:1883").is_err());
        assert!(parse("mqtt://broker:notaport").is_err());
        assert!(parse("mqtt://user@broker:1883").is_err());
    }
}
