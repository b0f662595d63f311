//! The CUDA backend: cudarc (dynamically loaded driver) and our NVRTC-compiled kernels.
//! Activations are bf16 with f32 math inside kernels; RoPE tables and per-channel affine
//! parameters are f32. One stream, no host synchronisation between ops; device memory comes
//! from the driver's stream-ordered pool and the backend tracks live and peak bytes.

mod attention;
mod attention_wgmma;
mod conv;
pub mod cublaslt;
mod e4m3_rows;
mod gemm;
mod gemm_wgmma;
mod graph;
mod health;
pub mod images;
mod layout;
mod pointwise;
mod quantized;
mod reduce;
mod sage;
mod sage_wgmma;
pub mod tensor_map;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use half::bf16;

use crate::backend::{AttnMask, Backend, Padding2d, QuantTensor, RopePairs};
use crate::dtype::{decode_to_f32, DType};
use crate::error::{Error, Result};
use crate::tensor::{DeviceKind, Storage, Tensor};

pub(crate) fn gpu_err(e: impl std::fmt::Display) -> Error {
    let msg = e.to_string();
    if msg.contains("OUT_OF_MEMORY") {
        Error::OutOfMemory(msg)
    } else {
        Error::Gpu(msg)
    }
}

/// Every kernel the backend launches, by module.
const KERNELS: &[(&str, &[&str])] = &[
    (
        "elementwise",
        &[
            "fill_u16",
            "fill_u32",
            "silu_bf16",
            "swiglu_bf16",
            "axpby_bf16",
            "gated_add_bf16",
            "modulate_bf16",
            "silu_bf16x8",
            "swiglu_bf16x8",
            "swiglu_concat_bf16x8",
            "axpby_bf16x8",
            "gated_add_bf16x8",
            "modulate_bf16x8",
            "channel_affine_bf16",
            "upsample_nearest2x_bf16",
            "upsample_nearest2x_bf16x8",
            "embedding_bf16",
            "timestep_embedding_bf16",
            "rope_bf16",
            "strided_copy_b16",
            "strided_copy_b32",
            "strided_copy_x16",
        ],
    ),
    (
        "norm",
        &[
            "layer_norm_bf16",
            "rms_norm_bf16",
            "rms_norm_rope_bf16",
            "group_norm_stats_bf16",
            "group_norm_finalize_bf16",
            "group_norm_apply_bf16",
            "group_norm_apply_bf16x8",
        ],
    ),
    ("health", &["nonfinite_check_b16", "nonfinite_check_b32"]),
    (
        "gemm",
        &[
            "gemm_tiled_bf16",
            "gemm_mma_bf16",
            "gemm_mma_gated_bf16",
            "gemm_wq_tiled_bf16",
            "gemm_wq_mma_bf16",
            "im2col_bf16",
        ],
    ),
    ("gemm_wgmma", &gemm_wgmma::KERNELS),
    ("conv", &["conv_pack_weight_bf16", conv::MMA_KERNEL, conv::NARROW_KERNELS[0], conv::NARROW_KERNELS[1]]),
    ("attention", &["attention_rowwise_bf16", "flash_attention_d64_bf16", "flash_attention_d128_bf16"]),
    (
        "attention_v3",
        &[
            "flash_attention_v3_d64_bf16",
            "flash_attention_v3_d64_masked_bf16",
            "flash_attention_v3_d128_bf16",
            "flash_attention_v3_d128_masked_bf16",
            "flash_attention_v3_e4m3out_d64_bf16",
            "flash_attention_v3_e4m3out_d128_bf16",
        ],
    ),
    (
        "attention_wide",
        &["flash_attention_wide_d256_bf16", "flash_attention_wide_d384_bf16", "flash_attention_wide_d512_bf16"],
    ),
    ("attention_wgmma", &attention_wgmma::KERNELS),
    (
        "quantized",
        &[
            "row_absmax_bf16",
            "gemm_w8a8_tiled_bf16",
            "quantize_rows_e4m3_bf16",
            "layer_norm_modulate_e4m3_bf16",
            "swiglu_concat_e4m3_bf16",
            "gemm_w8a8_mma_e4m3",
            "gemm_w8a8_mma_gated_e4m3",
            "sage_kv_sums_bf16",
            "sage_kv_means_absmax_bf16",
            "sage_block_absmax_bf16",
            "attention_sage_rowwise_bf16",
        ],
    ),
    (
        "attention_sage_mma",
        &[
            "sage_quantize_int8_bf16",
            "sage_quantize_int8_block_bf16",
            "sage_norm_rope_int8_bf16",
            "sage_quantize_vt_e4m3_bf16",
            "sage_quantize_vt_e4m3_as_bf16",
            "attention_sage_mma_d64",
            "attention_sage_mma_d128",
            "attention_sage_mma_bf16pv_d64",
            "attention_sage_mma_bf16pv_d128",
            "attention_sage_mma_e4m3out_d64",
            "attention_sage_mma_e4m3out_d128",
        ],
    ),
    ("attention_sage_wgmma", &sage_wgmma::KERNELS),
];

/// Every kernel the backend loads, by name.
pub fn kernel_names() -> impl Iterator<Item = &'static str> {
    KERNELS.iter().flat_map(|(_, names)| names.iter().copied())
}

