//! What the server knows about itself for `serverStatus`, `currentOp` and `getLog`: the
//! operation counters, the operations in progress and the recent log lines.

use std::collections::{BTreeMap, VecDeque};

use bson::{Document, doc};

/// `serverStatus.opcounters`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct OpCounters {
    /// Documents inserted.
    pub(crate) insert: i64,
    /// `find` commands.
    pub(crate) query: i64,
    /// Update statements.
    pub(crate) update: i64,
    /// Delete statements.
    pub(crate) delete: i64,
    /// `getMore` commands.
    pub(crate) getmore: i64,
    /// Every other command.
    pub(crate) command: i64,
}

impl OpCounters {
    /// Counts one command as the server does.
    pub(crate) fn count(&mut self, name: &str, cmd: &Document) {
        let statements = |field: &str| {
            cmd.get_array(field)
                .map_or(1, |a| i64::try_from(a.len()).unwrap_or(i64::MAX))
        };
        match name {
            "insert" => self.insert += statements("documents"),
            "update" => self.update += statements("updates"),
            "delete" => self.delete += statements("deletes"),
            "find" => self.query += 1,
            "getMore" => self.getmore += 1,
            _ => self.command += 1,
        }
    }

    /// The `opcounters` section.
    pub(crate) fn to_document(self) -> Document {
        doc! {
            "insert": self.insert,
            "query": self.query,
            "update": self.update,
            "delete": self.delete,
            "getmore": self.getmore,
            "command": self.command,
        }
    }
}

/// An operation in progress, as `currentOp` lists it.
#[derive(Clone, Debug)]
pub(crate) struct Op {
    /// The connection running it.
    pub(crate) connection_id: i64,
    /// The client's address.
    pub(crate) client: String,
    /// The client's application name.
    pub(crate) app_name: Option<String>,
    /// The command's name.
    pub(crate) name: String,
    /// `db.collection` (or `db.$cmd`).
    pub(crate) ns: String,
    /// The command, with bulky arrays (`documents`, `updates`, `deletes`, `pipeline`)
    /// summarised by their length.
    pub(crate) command: Document,
    /// When it started.
    pub(crate) started: std::time::Instant,
}

/// How many recent log lines `getLog` keeps (the server's RAM log holds 1,024).
const LOG_LINES: usize = 1024;

/// Operations in progress and recent log lines.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// By operation id.
    pub(crate) ops: BTreeMap<i64, Op>,
    next_opid: i64,
    /// The `global` RAM log, newest last, as structured JSON lines.
    pub(crate) log: VecDeque<String>,
    /// Lines ever written to the `global` log.
    pub(crate) log_written: i64,
    /// Operation counters.
    pub(crate) counters: OpCounters,
}

impl Activity {
    /// Registers an operation and returns its id.
    pub(crate) fn begin(&mut self, op: Op) -> i64 {
        self.next_opid += 1;
        self.ops.insert(self.next_opid, op);
        self.next_opid
    }

    /// Ends an operation.
    pub(crate) fn end(&mut self, opid: i64) {
        self.ops.remove(&opid);
    }

    /// Writes a line to the `global` log in the server's structured JSON form.
    pub(crate) fn log(&mut self, component: &str, id: i32, ctx: &str, msg: &str, attr: Document) {
        let line = doc! {
            "t": { "$date": bson::DateTime::now().try_to_rfc3339_string().unwrap_or_default() },
            "s": "I",
            "c": component,
            "id": id,
            "ctx": ctx,
            "msg": msg,
            "attr": attr,
        };
        let json = bson::Bson::Document(line)
            .into_relaxed_extjson()
            .to_string();
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(json);
        self.log_written += 1;
    }
}

/// The command as `currentOp` shows it: bulky arrays become their length.
pub(crate) fn summarise(cmd: &Document) -> Document {
    cmd.iter()
        .map(|(k, v)| match (k.as_str(), v) {
            ("documents" | "updates" | "deletes" | "pipeline", bson::Bson::Array(a)) => (
                k.clone(),
                bson::Bson::String(format!("[{} items]", a.len())),
            ),
            _ => (k.clone(), v.clone()),
        })
        .collect()
}
