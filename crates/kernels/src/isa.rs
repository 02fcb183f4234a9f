//! The instruction set the kernels use, chosen once at start-up.
//!
//! Detection picks the best path the CPU has; `MLASERVE_KERNEL` (`auto`, `avx512bf16`, `avx512`,
//! `avx2`, `neon`, `portable`) forces one for tests and benchmarks, and naming a path the CPU lacks is an
//! error rather than a silent fallback.

use std::fmt;
use std::sync::OnceLock;

/// A kernel path, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F/BW/VL plus `vdpbf16ps`: bf16 weights against bf16 activations in pairs. Used only
    /// where the activations are bf16 already; f32 activations take the [`Isa::Avx512`] loops.
    /// Also needs AVX512_VBMI (`vpermi2b`, FP8 → bf16 by byte lookup): Zen 4/5 and Intel since Ice
    /// Lake have both; Cooper Lake (BF16 without VBMI) takes [`Isa::Avx512`].
    Avx512Bf16,
    /// AVX-512F/BW/VL (16 lanes, masked edges) with F16C for FP8 widening.
    Avx512,
    /// AVX2 + FMA + F16C (8 lanes).
    Avx2,
    /// aarch64 NEON (4 lanes).
    Neon,
    /// Plain Rust, any CPU.
    Portable,
}

/// Every path, best first.
pub const ALL: [Isa; 5] = [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Portable];

/// The environment variable that forces a path.
pub const ENV: &str = "MLASERVE_KERNEL";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IsaError {
    #[error("{ENV}={0:?} is not a kernel path (auto, avx512bf16, avx512, avx2, neon, portable)")]
    Unknown(String),
    #[error("{ENV}={0}: this CPU lacks it (it has {1})")]
    Unsupported(Isa, Isa),
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        ALL.into_iter().find(|i| i.name() == s.trim().to_ascii_lowercase())
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
            match self {
                Isa::Avx512Bf16 => avx512 && has!("avx512bf16") && has!("avx512vbmi"),
                Isa::Avx512 => avx512,
                Isa::Avx2 => avx2,
                Isa::Neon => false,
                Isa::Portable => true,
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            match self {
                Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
                Isa::Portable => true,
                _ => false,
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            self == Isa::Portable
        }
    }

    /// The best path this CPU supports.
    pub fn detect() -> Isa {
        ALL.into_iter().find(|i| i.supported()).unwrap_or(Isa::Portable)
    }

    /// The path `value` (of [`ENV`]) asks for; unset, empty or `auto` detects.
    pub fn from_setting(value: Option<&str>) -> Result<Isa, IsaError> {
        let v = value.map(str::trim).unwrap_or("");
        if v.is_empty() || v.eq_ignore_ascii_case("auto") {
            return Ok(Isa::detect());
        }
        let isa = Isa::parse(v).ok_or_else(|| IsaError::Unknown(v.to_string()))?;
        if !isa.supported() {
            return Err(IsaError::Unsupported(isa, Isa::detect()));
        }
        Ok(isa)
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

static SELECTED: OnceLock<Isa> = OnceLock::new();

/// Chooses the process's path from [`ENV`]; call once at start-up so a bad value fails there.
/// Later calls return the first choice.
pub fn init_from_env() -> Result<Isa, IsaError> {
    if let Some(&isa) = SELECTED.get() {
        return Ok(isa);
    }
    let isa = Isa::from_setting(std::env::var(ENV).ok().as_deref())?;
    Ok(*SELECTED.get_or_init(|| isa))
}

/// The process's path: the one [`init_from_env`] chose, else [`ENV`] if valid, else detection.
pub fn selected() -> Isa {
    *SELECTED.get_or_init(|| {
        Isa::from_setting(std::env::var(ENV).ok().as_deref()).unwrap_or_else(|_| Isa::detect())
    })
}

/// The features of this CPU that matter to the kernels, for logs and benchmarks.
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        let list = [
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("f16c", has!("f16c")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512vl", has!("avx512vl")),
            ("avx512bf16", has!("avx512bf16")),
            ("avx512vbmi", has!("avx512vbmi")),
            ("avx512vnni", has!("avx512vnni")),
        ];
        list.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect::<Vec<_>>().join(" ")
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        let list = [
            ("neon", has!("neon")),
            ("fp16", has!("fp16")),
            ("bf16", has!("bf16")),
            ("dotprod", has!("dotprod")),
            ("i8mm", has!("i8mm")),
            ("sve", has!("sve")),
        ];
        let on: Vec<&str> = list.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
        format!("aarch64 {}", on.join(" "))
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        std::env::consts::ARCH.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_refuse() {
        assert_eq!(Isa::from_setting(None), Ok(Isa::detect()));
        assert_eq!(Isa::from_setting(Some(" AUTO ")), Ok(Isa::detect()));
        assert_eq!(Isa::from_setting(Some("portable")), Ok(Isa::Portable));
        assert!(matches!(Isa::from_setting(Some("sse9")), Err(IsaError::Unknown(_))));
        for isa in ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
            let r = Isa::from_setting(Some(isa.name()));
            if isa.supported() {
                assert_eq!(r, Ok(isa));
            } else {
                assert_eq!(r, Err(IsaError::Unsupported(isa, Isa::detect())));
            }
        }
        // Detection takes the best supported path.
        let best = Isa::detect();
        assert!(best.supported());
        assert!(ALL.iter().take_while(|&&i| i != best).all(|i| !i.supported()));
    }
}
