//! cuBLASLt as a baseline for `flux2 bench gemm`, never used for inference: NVIDIA's bf16 and FP8
//! (e4m3, per-tensor scales) GEMMs timed on the same shapes and codes as our kernels. The library is
//! loaded at run time from the names CUDA 13 and 12 install (or `FLUX2_CUBLASLT`); where it is
//! absent the bench says so and leaves the columns empty. Our own FFI rather than cudarc's
//! `cublaslt` feature: that one looks only for the CUDA 12 names its build feature fixes.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use super::CudaBackend;
use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

type Handle = *mut c_void;

#[repr(C)]
#[derive(Clone, Copy)]
struct Algo([u64; 8]);

#[repr(C)]
#[derive(Clone, Copy)]
struct HeuristicResult {
    algo: Algo,
    workspace_size: usize,
    state: i32,
    waves_count: f32,
    reserved: [i32; 4],
}

// cublas_api.h / cublasLt.h / library_types.h values.
const COMPUTE_32F: i32 = 68;
const R_32F: i32 = 0;
const R_16BF: i32 = 14;
const R_8F_E4M3: i32 = 28;
const OP_N: i32 = 0;
const OP_T: i32 = 1;
const DESC_TRANSA: i32 = 3;
const DESC_TRANSB: i32 = 4;
const DESC_A_SCALE_POINTER: i32 = 17;
const DESC_B_SCALE_POINTER: i32 = 18;
const PREF_MAX_WORKSPACE_BYTES: i32 = 1;
const WORKSPACE_BYTES: usize = 32 << 20;

#[cfg(windows)]
const NAMES: &[&str] = &["cublasLt64_13.dll", "cublasLt64_12.dll"];
#[cfg(not(windows))]
const NAMES: &[&str] = &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"];

struct Api {
    create: unsafe extern "C" fn(*mut Handle) -> i32,
    desc_create: unsafe extern "C" fn(*mut Handle, i32, i32) -> i32,
    desc_set: unsafe extern "C" fn(Handle, i32, *const c_void, usize) -> i32,
    layout_create: unsafe extern "C" fn(*mut Handle, i32, u64, u64, i64) -> i32,
    pref_create: unsafe extern "C" fn(*mut Handle) -> i32,
    pref_set: unsafe extern "C" fn(Handle, i32, *const c_void, usize) -> i32,
    #[allow(clippy::type_complexity)]
    heuristic: unsafe extern "C" fn(
        Handle,
        Handle,
        Handle,
        Handle,
        Handle,
        Handle,
        Handle,
        i32,
        *mut HeuristicResult,
        *mut i32,
    ) -> i32,
    #[allow(clippy::type_complexity)]
    matmul: unsafe extern "C" fn(
        Handle,
        Handle,
        *const c_void,
        *const c_void,
        Handle,
        *const c_void,
        Handle,
        *const c_void,
        *const c_void,
        Handle,
        *mut c_void,
        Handle,
        *const Algo,
        *mut c_void,
        usize,
        *mut c_void,
    ) -> i32,
}

/// One GEMM shape's descriptors and the algorithm cuBLASLt's heuristic picked for it.
struct Plan {
    desc: Handle,
    a: Handle,
    b: Handle,
    c: Handle,
    algo: Algo,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Bf16,
    E4m3,
}

/// A loaded cuBLASLt with a handle, a workspace and a plan per shape.
pub struct CublasLt {
    api: Api,
    _lib: libloading::Library,
    handle: Handle,
    be: CudaBackend,
    workspace: Tensor,
    ones: Tensor,
    plans: Mutex<HashMap<(Kind, usize, usize, usize), Plan>>,
    /// The file loaded, for the bench's note.
    pub library: String,
}

fn check(what: &str, status: i32) -> Result<()> {
    if status == 0 {
        Ok(())
    } else {
        Err(Error::Gpu(format!("cuBLASLt {what}: status {status}")))
    }
}

