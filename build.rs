//! Compiles kernels/*.cu with NVRTC into per-architecture cubins (sm_80, sm_86, sm_89, sm_90a,
//! sm_120) plus compute_80 PTX as the fallback, and embeds them in the binary (OUT_DIR/kernels.rs).
//!
//! NVRTC comes from pip wheels (scripts/install-nvrtc.sh puts them in .cuda/), or from
//! NVRTC_LIB_DIR / CUDA_INCLUDE_DIR. Without NVRTC the build still succeeds, CPU-only, with a
//! warning (set FLUX2_REQUIRE_KERNELS=1 to make that an error, as CI does). A kernel that fails
//! to compile for any target always fails the build.

use std::path::{Path, PathBuf};

/// NVRTC --gpu-architecture values, also the images' names in the binary. sm_90a holds the
/// Hopper-only instructions; compute_80 is PTX for cards newer than the cubins.
const TARGETS: [&str; 6] = ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_120", "compute_80"];

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["NVRTC_LIB_DIR", "CUDA_INCLUDE_DIR", "FLUX2_REQUIRE_KERNELS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(no_kernels)");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let require = std::env::var("FLUX2_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    if std::env::var("CARGO_FEATURE_CUDA").is_err() {
        write_registry(&out_dir, &[], "built without the cuda feature");
        return;
    }
    let lib_dir = std::env::var("NVRTC_LIB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.join(".cuda/nvidia/cuda_nvrtc/lib"));
    let include = std::env::var("CUDA_INCLUDE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.join(".cuda/nvidia/cuda_runtime/include"));
    let nvrtc = lib_dir.join("libnvrtc.so.12");
    if !nvrtc.is_file() || !include.join("cuda_bf16.h").is_file() {
        let msg = format!(
            "NVRTC not found ({} / {}): building without GPU kernels; run scripts/install-nvrtc.sh",
            nvrtc.display(),
            include.display()
        );
        if require {
            panic!("{msg} (FLUX2_REQUIRE_KERNELS=1)");
        }
        println!("cargo:warning={msg}");
        println!("cargo:rustc-cfg=no_kernels");
        write_registry(&out_dir, &[], &msg);
        return;
    }
    preload_nvrtc(&lib_dir);

    let kernel_dir = manifest.join("kernels");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernel_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    let jobs: Vec<(PathBuf, &str)> =
        sources.iter().flat_map(|s| TARGETS.iter().map(move |arch| (s.clone(), *arch))).collect();
    let results: Vec<(String, String, PathBuf)> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(src, arch)| {
                let (include, kernel_dir, out_dir) = (&include, &kernel_dir, &out_dir);
                scope.spawn(move || {
                    let module = src.file_stem().unwrap().to_string_lossy().to_string();
                    let image = compile(src, arch, include, kernel_dir);
                    let ext = if arch.starts_with("compute") { "ptx" } else { "cubin" };
                    let path = out_dir.join(format!("{module}.{arch}.{ext}"));
                    std::fs::write(&path, image).unwrap();
                    (module, arch.to_string(), path)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    write_registry(&out_dir, &results, "");
}

/// NVRTC looks up its builtins library by bare soname, so load it (then libnvrtc) by absolute
/// path first; cudarc's later dlopen("libnvrtc.so.12") then finds the loaded library.
fn preload_nvrtc(lib_dir: &Path) {
    let mut builtins: Vec<PathBuf> = std::fs::read_dir(lib_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("libnvrtc-builtins.so"))
        .collect();
    builtins.sort();
    for lib in builtins.iter().chain(std::iter::once(&lib_dir.join("libnvrtc.so.12"))) {
        let handle =
            unsafe { libloading::Library::new(lib) }.unwrap_or_else(|e| panic!("loading {}: {e}", lib.display()));
        std::mem::forget(handle);
    }
}

fn compile(src: &Path, arch: &str, include: &Path, kernel_dir: &Path) -> Vec<u8> {
    use cudarc::nvrtc::{result, sys};
    let code = std::fs::read_to_string(src).unwrap();
    let name = src.file_name().unwrap().to_string_lossy().to_string();
    let opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
        format!("--include-path={}", include.display()),
        format!("--include-path={}", kernel_dir.display()),
    ];
    let c_code = std::ffi::CString::new(code).unwrap();
    let c_name = std::ffi::CString::new(name.clone()).unwrap();
    let prog = result::create_program(&c_code, Some(&c_name)).unwrap();
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| {
            String::from_utf8_lossy(&l.iter().map(|&c| c as u8).collect::<Vec<_>>()).trim_end_matches('\0').to_string()
        })
        .unwrap_or_default();
    if compiled.is_err() {
        panic!("NVRTC failed to compile {name} for {arch}:\n{log}");
    }
    if log.contains("warning") {
        println!("cargo:warning={name} ({arch}): {}", log.lines().find(|l| l.contains("warning")).unwrap_or(""));
    }
    let image = unsafe {
        if arch.starts_with("compute") {
            result::get_ptx(prog).unwrap().iter().map(|&c| c as u8).collect::<Vec<u8>>()
        } else {
            let mut size = 0usize;
            assert_eq!(sys::nvrtcGetCUBINSize(prog, &mut size), sys::nvrtcResult::NVRTC_SUCCESS);
            let mut buf = vec![0u8; size];
            assert_eq!(sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _), sys::nvrtcResult::NVRTC_SUCCESS);
            buf
        }
    };
    unsafe { result::destroy_program(prog) }.unwrap();
    assert!(!image.is_empty(), "NVRTC produced an empty image for {name} ({arch})");
    image
}

/// `KERNEL_IMAGES`: (module, target, bytes) for every compiled image; `KERNEL_STATUS` says why
/// there are none.
fn write_registry(out_dir: &Path, images: &[(String, String, PathBuf)], status: &str) {
    let mut s = String::from("/// (module, target, image): cubins per architecture and compute_80 PTX.\n");
    s.push_str("pub static KERNEL_IMAGES: &[(&str, &str, &[u8])] = &[\n");
    for (module, target, path) in images {
        s.push_str(&format!("    ({module:?}, {target:?}, include_bytes!({:?})),\n", path.display().to_string()));
    }
    s.push_str("];\n");
    s.push_str(&format!("pub static KERNEL_STATUS: &str = {status:?};\n"));
    s.push_str("/// Every target build.rs compiles for (whether or not this build had NVRTC).\n");
    s.push_str(&format!("pub static KERNEL_TARGETS: &[&str] = &{TARGETS:?};\n"));
    std::fs::write(out_dir.join("kernels.rs"), s).unwrap();
}
