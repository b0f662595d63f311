//! The CUDA emulator's own checks (cuda-sim/, docs/cuda-emulator.md): each seeded defect in the
//! small kernels of cuda-sim/tests/defects.cu is reported as a launch error naming the kernel and
//! the fault, its correct twin runs clean, and emulated tensor-core math equals a plain product.
//! Run under scripts/with-cuda-sim.sh; without the emulator the checks are reported as ignored,
//! and FLUX2_EXPECT_SIM=1 (the test script) turns that into a failure.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use half::bf16;

/// One fresh context per check: a kernel fault is sticky, as on a GPU, until the context goes.
struct Sim {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
}

/// NVRTC needs its builtins library loaded before itself (as build.rs does), else its first
/// compile crashes; both come from the pinned wheels in .cuda/.
fn preload_nvrtc(root: &str) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = std::path::Path::new(root).join(".cuda/nvidia/cuda_nvrtc/lib");
        let mut libs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/install-nvrtc.sh)", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("libnvrtc-builtins.so"))
            .collect();
        libs.sort();
        libs.push(dir.join("libnvrtc.so.12"));
        for lib in libs {
            std::mem::forget(
                unsafe { libloading::Library::new(&lib) }.unwrap_or_else(|e| panic!("{}: {e}", lib.display())),
            );
        }
    });
}

