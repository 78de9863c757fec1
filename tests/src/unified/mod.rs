//! A runner for MongoDB's unified test format, covering what the change-stream spec tests
//! use. It is generic: any directory of unified-format change-stream tests runs the same
//! way. Each test runs against a fresh mongo-sim, or against the deployment at a URI.
//!
//! A test that uses an operation, argument, entity option or matcher this runner does not
//! implement fails with that reason: nothing unsupported passes silently.

mod matching;

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use bson::{Bson, Document, doc};
use futures_util::TryStreamExt;
use mongo_sim::MongoSim;
use mongodb::{
    Client, Collection, Database,
    change_stream::ChangeStream,
    error::{Error, ErrorKind, WriteFailure},
    event::{EventHandler, command::CommandEvent},
    options::{ClientOptions, FullDocumentBeforeChangeType, FullDocumentType},
};

pub use matching::{match_document, matches};

/// The verdict on one test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every assertion held.
    Pass,
    /// The first mismatch or error.
    Fail(String),
    /// A requirement that does not apply to the target, named.
    Skip(String),
}

/// One test's result.
#[derive(Debug, Clone)]
pub struct TestResult {
    /// The file's name.
    pub file: String,
    /// The test's description.
    pub test: String,
    /// What happened.
    pub verdict: Verdict,
}

/// Where tests run.
#[derive(Debug, Clone)]
pub enum Target {
    /// A fresh mongo-sim per test.
    Sim,
    /// A fresh mongo-sim per test, presenting itself as a `mongos` (`--sharded`).
    ShardedSim,
    /// The deployment at this URI.
    Uri(String),
}

/// Facts about the target that requirements are checked against.
#[derive(Debug, Clone)]
struct ServerFacts {
    version: Vec<u32>,
    topology: &'static str,
}

type Failure = String;

fn parse_version(s: &str) -> Vec<u32> {
    s.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

fn version_cmp(a: &[u32], b: &[u32]) -> std::cmp::Ordering {
    for i in 0..a.len().max(b.len()) {
        let c = a.get(i).unwrap_or(&0).cmp(b.get(i).unwrap_or(&0));
        if c.is_ne() {
            return c;
        }
    }
    std::cmp::Ordering::Equal
}

async fn server_facts(client: &Client) -> Result<ServerFacts, Failure> {
    let admin = client.database("admin");
    let build = admin
        .run_command(doc! { "buildInfo": 1 })
        .await
        .map_err(|e| format!("buildInfo: {e}"))?;
    let hello = admin
        .run_command(doc! { "hello": 1 })
        .await
        .map_err(|e| format!("hello: {e}"))?;
    let topology = if hello.get_str("msg").ok() == Some("isdbgrid") {
        "sharded"
    } else if hello.contains_key("setName") {
        "replicaset"
    } else {
        "single"
    };
    Ok(ServerFacts {
        version: parse_version(build.get_str("version").unwrap_or("0")),
        topology,
    })
}

/// Why a list of requirements excludes the target, or `None` if one of them applies.
fn unmet(reqs: Option<&Bson>, facts: &ServerFacts) -> Option<String> {
    let Some(Bson::Array(alternatives)) = reqs else {
        return None;
    };
    let mut reasons = Vec::new();
    for alt in alternatives {
        let Bson::Document(req) = alt else { continue };
        match unmet_one(req, facts) {
            None => return None,
            Some(reason) => reasons.push(reason),
        }
    }
    Some(reasons.join("; or "))
}

fn unmet_one(req: &Document, facts: &ServerFacts) -> Option<String> {
    let shown = facts
        .version
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(".");
    for (k, v) in req {
        let reason = match (k.as_str(), v) {
            ("minServerVersion", Bson::String(min)) => {
                (version_cmp(&facts.version, &parse_version(min)).is_lt())
                    .then(|| format!("needs server >= {min} (target is {shown})"))
            }
            ("maxServerVersion", Bson::String(max)) => {
                (version_cmp(&facts.version, &parse_version(max)).is_gt())
                    .then(|| format!("needs server <= {max} (target is {shown})"))
            }
            ("topologies", Bson::Array(ts)) => {
                (!ts.iter().any(|t| t.as_str() == Some(facts.topology)))
                    .then(|| format!("needs topology {v} (target is {})", facts.topology))
            }
            ("serverless", Bson::String(s)) => {
                (s == "require").then(|| "needs a serverless deployment".to_owned())
            }
            ("auth", Bson::Boolean(true)) => {
                Some("needs authentication (target has none)".to_owned())
            }
            ("auth", Bson::Boolean(false)) => None,
            ("csfle", _) => Some("needs client-side field level encryption".to_owned()),
            (other, _) => Some(format!(
                "requirement `{other}` is not checked by this runner"
            )),
        };
        if reason.is_some() {
            return reason;
        }
    }
    None
}

/// Runs every `*.json` file in `dir` (sorted) and returns one result per test.
///
/// # Errors
/// When the directory or a file cannot be read or parsed.
pub async fn run_dir(dir: &Path, target: &Target) -> Result<Vec<TestResult>, String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut results = Vec::new();
    for path in files {
        results.extend(run_file(&path, target).await?);
    }
    Ok(results)
}

