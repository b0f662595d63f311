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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel module is embedded for every target (build.rs fails on a compile error; this
    /// catches a registry that silently lost images).
    #[cfg(not(no_kernels))]
    #[test]
    fn every_module_has_every_target() {
        for module in super::super::KERNELS.iter().map(|(m, _)| *m) {
            for &t in KERNEL_TARGETS {
                assert!(image(module, t).is_some_and(|b| !b.is_empty()), "{module} has no {t} image");
            }
        }
        assert_eq!(target_for(9, 0), Some("sm_90a"));
        assert_eq!(target_for(8, 9), Some("sm_89"));
        assert_eq!(target_for(8, 7), Some("sm_86"));
        assert_eq!(target_for(12, 0), Some("sm_120"));
        assert_eq!(target_for(10, 0), Some("compute_80"));
        assert_eq!(target_for(7, 5), None);
    }

    /// The kernels loaded by name are exactly the `extern "C" __global__` functions of each
    /// module's source (a kernel missing from the list fails only at its first launch on a GPU).
    #[test]
    fn every_kernel_in_the_sources_is_registered() {
        for (module, names) in super::super::KERNELS {
            let path = format!("{}/kernels/{module}.cu", env!("CARGO_MANIFEST_DIR"));
            let src = std::fs::read_to_string(&path).unwrap();
            let marker = "extern \"C\" __global__ void ";
            let name = |rest: &'static str| -> &'static str {
                // Skip an optional `__launch_bounds__(...)` before the name.
                let rest = rest.strip_prefix("__launch_bounds__").map_or(rest, |r| &r[r.find(')').unwrap() + 1..]);
                rest.trim_start().split('(').next().unwrap()
            };
            let src: &'static str = Box::leak(src.into_boxed_str());
            let mut defined: Vec<&str> =
                src.match_indices(marker).map(|(i, _)| name(&src[i + marker.len()..])).collect();
            let mut registered = names.to_vec();
            defined.sort();
            registered.sort();
            assert_eq!(defined, registered, "{path}");
        }
    }

    #[cfg(no_kernels)]
    #[test]
    fn without_nvrtc_the_registry_says_why() {
        assert!(KERNEL_IMAGES.is_empty());
        assert!(KERNEL_STATUS.contains("NVRTC"));
    }
}