/// PTX of the defect kernels for `arch`. NVRTC crashes when it compiles in a process that has
/// loaded the emulated driver (a clash of their C++ runtimes), so a child process of this
/// binary that never loads it does the compiling (`nvrtc_child`).
fn ptx(arch: &'static str) -> Ptx {
    static CACHE: OnceLock<Mutex<Vec<(&'static str, String)>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap();
    if let Some((_, src)) = cache.iter().find(|(a, _)| *a == arch) {
        return Ptx::from_src(src.clone());
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap()).env(NVRTC_CHILD, arch).output().unwrap();
    assert!(out.status.success(), "compiling defects.cu for {arch}: {}", String::from_utf8_lossy(&out.stderr));
    let src = String::from_utf8(out.stdout).unwrap();
    cache.push((arch, src.clone()));
    Ptx::from_src(src)
}

const NVRTC_CHILD: &str = "FLUX2_SIM_TEST_NVRTC_ARCH";

fn nvrtc_child(arch: String) -> ! {
    let root = env!("CARGO_MANIFEST_DIR");
    preload_nvrtc(root);
    let source = std::fs::read_to_string(format!("{root}/cuda-sim/tests/defects.cu")).unwrap();
    let opts = CompileOptions {
        arch: Some(Box::leak(arch.into_boxed_str())),
        include_paths: vec![format!("{root}/kernels"), format!("{root}/.cuda/nvidia/cuda_runtime/include")],
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    match compile_ptx_with_opts(source, opts) {
        Ok(ptx) => {
            print!("{}", ptx.to_src());
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("NVRTC: {e:?}");
            std::process::exit(1)
        }
    }
}

fn open(arch: &'static str) -> Result<Sim, String> {
    let ctx = CudaContext::new(0).map_err(|e| e.to_string())?;
    let stream = ctx.default_stream();
    let module = ctx.load_module(ptx(arch)).map_err(|e| e.to_string())?;
    Ok(Sim { ctx, stream, module })
}

impl Sim {
    fn f(&self, name: &str) -> CudaFunction {
        self.module.load_function(name).unwrap()
    }
}

fn cfg(blocks: u32, threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem }
}

/// Launch `$name` with arguments; the launch's Result with the driver's error text.
macro_rules! launch {
    ($sim:expr, $name:expr, $cfg:expr $(, $arg:expr)* $(,)?) => {{
        let f = $sim.f($name);
        let mut b = $sim.stream.launch_builder(&f);
        $( let a = $arg; b.arg(a); )*
        unsafe { b.launch($cfg) }.map(|_| ()).and_then(|_| $sim.stream.synchronize()).map_err(|e| e.to_string())
    }};
}

fn expect_err(r: Result<(), String>, needles: &[&str]) {
    let e = r.expect_err("the seeded defect was not reported");
    for n in needles {
        assert!(e.contains(n), "error does not mention `{n}`: {e}");
    }
}

fn shared_memory_race_without_a_barrier() {
    {
        let s = open("compute_80").unwrap();
        let mut out = s.stream.alloc_zeros::<f32>(64).unwrap();
        expect_err(
            launch!(s, "race_missing_barrier", cfg(1, 64, 0), &mut out),
            &["race_missing_barrier", "shared-memory race", "thread (32,0,0) writes", "thread (0,0,0) read"],
        );
    }
    let s = open("compute_80").unwrap();
    let mut out = s.stream.alloc_zeros::<f32>(64).unwrap();
    launch!(s, "race_with_barrier", cfg(1, 64, 0), &mut out).unwrap();
    let got = s.stream.clone_dtoh(&out).unwrap();
    assert!(got.iter().enumerate().all(|(i, v)| *v == ((i + 32) % 64) as f32), "{got:?}");
}

fn out_of_bounds_write() {
    let s = open("compute_80").unwrap();
    let mut out = s.stream.alloc_zeros::<f32>(100).unwrap();
    launch!(s, "write_elements", cfg(1, 32, 0), &mut out, &100i32, &0i32).unwrap();
    expect_err(
        launch!(s, "write_elements", cfg(1, 32, 0), &mut out, &100i32, &1i32),
        &["write_elements", "ILLEGAL_ADDRESS", "past the end of the 400-byte allocation"],
    );
    // Sticky, as on a GPU: the context reports the fault until it is created again.
    assert!(s.stream.synchronize().is_err());
}

fn misaligned_cp_async() {
    let s = open("compute_80").unwrap();
    let src: Vec<bf16> = (0..8).map(|i| bf16::from_f32(i as f32)).collect();
    let src = s.stream.clone_htod(&src).unwrap();
    let mut out = s.stream.alloc_zeros::<bf16>(8).unwrap();
    launch!(s, "cp_async_to_offset", cfg(1, 32, 0), &src, &mut out, &16i32).unwrap();
    assert_eq!(s.stream.clone_dtoh(&out).unwrap(), s.stream.clone_dtoh(&src).unwrap());
    expect_err(
        launch!(s, "cp_async_to_offset", cfg(1, 32, 0), &src, &mut out, &8i32),
        &["MISALIGNED", "cp.async", "not aligned to 16"],
    );
}

fn reading_before_cp_async_wait() {
    let s = open("compute_80").unwrap();
    let src = s.stream.clone_htod(&[bf16::ONE; 8]).unwrap();
    let mut out = s.stream.alloc_zeros::<bf16>(1).unwrap();
    launch!(s, "cp_async_read_early", cfg(1, 1, 0), &src, &mut out, &1i32).unwrap();
    expect_err(
        launch!(s, "cp_async_read_early", cfg(1, 1, 0), &src, &mut out, &0i32),
        &["an asynchronous copy is still writing"],
    );
}

fn shared_memory_limits_and_the_opt_in_attribute() {
    let s = open("compute_80").unwrap();
    let optin =
        s.ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).unwrap() as u32;
    let mut out = s.stream.alloc_zeros::<f32>(1).unwrap();
    let n = 64 * 1024 / 4;
    // Above 48 KB without the attribute: refused, as the driver does.
    expect_err(
        launch!(s, "dynamic_smem_sum", cfg(1, 128, 64 * 1024), &mut out, &(n as i32)),
        &["opt-in", "MAX_DYNAMIC_SHARED_SIZE_BYTES"],
    );
    let f = s.f("dynamic_smem_sum");
    let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    f.set_attribute(attr, 64 * 1024).unwrap();
    launch!(s, "dynamic_smem_sum", cfg(1, 128, 64 * 1024), &mut out, &(n as i32)).unwrap();
    assert_eq!(s.stream.clone_dtoh(&out).unwrap()[0], n as f32);
    // More than the profile's opt-in maximum: the attribute itself is refused.
    let e = f.set_attribute(attr, optin as i32 + 16).unwrap_err().to_string();
    assert!(e.contains("exceed"), "{e}");
    // Using more than the launch asked for runs past the end of dynamic shared memory.
    expect_err(
        launch!(s, "dynamic_smem_sum", cfg(1, 128, 1024), &mut out, &257i32),
        &["past the end of the block", "1024 bytes of dynamic shared memory"],
    );
}

