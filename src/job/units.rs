//! Durations (`90s`, `5m`, `1d`) and fixed time-zone offsets (`+08:00`).

/// Parses a duration such as `500ms`, `90s`, `5m`, `2h`, `1d` into
/// milliseconds. A bare `0` is accepted; anything else needs a unit.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(0);
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {text:?} has no unit (use ms, s, m, h or d)"))?;
    let (digits, unit) = t.split_at(split);
    let n: i64 = digits.parse().map_err(|_| format!("duration {text:?} must start with a whole number"))?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("duration {text:?}: unknown unit {unit:?} (use ms, s, m, h or d)")),
    };
    n.checked_mul(unit_ms).ok_or_else(|| format!("duration {text:?} is too large"))
}

/// Parses a size: a whole number of bytes, or with a unit `B`, `KiB`,
/// `MiB` or `GiB` (`"64MiB"`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("size {text:?} must start with a whole number"))?;
    let unit_bytes = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        u => return Err(format!("size {text:?}: unknown unit {u:?} (use B, KiB, MiB or GiB)")),
    };
    n.checked_mul(unit_bytes).ok_or_else(|| format!("size {text:?} is too large"))
}

/// Parses a fixed UTC offset: `+08:00`, `-05:30`, `+0800`, `UTC` or `Z`.
pub fn parse_timezone_offset_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("utc") || t == "Z" {
        return Ok(0);
    }
    let bad = || format!("time zone {text:?} must be a fixed offset like \"+08:00\" or \"UTC\"");
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1, &t[1..]),
        Some(b'-') => (-1, &t[1..]),
        _ => return Err(bad()),
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let hours: i64 = digits[..2].parse().map_err(|_| bad())?;
    let minutes: i64 = digits[2..].parse().map_err(|_| bad())?;
    if hours > 14 || minutes > 59 {
        return Err(bad());
    }
    Ok(sign * (hours * 3_600_000 + minutes * 60_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1d"), Ok(86_400_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("0"), Ok(0));
        for bad in ["", "5", "m", "5x", "-5m", "1.5h", "5 m"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn offsets() {
        assert_eq!(parse_timezone_offset_ms("+08:00"), Ok(28_800_000));
        assert_eq!(parse_timezone_offset_ms("-05:30"), Ok(-19_800_000));
        assert_eq!(parse_timezone_offset_ms("+0545"), Ok(20_700_000));
        assert_eq!(parse_timezone_offset_ms("UTC"), Ok(0));
        for bad in ["Asia/Shanghai", "8", "+8", "+25:00", "+08:61"] {
            assert!(parse_timezone_offset_ms(bad).is_err(), "{bad:?} accepted");
        }
    }
}