/// The kernels the backend launches with images for `target` (the emulator's coverage check):
/// all but the wgmma ones (and v4's V transpose) outside sm_90a, whose images trap in their place.
pub fn kernels_launched_on(target: &str) -> impl Iterator<Item = &'static str> + '_ {
    let hopper_only = |k: &str| {
        gemm_wgmma::KERNELS.contains(&k) || attention_wgmma::KERNELS.contains(&k) || sage_wgmma::KERNELS.contains(&k)
    };
    kernel_names().filter(move |k| target == gemm_wgmma::V3_TARGET || !hopper_only(k))
}

/// `FLUX2_CUDA_GEMM=v2` runs the GEMMs on their mma.sync kernels where the wgmma ones (v3, sm_90a)
/// would run: an escape hatch while v3 has not been checked on a GPU, and for A/B timing;
/// `v3-tiles` keeps v3 but always walks whole tiles (no stream-K), the same for stream-K;
/// `v3-narrow` keeps v3 on 128x128 tiles (no 128x256 ones), the same for the wide kernels. Unset or
/// `v3`: the default.
fn gemm_choice_from_env() -> Result<GemmChoice> {
    let v3 = GemmChoice { v2: false, whole_tiles: false, narrow: false };
    match std::env::var("FLUX2_CUDA_GEMM") {
        Err(_) => Ok(v3),
        Ok(v) if v == "v3" => Ok(v3),
        Ok(v) if v == "v3-tiles" => Ok(GemmChoice { whole_tiles: true, ..v3 }),
        Ok(v) if v == "v3-narrow" => Ok(GemmChoice { narrow: true, ..v3 }),
        Ok(v) if v == "v2" => Ok(GemmChoice { v2: true, ..v3 }),
        Ok(v) => Err(Error::InvalidArgument(format!("FLUX2_CUDA_GEMM={v:?}: expected v2, v3, v3-tiles or v3-narrow"))),
    }
}

/// `FLUX2_CUDA_GEMM`'s defaults: v2 kernels; v3 without stream-K; v3 without wide tiles.
struct GemmChoice {
    v2: bool,
    whole_tiles: bool,
    narrow: bool,
}

/// `FLUX2_CUDA_ATTENTION=v3` runs unmasked attention on flash v3 (mma.sync) where v4 (wgmma + TMA,
/// sm_90a) would run, as `FLUX2_CUDA_GEMM=v2` does for the GEMMs. Unset or `v4`: the default.
fn flash_v3_from_env() -> Result<bool> {
    match std::env::var("FLUX2_CUDA_ATTENTION") {
        Err(_) => Ok(false),
        Ok(v) if v == "v4" => Ok(false),
        Ok(v) if v == "v3" => Ok(true),
        Ok(v) => Err(Error::InvalidArgument(format!("FLUX2_CUDA_ATTENTION={v:?}: expected v3 or v4"))),
    }
}

/// `FLUX2_CUDA_SAGE=v2` runs unmasked Sage attention on v2 (mma.sync) where v3 (wgmma + TMA, sm_90a)
/// would run. Unset or `v3`: the default.
fn sage_v2_from_env() -> Result<bool> {
    match std::env::var("FLUX2_CUDA_SAGE") {
        Err(_) => Ok(false),
        Ok(v) if v == "v3" => Ok(false),
        Ok(v) if v == "v2" => Ok(true),
        Ok(v) => Err(Error::InvalidArgument(format!("FLUX2_CUDA_SAGE={v:?}: expected v2 or v3"))),
    }
}

/// Device names reported by the emulated driver (cuda-sim/) start with this.
pub const EMULATOR_NAME_PREFIX: &str = "flux2 cuda-sim";

/// Device state shared by the backend and every tensor it owns.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub target: &'static str,
    pub total_memory: usize,
    /// The driver is flux2's CUDA emulator (cuda-sim/), not a GPU: kernels run on the CPU.
    pub emulated: bool,
    live: AtomicUsize,
    peak: AtomicUsize,
    /// Bytes the engine may hold (0: no limit); allocations beyond it fail cleanly.
    budget: AtomicUsize,
    poison: AtomicBool,
    /// Attention runs the previous kernel versions (flash v2, row-wise for wide heads): the
    /// references the selftest and `flux2 profile attention` compare against.
    reference_attention: AtomicBool,
    /// Convolutions with few output channels on v2 (the implicit GEMM) instead of the narrow
    /// kernels: v2 stays checked on such layers.
    conv_v2: AtomicBool,
    /// Sage attention's P·V on bf16 tensor cores even where e4m3 ones exist (the sm_80/86 kernels,
    /// so the selftest checks them on every card).
    sage_bf16_pv: AtomicBool,
    /// Sage's Q/K pre-pass in its first version (two launches; the one-pass v2's reference).
    sage_quantize_v1: AtomicBool,
    /// The GEMMs on their v2 kernels (mma.sync) even where v3 (wgmma + TMA, sm_90a) applies; and
    /// whether `FLUX2_CUDA_GEMM=v2` made that the default.
    gemm_v2: AtomicBool,
    gemm_v2_default: bool,
    /// The v3 GEMMs walk whole tiles even where stream-K would split them; and whether
    /// `FLUX2_CUDA_GEMM=v3-tiles` made that the default.
    gemm_tiles: AtomicBool,
    gemm_tiles_default: bool,
    /// The v3 GEMMs on 128x256 tiles whatever the shape (tests of the wide kernels on small
    /// shapes); on 128x128 ones only (the wide kernels' reference); and whether
    /// `FLUX2_CUDA_GEMM=v3-narrow` made that the default.
    gemm_wide: AtomicBool,
    gemm_narrow: AtomicBool,
    gemm_narrow_default: bool,
    /// Stream-K's partial tiles and counters (grown on demand).
    stream_k: std::sync::Mutex<gemm_wgmma::StreamKBuffers>,
    /// Attention on flash v3 even where v4 (wgmma + TMA, sm_90a) applies; and whether
    /// `FLUX2_CUDA_ATTENTION=v3` made that the default.
    flash_v3: AtomicBool,
    flash_v3_default: bool,
    /// Sage attention on v2 even where v3 (wgmma + TMA, sm_90a) applies; and whether
    /// `FLUX2_CUDA_SAGE=v2` made that the default.
    sage_v2: AtomicBool,
    sage_v2_default: bool,
    /// Streaming multiprocessors: the persistent kernels' grid; and a smaller count they may be
    /// told to plan for instead (0: none), so small shapes in tests walk several tiles per block.
    sms: usize,
    sms_limit: AtomicUsize,
    health: health::HealthWord,
    /// Denoising steps may be recorded as CUDA graphs (`FLUX2_CUDA_GRAPHS`, `set_graphs`).
    graphs: AtomicBool,
    /// A stream capture is under way: allocations are the graph's, and workspaces may not grow.
    capturing: AtomicBool,
    /// Bytes allocated during the last capture and not freed yet: nonzero after it ends means
    /// memory escaped the recording.
    captured_live: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice({}, sm_{}{}, {})",
            self.name, self.compute_capability.0, self.compute_capability.1, self.target
        )
    }
}

