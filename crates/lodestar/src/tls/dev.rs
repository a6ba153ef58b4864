//! A development PKI: a CA, a server certificate and a client certificate,
//! made in one call. What `lodestar cert` writes.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::TlsError;

/// A CA and two certificates it signed, all in PEM: one for servers (valid
/// for the given host names and IPs) and one for clients (mutual TLS).
///
/// For development and tests only: the keys are not protected.
///
/// ```
/// use lodestar::tls::{ClientTls, DevPki, ServerTls};
///
/// let pki = DevPki::generate(&["localhost", "127.0.0.1"], 2).unwrap();
/// let server = ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes())
///     .unwrap()
///     .require_client_certs(pki.ca_cert.as_bytes())
///     .unwrap();
/// let client = ClientTls::from_ca_pem(pki.ca_cert.as_bytes())
///     .unwrap()
///     .with_identity_pem(pki.client_cert.as_bytes(), pki.client_key.as_bytes())
///     .unwrap();
/// # let _ = (server, client);
/// ```
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The CA certificate: what clients and servers trust.
    pub ca_cert: String,
    /// The CA's private key (to sign more certificates).
    pub ca_key: String,
    /// The server certificate.
    pub server_cert: String,
    /// The server's private key.
    pub server_key: String,
    /// The client certificate, for mutual TLS.
    pub client_cert: String,
    /// The client's private key.
    pub client_key: String,
}

fn fail(what: &str) -> impl Fn(rcgen::Error) -> TlsError + '_ {
    move |e| TlsError(format!("making the {what}: {e}"))
}

/// Valid from a year ago (clock skew) for `years` years.
fn validity(params: &mut CertificateParams, years: u32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let year = 1970 + i32::try_from(now / 31_556_952).unwrap_or(0);
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + i32::try_from(years).unwrap_or(1).max(1), 1, 1);
}

impl DevPki {
    /// Makes a CA and server and client certificates valid for `years`
    /// years; the server certificate names `hosts` (DNS names, wildcards
    /// like `*.example.test`, or IP addresses).
    pub fn generate(hosts: &[&str], years: u32) -> Result<Self, TlsError> {
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "lodestar development CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut ca, years);
        let ca_key = KeyPair::generate().map_err(fail("CA key"))?;
        let ca_cert = ca.self_signed(&ca_key).map_err(fail("CA certificate"))?;
        let issuer = Issuer::new(ca, ca_key);

        let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        let mut server = CertificateParams::new(hosts).map_err(fail("server certificate"))?;
        server
            .distinguished_name
            .push(DnType::CommonName, "lodestar development server");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut server, years);
        let server_key = KeyPair::generate().map_err(fail("server key"))?;
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .map_err(fail("server certificate"))?;

        let mut client = CertificateParams::new(vec!["lodestar-client".to_owned()])
            .map_err(fail("client certificate"))?;
        client
            .distinguished_name
            .push(DnType::CommonName, "lodestar development client");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut client, years);
        let client_key = KeyPair::generate().map_err(fail("client key"))?;
        let client_cert = client
            .signed_by(&client_key, &issuer)
            .map_err(fail("client certificate"))?;

        Ok(Self {
            ca_cert: ca_cert.pem(),
            ca_key: issuer.key().serialize_pem(),
            server_cert: server_cert.pem(),
            server_key: server_key.serialize_pem(),
            client_cert: client_cert.pem(),
            client_key: client_key.serialize_pem(),
        })
    }

    /// The file names [`write_to`](Self::write_to) uses, with their contents.
    pub fn files(&self) -> [(&'static str, &str); 6] {
        [
            ("ca.pem", &self.ca_cert),
            ("ca.key", &self.ca_key),
            ("server.pem", &self.server_cert),
            ("server.key", &self.server_key),
            ("client.pem", &self.client_cert),
            ("client.key", &self.client_key),
        ]
    }

    /// Writes `ca.pem`, `ca.key`, `server.pem`, `server.key`, `client.pem`
    /// and `client.key` into `dir` (created if missing); keys are readable
    /// by the owner only.
    pub fn write_to(&self, dir: &Path) -> Result<(), TlsError> {
        let io = |e: std::io::Error| TlsError(format!("writing into {}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        for (name, contents) in self.files() {
            let path = dir.join(name);
            std::fs::write(&path, contents).map_err(io)?;
            #[cfg(unix)]
            if name.ends_with(".key") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
            }
        }
        Ok(())
    }
}
