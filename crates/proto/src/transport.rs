//! gRPC transport shared by the router and the workers: channels to stages (optionally mutual TLS,
//! and the shared stage token), and server TLS, from PEM files named in the `security` settings.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::Status;

/// Client side of router→worker and worker→worker links: TLS and the shared stage token.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// PEM CA the servers' certificates must chain to; None = plaintext.
    pub ca: Option<Vec<u8>>,
    /// This client's certificate and key (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Server name to verify; None = the host part of each address.
    pub server_name: Option<String>,
    /// Shared secret every stage requires (`authorization: Bearer`), when set.
    pub stage_token: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    // Never print the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .field("stage_token", &self.stage_token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Adds the stage token to every call of a stage client.
#[derive(Clone)]
pub struct StageToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for StageToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A `Stage` client on `channel` that presents the stage token of `tls`.
pub type StageClient = crate::internal::v1::stage_client::StageClient<
    tonic::service::interceptor::InterceptedService<Channel, StageToken>,
>;

impl StageToken {
    /// Presents `token` as `authorization: Bearer <token>` (nothing when None); also what the
    /// public API's clients use.
    pub fn new(token: Option<&str>) -> Result<Self, Status> {
        let v = match token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Status::invalid_argument("the token must be printable ASCII"))?,
            ),
            None => None,
        };
        Ok(StageToken(v))
    }
}

pub fn stage_client(channel: Channel, tls: &ClientTls) -> Result<StageClient, Status> {
    let token = StageToken::new(tls.stage_token.as_deref())?;
    Ok(crate::internal::v1::stage_client::StageClient::with_interceptor(channel, token)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// Reads a token file (surrounding whitespace, such as a trailing newline, is not part of it);
/// an empty path means no token.
pub fn read_token(path: &str, what: &str) -> Result<Option<String>, String> {
    if path.is_empty() {
        return Ok(None);
    }
    let t = String::from_utf8(read(path, what)?).map_err(|_| format!("{what} {path} is not UTF-8"))?;
    let t = t.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{what} {path} must hold one printable token"));
    }
    Ok(Some(t.to_string()))
}

fn read(path: &str, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(Path::new(path)).map_err(|e| format!("cannot read {what} {path}: {e}"))
}

impl ClientTls {
    /// From file paths; empty strings mean "not set".
    pub fn from_files(ca: &str, cert: &str, key: &str, server_name: &str) -> Result<Self, String> {
        Ok(ClientTls {
            ca: if ca.is_empty() { None } else { Some(read(ca, "stage CA")?) },
            identity: if cert.is_empty() {
                None
            } else {
                Some((read(cert, "client certificate")?, read(key, "client key")?))
            },
            server_name: (!server_name.is_empty()).then(|| server_name.to_string()),
            stage_token: None,
        })
    }

    pub fn enabled(&self) -> bool {
        self.ca.is_some()
    }
}

/// A connected channel to `addr` ("host:port" or a URL) with keepalives that detect dead peers fast.
pub async fn connect(addr: &str, tls: &ClientTls, connect_timeout: Duration) -> Result<Channel, Status> {
    let scheme = if tls.enabled() { "https" } else { "http" };
    let uri = if addr.contains("://") { addr.to_string() } else { format!("{scheme}://{addr}") };
    let mut ep = Endpoint::from_shared(uri)
        .map_err(|e| Status::invalid_argument(format!("bad stage address {addr:?}: {e}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true);
    if let Some(ca) = &tls.ca {
        let host = addr.split("://").last().unwrap_or(addr).rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(
            tls.server_name.clone().unwrap_or_else(|| host.trim_matches(['[', ']']).to_string()),
        );
        if let Some((cert, key)) = &tls.identity {
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(cfg).map_err(|e| Status::internal(format!("TLS configuration: {e}")))?;
    }
    ep.connect().await.map_err(|e| Status::unavailable(format!("cannot reach stage {addr}: {e}")))
}

/// A gRPC server's accepted connections with `TCP_NODELAY`. tonic ignores `Server::tcp_nodelay`
/// under `serve_with_incoming` (as its docs say), and without it a small reply (a stage's sampled
/// tokens, a streamed token) waits on Nagle's algorithm for the peer's delayed ACK: measured on
/// the 2-stage loopback pipeline, the last stage's reply took 225 µs at the median and 29.7 ms at
/// p90, up to 40 ms.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Server TLS from PEM files; with `client_ca` clients must present a certificate chaining to it.
pub fn server_tls(cert: &str, key: &str, client_ca: &str) -> Result<Option<ServerTlsConfig>, String> {
    if cert.is_empty() {
        return Ok(None);
    }
    let mut cfg =
        ServerTlsConfig::new().identity(Identity::from_pem(read(cert, "certificate")?, read(key, "key")?));
    if !client_ca.is_empty() {
        cfg = cfg.client_ca_root(Certificate::from_pem(read(client_ca, "client CA")?));
    }
    Ok(Some(cfg))
}
