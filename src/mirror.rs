//! Request mirroring (a route's `mirror`), as Envoy's `request_mirror_policies` and
//! nginx's `mirror`: a copy of each request (or a share of them) goes to a second
//! pool, fire and forget. Its answer is read to the end and dropped; the client's
//! request neither waits for it nor sees it fail. For trying a new version against
//! real traffic before it takes any.

use std::cell::Cell;
use std::rc::Rc;

use http_body_util::BodyExt as _;

use crate::body::ReqBody;
use crate::codec::UpHead;
use crate::config::Mirror;
use crate::state::Snapshot;
use crate::upstream::UpRequest;
use crate::worker::WorkerCtx;

/// Sends a copy of the request (`head`, `body`) to the mirror pool in a task of its own, when the draw
/// (`percent`) picks it. A body that streams from the client (past
/// `retry.max_replay_bytes`, or chunked) can be read once only, by the request
/// itself: such a request is not mirrored, and counted as skipped.
#[cold]
pub fn send(ctx: &Rc<WorkerCtx>, snap: &Snapshot, m: &Mirror, head: &Rc<UpHead>, body: &ReqBody) {
    if m.percent < 100.0 && fastrand::f64() * 100.0 >= m.percent {
        return;
    }
    let pool = snap.pools[m.pool].clone();
    let body = match body {
        ReqBody::Buffered(b) => ReqBody::Buffered(b.clone()),
        ReqBody::Stream(_) => {
            metrics::counter!(crate::metrics::MIRROR_SKIPPED, "pool" => pool.name.clone()).increment(1);
            return;
        }
    };
    let copy = UpRequest {
        head: head.clone(),
        body,
    };
    let ctx = ctx.clone();
    tokio::task::spawn_local(crate::clock::Polled::new(async move {
        let start = crate::clock::now();
        let tries = Cell::new(0u8);
        let policy = crate::forward::TryPolicy::of(&pool.config);
        let status = match crate::forward::forward(&ctx, &pool, copy, None, None, policy, &tries).await {
            Ok(answer) => {
                let status = answer.response.status().as_u16();
                // To its end, so the connection goes back to the pool; the body's
                // own `read_timeout` bounds a backend that stalls.
                let mut body = answer.response.into_body();
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
                status
            }
            Err(e) => {
                tracing::debug!(pool = %pool.name, error = %e, "mirrored request failed");
                e.status().as_u16()
            }
        };
        pool.metrics
            .record(status, crate::clock::now().saturating_duration_since(start));
    }));
}
