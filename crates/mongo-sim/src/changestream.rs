//! Change streams: opening at a position, turning oplog entries into events shaped as
//! MongoDB documents them, user pipeline stages, invalidation, resume tokens and
//! post-batch resume tokens.
//!
//! Tokens are `{ _data: <hex> }` with the hex of: `82`, the entry's cluster time (seconds
//! and increment, 8 hex digits each), its sequence number (16 hex digits) and a phase
//! (2 hex digits: `00` the entry's event, `01` the invalidate that follows it, `02` the
//! high-water mark after it). Equal-length upper-case hex sorts like the positions.

use bson::{Bson, Document, RawDocumentBuf, Timestamp, doc};

use crate::{
    catalog::{Catalog, is_internal_db, lookup},
    error::{CmdError, CmdResult, code},
    oplog::{Op, Oplog, OplogEntry},
    pipeline::{Context, Stage, apply_to_document, parse_pipeline},
    update::{Comp, ambiguous, dotted},
};

/// What a stream watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// One collection.
    Collection(String, String),
    /// Every collection of a database.
    Database(String),
    /// The whole deployment.
    Cluster,
}

/// `fullDocument` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FullDocument {
    /// Inserts and replaces only.
    Default,
    /// Updates look the current document up.
    UpdateLookup,
    /// The recorded post-image, or null.
    WhenAvailable,
    /// The recorded post-image, or an error.
    Required,
}

/// `fullDocumentBeforeChange` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BeforeChange {
    /// No pre-image.
    Off,
    /// The recorded pre-image, or null.
    WhenAvailable,
    /// The recorded pre-image, or an error.
    Required,
}

const PHASE_EVENT: u8 = 0;
const PHASE_INVALIDATE: u8 = 1;
const PHASE_HWM: u8 = 2;

/// Builds a token.
pub(crate) fn token(ts: Timestamp, seq: u64, phase: u8) -> Document {
    doc! { "_data": format!("82{:08X}{:08X}{:016X}{:02X}", ts.time, ts.increment, seq, phase) }
}

/// A position read back from a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    /// The cluster time it names.
    pub(crate) ts: Timestamp,
    /// The oplog entry.
    pub(crate) seq: u64,
    /// `PHASE_EVENT`, `PHASE_INVALIDATE` or `PHASE_HWM`.
    pub(crate) phase: u8,
    /// For a fragment of a split event: its index (from 0; `splitEvent.fragment` - 1).
    pub(crate) fragment: Option<u16>,
}

impl Position {
    /// The token naming this position.
    pub(crate) fn token(&self) -> Document {
        match self.fragment {
            None => token(self.ts, self.seq, self.phase),
            Some(f) => fragment_token(self.ts, self.seq, f),
        }
    }
}

/// The token of the fragment with index `fragment` (from 0) of the event at `seq`: the event's token with
/// the fragment number appended, so it sorts after the event's own and before the next.
pub(crate) fn fragment_token(ts: Timestamp, seq: u64, fragment: u16) -> Document {
    doc! { "_data": format!("82{:08X}{:08X}{:016X}{:02X}{:04X}", ts.time, ts.increment, seq, PHASE_EVENT, fragment) }
}

