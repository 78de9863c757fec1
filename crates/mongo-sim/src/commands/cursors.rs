//! Cursors: first batches, `getMore` on plain cursors, `killCursors`.
//!
//! A plain cursor reads a [`View`] and streams: each batch scans on from where the last
//! one stopped, with no server lock held (the server checks the cursor out of the
//! registry while it reads a batch).

use std::{collections::VecDeque, sync::Arc, time::Duration};

use bson::{Bson, Document, RawArrayBuf, RawDocumentBuf, Timestamp, cstr, doc};

use crate::{
    changestream::to_raw,
    engine::{Position, View},
    error::{CmdError, CmdResult, code},
    matcher::Filter,
    oplog::{OplogEntry, OplogLock},
    pipeline::{Projection, Stage},
    state::{Cursor, State},
    wire::MAX_BSON_OBJECT_SIZE,
};

/// What a plain cursor returns.
#[derive(Debug)]
enum Source {
    /// Results computed already (a sort, `listCollections`, a transaction's read, the oplog).
    Ready(VecDeque<Document>),
    /// A scan of a view: documents `filter` accepts, after skipping `skip`, at most `left`.
    Scan(Box<Scan>),
    /// An aggregation (or a sorted query) over a view or what a transaction sees, run
    /// when the first batch is asked for.
    Pipeline { input: Input, stages: Vec<Stage> },
    /// `local.oplog.rs` in natural order or newest first.
    Oplog(Box<OplogScan>),
}

/// What a chunked read still returns: the documents `filter` accepts, after skipping
/// `skip`, at most `left`, taken from what was read and refilled a chunk at a time.
#[derive(Debug)]
struct Window {
    filter: Filter,
    skip: usize,
    left: usize,
    /// Documents read and not yet looked at.
    read: VecDeque<Arc<Document>>,
    /// Whether the source has no more.
    done: bool,
}

impl Window {
    fn new(filter: Filter, skip: usize, take: usize) -> Self {
        Self {
            filter,
            skip,
            left: take,
            read: VecDeque::new(),
            done: false,
        }
    }

    /// The next document returned; `fill` reads the next chunk (`false`: there is none).
    fn next(
        &mut self,
        mut fill: impl FnMut(&mut VecDeque<Arc<Document>>) -> bool,
    ) -> Option<Arc<Document>> {
        loop {
            if self.left == 0 {
                return None;
            }
            match self.read.pop_front() {
                Some(d) if self.filter.matches(&d) => {
                    if self.skip > 0 {
                        self.skip -= 1;
                        continue;
                    }
                    self.left -= 1;
                    return Some(d);
                }
                Some(_) => {}
                None if self.done => return None,
                None => self.done = !fill(&mut self.read),
            }
        }
    }
}

/// A read of `local.oplog.rs`: entries taken [`OPLOG_CHUNK`] per hold of the commit lock
/// (writes commit between two), turned into documents there, filtered after.
#[derive(Debug)]
pub(crate) struct OplogScan {
    log: Arc<OplogLock>,
    /// The next entry's sequence number (forwards: the next to read; backwards: the one
    /// below the last read).
    next: u64,
    forward: bool,
    window: Window,
}

/// How many oplog entries a read takes per hold of the commit lock.
const OPLOG_CHUNK: u64 = 256;

impl OplogScan {
    /// A read of `log` oldest first (`forward`) or newest first, of the entries `filter`
    /// accepts after skipping `skip`, at most `take`.
    pub(crate) fn new(
        log: Arc<OplogLock>,
        forward: bool,
        filter: Filter,
        skip: usize,
        take: usize,
    ) -> Self {
        Self {
            log,
            next: if forward { 0 } else { u64::MAX },
            forward,
            window: Window::new(filter, skip, take),
        }
    }

    /// The next document the read returns.
    pub(crate) fn pull(&mut self) -> Option<Arc<Document>> {
        let Self {
            log,
            next,
            forward,
            window,
        } = self;
        window.next(|read| read_entries(log, next, *forward, read))
    }
}

/// Reads the next entries into `read`, from where the read is (`next`; entries that
/// rolled off meanwhile are passed over, as a capped collection's reader loses them);
/// `false` when there are none.
fn read_entries(
    log: &OplogLock,
    next: &mut u64,
    forward: bool,
    read: &mut VecDeque<Arc<Document>>,
) -> bool {
    let log = log.lock();
    let (first, head) = (log.first_seq(), log.head_seq());
    let as_doc = |seq| log.entry(seq).map(|e| Arc::new(OplogEntry::to_document(e)));
    if forward {
        let from = (*next).max(first);
        let to = head.min(from.saturating_add(OPLOG_CHUNK - 1));
        if from > to {
            return false;
        }
        read.extend((from..=to).filter_map(as_doc));
        *next = to + 1;
    } else {
        // Sequence numbers start at 1: `next` falls below `first` at the oldest.
        let from = (*next).min(head);
        if from < first {
            return false;
        }
        let to = first.max(from.saturating_sub(OPLOG_CHUNK - 1));
        read.extend((to..=from).rev().filter_map(as_doc));
        *next = to - 1;
    }
    true
}

