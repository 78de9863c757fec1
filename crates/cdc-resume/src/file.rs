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
    DeadLetter, DeadLetterStore, Error, Lease, LeaseRecord, LeaseStore, Result, ResumePoint,
    ResumeStore, check_forward, validate_stream_id,
};

use crate::record;

/// Keeps each stream's point in `<dir>/<stream>.json`.
///
/// A save writes a temporary file (mode 0600), fsyncs it, renames it over the old one and
/// fsyncs the directory: a crash at any moment leaves the old point or the new one, never
/// a torn file. Saves of one stream are serialized within the process. Leases (for the
/// processes of one host) live in `<dir>/<stream>.lease`, changed under an exclusive OS
/// file lock on `<dir>/<stream>.lease.lock`, which fenced saves hold too.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    counter: AtomicU64,
    /// Per dead-letter file, the ids recorded in it as far as it was read: a record reads
    /// only what was appended since (by any process), not the whole file.
    letter_ids: Mutex<HashMap<PathBuf, Arc<Mutex<LetterIds>>>>,
}

/// The ids of a dead-letter file, read through byte `read` (just past a newline).
#[derive(Debug, Default)]
struct LetterIds {
    /// The file read (device and inode) and its first line: a removal replaces the file
    /// (or deletes it, and a new one may reuse the inode), and it is then read again.
    file: Option<(u64, u64)>,
    first_line: Vec<u8>,
    read: u64,
    ids: std::collections::HashSet<String>,
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

/// The longest name a stream's files add to its stem: `.json.tmp-<pid>-<counter>`.
const LONGEST_SUFFIX: usize = ".json.tmp-".len() + 10 + 1 + 20;

/// The longest file name the file systems we run on take.
const NAME_MAX: usize = 255;

/// See [`FileStore::check_stream_id`].
fn check_stream(stream: &str) -> Result<()> {
    validate_stream_id(stream)?;
    let stem = file_stem(stream).len();
    if stem + LONGEST_SUFFIX > NAME_MAX {
        return Err(Error::InvalidArgument {
            name: "stream",
            reason: format!(
                "the file store keeps a stream in files named after it, and names may be at most {NAME_MAX} bytes: this id takes {stem} bytes encoded, at most {} fit: {stream:?}",
                NAME_MAX - LONGEST_SUFFIX
            ),
        });
    }
    Ok(())
}

/// The stream id a file name encodes (`None` for a name this store did not write).
fn stream_of(stem: &str) -> Option<String> {
    cdc_core::support::percent_decode(stem)
}

impl FileStore {
    /// A store in `dir`, created (mode 0700) if missing; leftover temporary files of a
    /// crashed save are removed.
    ///
    /// A directory that others may write to (mode `o+w`) and that another user owns is
    /// refused: whoever can replace the files there can make a run start from a point of
    /// their choosing. One that is ours but others may write to is used with a warning.
    /// [`FileStore::new_in_shared_dir`] takes either.
    ///
    /// # Errors
    /// [`Error::Store`] when the directory cannot be created or read;
    /// [`Error::StoreUnusable`] for a directory others may write to that another user
    /// owns.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        Self::open(dir.into(), false)
    }

    /// As [`FileStore::new`], accepting a directory that others may write to and another
    /// user owns (with a warning): for a deliberate set-up, such as a shared volume.
    ///
    /// # Errors
    /// [`Error::Store`] when the directory cannot be created or read.
    pub fn new_in_shared_dir(dir: impl Into<PathBuf>) -> Result<Self> {
        Self::open(dir.into(), true)
    }

    fn open(dir: PathBuf, shared: bool) -> Result<Self> {
        let err = |e: std::io::Error| Error::store(dir.display().to_string(), e);
        create_private_dir(&dir).map_err(err)?;
        check_dir_owner(&dir, shared)?;
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
            letter_ids: Mutex::new(HashMap::new()),
        })
    }

    /// Checks a stream id for this store: [`validate_stream_id`], and its files' names
    /// fit in 255 bytes (an id is encoded into file names, bytes other than
    /// `[A-Za-z0-9_.-]` taking three), so a long id is refused where it is named, not by
    /// the file system at every save. Every call of the store checks it.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the problem.
    pub fn check_stream_id(stream: &str) -> Result<()> {
        check_stream(stream)
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

    /// The file holding `stream`'s lease record.
    pub fn lease_path(&self, stream: &str) -> PathBuf {
        self.dir.join(format!("{}.lease", file_stem(stream)))
    }

    fn lease_lock_path(&self, stream: &str) -> PathBuf {
        self.dir.join(format!("{}.lease.lock", file_stem(stream)))
    }

    fn lock_of(&self, stream: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(locks.entry(stream.to_owned()).or_default())
    }

    fn letter_ids_of(&self, path: &Path) -> Arc<Mutex<LetterIds>> {
        let mut all = self
            .letter_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(all.entry(path.to_owned()).or_default())
    }
}

