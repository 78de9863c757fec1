//! The resume store abstraction: where each stream's resume point lives.

use async_trait::async_trait;

use crate::{ClusterTime, Error, Result, ResumePoint};

/// Keeps one resume point per stream id. One store serves many processors.
///
/// Every implementation keeps these rules (checked by `cdc-resume`'s conformance suite):
/// tokens round-trip byte-for-byte; streams are isolated; a save older (in cluster time)
/// than the stored point is refused with [`Error::Regression`]; concurrent saves never
/// corrupt the record; a failing backend is an error, never "no point"; a corrupt record
/// is [`Error::CorruptPoint`] naming the stream and where it lives.
#[async_trait]
pub trait ResumeStore: Send + Sync {
    /// The stored point of `stream`, if any.
    ///
    /// # Errors
    /// [`Error::Store`] when the backend fails; [`Error::CorruptPoint`] when the record
    /// cannot be decoded.
    async fn load(&self, stream: &str) -> Result<Option<ResumePoint>>;

    /// Only the cluster time of the stored point (the Go package's `GetResumeTime`).
    ///
    /// # Errors
    /// As [`ResumeStore::load`].
    async fn load_cluster_time(&self, stream: &str) -> Result<Option<ClusterTime>> {
        Ok(self.load(stream).await?.map(|p| p.cluster_time))
    }

    /// Replaces the stored point of `stream` atomically: one record per stream.
    ///
    /// # Errors
    /// [`Error::Regression`] when `point` is older than the stored point (which then stays);
    /// [`Error::Store`] when the backend fails.
    async fn save(&self, stream: &str, point: &ResumePoint) -> Result<()>;

    /// Removes the stored point of `stream` (the only way to move a stream backwards).
    ///
    /// # Errors
    /// [`Error::Store`] when the backend fails.
    async fn delete(&self, stream: &str) -> Result<()>;

    /// The ids of every stream with a stored point, sorted.
    ///
    /// # Errors
    /// [`Error::Store`] when the backend fails.
    async fn list_streams(&self) -> Result<Vec<String>>;

    /// A short description for logs (backend and location), without credentials.
    fn describe(&self) -> String;

    /// The MongoDB collection the store writes its points to, when it is one: a stream
    /// over that collection's database or deployment leaves it out, so the store's own
    /// writes do not feed the stream.
    fn namespace(&self) -> Option<crate::Namespace> {
        None
    }
}

/// The rule every store applies before overwriting: a point may stay or move forward in
/// cluster time, never backwards.
///
/// # Errors
/// [`Error::Regression`] when `new` is older than `stored`.
pub fn check_forward(stream: &str, stored: Option<&ResumePoint>, new: &ResumePoint) -> Result<()> {
    match stored {
        Some(old) if new.cluster_time < old.cluster_time => Err(Error::Regression {
            stream: stream.to_owned(),
            stored: old.cluster_time,
            attempted: new.cluster_time,
        }),
        _ => Ok(()),
    }
}

/// Checks a stream id: 1 to 256 bytes, no control characters.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the problem.
pub fn validate_stream_id(stream: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::InvalidArgument {
            name: "stream",
            reason: format!("{reason}: {stream:?}"),
        })
    };
    if stream.is_empty() {
        return bad("a stream id may not be empty");
    }
    if stream.len() > 256 {
        return bad("a stream id may not be longer than 256 bytes");
    }
    if stream.chars().any(char::is_control) {
        return bad("a stream id may not contain control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{OperationType, ResumeToken};

    fn point(t: u32) -> ResumePoint {
        let token = ResumeToken::from_document(&bson::doc! { "_data": "82" }).unwrap();
        ResumePoint::for_event(
            token,
            ClusterTime::new(t, 0),
            OperationType::Insert,
            bson::DateTime::from_millis(0),
        )
    }

    #[allow(dead_code)]
    fn _obj_safe(_: &dyn ResumeStore) {}

    #[test]
    fn forward_rule() {
        assert!(check_forward("s", None, &point(1)).is_ok());
        assert!(check_forward("s", Some(&point(1)), &point(1)).is_ok());
        assert!(check_forward("s", Some(&point(1)), &point(2)).is_ok());
        let err = check_forward("s", Some(&point(2)), &point(1)).unwrap_err();
        assert!(matches!(err, Error::Regression { .. }));
    }

    #[test]
    fn stream_ids() {
        assert!(validate_stream_id("orders.resume").is_ok());
        assert!(validate_stream_id("").is_err());
        assert!(validate_stream_id("a\nb").is_err());
        assert!(validate_stream_id(&"x".repeat(257)).is_err());
    }
}
