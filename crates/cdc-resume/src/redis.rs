//! [`RedisStore`]: one key per stream under a configurable prefix.

use std::time::Duration;

use async_trait::async_trait;
use cdc_core::{
    ClusterTime, DeadLetter, DeadLetterStore, Error, Lease, LeaseStore, Result, ResumePoint,
    ResumeStore, validate_stream_id,
};
use redis::{AsyncCommands, AsyncConnectionConfig, Client, aio::MultiplexedConnection};

use crate::record;

/// The compare-and-set of a save, run atomically by Redis: refuse a point older than the
/// stored one, refuse to overwrite a key of another type or a record that is not ours.
const SAVE_SCRIPT: &str = r"
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'none' and kind ~= 'string' then return {'wrongtype', kind} end
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, old = pcall(cjson.decode, cur)
  if not ok or type(old) ~= 'table' or type(old.clusterTime) ~= 'table' then return {'corrupt'} end
  local ot, oi = tonumber(old.clusterTime.time), tonumber(old.clusterTime.increment)
  local nt, ni = tonumber(ARGV[2]), tonumber(ARGV[3])
  if ot == nil or oi == nil then return {'corrupt'} end
  if nt < ot or (nt == ot and ni < oi) then return {'older', tostring(ot), tostring(oi)} end
end
redis.call('SET', KEYS[1], ARGV[1])
return {'ok'}
";

/// Records a dead letter once: a letter whose id is already recorded is kept as it is.
const RECORD_SCRIPT: &str = r"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local entry = redis.call('XADD', KEYS[1], '*', 'letter', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], entry)
return 1
";

/// Removes a dead letter and its id.
const REMOVE_SCRIPT: &str = r"
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if not entry then return 0 end
redis.call('XDEL', KEYS[1], entry)
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
";

/// Redis's clock in milliseconds, for the lease scripts (the store's clock decides
/// expiry, never the clients').
const NOW_MS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Takes a lease (KEYS[1] the lease hash; ARGV owner, TTL in ms): the rules of
/// `cdc_core::LeaseRecord::acquire`.
const ACQUIRE_SCRIPT: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'token', 'expires')
local owner, token, expires = cur[1], tonumber(cur[2]), tonumber(cur[3])
if owner and expires and expires > now then
  if owner ~= ARGV[1] then return {'held'} end
else
  token = (token or 0) + 1
end
local exp = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'expires', exp)
return {'ok', string.format('%d', token), string.format('%d', exp)}
";

/// Renews (ARGV[4] = 'renew', a TTL in ARGV[3]) or releases (ARGV[4] = 'release') a lease
/// held by owner ARGV[1] with token ARGV[2].
const KEEP_SCRIPT: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'token', 'expires')
local held = cur[1] == ARGV[1] and cur[2] == ARGV[2] and (tonumber(cur[3]) or 0) > now
if not held then return {'fenced', cur[2] or ''} end
local exp = now
if ARGV[4] == 'renew' then exp = now + tonumber(ARGV[3]) end
redis.call('HSET', KEYS[1], 'expires', exp)
return {'ok', string.format('%d', exp)}
";

/// The live holder of a lease.
const HOLDER_SCRIPT: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'token', 'expires')
if cur[1] and (tonumber(cur[3]) or 0) > now then return {'held', cur[1], cur[2], cur[3]} end
return {'none'}
";