/// Refuses (unless `shared`) a state directory others may write to that another user
/// owns; warns when others may write to it.
#[cfg(unix)]
fn check_dir_owner(dir: &Path, shared: bool) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = fs::metadata(dir).map_err(|e| Error::store(dir.display().to_string(), e))?;
    let mode = meta.permissions().mode();
    if mode & 0o002 == 0 {
        return Ok(());
    }
    // This process's user: the owner of what it creates (`/proc/self` is owned by it).
    let me = fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let foreign = me.is_some_and(|me| me != meta.uid());
    if foreign && !shared {
        return Err(Error::StoreUnusable {
            stream: "*".to_owned(),
            location: dir.display().to_string(),
            source: std::sync::Arc::new(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "the state directory is writable by every user (mode {:o}) and owned by another user (uid {}): anyone could replace the resume points there; use a directory of your own, or allow it deliberately (FileStore::new_in_shared_dir; in cdc: `store.allow_shared_dir = true`)",
                    mode & 0o7777,
                    meta.uid()
                ),
            )),
        });
    }
    tracing::warn!(
        dir = %dir.display(),
        mode = format!("{:o}", mode & 0o7777),
        owner = meta.uid(),
        "the state directory is writable by every user: anyone could replace the resume points there"
    );
    Ok(())
}

#[cfg(not(unix))]
fn check_dir_owner(_dir: &Path, _shared: bool) -> Result<()> {
    Ok(())
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

/// Replaces the point in `path` (through `tmp`) if it moves forward.
fn write_point(
    path: &Path,
    tmp: &Path,
    dir: &Path,
    stream: &str,
    point: &ResumePoint,
) -> Result<()> {
    let stored = read_point(path, stream)?;
    check_forward(stream, stored.as_ref(), point)?;
    replace_file(path, tmp, dir, record::encode(stream, point).as_bytes())
        .map_err(|e| fs_error(stream, path, e))
}

/// Writes `body` to `tmp`, fsyncs it, renames it over `path` and fsyncs the directory.
fn replace_file(path: &Path, tmp: &Path, dir: &Path, body: &[u8]) -> std::io::Result<()> {
    let written = (|| {
        let mut file = create_private_file(tmp)?;
        file.write_all(body)?;
        file.sync_all()?;
        fs::rename(tmp, path)?;
        sync_dir(dir)
    })();
    if written.is_err() {
        let _ = fs::remove_file(tmp);
    }
    written
}

/// Runs `f` holding an exclusive OS lock on `lock_path` (processes of one host exclude
/// each other; the lock goes with the file handle, also if the process dies).
fn with_file_lock<T>(lock_path: &Path, stream: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)
        .map_err(|e| Error::store(stream, e))?;
    file.lock().map_err(|e| Error::store(stream, e))?;
    let out = f();
    let _ = file.unlock();
    out
}

/// What a state file's type is when it is not a regular file.
fn odd_type(file_type: fs::FileType) -> Option<&'static str> {
    #[cfg(unix)]
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_file() {
        return None;
    }
    Some(if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_dir() {
        "a directory"
    } else {
        #[cfg(unix)]
        {
            if file_type.is_fifo() {
                "a FIFO"
            } else if file_type.is_socket() {
                "a socket"
            } else {
                "a device"
            }
        }
        #[cfg(not(unix))]
        "not a file"
    })
}

/// Reads one of `stream`'s state files: `None` only when nothing is at `path`. Anything
/// there that is not a regular file (a symbolic link, even a dangling one, a directory, a
/// FIFO) is an error naming the path, never "nothing stored": reading through it could
/// load another stream's state, block, or lose the stored point. Opened without following
/// links and without blocking, and checked again once open.
fn read_state_file(path: &Path, stream: &str) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let not_regular = |what: &str| Error::CorruptPoint {
        stream: stream.to_owned(),
        location: path.display().to_string(),
        reason: format!(
            "it is {what}, not a regular file; state is never read through one (put the file itself there, or remove it to start over)"
        ),
    };
    match fs::symlink_metadata(path) {
        Ok(meta) => {
            if let Some(what) = odd_type(meta.file_type()) {
                return Err(not_regular(what));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fs_error(stream, path, e)),
    }
    let mut options = fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    let mut file = match options.open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // O_NOFOLLOW on a link that replaced the file since the check: ELOOP.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(not_regular("a symbolic link"));
        }
        Err(e) => return Err(fs_error(stream, path, e)),
    };
    let meta = file.metadata().map_err(|e| fs_error(stream, path, e))?;
    if let Some(what) = odd_type(meta.file_type()) {
        return Err(not_regular(what));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes)
        .map_err(|e| fs_error(stream, path, e))?;
    Ok(Some(bytes))
}