/// Runs one test file.
///
/// # Errors
/// When the file cannot be read or is not a unified test file.
pub async fn run_file(path: &Path, target: &Target) -> Result<Vec<TestResult>, String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{name}: bad JSON: {e}"))?;
    let Bson::Document(file) =
        Bson::try_from(json).map_err(|e| format!("{name}: bad Extended JSON: {e}"))?
    else {
        return Err(format!("{name}: not a JSON object"));
    };
    let tests = file
        .get_array("tests")
        .map_err(|_| format!("{name}: no `tests` array"))?;
    let mut results = Vec::new();
    for test in tests {
        let Bson::Document(test) = test else { continue };
        let description = test
            .get_str("description")
            .unwrap_or("(no description)")
            .to_owned();
        let verdict = match run_test(&file, test, target).await {
            Ok(v) => v,
            Err(reason) => Verdict::Fail(reason),
        };
        results.push(TestResult {
            file: name.clone(),
            test: description,
            verdict,
        });
    }
    Ok(results)
}

/// A client entity: the driver client and the command-started events it observed.
struct ClientEntity {
    client: Client,
    events: Arc<Mutex<Vec<(String, String, Document)>>>,
}

enum Entity {
    Client(ClientEntity),
    Database(Database),
    Collection(Collection<Document>),
    Stream(Box<ChangeStream<Document>>),
}

struct Run {
    uri: String,
    internal: Client,
    entities: HashMap<String, Entity>,
    fail_points: Vec<(Client, String)>,
}

/// Tests that cannot pass through the `mongodb` Rust driver whatever the server does,
/// with the driver's own tracking ticket. The driver's unified runner skips them too.
const DRIVER_LIMITATIONS: &[(&str, &str)] = &[
    (
        "Test with document comment",
        "known limitation of the mongodb Rust driver (RUST-1658): it sends `comment` inside `$changeStream` as well as on the command",
    ),
    (
        "Test with string comment",
        "known limitation of the mongodb Rust driver (RUST-1658): it sends `comment` inside `$changeStream` as well as on the command",
    ),
    (
        "Test that comment is set on getMore",
        "known limitation of the mongodb Rust driver (RUST-1658): it does not send `comment` on `getMore`",
    ),
];

async fn run_test(file: &Document, test: &Document, target: &Target) -> Result<Verdict, Failure> {
    if let Ok(reason) = test.get_str("skipReason") {
        return Ok(Verdict::Skip(format!("skipReason: {reason}")));
    }
    let description = test.get_str("description").unwrap_or_default();
    if let Some((_, reason)) = DRIVER_LIMITATIONS.iter().find(|(d, _)| *d == description) {
        return Ok(Verdict::Skip((*reason).to_owned()));
    }
    let (sim, uri) = match target {
        Target::Sim | Target::ShardedSim => {
            let sim = MongoSim::start_with(mongo_sim::SimOptions {
                sharded: matches!(target, Target::ShardedSim),
                ..mongo_sim::SimOptions::default()
            })
            .await
            .map_err(|e| format!("cannot start mongo-sim: {e}"))?;
            let uri = sim.uri();
            (Some(sim), uri)
        }
        Target::Uri(uri) => (None, uri.clone()),
    };
    let internal = Client::with_uri_str(&uri)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let facts = server_facts(&internal).await?;
    let verdict = if let Some(reason) = unmet(file.get("runOnRequirements"), &facts)
        .or_else(|| unmet(test.get("runOnRequirements"), &facts))
    {
        Verdict::Skip(reason)
    } else {
        let mut run = Run {
            uri,
            internal,
            entities: HashMap::new(),
            fail_points: Vec::new(),
        };
        let outcome = run.execute(file, test).await;
        run.cleanup().await;
        match outcome {
            Ok(()) => Verdict::Pass,
            Err(f) => Verdict::Fail(f),
        }
    };
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
    Ok(verdict)
}

