use std::net::SocketAddr;
use std::str::FromStr;

use anyhow::{bail, Context};

/// Parses "0,5,7" (commas or whitespace) into token ids.
pub fn parse_ids(s: &str) -> anyhow::Result<Vec<u32>> {
    let ids: Vec<u32> = s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| u32::from_str(t).with_context(|| format!("bad token id {t:?}")))
        .collect::<anyhow::Result<_>>()?;
    if ids.is_empty() {
        bail!("no token ids given");
    }
    Ok(ids)
}

/// Starts the Prometheus endpoint when `addr` is set; prints `MLASERVE_METRICS <addr>` on stdout.
pub async fn serve_metrics(addr: &str, t: &mlaserve_telemetry::Telemetry) -> anyhow::Result<()> {
    if addr.is_empty() {
        return Ok(());
    }
    let local = mlaserve_telemetry::metrics_http::serve_metrics(addr.parse()?, t.registry()).await?;
    println!("MLASERVE_METRICS {local}");
    Ok(())
}

/// Binds a TCP listener and prints the bound address (useful with port 0) on stdout.
pub async fn bind(addr: SocketAddr, role: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let local = l.local_addr()?;
    println!("MLASERVE_LISTENING {role} {local}");
    tracing::info!(%local, role, "listening");
    Ok(l)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}

/// Logs to stderr; `RUST_LOG` filters (default: info for mlaserve, warnings otherwise).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,mlaserve=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}
