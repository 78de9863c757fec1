//! [`MemoryStore`]: points in a map, for tests and embedding.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

use async_trait::async_trait;
use cdc_core::{Result, ResumePoint, ResumeStore, check_forward, validate_stream_id};

/// Keeps points in memory: lost when the process ends.
#[derive(Debug, Default)]
pub struct MemoryStore {
    points: Mutex<BTreeMap<String, ResumePoint>>,
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
