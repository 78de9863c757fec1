//! Leases with fencing tokens: at most one active instance per stream.
//!
//! A lease names the owner of a stream until it expires (by the store's clock). Every
//! new holder gets a fencing token greater than every earlier holder's, and the store
//! refuses a save made with an older token ([`Error::Fenced`]): an instance that paused
//! past its lease (a GC pause, a frozen VM) and wakes up believing it still holds it
//! cannot write over its successor's work (Kleppmann, "How to do distributed locking").
//!
//! [`LeaseRecord`] holds the rules every backend applies inside one atomic step (a lock,
//! a Lua script, a conditional statement), so they are written once and tested here.

use std::time::Duration;

use async_trait::async_trait;

use crate::{DeadLetter, Error, Result, ResumePoint};

/// A stream's lease as its holder sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The stream.
    pub stream: String,
    /// Who holds it (unique per process incarnation).
    pub owner: String,
    /// The fencing token: greater than every earlier holder's.
    pub token: u64,
    /// When it expires, by the store's clock (milliseconds since the Unix epoch).
    pub expires_at_ms: i64,
}

impl Lease {
    /// A lease as a store returns it.
    pub fn new(
        stream: impl Into<String>,
        owner: impl Into<String>,
        token: u64,
        expires_at_ms: i64,
    ) -> Self {
        Self {
            stream: stream.into(),
            owner: owner.into(),
            token,
            expires_at_ms,
        }
    }
}

impl Lease {
    /// Checks that `letter` belongs to this lease's stream.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when it belongs to another stream.
    pub fn covers(&self, letter: &DeadLetter) -> Result<()> {
        if letter.stream == self.stream {
            return Ok(());
        }
        Err(Error::InvalidArgument {
            name: "letter",
            reason: format!(
                "a dead letter of stream `{}` under the lease of stream `{}`",
                letter.stream, self.stream
            ),
        })
    }
}

/// The lease record a store keeps per stream, and the rules that change it. A record is
/// kept after its lease is released or expires, so tokens keep growing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The last holder.
    pub owner: String,
    /// The last holder's token.
    pub token: u64,
    /// When the lease expires (or expired), milliseconds since the Unix epoch.
    pub expires_at_ms: i64,
}

/// Milliseconds of a TTL (at least 1).
pub fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl LeaseRecord {
    /// Whether the lease is held at `now_ms`.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.expires_at_ms > now_ms
    }

    /// The record after `owner` asks for the lease at `now_ms`: `None` when another owner
    /// holds it. A free stream gets token 1; an expired or released lease goes to
    /// `owner` with the next token; an owner asking again while it holds the lease keeps
    /// its token, with the TTL counted from now.
    pub fn acquire(
        current: Option<&Self>,
        owner: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Option<Self> {
        let expires_at_ms = now_ms.saturating_add(ttl_ms(ttl));
        match current {
            None => Some(Self {
                owner: owner.to_owned(),
                token: 1,
                expires_at_ms,
            }),
            Some(c) if c.is_live(now_ms) && c.owner == owner => Some(Self {
                expires_at_ms,
                ..c.clone()
            }),
            Some(c) if c.is_live(now_ms) => None,
            Some(c) => Some(Self {
                owner: owner.to_owned(),
                token: c.token.saturating_add(1),
                expires_at_ms,
            }),
        }
    }

    /// Whether `lease` is this record's lease, still live at `now_ms` (a renewal after
    /// expiry fails even when nobody took over: the holder acquires again, with a new
    /// token).
    pub fn is_held_by(&self, lease: &Lease, now_ms: i64) -> bool {
        self.owner == lease.owner && self.token == lease.token && self.is_live(now_ms)
    }

    /// Whether a write made under `lease` is allowed: its token is the newest this
    /// record has seen (an expired lease nobody took over may still write: no newer
    /// holder exists to be overwritten).
    pub fn admits(&self, lease: &Lease) -> bool {
        self.owner == lease.owner && self.token == lease.token
    }

    /// The error for a write or renewal refused under `lease`.
    pub fn fenced(current: Option<&Self>, lease: &Lease) -> Error {
        Error::Fenced {
            stream: lease.stream.clone(),
            token: lease.token,
            newest: current.map(|c| c.token),
        }
    }

    /// The lease as its holder sees it.
    pub fn lease(&self, stream: &str) -> Lease {
        Lease::new(stream, self.owner.clone(), self.token, self.expires_at_ms)
    }
}