/// What a computed read reads.
#[derive(Debug)]
pub(crate) enum Input {
    /// A view.
    View(View),
    /// A transaction's snapshot and writes.
    Txn(crate::state::TxnRead),
}

impl Input {
    fn docs(&self) -> Vec<Document> {
        match self {
            Self::View(view) => view.all().into_iter().map(Arc::unwrap_or_clone).collect(),
            Self::Txn(t) => t.docs(),
        }
    }
}

/// A scan of a view.
#[derive(Debug)]
struct Scan {
    view: View,
    pos: Position,
    window: Window,
}

/// A cursor over documents.
#[derive(Debug)]
pub(crate) struct DocCursor {
    /// `db.coll` for replies.
    pub(crate) ns: String,
    source: Source,
    projection: Option<Projection>,
    /// The next result, read ahead so a batch knows whether it is the last.
    ahead: Option<RawDocumentBuf>,
    /// Set by a snapshot read: the time it reads at, reported with the first batch.
    pub(crate) read_time: Option<Timestamp>,
}

/// What a server returns in one batch at most, besides the document count.
const BATCH_BYTES: usize = MAX_BSON_OBJECT_SIZE;

impl DocCursor {
    /// Over results computed already.
    pub(crate) fn ready(ns: String, docs: impl Into<VecDeque<Document>>) -> Self {
        Self {
            ns,
            source: Source::Ready(docs.into()),
            projection: None,
            ahead: None,
            read_time: None,
        }
    }

    /// A scan of `view` from `pos`.
    pub(crate) fn scan(
        ns: String,
        view: View,
        pos: Position,
        filter: Filter,
        skip: usize,
        take: usize,
        projection: Option<Projection>,
    ) -> Self {
        Self {
            ns,
            source: Source::Scan(Box::new(Scan {
                view,
                pos,
                window: Window::new(filter, skip, take),
            })),
            projection,
            ahead: None,
            read_time: None,
        }
    }

    /// A read of `local.oplog.rs`.
    pub(crate) fn oplog(ns: String, scan: OplogScan) -> Self {
        Self {
            ns,
            source: Source::Oplog(Box::new(scan)),
            projection: None,
            ahead: None,
            read_time: None,
        }
    }

    /// An aggregation of `input`.
    pub(crate) fn pipeline(ns: String, input: Input, stages: Vec<Stage>) -> Self {
        Self {
            ns,
            source: Source::Pipeline { input, stages },
            projection: None,
            ahead: None,
            read_time: None,
        }
    }

    /// Results are shown through `projection`.
    pub(crate) fn with_projection(mut self, projection: Option<Projection>) -> Self {
        self.projection = projection;
        self
    }

    /// The next result, encoded: a stored document is encoded from the view's copy
    /// (no clone), a projected or computed one from its own.
    fn pull(&mut self) -> CmdResult<Option<RawDocumentBuf>> {
        if let Some(d) = self.ahead.take() {
            return Ok(Some(d));
        }
        if let Source::Pipeline { input, stages } = &self.source {
            let out = crate::pipeline::run(stages, input.docs())?;
            self.source = Source::Ready(out.into());
        }
        let raw = match &mut self.source {
            Source::Ready(docs) => docs.pop_front().map(Arc::new),
            Source::Pipeline { .. } => None,
            Source::Oplog(scan) => scan.pull(),
            Source::Scan(scan) => {
                let Scan { view, pos, window } = &mut **scan;
                window.next(|read| match view.next_chunk(pos) {
                    Some(chunk) => {
                        read.extend(chunk);
                        true
                    }
                    None => false,
                })
            }
        };
        match (raw, &self.projection) {
            (Some(d), Some(p)) => to_raw(&p.apply(&d)?).map(Some),
            (Some(d), None) => to_raw(&d).map(Some),
            (None, _) => Ok(None),
        }
    }

