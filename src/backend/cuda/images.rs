//! Kernel images embedded by build.rs, and the choice of image for a compute capability.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The compiled target to load on a device of compute capability `major.minor`: the newest
/// cubin of the same major not above the device (SASS runs on later minors), `sm_90a` only on
/// 9.0 exactly, else the compute_80 PTX for the driver to JIT (8.0 and newer).
pub fn target_for(major: i32, minor: i32) -> Option<&'static str> {
    let cc = major * 10 + minor;
    let cubin = match (major, minor) {
        (9, 0) => Some("sm_90a"),
        (12, _) => Some("sm_120"),
        (8, m) if m >= 9 => Some("sm_89"),
        (8, m) if m >= 6 => Some("sm_86"),
        (8, _) => Some("sm_80"),
        _ => None,
    };
    match cubin {
        Some(t) if KERNEL_IMAGES.iter().any(|(_, target, _)| *target == t) => Some(t),
        _ if cc >= 80 && KERNEL_IMAGES.iter().any(|(_, t, _)| *t == "compute_80") => Some("compute_80"),
        _ => None,
    }
}

/// Targets embedded in this binary, for `flux2 doctor`.
pub fn embedded_targets() -> Vec<&'static str> {
    let mut t: Vec<&str> = KERNEL_IMAGES.iter().map(|(_, t, _)| *t).collect();
    t.sort();
    t.dedup();
    t
}

/// Kernel modules embedded in this binary.
pub fn embedded_modules() -> Vec<&'static str> {
    let mut m: Vec<&str> = KERNEL_IMAGES.iter().map(|(m, _, _)| *m).collect();
    m.sort();
    m.dedup();
    m
}

pub fn image(module: &str, target: &str) -> Option<&'static [u8]> {
    KERNEL_IMAGES.iter().find(|(m, t, _)| *m == module && *t == target).map(|(_, _, b)| *b)
}