fn args_of(op: &Document) -> Document {
    op.get_document("arguments").cloned().unwrap_or_default()
}

/// Refuses arguments the runner does not implement.
fn only(args: &Document, known: &[&str], op: &str) -> Result<(), Failure> {
    match args.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "{op}: argument `{k}` is not supported by this runner"
        )),
        None => Ok(()),
    }
}

fn server_code(e: &Error) -> Option<(i32, String)> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some((c.code, c.code_name.clone())),
        ErrorKind::Write(WriteFailure::WriteError(w)) => {
            Some((w.code, w.code_name.clone().unwrap_or_default()))
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some((w.code, w.code_name.clone())),
        _ => None,
    }
}

fn check_error(expected: &Document, err: &Error) -> Result<(), Failure> {
    for (k, v) in expected {
        match k.as_str() {
            "isError" => {}
            "isClientError" => {
                let is_client = server_code(err).is_none();
                if Some(is_client) != v.as_bool() {
                    return Err(format!("expected isClientError {v}, got {err}"));
                }
            }
            "errorCode" => {
                let want = match v {
                    Bson::Int32(n) => i64::from(*n),
                    Bson::Int64(n) => *n,
                    _ => return Err("errorCode must be an integer".into()),
                };
                match server_code(err) {
                    Some((code, _)) if i64::from(code) == want => {}
                    _ => return Err(format!("expected error code {want}, got {err}")),
                }
            }
            "errorCodeName" => match server_code(err) {
                Some((_, name)) if Some(name.as_str()) == v.as_str() => {}
                _ => return Err(format!("expected error code name {v}, got {err}")),
            },
            "errorContains" => {
                let needle = v.as_str().unwrap_or_default().to_lowercase();
                if !err.to_string().to_lowercase().contains(&needle) {
                    return Err(format!("expected an error containing {v}, got {err}"));
                }
            }
            "errorLabelsContain" | "errorLabelsOmit" => {
                let Bson::Array(labels) = v else {
                    return Err(format!("{k} must be an array"));
                };
                for label in labels.iter().filter_map(Bson::as_str) {
                    let has = err.contains_label(label);
                    if has != (k == "errorLabelsContain") {
                        return Err(format!(
                            "{k} {label}: labels are {:?} ({err})",
                            err.labels()
                        ));
                    }
                }
            }
            other => {
                return Err(format!(
                    "expectError.{other} is not supported by this runner"
                ));
            }
        }
    }
    Ok(())
}

impl Run {
    async fn execute(&mut self, file: &Document, test: &Document) -> Result<(), Failure> {
        if let Ok(data) = file.get_array("initialData") {
            self.initial_data(data).await?;
        }
        if let Ok(entities) = file.get_array("createEntities") {
            for e in entities {
                let Bson::Document(e) = e else { continue };
                self.create_entity(e).await?;
            }
        }
        let ops = test
            .get_array("operations")
            .map_err(|_| "test has no operations".to_owned())?;
        for (i, op) in ops.iter().enumerate() {
            let Bson::Document(op) = op else { continue };
            let name = op.get_str("name").unwrap_or("?");
            self.operation(op)
                .await
                .map_err(|f| format!("operation {i} ({name}): {f}"))?;
        }
        self.disable_fail_points().await;
        if let Ok(expected) = test.get_array("expectEvents") {
            self.check_events(expected)?;
        }
        if let Ok(outcome) = test.get_array("outcome") {
            self.check_outcome(outcome).await?;
        }
        Ok(())
    }