    /// The next batch of at most `max` documents (and at most 16 MiB), encoded, and
    /// whether the cursor is exhausted after it.
    pub(crate) fn next_batch(&mut self, max: usize) -> CmdResult<(Vec<RawDocumentBuf>, bool)> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max {
            let Some(d) = self.pull()? else {
                return Ok((out, true));
            };
            let len = d.as_bytes().len();
            if !out.is_empty() && bytes + len > BATCH_BYTES {
                self.ahead = Some(d);
                return Ok((out, false));
            }
            bytes += len;
            out.push(d);
        }
        self.ahead = self.pull()?;
        Ok((out, self.ahead.is_none()))
    }
}

/// `{ cursor: { firstBatch | nextBatch: [...], id, ns, atClusterTime? }, ok: 1 }` built
/// from encoded documents.
fn batch_reply(
    first: bool,
    docs: Vec<RawDocumentBuf>,
    id: i64,
    ns: &str,
    read_time: Option<Timestamp>,
) -> RawDocumentBuf {
    let mut batch = RawArrayBuf::new();
    for d in docs {
        batch.push(d);
    }
    let mut cursor = RawDocumentBuf::new();
    if first {
        cursor.append(cstr!("firstBatch"), batch);
    } else {
        cursor.append(cstr!("nextBatch"), batch);
    }
    cursor.append(cstr!("id"), id);
    cursor.append(cstr!("ns"), ns);
    if let Some(at) = read_time {
        cursor.append(cstr!("atClusterTime"), at);
    }
    let mut reply = RawDocumentBuf::new();
    reply.append(cstr!("cursor"), cursor);
    reply.append(cstr!("ok"), 1.0);
    reply
}

/// A reply with a first batch, leaving a cursor open for the rest (computed results:
/// listings).
pub(crate) fn cursor_reply(
    state: &mut State,
    ns: String,
    docs: VecDeque<Document>,
    batch: usize,
    single: bool,
) -> CmdResult {
    let open = OpenCursor {
        cursor: DocCursor::ready(ns, docs),
        batch,
        single,
    };
    let reply = open.read(|c| state.add_cursor(Cursor::Docs(Box::new(c))))?;
    super::from_raw(&reply)
}

/// A cursor whose first batch is still to be read (with no lock held).
#[derive(Debug)]
pub(crate) struct OpenCursor {
    /// The cursor.
    pub(crate) cursor: DocCursor,
    /// The first batch's size.
    pub(crate) batch: usize,
    /// Whether the first batch is the only one.
    pub(crate) single: bool,
}

impl OpenCursor {
    /// Reads the first batch and answers it; `register` keeps the cursor for the rest (if
    /// any remains) and gives its id.
    pub(crate) fn read(
        mut self,
        register: impl FnOnce(DocCursor) -> i64,
    ) -> CmdResult<RawDocumentBuf> {
        let (docs, done) = self.cursor.next_batch(self.batch)?;
        let (ns, read_time) = (self.cursor.ns.clone(), self.cursor.read_time);
        let id = if done || self.single {
            0
        } else {
            register(self.cursor)
        };
        Ok(batch_reply(true, docs, id, &ns, read_time))
    }
}

/// `getMore` on a plain cursor checked out of the registry: the next batch, and the
/// cursor back when more remains.
pub(crate) fn get_more_docs(
    mut cursor: DocCursor,
    id: i64,
    batch: Option<usize>,
) -> (CmdResult<RawDocumentBuf>, Option<DocCursor>) {
    let (next, done) = match cursor.next_batch(batch.unwrap_or(usize::MAX)) {
        Ok(b) => b,
        Err(e) => return (Err(e), None),
    };
    let reply = batch_reply(false, next, if done { 0 } else { id }, &cursor.ns, None);
    (Ok(reply), (!done).then_some(cursor))
}

/// `killCursors`.
pub(crate) fn kill_cursors(state: &mut State, cmd: &Document) -> CmdResult {
    let Some(Bson::Array(ids)) = cmd.get("cursors") else {
        return Err(CmdError::type_mismatch("cursors", "array"));
    };
    let mut killed = Vec::new();
    let mut not_found = Vec::new();
    for id in ids {
        let id = match id {
            Bson::Int64(n) => *n,
            Bson::Int32(n) => i64::from(*n),
            _ => continue,
        };
        if state.cursors.remove(&id).is_some() {
            killed.push(Bson::Int64(id));
        } else {
            not_found.push(Bson::Int64(id));
        }
    }
    Ok(doc! {
        "cursorsKilled": killed,
        "cursorsNotFound": not_found,
        "cursorsAlive": [],
        "cursorsUnknown": [],
        "ok": 1.0,
    })
}

