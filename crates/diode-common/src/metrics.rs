//! The metrics listener: `GET /metrics` in the OpenMetrics text format, and the status page
//! (`/` and `/status.json`, see `status.rs`). Read-only: GET is all it answers.
//!
//! One registry per service instance (not a global), so a demo can run both services in one
//! process without mixing their figures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::status::{self, Board};
use crate::Shutdown;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// A scrape request is a few hundred bytes; anything longer or slower is not a scraper.
const MAX_REQUEST_BYTES: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A socket or listener a service could not bind at start: which, where, and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {what} on {addr}: {source}")]
pub struct BindError {
    pub what: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

impl BindError {
    /// The error for `what` at `addr`, to `map_err` an I/O error into.
    pub fn of(what: &'static str, addr: SocketAddr) -> impl Fn(std::io::Error) -> BindError + Copy {
        move |source| BindError { what, addr, source }
    }
}

/// `serve` on `listen` when the configuration names one (`[metrics] listen`); the address bound.
pub async fn serve_if_configured(
    listen: Option<SocketAddr>,
    registry: Arc<Registry>,
    board: Arc<Board>,
    shutdown: Shutdown,
) -> Result<Option<SocketAddr>, BindError> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    serve(listen, registry, board, shutdown)
        .await
        .map(Some)
        .map_err(BindError::of("the metrics endpoint", listen))
}

/// Binds `listen` now (so a taken port fails start-up) and serves until shutdown.
pub async fn serve(
    listen: SocketAddr,
    registry: Arc<Registry>,
    board: Arc<Board>,
    shutdown: Shutdown,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    {
        // The charts' history: a sample every step, from the start.
        let (board, shutdown) = (board.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(status::HISTORY_STEP);
            // A late tick is taken late, not made up with a burst of samples.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tick.tick() => board.sample(),
                }
            }
        });
    }
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                _ = shutdown.wait() => return,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let registry = registry.clone();
            let board = board.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    let mut request = Vec::with_capacity(512);
                    let mut chunk = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n")
                        && request.len() < MAX_REQUEST_BYTES
                    {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let response = respond(&request, &registry, &board);
                    let _ = stream.write_all(&response).await;
                    let _ = stream.shutdown().await;
                })
                .await;
            });
        }
    });
    Ok(local)
}

fn respond(request: &[u8], registry: &Registry, board: &Board) -> Vec<u8> {
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => ("200 OK", CONTENT_TYPE, body),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding failed\n".into(),
                ),
            }
        }
        (b"GET", b"/") => (
            "200 OK",
            "text/html; charset=utf-8",
            status::html(&board.status()),
        ),
        (b"GET", b"/status.json") => (
            "200 OK",
            "application/json",
            serde_json::to_string_pretty(&board.status()).unwrap_or_default(),
        ),
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    // Nothing on these pages runs or loads anything: the browser is told so too.
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body.as_bytes());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    static LAYOUT: status::Layout = status::Layout {
        service: "test",
        summary: &[],
        tables: &[],
        charts: &[],
    };

    #[tokio::test]
    async fn serves_metrics() {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        registry.register("diode_things", "Things", counter.clone());
        counter.inc_by(3);
        let shutdown = Shutdown::new();
        let registry = Arc::new(registry);
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            registry.clone(),
            Board::new(&LAYOUT, registry),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains("diode_things_total 3"), "{response}");
        shutdown.trigger();
    }
}