fn hex_u64(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

/// Reads a token back. Anything but this simulator's own shape (`82`, then hex digits
/// only) is InvalidResumeToken (260).
fn parse_token(token: &Bson) -> CmdResult<Position> {
    let bad = || {
        CmdError::new(
            code::INVALID_RESUME_TOKEN,
            format!("malformed resume token: {token}"),
        )
    };
    let Bson::Document(d) = token else {
        return Err(bad());
    };
    let Ok(data) = d.get_str("_data") else {
        return Err(bad());
    };
    // Checked first, so the fixed offsets below always fall on character boundaries.
    if !data.bytes().all(|b| b.is_ascii_hexdigit())
        || !matches!(data.len(), 36 | 40)
        || !data.starts_with("82")
    {
        return Err(bad());
    }
    let field = |from: usize, to: usize| data.get(from..to).and_then(hex_u64).ok_or_else(bad);
    let time = u32::try_from(field(2, 10)?).map_err(|_| bad())?;
    let increment = u32::try_from(field(10, 18)?).map_err(|_| bad())?;
    let seq = field(18, 34)?;
    let phase = u8::try_from(field(34, 36)?).map_err(|_| bad())?;
    let fragment = match data.len() {
        40 => Some(u16::try_from(field(36, 40)?).map_err(|_| bad())?),
        _ => None,
    };
    if phase > PHASE_HWM || (fragment.is_some() && phase != PHASE_EVENT) {
        return Err(bad());
    }
    Ok(Position {
        ts: Timestamp { time, increment },
        seq,
        phase,
        fragment,
    })
}

/// `(time, increment)`, for ordering timestamps.
pub(crate) fn ts_key(ts: Timestamp) -> (u32, u32) {
    (ts.time, ts.increment)
}

fn token_not_found(token: &Document) -> CmdError {
    CmdError::new(
        code::CHANGE_STREAM_FATAL_ERROR,
        format!("cannot resume stream; the resume token was not found. {token}"),
    )
}

/// An open change stream.
#[derive(Debug)]
pub(crate) struct StreamCursor {
    /// `ns` for replies.
    pub(crate) ns: String,
    scope: Scope,
    full_document: FullDocument,
    before: BeforeChange,
    show_expanded: bool,
    stages: Vec<Stage>,
    /// The last entry fully consumed.
    after: u64,
    /// An entry whose invalidate event is owed next.
    invalidate_pending: Option<u64>,
    /// A resume token ahead of the log: checked when the log reaches it.
    awaiting: Option<Position>,
    /// `$changeStreamSplitLargeEvent` was asked for: events over 16 MiB become fragments.
    split: bool,
    /// Resumed after fragment `.1` (from 0) of the event at `.0`: the fragments up to it
    /// are not shown again.
    resume_fragment: Option<(u64, u16)>,
    /// Events or fragments read from the log but not yet returned.
    pending: std::collections::VecDeque<RawDocumentBuf>,
    /// The stream has been invalidated (the cursor closes).
    pub(crate) closed: bool,
    /// Set when the last look scanned [`SCAN_PER_LOOK`] entries and found nothing to
    /// return: the server lock is let go before it scans on.
    pub(crate) yielded: bool,
}

/// What the client asked for in `$changeStream`.
pub(crate) struct OpenRequest<'a> {
    /// The database the command ran on.
    pub(crate) db: &'a str,
    /// The `aggregate` field: a collection name or `1`.
    pub(crate) target: &'a Bson,
    /// The `$changeStream` stage's options.
    pub(crate) spec: &'a Document,
    /// The stages after `$changeStream`.
    pub(crate) rest: &'a [Bson],
}