/// A parsed `getMore`.
#[derive(Debug)]
pub(crate) struct GetMore {
    /// The cursor.
    pub(crate) id: i64,
    /// `batchSize`, if given and positive.
    pub(crate) batch: Option<usize>,
    /// `maxTimeMS`, if given: how long an awaitData cursor (a change stream) may wait.
    pub(crate) max_time: Option<Duration>,
}

/// How long a change stream's `getMore` waits for an event when `maxTimeMS` is absent.
pub(crate) const DEFAULT_AWAIT: Duration = Duration::from_secs(1);

impl GetMore {
    /// Validates a `getMore` command as the server does.
    pub(crate) fn parse(cmd: &Document) -> CmdResult<Self> {
        let id = match cmd.get("getMore") {
            Some(Bson::Int64(n)) => *n,
            _ => return Err(CmdError::type_mismatch("getMore", "long")),
        };
        let batch = match get_number(cmd, "batchSize")? {
            None | Some(0) => None,
            Some(n) if n < 0 => {
                return Err(CmdError::new(
                    code::BAD_VALUE,
                    format!("Batch size for getMore must be positive, but received: {n}"),
                ));
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let max_time = match get_number(cmd, "maxTimeMS")? {
            None => None,
            Some(n) if !(0..=i64::from(i32::MAX)).contains(&n) => {
                return Err(CmdError::new(
                    code::BAD_VALUE,
                    format!("{n} value for maxTimeMS is out of range [0, {}]", i32::MAX),
                ));
            }
            Some(n) => Some(Duration::from_millis(n.unsigned_abs())),
        };
        Ok(Self {
            id,
            batch,
            max_time,
        })
    }
}

fn get_number(cmd: &Document, field: &str) -> CmdResult<Option<i64>> {
    match cmd.get(field) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Int32(n)) => Ok(Some(i64::from(*n))),
        Some(Bson::Int64(n)) => Ok(Some(*n)),
        Some(Bson::Double(n)) if n.fract() == 0.0 => Ok(Some(*n as i64)),
        Some(_) => Err(CmdError::type_mismatch(field, "long")),
    }
}

/// What one look at a `getMore` decided.
#[derive(Debug)]
pub(crate) enum Step {
    /// Answer with this.
    Reply(CmdResult<RawDocumentBuf>),
    /// A plain cursor checked out: read its next batch with no lock held, then return it.
    Read(Box<DocCursor>, Option<usize>),
    /// A change stream with nothing new yet: wait for the oplog to grow or the deadline.
    Wait,
    /// A change stream with more of the log to scan: look again once the lock is free.
    Yield,
    /// Close the connection without answering (a fail point asked for it).
    Close,
}

/// One look at a `getMore`: `first` on the look that checks the cursor out (fail points
/// fire there), `expired` once the wait is over (an empty batch is the answer).
pub(crate) fn get_more(state: &mut State, req: &GetMore, first: bool, expired: bool) -> Step {
    let stream = match state.cursors.get(&req.id) {
        None => {
            return Step::Reply(Err(CmdError::new(
                code::CURSOR_NOT_FOUND,
                format!("cursor id {} not found", req.id),
            )));
        }
        Some(Cursor::Stream(_)) => true,
        Some(Cursor::Docs(_)) => false,
    };
    if !stream && req.max_time.is_some() {
        return Step::Reply(Err(CmdError::bad_value(
            "cannot set maxTimeMS on getMore command for a non-awaitData cursor",
        )));
    }
    let failure = match state.faults.stepdown_error("getMore") {
        Some(e) => Some((e, false)),
        None if first => state.faults.check_get_more(),
        None => None,
    };
    if let Some((error, close)) = failure {
        // A failed getMore kills its cursor, as on the server.
        state.cursors.remove(&req.id);
        if close {
            return Step::Close;
        }
        return Step::Reply(Err(if stream {
            crate::error::label_change_stream_error(error)
        } else {
            error
        }));
    }
    if !stream {
        return match state.cursors.remove(&req.id) {
            Some(Cursor::Docs(c)) => Step::Read(c, req.batch),
            _ => Step::Reply(Err(CmdError::new(
                code::CURSOR_NOT_FOUND,
                format!("cursor id {} not found", req.id),
            ))),
        };
    }
    match super::changestreams::stream_get_more(state, req, expired) {
        Ok(super::changestreams::StreamLook::Batch(reply)) => Step::Reply(Ok(reply)),
        Ok(super::changestreams::StreamLook::Wait) => Step::Wait,
        Ok(super::changestreams::StreamLook::Yield) => Step::Yield,
        Err(e) => Step::Reply(Err(crate::error::label_change_stream_error(e))),
    }
}