fn barrier_not_reached_by_every_thread() {
    let s = open("compute_80").unwrap();
    let mut out = s.stream.alloc_zeros::<f32>(64).unwrap();
    launch!(s, "barrier_divergent", cfg(1, 64, 0), &mut out, &0i32).unwrap();
    expect_err(
        launch!(s, "barrier_divergent", cfg(1, 64, 0), &mut out, &1i32),
        &["__syncthreads", "not reached by every thread"],
    );
}

fn launch_limits() {
    let s = open("compute_80").unwrap();
    let mut out = s.stream.alloc_zeros::<f32>(2048).unwrap();
    expect_err(launch!(s, "barrier_divergent", cfg(1, 1025, 0), &mut out, &0i32), &["1024 threads"]);
    let missing = s.module.load_function("not_a_kernel").unwrap_err().to_string();
    assert!(missing.contains("not in the loaded") && missing.contains("race_with_barrier"), "{missing}");
}

fn bf16_dot(a: &[bf16], b: &[bf16]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.to_f64() * y.to_f64()).sum()
}

fn mma_fragments_follow_the_ptx_layout() {
    let s = open("compute_80").unwrap();
    let mut seed = 7u32;
    let mut rnd = move || {
        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        bf16::from_f32((seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0)
    };
    let a: Vec<bf16> = (0..256).map(|_| rnd()).collect();
    let bt: Vec<bf16> = (0..128).map(|_| rnd()).collect();
    let want: Vec<f64> =
        (0..128).map(|i| bf16_dot(&a[(i / 8) * 16..(i / 8) * 16 + 16], &bt[(i % 8) * 16..(i % 8) * 16 + 16])).collect();
    let (da, db) = (s.stream.clone_htod(&a).unwrap(), s.stream.clone_htod(&bt).unwrap());
    let mut d = s.stream.alloc_zeros::<f32>(128).unwrap();
    for permute in [0i32, 1] {
        launch!(s, "mma_bf16_tile", cfg(1, 32, 0), &da, &db, &mut d, &permute).unwrap();
        let got = s.stream.clone_dtoh(&d).unwrap();
        let err = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
        if permute == 0 {
            assert!(err < 1e-5, "mma.m16n8k16 differs from the plain product by {err}");
        } else {
            assert!(err > 0.1, "a permuted A fragment went unnoticed (max difference {err})");
        }
    }
}

/// TMA + mbarrier + wgmma (sm_90a): a swizzled tile product equals the plain one, with the
/// tensor's edges read as zeros; each seeded misuse is reported (or, for accumulators read before
/// the wait, gives the stale value).
fn tma_and_wgmma_follow_the_ptx_definitions() {
    use flux2::backend::cuda::tensor_map::{row_major_128b, TileElem};
    let cc = CudaContext::new(0).unwrap().compute_capability().unwrap();
    if cc != (9, 0) {
        return; // wgmma and TMA are sm_90a instructions: only the H100 profile loads that image
    }
    // A: 50 rows x K = 56 (the box of 64 x 64 runs past both), Bt: 128 rows x 56.
    let (rows_a, k) = (50usize, 56usize);
    let mut seed = 11u32;
    let mut rnd = move || {
        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        bf16::from_f32((seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0)
    };
    let a: Vec<bf16> = (0..rows_a * k).map(|_| rnd()).collect();
    let bt: Vec<bf16> = (0..128 * k).map(|_| rnd()).collect();
    let want: Vec<f64> = (0..64 * 128)
        .map(|i| if i / 128 < rows_a { bf16_dot(&a[(i / 128) * k..][..k], &bt[(i % 128) * k..][..k]) } else { 0.0 })
        .collect();
    let smem = 1024 + 192 * 128 + 8;
    let run = |defect: i32| -> Result<Vec<f32>, String> {
        let s = open("sm_90a").unwrap();
        s.f("tma_wgmma_tile")
            .set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .unwrap();
        let (da, db) = (s.stream.clone_htod(&a).unwrap(), s.stream.clone_htod(&bt).unwrap());
        let mut d = s.stream.alloc_zeros::<f32>(64 * 128).unwrap();
        let pa = {
            let (p, _g) = cudarc::driver::DevicePtr::device_ptr(&da, &s.stream);
            p
        };
        let pb = {
            let (p, _g) = cudarc::driver::DevicePtr::device_ptr(&db, &s.stream);
            p
        };
        let ta = row_major_128b(pa, TileElem::Bf16, rows_a, k, 64).unwrap();
        let tb = row_major_128b(pb, TileElem::Bf16, 128, k, 128).unwrap();
        launch!(s, "tma_wgmma_tile", cfg(1, 128, smem), &ta, &tb, &mut d, &defect)?;
        Ok(s.stream.clone_dtoh(&d).unwrap())
    };
    let got = run(0).unwrap();
    let err = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
    assert!(err < 1e-4, "TMA + wgmma differ from the plain product by {err}");
    expect_err(run(1).map(|_| ()), &["tma_wgmma_tile", "wgmma reads its A operand", "TMA copy is still writing"]);
    expect_err(run(2).map(|_| ()), &["16384 bytes more than its expect_tx"]);
    expect_err(run(3).map(|_| ()), &["waits on the mbarrier", "parity 1", "deadlock"]);
    let stale = run(4).unwrap();
    assert_eq!(stale[0], 0.0, "accumulators read before wgmma.wait_group must be stale");
    // A from registers (the _rs form flash attention v4 uses for P): the same product.
    let rs = run(5).unwrap();
    let err = rs.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
    assert!(err < 1e-4, "wgmma with A in registers differs from the plain product by {err}");
    expect_err(run(6).map(|_| ()), &["wgmma with A in registers", "lane 5", "exited"]);
    expect_err(run(7).map(|_| ()), &["waits in wgmma.wait_group", "127 of its warpgroup", "deadlock"]);
    // setmaxnreg (the wide GEMMs' register hand-over): a warpgroup-wide count is fine, mixed
    // counts are reported.
    assert_eq!(run(8).unwrap(), got, "setmaxnreg.inc changes no result");
    expect_err(run(9).map(|_| ()), &["asked setmaxnreg for different counts", "232", "240"]);
    // The driver's checks on tensor maps: a stride that is not a multiple of 16 bytes.
    assert!(row_major_128b(1 << 20, TileElem::Bf16, 8, 60, 8).is_err(), "a 120-byte row stride must be refused");
}

fn wgmma_8bit_follows_the_ptx_definitions() {
    // s8 wgmma (exact s32 sums) and e4m3 wgmma with A from registers (Sage v3's Q·Kᵀ and P·V)
    // against plain products of the same codes.
    use flux2::backend::cuda::tensor_map::{row_major_128b, TileElem};
    let cc = CudaContext::new(0).unwrap().compute_capability().unwrap();
    if cc != (9, 0) {
        return; // wgmma is an sm_90a instruction: only the H100 profile loads that image
    }
    let codes = |n: usize, k: u32| -> Vec<u8> {
        (0..n as u32).map(|i| ((i * k + 5) % 0x77) as u8 | if i % 3 == 1 { 0x80 } else { 0 }).collect()
    };
    let (a, bt) = (codes(64 * 128, 29), codes(128 * 128, 41));
    let smem = 1024 + 192 * 128 + 8;
    let s = open("sm_90a").unwrap();
    s.f("wgmma_8bit_tile")
        .set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .unwrap();
    let (da, db) = (s.stream.clone_htod(&a).unwrap(), s.stream.clone_htod(&bt).unwrap());
    let mut ds = s.stream.alloc_zeros::<i32>(64 * 64).unwrap();
    let mut df = s.stream.alloc_zeros::<f32>(64 * 128).unwrap();
    let ptr = |x: &cudarc::driver::CudaSlice<u8>| {
        let (p, _g) = cudarc::driver::DevicePtr::device_ptr(x, &s.stream);
        p
    };
    let ta = row_major_128b(ptr(&da), TileElem::E4m3, 64, 128, 64).unwrap();
    let tb = row_major_128b(ptr(&db), TileElem::E4m3, 128, 128, 128).unwrap();
    for mode in [0i32, 1] {
        launch!(s, "wgmma_8bit_tile", cfg(1, 128, smem), &ta, &tb, &mut ds, &mut df, &mode).unwrap();
    }
    let (got_s, got_f) = (s.stream.clone_dtoh(&ds).unwrap(), s.stream.clone_dtoh(&df).unwrap());
    for i in 0..64 {
        for j in 0..64 {
            let want: i32 = (0..128).map(|c| a[i * 128 + c] as i8 as i32 * bt[j * 128 + c] as i8 as i32).sum();
            assert_eq!(got_s[i * 64 + j], want, "s8 wgmma at ({i}, {j})");
        }
        for j in 0..128 {
            let products = (0..128).map(|c| e4m3(a[i * 128 + c]) * e4m3(bt[j * 128 + c]));
            let (want, size): (f64, f64) = products.fold((0.0, 0.0), |(s, m), p| (s + p, m + p.abs()));
            // Four f32 accumulations of k-steps whose terms cancel: f32 rounding of the terms' size.
            let got = got_f[i * 128 + j] as f64;
            assert!((got - want).abs() <= 1e-6 * size, "e4m3 register-A wgmma at ({i}, {j}): {got} vs {want}");
        }
    }
}

fn e4m3(v: u8) -> f64 {
    let (e, m) = ((v >> 3) & 15, v & 7) as (u8, u8);
    let s = if v & 0x80 != 0 { -1.0 } else { 1.0 };
    if e == 0 {
        s * m as f64 * 2f64.powi(-9)
    } else {
        s * (1.0 + m as f64 / 8.0) * 2f64.powi(e as i32 - 7)
    }
}

fn e4m3_mma_needs_sm89() {
    let codes = |n: usize, k: u32| -> Vec<u8> {
        (0..n as u32).map(|i| ((i * k + 3) % 0x77) as u8 | if i % 3 == 0 { 0x80 } else { 0 }).collect()
    };
    let (a, bt) = (codes(512, 37), codes(256, 53));
    {
        let s = open("compute_80").unwrap();
        let (da, db) = (s.stream.clone_htod(&a).unwrap(), s.stream.clone_htod(&bt).unwrap());
        let mut d = s.stream.alloc_zeros::<f32>(128).unwrap();
        expect_err(
            launch!(s, "mma_e4m3_tile", cfg(1, 32, 0), &da, &db, &mut d),
            &["ILLEGAL_INSTRUCTION", "needs sm_89", "sm_80"],
        );
    }
    let (major, minor) = {
        let ctx = CudaContext::new(0).unwrap();
        ctx.compute_capability().unwrap()
    };
    if (major, minor) < (8, 9) {
        return; // this profile cannot load sm_89 code at all
    }
    let s = open("compute_89").unwrap();
    let (da, db) = (s.stream.clone_htod(&a).unwrap(), s.stream.clone_htod(&bt).unwrap());
    let mut d = s.stream.alloc_zeros::<f32>(128).unwrap();
    launch!(s, "mma_e4m3_tile", cfg(1, 32, 0), &da, &db, &mut d).unwrap();
    let got = s.stream.clone_dtoh(&d).unwrap();
    for i in 0..128 {
        let (r, c) = (i / 8, i % 8);
        let want: f64 = (0..32).map(|k| e4m3(a[r * 32 + k]) * e4m3(bt[c * 32 + k])).sum();
        assert!((got[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "D[{r}][{c}] = {} want {want}", got[i]);
    }
}

fn warp_shuffles() {
    let s = open("compute_80").unwrap();
    let input: Vec<f32> = (0..64).map(|i| i as f32 * 0.5).collect();
    let din = s.stream.clone_htod(&input).unwrap();
    let mut out = s.stream.alloc_zeros::<f32>(64).unwrap();
    launch!(s, "warp_shuffles", cfg(1, 64, 0), &din, &mut out).unwrap();
    let got = s.stream.clone_dtoh(&out).unwrap();
    for i in 0..64 {
        let w = i / 32 * 32;
        let sum: f32 = input[w..w + 32].iter().sum();
        assert_eq!(got[i], sum + input[w + (i + 1) % 32], "lane {i}");
    }
}

/// bf16 and e4m3 conversions round as the hardware does (the emulator's cuda_bf16.h / cuda_fp8.h
/// against the CPU reference's encoders): ties, subnormals, saturation, every exponent.
fn conversions_round_as_the_hardware() {
    let s = open("compute_80").unwrap();
    let mut values: Vec<f32> = vec![0.0, -0.0, 1.0, -1.0, 448.0, 449.0, 463.99, 464.0, 465.0, 1e9, -1e9, f32::INFINITY];
    values.extend([f32::NEG_INFINITY, f32::MIN_POSITIVE, 1e-40, 2f32.powi(-9), 2f32.powi(-10), 3.0 * 2f32.powi(-10)]);
    // Every e4m3 code and the midpoints between neighbours (the ties), and bf16 ties.
    for c in 0u8..0x7e {
        let (a, b) = (flux2::dtype::f8e4m3_to_f32(c), flux2::dtype::f8e4m3_to_f32(c + 1));
        values.extend([a, -a, (a + b) / 2.0, -(a + b) / 2.0]);
    }
    values.extend((0..2000u32).map(|i| f32::from_bits(0x3f80_8000 + (i << 16)))); // bf16 halfway cases
    let mut seed = 1u32;
    values.extend((0..20000).map(|_| {
        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        f32::from_bits(seed & !0x7f80_0000 | ((seed >> 7) % 254 + 1) << 23) // finite, any exponent
    }));
    let n = values.len();
    let din = s.stream.clone_htod(&values).unwrap();
    let mut bf = s.stream.alloc_zeros::<u16>(n).unwrap();
    let mut e4 = s.stream.alloc_zeros::<u8>(n).unwrap();
    launch!(s, "convert_f32", cfg(64, 256, 0), &din, &mut bf, &mut e4, &(n as i32)).unwrap();
    let (bf, e4) = (s.stream.clone_dtoh(&bf).unwrap(), s.stream.clone_dtoh(&e4).unwrap());
    for (i, x) in values.iter().enumerate() {
        assert_eq!(bf[i], bf16::from_f32(*x).to_bits(), "bf16 of {x:e} ({:#010x})", x.to_bits());
        assert_eq!(e4[i], flux2::dtype::f32_to_f8e4m3(*x), "e4m3 of {x:e} ({:#010x})", x.to_bits());
    }
}

fn global_atomics_are_deterministic() {
    let s = open("compute_80").unwrap();
    let n = 64 * 256;
    let input: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.37).collect();
    let din = s.stream.clone_htod(&input).unwrap();
    let mut sums = Vec::new();
    for _ in 0..3 {
        let mut out = s.stream.alloc_zeros::<f32>(1).unwrap();
        launch!(s, "atomic_sum", cfg(64, 256, 0), &din, &mut out, &(n as i32)).unwrap();
        sums.push(s.stream.clone_dtoh(&out).unwrap()[0]);
    }
    let exact: f64 = input.iter().map(|v| *v as f64).sum();
    assert!(sums.iter().all(|v| v.to_bits() == sums[0].to_bits()), "{sums:?}");
    assert!((sums[0] as f64 - exact).abs() < 1e-2, "{} vs {exact}", sums[0]);
}

/// Stream capture (CUDA graphs): launches, memsets, device copies and stream-ordered allocations
/// are recorded, not run, and the graph replays them in order with the arguments they had, reading
/// whatever the captured addresses hold at launch; a synchronising call inside a capture is refused
/// and invalidates it; a graph relaunched while memory it allocated is still live is refused unless
/// instantiated with AUTO_FREE_ON_LAUNCH.
fn stream_capture_records_and_replays() {
    use sys::CUgraphInstantiate_flags as Flags;
    let s = open("compute_80").unwrap();
    // One stream: cudarc's cross-stream events are not needed (as in cudarc's own graph tests).
    unsafe { s.ctx.disable_event_tracking() };
    let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL;
    // The legacy default stream cannot be captured (as on a GPU): capture needs a stream of its own.
    let e = s.stream.begin_capture(mode).expect_err("a capture of the legacy default stream").to_string();
    assert!(e.contains("STREAM_CAPTURE_UNSUPPORTED"), "{e}");
    let stream = s.ctx.new_stream().unwrap();
    let n: i32 = 1000;
    let first: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut din = stream.clone_htod(&first).unwrap();
    let f = s.f("atomic_sum");

    stream.begin_capture(mode).unwrap();
    let mut out = stream.alloc_zeros::<f32>(1).unwrap(); // an allocation node and a memset node
    let mut b = stream.launch_builder(&f);
    b.arg(&din).arg(&mut out).arg(&n);
    unsafe { b.launch(cfg(4, 256, 0)) }.unwrap();
    let mut copy = stream.alloc_zeros::<f32>(1).unwrap();
    stream.memcpy_dtod(&out, &mut copy).unwrap();
    let graph = stream.end_capture(Flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).unwrap().unwrap();
    let sum = |v: &[f32]| v.iter().sum::<f32>();
    for input in [first.clone(), (0..n).map(|i| (i % 3) as f32 * 0.5).collect::<Vec<f32>>()] {
        stream.memcpy_htod(&input, &mut din).unwrap(); // new contents at the captured address
        graph.launch().unwrap();
        let got = stream.clone_dtoh(&copy).unwrap()[0];
        assert_eq!(got, sum(&input), "the replay summed what the input holds now (its memset zeroed the sum)");
    }
    drop((out, copy, graph));

    // A synchronising call inside a capture is refused and ends the capture invalid.
    stream.begin_capture(mode).unwrap();
    let e = stream.synchronize().expect_err("a synchronisation inside a capture must fail").to_string();
    assert!(e.contains("STREAM_CAPTURE_UNSUPPORTED"), "{e}");
    let e = stream.end_capture(Flags(0)).err().expect("an invalidated capture gives no graph").to_string();
    assert!(e.contains("STREAM_CAPTURE_INVALIDATED"), "{e}");

    // Without AUTO_FREE_ON_LAUNCH the graph's memory must be freed before it runs again.
    stream.begin_capture(mode).unwrap();
    let kept = stream.alloc_zeros::<f32>(4).unwrap();
    let graph = stream.end_capture(Flags(0)).unwrap().unwrap();
    // Graph memory exists only once a launch holds it: reading it before is reported.
    let e = stream.clone_dtoh(&kept).expect_err("graph memory read before any launch").to_string();
    assert!(e.contains("no launch of its graph holds"), "{e}");
    graph.launch().unwrap();
    assert_eq!(stream.clone_dtoh(&kept).unwrap(), vec![0.0; 4], "held by the launch, zeroed by its memset");
    let e = graph.launch().expect_err("a relaunch with its allocation live").to_string();
    assert!(e.contains("was not freed"), "{e}");
    drop(kept); // frees the first launch's allocation: the graph may run again
    graph.launch().unwrap();
}

/// FLUX2_SIM_MEMORY sets the emulated card's memory: the backend sees it, and a run that cannot
/// fit fails with a sentence about memory, not a panic.
fn device_memory_follows_flux2_sim_memory() {
    let flux2 = env!("CARGO_BIN_EXE_flux2");
    let run = |memory: &str, args: &[&str]| {
        let out = std::process::Command::new(flux2).args(args).env("FLUX2_SIM_MEMORY", memory).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = run("3GiB", &["doctor"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("of 3.0 GiB"), "{text}");
    let pipeline = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pipeline");
    let out = std::env::temp_dir().join(format!("flux2-sim-oom-{}.png", std::process::id()));
    let generate = |memory: &str, extra: &[&str]| {
        let mut args = vec!["generate", "--model", pipeline, "--prompt", "a fox", "--width", "64", "--height", "64"];
        args.extend(["--steps", "1", "--device", "cuda", "--out", out.to_str().unwrap()]);
        args.extend(extra);
        run(memory, &args)
    };
    // The memory plan (budget: the emulated card's free memory) refuses before loading anything.
    let (code, text) = generate("4MiB", &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("out of device memory") && text.contains("smallest budget"), "{text}");
    // A budget larger than the card: the driver's allocation fails, and the run says so.
    let (code, text) = generate("1MiB", &["--vram-budget", "4GiB"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("CUDA_ERROR_OUT_OF_MEMORY") && text.contains("FLUX2_SIM_MEMORY"), "{text}");
    assert!(!text.contains("panicked") && !out.exists(), "{text}");
}

/// Every kernel the backend loads was launched on this profile by the run that wrote
/// FLUX2_SIM_COVERAGE_REPORT (the test script's `flux2 selftest --device cuda` under the same
/// profile, with FLUX2_SIM_COVERAGE pointing there).
fn every_kernel_was_launched() {
    let Ok(path) = std::env::var("FLUX2_SIM_COVERAGE_REPORT") else {
        panic!("FLUX2_SIM_COVERAGE_REPORT is not set (scripts/test.sh sets it)");
    };
    let report = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let arch = std::env::var("FLUX2_SIM_ARCH").unwrap_or_else(|_| "sm_90a".into());
    let launched: std::collections::HashSet<&str> =
        report.lines().filter_map(|l| l.split_once(' ')).filter(|(t, _)| *t == arch).map(|(_, n)| n).collect();
    let missing: Vec<&str> =
        flux2::backend::cuda::kernels_launched_on(&arch).filter(|k| !launched.contains(k)).collect();
    assert!(missing.is_empty(), "never launched on {arch}: {missing:?} (add a selftest case that reaches them)");
}

fn main() {
    if let Ok(arch) = std::env::var(NVRTC_CHILD) {
        nvrtc_child(arch);
    }
    let args = libtest_mimic::Arguments::from_args();
    let present = unsafe { sys::is_culib_present() };
    let emulated = present
        && match CudaContext::new(0) {
            Ok(ctx) => ctx.name().map(|n| n.starts_with(flux2::backend::cuda::EMULATOR_NAME_PREFIX)).unwrap_or(false),
            Err(_) => false,
        };
    if !emulated && std::env::var("FLUX2_EXPECT_SIM").is_ok_and(|v| v == "1") {
        eprintln!("FLUX2_EXPECT_SIM=1 but the CUDA driver is not the emulator: run under scripts/with-cuda-sim.sh");
        std::process::exit(1);
    }
    type Check = fn();
    let checks: &[(&str, Check)] = &[
        ("shared_memory_race_without_a_barrier", shared_memory_race_without_a_barrier),
        ("out_of_bounds_write", out_of_bounds_write),
        ("misaligned_cp_async", misaligned_cp_async),
        ("reading_before_cp_async_wait", reading_before_cp_async_wait),
        ("shared_memory_limits_and_the_opt_in_attribute", shared_memory_limits_and_the_opt_in_attribute),
        ("barrier_not_reached_by_every_thread", barrier_not_reached_by_every_thread),
        ("launch_limits", launch_limits),
        ("mma_fragments_follow_the_ptx_layout", mma_fragments_follow_the_ptx_layout),
        ("e4m3_mma_needs_sm89", e4m3_mma_needs_sm89),
        ("tma_and_wgmma_follow_the_ptx_definitions", tma_and_wgmma_follow_the_ptx_definitions),
        ("wgmma_8bit_follows_the_ptx_definitions", wgmma_8bit_follows_the_ptx_definitions),
        ("warp_shuffles", warp_shuffles),
        ("global_atomics_are_deterministic", global_atomics_are_deterministic),
        ("stream_capture_records_and_replays", stream_capture_records_and_replays),
        ("conversions_round_as_the_hardware", conversions_round_as_the_hardware),
        ("device_memory_follows_flux2_sim_memory", device_memory_follows_flux2_sim_memory),
        ("every_kernel_was_launched", every_kernel_was_launched),
    ];
    // One context at a time: the checks share the device and each resets it by recreating.
    let lock = Arc::new(Mutex::new(()));
    let trials = checks
        .iter()
        .map(|&(name, check)| {
            let lock = lock.clone();
            libtest_mimic::Trial::test(name, move || {
                let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
                check();
                Ok(())
            })
            .with_ignored_flag(
                !emulated
                    || (name == "every_kernel_was_launched" && std::env::var("FLUX2_SIM_COVERAGE_REPORT").is_err()),
            )
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
