//! The latest snapshot's progress, shared by its reader, its cursor and the source.

/// The latest snapshot's progress, shared by its reader and the source.
#[derive(Debug, Default)]
pub(crate) struct Progress(
    std::sync::Mutex<Option<(cdc_core::SnapshotProgress, std::time::Instant)>>,
);

impl Progress {
    pub(crate) fn update(&self, f: impl FnOnce(&mut cdc_core::SnapshotProgress)) {
        // Plain counters: a poisoned lock still guards consistent numbers.
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (progress, started) = slot.get_or_insert_with(|| {
            (
                cdc_core::SnapshotProgress::default(),
                std::time::Instant::now(),
            )
        });
        f(progress);
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        progress.per_second = (progress.documents as f64 / secs) as u64;
    }

    pub(crate) fn restart(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((
            cdc_core::SnapshotProgress::default(),
            std::time::Instant::now(),
        ));
    }

    pub(crate) fn get(&self) -> Option<cdc_core::SnapshotProgress> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(p, _)| p.clone())
    }
}