/// Device memory of one tensor.
pub struct CudaStorage {
    buf: CudaSlice<u8>,
    dtype: DType,
    len: usize,
    dev: Arc<CudaDevice>,
    /// Allocated while a graph was being recorded (graph memory).
    captured: bool,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage({} x {})", self.len, self.dtype)
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        let bytes = self.len * self.dtype.size_in_bytes();
        self.dev.live.fetch_sub(bytes, Ordering::Relaxed);
        if self.captured {
            self.dev.captured_live.fetch_sub(bytes as i64, Ordering::Relaxed);
        }
    }
}

impl CudaStorage {
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn base_ptr(&self) -> u64 {
        let (p, _sync) = self.buf.device_ptr(&self.dev.stream);
        p
    }

    /// Copy to the host (synchronises the stream) and read the view as f32.
    pub fn to_vec_f32(&self, view: &Tensor) -> Result<Vec<f32>> {
        let bytes: Vec<u8> = self.dev.stream.clone_dtoh(&self.buf).map_err(gpu_err)?;
        let values = decode_to_f32(&bytes, self.dtype);
        let host = Tensor::from_f32(values, &[self.len])?;
        host_view(&host, view)?.to_vec_f32()
    }
}

/// `view`'s layout applied to a host copy of its storage.
fn host_view(host: &Tensor, view: &Tensor) -> Result<Tensor> {
    host.as_strided(view.offset(), view.shape(), view.strides())
}

impl CudaDevice {
    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::Gpu(format!("kernel {name} is not loaded")))
    }

    /// Count a device-held workspace that grew from `old` to `new` bytes in the memory in use.
    fn account(&self, old: usize, new: usize) {
        self.live.fetch_sub(old, Ordering::Relaxed);
        let live = self.live.fetch_add(new, Ordering::Relaxed) + new;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub struct CudaBackend {
    dev: Arc<CudaDevice>,
}

/// Launch `$name` with `$cfg`; arguments are bound to locals so they outlive the launch.
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr $(, $arg:expr)* $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let cfg: cudarc::driver::LaunchConfig = $cfg;
        let (x, y, z) = cfg.grid_dim;
        if x == 0 || y == 0 || z == 0 {
            // No output elements: nothing to launch (CUDA rejects an empty grid).
            Ok(())
        } else {
            let func = $dev.function($name)?;
            let mut builder = $dev.stream.launch_builder(func);
            $(
                let a = $arg;
                builder.arg(&a);
            )*
            unsafe { builder.launch(cfg) }.map(|_| ()).map_err($crate::backend::cuda::gpu_err)
        }
    }};
}
pub(crate) use launch;

