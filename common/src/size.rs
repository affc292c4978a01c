//! Human byte sizes for command-line options and messages: `65536`, `64KiB`,
//! `512MiB`, `1GiB` (also `K`/`KB`/`M`/`MB`/`G`/`GB`, all powers of 1024).

/// Parses `65536`, `64KiB`, `512MiB`, `1GiB` (units are powers of 1024;
/// `K`, `KB`, `M`, `MB`, `G`, `GB` and lower case mean the same).
pub fn parse_size(input: &str) -> Result<u64, String> {
    let input = input.trim();
    let split = input
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(input.len());
    let (number, unit) = input.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid size {input:?}: expected e.g. 65536, 64KiB, 512MiB, 1GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "invalid size unit {unit:?} in {input:?}: use KiB, MiB, GiB or TiB"
            ));
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {input:?} is too large"))
}

/// `1.0 GiB`, `64.0 KiB`, `1.5 MiB`, `100 bytes`: one decimal, the largest
/// unit the size reaches.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1 GB"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(100), "100 bytes");
        assert_eq!(human_size(65536), "64.0 KiB");
        assert_eq!(human_size(1 << 30), "1.0 GiB");
        assert_eq!(human_size(3 << 19), "1.5 MiB");
    }
}