/// The fencing check before a fenced write: the lease at KEYS[#KEYS] must be held with
/// owner ARGV[#ARGV - 1] and token ARGV[#ARGV] (the newest token).
const FENCE_CHECK: &str = r"
local lease = redis.call('HMGET', KEYS[#KEYS], 'owner', 'token')
if lease[1] ~= ARGV[#ARGV - 1] or lease[2] ~= ARGV[#ARGV] then return {'fenced', lease[2] or ''} end
";

/// Records a dead letter once, under the fencing check.
const RECORD_FENCED_SCRIPT: &str = r"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {'ok'} end
local entry = redis.call('XADD', KEYS[1], '*', 'letter', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], entry)
return {'ok'}
";

/// Between a stream's key and the suffix of its dead-letter keys: a control character, so
/// no stream id (which may hold none) makes a key that collides with them.
const LETTERS_SEPARATOR: char = '\u{1f}';

/// Keeps each stream's point as a JSON string at `<prefix><stream>`, and its dead letters
/// in a Redis stream at `<prefix><stream>\x1fdead-letters` (entries with one field,
/// `letter`, a JSON record) with a hash of their ids at `<prefix><stream>\x1fdead-letter-ids`.
pub struct RedisStore {
    client: Client,
    prefix: String,
    shown: String,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    script: redis::Script,
    /// The lease scripts: acquire, keep (renew or release), holder, fenced save, fenced
    /// dead letter.
    lease_scripts: [redis::Script; 5],
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("server", &self.shown)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisStore {
    /// A store on the server at `url` (`redis://host:port/db`), keys under `prefix`. No
    /// connection is made until the first call.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a malformed URL (password redacted).
    pub fn new(url: &str, prefix: impl Into<String>) -> Result<Self> {
        let shown = crate::redact::redis(url);
        let client = Client::open(url).map_err(|e| Error::InvalidArgument {
            name: "url",
            reason: format!("{shown}: {}", e.detail().unwrap_or("invalid Redis URL")),
        })?;
        Ok(Self {
            client,
            prefix: prefix.into(),
            shown,
            conn: tokio::sync::Mutex::new(None),
            script: redis::Script::new(SAVE_SCRIPT),
            lease_scripts: [
                redis::Script::new(&format!("{NOW_MS}{ACQUIRE_SCRIPT}")),
                redis::Script::new(&format!("{NOW_MS}{KEEP_SCRIPT}")),
                redis::Script::new(&format!("{NOW_MS}{HOLDER_SCRIPT}")),
                redis::Script::new(&format!("{FENCE_CHECK}{SAVE_SCRIPT}")),
                redis::Script::new(&format!("{FENCE_CHECK}{RECORD_FENCED_SCRIPT}")),
            ],
        })
    }

    fn key(&self, stream: &str) -> String {
        format!("{}{stream}", self.prefix)
    }

    /// The Redis stream of `stream`'s dead letters and the hash of their ids.
    fn letter_keys(&self, stream: &str) -> (String, String) {
        let key = self.key(stream);
        (
            format!("{key}{LETTERS_SEPARATOR}dead-letters"),
            format!("{key}{LETTERS_SEPARATOR}dead-letter-ids"),
        )
    }

    async fn connection(&self, stream: &str) -> Result<MultiplexedConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.named(stream, &e))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Maps a Redis error; a broken connection is dropped so the next call reconnects.
    async fn fail(&self, stream: &str, e: redis::RedisError) -> Error {
        if e.code() == Some("WRONGTYPE") {
            return Error::CorruptPoint {
                stream: stream.to_owned(),
                location: format!("{} key {}", self.shown, self.key(stream)),
                reason: "the key holds a value of another type".into(),
            };
        }
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_connection_refusal()
        {
            *self.conn.lock().await = None;
        }
        self.named(stream, &e)
    }

    /// A store error naming the server (password hidden) and the client's message.
    fn named(&self, stream: &str, e: &redis::RedisError) -> Error {
        Error::store(
            stream,
            std::io::Error::other(format!("{}: {e}", self.shown)),
        )
    }
}

#[async_trait]
impl ResumeStore for RedisStore {
    async fn load(&self, stream: &str) -> Result<Option<ResumePoint>> {
        validate_stream_id(stream)?;
        let mut conn = self.connection(stream).await?;
        let value: Option<Vec<u8>> = match conn.get(self.key(stream)).await {
            Ok(v) => v,
            Err(e) => return Err(self.fail(stream, e).await),
        };
        let location = format!("{} key {}", self.shown, self.key(stream));
        value
            .map(|bytes| record::decode(&bytes, stream, &location))
            .transpose()
    }

    async fn save(&self, stream: &str, point: &ResumePoint) -> Result<()> {
        validate_stream_id(stream)?;
        let mut conn = self.connection(stream).await?;
        let reply: Vec<String> = match self
            .script
            .key(self.key(stream))
            .arg(record::encode(stream, point))
            .arg(point.cluster_time.time)
            .arg(point.cluster_time.increment)
            .invoke_async(&mut conn)
            .await
        {
            Ok(r) => r,
            Err(e) => return Err(self.fail(stream, e).await),
        };
        self.saved(stream, point, &reply)
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        validate_stream_id(stream)?;
        let mut conn = self.connection(stream).await?;
        let result: redis::RedisResult<i64> = conn.del(self.key(stream)).await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(stream, e).await),
        }
    }

    async fn list_streams(&self) -> Result<Vec<String>> {
        let keys = self
            .scan(&format!("{}*", glob_escape(&self.prefix)))
            .await?;
        // Dead-letter and lease keys carry a control character no stream id may hold.
        Ok(keys
            .iter()
            .filter_map(|k| {
                k.strip_prefix(&self.prefix)
                    .filter(|s| !s.contains(LETTERS_SEPARATOR))
                    .map(str::to_owned)
            })
            .collect())
    }

    fn describe(&self) -> String {
        format!("redis:{} prefix {:?}", self.shown, self.prefix)
    }
}