/// One warp per row: 8 rows per block of 256 threads (the row-wise norm and attention kernels).
pub(crate) fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// A 1-D grid-stride launch for `n` elements.
pub(crate) fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65535 * 16);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl CudaBackend {
    /// Initialise device `ordinal`: probe the driver (no panic when libcuda is absent), pick the
    /// kernel image for its compute capability, load every kernel.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        if images::KERNEL_IMAGES.is_empty() {
            return Err(Error::Gpu(format!("this binary was built without GPU kernels ({})", images::KERNEL_STATUS)));
        }
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Gpu(
                "the CUDA driver library (libcuda.so.1) was not found: no NVIDIA driver on this machine".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::Gpu(format!("cannot open GPU {ordinal}: {e}")))?;
        // One stream, synchronised by hand: no per-allocation events.
        unsafe { ctx.disable_event_tracking() };
        let cc = ctx.compute_capability().map_err(gpu_err)?;
        let target = images::target_for(cc.0, cc.1).ok_or_else(|| {
            Error::Gpu(format!(
                "compute capability {}.{} is not supported (bf16 tensor cores need 8.0 or newer)",
                cc.0, cc.1
            ))
        })?;
        let mut functions = HashMap::new();
        for (module, names) in KERNELS {
            let image = images::image(module, target)
                .ok_or_else(|| Error::Gpu(format!("kernel module {module} has no {target} image")))?;
            let ptx = if target.starts_with("compute") {
                cudarc::nvrtc::Ptx::from_src(String::from_utf8_lossy(image).trim_end_matches('\0').to_string())
            } else {
                cudarc::nvrtc::Ptx::from_binary(image.to_vec())
            };
            let m =
                ctx.load_module(ptx).map_err(|e| Error::Gpu(format!("loading kernels {module} ({target}): {e}")))?;
            for name in *names {
                let f = m.load_function(name).map_err(|e| Error::Gpu(format!("kernel {name}: {e}")))?;
                functions.insert(*name, f);
            }
        }
        // The flash v2, wide, Sage bf16-P·V (d = 128) and implicit-GEMM convolution kernels use
        // more than the default 48 KB of shared memory.
        let big = [
            ("flash_attention_d64_bf16", attention::flash_smem_bytes(64)),
            ("flash_attention_d128_bf16", attention::flash_smem_bytes(128)),
            (conv::MMA_KERNEL, conv::MMA_MAX_SMEM),
        ]
        .into_iter()
        .chain(attention::WIDE_KERNELS.iter().map(|&(d, name)| (name, attention::wide_config(d).2)))
        .chain(sage::sage_mma_big_smem())
        .chain(gemm_wgmma::big_smem(target))
        .chain(attention_wgmma::big_smem(target))
        .chain(sage_wgmma::big_smem(target));
        for (name, bytes) in big {
            functions[name]
                .set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
                .map_err(gpu_err)?;
        }
        // Flash v3 is sized for two blocks per SM (2 x 37 KB of shared memory): ask for the largest
        // shared-memory carveout so the driver does not pick an L1-heavy split that fits one.
        for name in kernel_names().filter(|n| n.starts_with("flash_attention_v3_")) {
            functions[name]
                .set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100)
                .map_err(gpu_err)?;
        }
        keep_pool_memory(&ctx);
        let gemm_choice = gemm_choice_from_env()?;
        let (gemm_v2_default, gemm_tiles_default) = (gemm_choice.v2, gemm_choice.whole_tiles);
        let flash_v3_default = flash_v3_from_env()?;
        let sage_v2_default = sage_v2_from_env()?;
        let sms =
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(gpu_err)? as usize;
        let name = ctx.name().map_err(gpu_err)?;
        let dev = CudaDevice {
            emulated: name.starts_with(EMULATOR_NAME_PREFIX),
            name,
            total_memory: ctx.total_mem().map_err(gpu_err)?,
            // A stream of our own, not the legacy default stream, which CUDA graphs cannot capture.
            stream: ctx.new_stream().map_err(gpu_err)?,
            ctx,
            functions,
            compute_capability: cc,
            target,
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            budget: AtomicUsize::new(0),
            poison: AtomicBool::new(false),
            reference_attention: AtomicBool::new(false),
            conv_v2: AtomicBool::new(false),
            sage_bf16_pv: AtomicBool::new(false),
            sage_quantize_v1: AtomicBool::new(false),
            gemm_v2: AtomicBool::new(gemm_v2_default),
            gemm_v2_default,
            gemm_tiles: AtomicBool::new(gemm_tiles_default),
            gemm_tiles_default,
            gemm_wide: AtomicBool::new(false),
            gemm_narrow: AtomicBool::new(gemm_choice.narrow),
            gemm_narrow_default: gemm_choice.narrow,
            stream_k: Default::default(),
            flash_v3: AtomicBool::new(flash_v3_default),
            flash_v3_default,
            sage_v2: AtomicBool::new(sage_v2_default),
            sage_v2_default,
            sms,
            sms_limit: AtomicUsize::new(0),
            health: health::HealthWord::default(),
            graphs: AtomicBool::new(graph::graphs_from_env()?),
            capturing: AtomicBool::new(false),
            captured_live: Default::default(),
        };
        Ok(CudaBackend { dev: Arc::new(dev) })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// True under the CUDA emulator (scripts/with-cuda-sim.sh): correct but slow, so checks pick
    /// small shapes and timings mean nothing.
    pub fn is_emulated(&self) -> bool {
        self.dev.emulated
    }

    /// Run attention on the previous kernel versions (flash v2 for head dims 64/128, the row-wise
    /// kernel for 256/384/512, the row-wise Sage kernel), the references of the current ones;
    /// false restores the default.
    pub fn set_reference_attention(&self, on: bool) {
        self.dev.reference_attention.store(on, Ordering::Relaxed);
    }

    /// Record denoising steps as CUDA graphs (the default unless `FLUX2_CUDA_GRAPHS=off`), or
    /// run every step eagerly.
    pub fn set_graphs(&self, on: bool) {
        self.dev.graphs.store(on, Ordering::Relaxed);
    }

    /// Whether denoising steps are recorded as CUDA graphs.
    pub fn graphs(&self) -> bool {
        self.dev.graphs.load(Ordering::Relaxed)
    }

    /// Run convolutions with at most 8 output channels on v2 (the implicit GEMM) instead of the
    /// narrow CUDA-core kernels; false restores the default.
    pub fn set_conv_v2(&self, on: bool) {
        self.dev.conv_v2.store(on, Ordering::Relaxed);
    }

    /// Run Sage attention's P·V on bf16 tensor cores (the sm_80/86 kernels) on any card; false
    /// restores the default.
    pub fn set_sage_bf16_pv(&self, on: bool) {
        self.dev.sage_bf16_pv.store(on, Ordering::Relaxed);
    }

    /// Run Sage's Q/K pre-pass in its first version (block |x|max, then codes); false restores
    /// the default (v2, one pass).
    pub fn set_sage_quantize_v1(&self, on: bool) {
        self.dev.sage_quantize_v1.store(on, Ordering::Relaxed);
    }

    /// Whether the GEMMs run v3 (wgmma + TMA) on this device: its kernels are the sm_90a images.
    pub fn has_gemm_v3(&self) -> bool {
        self.dev.target == gemm_wgmma::V3_TARGET
    }

    /// Run the GEMMs (bf16 and FP8 linears) on their v2 kernels (mma.sync) where v3 (wgmma + TMA
    /// on sm_90a) would apply: the references of v3; false restores the default (v3, unless
    /// `FLUX2_CUDA_GEMM=v2`).
    pub fn set_gemm_v2(&self, on: bool) {
        self.dev.gemm_v2.store(on || self.dev.gemm_v2_default, Ordering::Relaxed);
    }

    /// Plan the persistent kernels (the v3 GEMMs' tile walk and stream-K split) for at most `sms`
    /// SMs (None: the device's own count): lets tests of small shapes put several tiles, or a whole
    /// tile between two pieces, on one block.
    pub fn limit_persistent_sms(&self, sms: Option<usize>) {
        self.dev.sms_limit.store(sms.unwrap_or(0), Ordering::Relaxed);
    }

    /// The blocks a v3 GEMM of `m` x `n` with `k_bytes` bytes of K per row splits its K slices
    /// over (stream-K), or None where it walks whole tiles (or v3 does not run here).
    pub fn gemm_stream_k_blocks(&self, m: usize, n: usize, k_bytes: usize) -> Option<usize> {
        let v3 = self.has_gemm_v3() && !self.dev.gemm_v2.load(Ordering::Relaxed);
        v3.then(|| gemm_wgmma::split(self, m, n, k_bytes)).flatten()
    }

    /// The SMs the persistent kernels plan for.
    fn persistent_sms(&self) -> usize {
        match self.dev.sms_limit.load(Ordering::Relaxed) {
            0 => self.dev.sms.max(1),
            n => n.min(self.dev.sms.max(1)),
        }
    }

    /// Let the v3 GEMMs walk whole tiles only, never stream-K (stream-K's reference); false
    /// restores the default (stream-K where it pays, unless `FLUX2_CUDA_GEMM=v3-tiles`).
    pub fn set_gemm_whole_tiles(&self, on: bool) {
        self.dev.gemm_tiles.store(on || self.dev.gemm_tiles_default, Ordering::Relaxed);
    }

    /// Run every v3 GEMM on 128x256 tiles (the wide kernels, whole tiles, no stream-K), whatever its
    /// shape: lets tests check them on small shapes; false restores the default (wide tiles where
    /// they take fewer waves, unless `FLUX2_CUDA_GEMM=v3-narrow`).
    pub fn set_gemm_wide_tiles(&self, on: bool) {
        self.dev.gemm_wide.store(on, Ordering::Relaxed);
    }

    /// Run the v3 GEMMs on 128x128 tiles only (the wide kernels' reference); false restores the
    /// default (wide tiles where they take fewer waves, unless `FLUX2_CUDA_GEMM=v3-narrow`).
    pub fn set_gemm_narrow_tiles(&self, on: bool) {
        self.dev.gemm_narrow.store(on || self.dev.gemm_narrow_default, Ordering::Relaxed);
    }

    /// Whether a v3 GEMM of `m` x `n` with `k_bytes` bytes of K per row runs on 128x256 tiles here.
    pub fn gemm_wide_tiles(&self, m: usize, n: usize, k_bytes: usize) -> bool {
        let v3 = self.has_gemm_v3() && !self.dev.gemm_v2.load(Ordering::Relaxed);
        v3 && gemm_wgmma::tiling(self, m, n, k_bytes).1
    }

    /// Run unmasked attention with head dims 64/128 on flash v3 (mma.sync) where v4 (wgmma + TMA
    /// on sm_90a) would apply: v4's reference; false restores the default (v4, unless
    /// `FLUX2_CUDA_ATTENTION=v3`).
    pub fn set_flash_v3(&self, on: bool) {
        self.dev.flash_v3.store(on || self.dev.flash_v3_default, Ordering::Relaxed);
    }

    /// Run unmasked Sage attention with head dim 128 on v2 (mma.sync) where v3 (wgmma + TMA on
    /// sm_90a) would apply: v3's reference; false restores the default (v3, unless
    /// `FLUX2_CUDA_SAGE=v2`).
    pub fn set_sage_v2(&self, on: bool) {
        self.dev.sage_v2.store(on || self.dev.sage_v2_default, Ordering::Relaxed);
    }

    /// Both switches above: attention on its mma.sync kernels (flash v3, Sage v2) where the wgmma
    /// ones would run.
    pub fn set_mma_sync_attention(&self, on: bool) {
        self.set_flash_v3(on);
        self.set_sage_v2(on);
    }

    /// The kernel versions the linears and attention run here (what `flux2 doctor` reports).
    pub fn kernel_summary(&self) -> String {
        let hopper = self.has_gemm_v3();
        let (gemm_v2, flash_v3) = (self.dev.gemm_v2.load(Ordering::Relaxed), self.dev.flash_v3.load(Ordering::Relaxed));
        let whole_tiles = self.dev.gemm_tiles.load(Ordering::Relaxed);
        let narrow = self.dev.gemm_narrow.load(Ordering::Relaxed);
        let gemm = match (hopper, gemm_v2) {
            (true, false) if whole_tiles => "v3 (wgmma + TMA; whole tiles, FLUX2_CUDA_GEMM=v3-tiles)",
            (true, false) if narrow => {
                "v3 (wgmma + TMA; 128x128 tiles, FLUX2_CUDA_GEMM=v3-narrow; stream-K where tiles leave SMs idle)"
            }
            (true, false) => {
                "v3 (wgmma + TMA; 128x256 tiles where they take fewer waves, stream-K where tiles leave SMs idle)"
            }
            (true, true) => "v2 (mma.sync; FLUX2_CUDA_GEMM=v2)",
            _ => "v2 (mma.sync)",
        };
        let fp8 = match (hopper && !gemm_v2, quantized::has_fp8_mma(self.dev.target)) {
            (true, _) => "v3 (wgmma e4m3)",
            (false, true) => "v2 (mma.sync e4m3)",
            (false, false) => "v1 (CUDA cores: no e4m3 tensor cores in this image)",
        };
        let attention = match (hopper, flash_v3) {
            (true, false) => "flash v4 (wgmma + TMA) unmasked, v3 masked",
            (true, true) => "flash v3 (FLUX2_CUDA_ATTENTION=v3)",
            _ => "flash v3 (mma.sync)",
        };
        let sage = match (hopper, self.dev.sage_v2.load(Ordering::Relaxed), quantized::has_fp8_mma(self.dev.target)) {
            (true, false, _) => "v3 (wgmma + TMA) unmasked d 128, v2 otherwise",
            (true, true, _) => "v2 (mma.sync; FLUX2_CUDA_SAGE=v2)",
            (false, _, true) => "v2 (mma.sync, e4m3 P·V)",
            (false, _, false) => "v2 (mma.sync, bf16 P·V: no e4m3 tensor cores in this image)",
        };
        let steps = if self.graphs() { "recorded as CUDA graphs" } else { "eager (FLUX2_CUDA_GRAPHS=off)" };
        format!("GEMM {gemm}, FP8 linears {fp8}, attention {attention}, Sage attention {sage}, denoising steps {steps}")
    }

    /// Fill every new output buffer with NaN first (selftest: catches unwritten elements).
    pub fn set_poison(&self, on: bool) {
        self.dev.poison.store(on, Ordering::Relaxed);
    }

    /// Bytes held by live tensors now, and the most ever held.
    pub fn memory(&self) -> (usize, usize) {
        (self.dev.live.load(Ordering::Relaxed), self.dev.peak.load(Ordering::Relaxed))
    }

    /// Limit the bytes live tensors may hold (the memory plan's budget); None removes the limit.
    pub fn set_budget(&self, bytes: Option<usize>) {
        self.dev.budget.store(bytes.unwrap_or(0), Ordering::Relaxed);
    }

    /// The device's UUID (to find it in NVML).
    pub fn uuid(&self) -> Option<[u8; 16]> {
        self.dev.ctx.uuid().ok().map(|u| u.bytes.map(|b| b as u8))
    }

    /// Free device memory as the driver reports it for this context.
    pub fn free_memory(&self) -> Option<usize> {
        self.dev.ctx.mem_get_info().ok().map(|(free, _)| free)
    }

    /// Uninitialised (or poisoned) storage for `len` elements.
    fn alloc(&self, dtype: DType, len: usize) -> Result<CudaStorage> {
        let bytes = len
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| Error::OutOfMemory(format!("{len} elements of {dtype} exceed the address space")))?;
        let budget = self.dev.budget.load(Ordering::Relaxed);
        let live = self.dev.live.load(Ordering::Relaxed);
        if budget > 0 && live + bytes > budget {
            return Err(Error::OutOfMemory(format!(
                "allocating {:.1} MiB would exceed the VRAM budget of {:.2} GiB ({:.2} GiB in use)",
                bytes as f64 / 1048576.0,
                budget as f64 / 1073741824.0,
                live as f64 / 1073741824.0
            )));
        }
        let buf = unsafe { self.dev.stream.alloc::<u8>(bytes.max(1)) }.map_err(gpu_err)?;
        let live = self.dev.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.dev.peak.fetch_max(live, Ordering::Relaxed);
        let captured = self.dev.capturing.load(Ordering::Relaxed);
        if captured {
            self.dev.captured_live.fetch_add(bytes as i64, Ordering::Relaxed);
        }
        let s = CudaStorage { buf, dtype, len, dev: self.dev.clone(), captured };
        if self.dev.poison.load(Ordering::Relaxed) && len > 0 {
            let p = s.base_ptr();
            match dtype.size_in_bytes() {
                2 => launch!(self.dev, "fill_u16", grid_1d(len), p, 0x7FC0u16, len as i64)?,
                4 => launch!(self.dev, "fill_u32", grid_1d(len), p, 0x7FC0_0000u32, len as i64)?,
                _ => {}
            }
        }
        Ok(s)
    }

    fn output(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let len = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let len = len.ok_or_else(|| Error::OutOfMemory(format!("a tensor of shape {shape:?} overflows")))?;
        let s = self.alloc(dtype, len)?;
        Tensor::from_storage(Storage::Cuda(s), shape)
    }

    /// A dense copy of `x` if it is a strided view, else `x` itself.
    fn dense(&self, x: &Tensor) -> Result<Tensor> {
        if x.is_contiguous() {
            self.storage(x)?;
            Ok(x.clone())
        } else {
            self.contiguous(x)
        }
    }

    fn storage<'a>(&self, x: &'a Tensor) -> Result<&'a CudaStorage> {
        match x.storage() {
            Storage::Cuda(s) => Ok(s),
            _ => Err(Error::Gpu("the CUDA backend was given a tensor that lives on another device".into())),
        }
    }

    /// Device address of the first element of `x`'s view.
    fn ptr(&self, x: &Tensor) -> Result<u64> {
        let s = self.storage(x)?;
        Ok(s.base_ptr() + (x.offset() * s.dtype.size_in_bytes()) as u64)
    }

    /// Pointer to a dense bf16 tensor (copying strided views).
    fn bf16_arg(&self, x: &Tensor, op: &'static str) -> Result<(Tensor, u64)> {
        let d = self.dense(x)?;
        if d.dtype() != DType::BF16 {
            return Err(Error::shape(op, format!("expected a bf16 activation, got {}", d.dtype())));
        }
        let p = self.ptr(&d)?;
        Ok((d, p))
    }

    /// Pointer and row stride of a per-sample vector view `[B, C]` (last dim contiguous).
    fn vec_arg(&self, v: &Tensor, op: &'static str) -> Result<(Tensor, u64, i64)> {
        let v = if v.strides()[1] == 1 || v.dim(1) == 1 { v.clone() } else { self.contiguous(v)? };
        if v.dtype() != DType::BF16 {
            return Err(Error::shape(op, format!("expected bf16 modulation vectors, got {}", v.dtype())));
        }
        let p = self.ptr(&v)?;
        let stride = if v.dim(0) > 1 { v.strides()[0] as i64 } else { v.dim(1) as i64 };
        Ok((v, p, stride))
    }

    fn f32_arg(&self, x: &Tensor, op: &'static str) -> Result<(Tensor, u64)> {
        let d = self.dense(x)?;
        if d.dtype() != DType::F32 {
            return Err(Error::shape(op, format!("expected an f32 table, got {}", d.dtype())));
        }
        let p = self.ptr(&d)?;
        Ok((d, p))
    }

    /// Upload host bytes into new device storage.
    fn upload_bytes(&self, bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if bytes.len() != numel * dtype.size_in_bytes() {
            return Err(Error::shape("upload", format!("{} bytes of {dtype} for shape {shape:?}", bytes.len())));
        }
        let mut s = self.alloc(dtype, numel)?;
        if !bytes.is_empty() {
            self.dev.stream.memcpy_htod(bytes, &mut s.buf).map_err(gpu_err)?;
        }
        Tensor::from_storage(Storage::Cuda(s), shape)
    }
}

