//! The observer's HTTP side, on `observe.listen`: `/` (the live page, served from the binary:
//! clusters often have no internet, so no CDN), `/metrics` (Prometheus) and `/api/status`.
//! `coordinator dashboard` serves the same page for a job from its history (`HistoryDir`).

use super::Observer;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

const PAGE: &str = include_str!("page.html");

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// What the page shows: a running job's observer, or a job's history on disk.
pub trait Source: Send + Sync + 'static {
    fn status(&self) -> serde_json::Value;
    /// OpenMetrics text; None where there is nothing live to scrape.
    fn metrics(&self) -> Option<String>;
}

impl Source for Observer {
    fn status(&self) -> serde_json::Value {
        Observer::status(self)
    }
    fn metrics(&self) -> Option<String> {
        Some(self.metrics_text())
    }
}

/// A checkpoint.dir: its status rebuilt from metrics.jsonl at every request, so the page also
/// follows a job that another coordinator is running.
pub struct HistoryDir(pub PathBuf);

impl Source for HistoryDir {
    fn status(&self) -> serde_json::Value {
        crate::status::from_history(&self.0)
            .unwrap_or_else(|e| serde_json::json!({"state": "unknown", "reason": e.to_string()}))
    }
    fn metrics(&self) -> Option<String> {
        None
    }
}

async fn metrics<S: Source>(State(s): State<Arc<S>>) -> axum::response::Response {
    match s.metrics() {
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

async fn status<S: Source>(State(s): State<Arc<S>>) -> Json<serde_json::Value> {
    // Reading a history file is blocking work: off the runtime's workers.
    let value = tokio::task::spawn_blocking(move || s.status()).await;
    Json(value.unwrap_or_default())
}

/// Serves until `shutdown` completes.
pub async fn serve<S: Source>(
    listener: tokio::net::TcpListener,
    source: Arc<S>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics::<S>))
        .route("/api/status", get(status::<S>))
        .with_state(source);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
