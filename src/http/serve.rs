//! The HTTP server loop, in place of `axum::serve`, for the limits a public endpoint needs:
//!
//! - at most `XPAND_MAX_CONNECTIONS` connections at once: the loop stops accepting while the
//!   cap is reached, so further clients wait in the kernel's backlog and hold no descriptor;
//! - a header-read timeout (`XPAND_HEADER_TIMEOUT_SECS`): a client that trickles its headers,
//!   or keeps an idle keep-alive connection, is disconnected when it runs out;
//! - hard bounds on header bytes and count (above [`super::guard`]'s, which answer with a
//!   problem document; past these hyper answers a bare 431);
//! - WebSocket upgrades, and a graceful stop that lets requests in flight finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::Limits;

/// hyper's own limits, beyond [`super::guard::MAX_HEADER_BYTES`] and `MAX_HEADER_FIELDS`.
const HARD_MAX_BUFFER: usize = 256 * 1024;
const HARD_MAX_HEADERS: usize = 256;
/// How long a stopping server waits for requests in flight.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &Limits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stopping, stop) = crate::shutdown::channel();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(HARD_MAX_BUFFER)
        .max_headers(HARD_MAX_HEADERS)
        .keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, typically: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.wait() => {
                    // Finish the request in flight, then close instead of keeping alive.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    stopping.fire();
    // Every connection holds a permit until it is done: having them all back means drained.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(STOP_GRACE, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; leaving them");
    }
}
