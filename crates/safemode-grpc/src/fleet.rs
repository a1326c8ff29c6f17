//! The fleet: every replica that serves the store, found through it.
//!
//! Each replica keeps one record under `replicas/` bound to a lease it
//! renews (its name and the address the others reach it at), so the records
//! of the fleet cost one key and one keep-alive per replica, never one per
//! subscriber. The replica a commander asks for status reads those records,
//! asks every other replica for its own subscribers over an internal call
//! signed with the fleet's signing key, and merges the answers; a replica
//! that does not answer is named, and the answer says it is partial.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::server::{ServeConfig, StoreConfig};

/// The shortest and longest lease a replica's record may have.
pub const REPLICA_TTL_RANGE: (Duration, Duration) =
    (Duration::from_secs(2), Duration::from_secs(300));

/// How a replica is reached by the others, and how it checks them.
#[derive(Clone, Debug)]
pub(crate) struct PeerSettings {
    /// The `host:port` the others dial; `None`: the bound listen address.
    pub advertise: Option<String>,
    /// CA certificates (PEM) that verify the others' certificates, when
    /// gRPC is served over TLS.
    pub ca: Option<Vec<u8>>,
    /// The name the others' certificates must carry; `None`: the host of
    /// each one's address.
    pub tls_name: Option<String>,
    /// The lease of this replica's record.
    pub ttl: Duration,
}

/// Checks the fleet flags of `config` and reads the peer CA file.
pub(crate) fn peer_settings(config: &ServeConfig) -> anyhow::Result<PeerSettings> {
    let (shortest, longest) = REPLICA_TTL_RANGE;
    if config.replica_ttl < shortest || config.replica_ttl > longest {
        bail!(
            "--replica-ttl {}s is out of range: give 2s to 5m (how long a dead replica's record stays before the others stop asking it)",
            config.replica_ttl.as_secs_f64()
        );
    }
    let advertise = match &config.advertise {
        Some(address) => Some(check_address(address)?),
        None => {
            if config.listen.ip().is_unspecified()
                && matches!(config.store, StoreConfig::Etcd { .. })
            {
                bail!(
                    "--listen {} names no single host the other replicas could reach; give --advertise HOST:PORT (in Kubernetes: --advertise $(POD_IP):{})",
                    config.listen,
                    config.listen.port()
                );
            }
            None
        }
    };
    let serves_tls = config.tls_cert.is_some();
    let ca = match (&config.peer_ca, &config.tls_cert) {
        (Some(path), _) if serves_tls => Some(read_pem_certificates(path, "--peer-ca")?),
        (Some(_), _) => bail!(
            "--peer-ca is for replicas that serve TLS; give --tls-cert and --tls-key too, or drop --peer-ca"
        ),
        (None, Some(cert)) => Some(read_pem_certificates(cert, "--tls-cert")?),
        (None, None) => None,
    };
    let tls_name = match &config.peer_tls_name {
        Some(_) if !serves_tls => bail!(
            "--peer-tls-name is for replicas that serve TLS; give --tls-cert and --tls-key too, or drop --peer-tls-name"
        ),
        Some(name) => {
            let valid = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
            if !valid {
                bail!(
                    "bad --peer-tls-name {name:?}: give the DNS name (or IP address) the replicas' certificates carry, e.g. safemode.safemode.svc"
                );
            }
            Some(name.clone())
        }
        None => None,
    };
    Ok(PeerSettings {
        advertise,
        ca,
        tls_name,
        ttl: config.replica_ttl,
    })
}

/// A `host:port` the other replicas can dial: a host name or an IP address
/// (IPv6 in brackets) and a port from 1 to 65535.
fn check_address(address: &str) -> anyhow::Result<String> {
    let bad = |why: &str| {
        anyhow::anyhow!(
            "bad --advertise {address:?}: {why}; give HOST:PORT, the address the other replicas reach this one at, e.g. 10.0.0.5:7700 or [fd00::5]:7700"
        )
    };
    if address.contains("://") {
        return Err(bad("give no scheme"));
    }
    let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(port) if port > 0 => {}
        _ => return Err(bad("the port is not 1 to 65535")),
    }
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
    };
    if !host_ok {
        return Err(bad("the host is not a DNS name or an IP address"));
    }
    Ok(address.to_string())
}

/// The certificates in a PEM file, read to check there is at least one.
fn read_pem_certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        bail!(
            "{flag} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advertised_address_is_host_and_port() {
        for good in [
            "10.0.0.5:7700",
            "safemode-0.safemode:7700",
            "[fd00::5]:7700",
        ] {
            assert_eq!(check_address(good).unwrap(), good);
        }
        for (bad, why) in [
            ("10.0.0.5", "no port"),
            ("http://10.0.0.5:7700", "no scheme"),
            ("10.0.0.5:0", "1 to 65535"),
            ("10.0.0.5:http", "1 to 65535"),
            (":7700", "not a DNS name"),
            ("a b:7700", "not a DNS name"),
            ("[zz]:7700", "not a DNS name"),
        ] {
            let error = check_address(bad).unwrap_err().to_string();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
