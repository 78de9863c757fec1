//! [`MemoryStore`]: points in a map, for tests and embedding.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

use async_trait::async_trait;
use cdc_core::{
    DeadLetter, DeadLetterStore, Result, ResumePoint, ResumeStore, check_forward,
    validate_stream_id,
};

/// Keeps points (and dead letters) in memory: lost when the process ends.
#[derive(Debug, Default)]
pub struct MemoryStore {
    points: Mutex<BTreeMap<String, ResumePoint>>,
    /// Dead letters by stream, then id.
    letters: Mutex<BTreeMap<String, BTreeMap<String, DeadLetter>>>,
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
        self.letters()
            .entry(letter.stream.clone())
            .or_default()
            .entry(letter.id.clone())
            .or_insert_with(|| letter.clone());
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
