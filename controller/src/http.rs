//! The controller's plain-HTTP listener (`--metrics-listen`): Prometheus metrics on
//! `/metrics`, the read-only status page on `/` (and its refreshed part on `/status/main`).
//! Nothing here changes the cluster; keep it on loopback or a management network all the same,
//! since it names every host and VM.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Html;
use axum::routing::get;

use crate::node::Node;
use crate::{metrics, status_page};

/// Serves the listener for the life of the process.
pub async fn serve(addr: SocketAddr, node: Arc<Node>) -> anyhow::Result<()> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(|State(node): State<Arc<Node>>| async move {
                (
                    [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    metrics::scrape(&node).await,
                )
            }),
        )
        .route(
            "/",
            get(|State(node): State<Arc<Node>>| async move {
                Html(status_page::page(&status_page::Snapshot::read(&node).await).into_string())
            }),
        )
        .route(
            "/status/main",
            get(|State(node): State<Arc<Node>>| async move {
                Html(status_page::main(&status_page::Snapshot::read(&node).await).into_string())
            }),
        )
        .with_state(node);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot serve metrics and the status page on {addr}: {e}; give --metrics-listen a free address"
        )
    })?;
    tracing::info!(%addr, "serving Prometheus metrics on /metrics and the status page on /");
    axum::serve(listener, app).await?;
    Ok(())
}