    async fn initial_data(&self, data: &[Bson]) -> Result<(), Failure> {
        for d in data {
            let Bson::Document(d) = d else { continue };
            let db = self.internal.database(
                d.get_str("databaseName")
                    .map_err(|_| "initialData needs databaseName")?,
            );
            let coll_name = d
                .get_str("collectionName")
                .map_err(|_| "initialData needs collectionName")?;
            let coll = db.collection::<Document>(coll_name);
            coll.drop()
                .await
                .map_err(|e| format!("initialData drop: {e}"))?;
            db.create_collection(coll_name)
                .await
                .map_err(|e| format!("initialData create: {e}"))?;
            let docs: Vec<Document> = d
                .get_array("documents")
                .map(|a| a.iter().filter_map(|x| x.as_document().cloned()).collect())
                .unwrap_or_default();
            if !docs.is_empty() {
                coll.insert_many(docs)
                    .await
                    .map_err(|e| format!("initialData insert: {e}"))?;
            }
        }
        Ok(())
    }

    async fn create_entity(&mut self, e: &Document) -> Result<(), Failure> {
        let (kind, spec) = e.iter().next().ok_or("empty entity")?;
        let Bson::Document(spec) = spec else {
            return Err("entity must be a document".into());
        };
        let id = spec
            .get_str("id")
            .map_err(|_| "entity needs an id")?
            .to_owned();
        let entity = match kind.as_str() {
            "client" => {
                only(
                    spec,
                    &[
                        "id",
                        "observeEvents",
                        "ignoreCommandMonitoringEvents",
                        "useMultipleMongoses",
                        "uriOptions",
                    ],
                    "client",
                )?;
                let mut options = ClientOptions::parse(&self.uri)
                    .await
                    .map_err(|e| format!("client options: {e}"))?;
                if let Ok(uri_options) = spec.get_document("uriOptions")
                    && let Some((k, _)) = uri_options.iter().next()
                {
                    return Err(format!(
                        "client uriOptions `{k}` is not supported by this runner"
                    ));
                }
                let observe: Vec<String> = spec
                    .get_array("observeEvents")
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some(other) = observe.iter().find(|o| *o != "commandStartedEvent") {
                    return Err(format!(
                        "observing `{other}` is not supported by this runner"
                    ));
                }
                let ignore: Vec<String> = spec
                    .get_array("ignoreCommandMonitoringEvents")
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let events = Arc::new(Mutex::new(Vec::new()));
                if !observe.is_empty() {
                    let sink = Arc::clone(&events);
                    options.command_event_handler =
                        Some(EventHandler::callback(move |ev: CommandEvent| {
                            if let CommandEvent::Started(s) = ev {
                                let sensitive = matches!(
                                    s.command_name.as_str(),
                                    "hello"
                                        | "isMaster"
                                        | "saslStart"
                                        | "saslContinue"
                                        | "authenticate"
                                );
                                if !sensitive
                                    && s.command_name != "configureFailPoint"
                                    && !ignore.contains(&s.command_name)
                                {
                                    sink.lock()
                                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                                        .push((s.command_name, s.db, s.command));
                                }
                            }
                        }));
                }
                let client = Client::with_options(options).map_err(|e| format!("client: {e}"))?;
                Entity::Client(ClientEntity { client, events })
            }
            "database" => {
                only(spec, &["id", "client", "databaseName"], "database")?;
                let client = self.client(spec.get_str("client").unwrap_or_default())?;
                Entity::Database(
                    client.database(
                        spec.get_str("databaseName")
                            .map_err(|_| "database needs databaseName")?,
                    ),
                )
            }
            "collection" => {
                only(spec, &["id", "database", "collectionName"], "collection")?;
                let Some(Entity::Database(db)) = self
                    .entities
                    .get(spec.get_str("database").unwrap_or_default())
                else {
                    return Err("collection entity names an unknown database".into());
                };
                Entity::Collection(
                    db.collection(
                        spec.get_str("collectionName")
                            .map_err(|_| "collection needs collectionName")?,
                    ),
                )
            }
            other => {
                return Err(format!(
                    "entity type `{other}` is not supported by this runner"
                ));
            }
        };
        self.entities.insert(id, entity);
        Ok(())
    }

