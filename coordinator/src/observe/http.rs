//! The observer's HTTP side, on `observe.listen`: `/` (the live page, served from the binary:
//! clusters often have no internet, so no CDN), `/metrics` (Prometheus) and `/api/status`.

use super::Observer;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::sync::Arc;

const PAGE: &str = include_str!("page.html");

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn metrics(State(o): State<Arc<Observer>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        o.metrics_text(),
    )
}

async fn status(State(o): State<Arc<Observer>>) -> Json<serde_json::Value> {
    Json(o.status())
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    observer: Arc<Observer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .with_state(observer);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
