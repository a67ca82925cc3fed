//! The worker's clock for the request path: one clock read per task poll.
//!
//! A request took about ten clock reads (`Instant::now`, about 20 ns each here):
//! its start, the attempt's deadline, the balancer's decay, the pool's expiry
//! checks, the send time, the time to first byte, the access-log duration, the
//! connection's idle mark. All but two fall in the same poll of the connection's
//! task as another. nginx reads the clock once per event-loop turn
//! (`ngx_time_update`) and HAProxy once per poll loop (`now_ms`); here the unit is
//! one poll of one task, which a current-thread runtime runs start to finish
//! without interleaving.
//!
//! `Polled` marks a task's polls: the first `now()` in a poll reads the clock and
//! the rest of that poll reuses the reading. Outside a `Polled` poll, `now()` reads
//! the clock every time, so code on other tasks (health checks, the admin server)
//! can never see a stale time. A reading is at most one poll old, and a poll on the
//! request path does no blocking work: microseconds.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

#[derive(Clone, Copy)]
enum Reading {
    /// Not inside a `Polled` poll: every `now()` reads the clock.
    Off,
    /// Inside one, before its first `now()`.
    Due,
    /// Inside one, read at this instant.
    At(Instant),
}

thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading::Off) };
}

/// The current time: the reading taken earlier in this poll of a `Polled` task, or
/// the clock.
#[inline]
pub fn now() -> Instant {
    READING.with(|r| match r.get() {
        Reading::At(t) => t,
        Reading::Off => read(),
        Reading::Due => {
            let t = read();
            r.set(Reading::At(t));
            t
        }
    })
}

/// The clock itself, through tokio: the same as `Instant::now()` in a build, and
/// tokio's paused clock in a test that pauses time, which the timers follow too.
#[inline]
fn read() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// `now()` for code on tokio's `Instant`.
#[inline]
pub fn tokio_now() -> tokio::time::Instant {
    tokio::time::Instant::from_std(now())
}

pin_project_lite::pin_project! {
    /// A future whose every poll shares one clock reading (see the module header).
    pub struct Polled<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Polled<F> {
    pub fn new(inner: F) -> Self {
        Polled { inner }
    }
}

/// Puts back the reading the poll found, also if the poll panics: a reading left
/// behind would serve every later `now()` on the thread.
struct Restore(Reading);

impl Drop for Restore {
    fn drop(&mut self) {
        READING.with(|r| r.set(self.0));
    }
}

impl<F: Future> Future for Polled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _restore = Restore(READING.with(|r| r.replace(Reading::Due)));
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn reading() -> &'static str {
        match READING.with(|r| r.get()) {
            Reading::Off => "off",
            Reading::Due => "due",
            Reading::At(_) => "at",
        }
    }

    #[test]
    fn outside_a_polled_task_every_read_is_fresh() {
        let a = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() >= a + Duration::from_millis(2));
        assert_eq!(reading(), "off");
    }

    #[tokio::test]
    async fn one_poll_shares_one_reading_and_the_next_poll_reads_again() {
        let (first, second, third) = Polled::new(async {
            let first = now();
            std::thread::sleep(Duration::from_millis(2));
            let second = now();
            // Pending once: the next poll takes a new reading.
            tokio::task::yield_now().await;
            (first, second, now())
        })
        .await;
        assert_eq!(first, second, "same poll, same reading");
        assert!(
            third >= first + Duration::from_millis(2),
            "a later poll reads the clock"
        );
        assert_eq!(reading(), "off", "the reading ends with the poll");
        let a = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > a);
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_follows_tokio_when_a_test_pauses_time() {
        let a = now();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(now() >= a + Duration::from_secs(5), "timers and readings agree");
        let (before, after) = Polled::new(async {
            let before = now();
            tokio::time::sleep(Duration::from_secs(3)).await;
            (before, now())
        })
        .await;
        assert!(after >= before + Duration::from_secs(3));
    }

    #[test]
    fn a_poll_that_panics_leaves_no_reading_behind() {
        let fut = Polled::new(async {
            now();
            panic!("boom");
        });
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut fut = std::pin::pin!(fut);
            let waker = std::task::Waker::noop();
            let _ = fut.as_mut().poll(&mut Context::from_waker(waker));
        }));
        assert!(caught.is_err());
        assert_eq!(reading(), "off");
    }
}