    fn client(&self, id: &str) -> Result<Client, Failure> {
        match self.entities.get(id) {
            Some(Entity::Client(c)) => Ok(c.client.clone()),
            _ => Err(format!("no client entity `{id}`")),
        }
    }

    async fn operation(&mut self, op: &Document) -> Result<(), Failure> {
        let name = op
            .get_str("name")
            .map_err(|_| "operation needs a name")?
            .to_owned();
        let object = op
            .get_str("object")
            .map_err(|_| "operation needs an object")?
            .to_owned();
        let args = args_of(op);
        let result = self.dispatch(&name, &object, &args).await?;
        if op.get_bool("ignoreResultAndError").unwrap_or(false) {
            return Ok(());
        }
        match (result, op.get_document("expectError").ok()) {
            (Err(err), Some(expected)) => check_error(expected, &err),
            (Err(err), None) => Err(format!("unexpected error: {err}")),
            (Ok(_), Some(_)) => Err("expected an error, the operation succeeded".into()),
            (Ok(outcome), None) => {
                if let Some(expected) = op.get("expectResult") {
                    matches(expected, outcome.value.as_ref(), true, "result")?;
                }
                if let Ok(save) = op.get_str("saveResultAsEntity") {
                    let entity = outcome
                        .entity
                        .ok_or_else(|| format!("{name} returns nothing to save as an entity"))?;
                    self.entities.insert(save.to_owned(), entity);
                }
                Ok(())
            }
        }
    }

