//! What `cdc` shows of a connection string, and of a client's error about one: every
//! secret each client would read from it taken out, wherever and however it is written.
//!
//! A string is read by every parser that could be handed it, and what any of them calls a
//! secret is hidden: the MongoDB driver's (password, `AWS_SESSION_TOKEN`,
//! `tlsCertificateKeyFilePassword`), `tokio-postgres`'s (URL or libpq key-value string,
//! `password=` quoted or not), async-nats's (each server of a comma-separated list: user
//! and password, or a lone token), the `url` crate's (which redis and async-nats use), and
//! a reading of the user information as everything up
//! to the last `@` before the query (so a password holding an unencoded `/`, `:` or `@` is
//! hidden whole). Then the text is shown with those secrets replaced by `***`; when one
//! would still be readable in any form (percent-encoded, quoted), only the scheme is shown.

use std::str::FromStr;

use cdc_sink::async_nats;

/// Query parameters whose values are secrets, whatever client reads them.
const SECRET_PARAMS: [&str; 6] = [
    "password",
    "pass",
    "token",
    "secret",
    "sslkey",
    "sslpassword",
];

/// Query parameters that look like secrets by name and are not.
const NOT_SECRET: [&str; 3] = ["authsource", "authmechanism", "authmechanismproperties"];

/// `url` fit to show: its user information (`user:***@`) and secret parameters hidden, and
/// every secret any client reads from it replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let secrets = secrets(url);
    let structural: Vec<String> = url.split(',').map(redact_piece).collect();
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    cdc_core::support::redact_secrets(&structural.join(","), &refs).unwrap_or_else(|| hidden(url))
}

/// `text` (an error a client gave for `url`) with the URL's secrets taken out.
pub(crate) fn scrub(text: &str, url: &str) -> String {
    let secrets = secrets(url);
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    cdc_core::support::redact_secrets(text, &refs)
        .unwrap_or_else(|| "(the message is hidden: it holds a secret of the URL)".to_owned())
}

fn hidden(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c)) =>
        {
            format!("{scheme}://(hidden: it could not be checked for secrets)")
        }
        _ => "(a connection string, hidden: it could not be checked for secrets)".to_owned(),
    }
}

/// One server's URL (or a libpq key-value string) with its user information and secret
/// parameters replaced.
fn redact_piece(piece: &str) -> String {
    let (scheme, rest) = match piece.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, piece),
    };
    if scheme.is_none() && rest.contains('=') && !rest.contains('?') {
        return redact_key_values(piece);
    }
    let query_at = rest.find(['?', '#']).unwrap_or(rest.len());
    let (before, tail) = rest.split_at(query_at);
    let before = match before.rfind('@') {
        Some(at) => {
            let (user, host) = before.split_at(at);
            match user.split_once(':') {
                Some((name, _)) => format!("{name}:***{host}"),
                // A lone name is a token to NATS, a user name elsewhere.
                None if scheme.is_some_and(is_nats) => format!("***{host}"),
                None => before.to_owned(),
            }
        }
        None => before.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if is_secret_param(k) => format!("{k}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    match scheme {
        Some(s) => format!("{s}://{before}{tail}"),
        None => format!("{before}{tail}"),
    }
}

