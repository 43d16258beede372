//! Durations and sizes as people type them on a command line: `--timeout 1.5s`,
//! `--kill-after 500ms`, `--max-output 1M`. Exact (no floating point), total (any text gives a
//! value or a message, never a panic), and strict: anything not understood is refused, so a typo
//! never becomes a surprising number.

use std::time::Duration;

/// Nanoseconds per unit. `m` is minutes, as in timeout(1); `ms` and `us` are their own units.
const DURATION_UNITS: [(&str, u64); 6] = [
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];

/// A duration: a decimal number with an optional unit (`us`, `ms`, `s`, `m`, `h`, `d`); a bare
/// number is seconds, as timeout(1) reads it. `1.5s`, `.5`, `500ms`, `2m`, `0`.
///
/// A fraction finer than a nanosecond rounds up: a positive duration never reads as 0 (which
/// the options give a meaning of its own). Negative numbers, signs, spaces, exponents, unknown
/// units and values past `u64` nanoseconds (≈584 years) are refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid =
        || format!("{text:?} is not a duration (a number and a unit: us, ms, s, m, h or d)");
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let scale = if unit.is_empty() {
        1_000_000_000
    } else {
        DURATION_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(invalid)?
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(invalid());
    }
    let nanos = scaled_decimal(whole, fraction, scale)
        .ok_or_else(|| format!("{text:?} is too long (at most about 584 years)"))?;
    Ok(Duration::from_nanos(nanos))
}

/// `whole.fraction` (ASCII digits each) times `scale`, rounded up to a whole number; `None`
/// past `u64`.
fn scaled_decimal(whole: &str, fraction: &str, scale: u64) -> Option<u64> {
    let mut value: u64 = 0;
    for digit in whole.bytes() {
        value = value
            .checked_mul(10)?
            .checked_add(u64::from(digit.wrapping_sub(b'0')))?;
    }
    let mut value = value.checked_mul(scale)?;
    // The fraction, digit by digit: each contributes digit × scale / 10^k. Exact while
    // `scale / 10^k` is whole; past that, any nonzero rest rounds the total up by one.
    let mut unit = scale;
    let mut rest_nonzero = false;
    for digit in fraction.bytes() {
        let digit = u64::from(digit.wrapping_sub(b'0'));
        if unit >= 10 && unit.is_multiple_of(10) {
            unit /= 10;
            value = value.checked_add(digit.checked_mul(unit)?)?;
        } else if digit != 0 {
            rest_nonzero = true;
        }
    }
    if rest_nonzero {
        value = value.checked_add(1)?;
    }
    Some(value)
}

/// Binary multipliers: `K` and `KiB` are both 1024 (as in `head -c 1K`); the letter may be
/// lower case. `B` alone (or nothing) is bytes.
const SIZE_UNITS: [(&str, u32); 5] = [("", 0), ("K", 10), ("M", 20), ("G", 30), ("T", 40)];

/// A byte count: a whole number with an optional binary suffix, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`,
/// `T`/`TiB` (powers of 1024; the letter in either case), or `B`. `0` is allowed.
///
/// `KB`, `MB`, … are refused: some tools read them as powers of 1000, so they would be a guess.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || {
        format!(
            "{text:?} is not a size (a whole number of bytes, or with K, M, G or T: powers of 1024)"
        )
    };
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    if number.is_empty() {
        return Err(invalid());
    }
    let shift_of = |letter: &str| {
        SIZE_UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(letter))
            .map(|(_, shift)| *shift)
    };
    let shift = match suffix.strip_suffix("iB") {
        Some(letter) if !letter.is_empty() => shift_of(letter),
        Some(_) => None,
        None if suffix == "B" => Some(0),
        None => shift_of(suffix),
    };
    let Some(shift) = shift else {
        // `KB`: some tools mean 1000, some 1024. Say which we take instead of guessing.
        let letter = suffix.get(..1).unwrap_or_default();
        let ambiguous = suffix.len() == 2
            && suffix.get(1..).is_some_and(|b| b.eq_ignore_ascii_case("b"))
            && shift_of(letter).is_some_and(|shift| shift > 0);
        return Err(if ambiguous {
            format!("{text:?}: write {letter}iB or {letter} (powers of 1024)")
        } else {
            invalid()
        });
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is too large"))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("0", ms(0)),
            ("0s", ms(0)),
            ("30", ms(30_000)),
            ("30s", ms(30_000)),
            ("1.5s", ms(1_500)),
            ("1.5", ms(1_500)),
            (".5", ms(500)),
            ("2.", ms(2_000)),
            ("500ms", ms(500)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            ("1d", ms(86_400_000)),
            ("0.25m", ms(15_000)),
            ("250us", Duration::from_micros(250)),
            ("1.000000001", Duration::from_nanos(1_000_000_001)),
            ("007s", ms(7_000)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn a_positive_duration_never_rounds_to_zero() {
        assert_eq!(parse_duration("0.0000000001"), Ok(Duration::from_nanos(1)));
        assert_eq!(parse_duration("0.0001us"), Ok(Duration::from_nanos(1)));
        assert_eq!(parse_duration("0.0000us"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("1.0000000005"),
            Ok(Duration::from_nanos(1_000_000_001))
        );
    }

    #[test]
    fn garbage_negative_and_overflowing_durations_are_refused() {
        for text in [
            "", "s", ".", "..5", "1.2.3", "-1", "-1s", "+1", " 1", "1 s", "1S", "1sec", "1e3",
            "1ns", "inf", "nan", "1.5x", "1m1s", "0x10", "１", "1.5 ",
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains("not a duration"), "{text:?}: {err}");
        }
        for text in [
            "18446744074s",
            "99999999999999999999",
            "213504d",
            "5124096h",
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains("too long"), "{text:?}: {err}");
        }
        // The largest that fits.
        assert_eq!(
            parse_duration("18446744073.709551615"),
            Ok(Duration::from_nanos(u64::MAX))
        );
    }

    #[test]
    fn sizes_are_powers_of_1024() {
        for (text, want) in [
            ("0", 0),
            ("0K", 0),
            ("1", 1),
            ("100B", 100),
            ("1K", 1024),
            ("1k", 1024),
            ("1KiB", 1024),
            ("1kiB", 1024),
            ("1M", 1 << 20),
            ("3MiB", 3 << 20),
            ("1G", 1 << 30),
            ("2GiB", 2 << 30),
            ("1T", 1 << 40),
            ("16777215T", 16_777_215 << 40),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn ambiguous_garbage_and_overflowing_sizes_are_refused() {
        for text in [
            "", "K", "-1", "+1", "1.5M", " 1", "1 K", "1X", "1KK", "1iB", "1Ki", "0x10", "1e3",
        ] {
            let err = parse_size(text).unwrap_err();
            assert!(err.contains("not a size"), "{text:?}: {err}");
        }
        for text in ["1KB", "1mb", "1GB"] {
            let err = parse_size(text).unwrap_err();
            assert!(err.contains("powers of 1024"), "{text:?}: {err}");
        }
        for text in [
            "16777216T",
            "18446744073709551616",
            "99999999999999999999999G",
        ] {
            let err = parse_size(text).unwrap_err();
            assert!(err.contains("too large"), "{text:?}: {err}");
        }
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }
}