    async fn dispatch(
        &mut self,
        name: &str,
        object: &str,
        args: &Document,
    ) -> Result<Result<Outcome, Error>, Failure> {
        if object == "testRunner" {
            return match name {
                "failPoint" => {
                    only(args, &["client", "failPoint"], name)?;
                    let client = self.client(args.get_str("client").unwrap_or_default())?;
                    let fp = args
                        .get_document("failPoint")
                        .map_err(|_| "failPoint needs a document")?
                        .clone();
                    let fp_name = fp
                        .get_str("configureFailPoint")
                        .unwrap_or_default()
                        .to_owned();
                    let r = client.database("admin").run_command(fp).await;
                    if r.is_ok() {
                        self.fail_points.push((client, fp_name));
                    }
                    Ok(r.map(|_| Outcome::default()))
                }
                other => Err(format!(
                    "special operation `{other}` is not supported by this runner"
                )),
            };
        }
        let entity = self
            .entities
            .get_mut(object)
            .ok_or_else(|| format!("no entity `{object}`"))?;
        match (entity, name) {
            (Entity::Client(c), "createChangeStream") => {
                let watch = c.client.watch();
                create_stream(watch, args).await
            }
            (Entity::Database(db), "createChangeStream") => create_stream(db.watch(), args).await,
            (Entity::Collection(coll), "createChangeStream") => {
                create_stream(coll.watch(), args).await
            }
            (Entity::Database(db), "createCollection") => {
                only(args, &["collection", "viewOn", "pipeline"], name)?;
                let coll = args
                    .get_str("collection")
                    .map_err(|_| "createCollection needs collection")?;
                let r = match args.get_str("viewOn") {
                    Ok(on) => {
                        let pipeline: Vec<Document> = args
                            .get_array("pipeline")
                            .map(|a| a.iter().filter_map(|x| x.as_document().cloned()).collect())
                            .unwrap_or_default();
                        db.create_collection(coll)
                            .view_on(on.to_owned())
                            .pipeline(pipeline)
                            .await
                    }
                    Err(_) => db.create_collection(coll).await,
                };
                Ok(r.map(|()| Outcome::default()))
            }
            (Entity::Database(db), "dropCollection") => {
                only(args, &["collection"], name)?;
                let coll = args
                    .get_str("collection")
                    .map_err(|_| "dropCollection needs collection")?;
                Ok(db
                    .collection::<Document>(coll)
                    .drop()
                    .await
                    .map(|()| Outcome::default()))
            }
            (Entity::Database(db), "runCommand") => {
                only(args, &["command", "commandName"], name)?;
                let cmd = args
                    .get_document("command")
                    .map_err(|_| "runCommand needs command")?
                    .clone();
                Ok(db
                    .run_command(cmd)
                    .await
                    .map(|r| Outcome::value(Bson::Document(r))))
            }
            (Entity::Collection(coll), "insertOne") => {
                only(args, &["document"], name)?;
                let d = args
                    .get_document("document")
                    .map_err(|_| "insertOne needs document")?
                    .clone();
                Ok(coll
                    .insert_one(d)
                    .await
                    .map(|r| Outcome::value(Bson::Document(doc! { "insertedId": r.inserted_id }))))
            }
            (Entity::Collection(coll), "updateOne") => {
                only(args, &["filter", "update", "upsert"], name)?;
                let filter = args
                    .get_document("filter")
                    .map_err(|_| "updateOne needs filter")?
                    .clone();
                let update = match args.get("update") {
                    Some(Bson::Document(d)) => {
                        mongodb::options::UpdateModifications::Document(d.clone())
                    }
                    Some(Bson::Array(a)) => mongodb::options::UpdateModifications::Pipeline(
                        a.iter().filter_map(|x| x.as_document().cloned()).collect(),
                    ),
                    _ => return Err("updateOne needs update".into()),
                };
                let r = coll
                    .update_one(filter, update)
                    .upsert(args.get_bool("upsert").unwrap_or(false))
                    .await;
                Ok(r.map(|r| {
                    Outcome::value(Bson::Document(update_result(
                        r.matched_count,
                        r.modified_count,
                        r.upserted_id,
                    )))
                }))
            }
            (Entity::Collection(coll), "replaceOne") => {
                only(args, &["filter", "replacement", "upsert"], name)?;
                let filter = args
                    .get_document("filter")
                    .map_err(|_| "replaceOne needs filter")?
                    .clone();
                let replacement = args
                    .get_document("replacement")
                    .map_err(|_| "replaceOne needs replacement")?
                    .clone();
                let r = coll
                    .replace_one(filter, replacement)
                    .upsert(args.get_bool("upsert").unwrap_or(false))
                    .await;
                Ok(r.map(|r| {
                    Outcome::value(Bson::Document(update_result(
                        r.matched_count,
                        r.modified_count,
                        r.upserted_id,
                    )))
                }))
            }
            (Entity::Collection(coll), "deleteOne") => {
                only(args, &["filter"], name)?;
                let filter = args
                    .get_document("filter")
                    .map_err(|_| "deleteOne needs filter")?
                    .clone();
                Ok(coll.delete_one(filter).await.map(|r| {
                    Outcome::value(Bson::Document(
                        doc! { "deletedCount": r.deleted_count as i64 },
                    ))
                }))
            }
            (Entity::Collection(coll), "rename") => {
                only(args, &["to", "dropTarget"], name)?;
                let to = args.get_str("to").map_err(|_| "rename needs to")?;
                let ns = coll.namespace();
                let mut cmd =
                    doc! { "renameCollection": ns.to_string(), "to": format!("{}.{to}", ns.db) };
                if let Ok(drop_target) = args.get_bool("dropTarget") {
                    cmd.insert("dropTarget", drop_target);
                }
                let admin = coll.client().database("admin");
                Ok(admin.run_command(cmd).await.map(|_| Outcome::default()))
            }
            (Entity::Collection(coll), "createIndex") => {
                only(args, &["keys", "name", "unique"], name)?;
                let keys = args
                    .get_document("keys")
                    .map_err(|_| "createIndex needs keys")?
                    .clone();
                let mut options = mongodb::options::IndexOptions::default();
                options.name = args.get_str("name").ok().map(str::to_owned);
                options.unique = args.get_bool("unique").ok();
                let model = mongodb::IndexModel::builder()
                    .keys(keys)
                    .options(options)
                    .build();
                Ok(coll
                    .create_index(model)
                    .await
                    .map(|r| Outcome::value(Bson::String(r.index_name))))
            }
            (Entity::Collection(coll), "dropIndex") => {
                only(args, &["name"], name)?;
                let index = args.get_str("name").map_err(|_| "dropIndex needs name")?;
                Ok(coll.drop_index(index).await.map(|()| Outcome::default()))
            }
            (Entity::Stream(stream), "iterateUntilDocumentOrError") => {
                only(args, &[], name)?;
                match tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await {
                    Err(_) => Err("no document or error within 10 s".into()),
                    Ok(Ok(Some(d))) => Ok(Ok(Outcome::value(Bson::Document(d)))),
                    Ok(Ok(None)) => Err("the change stream ended without a document".into()),
                    Ok(Err(e)) => Ok(Err(e)),
                }
            }
            (Entity::Stream(stream), "iterateOnce") => {
                only(args, &[], name)?;
                match tokio::time::timeout(Duration::from_secs(10), stream.next_if_any()).await {
                    Err(_) => Err("iterateOnce did not return within 10 s".into()),
                    Ok(Ok(d)) => Ok(Ok(Outcome {
                        value: d.map(Bson::Document),
                        entity: None,
                    })),
                    Ok(Err(e)) => Ok(Err(e)),
                }
            }
            (Entity::Stream(_), "close") => {
                self.entities.remove(object);
                Ok(Ok(Outcome::default()))
            }
            (_, other) => Err(format!(
                "operation `{other}` on `{object}` is not supported by this runner"
            )),
        }
    }