impl StreamCursor {
    /// Validates a `$changeStream` request and positions the stream.
    pub(crate) fn open(log: &Oplog, req: OpenRequest<'_>) -> CmdResult<Self> {
        let mut full_document = FullDocument::Default;
        let mut before = BeforeChange::Off;
        let mut show_expanded = false;
        let mut all_for_cluster = false;
        let mut start: Option<(&str, &Bson)> = None;
        for (k, v) in req.spec {
            match k.as_str() {
                "fullDocument" => {
                    full_document = match option_str(k, v)? {
                        "default" => FullDocument::Default,
                        "updateLookup" => FullDocument::UpdateLookup,
                        "whenAvailable" => FullDocument::WhenAvailable,
                        "required" => FullDocument::Required,
                        other => return Err(bad_enum(k, other)),
                    }
                }
                "fullDocumentBeforeChange" => {
                    before = match option_str(k, v)? {
                        "off" => BeforeChange::Off,
                        "whenAvailable" => BeforeChange::WhenAvailable,
                        "required" => BeforeChange::Required,
                        other => return Err(bad_enum(k, other)),
                    }
                }
                "showExpandedEvents" => show_expanded = option_bool(k, v)?,
                "allChangesForCluster" => all_for_cluster = option_bool(k, v)?,
                "allowToRunOnConfigDB" | "allowToRunOnSystemNS" => {
                    return Err(CmdError::new(
                        40415,
                        format!(
                            "BSON field '$changeStream.{k}' is an internal option: mongo-sim refuses it"
                        ),
                    ));
                }
                "resumeAfter" | "startAfter" => {
                    if !matches!(v, Bson::Document(_)) {
                        return Err(CmdError::type_mismatch(
                            &format!("$changeStream.{k}"),
                            "object",
                        ));
                    }
                    if start.is_some() {
                        return Err(CmdError::new(
                            40674,
                            "Only one type of resume option is allowed, but multiple were found.",
                        ));
                    }
                    start = Some((k.as_str(), v));
                }
                "startAtOperationTime" => {
                    if start.is_some() {
                        return Err(CmdError::new(
                            40674,
                            "Only one type of resume option is allowed, but multiple were found.",
                        ));
                    }
                    start = Some((k.as_str(), v));
                }
                other => {
                    return Err(CmdError::new(
                        40415,
                        format!("BSON field '$changeStream.{other}' is an unknown field."),
                    ));
                }
            }
        }
        let internal = matches!(req.db, "config" | "local")
            || (req.db == "admin" && matches!(req.target, Bson::String(_)));
        if internal {
            return Err(CmdError::new(
                code::INVALID_NAMESPACE,
                format!(
                    "$changeStream may not be opened on the internal {} database",
                    req.db
                ),
            ));
        }
        if let Bson::String(coll) = req.target
            && coll.starts_with("system.")
        {
            return Err(CmdError::new(
                code::INVALID_NAMESPACE,
                format!(
                    "$changeStream may not be opened on the internal {}.{coll} collection",
                    req.db
                ),
            ));
        }
        let (scope, ns) = match (req.target, all_for_cluster) {
            (Bson::String(coll), false) => (
                Scope::Collection(req.db.to_owned(), coll.clone()),
                format!("{}.{}", req.db, coll),
            ),
            (Bson::String(_), true) => {
                return Err(CmdError::bad_value(
                    "allChangesForCluster is only allowed on aggregate: 1 against admin",
                ));
            }
            (_, true) if req.db == "admin" => (Scope::Cluster, "admin.$cmd.aggregate".to_owned()),
            (_, false) if req.db == "admin" => {
                return Err(CmdError::new(
                    73,
                    "$changeStream on the admin database requires allChangesForCluster: true",
                ));
            }
            (_, true) => {
                return Err(CmdError::bad_value(
                    "allChangesForCluster is only allowed on the admin database",
                ));
            }
            (_, false) => (
                Scope::Database(req.db.to_owned()),
                format!("{}.$cmd.aggregate", req.db),
            ),
        };
        let (rest, split) = split_stage(req.rest)?;
        let stages = parse_pipeline(rest, Context::ChangeStream)?;
        let mut cursor = Self {
            ns,
            scope,
            full_document,
            before,
            show_expanded,
            stages,
            after: log.head_seq(),
            invalidate_pending: None,
            awaiting: None,
            split,
            resume_fragment: None,
            pending: std::collections::VecDeque::new(),
            closed: false,
            yielded: false,
        };
        match start {
            None => {}
            Some(("startAtOperationTime", ts)) => {
                let Bson::Timestamp(ts) = ts else {
                    return Err(CmdError::type_mismatch(
                        "$changeStream.startAtOperationTime",
                        "timestamp",
                    ));
                };
                if log
                    .dropped_upto
                    .is_some_and(|d| (d.time, d.increment) >= (ts.time, ts.increment))
                {
                    return Err(history_lost());
                }
                cursor.after = log
                    .entries
                    .iter()
                    .take_while(|e| (e.ts.time, e.ts.increment) < (ts.time, ts.increment))
                    .last()
                    .map_or(log.first_seq() - 1, |e| e.seq);
            }
            Some((kind, token)) => {
                let pos = parse_token(token)?;
                if pos.phase == PHASE_INVALIDATE && kind == "resumeAfter" {
                    return Err(CmdError::new(
                        code::INVALID_RESUME_TOKEN,
                        "Attempting to resume a change stream using 'resumeAfter' is not allowed from an invalidate notification.",
                    ));
                }
                // The server resumes by finding the token's own entry (the oplog must still
                // hold it: its oldest entry no later than the token), so the history is lost
                // once that entry rolled off, even when what followed it is still there. A
                // token from before the first entry (sequence 0) is fine while none rolled off.
                let first = log.first_seq();
                if pos.seq < first && first > 1 {
                    return Err(history_lost());
                }
                cursor.resume_at(log, pos)?;
            }
        }
        Ok(cursor)
    }