#[async_trait]
impl DeadLetterStore for RedisStore {
    async fn record(&self, letter: &DeadLetter) -> Result<()> {
        let stream = &letter.stream;
        validate_stream_id(stream)?;
        let mut conn = self.connection(stream).await?;
        let (entries, ids) = self.letter_keys(stream);
        // Redis persists as configured (AOF with `appendfsync always` for a crash-proof
        // record); the call returns once Redis applied it.
        let result: redis::RedisResult<i64> = redis::Script::new(RECORD_SCRIPT)
            .key(entries)
            .key(ids)
            .arg(&letter.id)
            .arg(record::encode_letter(letter))
            .invoke_async(&mut conn)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(stream, e).await),
        }
    }

    async fn list(&self, stream: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        validate_stream_id(stream)?;
        let mut conn = self.connection(stream).await?;
        let (entries, _) = self.letter_keys(stream);
        let result: redis::RedisResult<Vec<(String, Vec<(String, Vec<u8>)>)>> =
            redis::cmd("XRANGE")
                .arg(&entries)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await;
        let rows = match result {
            Ok(r) => r,
            Err(e) => return Err(self.fail(stream, e).await),
        };
        let location = format!("{} key {entries:?}", self.shown);
        let mut letters = rows
            .iter()
            .flat_map(|(_, fields)| fields.iter())
            .filter(|(name, _)| name == "letter")
            .map(|(_, body)| record::decode_letter(body, stream, &location))
            .collect::<Result<Vec<_>>>()?;
        letters.sort_by(DeadLetter::stream_order);
        letters.truncate(limit);
        Ok(letters)
    }

    async fn count(&self, stream: &str) -> Result<u64> {
        validate_stream_id(stream)?;
        let mut conn = self.connection(stream).await?;
        let (_, ids) = self.letter_keys(stream);
        let result: redis::RedisResult<u64> = conn.hlen(ids).await;
        match result {
            Ok(n) => Ok(n),
            Err(e) => Err(self.fail(stream, e).await),
        }
    }

    async fn remove(&self, stream: &str, id: &str) -> Result<bool> {
        validate_stream_id(stream)?;
        let mut conn = self.connection(stream).await?;
        let (entries, ids) = self.letter_keys(stream);
        let result: redis::RedisResult<i64> = redis::Script::new(REMOVE_SCRIPT)
            .key(entries)
            .key(ids)
            .arg(id)
            .invoke_async(&mut conn)
            .await;
        match result {
            Ok(n) => Ok(n == 1),
            Err(e) => Err(self.fail(stream, e).await),
        }
    }

    fn describe(&self) -> String {
        format!(
            "redis:{} prefix {:?} (dead letters)",
            self.shown, self.prefix
        )
    }
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisStore {
    /// The outcome of a save script's reply.
    fn saved(&self, stream: &str, point: &ResumePoint, reply: &[String]) -> Result<()> {
        let location = || format!("{} key {}", self.shown, self.key(stream));
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(()),
            Some("older") => {
                let part = |i: usize| {
                    reply
                        .get(i)
                        .and_then(|s| s.parse::<u32>().ok())
                        .unwrap_or(0)
                };
                Err(Error::Regression {
                    stream: stream.to_owned(),
                    stored: ClusterTime::new(part(1), part(2)),
                    attempted: point.cluster_time,
                })
            }
            Some("wrongtype") => Err(Error::CorruptPoint {
                stream: stream.to_owned(),
                location: location(),
                reason: format!(
                    "the key holds a {}",
                    reply.get(1).map_or("value of another type", String::as_str)
                ),
            }),
            _ => Err(Error::CorruptPoint {
                stream: stream.to_owned(),
                location: location(),
                reason: "the stored value is not a resume point record; delete it to start over"
                    .into(),
            }),
        }
    }

    /// The keys matching `pattern`, sorted, each once (SCAN may repeat one).
    async fn scan(&self, pattern: &str) -> Result<Vec<String>> {
        let mut conn = self.connection("*").await?;
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let result: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await;
            let (next, found) = match result {
                Ok(r) => r,
                Err(e) => return Err(self.fail("*", e).await),
            };
            keys.extend(found);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    fn lease_key(&self, stream: &str) -> String {
        format!("{}{LETTERS_SEPARATOR}lease", self.key(stream))
    }

    /// Runs lease script `i` on `keys` with `args`.
    async fn lease_script(
        &self,
        stream: &str,
        i: usize,
        keys: &[String],
        args: &[String],
    ) -> Result<Vec<String>> {
        let mut conn = self.connection(stream).await?;
        let mut call = self.lease_scripts[i].prepare_invoke();
        for k in keys {
            call.key(k);
        }
        for a in args {
            call.arg(a);
        }
        match call.invoke_async(&mut conn).await {
            Ok(reply) => Ok(reply),
            Err(e) => Err(self.fail(stream, e).await),
        }
    }
}

