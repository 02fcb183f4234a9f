//! Byte sizes as people write them on the command line: `141GB`, `140GiB`, `80 GB`, `512MiB`,
//! `1.5TB` or a plain number of bytes.
//!
//! Decimal suffixes are powers of 1000 (`KB`, `MB`, `GB`, `TB`; Kubernetes' `K`, `M`, `G`, `T`), binary
//! ones powers of 1024 (`KiB`, `MiB`, `GiB`, `TiB`; `Ki`, `Mi`, `Gi`, `Ti`); case does not matter, `B`
//! or no suffix means bytes. GPU data sheets quote decimal figures ("H200: 141 GB"), `nvidia-smi`
//! binary ones (MiB).

#[derive(Debug, thiserror::Error)]
#[error("{input:?} is not a size ({reason}); write e.g. 141GB, 140GiB, 512MiB or a number of bytes")]
pub struct ByteSizeError {
    input: String,
    reason: &'static str,
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Parses a size with an optional decimal or binary suffix (see the module notes).
pub fn parse_bytes(input: &str) -> Result<u64, ByteSizeError> {
    let err = |reason| ByteSizeError { input: input.to_string(), reason };
    let s = input.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = (&s[..split], s[split..].trim());
    if number.is_empty() {
        return Err(err("no number"));
    }
    let unit = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => KIB,
        "mi" | "mib" => MIB,
        "gi" | "gib" => GIB,
        "ti" | "tib" => TIB,
        _ => return Err(err("unknown unit")),
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(unit).ok_or_else(|| err("too large"));
    }
    let v: f64 = number.parse().map_err(|_| err("bad number"))?;
    let bytes = (v * unit as f64).floor();
    if !(bytes.is_finite() && bytes < u64::MAX as f64) {
        return Err(err("too large"));
    }
    Ok(bytes as u64)
}

/// `bytes` in GiB with two decimals, e.g. "81.73 GiB".
pub fn format_gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB as f64)
}

/// A signed byte figure (free memory may be negative) in GiB with two decimals.
pub fn format_gib_signed(bytes: i64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_and_binary_suffixes() {
        assert_eq!(parse_bytes("141GB").unwrap(), 141_000_000_000);
        assert_eq!(parse_bytes("140GiB").unwrap(), 140 * (1 << 30));
        assert_eq!(parse_bytes("80 gb").unwrap(), 80_000_000_000);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("250MB").unwrap(), 250_000_000);
        assert_eq!(parse_bytes("80Gi").unwrap(), 80 << 30);
        assert_eq!(parse_bytes("1.5TB").unwrap(), 1_500_000_000_000);
        assert_eq!(parse_bytes("0.5GiB").unwrap(), 1 << 29);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("4096B").unwrap(), 4096);
    }

    #[test]
    fn rejects_what_is_not_a_size() {
        for bad in ["", "GB", "12 parsecs", "1.2.3GB", "99999999999999999999TB", "-5GB"] {
            let e = parse_bytes(bad).unwrap_err().to_string();
            assert!(e.contains("is not a size"), "{bad}: {e}");
        }
    }

    #[test]
    fn formats_gib() {
        assert_eq!(format_gib(3 << 29), "1.50 GiB");
        assert_eq!(format_gib_signed(-(1 << 30)), "-1.00 GiB");
    }
}
