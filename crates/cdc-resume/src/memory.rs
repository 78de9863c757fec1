//! [`MemoryStore`]: points in a map, for tests and embedding.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

use async_trait::async_trait;
use cdc_core::{
    DeadLetter, DeadLetterStore, Lease, LeaseRecord, LeaseStore, Result, ResumePoint, ResumeStore,
    check_forward, validate_stream_id,
};

/// Keeps points (and dead letters) in memory: lost when the process ends.
#[derive(Debug, Default)]
pub struct MemoryStore {
    points: Mutex<BTreeMap<String, ResumePoint>>,
    /// Dead letters by stream, then id.
    letters: Mutex<BTreeMap<String, BTreeMap<String, DeadLetter>>>,
    /// Lease records by stream.
    leases: Mutex<BTreeMap<String, LeaseRecord>>,
}

/// Now by this process's clock, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    bson::DateTime::now().timestamp_millis()
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn points(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ResumePoint>> {
        // The map is only ever replaced whole under the lock, so a poisoned lock still
        // guards a consistent map.
        self.points.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a letter once: a letter whose id is recorded stays as it is.
    fn insert_letter(&self, letter: &DeadLetter) {
        self.letters()
            .entry(letter.stream.clone())
            .or_default()
            .entry(letter.id.clone())
            .or_insert_with(|| letter.clone());
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LeaseRecord>> {
        // Records are replaced whole under the lock.
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn letters(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, DeadLetter>>> {
        // Letters are inserted and removed whole under the lock.
        self.letters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl ResumeStore for MemoryStore {
    async fn load(&self, stream: &str) -> Result<Option<ResumePoint>> {
        validate_stream_id(stream)?;
        Ok(self.points().get(stream).cloned())
    }

    async fn save(&self, stream: &str, point: &ResumePoint) -> Result<()> {
        validate_stream_id(stream)?;
        let mut points = self.points();
        check_forward(stream, points.get(stream), point)?;
        points.insert(stream.to_owned(), point.clone());
        Ok(())
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        validate_stream_id(stream)?;
        self.points().remove(stream);
        Ok(())
    }

    async fn list_streams(&self) -> Result<Vec<String>> {
        Ok(self.points().keys().cloned().collect())
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}

#[async_trait]
impl DeadLetterStore for MemoryStore {
    async fn record(&self, letter: &DeadLetter) -> Result<()> {
        validate_stream_id(&letter.stream)?;
        self.insert_letter(letter);
        Ok(())
    }

    async fn list(&self, stream: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        validate_stream_id(stream)?;
        let mut letters: Vec<DeadLetter> = self
            .letters()
            .get(stream)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        letters.sort_by(DeadLetter::stream_order);
        letters.truncate(limit);
        Ok(letters)
    }

    async fn count(&self, stream: &str) -> Result<u64> {
        validate_stream_id(stream)?;
        Ok(self.letters().get(stream).map_or(0, |m| m.len() as u64))
    }

    async fn remove(&self, stream: &str, id: &str) -> Result<bool> {
        validate_stream_id(stream)?;
        Ok(self
            .letters()
            .get_mut(stream)
            .is_some_and(|m| m.remove(id).is_some()))
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}

#[async_trait]
impl LeaseStore for MemoryStore {
    async fn acquire(
        &self,
        stream: &str,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<Lease>> {
        validate_stream_id(stream)?;
        let mut leases = self.leases();
        let Some(record) = LeaseRecord::acquire(leases.get(stream), owner, now_ms(), ttl) else {
            return Ok(None);
        };
        let lease = record.lease(stream);
        leases.insert(stream.to_owned(), record);
        Ok(Some(lease))
    }

    async fn renew(&self, lease: &Lease, ttl: std::time::Duration) -> Result<Lease> {
        let mut leases = self.leases();
        let now = now_ms();
        match leases.get_mut(&lease.stream) {
            Some(record) if record.is_held_by(lease, now) => {
                record.expires_at_ms = now.saturating_add(cdc_core::support::ttl_ms(ttl));
                Ok(record.lease(&lease.stream))
            }
            other => Err(LeaseRecord::fenced(other.as_deref(), lease)),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let mut leases = self.leases();
        let now = now_ms();
        if let Some(record) = leases.get_mut(&lease.stream)
            && record.is_held_by(lease, now)
        {
            record.expires_at_ms = now;
        }
        Ok(())
    }

    async fn holder(&self, stream: &str) -> Result<Option<Lease>> {
        validate_stream_id(stream)?;
        let now = now_ms();
        Ok(self
            .leases()
            .get(stream)
            .filter(|r| r.is_live(now))
            .map(|r| r.lease(stream)))
    }

    async fn leases(&self, prefix: &str) -> Result<Vec<Lease>> {
        let now = now_ms();
        Ok(self
            .leases()
            .range(prefix.to_owned()..)
            .take_while(|(s, _)| s.starts_with(prefix))
            .filter(|(_, r)| r.is_live(now))
            .map(|(s, r)| r.lease(s))
            .collect())
    }

    async fn save_fenced(&self, lease: &Lease, point: &ResumePoint) -> Result<()> {
        validate_stream_id(&lease.stream)?;
        // The lease lock is held across the save: no holder can change in between.
        let leases = self.leases();
        match leases.get(&lease.stream) {
            Some(record) if record.admits(lease) => {
                let mut points = self.points();
                check_forward(&lease.stream, points.get(&lease.stream), point)?;
                points.insert(lease.stream.clone(), point.clone());
                Ok(())
            }
            other => Err(LeaseRecord::fenced(other, lease)),
        }
    }

    async fn record_fenced(&self, lease: &Lease, letter: &DeadLetter) -> Result<()> {
        lease.covers(letter)?;
        let leases = self.leases();
        match leases.get(&lease.stream) {
            Some(record) if record.admits(lease) => {
                self.insert_letter(letter);
                Ok(())
            }
            other => Err(LeaseRecord::fenced(other, lease)),
        }
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}