    async fn disable_fail_points(&mut self) {
        for (client, name) in self.fail_points.drain(..) {
            let _ = client
                .database("admin")
                .run_command(doc! { "configureFailPoint": name, "mode": "off" })
                .await;
        }
    }

    fn check_events(&self, expected: &[Bson]) -> Result<(), Failure> {
        for block in expected {
            let Bson::Document(block) = block else {
                continue;
            };
            let client_id = block
                .get_str("client")
                .map_err(|_| "expectEvents needs client")?;
            if let Ok(kind) = block.get_str("eventType")
                && kind != "command"
            {
                return Err(format!(
                    "expectEvents eventType `{kind}` is not supported by this runner"
                ));
            }
            let Some(Entity::Client(c)) = self.entities.get(client_id) else {
                return Err(format!("expectEvents names unknown client `{client_id}`"));
            };
            let actual = c
                .events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let wanted = block
                .get_array("events")
                .map_err(|_| "expectEvents needs events")?;
            let extra_ok = block.get_bool("ignoreExtraEvents").unwrap_or(false);
            if wanted.len() > actual.len() || (!extra_ok && wanted.len() != actual.len()) {
                let names: Vec<&str> = actual.iter().map(|(n, _, _)| n.as_str()).collect();
                return Err(format!(
                    "expected {} events on {client_id}, observed {} ({names:?})",
                    wanted.len(),
                    actual.len()
                ));
            }
            for (i, (w, (cmd_name, db, cmd))) in wanted.iter().zip(&actual).enumerate() {
                let Bson::Document(w) = w else { continue };
                let (kind, spec) = w.iter().next().ok_or("empty expected event")?;
                if kind != "commandStartedEvent" {
                    return Err(format!(
                        "expected event type `{kind}` is not supported by this runner"
                    ));
                }
                let Bson::Document(spec) = spec else {
                    return Err("event spec must be a document".into());
                };
                for (k, v) in spec {
                    let path = format!("events.{i}.{k}");
                    match k.as_str() {
                        "command" => matches(v, Some(&Bson::Document(cmd.clone())), true, &path)?,
                        "commandName" => {
                            matches(v, Some(&Bson::String(cmd_name.clone())), false, &path)?
                        }
                        "databaseName" => {
                            matches(v, Some(&Bson::String(db.clone())), false, &path)?
                        }
                        other => {
                            return Err(format!(
                                "commandStartedEvent.{other} is not supported by this runner"
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn check_outcome(&self, outcome: &[Bson]) -> Result<(), Failure> {
        for data in outcome {
            let Bson::Document(data) = data else { continue };
            let coll = self
                .internal
                .database(data.get_str("databaseName").unwrap_or_default())
                .collection::<Document>(data.get_str("collectionName").unwrap_or_default());
            let actual: Vec<Document> = coll
                .find(doc! {})
                .sort(doc! { "_id": 1 })
                .await
                .map_err(|e| format!("outcome: {e}"))?
                .try_collect()
                .await
                .map_err(|e| format!("outcome: {e}"))?;
            let expected: Vec<Document> = data
                .get_array("documents")
                .map(|a| a.iter().filter_map(|x| x.as_document().cloned()).collect())
                .unwrap_or_default();
            let sorted = |d: &Document| {
                let mut v: Vec<(String, Bson)> = d.clone().into_iter().collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            };
            if expected.len() != actual.len()
                || expected
                    .iter()
                    .zip(&actual)
                    .any(|(e, a)| sorted(e) != sorted(a))
            {
                return Err(format!("outcome: expected {expected:?}, found {actual:?}"));
            }
        }
        Ok(())
    }

    async fn cleanup(&mut self) {
        self.disable_fail_points().await;
        self.entities.clear();
    }
}

fn update_result(matched: u64, modified: u64, upserted: Option<Bson>) -> Document {
    let mut d = doc! {
        "matchedCount": matched as i64,
        "modifiedCount": modified as i64,
        "upsertedCount": i64::from(upserted.is_some()),
    };
    if let Some(id) = upserted {
        d.insert("upsertedId", id);
    }
    d
}

/// What an operation produced: a value to match and/or an entity to save.
#[derive(Default)]
struct Outcome {
    value: Option<Bson>,
    entity: Option<Entity>,
}

impl Outcome {
    fn value(v: Bson) -> Self {
        Self {
            value: Some(v),
            entity: None,
        }
    }
}

async fn create_stream<T>(
    watch: mongodb::action::Watch<'_, T>,
    args: &Document,
) -> Result<Result<Outcome, Error>, Failure>
where
    T: serde::de::DeserializeOwned + Unpin + Send + Sync,
{
    only(
        args,
        &[
            "pipeline",
            "batchSize",
            "comment",
            "fullDocument",
            "fullDocumentBeforeChange",
            "maxAwaitTimeMS",
            "resumeAfter",
            "startAfter",
            "startAtOperationTime",
            "showExpandedEvents",
        ],
        "createChangeStream",
    )?;
    let mut watch = watch;
    if let Ok(p) = args.get_array("pipeline") {
        watch = watch.pipeline(p.iter().filter_map(|x| x.as_document().cloned()));
    }
    if let Some(n) = args
        .get("batchSize")
        .and_then(|v| v.as_i32().or_else(|| v.as_i64().map(|n| n as i32)))
    {
        watch = watch.batch_size(u32::try_from(n).map_err(|_| "batchSize must be positive")?);
    }
    if let Some(c) = args.get("comment") {
        watch = watch.comment(c.clone());
    }
    if let Ok(mode) = args.get_str("fullDocument") {
        watch = watch.full_document(match mode {
            "updateLookup" => FullDocumentType::UpdateLookup,
            "whenAvailable" => FullDocumentType::WhenAvailable,
            "required" => FullDocumentType::Required,
            other => FullDocumentType::Other(other.to_owned()),
        });
    }
    if let Ok(mode) = args.get_str("fullDocumentBeforeChange") {
        watch = watch.full_document_before_change(match mode {
            "whenAvailable" => FullDocumentBeforeChangeType::WhenAvailable,
            "required" => FullDocumentBeforeChangeType::Required,
            "off" => FullDocumentBeforeChangeType::Off,
            other => FullDocumentBeforeChangeType::Other(other.to_owned()),
        });
    }
    if let Some(ms) = args
        .get("maxAwaitTimeMS")
        .and_then(|v| v.as_i64().or_else(|| v.as_i32().map(i64::from)))
    {
        watch = watch.max_await_time(Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
    }
    if let Ok(expanded) = args.get_bool("showExpandedEvents") {
        watch = watch.show_expanded_events(expanded);
    }
    if let Ok(ts) = args.get_timestamp("startAtOperationTime") {
        watch = watch.start_at_operation_time(ts);
    }
    for key in ["resumeAfter", "startAfter"] {
        if let Some(token) = args.get(key) {
            let token: mongodb::change_stream::event::ResumeToken =
                bson::deserialize_from_bson(token.clone()).map_err(|e| format!("{key}: {e}"))?;
            watch = if key == "resumeAfter" {
                watch.resume_after(token)
            } else {
                watch.start_after(token)
            };
        }
    }
    Ok(watch.await.map(|s| Outcome {
        value: None,
        entity: Some(Entity::Stream(Box::new(s.with_type::<Document>()))),
    }))
}
