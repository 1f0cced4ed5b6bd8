//! Which vector instructions the CPU has, detected once at run time, so
//! one binary runs at its best on any x86-64.

/// The best instruction set the kernels have a path for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum X86 {
    /// Neither AVX2 nor FMA: the portable paths.
    None,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX2 plus AVX-VNNI's 256-bit integer multiply-adds.
    AvxVnni,
    /// AVX2 plus AVX-512 (F, BW, DQ, VL) with VNNI.
    Avx512Vnni,
}

#[cfg(target_arch = "x86_64")]
pub fn x86() -> X86 {
    use std::sync::OnceLock;
    static BEST: OnceLock<X86> = OnceLock::new();
    *BEST.get_or_init(|| {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if !avx2 {
            X86::None
        } else if is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
        {
            X86::Avx512Vnni
        } else if is_x86_feature_detected!("avxvnni") {
            X86::AvxVnni
        } else {
            X86::Avx2
        }
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn x86() -> X86 {
    X86::None
}