/// Keep freed memory in the driver's pool instead of returning it at every synchronisation.
fn keep_pool_memory(ctx: &Arc<CudaContext>) {
    if let Some(pool) = default_pool(ctx) {
        let mut threshold: u64 = u64::MAX;
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut _,
            );
        }
    }
}

/// The device's default memory pool (stream-ordered allocations draw from it), where the driver
/// has one.
fn default_pool(ctx: &Arc<CudaContext>) -> Option<sys::CUmemoryPool> {
    if !ctx.has_async_alloc() {
        return None;
    }
    let mut pool = std::mem::MaybeUninit::uninit();
    let found = unsafe { sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device()) };
    (found == sys::CUresult::CUDA_SUCCESS).then(|| unsafe { pool.assume_init() })
}

fn to_bf16_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes()).collect()
}

impl Backend for CudaBackend {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn kind(&self) -> DeviceKind {
        DeviceKind::Cuda
    }

    fn name(&self) -> String {
        let (maj, min) = self.dev.compute_capability;
        format!("{} (sm_{maj}{min}, {} GiB, kernels {})", self.dev.name, self.dev.total_memory >> 30, self.dev.target)
    }

    fn activation_dtype(&self) -> DType {
        DType::BF16
    }

    fn upload(&self, host: &Tensor, dtype: DType) -> Result<Tensor> {
        let values = match host.cpu_storage() {
            Some(_) => host.to_vec_f32()?,
            None if host.device() == DeviceKind::Cuda => return self.contiguous(host),
            None => return Err(Error::Gpu("upload expects a host tensor".into())),
        };
        match dtype {
            DType::F32 => self.upload_bytes(bytemuck::cast_slice(&values), DType::F32, host.shape()),
            _ => self.upload_bytes(&to_bf16_bytes(&values), DType::BF16, host.shape()),
        }
    }