fn number<T: std::str::FromStr>(reply: &[String], i: usize, stream: &str) -> Result<T> {
    reply.get(i).and_then(|v| v.parse().ok()).ok_or_else(|| {
        Error::store(
            stream,
            std::io::Error::other(format!("unexpected reply from a lease script: {reply:?}")),
        )
    })
}

fn fenced(lease: &Lease, reply: &[String]) -> Error {
    Error::Fenced {
        stream: lease.stream.clone(),
        token: lease.token,
        newest: reply.get(1).and_then(|t| t.parse().ok()),
    }
}

/// Leases in a hash at `<prefix><stream>\x1flease` (owner, token, expiry in ms), changed
/// by Lua scripts on Redis's clock; fenced saves and letters check it in the same script.
#[async_trait]
impl LeaseStore for RedisStore {
    async fn acquire(&self, stream: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        validate_stream_id(stream)?;
        let reply = self
            .lease_script(
                stream,
                0,
                &[self.lease_key(stream)],
                &[owner.to_owned(), cdc_core::support::ttl_ms(ttl).to_string()],
            )
            .await?;
        if reply.first().map(String::as_str) != Some("ok") {
            return Ok(None);
        }
        Ok(Some(Lease::new(
            stream,
            owner,
            number(&reply, 1, stream)?,
            number(&reply, 2, stream)?,
        )))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let reply = self
            .lease_script(
                &lease.stream,
                1,
                &[self.lease_key(&lease.stream)],
                &[
                    lease.owner.clone(),
                    lease.token.to_string(),
                    cdc_core::support::ttl_ms(ttl).to_string(),
                    "renew".to_owned(),
                ],
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(Lease::new(
                lease.stream.clone(),
                lease.owner.clone(),
                lease.token,
                number(&reply, 1, &lease.stream)?,
            )),
            _ => Err(fenced(lease, &reply)),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.lease_script(
            &lease.stream,
            1,
            &[self.lease_key(&lease.stream)],
            &[
                lease.owner.clone(),
                lease.token.to_string(),
                "0".to_owned(),
                "release".to_owned(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn holder(&self, stream: &str) -> Result<Option<Lease>> {
        validate_stream_id(stream)?;
        let reply = self
            .lease_script(stream, 2, &[self.lease_key(stream)], &[])
            .await?;
        if reply.first().map(String::as_str) != Some("held") {
            return Ok(None);
        }
        Ok(Some(Lease::new(
            stream,
            reply.get(1).cloned().unwrap_or_default(),
            number(&reply, 2, stream)?,
            number(&reply, 3, stream)?,
        )))
    }

    async fn leases(&self, prefix: &str) -> Result<Vec<Lease>> {
        let pattern = format!(
            "{}*{LETTERS_SEPARATOR}lease",
            glob_escape(&format!("{}{prefix}", self.prefix))
        );
        let keys = self.scan(&pattern).await?;
        let mut out = Vec::new();
        for key in keys {
            let Some(stream) = key
                .strip_prefix(&self.prefix)
                .and_then(|k| k.strip_suffix(&format!("{LETTERS_SEPARATOR}lease")))
            else {
                continue;
            };
            if let Some(lease) = self.holder(stream).await? {
                out.push(lease);
            }
        }
        Ok(out)
    }

    async fn save_fenced(&self, lease: &Lease, point: &ResumePoint) -> Result<()> {
        let stream = &lease.stream;
        validate_stream_id(stream)?;
        let reply = self
            .lease_script(
                stream,
                3,
                &[self.key(stream), self.lease_key(stream)],
                &[
                    record::encode(stream, point),
                    point.cluster_time.time.to_string(),
                    point.cluster_time.increment.to_string(),
                    lease.owner.clone(),
                    lease.token.to_string(),
                ],
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("fenced") => Err(fenced(lease, &reply)),
            _ => self.saved(stream, point, &reply),
        }
    }

    async fn record_fenced(&self, lease: &Lease, letter: &DeadLetter) -> Result<()> {
        lease.covers(letter)?;
        let stream = &lease.stream;
        let (entries, ids) = self.letter_keys(stream);
        let reply = self
            .lease_script(
                stream,
                4,
                &[entries, ids, self.lease_key(stream)],
                &[
                    letter.id.clone(),
                    record::encode_letter(letter),
                    lease.owner.clone(),
                    lease.token.to_string(),
                ],
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(()),
            _ => Err(fenced(lease, &reply)),
        }
    }

    fn describe(&self) -> String {
        ResumeStore::describe(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            crate::redact::redis("redis://u:secret@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert_eq!(crate::redact::redis("redis://h:6379"), "redis://h:6379");
        assert_eq!(
            crate::redact::redis("redis+unix:///tmp/r.sock?pass=s3cret"),
            "redis+unix:///tmp/r.sock?pass=***"
        );
        assert_eq!(glob_escape("a*b"), "a\\*b");
    }
}