/// A file-system failure of `stream`'s state at `path`. Failures only a person can mend
/// (a directory where a file belongs or a file where the directory belongs, a name the
/// file system refuses, no permission, a read-only file system) are
/// [`Error::StoreUnusable`] ([`cdc_core::ErrorKind::Persistent`]: a run is retried a
/// bounded number of times, not forever); others are [`Error::Store`] (retried).
fn fs_error(stream: &str, path: &Path, e: std::io::Error) -> Error {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::IsADirectory
        | K::NotADirectory
        | K::InvalidFilename
        | K::PermissionDenied
        | K::ReadOnlyFilesystem
        | K::InvalidInput => Error::StoreUnusable {
            stream: stream.to_owned(),
            location: path.display().to_string(),
            source: std::sync::Arc::new(e),
        },
        _ => Error::store(stream, e),
    }
}

fn read_lease(path: &Path, stream: &str) -> Result<Option<LeaseRecord>> {
    let Some(bytes) = read_state_file(path, stream)? else {
        return Ok(None);
    };
    let corrupt = |reason: String| Error::CorruptPoint {
        stream: stream.to_owned(),
        location: path.display().to_string(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("lease record: {e}")))?;
    match (
        value.get("owner").and_then(serde_json::Value::as_str),
        value.get("token").and_then(serde_json::Value::as_u64),
        value.get("expiresAtMs").and_then(serde_json::Value::as_i64),
    ) {
        (Some(owner), Some(token), Some(expires_at_ms)) => Ok(Some(LeaseRecord {
            owner: owner.to_owned(),
            token,
            expires_at_ms,
        })),
        _ => Err(corrupt(
            "lease record without owner, token or expiresAtMs".into(),
        )),
    }
}

fn encode_lease(record: &LeaseRecord) -> String {
    serde_json::json!({
        "owner": record.owner,
        "token": record.token,
        "expiresAtMs": record.expires_at_ms,
    })
    .to_string()
}

fn read_point(path: &Path, stream: &str) -> Result<Option<ResumePoint>> {
    read_state_file(path, stream)?
        .map(|bytes| record::decode(&bytes, stream, &path.display().to_string()))
        .transpose()
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
        check_stream(stream)?;
        let path = self.path_of(stream);
        let owned = stream.to_owned();
        blocking(stream, move || read_point(&path, &owned)).await
    }

    async fn save(&self, stream: &str, point: &ResumePoint) -> Result<()> {
        check_stream(stream)?;
        let lock = self.lock_of(stream);
        let _guard = lock.lock().await;
        let path = self.path_of(stream);
        let tmp = self.tmp_path(stream);
        let dir = self.dir.clone();
        let owned = stream.to_owned();
        let point = point.clone();
        blocking(stream, move || {
            write_point(&path, &tmp, &dir, &owned, &point)
        })
        .await
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        check_stream(stream)?;
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
    let Some(bytes) = read_state_file(path, stream)? else {
        return Ok(Vec::new());
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

/// Records a letter's line once: a letter whose id is recorded stays as it is. `known`
/// holds the ids of the file as far as it was read before; only what was appended since
/// (by this process or another) is read, so a record costs the same at the 100,000th
/// letter as at the first. A torn last line left by a crash is cut off first.
fn record_letter(
    path: &Path,
    dir: &Path,
    stream: &str,
    line: &str,
    id: &str,
    known: &mut LetterIds,
) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let err = |e: std::io::Error| fs_error(stream, path, e);
    let existed = path.exists();
    let mut file = if existed {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?
    } else {
        create_private_file(path).map_err(err)?
    };
    let meta = file.metadata().map_err(err)?;
    let identity = file_identity(&meta);
    let len = meta.len();
    let same = known.file == identity
        && identity.is_some()
        && len >= known.read
        && starts_with(&mut file, &known.first_line).unwrap_or(false);
    if !same {
        *known = LetterIds {
            file: identity,
            ..LetterIds::default()
        };
    }
    if len > known.read {
        let mut appended = Vec::with_capacity((len - known.read) as usize);
        file.seek(SeekFrom::Start(known.read)).map_err(err)?;
        (&file)
            .take(len - known.read)
            .read_to_end(&mut appended)
            .map_err(err)?;
        let complete = appended
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let location = path.display().to_string();
        for line in appended[..complete]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
        {
            known
                .ids
                .insert(record::decode_letter(line, stream, &location)?.id);
        }
        if known.read == 0 {
            known.first_line = appended[..complete]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(Vec::new(), |i| appended[..=i].to_vec());
        }
        known.read += complete as u64;
        if known.read != len {
            file.set_len(known.read).map_err(err)?;
        }
    }
    if known.ids.contains(id) {
        return Ok(());
    }
    file.seek(SeekFrom::Start(known.read)).map_err(err)?;
    file.write_all(format!("{line}\n").as_bytes())
        .map_err(err)?;
    file.sync_all().map_err(err)?;
    if !existed {
        sync_dir(dir).map_err(err)?;
    }
    if known.read == 0 {
        known.first_line = format!("{line}\n").into_bytes();
    }
    known.read += line.len() as u64 + 1;
    known.ids.insert(id.to_owned());
    Ok(())
}

/// Whether `file` starts with `prefix`.
fn starts_with(file: &mut fs::File, prefix: &[u8]) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut start = vec![0; prefix.len()];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut start)?;
    Ok(start == prefix)
}