    fn load_weight(&self, bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        match dtype {
            // Straight from the memory-mapped file to the device, in the stored dtype.
            DType::BF16 => self.upload_bytes(bytes, DType::BF16, shape),
            other => {
                let values = decode_to_f32(bytes, other);
                self.upload_bytes(&to_bf16_bytes(&values), DType::BF16, shape)
            }
        }
    }

    fn contiguous(&self, x: &Tensor) -> Result<Tensor> {
        layout::contiguous(self, x)
    }

    fn concat(&self, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
        layout::concat(self, xs, dim)
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.stream.synchronize().map_err(gpu_err)
    }

    fn capture(
        &self,
        inputs: &[&Tensor],
        output: (&[usize], DType),
        work: &mut dyn FnMut(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Option<Box<dyn crate::backend::Captured>>> {
        graph::capture(self, inputs, output, work)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        gemm::linear(self, x, w, bias)
    }

    fn swiglu_concat(&self, prefix: &Tensor, x: &Tensor) -> Result<Tensor> {
        pointwise::swiglu_concat(self, prefix, x)
    }

    fn linear_gated_add(
        &self,
        x: &Tensor,
        gate: &Tensor,
        a: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        gemm::linear_gated_add(self, x, gate, a, w, bias)
    }

    fn load_quantized(&self, q: &crate::quant::Quantized) -> Result<QuantTensor> {
        q.validate()?;
        let data = self.upload_bytes(&q.codes, DType::U8, &[q.codes.len()])?;
        // GGML blocks carry their scales inside.
        let scales = if q.scales.is_empty() {
            None
        } else {
            Some(self.upload_bytes(bytemuck::cast_slice(&q.scales), DType::F32, &[q.scales.len()])?)
        };
        Ok(QuantTensor { format: q.format, rows: q.rows, cols: q.cols, data, scales })
    }

    fn linear_quantized(&self, x: &Tensor, w: &QuantTensor, bias: Option<&Tensor>) -> Result<Tensor> {
        gemm::linear_quantized(self, x, w, bias)
    }

    fn linear_fp8(&self, x: &Tensor, w: &QuantTensor, bias: Option<&Tensor>) -> Result<Tensor> {
        quantized::linear_fp8(self, x, w, bias, None)
    }

    fn linear_fp8_gated_add(
        &self,
        x: &Tensor,
        gate: &Tensor,
        a: &Tensor,
        w: &QuantTensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        quantized::linear_fp8(self, a, w, bias, Some(gemm::Residual { x, gate }))
    }

    fn swiglu_linear_fp8_gated_add(
        &self,
        x: &Tensor,
        gate: &Tensor,
        prefix: Option<&Tensor>,
        a: &Tensor,
        w: &QuantTensor,
    ) -> Result<Tensor> {
        quantized::swiglu_linear_fp8(self, prefix, a, w, None, Some(gemm::Residual { x, gate }))
    }

    fn layer_norm_modulate_linear_fp8(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        eps: f32,
        w: &QuantTensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        quantized::layer_norm_modulate_linear_fp8(self, x, shift, scale, eps, w, bias)
    }

    fn swiglu_linear_fp8(
        &self,
        prefix: Option<&Tensor>,
        x: &Tensor,
        w: &QuantTensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        quantized::swiglu_linear_fp8(self, prefix, x, w, bias, None)
    }

    fn attention_sage(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
        sage::attention_sage(self, q, k, v, mask, scale)
    }

    fn attention_sage_normed(
        &self,
        q: &[crate::backend::QkPart],
        k: &[crate::backend::QkPart],
        rope: &crate::backend::QkRope,
        v: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        sage::attention_sage_normed(self, q, k, rope, v, scale)
    }

    fn attention_sage_normed_linear_fp8_gated_add(
        &self,
        q: &[crate::backend::QkPart],
        k: &[crate::backend::QkPart],
        rope: &crate::backend::QkRope,
        v: &Tensor,
        scale: f32,
        outs: [crate::backend::GatedFp8; 2],
    ) -> Result<[Tensor; 2]> {
        e4m3_rows::attention_sage_normed_linear_fp8(self, q, k, rope, v, scale, outs)
    }

    fn attention_linear_fp8_gated_add(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        outs: [crate::backend::GatedFp8; 2],
    ) -> Result<[Tensor; 2]> {
        e4m3_rows::attention_linear_fp8(self, q, k, v, scale, outs)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
        attention::attention(self, q, k, v, mask, scale)
    }

    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: Padding2d,
    ) -> Result<Tensor> {
        conv::conv2d(self, x, w, bias, stride, padding)
    }

    fn layer_norm(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        reduce::layer_norm(self, x, None, eps)
    }

    fn layer_norm_modulate(&self, x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f32) -> Result<Tensor> {
        reduce::layer_norm(self, x, Some((shift, scale)), eps)
    }

    fn modulate(&self, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        pointwise::modulate(self, x, shift, scale)
    }

    fn rms_norm(&self, x: &Tensor, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        reduce::rms_norm(self, x, weight, eps)
    }

    fn group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        weight: &Tensor,
        bias: &Tensor,
        eps: f32,
        silu: bool,
    ) -> Result<Tensor> {
        reduce::group_norm(self, x, groups, weight, bias, eps, silu)
    }

    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        pointwise::silu(self, x)
    }

    fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        pointwise::swiglu(self, x)
    }

    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
        pointwise::axpby(self, a, x, b, y)
    }

    fn gated_add(&self, x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
        pointwise::gated_add(self, x, gate, y)
    }

    fn channel_affine(&self, x: &Tensor, mul: &Tensor, add: &Tensor) -> Result<Tensor> {
        pointwise::channel_affine(self, x, mul, add)
    }

    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        pointwise::upsample_nearest2x(self, x)
    }

    fn rope_interleaved(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        pointwise::rope(self, x, cos, sin, true)
    }

    fn rope_half(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        pointwise::rope(self, x, cos, sin, false)
    }

    fn rms_norm_rope(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        eps: f32,
        cos: &Tensor,
        sin: &Tensor,
        pairs: RopePairs,
    ) -> Result<Tensor> {
        reduce::rms_norm_rope(self, x, weight, eps, cos, sin, pairs)
    }

    fn timestep_embedding(&self, t: &Tensor, dim: usize, max_period: f32) -> Result<Tensor> {
        pointwise::timestep_embedding(self, t, dim, max_period)
    }

    fn embedding(&self, ids: &[u32], table: &Tensor) -> Result<Tensor> {
        pointwise::embedding(self, ids, table)
    }

    fn record_nonfinite(&self, x: &Tensor, check: u32) -> Result<()> {
        health::record_nonfinite(self, x, check)
    }

    fn take_nonfinite(&self) -> Result<Option<u32>> {
        health::take_nonfinite(self)
    }
}
