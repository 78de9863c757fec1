//! Connection strings fit to show: each client's own parser finds the secrets, which
//! `cdc_core::support::redact_secrets` takes out wherever and however they are written.

/// What to show for a connection string that could not be checked for secrets.
fn hidden(text: &str) -> String {
    let scheme = text.split_once("://").map_or("", |(s, _)| s);
    if scheme.is_empty() {
        "(a connection string, hidden: it could not be checked for secrets)".to_owned()
    } else {
        format!("{scheme}://(hidden: the URL could not be checked for secrets)")
    }
}

fn redact_with(text: &str, secrets: &[String]) -> String {
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    cdc_core::support::redact_secrets(text, &secrets).unwrap_or_else(|| hidden(text))
}

/// The values of query parameters named `names`, read as the redis crate reads its URL
/// (`url`'s query pairs), which hold secrets whether or not the client reads them.
#[cfg(feature = "redis")]
fn query_values(url: &str, names: &[&str]) -> Vec<String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Vec::new();
    };
    parsed
        .query_pairs()
        .filter(|(key, _)| names.iter().any(|n| key.eq_ignore_ascii_case(n)))
        .map(|(_, value)| value.into_owned())
        .collect()
}

/// A PostgreSQL connection string (URL or key-value) with its password hidden, as
/// `tokio-postgres` reads it (`user:password@`, `?password=`, `password=x`,
/// `password='a b'`).
#[cfg(feature = "postgres")]
pub(crate) fn postgres(config: &str) -> String {
    match config.parse::<tokio_postgres::Config>() {
        Ok(parsed) => {
            let password = parsed
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            redact_with(config, &password.into_iter().collect::<Vec<_>>())
        }
        Err(_) => hidden(config),
    }
}

/// A Redis URL with its password hidden, as the `redis` crate reads it (`:password@`, and
/// `?pass=` of socket URLs; a `pass` or `password` parameter is hidden in any URL).
#[cfg(feature = "redis")]
pub(crate) fn redis(url: &str) -> String {
    use redis::IntoConnectionInfo;
    match url.into_connection_info() {
        Ok(info) => {
            let mut secrets: Vec<String> = info
                .redis_settings()
                .password()
                .map(str::to_owned)
                .into_iter()
                .collect();
            secrets.extend(query_values(url, &["pass", "password"]));
            redact_with(url, &secrets)
        }
        Err(_) => hidden(url),
    }
}

#[cfg(all(test, feature = "redis"))]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_values(
                "redis://h/?pass=a%2Fb&x=1&PASSWORD=c+d",
                &["pass", "password"]
            ),
            ["a/b", "c d"]
        );
        assert!(query_values("redis://h:notaport/?pass=x", &["pass"]).is_empty());
    }
}

#[cfg(all(test, feature = "redis", feature = "postgres"))]
mod properties {
    use proptest::prelude::*;

    /// Secrets with the characters connection strings treat specially.
    fn secret() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                proptest::char::range('a', 'z'),
                proptest::char::range('A', 'Z'),
                proptest::char::range('0', '9'),
                proptest::sample::select(vec![
                    '/', '?', '@', ':', '\'', '\\', '=', '&', '#', '%', ' ', '+', ',', ';', 'é',
                ]),
            ],
            8..24,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    fn quote(s: &str) -> String {
        format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
    }

    fn leaks(shown: &str, secret: &str) -> bool {
        let decoded = cdc_core::support::percent_decode(shown).unwrap_or_default();
        shown.contains(secret) || shown.contains(&encode(secret)) || decoded.contains(secret)
    }

    proptest! {
        #[test]
        fn postgres_passwords_never_show(secret in secret(), user in "[a-z]{1,8}") {
            let forms = [
                format!("postgres://{user}:{}@db.example:5432/app", encode(&secret)),
                format!("postgresql://{user}@db.example/app?password={}&sslmode=disable", encode(&secret)),
                format!("host=db.example user={user} password={} dbname=app", quote(&secret)),
                format!("host=db.example password = {} user={user}", quote(&secret)),
            ];
            for form in forms {
                let parsed = form.parse::<tokio_postgres::Config>();
                let shown = super::postgres(&form);
                prop_assert!(!leaks(&shown, &secret), "{form} -> {shown}");
                if parsed.is_ok() {
                    prop_assert!(shown.contains("***"), "{form} -> {shown}");
                    prop_assert!(shown.contains("db.example"), "{form} -> {shown}");
                }
            }
            // No password: shown as given, no `***`.
            let plain = format!("postgres://{user}@db.example/app");
            prop_assert_eq!(super::postgres(&plain), plain);
        }

        #[test]
        fn redis_passwords_never_show(secret in secret(), user in "[a-z]{1,8}") {
            let forms = [
                format!("redis://{user}:{}@cache.example:6379/0", encode(&secret)),
                format!("rediss://:{}@cache.example", encode(&secret)),
                format!("redis+unix:///run/redis.sock?pass={}", encode(&secret)),
                format!("redis://cache.example/0?pass={}", encode(&secret)),
            ];
            for form in forms {
                let shown = super::redis(&form);
                prop_assert!(!leaks(&shown, &secret), "{form} -> {shown}");
            }
            let plain = format!("redis://{user}@cache.example:6379/0");
            prop_assert_eq!(super::redis(&plain), plain);
        }
    }
}