/// A file's device and inode, where the platform has them.
#[cfg(unix)]
fn file_identity(meta: &fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

/// Without inodes a file is read whole every time (correct, slower).
#[cfg(not(unix))]
fn file_identity(_meta: &fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// Dead letters as fsynced JSON lines in `<dir>/<stream>.dead-letters.jsonl`: a record is
/// an appended line, fsynced before `record` returns; a removal rewrites the file
/// atomically (temporary file, fsync, rename, fsync of the directory).
#[async_trait]
impl DeadLetterStore for FileStore {
    async fn record(&self, letter: &DeadLetter) -> Result<()> {
        let stream = letter.stream.clone();
        check_stream(&stream)?;
        let lock = self.lock_of(&format!("{stream}\u{0}dead-letters"));
        let _guard = lock.lock().await;
        let path = self.dead_letters_path(&stream);
        let dir = self.dir.clone();
        let line = record::encode_letter(letter);
        let id = letter.id.clone();
        let known = self.letter_ids_of(&path);
        blocking(&stream.clone(), move || {
            let mut known = known.lock().unwrap_or_else(PoisonError::into_inner);
            record_letter(&path, &dir, &stream, &line, &id, &mut known)
        })
        .await
    }

    async fn list(&self, stream: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        check_stream(stream)?;
        let path = self.dead_letters_path(stream);
        let owned = stream.to_owned();
        let mut letters = blocking(stream, move || read_letters(&path, &owned)).await?;
        letters.sort_by(DeadLetter::stream_order);
        letters.truncate(limit);
        Ok(letters)
    }

    async fn count(&self, stream: &str) -> Result<u64> {
        check_stream(stream)?;
        let path = self.dead_letters_path(stream);
        let owned = stream.to_owned();
        let letters = blocking(stream, move || read_letters(&path, &owned)).await?;
        Ok(letters.len() as u64)
    }

    async fn remove(&self, stream: &str, id: &str) -> Result<bool> {
        check_stream(stream)?;
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

/// Leases for the processes of one host: each change of a lease record, and each fenced
/// save or letter, runs under an exclusive OS file lock; the clock is this host's.
#[async_trait]
impl LeaseStore for FileStore {
    async fn acquire(
        &self,
        stream: &str,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<Lease>> {
        check_stream(stream)?;
        let (lock, path, tmp, dir) = self.lease_files(stream);
        let (stream, owner) = (stream.to_owned(), owner.to_owned());
        blocking(&stream.clone(), move || {
            with_file_lock(&lock, &stream, || {
                let current = read_lease(&path, &stream)?;
                let Some(record) =
                    LeaseRecord::acquire(current.as_ref(), &owner, crate::memory::now_ms(), ttl)
                else {
                    return Ok(None);
                };
                if current.as_ref() != Some(&record) {
                    replace_file(&path, &tmp, &dir, encode_lease(&record).as_bytes())
                        .map_err(|e| Error::store(stream.clone(), e))?;
                }
                Ok(Some(record.lease(&stream)))
            })
        })
        .await
    }

    async fn renew(&self, lease: &Lease, ttl: std::time::Duration) -> Result<Lease> {
        let (lock, path, tmp, dir) = self.lease_files(&lease.stream);
        let lease = lease.clone();
        blocking(&lease.stream.clone(), move || {
            with_file_lock(&lock, &lease.stream, || {
                let now = crate::memory::now_ms();
                match read_lease(&path, &lease.stream)? {
                    Some(mut record) if record.is_held_by(&lease, now) => {
                        record.expires_at_ms = now.saturating_add(cdc_core::support::ttl_ms(ttl));
                        replace_file(&path, &tmp, &dir, encode_lease(&record).as_bytes())
                            .map_err(|e| Error::store(lease.stream.clone(), e))?;
                        Ok(record.lease(&lease.stream))
                    }
                    other => Err(LeaseRecord::fenced(other.as_ref(), &lease)),
                }
            })
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let (lock, path, tmp, dir) = self.lease_files(&lease.stream);
        let lease = lease.clone();
        blocking(&lease.stream.clone(), move || {
            with_file_lock(&lock, &lease.stream, || {
                let now = crate::memory::now_ms();
                if let Some(mut record) = read_lease(&path, &lease.stream)?
                    && record.is_held_by(&lease, now)
                {
                    record.expires_at_ms = now;
                    replace_file(&path, &tmp, &dir, encode_lease(&record).as_bytes())
                        .map_err(|e| Error::store(lease.stream.clone(), e))?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn holder(&self, stream: &str) -> Result<Option<Lease>> {
        check_stream(stream)?;
        let path = self.lease_path(stream);
        let stream = stream.to_owned();
        blocking(&stream.clone(), move || {
            let now = crate::memory::now_ms();
            Ok(read_lease(&path, &stream)?
                .filter(|r| r.is_live(now))
                .map(|r| r.lease(&stream)))
        })
        .await
    }

    async fn leases(&self, prefix: &str) -> Result<Vec<Lease>> {
        let dir = self.dir.clone();
        let prefix = prefix.to_owned();
        blocking("*", move || {
            let now = crate::memory::now_ms();
            let mut out = Vec::new();
            for entry in fs::read_dir(&dir).map_err(|e| Error::store("*", e))? {
                let path = entry.map_err(|e| Error::store("*", e))?.path();
                let Some(stream) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".lease"))
                    .and_then(stream_of)
                    .filter(|s| s.starts_with(&prefix))
                else {
                    continue;
                };
                if let Some(record) = read_lease(&path, &stream)?.filter(|r| r.is_live(now)) {
                    out.push(record.lease(&stream));
                }
            }
            out.sort_by(|a, b| a.stream.cmp(&b.stream));
            Ok(out)
        })
        .await
    }

    async fn save_fenced(&self, lease: &Lease, point: &ResumePoint) -> Result<()> {
        check_stream(&lease.stream)?;
        let (lock, lease_path, _, dir) = self.lease_files(&lease.stream);
        let path = self.path_of(&lease.stream);
        let tmp = self.tmp_path(&lease.stream);
        let (lease, point) = (lease.clone(), point.clone());
        let in_process = self.lock_of(&lease.stream);
        let _guard = in_process.lock().await;
        blocking(&lease.stream.clone(), move || {
            with_file_lock(&lock, &lease.stream, || {
                match read_lease(&lease_path, &lease.stream)? {
                    Some(record) if record.admits(&lease) => {
                        write_point(&path, &tmp, &dir, &lease.stream, &point)
                    }
                    other => Err(LeaseRecord::fenced(other.as_ref(), &lease)),
                }
            })
        })
        .await
    }

    async fn record_fenced(&self, lease: &Lease, letter: &DeadLetter) -> Result<()> {
        lease.covers(letter)?;
        let (lock, lease_path, _, dir) = self.lease_files(&lease.stream);
        let path = self.dead_letters_path(&lease.stream);
        let line = record::encode_letter(letter);
        let id = letter.id.clone();
        let lease = lease.clone();
        let in_process = self.lock_of(&format!("{}\u{0}dead-letters", lease.stream));
        let _guard = in_process.lock().await;
        let known = self.letter_ids_of(&path);
        blocking(&lease.stream.clone(), move || {
            with_file_lock(&lock, &lease.stream, || {
                match read_lease(&lease_path, &lease.stream)? {
                    Some(record) if record.admits(&lease) => {
                        let mut known = known.lock().unwrap_or_else(PoisonError::into_inner);
                        record_letter(&path, &dir, &lease.stream, &line, &id, &mut known)
                    }
                    other => Err(LeaseRecord::fenced(other.as_ref(), &lease)),
                }
            })
        })
        .await
    }

    fn describe(&self) -> String {
        ResumeStore::describe(self)
    }
}

impl FileStore {
    /// The lock file, the lease file, a temporary file for it, and the directory.
    fn lease_files(&self, stream: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        (
            self.lease_lock_path(stream),
            self.lease_path(stream),
            self.tmp_path(stream),
            self.dir.clone(),
        )
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
