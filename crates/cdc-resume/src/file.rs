//! [`FileStore`]: one small JSON file per stream in a directory, replaced atomically.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use cdc_core::{
    DeadLetter, DeadLetterStore, Error, Result, ResumePoint, ResumeStore, check_forward,
    validate_stream_id,
};

use crate::record;

/// Keeps each stream's point in `<dir>/<stream>.json`.
///
/// A save writes a temporary file (mode 0600), fsyncs it, renames it over the old one and
/// fsyncs the directory: a crash at any moment leaves the old point or the new one, never
/// a torn file. Saves of one stream are serialized within the process; one process per
/// directory is expected (leases arrive later).
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    counter: AtomicU64,
}

/// Encodes a stream id as a file name: `[A-Za-z0-9_.-]` stay, other bytes become `%XX`.
fn file_stem(stream: &str) -> String {
    let mut out = String::with_capacity(stream.len());
    for b in stream.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && !out.is_empty()) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn stream_of(stem: &str) -> Option<String> {
    let bytes = stem.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = stem.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl FileStore {
    /// A store in `dir`, created (mode 0700) if missing; leftover temporary files of a
    /// crashed save are removed.
    ///
    /// # Errors
    /// [`Error::Store`] when the directory cannot be created or read.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let err = |e: std::io::Error| Error::store(dir.display().to_string(), e);
        create_private_dir(&dir).map_err(err)?;
        for entry in fs::read_dir(&dir).map_err(err)? {
            let path = entry.map_err(err)?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(".json.tmp-"))
            {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(Self {
            dir,
            locks: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding `stream`'s point.
    pub fn path_of(&self, stream: &str) -> PathBuf {
        self.dir.join(format!("{}.json", file_stem(stream)))
    }

    /// The file holding `stream`'s dead letters, one JSON object per line.
    pub fn dead_letters_path(&self, stream: &str) -> PathBuf {
        self.dir
            .join(format!("{}.dead-letters.jsonl", file_stem(stream)))
    }

    /// A temporary file for a new version of one of `stream`'s files (removed at start
    /// when a crash left it behind).
    fn tmp_path(&self, stream: &str) -> PathBuf {
        self.dir.join(format!(
            "{}.json.tmp-{}-{}",
            file_stem(stream),
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn lock_of(&self, stream: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(locks.entry(stream.to_owned()).or_default())
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

fn read_point(path: &Path, stream: &str) -> Result<Option<ResumePoint>> {
    match fs::read(path) {
        Ok(bytes) => record::decode(&bytes, stream, &path.display().to_string()).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::store(stream, e)),
    }
}

async fn blocking<T: Send + 'static>(
    stream: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::store(
            stream,
            std::io::Error::other(format!("file task failed: {e}")),
        )
    })?
}

#[async_trait]
impl ResumeStore for FileStore {
    async fn load(&self, stream: &str) -> Result<Option<ResumePoint>> {
        validate_stream_id(stream)?;
        let path = self.path_of(stream);
        let owned = stream.to_owned();
        blocking(stream, move || read_point(&path, &owned)).await
    }

    async fn save(&self, stream: &str, point: &ResumePoint) -> Result<()> {
        validate_stream_id(stream)?;
        let lock = self.lock_of(stream);
        let _guard = lock.lock().await;
        let path = self.path_of(stream);
        let tmp = self.tmp_path(stream);
        let dir = self.dir.clone();
        let owned = stream.to_owned();
        let point = point.clone();
        blocking(stream, move || {
            let io = |e: std::io::Error| Error::store(owned.clone(), e);
            let stored = read_point(&path, &owned)?;
            check_forward(&owned, stored.as_ref(), &point)?;
            let body = record::encode(&point);
            let written = (|| {
                let mut file = create_private_file(&tmp)?;
                file.write_all(body.as_bytes())?;
                file.sync_all()?;
                fs::rename(&tmp, &path)?;
                sync_dir(&dir)
            })();
            if written.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            written.map_err(io)
        })
        .await
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        validate_stream_id(stream)?;
        let lock = self.lock_of(stream);
        let _guard = lock.lock().await;
        let path = self.path_of(stream);
        let dir = self.dir.clone();
        let owned = stream.to_owned();
        blocking(stream, move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(Error::store(owned, e)),
            }
            sync_dir(&dir).map_err(|e| Error::store(owned, e))
        })
        .await
    }

    async fn list_streams(&self) -> Result<Vec<String>> {
        let dir = self.dir.clone();
        blocking("*", move || {
            let err = |e: std::io::Error| Error::store(dir.display().to_string(), e);
            let mut streams = Vec::new();
            for entry in fs::read_dir(&dir).map_err(err)? {
                let name = entry.map_err(err)?.file_name();
                if let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json"))
                    && let Some(stream) = stream_of(stem)
                {
                    streams.push(stream);
                }
            }
            streams.sort();
            Ok(streams)
        })
        .await
    }

    fn describe(&self) -> String {
        format!("file:{}", self.dir.display())
    }
}

/// Reads the letters of a dead-letter file. A last line without its newline is a record a
/// crash cut short (its `record` never returned `Ok`): it is left out. Any other line that
/// does not decode is an error naming the file.
fn read_letters(path: &Path, stream: &str) -> Result<Vec<DeadLetter>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::store(stream, e)),
    };
    let complete = bytes
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(&bytes[..0], |i| &bytes[..=i]);
    let location = path.display().to_string();
    complete
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| record::decode_letter(line, stream, &location))
        .collect()
}