    /// Fills a batch of at most `max` events (and about 16 MB), starting where the stream
    /// stands. Returns the events and the post-batch resume token.
    pub(crate) fn next_batch(
        &mut self,
        log: &Oplog,
        dbs: &Catalog,
        max: usize,
    ) -> CmdResult<(Vec<RawDocumentBuf>, Document)> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut scanned = 0;
        self.yielded = false;
        if self.closed {
            return Ok((out, self.hwm(log)));
        }
        if let Some(pos) = self.awaiting {
            if pos.seq > log.head_seq() {
                if ts_key(log.last_ts) >= ts_key(pos.ts) {
                    return Err(token_not_found(&pos.token()));
                }
                // Still ahead of the log: nothing to show, and the resume point stands.
                return Ok((out, pos.token()));
            }
            self.awaiting = None;
            self.check_event(log, pos)?;
        }
        if self.after + 1 < log.first_seq() {
            return Err(history_lost());
        }
        let last_token = |out: &[RawDocumentBuf], this: &Self| {
            out.last()
                .and_then(|e| e.get_document("_id").ok())
                .and_then(|id| Document::try_from(id).ok())
                .unwrap_or_else(|| this.hwm(log))
        };
        loop {
            // Events (or fragments) read but not yet returned go first; a batch holds at
            // most 16 MiB unless a single event alone is larger.
            while let Some(next) = self.pending.front() {
                let len = next.as_bytes().len();
                if out.len() >= max || (!out.is_empty() && bytes + len > MAX_EVENT_SIZE) {
                    let last = last_token(&out, self);
                    return Ok((out, last));
                }
                bytes += len;
                out.extend(self.pending.pop_front());
            }
            if out.len() >= max || bytes >= MAX_EVENT_SIZE {
                let last = last_token(&out, self);
                return Ok((out, last));
            }
            if let Some(seq) = self.invalidate_pending.take() {
                let ts = log.entry(seq).map_or(log.last_ts, |e| e.ts);
                let wall = log.entry(seq).map_or_else(bson::DateTime::now, |e| e.wall);
                let tok = token(ts, seq, PHASE_INVALIDATE);
                let event = doc! {
                    "_id": tok.clone(),
                    "operationType": "invalidate",
                    "clusterTime": ts,
                    "wallTime": wall,
                };
                self.closed = true;
                if let Some(e) = self.run_stages(event)? {
                    out.push(to_raw(&e)?);
                }
                return Ok((out, tok));
            }
            let Some(entry) = log.entry(self.after + 1) else {
                // Nothing later was scanned: a batch that ends on the last entry's event
                // resumes from that event, its `_id` byte for byte, as the server answers.
                let pbrt = out
                    .last()
                    .and_then(|e| e.get_document("_id").ok())
                    .and_then(|id| Document::try_from(id).ok())
                    .filter(|id| {
                        parse_token(&Bson::Document(id.clone())).is_ok_and(|p| {
                            p.seq == self.after && p.phase == PHASE_EVENT && self.pending.is_empty()
                        })
                    })
                    .unwrap_or_else(|| self.hwm(log));
                return Ok((out, pbrt));
            };
            if scanned >= SCAN_PER_LOOK && out.is_empty() && self.pending.is_empty() {
                self.yielded = true;
                return Ok((out, self.hwm(log)));
            }
            scanned += 1;
            self.after = entry.seq;
            if self.invalidates(entry) {
                self.invalidate_pending = Some(entry.seq);
            }
            let resumed_in_event = self
                .resume_fragment
                .take_if(|(seq, _)| *seq == entry.seq)
                .map(|(_, idx)| idx);
            let event = match self.render(dbs, entry)? {
                Some(event) => self.run_stages(event)?,
                None => None,
            };
            let Some(event) = event else {
                if let Some(idx) = resumed_in_event {
                    return Err(fragment_not_found(entry, idx));
                }
                continue;
            };
            let raw = to_raw(&event)?;
            if raw.as_bytes().len() <= MAX_EVENT_SIZE {
                if let Some(idx) = resumed_in_event {
                    // Resumed after a fragment of an event that no longer needs splitting
                    // (the pipeline changed): the resume point cannot be found.
                    return Err(fragment_not_found(entry, idx));
                }
                self.pending.push_back(raw);
                continue;
            }
            if !self.split {
                return Err(too_large(raw.as_bytes().len(), &event));
            }
            let fragments = split_event(event, entry)?;
            let skip = match resumed_in_event {
                Some(idx) if usize::from(idx) < fragments.len() => usize::from(idx) + 1,
                Some(idx) => return Err(fragment_not_found(entry, idx)),
                None => 0,
            };
            self.pending.extend(fragments.into_iter().skip(skip));
        }
    }

    /// Positions the stream after a resume token, checking it as the server does: an event
    /// token must name an event that is in the log at its time (ChangeStreamFatalError, 280,
    /// when it is not where it should be); a token ahead of the log waits for it; a
    /// high-water mark ahead of the log resumes by its time.
    fn resume_at(&mut self, log: &Oplog, pos: Position) -> CmdResult<()> {
        if pos.phase == PHASE_HWM {
            self.after = if pos.seq <= log.head_seq() {
                pos.seq
            } else {
                Self::last_at_or_before(log, pos.ts)
            };
            return Ok(());
        }
        if pos.seq > log.head_seq() {
            if ts_key(pos.ts) <= ts_key(log.last_ts) {
                // The log has passed the token's time without this event.
                return Err(token_not_found(&pos.token()));
            }
            self.after = log.head_seq();
            self.awaiting = Some(pos);
            return Ok(());
        }
        self.check_event(log, pos)
    }

    /// The resume point is an event the log holds (or just dropped): it must be there.
    fn check_event(&mut self, log: &Oplog, pos: Position) -> CmdResult<()> {
        if let Some(entry) = log.entry(pos.seq) {
            if entry.ts != pos.ts {
                return Err(token_not_found(&pos.token()));
            }
            if pos.phase == PHASE_EVENT && pos.fragment.is_none() && self.invalidates(entry) {
                self.invalidate_pending = Some(pos.seq);
            }
        }
        match pos.fragment {
            None => self.after = pos.seq,
            Some(_) if !self.split => {
                // Only a stream that splits can show the rest of a split event.
                return Err(token_not_found(&pos.token()));
            }
            Some(idx) => {
                // Show the event again, from the fragment after this one.
                self.after = pos.seq - 1;
                self.resume_fragment = Some((pos.seq, idx));
            }
        }
        Ok(())
    }

    /// The newest entry at or before `ts` (the one before the log if none).
    fn last_at_or_before(log: &Oplog, ts: Timestamp) -> u64 {
        log.entries
            .iter()
            .take_while(|e| ts_key(e.ts) <= ts_key(ts))
            .last()
            .map_or(log.first_seq() - 1, |e| e.seq)
    }

    /// The high-water-mark token: after everything scanned.
    fn hwm(&self, log: &Oplog) -> Document {
        let ts = log.entry(self.after).map_or(log.last_ts, |e| e.ts);
        token(ts, self.after, PHASE_HWM)
    }

    fn run_stages(&self, event: Document) -> CmdResult<Option<Document>> {
        let id = event.get("_id").cloned();
        let mut doc = event;
        for stage in &self.stages {
            match apply_to_document(stage, doc)? {
                Some(d) => doc = d,
                None => return Ok(None),
            }
        }
        if doc.get("_id").cloned() != id {
            return Err(CmdError::new(
                code::CHANGE_STREAM_FATAL_ERROR,
                "Encountered an event whose _id field, which contains the resume token, was modified by the pipeline. Modifying the _id field of an event makes it impossible to resume the stream from that point.",
            )
            .with_label("NonResumableChangeStreamError"));
        }
        Ok(Some(doc))
    }

    fn ns_in_scope(&self, db: &str, coll: &str) -> bool {
        match &self.scope {
            Scope::Collection(d, c) => d == db && c == coll,
            Scope::Database(d) => d == db && !coll.starts_with("system."),
            Scope::Cluster => !is_internal_db(db) && !coll.starts_with("system."),
        }
    }

    /// Whether the entry ends this stream (it is followed by an invalidate).
    fn invalidates(&self, entry: &OplogEntry) -> bool {
        match (&self.scope, &entry.op) {
            (Scope::Collection(d, c), Op::Drop) => *d == entry.db && *c == entry.coll,
            (Scope::Collection(d, c), Op::Rename { to_db, to_coll, .. }) => {
                (*d == entry.db && *c == entry.coll) || (d == to_db && c == to_coll)
            }
            (Scope::Database(d), Op::DropDatabase) => *d == entry.db,
            _ => false,
        }
    }

    /// The event an entry shows this stream, before user stages.
    fn render(&self, dbs: &Catalog, entry: &OplogEntry) -> CmdResult<Option<Document>> {
        let ns = doc! { "db": entry.db.clone(), "coll": entry.coll.clone() };
        let visible = match &entry.op {
            Op::Rename { to_db, to_coll, .. } => {
                self.ns_in_scope(&entry.db, &entry.coll) || self.ns_in_scope(to_db, to_coll)
            }
            Op::DropDatabase => match &self.scope {
                Scope::Collection(..) => false,
                Scope::Database(d) => *d == entry.db,
                Scope::Cluster => !is_internal_db(&entry.db),
            },
            Op::Create { .. }
            | Op::CreateIndexes { .. }
            | Op::DropIndexes { .. }
            | Op::ShardCollection { .. }
            | Op::Modify { .. } => self.show_expanded && self.ns_in_scope(&entry.db, &entry.coll),
            _ => self.ns_in_scope(&entry.db, &entry.coll),
        };
        if !visible {
            return Ok(None);
        }
        let mut e = doc! {
            "_id": token(entry.ts, entry.seq, PHASE_EVENT),
            "operationType": op_name(&entry.op),
            "clusterTime": entry.ts,
            "wallTime": entry.wall,
        };
        if self.show_expanded
            && let Some(uuid) = &entry.uuid
        {
            e.insert("collectionUUID", uuid.clone());
        }
        match &entry.op {
            Op::Insert { doc, key } => {
                e.insert("fullDocument", doc.clone());
                e.insert("ns", ns);
                e.insert("documentKey", key.clone());
            }
            Op::Update {
                key,
                delta,
                pre,
                post,
            } => {
                e.insert("ns", ns);
                e.insert("documentKey", key.clone());
                e.insert("updateDescription", self.update_description(delta));
                match self.full_document {
                    FullDocument::Default => {}
                    FullDocument::UpdateLookup => {
                        let current = key
                            .get("_id")
                            .and_then(|id| lookup(dbs, &entry.db, &entry.coll, id))
                            .map(std::sync::Arc::unwrap_or_clone);
                        e.insert("fullDocument", current.map_or(Bson::Null, Bson::Document));
                    }
                    FullDocument::WhenAvailable => {
                        e.insert(
                            "fullDocument",
                            post.clone().map_or(Bson::Null, Bson::Document),
                        );
                    }
                    FullDocument::Required => match post {
                        Some(p) => {
                            e.insert("fullDocument", p.clone());
                        }
                        None => return Err(image_missing("post", entry)),
                    },
                }
                self.add_pre_image(&mut e, pre.as_ref(), entry)?;
            }
            Op::Replace { key, doc, pre } => {
                e.insert("fullDocument", doc.clone());
                e.insert("ns", ns);
                e.insert("documentKey", key.clone());
                self.add_pre_image(&mut e, pre.as_ref(), entry)?;
            }
            Op::Delete { key, pre } => {
                e.insert("ns", ns);
                e.insert("documentKey", key.clone());
                self.add_pre_image(&mut e, pre.as_ref(), entry)?;
            }
            Op::Drop => {
                e.insert("ns", ns);
            }
            Op::Rename {
                to_db,
                to_coll,
                drop_target,
            } => {
                e.insert("ns", ns);
                let to = doc! { "db": to_db.clone(), "coll": to_coll.clone() };
                e.insert("to", to.clone());
                if self.show_expanded {
                    let mut desc = doc! { "to": to };
                    if let Some(uuid) = drop_target {
                        desc.insert("dropTarget", uuid.clone());
                    }
                    e.insert("operationDescription", desc);
                }
            }
            Op::DropDatabase => {
                e.insert("ns", doc! { "db": entry.db.clone() });
            }
            Op::Create { description }
            | Op::Modify { description }
            | Op::ShardCollection { description } => {
                e.insert("ns", ns);
                e.insert("operationDescription", description.clone());
            }
            Op::CreateIndexes { indexes } | Op::DropIndexes { indexes } => {
                e.insert("ns", ns);
                e.insert("operationDescription", doc! { "indexes": indexes.clone() });
            }
        }
        if let Some((lsid, txn_number)) = &entry.txn {
            e.insert("txnNumber", *txn_number);
            e.insert("lsid", lsid.clone());
        }
        Ok(Some(e))
    }

    fn update_description(&self, delta: &crate::update::Delta) -> Document {
        let mut updated = Document::new();
        let mut disambiguated = Document::new();
        let mut note = |path: &Vec<Comp>| {
            if ambiguous(path) {
                let parts: Vec<Bson> = path
                    .iter()
                    .map(|c| match c {
                        Comp::Field(f) => Bson::String(f.clone()),
                        Comp::Index(i) => Bson::Int32(i32::try_from(*i).unwrap_or(i32::MAX)),
                    })
                    .collect();
                disambiguated.insert(dotted(path), parts);
            }
        };
        for (path, value) in &delta.updated {
            updated.insert(dotted(path), value.clone());
            note(path);
        }
        let mut removed = Vec::new();
        for path in &delta.removed {
            removed.push(Bson::String(dotted(path)));
            note(path);
        }
        let truncated: Vec<Bson> = delta
            .truncated
            .iter()
            .map(|(path, size)| {
                note(path);
                Bson::Document(doc! { "field": dotted(path), "newSize": i32::try_from(*size).unwrap_or(i32::MAX) })
            })
            .collect();
        let mut ud = doc! {
            "updatedFields": updated,
            "removedFields": removed,
            "truncatedArrays": truncated,
        };
        if self.show_expanded {
            ud.insert("disambiguatedPaths", disambiguated);
        }
        ud
    }

    fn add_pre_image(
        &self,
        e: &mut Document,
        pre: Option<&Document>,
        entry: &OplogEntry,
    ) -> CmdResult<()> {
        match (self.before, pre) {
            (BeforeChange::Off, _) => {}
            (BeforeChange::WhenAvailable, pre) => {
                e.insert(
                    "fullDocumentBeforeChange",
                    pre.cloned().map_or(Bson::Null, Bson::Document),
                );
            }
            (BeforeChange::Required, Some(pre)) => {
                e.insert("fullDocumentBeforeChange", pre.clone());
            }
            (BeforeChange::Required, None) => return Err(image_missing("pre", entry)),
        }
        Ok(())
    }
}

