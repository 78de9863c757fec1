//! Hiding secrets in connection strings shown in errors, `Debug` output and logs.
//!
//! Each client crate finds the secrets of its own connection strings with its own parser
//! (so a secret is found wherever that client would read one); this module takes them out
//! of the text, in every form the text may hold them.

/// `text` with every occurrence of each secret replaced by `***`: as written, and in the
/// forms a connection string holds it (percent-encoded, or quoted with backslash escapes
/// as libpq's key-value strings do). `None` when a secret would still be readable after
/// that (written in a form not recognised): the caller then shows nothing of the text.
/// Empty secrets are ignored; with no secret the text comes back unchanged.
pub fn redact_secrets(text: &str, secrets: &[&str]) -> Option<String> {
    let secrets: Vec<&str> = secrets.iter().copied().filter(|s| !s.is_empty()).collect();
    let mut out = text.to_owned();
    for secret in &secrets {
        let mut forms = vec![
            format!("'{}'", quote(secret)),
            percent_encode(secret, true),
            percent_encode(secret, false),
            (*secret).to_owned(),
        ];
        // Longest first: a quoted form is replaced whole, quotes included.
        forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        forms.dedup();
        for form in forms {
            out = out.replace(&form, "***");
        }
    }
    let decoded = percent_decode_lossy(&out);
    let readable = secrets
        .iter()
        .any(|s| out.contains(s) || decoded.contains(s));
    (!readable).then_some(out)
}

fn quote(secret: &str) -> String {
    secret.replace('\\', "\\\\").replace('\'', "\\'")
}

/// Every byte outside the URL's unreserved set as `%XX`.
fn percent_encode(secret: &str, upper: bool) -> String {
    let mut out = String::with_capacity(secret.len() * 3);
    for b in secret.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else if upper {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

/// Percent-decodes `text`: `None` when an escape is malformed or the bytes are not UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(text.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-decodes what can be decoded: a malformed escape stays as written, and bytes
/// that are not UTF-8 become U+FFFD.
pub fn percent_decode_lossy(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_is_hidden_and_nothing_else() {
        assert_eq!(redact_secrets("x://u@h/", &[]).as_deref(), Some("x://u@h/"));
        assert_eq!(
            redact_secrets("x://u:p%2Fq%3Fr@h/", &["p/q?r"]).as_deref(),
            Some("x://u:***@h/")
        );
        assert_eq!(
            redact_secrets("host=h password='a b\\'c' user=u", &["a b'c"]).as_deref(),
            Some("host=h password=*** user=u")
        );
        // Written half-encoded: not recognised, so nothing may be shown.
        assert_eq!(redact_secrets("x://u:p%2Fq?r@h", &["p/q?r"]), None);
    }
}