/// Appends one line and fsyncs it; a torn last line left by a crash is cut off first.
fn append_letter(path: &Path, dir: &Path, line: &str) -> std::io::Result<()> {
    let existed = path.exists();
    let mut file = if existed {
        fs::OpenOptions::new().read(true).write(true).open(path)?
    } else {
        create_private_file(path)?
    };
    let len = file.metadata()?.len();
    if len > 0 {
        let bytes = fs::read(path)?;
        let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if keep as u64 != len {
            file.set_len(keep as u64)?;
        }
    }
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::End(0))?;
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_all()?;
    if !existed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Dead letters as fsynced JSON lines in `<dir>/<stream>.dead-letters.jsonl`: a record is
/// an appended line, fsynced before `record` returns; a removal rewrites the file
/// atomically (temporary file, fsync, rename, fsync of the directory).
#[async_trait]
impl DeadLetterStore for FileStore {
    async fn record(&self, letter: &DeadLetter) -> Result<()> {
        let stream = letter.stream.clone();
        validate_stream_id(&stream)?;
        let lock = self.lock_of(&format!("{stream}\u{0}dead-letters"));
        let _guard = lock.lock().await;
        let path = self.dead_letters_path(&stream);
        let dir = self.dir.clone();
        let line = record::encode_letter(letter);
        let id = letter.id.clone();
        blocking(&stream.clone(), move || {
            if read_letters(&path, &stream)?.iter().any(|l| l.id == id) {
                return Ok(());
            }
            append_letter(&path, &dir, &line).map_err(|e| Error::store(stream, e))
        })
        .await
    }

    async fn list(&self, stream: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        validate_stream_id(stream)?;
        let path = self.dead_letters_path(stream);
        let owned = stream.to_owned();
        let mut letters = blocking(stream, move || read_letters(&path, &owned)).await?;
        letters.sort_by(DeadLetter::stream_order);
        letters.truncate(limit);
        Ok(letters)
    }

    async fn count(&self, stream: &str) -> Result<u64> {
        validate_stream_id(stream)?;
        let path = self.dead_letters_path(stream);
        let owned = stream.to_owned();
        let letters = blocking(stream, move || read_letters(&path, &owned)).await?;
        Ok(letters.len() as u64)
    }

    async fn remove(&self, stream: &str, id: &str) -> Result<bool> {
        validate_stream_id(stream)?;
        let lock = self.lock_of(&format!("{stream}\u{0}dead-letters"));
        let _guard = lock.lock().await;
        let path = self.dead_letters_path(stream);
        let tmp = self.tmp_path(stream);
        let dir = self.dir.clone();
        let (owned, id) = (stream.to_owned(), id.to_owned());
        blocking(stream, move || {
            let letters = read_letters(&path, &owned)?;
            let before = letters.len();
            let kept: Vec<&DeadLetter> = letters.iter().filter(|l| l.id != id).collect();
            if kept.len() == before {
                return Ok(false);
            }
            let written = (|| {
                if kept.is_empty() {
                    fs::remove_file(&path)?;
                } else {
                    let mut file = create_private_file(&tmp)?;
                    for letter in kept {
                        file.write_all(record::encode_letter(letter).as_bytes())?;
                        file.write_all(b"\n")?;
                    }
                    file.sync_all()?;
                    fs::rename(&tmp, &path)?;
                }
                sync_dir(&dir)
            })();
            if written.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            written.map_err(|e| Error::store(owned, e)).map(|()| true)
        })
        .await
    }

    fn describe(&self) -> String {
        format!("file:{}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        for s in ["orders", "a/b", "..", ".hidden", "ünï cödé", "x%y"] {
            let stem = file_stem(s);
            assert!(!stem.contains('/') && !stem.starts_with('.'), "{stem}");
            assert_eq!(stream_of(&stem).as_deref(), Some(s));
        }
    }
}
