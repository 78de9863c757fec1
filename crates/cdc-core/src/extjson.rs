//! Relaxed Extended JSON as every part of this project writes it.
//!
//! The `bson` crate's relaxed form writes a date's fraction with as few digits as it needs
//! (`…:12.14Z`, `…:12.4Z`, `…:12Z`), so dates written as text do not sort (`…12.4Z` sorts
//! after `…12.41Z`). MongoDB's Extended JSON specification asks for exactly three
//! fractional digits when there is a fraction; this project writes three always
//! (`…:12.000Z` too), so that every date of the years 1970–9999 is one fixed-width string
//! and text order is time order. Readers of the specification's relaxed form take both.
//! Dates outside those years keep the canonical `{"$numberLong": …}` form, as the
//! specification says.

use bson::Bson;
use serde_json::Value;

/// `value` as relaxed Extended JSON, dates with exactly three fractional digits.
pub fn to_relaxed_json(value: Bson) -> Value {
    match value {
        Bson::Document(doc) => Value::Object(
            doc.into_iter()
                .map(|(k, v)| (k, to_relaxed_json(v)))
                .collect(),
        ),
        Bson::Array(items) => Value::Array(items.into_iter().map(to_relaxed_json).collect()),
        Bson::DateTime(dt) => match iso_millis(dt.timestamp_millis()) {
            Some(text) => serde_json::json!({ "$date": text }),
            None => {
                serde_json::json!({ "$date": { "$numberLong": dt.timestamp_millis().to_string() } })
            }
        },
        other => other.into_relaxed_extjson(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a time in the years 1970–9999, else `None`.
fn iso_millis(ms: i64) -> Option<String> {
    // 10000-01-01T00:00:00Z in milliseconds.
    const END: i64 = 253_402_300_800_000;
    if !(0..END).contains(&ms) {
        return None;
    }
    let (days, in_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (h, rest) = (in_day / 3_600_000, in_day % 3_600_000);
    let (min, rest) = (rest / 60_000, rest % 60_000);
    let (s, milli) = (rest / 1000, rest % 1000);
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z"
    ))
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_have_three_digits_and_sort_as_text() {
        let date = |ms: i64| to_relaxed_json(Bson::DateTime(bson::DateTime::from_millis(ms)));
        assert_eq!(
            date(0),
            serde_json::json!({ "$date": "1970-01-01T00:00:00.000Z" })
        );
        // 2024-02-29T12:34:12.140Z and .400Z, .410Z
        let base = 1_709_210_052_000;
        assert_eq!(date(base + 140)["$date"], "2024-02-29T12:34:12.140Z");
        let texts: Vec<String> = [base, base + 4, base + 400, base + 410, base + 1000]
            .iter()
            .map(|ms| date(*ms)["$date"].as_str().unwrap().to_owned())
            .collect();
        let mut sorted = texts.clone();
        sorted.sort();
        assert_eq!(texts, sorted);
        // Outside 1970–9999: the canonical form.
        assert_eq!(date(-1)["$date"]["$numberLong"], "-1");
        assert_eq!(
            date(253_402_300_800_000)["$date"]["$numberLong"],
            "253402300800000"
        );
        assert_eq!(
            date(253_402_300_799_999)["$date"],
            "9999-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn every_date_agrees_with_bson_s_own_rendering() {
        // bson's RFC 3339 rendering, fraction padded to three digits, is the same instant.
        for ms in (0..400).map(|i| i * 7_919_993_123_457_i64 % 253_402_300_800_000) {
            let ours = to_relaxed_json(Bson::DateTime(bson::DateTime::from_millis(ms)));
            let text = ours["$date"].as_str().unwrap();
            let back = bson::DateTime::parse_rfc3339_str(text).unwrap();
            assert_eq!(back.timestamp_millis(), ms, "{text}");
            assert_eq!(text.len(), 24, "{text}");
        }
    }

    #[test]
    fn nested_values_are_converted() {
        let d = bson::doc! { "a": [ { "t": bson::DateTime::from_millis(5) } ], "n": 1_i64 };
        let v = to_relaxed_json(Bson::Document(d));
        assert_eq!(v["a"][0]["t"]["$date"], "1970-01-01T00:00:00.005Z");
        assert_eq!(v["n"], 1);
    }
}
