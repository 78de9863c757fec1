//! TLS for the PostgreSQL store: a `tokio-postgres` connector over rustls (the TLS stack
//! the `mongodb` driver already brings), and the libpq parameters it reads.
//!
//! `sslmode=require`, `verify-ca` or `verify-full` connect over TLS and always verify the
//! server's certificate and name, against the Mozilla roots (`webpki-roots`) and the
//! certificates of `sslrootcert=<PEM file>` if given: this store never encrypts without
//! verifying (libpq's `require` does). `disable`, `prefer` or no `sslmode` connect in
//! plain text, as before.

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// A parameter as written: key and value.
type Pair = (String, String);
/// Writes parameters back in the string's own form.
type Rebuild = Box<dyn Fn(&[Pair]) -> String>;

/// The TLS wanted by a connection string, and the string without the parameters
/// `tokio-postgres` does not read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Wanted {
    /// For `tokio-postgres`.
    pub(crate) config: String,
    /// `Some` when TLS is required: the extra root certificates file, if any.
    pub(crate) tls: Option<Option<PathBuf>>,
}

/// Reads `sslmode` and `sslrootcert` from a URL or key-value connection string.
///
/// A URL's query is split here, not by `url::Url`, which refuses libpq's multi-host
/// authorities (`postgres://a:1,b:2/db`) and would rewrite the other parameters
/// (`tokio-postgres` reads a `+` as itself, `url` as a space); values are decoded with
/// `percent-encoding`, as `tokio-postgres` decodes them.
///
/// # Errors
/// A message naming the parameter when a value is not understood.
pub(crate) fn wanted(config: &str) -> Result<Wanted, String> {
    let url = config.starts_with("postgres://") || config.starts_with("postgresql://");
    let (mut pairs, rebuild): (Vec<Pair>, Rebuild) = if url {
        let (base, query) = config.split_once('?').unwrap_or((config, ""));
        let pairs = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        let base = base.to_owned();
        (
            pairs,
            Box::new(move |pairs: &[(String, String)]| {
                if pairs.is_empty() {
                    base.clone()
                } else {
                    let query: Vec<String> =
                        pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("{base}?{}", query.join("&"))
                }
            }),
        )
    } else {
        (
            key_values(config)?,
            Box::new(|pairs: &[(String, String)]| {
                pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }),
        )
    };
    let decode = |v: &str| {
        if url {
            cdc_core::support::percent_decode(v)
                .ok_or_else(|| format!("`{v}` is not valid percent-encoding"))
        } else {
            Ok(unquote(v))
        }
    };
    let mut root = None;
    let mut require = false;
    let mut keep = Vec::with_capacity(pairs.len());
    for (key, value) in pairs.drain(..) {
        match key.as_str() {
            "sslrootcert" => root = Some(PathBuf::from(decode(&value)?)),
            "sslmode" => match decode(&value)?.as_str() {
                "disable" | "allow" | "prefer" => keep.push((key, value)),
                "require" | "verify-ca" | "verify-full" => {
                    require = true;
                    keep.push((key, "require".to_owned()));
                }
                other => return Err(format!("`sslmode={other}` is not a libpq sslmode")),
            },
            _ => keep.push((key, value)),
        }
    }
    Ok(Wanted {
        config: rebuild(&keep),
        tls: require.then_some(root),
    })
}

/// Splits a libpq key-value string into pairs, keeping values as written (quoted ones
/// with their quotes).
fn key_values(config: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = config.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        if key.is_empty() {
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("`{key}` has no `=` and value"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            value.push(chars.next().unwrap_or('\''));
            loop {
                match chars.next() {
                    Some('\\') => {
                        value.push('\\');
                        value.extend(chars.next());
                    }
                    Some('\'') => {
                        value.push('\'');
                        break;
                    }
                    Some(c) => value.push(c),
                    None => return Err(format!("the value of `{key}` has no closing quote")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) else {
        return value.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    out
}

/// A `tokio-postgres` TLS connector over rustls, verifying the server's certificate.
#[derive(Clone)]
pub(crate) struct RustlsConnect(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for RustlsConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RustlsConnect")
    }
}

impl RustlsConnect {
    /// Trusts the Mozilla roots and the certificates in `root` (a PEM file).
    ///
    /// # Errors
    /// A message naming the file when it cannot be read or holds no certificate.
    pub(crate) fn new(root: Option<&Path>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = root {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "sslrootcert {}: no certificate in it",
                    path.display()
                ));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self(Arc::new(config)))
    }
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = Connector;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Connector, Self::Error> {
        Ok(Connector {
            config: Arc::clone(&self.0),
            name: ServerName::try_from(domain.to_owned())?,
        })
    }
}

/// Connects one stream.
pub(crate) struct Connector {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// A TLS stream to the server.
pub(crate) struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM channel binding is not offered; the certificate is verified instead.
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_are_read_and_taken_out() {
        let w = wanted("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fca.pem&x=1").unwrap();
        assert_eq!(w.config, "postgres://u@h/db?sslmode=require&x=1");
        assert_eq!(w.tls, Some(Some(PathBuf::from("/ca.pem"))));
        let w = wanted("host=h sslmode = 'require' password='a b\\'c' user=u").unwrap();
        assert_eq!(w.config, "host=h sslmode=require password='a b\\'c' user=u");
        assert_eq!(w.tls, Some(None));
        let w = wanted("postgres://u@h/db").unwrap();
        assert_eq!((w.config.as_str(), w.tls), ("postgres://u@h/db", None));
        assert!(wanted("postgres://h/?sslmode=sometimes").is_err());
        assert!(wanted("host=h password='open").is_err());
    }
}
