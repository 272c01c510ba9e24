//! How the gateway and the workers open their broker connection: TLS for `mqtts://`, and a
//! refusal to send signed but readable traffic in the clear to another machine by accident.
//!
//! Messages are signed end to end, so a plaintext link cannot forge work; it can still be read,
//! and customers' inputs and outputs cross it. A plaintext `mqtt://` broker on another host is
//! therefore refused unless the operator names that host as one where plaintext is acceptable
//! (a broker reached only over a private cluster network, say).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::v5::MqttOptions;
use rumqttc::{NetworkOptions, TlsConfiguration, Transport};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use rustls::{ClientConfig, RootCertStore};

use crate::BrokerAddress;

/// A broker address whose security has been checked, with the TLS settings to reach it.
#[derive(Debug, Clone)]
pub struct BrokerLink {
    address: BrokerAddress,
    tls: Option<Arc<ClientConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerLinkError {
    #[error(
        "refusing plaintext {address} to another machine: use mqtts://, or name the host in \
         XPAND_MQTT_PLAINTEXT_HOSTS if the network between them is private"
    )]
    PlaintextToRemote { address: BrokerAddress },
    #[error("a broker CA file is set but {address} is plaintext: use mqtts://")]
    CaWithoutTls { address: BrokerAddress },
    #[error("broker CA file {}: {why}", path.display())]
    CaFile { path: PathBuf, why: String },
}

impl BrokerLink {
    /// Checks the link and loads its trust anchors.
    ///
    /// - `mqtts://` trusts the CAs in `ca_file` (PEM) when given, otherwise the public web roots
    ///   compiled into the binary.
    /// - `mqtt://` is accepted to a loopback host, or to a host listed in `plaintext_hosts`.
    pub fn new(
        address: BrokerAddress,
        ca_file: Option<&Path>,
        plaintext_hosts: &[String],
    ) -> Result<Self, BrokerLinkError> {
        if !address.tls {
            if ca_file.is_some() {
                return Err(BrokerLinkError::CaWithoutTls { address });
            }
            let named = plaintext_hosts
                .iter()
                .any(|host| host.eq_ignore_ascii_case(&address.host));
            if !address.is_loopback() && !named {
                return Err(BrokerLinkError::PlaintextToRemote { address });
            }
            return Ok(Self { address, tls: None });
        }
        let roots = match ca_file {
            Some(path) => roots_from_file(path)?,
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        // The provider is named rather than taken from the process default, which a dependency
        // could install or leave ambiguous.
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        Ok(Self {
            address,
            tls: Some(Arc::new(config)),
        })
    }

    /// A plaintext link to a broker on this machine.
    pub fn loopback(port: u16) -> Self {
        Self {
            address: BrokerAddress::plain("127.0.0.1", port),
            tls: None,
        }
    }

    pub fn address(&self) -> &BrokerAddress {
        &self.address
    }

    /// MQTT options for this link: the address, the transport, and the socket settings both
    /// sides want. The caller adds its session settings (keep-alive, packet size).
    pub fn mqtt_options(&self, client_id: String) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, &self.address.host, self.address.port);
        if let Some(config) = &self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                config.clone(),
            )));
        }
        // Small request/response messages: Nagle plus delayed ACKs would add ~40 ms to each shard.
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        options
    }
}

fn roots_from_file(path: &Path) -> Result<RootCertStore, BrokerLinkError> {
    let bad = |why: String| BrokerLinkError::CaFile {
        path: path.to_owned(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(url: &str, ca: Option<&Path>, hosts: &[&str]) -> Result<BrokerLink, BrokerLinkError> {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        BrokerLink::new(url.parse().unwrap(), ca, &hosts)
    }

    #[test]
    fn plaintext_goes_only_to_loopback_or_named_hosts() {
        assert!(link("mqtt://127.0.0.1:1883", None, &[]).is_ok());
        assert!(link("mqtt://[::1]:1883", None, &[]).is_ok());
        assert!(matches!(
            link("mqtt://emqx:1883", None, &[]),
            Err(BrokerLinkError::PlaintextToRemote { .. })
        ));
        assert!(matches!(
            link("mqtt://[::ffff:127.0.0.1]:1883", None, &["emqx"]),
            Err(BrokerLinkError::PlaintextToRemote { .. })
        ));
        assert!(link("mqtt://EMQX:1883", None, &["other", "emqx"]).is_ok());
        // TLS needs no opt-in; the public roots are the default trust.
        let tls = link("mqtts://broker.example.net", None, &[]).unwrap();
        assert!(tls.tls.is_some());
    }

    #[test]
    fn a_ca_file_must_hold_certificates_and_go_with_tls() {
        let dir = std::env::temp_dir().join(format!("xpand-ca-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let missing = dir.join("missing.pem");
        let outcome = (
            link("mqtts://broker", Some(&empty), &[]),
            link("mqtts://broker", Some(&missing), &[]),
            link("mqtt://127.0.0.1", Some(&empty), &[]),
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            matches!(&outcome.0, Err(BrokerLinkError::CaFile { why, .. }) if why.contains("no certificate"))
        );
        assert!(matches!(outcome.1, Err(BrokerLinkError::CaFile { .. })));
        assert!(matches!(
            outcome.2,
            Err(BrokerLinkError::CaWithoutTls { .. })
        ));
    }
}