impl CublasLt {
    /// Loads the library (`FLUX2_CUBLASLT`, else the usual names on the library path).
    pub fn load(be: &CudaBackend) -> Result<CublasLt> {
        let names: Vec<String> = match std::env::var("FLUX2_CUBLASLT") {
            Ok(path) => vec![path],
            Err(_) => NAMES.iter().map(|s| s.to_string()).collect(),
        };
        let mut errors = Vec::new();
        let (lib, library) = names
            .iter()
            .find_map(|name| match unsafe { libloading::Library::new(name) } {
                Ok(lib) => Some((lib, name.clone())),
                Err(e) => {
                    errors.push(format!("{name}: {e}"));
                    None
                }
            })
            .ok_or_else(|| Error::Gpu(format!("cuBLASLt not found ({})", errors.join("; "))))?;
        // SAFETY: the symbols have the C signatures of `Api`'s fields in every cuBLASLt since 11.
        let api = unsafe {
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get($name.as_bytes()).map_err(|e| Error::Gpu(format!("cuBLASLt {library}: {}: {e}", $name)))?
                };
            }
            Api {
                create: sym!("cublasLtCreate"),
                desc_create: sym!("cublasLtMatmulDescCreate"),
                desc_set: sym!("cublasLtMatmulDescSetAttribute"),
                layout_create: sym!("cublasLtMatrixLayoutCreate"),
                pref_create: sym!("cublasLtMatmulPreferenceCreate"),
                pref_set: sym!("cublasLtMatmulPreferenceSetAttribute"),
                heuristic: sym!("cublasLtMatmulAlgoGetHeuristic"),
                matmul: sym!("cublasLtMatmul"),
            }
        };
        let mut handle: Handle = std::ptr::null_mut();
        check("create", unsafe { (api.create)(&mut handle) })?;
        let workspace = be.output(DType::U8, &[WORKSPACE_BYTES])?;
        let ones = be.upload(&Tensor::from_f32(vec![1.0, 1.0], &[2])?, DType::F32)?;
        Ok(CublasLt {
            api,
            _lib: lib,
            handle,
            be: be.clone(),
            workspace,
            ones,
            plans: Mutex::new(HashMap::new()),
            library,
        })
    }

    /// Row-major C [m, n] = A [m, k] · W [n, k]ᵀ as cuBLAS's column-major D [n, m] = Wᵀᵀ · Aᵀ: W is
    /// the transposed operand ("TN", which FP8 requires).
    fn plan(&self, kind: Kind, m: usize, n: usize, k: usize) -> Result<Plan> {
        let api = &self.api;
        let ty = match kind {
            Kind::Bf16 => R_16BF,
            Kind::E4m3 => R_8F_E4M3,
        };
        let mut p = Plan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: Algo([0; 8]),
        };
        // SAFETY: out-pointers to locals; attribute buffers of the sizes given.
        unsafe {
            check("desc", (api.desc_create)(&mut p.desc, COMPUTE_32F, R_32F))?;
            let set = |attr: i32, v: *const c_void, size: usize| {
                check("desc attribute", (api.desc_set)(p.desc, attr, v, size))
            };
            set(DESC_TRANSA, (&OP_T as *const i32).cast(), 4)?;
            set(DESC_TRANSB, (&OP_N as *const i32).cast(), 4)?;
            if kind == Kind::E4m3 {
                let one = self.be.ptr(&self.ones)?;
                set(DESC_A_SCALE_POINTER, (&one as *const u64).cast(), 8)?;
                set(DESC_B_SCALE_POINTER, (&one as *const u64).cast(), 8)?;
            }
            check("layout", (api.layout_create)(&mut p.a, ty, k as u64, n as u64, k as i64))?;
            check("layout", (api.layout_create)(&mut p.b, ty, k as u64, m as u64, k as i64))?;
            check("layout", (api.layout_create)(&mut p.c, R_16BF, n as u64, m as u64, n as i64))?;
            let mut pref: Handle = std::ptr::null_mut();
            check("preference", (api.pref_create)(&mut pref))?;
            let ws = WORKSPACE_BYTES as u64;
            check("preference", (api.pref_set)(pref, PREF_MAX_WORKSPACE_BYTES, (&ws as *const u64).cast(), 8))?;
            let mut result =
                HeuristicResult { algo: Algo([0; 8]), workspace_size: 0, state: 0, waves_count: 0.0, reserved: [0; 4] };
            let mut count = 0;
            check(
                "heuristic",
                (api.heuristic)(self.handle, p.desc, p.a, p.b, p.c, p.c, pref, 1, &mut result, &mut count),
            )?;
            if count == 0 {
                return Err(Error::Gpu(format!("cuBLASLt has no algorithm for {m}x{k} · {n}x{k}ᵀ")));
            }
            p.algo = result.algo;
        }
        Ok(p)
    }

    fn run(&self, kind: Kind, a: &Tensor, w: &Tensor, out: &Tensor, (m, n, k): (usize, usize, usize)) -> Result<()> {
        let mut plans = self.plans.lock().unwrap();
        let p = match plans.entry((kind, m, n, k)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(kind, m, n, k)?),
        };
        let (alpha, beta) = (1f32, 0f32);
        let (ap, wp, op) = (self.be.ptr(a)?, self.be.ptr(w)?, self.be.ptr(out)?);
        let ws = self.be.ptr(&self.workspace)?;
        let stream = self.be.dev.stream.cu_stream() as *mut c_void;
        // SAFETY: device pointers of live tensors of the planned shapes; host scalars.
        let status = unsafe {
            (self.api.matmul)(
                self.handle,
                p.desc,
                (&alpha as *const f32).cast(),
                wp as *const c_void,
                p.a,
                ap as *const c_void,
                p.b,
                (&beta as *const f32).cast(),
                op as *const c_void,
                p.c,
                op as *mut c_void,
                p.c,
                &p.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
        };
        check("matmul", status)
    }

    /// x [m, k] · w [n, k]ᵀ as bf16 [m, n], bf16 operands.
    pub fn bf16(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (m, k, n) = (x.dim(0), x.dim(1), w.dim(0));
        let out = self.be.output(DType::BF16, &[m, n])?;
        self.run(Kind::Bf16, x, w, &out, (m, n, k))?;
        Ok(out)
    }

    /// codes [m, k] · w codes [n, k]ᵀ as bf16 [m, n], e4m3 operands with unit per-tensor scales.
    pub fn e4m3(&self, codes: &Tensor, w: &Tensor, (m, n, k): (usize, usize, usize)) -> Result<Tensor> {
        let out = self.be.output(DType::BF16, &[m, n])?;
        self.run(Kind::E4m3, codes, w, &out, (m, n, k))?;
        Ok(out)
    }
}