/// Encodes a document; only a document over BSON's limits can fail.
pub(crate) fn to_raw(doc: &Document) -> CmdResult<RawDocumentBuf> {
    RawDocumentBuf::try_from(doc)
        .map_err(|e| CmdError::new(10334, format!("BSONObj size is invalid: {e}")))
}

/// A cursor reply: `{ cursor: { <batch_field>: [...], postBatchResumeToken, id, ns }, ok: 1 }`.
pub(crate) fn stream_reply(
    first: bool,
    events: Vec<RawDocumentBuf>,
    pbrt: &Document,
    id: i64,
    ns: &str,
) -> CmdResult<RawDocumentBuf> {
    let batch: bson::RawArrayBuf = events.into_iter().collect();
    let mut cursor = RawDocumentBuf::new();
    if first {
        cursor.append(bson::cstr!("firstBatch"), batch);
    } else {
        cursor.append(bson::cstr!("nextBatch"), batch);
    }
    cursor.append(bson::cstr!("postBatchResumeToken"), to_raw(pbrt)?);
    cursor.append(bson::cstr!("id"), id);
    cursor.append(bson::cstr!("ns"), ns);
    let mut reply = RawDocumentBuf::new();
    reply.append(bson::cstr!("cursor"), cursor);
    reply.append(bson::cstr!("ok"), 1.0);
    Ok(reply)
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Insert { .. } => "insert",
        Op::Update { .. } => "update",
        Op::Replace { .. } => "replace",
        Op::Delete { .. } => "delete",
        Op::Drop => "drop",
        Op::Rename { .. } => "rename",
        Op::DropDatabase => "dropDatabase",
        Op::Create { .. } => "create",
        Op::CreateIndexes { .. } => "createIndexes",
        Op::DropIndexes { .. } => "dropIndexes",
        Op::Modify { .. } => "modify",
        Op::ShardCollection { .. } => "shardCollection",
    }
}

