//! TLS settings of an upstream: the system trust roots, loaded once, and an endpoint's own
//! extra roots and client certificate ([`TlsSettings`]). A leaf: it imports nothing of the
//! crate, so the model can hold settings and the forwarder can build connections from them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// The operating system's trust roots, loaded once per process.
pub(crate) fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            for err in &loaded.errors {
                tracing::warn!(error = %err, "could not load a system trust root");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
            tracing::debug!(added, ignored, "loaded system trust roots");
            Arc::new(roots)
        })
        .clone()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The default client TLS configuration: system roots, no client certificate.
pub(crate) fn default_client_config() -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(system_roots())
        .with_no_client_auth()
}

/// An endpoint's TLS settings: extra trust roots and an optional client certificate, on top of
/// the system roots. Built (and so validated) once, when the configuration loads.
///
/// `Debug` shows counts, never key material.
#[derive(Clone)]
pub struct TlsSettings {
    config: Arc<ClientConfig>,
    extra_roots: usize,
    client_auth: bool,
    files: Option<TlsFiles>,
}

/// The PEM files TLS settings were read from: what a store keeps, to read them again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TlsFiles {
    /// PEM CA certificates trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads the files and builds the settings.
    pub fn load(&self) -> Result<TlsSettings, TlsError> {
        TlsSettings::from_files(
            self.ca_file.as_deref(),
            self.client_cert_file.as_deref(),
            self.client_key_file.as_deref(),
        )
    }
}

/// A TLS setting that could not be loaded: the field (`ca_file`, `client_cert_file`,
/// `client_key_file`) and the problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsError {
    /// The field in error.
    pub field: &'static str,
    /// The problem.
    pub message: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for TlsError {}

fn err(field: &'static str, message: impl Into<String>) -> TlsError {
    TlsError {
        field,
        message: message.into(),
    }
}

impl TlsSettings {
    /// Builds settings from PEM data: CA certificates to trust besides the system roots, and a
    /// client certificate chain with its private key (both or neither).
    pub fn from_pem(
        ca: Option<&[u8]>,
        client_cert: Option<&[u8]>,
        client_key: Option<&[u8]>,
    ) -> Result<Self, TlsError> {
        let mut roots = (*system_roots()).clone();
        let mut extra_roots = 0;
        if let Some(ca) = ca {
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| err("ca_file", format!("is not valid PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| err("ca_file", format!("holds an unusable certificate: {e}")))?;
                extra_roots += 1;
            }
            if extra_roots == 0 {
                return Err(err("ca_file", "holds no PEM certificate"));
            }
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots);
        let config = match (client_cert, client_key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => {
                return Err(err("client_key_file", "is required with client_cert_file"));
            }
            (None, Some(_)) => {
                return Err(err("client_cert_file", "is required with client_key_file"));
            }
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| err("client_cert_file", format!("is not valid PEM: {e}")))?;
                if chain.is_empty() {
                    return Err(err("client_cert_file", "holds no PEM certificate"));
                }
                // The key's parse error is not shown: it could quote key material.
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|_| err("client_key_file", "holds no PEM private key"))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    err(
                        "client_key_file",
                        format!("does not match the certificate: {e}"),
                    )
                })?
            }
        };
        Ok(Self {
            config: Arc::new(config),
            extra_roots,
            client_auth: client_cert.is_some(),
            files: None,
        })
    }

    /// Reads the PEM files and builds the settings.
    pub fn from_files(
        ca_file: Option<&Path>,
        client_cert_file: Option<&Path>,
        client_key_file: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let read =
            |field: &'static str, path: Option<&Path>| -> Result<Option<Vec<u8>>, TlsError> {
                path.map(|p| {
                    std::fs::read(p)
                        .map_err(|e| err(field, format!("cannot read {}: {e}", p.display())))
                })
                .transpose()
            };
        let ca = read("ca_file", ca_file)?;
        let cert = read("client_cert_file", client_cert_file)?;
        let key = read("client_key_file", client_key_file)?;
        let mut settings = Self::from_pem(ca.as_deref(), cert.as_deref(), key.as_deref())?;
        settings.files = Some(TlsFiles {
            ca_file: ca_file.map(Path::to_path_buf),
            client_cert_file: client_cert_file.map(Path::to_path_buf),
            client_key_file: client_key_file.map(Path::to_path_buf),
        });
        Ok(settings)
    }

    /// The files these settings were read from, if they were read from files.
    pub fn files(&self) -> Option<&TlsFiles> {
        self.files.as_ref()
    }

    pub(crate) fn client_config(&self) -> ClientConfig {
        (*self.config).clone()
    }
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("extra_roots", &self.extra_roots)
            .field("client_auth", &self.client_auth)
            .finish()
    }
}
