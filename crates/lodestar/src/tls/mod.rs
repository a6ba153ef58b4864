//! TLS and mutual TLS, with rustls.
//!
//! A server gets a [`ServerTls`] (its certificate chain and key, and for
//! mutual TLS the CA that client certificates must chain to); a client gets
//! a [`ClientTls`] (the CA that server certificates must chain to, and for
//! mutual TLS its own certificate and key). Both negotiate HTTP/2 with ALPN
//! (`h2`), as gRPC requires. PEM comes from memory or from files;
//! `lodestar cert` makes a development CA and certificates in one command.
//!
//! ```no_run
//! use lodestar::tls::{ClientTls, ServerTls};
//!
//! # fn main() -> Result<(), lodestar::tls::TlsError> {
//! let server = ServerTls::from_pem_files("certs/server.pem", "certs/server.key")?
//!     .require_client_certs_from_file("certs/ca.pem")?; // mutual TLS
//! let client = ClientTls::from_ca_file("certs/ca.pem")?
//!     .with_identity_files("certs/client.pem", "certs/client.key")?;
//! # let _ = (server, client);
//! # Ok(()) }
//! ```

#[cfg(feature = "dev-certs")]
mod dev;

use std::path::Path;
use std::sync::Arc;

#[cfg(feature = "dev-certs")]
pub use dev::DevPki;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// TLS settings that could not be used: which file or value, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|e| TlsError(format!("cannot read the {what} {}: {e}", path.display())))
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("the {what} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "the {what} holds no certificate (expected PEM `CERTIFICATE` blocks)"
        )));
    }
    Ok(certs)
}

fn key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        TlsError(format!(
            "the {what} holds no usable private key (expected PEM PKCS#8, RSA or EC): {e}"
        ))
    })
}

fn roots(pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(pem, "CA certificate")? {
        roots
            .add(cert)
            .map_err(|e| TlsError(format!("the CA certificate cannot be used: {e}")))?;
    }
    Ok(roots)
}

/// A server's TLS settings. See the [module docs](self).
#[derive(Clone)]
pub struct ServerTls {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    client_roots: Option<Arc<rustls::RootCertStore>>,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("certificates", &self.chain.len())
            .field("mutual", &self.client_roots.is_some())
            .finish()
    }
}

impl ServerTls {
    /// A certificate chain (leaf first) and its private key, in PEM.
    pub fn from_pem(chain: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = certs(chain, "server certificate")?;
        let key = Arc::new(key(key_pem, "server key")?);
        let config = Self::config(&chain, &key, None)?;
        Ok(Self {
            chain,
            key,
            client_roots: None,
            config,
        })
    }

    /// Like [`from_pem`](Self::from_pem), from files.
    pub fn from_pem_files(
        chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        Self::from_pem(
            &read(chain.as_ref(), "server certificate")?,
            &read(key.as_ref(), "server key")?,
        )
    }

    /// Mutual TLS: clients must present a certificate that chains to `ca_pem`.
    pub fn require_client_certs(mut self, ca_pem: &[u8]) -> Result<Self, TlsError> {
        let roots = Arc::new(roots(ca_pem)?);
        self.config = Self::config(&self.chain, &self.key, Some(roots.clone()))?;
        self.client_roots = Some(roots);
        Ok(self)
    }

    /// Like [`require_client_certs`](Self::require_client_certs), from a file.
    pub fn require_client_certs_from_file(self, ca: impl AsRef<Path>) -> Result<Self, TlsError> {
        let pem = read(ca.as_ref(), "client CA certificate")?;
        self.require_client_certs(&pem)
    }

    fn config(
        chain: &[CertificateDer<'static>],
        key: &PrivateKeyDer<'static>,
        client_roots: Option<Arc<rustls::RootCertStore>>,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?;
        let builder = match client_roots {
            None => builder.with_no_client_auth(),
            Some(roots) => {
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                        .build()
                        .map_err(|e| TlsError(format!("the client CA cannot be used: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain.to_vec(), key.clone_key())
            .map_err(|e| {
                TlsError(format!(
                    "the server certificate and key do not go together: {e}"
                ))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// An acceptor for HTTP/1.1 servers next to the gRPC one (an HTTP/JSON
    /// API on the same certificates): the same settings, offering
    /// `http/1.1` instead of `h2` in ALPN.
    pub fn http1_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    /// The service port's acceptor: `h2`, and `http/1.1` after it when
    /// the port serves HTTP/1.1 too (the web protocols), so that h2
    /// clients get gRPC and HTTP/1.1-only clients get in.
    pub(crate) fn acceptor_for(&self, http1: bool) -> tokio_rustls::TlsAcceptor {
        if !http1 {
            return self.acceptor();
        }
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// A client's TLS settings. See the [module docs](self).
#[derive(Clone)]
pub struct ClientTls {
    roots: Arc<rustls::RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    server_name: Option<(ServerName<'static>, String)>,
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("roots", &self.roots.len())
            .field("identity", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl ClientTls {
    /// Trusts servers whose certificates chain to the CA certificates in `ca_pem`.
    pub fn from_ca_pem(ca_pem: &[u8]) -> Result<Self, TlsError> {
        let roots = Arc::new(roots(ca_pem)?);
        let config = Self::config(&roots, None)?;
        Ok(Self {
            roots,
            identity: None,
            server_name: None,
            config,
        })
    }

    /// Like [`from_ca_pem`](Self::from_ca_pem), from a file.
    pub fn from_ca_file(ca: impl AsRef<Path>) -> Result<Self, TlsError> {
        Self::from_ca_pem(&read(ca.as_ref(), "CA certificate")?)
    }

    /// Mutual TLS: presents this certificate chain (leaf first) and key.
    pub fn with_identity_pem(mut self, chain: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let identity = (
            certs(chain, "client certificate")?,
            Arc::new(key(key_pem, "client key")?),
        );
        self.config = Self::config(&self.roots, Some(&identity))?;
        self.identity = Some(identity);
        Ok(self)
    }

    /// Like [`with_identity_pem`](Self::with_identity_pem), from files.
    pub fn with_identity_files(
        self,
        chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let chain = read(chain.as_ref(), "client certificate")?;
        let key = read(key.as_ref(), "client key")?;
        self.with_identity_pem(&chain, &key)
    }

    /// The name to verify server certificates against, send as SNI, and
    /// use as the HTTP/2 `:authority` (with the instance's port), instead
    /// of the host of each instance's address. For servers reached by IP,
    /// or through names their certificates do not list.
    pub fn with_server_name(mut self, name: &str) -> Result<Self, TlsError> {
        let parsed = ServerName::try_from(name.to_owned())
            .map_err(|e| TlsError(format!("`{name}` is not a valid server name: {e}")))?;
        self.server_name = Some((parsed, name.to_owned()));
        Ok(self)
    }

    /// The name set with [`with_server_name`](Self::with_server_name), if any.
    pub(crate) fn server_name_override(&self) -> Option<&str> {
        self.server_name.as_ref().map(|(_, name)| name.as_str())
    }

    fn config(
        roots: &Arc<rustls::RootCertStore>,
        identity: Option<&(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_root_certificates(roots.clone());
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| {
                    TlsError(format!(
                        "the client certificate and key do not go together: {e}"
                    ))
                })?,
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The server name to verify for an instance at `host`.
    pub(crate) fn server_name(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        if let Some((name, _)) = &self.server_name {
            return Ok(name.clone());
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned())
            .map_err(|e| TlsError(format!("`{host}` is not a valid server name: {e}")))
    }

    pub(crate) fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }
}