/// The largest event (and the largest fragment) a stream returns: BSONObjMaxUserSize.
const MAX_EVENT_SIZE: usize = crate::wire::MAX_BSON_OBJECT_SIZE;

/// How many oplog entries one look of a change stream scans with nothing to return before
/// it lets the server lock go (a stream filtered to a quiet collection catching up on a
/// long log would otherwise hold every writer up for the whole scan).
pub(crate) const SCAN_PER_LOOK: usize = 4096;

/// The stage that asks for large events to be split.
const SPLIT_STAGE: &str = "$changeStreamSplitLargeEvent";

/// Takes `$changeStreamSplitLargeEvent` off the end of the user's stages. It may appear
/// once, last, with an empty specification (7182802 otherwise, as on the server).
fn split_stage(rest: &[Bson]) -> CmdResult<(&[Bson], bool)> {
    let is_split = |s: &Bson| matches!(s, Bson::Document(d) if d.contains_key(SPLIT_STAGE));
    let count = rest.iter().filter(|s| is_split(s)).count();
    match rest.split_last() {
        _ if count == 0 => Ok((rest, false)),
        Some((last, before)) if count == 1 && is_split(last) => {
            match last.as_document().and_then(|d| d.get(SPLIT_STAGE)) {
                Some(Bson::Document(spec)) if spec.is_empty() => Ok((before, true)),
                _ => Err(CmdError::new(
                    code::FAILED_TO_PARSE,
                    "$changeStreamSplitLargeEvent must take an empty document: { $changeStreamSplitLargeEvent: {} }",
                )),
            }
        }
        _ => Err(CmdError::new(
            7_182_802,
            "$changeStreamSplitLargeEvent can only appear once, as the last stage of the pipeline",
        )),
    }
}