/// A libpq key-value string with the value of `password` (quoted or not, any case)
/// replaced.
fn redact_key_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((start, end, _)) = next_password(rest) {
        out.push_str(&rest[..start]);
        out.push_str("***");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The values of `password` keys in a libpq key-value string (unquoted).
fn key_value_passwords(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((start, end, value)) = next_password(rest) {
        out.push(rest[start..end].to_owned());
        out.push(value);
        rest = &rest[end..];
    }
    out
}

/// The next `password` value in `text`: where it starts and ends as written, and its value
/// with quotes and escapes removed.
fn next_password(text: &str) -> Option<(usize, usize, String)> {
    let at = find_key(text, "password")?;
    let eq = at + text[at..].find('=')? + 1;
    let start = eq + (text[eq..].len() - text[eq..].trim_start().len());
    let value = &text[start..];
    if let Some(quoted) = value.strip_prefix('\'') {
        let mut unquoted = String::new();
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            if escaped {
                unquoted.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '\'' {
                return Some((start, start + 1 + i + 1, unquoted));
            } else {
                unquoted.push(c);
            }
        }
        Some((start, text.len(), unquoted))
    } else {
        let len = value.find(char::is_whitespace).unwrap_or(value.len());
        Some((start, start + len, value[..len].to_owned()))
    }
}

/// Where `key` starts as a key (at the start or after whitespace, followed by `=`).
fn find_key(text: &str, key: &str) -> Option<usize> {
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(key) {
        let at = from + i;
        let starts = at == 0 || lower[..at].ends_with(char::is_whitespace);
        let follows = lower[at + key.len()..].trim_start().starts_with('=');
        if starts && follows {
            return Some(at);
        }
        from = at + key.len();
    }
    None
}

/// Schemes async-nats reads (a lone user name there is a token).
fn is_nats(scheme: &str) -> bool {
    matches!(scheme, "nats" | "tls" | "ws" | "wss")
}

fn is_secret_param(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    !NOT_SECRET.contains(&key.as_str())
        && (SECRET_PARAMS.iter().any(|s| key.contains(s)) || key.starts_with("auth"))
}

/// Every secret any client would read from `url`, percent-decoded forms included.
pub(crate) fn secrets(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    // The MongoDB driver's reading.
    if url.starts_with("mongodb") {
        out.extend(cdc_mongo::uri_secrets(url).unwrap_or_default());
    }
    // tokio-postgres's reading (URL or key-value string).
    if let Ok(config) = tokio_postgres::Config::from_str(url)
        && let Some(password) = config.get_password()
    {
        out.push(String::from_utf8_lossy(password).into_owned());
    }
    // A key-value string's `password`, in any case and quoting.
    if !url.contains("://") {
        out.extend(key_value_passwords(url));
    }
    // The `url` crate's reading of the whole string (which redis and async-nats share),
    // where it parses: user information and query pairs, decoded.
    if let Ok(parsed) = url::Url::parse(url) {
        out.extend(parsed.password().map(str::to_owned));
        if is_nats(parsed.scheme()) && parsed.password().is_none() {
            out.push(parsed.username().to_owned());
        }
        for (k, v) in parsed.query_pairs() {
            if is_secret_param(&k) {
                out.push(v.into_owned());
            }
        }
    }
    for piece in url.split(',') {
        // async-nats's reading of each server.
        if let Ok(addr) = async_nats::ServerAddr::from_str(piece.trim()) {
            // A user name alone is a token; with a password, the password is the secret.
            match addr.password() {
                Some(password) => out.push(password.to_owned()),
                None => out.extend(addr.username().map(str::to_owned)),
            }
        }
        // The user information up to the last `@` before the query, and secret
        // parameters, whatever the scheme.
        let rest = piece.split_once("://").map_or(piece, |(_, r)| r);
        let before = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
        if let Some(at) = before.rfind('@') {
            let user = &before[..at];
            let scheme = piece.split_once("://").map(|(s, _)| s);
            match user.split_once(':') {
                Some((_, password)) => out.push(password.to_owned()),
                // A lone name is a token to NATS (a user name elsewhere).
                None if scheme.is_none_or(is_nats) => out.push(user.to_owned()),
                None => {}
            }
        }
        if let Some((_, query)) = piece.split_once('?') {
            for pair in query.split('&') {
                if let Some((k, v)) = pair.split_once('=')
                    && is_secret_param(k)
                {
                    out.push(v.to_owned());
                }
            }
        }
    }
    // Every secret as read raw, percent-decoded, and form-decoded (a `+` as a space).
    let decoded: Vec<String> = out
        .iter()
        .flat_map(|s| {
            [
                cdc_core::support::percent_decode(s),
                cdc_core::support::percent_decode(&s.replace('+', " ")),
            ]
        })
        .flatten()
        .collect();
    out.extend(decoded);
    out.retain(|s| !s.is_empty());
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every URL form a user may write, with the secret `s3cr/t:x@y` or `hunter2`: the
    /// shown text never holds the secret in any form, and keeps the host.
    #[test]
    fn no_secret_survives_any_form() {
        let cases: &[(&str, &[&str], &str)] = &[
            (
                "postgres://a:hunter2@h/db?sslmode=require&password=hunter2",
                &["hunter2"],
                "h/db",
            ),
            (
                "host=pg.local user=me password=hunter2 dbname=test",
                &["hunter2"],
                "pg.local",
            ),
            (
                "host=pg.local password='hun ter\\'2' user=me",
                &["hun ter\\'2", "hun ter'2"],
                "user=me",
            ),
            ("host=pg.local PASSWORD = hunter2", &["hunter2"], "pg.local"),
            ("nats://u:hunter2@h1:4222", &["hunter2"], "h1:4222"),
            ("nats://tok3n@h1:4222", &["tok3n"], "h1:4222"),
            ("nats://u:pa/ss@h1:4222", &["pa/ss"], "h1:4222"),
            (
                "nats://u:p1@h1:4222,nats://u:p2@h2:4222",
                &["p1", "p2"],
                "h2:4222",
            ),
            ("nats://u:p%2Fw@h:4222", &["p/w", "p%2Fw"], "h:4222"),
            (
                "mongodb://u:hunter2@h1,h2/?replicaSet=rs0",
                &["hunter2"],
                "replicaSet=rs0",
            ),
            (
                "mongodb://u:hun%40ter@h/?authSource=admin",
                &["hun@ter", "hun%40ter"],
                "authSource=admin",
            ),
            ("redis://:hunter2@h:6379/0", &["hunter2"], "h:6379"),
            ("redis://h:6379/0?password=hunter2", &["hunter2"], "h:6379"),
        ];
        for (url, hidden, kept) in cases {
            let shown = redact_url(url);
            for secret in *hidden {
                assert!(!shown.contains(secret), "{url} → {shown}");
                assert!(
                    !cdc_core::support::percent_decode_lossy(&shown).contains(secret),
                    "{url} → {shown}"
                );
            }
            assert!(
                shown.contains(kept) || shown.contains("hidden"),
                "{url} → {shown}"
            );
            let message = format!("could not connect to {url}: refused");
            let scrubbed = scrub(&message, url);
            for secret in *hidden {
                assert!(!scrubbed.contains(secret), "{url} → {scrubbed}");
            }
        }
        assert_eq!(redact_url("file:./x"), "file:./x");
        // A user name without a password is shown (a token only to NATS).
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5432/test?sslmode=require"),
            "postgres://postgres@127.0.0.1:5432/test?sslmode=require"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    proptest::proptest! {
        /// The lenient reading (what `cdc` falls back on for strings `url` refuses, such as
        /// seed lists) hides at least what `url` reads: for every URL `url` parses, no
        /// password, NATS token or secret query value it reads can be read in the shown
        /// text, decoded or not; and the host stays.
        #[test]
        fn what_url_reads_as_a_secret_is_hidden(
            scheme in proptest::sample::select(vec!["nats", "redis", "rediss", "postgres", "mongodb", "tls", "http"]),
            user in "[a-zA-Z0-9._~-]{0,6}",
            password in "[a-zA-Z0-9/?@:'\\=&#% +,;é!$()*\\[\\]-]{1,16}",
            query in "[a-zA-Z0-9 +%é&=/]{0,12}",
        ) {
            let encoded: String = url::form_urlencoded::byte_serialize(password.as_bytes()).collect();
            let forms = [
                format!("{scheme}://{user}:{encoded}@db.example:1234/x"),
                format!("{scheme}://{user}:{}@db.example:1234/x", cdc_core::support::percent_decode_lossy(&encoded).replace(['/', '?', '#', '@', '%'], "_")),
                format!("{scheme}://db.example:1234/x?a=1&password={encoded}&{query}"),
                format!("{scheme}://{encoded}@db.example:1234/x"),
            ];
            for form in forms {
                let Ok(parsed) = url::Url::parse(&form) else { continue };
                let mut read: Vec<String> = parsed.password().map(str::to_owned).into_iter().collect();
                if is_nats(parsed.scheme()) && parsed.password().is_none() && !parsed.username().is_empty() {
                    read.push(parsed.username().to_owned());
                }
                read.extend(parsed.query_pairs().filter(|(k, _)| is_secret_param(k)).map(|(_, v)| v.into_owned()));
                let shown = redact_url(&form);
                let decoded = cdc_core::support::percent_decode_lossy(&shown);
                let form_decoded = cdc_core::support::percent_decode_lossy(&shown.replace('+', " "));
                for secret in read.iter().filter(|s| !s.is_empty()) {
                    let decoded_secret = cdc_core::support::percent_decode_lossy(secret);
                    for s in [secret, &decoded_secret] {
                        proptest::prop_assert!(!shown.contains(s.as_str()), "{form} -> {shown} ({s})");
                        proptest::prop_assert!(!decoded.contains(s.as_str()), "{form} -> {shown} ({s})");
                        proptest::prop_assert!(!form_decoded.contains(s.as_str()), "{form} -> {shown} ({s})");
                    }
                }
                // The host is kept, unless something some reader takes for a secret is
                // written inside it (every occurrence of a secret is replaced).
                let clear = format!("{scheme}://db.example:1234/x?a=1");
                if secrets(&form).iter().all(|s| !clear.contains(s.as_str())) {
                    proptest::prop_assert!(shown.contains("db.example") || shown.contains("hidden"), "{form} -> {shown}");
                }
            }
        }
    }
}