/// Where leases live: the same backend as the points they fence, so a fenced save is one
/// atomic step.
///
/// Every implementation keeps these rules (checked by `cdc-resume`'s lease conformance
/// suite): at most one owner holds a stream's lease at a time (by the store's clock);
/// tokens strictly increase from holder to holder; a renewal after expiry fails; a save
/// or dead letter made with a token older than the newest is refused with
/// [`Error::Fenced`], leaving the stored point as it was.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Takes the lease of `stream` for `owner` for `ttl` if it is free, expired or
    /// released (with a new token), or already `owner`'s (same token, TTL from now).
    /// `None` when another owner holds it.
    ///
    /// # Errors
    /// [`Error::Store`] when the backend fails.
    async fn acquire(&self, stream: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>>;

    /// Extends `lease` to `ttl` from now, if it is still held with its token.
    ///
    /// # Errors
    /// [`Error::Fenced`] when it expired or another owner took it; [`Error::Store`].
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease>;

    /// Gives `lease` up at once (a standby can take it without waiting for the TTL); a
    /// lease already lost is left alone.
    ///
    /// # Errors
    /// [`Error::Store`] when the backend fails.
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// The live lease of `stream`, if someone holds one.
    ///
    /// # Errors
    /// [`Error::Store`] when the backend fails.
    async fn holder(&self, stream: &str) -> Result<Option<Lease>>;

    /// The live leases of the streams whose id starts with `prefix` (a group's members,
    /// or its streams), in stream id order.
    ///
    /// # Errors
    /// [`Error::Store`] when the backend fails.
    async fn leases(&self, prefix: &str) -> Result<Vec<Lease>>;

    /// Saves `point` for the lease's stream only if `lease`'s token is the newest (the
    /// forward rule of [`crate::ResumeStore::save`] applies too).
    ///
    /// # Errors
    /// [`Error::Fenced`] when a newer holder exists (the point stays as it was);
    /// [`Error::Regression`]; [`Error::Store`].
    async fn save_fenced(&self, lease: &Lease, point: &ResumePoint) -> Result<()>;

    /// Records a dead letter only if `lease`'s token is the newest (as
    /// [`crate::DeadLetterStore::record`] otherwise).
    ///
    /// # Errors
    /// [`Error::Fenced`] when a newer holder exists; [`Error::Store`].
    async fn record_fenced(&self, lease: &Lease, letter: &DeadLetter) -> Result<()>;

    /// A short description for logs (backend and location), without credentials.
    fn describe(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_millis(100);

    #[test]
    fn tokens_grow_from_holder_to_holder() {
        let a = LeaseRecord::acquire(None, "a", 0, TTL).unwrap();
        assert_eq!((a.owner.as_str(), a.token, a.expires_at_ms), ("a", 1, 100));
        // Held: another owner is refused; the holder asking again keeps its token.
        assert!(LeaseRecord::acquire(Some(&a), "b", 50, TTL).is_none());
        let again = LeaseRecord::acquire(Some(&a), "a", 50, TTL).unwrap();
        assert_eq!((again.token, again.expires_at_ms), (1, 150));
        // Expired: the next owner gets the next token, and so does the same owner.
        let b = LeaseRecord::acquire(Some(&again), "b", 150, TTL).unwrap();
        assert_eq!((b.owner.as_str(), b.token), ("b", 2));
        let b2 = LeaseRecord::acquire(Some(&b), "b", 400, TTL).unwrap();
        assert_eq!(b2.token, 3);
    }

    #[test]
    fn renewals_and_writes_follow_the_newest_token() {
        let a = LeaseRecord::acquire(None, "a", 0, TTL).unwrap();
        let lease_a = a.lease("s");
        assert!(a.is_held_by(&lease_a, 99));
        // A renewal after expiry fails, though nobody took over; a write still passes.
        assert!(!a.is_held_by(&lease_a, 100));
        assert!(a.admits(&lease_a));
        let b = LeaseRecord::acquire(Some(&a), "b", 120, TTL).unwrap();
        assert!(!b.admits(&lease_a));
        assert!(b.admits(&b.lease("s")));
        let err = LeaseRecord::fenced(Some(&b), &lease_a);
        assert!(
            matches!(
                err,
                Error::Fenced {
                    token: 1,
                    newest: Some(2),
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.kind(), crate::ErrorKind::Fenced);
    }
}