/// An event over 16 MiB on a stream without `$changeStreamSplitLargeEvent`.
fn too_large(size: usize, event: &Document) -> CmdError {
    CmdError::new(
        code::BSON_OBJECT_TOO_LARGE,
        format!(
            "BSONObj size: {size} ({size:#X}) is invalid. Size must be between 0 and 16793600(16MB) First element: _id: {}",
            event
                .get("_id")
                .map(ToString::to_string)
                .unwrap_or_default()
        ),
    )
}

fn fragment_not_found(entry: &OplogEntry, idx: u16) -> CmdError {
    token_not_found(&fragment_token(entry.ts, entry.seq, idx))
}

/// Splits an event over 16 MiB into fragments of at most 16 MiB, as the server does: by
/// top-level fields only, smallest first so the first fragment carries the most fields
/// (the event's context); each fragment gets `_id` (the fragment's resume token) and
/// `splitEvent: { fragment, of }`. A single field that cannot fit is BSONObjectTooLarge.
fn split_event(event: Document, entry: &OplogEntry) -> CmdResult<Vec<RawDocumentBuf>> {
    // What every fragment carries besides its fields: framing, `_id`, `splitEvent`.
    let overhead = to_raw(&doc! {
        "_id": fragment_token(entry.ts, entry.seq, u16::MAX),
        "splitEvent": { "fragment": i32::MAX, "of": i32::MAX },
    })?
    .as_bytes()
    .len();
    let budget = MAX_EVENT_SIZE - overhead;
    let mut fields: Vec<(usize, String, Bson)> = Vec::new();
    for (key, value) in event {
        if key == "_id" {
            continue;
        }
        let size = to_raw(&doc! { key.clone(): value.clone() })?
            .as_bytes()
            .len()
            - 5;
        fields.push((size, key, value));
    }
    fields.sort_by_key(|(size, ..)| *size);
    let mut groups: Vec<(usize, Vec<(String, Bson)>)> = Vec::new();
    for (size, key, value) in fields {
        if size > budget {
            return Err(CmdError::new(
                code::BSON_OBJECT_TOO_LARGE,
                format!(
                    "the field '{key}' alone ({size} bytes) is too large to fit in a change stream event fragment"
                ),
            ));
        }
        match groups.last_mut() {
            Some((used, group)) if *used + size <= budget => {
                *used += size;
                group.push((key, value));
            }
            _ => groups.push((size, vec![(key, value)])),
        }
    }
    let of = i32::try_from(groups.len()).unwrap_or(i32::MAX);
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (_, group))| {
            let idx = u16::try_from(i).unwrap_or(u16::MAX);
            let mut fragment = doc! {
                "_id": fragment_token(entry.ts, entry.seq, idx),
                "splitEvent": { "fragment": i32::from(idx) + 1, "of": of },
            };
            fragment.extend(group);
            to_raw(&fragment)
        })
        .collect()
}

