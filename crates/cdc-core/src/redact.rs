//! Hiding secrets in connection strings shown in errors, `Debug` output and logs.
//!
//! Each client crate finds the secrets of its own connection strings with its own parser
//! (so a secret is found wherever that client would read one); this module takes them out
//! of the text, in every form the text may hold them.

/// `text` with every occurrence of each secret replaced by `***`: as written, and in the
/// forms a connection string holds it (percent-encoded, form-encoded with a space as `+`,
/// or quoted with backslash escapes as libpq's key-value strings do). `None` when a secret would still be readable after
/// that (written in a form not recognised): the caller then shows nothing of the text.
/// Empty secrets are ignored; with no secret the text comes back unchanged.
pub fn redact_secrets(text: &str, secrets: &[&str]) -> Option<String> {
    let secrets: Vec<&str> = secrets.iter().copied().filter(|s| !s.is_empty()).collect();
    let mut out = text.to_owned();
    for secret in &secrets {
        let upper = percent_encode(secret, true);
        let lower = percent_encode(secret, false);
        let mut forms = vec![
            format!("'{}'", quote(secret)),
            // As a form-encoded query value (a space as `+`), as `url` writes and reads
            // query pairs.
            upper.replace("%20", "+"),
            lower.replace("%20", "+"),
            upper,
            lower,
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
    let form_decoded = percent_decode_lossy(&out.replace('+', " "));
    let readable = secrets
        .iter()
        .any(|s| out.contains(s) || decoded.contains(s) || form_decoded.contains(s));
    (!readable).then_some(out)
}

fn quote(secret: &str) -> String {
    secret.replace('\\', "\\\\").replace('\'', "\\'")
}

/// Every byte but the URL's unreserved ones (RFC 3986: letters, digits, `-._~`).
const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `secret` with every byte outside the URL's unreserved set as `%XX`, in upper- or
/// lower-case hexadecimal (both are valid and mean the same).
fn percent_encode(secret: &str, upper: bool) -> String {
    let encoded = percent_encoding::utf8_percent_encode(secret, RESERVED).to_string();
    if upper {
        return encoded;
    }
    // Only escapes hold letters that are not the secret's own: lower the two digits
    // after each `%` (the encoded text is ASCII).
    let mut out = String::with_capacity(encoded.len());
    let mut digits = 0;
    for c in encoded.chars() {
        if c == '%' {
            digits = 2;
            out.push(c);
        } else if digits > 0 {
            digits -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Percent-decodes `text`: `None` when a `%` is not followed by two hexadecimal digits
/// (which URL readers keep as written: here it is taken for a mistake) or the bytes are
/// not UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let malformed = bytes.iter().enumerate().any(|(i, b)| {
        *b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if malformed {
        return None;
    }
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

/// Percent-decodes what can be decoded: a malformed escape stays as written, and bytes
/// that are not UTF-8 become U+FFFD.
pub fn percent_decode_lossy(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
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
        assert_eq!(
            redact_secrets("x://u:%c3%a9%2b%2f@h", &["é+/"]).as_deref(),
            Some("x://u:***@h")
        );
        assert_eq!(
            redact_secrets("x://h/?pass=a+b%2B", &["a b+"]).as_deref(),
            Some("x://h/?pass=***")
        );
        // Form-encoded but written with `%20` in one place and `+` in another.
        assert_eq!(redact_secrets("x://h/?pass=a%20b+c", &["a b c"]), None);
    }

    #[test]
    fn strict_decoding_refuses_malformed_escapes_and_bytes_that_are_not_utf8() {
        assert_eq!(percent_decode("a%2Fb%c3%A9").as_deref(), Some("a/bé"));
        assert_eq!(percent_decode("a%zz"), None);
        assert_eq!(percent_decode("a%4"), None);
        assert_eq!(percent_decode("%FF"), None);
        assert_eq!(percent_decode_lossy("a%2Fb%zz%4"), "a/b%zz%4");
        assert_eq!(percent_decode_lossy("a%FFb"), "a\u{FFFD}b");
        assert_eq!(percent_encode("a b/é~", true), "a%20b%2F%C3%A9~");
        assert_eq!(percent_encode("a b/é~", false), "a%20b%2f%c3%a9~");
    }
}
