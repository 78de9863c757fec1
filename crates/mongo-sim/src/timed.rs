//! A mutex that counts how long it has been held: the server lock and the commit lock
//! both report it (`MongoSim::lock_held`, `MongoSim::commit_lock_held`).

use std::{
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// A mutex counting the time it is held. Its holders validate before they change what it
/// guards, so a lock poisoned by a panic is taken over.
#[derive(Debug)]
pub(crate) struct TimedMutex<T> {
    inner: Mutex<T>,
    held_ns: AtomicU64,
}

/// The locked value; adds the time it was held when dropped.
pub(crate) struct TimedGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    since: Instant,
    held: &'a AtomicU64,
}

impl<T> TimedMutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            inner: Mutex::new(value),
            held_ns: AtomicU64::new(0),
        }
    }

    pub(crate) fn lock(&self) -> TimedGuard<'_, T> {
        TimedGuard {
            guard: self.inner.lock().unwrap_or_else(PoisonError::into_inner),
            since: Instant::now(),
            held: &self.held_ns,
        }
    }

    /// How long the lock has been held in all.
    pub(crate) fn held(&self) -> Duration {
        Duration::from_nanos(self.held_ns.load(Ordering::Relaxed))
    }
}

impl<T> std::ops::Deref for TimedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> std::ops::DerefMut for TimedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for TimedGuard<'_, T> {
    fn drop(&mut self) {
        let ns = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.held.fetch_add(ns, Ordering::Relaxed);
    }
}