/// A `$changeStream` option that must be a string.
fn option_str<'v>(name: &str, v: &'v Bson) -> CmdResult<&'v str> {
    v.as_str()
        .ok_or_else(|| CmdError::type_mismatch(&format!("$changeStream.{name}"), "string"))
}

/// A `$changeStream` option that must be a boolean.
fn option_bool(name: &str, v: &Bson) -> CmdResult<bool> {
    v.as_bool()
        .ok_or_else(|| CmdError::type_mismatch(&format!("$changeStream.{name}"), "bool"))
}

/// An enumerated option with a value it does not know.
fn bad_enum(name: &str, value: &str) -> CmdError {
    CmdError::bad_value(format!(
        "Enumeration value '{value}' for field '$changeStream.{name}' is not a valid value."
    ))
}

fn history_lost() -> CmdError {
    CmdError::new(
        code::CHANGE_STREAM_HISTORY_LOST,
        "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
    )
}

fn image_missing(which: &str, entry: &OplogEntry) -> CmdError {
    CmdError::new(
        code::NO_MATCHING_DOCUMENT,
        format!(
            "Change stream was configured to require a {which}-image for all update, delete and replace events, but the {which}-image was not found for the event at {} in {}.{}",
            entry.ts, entry.db, entry.coll
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_sort_like_positions_and_parse_back() {
        let a = token(
            Timestamp {
                time: 5,
                increment: 9,
            },
            10,
            PHASE_EVENT,
        );
        let b = token(
            Timestamp {
                time: 5,
                increment: 9,
            },
            10,
            PHASE_INVALIDATE,
        );
        let c = token(
            Timestamp {
                time: 6,
                increment: 1,
            },
            11,
            PHASE_EVENT,
        );
        let data = |d: &Document| d.get_str("_data").unwrap().to_owned();
        assert!(data(&a) < data(&b) && data(&b) < data(&c));
        let pos = parse_token(&Bson::Document(b.clone())).unwrap();
        assert_eq!(
            (pos.ts.time, pos.ts.increment, pos.seq, pos.phase),
            (5, 9, 10, PHASE_INVALIDATE)
        );
        assert!(parse_token(&Bson::Document(doc! { "_data": "nope" })).is_err());
        // Multi-byte characters of the right byte length are refused, not sliced.
        let multi = format!("82{}", "é".repeat(17));
        assert_eq!(multi.len(), 36);
        let err = parse_token(&Bson::Document(doc! { "_data": multi })).unwrap_err();
        assert_eq!(err.code, code::INVALID_RESUME_TOKEN);
        // A fragment token sorts between its event's token and the next event's.
        let f = fragment_token(
            Timestamp {
                time: 5,
                increment: 9,
            },
            10,
            2,
        );
        assert!(data(&a) < data(&f) && data(&f) < data(&b));
        assert_eq!(parse_token(&Bson::Document(f)).unwrap().fragment, Some(2));
    }
}
