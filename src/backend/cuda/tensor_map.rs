//! TMA tensor maps (`CUtensorMap`): the descriptor a Hopper kernel's `cp.async.bulk.tensor` reads
//! to copy a box of a global tensor into shared memory. Made on the host by the driver
//! (`cuTensorMapEncodeTiled`) and passed by value as a `__grid_constant__` kernel parameter
//! (kernels/hopper.cuh's `TensorMap`).

use cudarc::driver::{sys, DeviceRepr};

use crate::error::{Error, Result};

/// The driver's 128 opaque bytes, 64-byte aligned as `CUtensorMap` is.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct TensorMap([u64; 16]);

// SAFETY: plain bytes, passed to the kernel by value as the driver encoded them.
unsafe impl DeviceRepr for TensorMap {}

/// Element types the tiles load: bf16, or one-byte codes (e4m3, and Sage's int8).
#[derive(Clone, Copy)]
pub enum TileElem {
    Bf16,
    E4m3,
}

/// A row-major `[rows, cols]` matrix at device address `ptr`, read in boxes of 128 bytes of a row
/// (64 bf16 or 128 e4m3) by `box_rows` rows, with the 128-byte swizzle the wgmma descriptors
/// expect; elements past the matrix read as zero. Needs `ptr` 16-byte aligned and rows a multiple
/// of 16 bytes.
pub fn row_major_128b(ptr: u64, elem: TileElem, rows: usize, cols: usize, box_rows: u32) -> Result<TensorMap> {
    row_major_swizzled(ptr, elem, rows, cols, box_rows, Swizzle::B128)
}

/// The swizzle of a box: its rows are this many bytes (the wgmma descriptor's swizzle mode).
#[derive(Clone, Copy)]
pub enum Swizzle {
    B64,
    B128,
}

/// As `row_major_128b`, with boxes of `swizzle`'s bytes of a row.
pub fn row_major_swizzled(
    ptr: u64,
    elem: TileElem,
    rows: usize,
    cols: usize,
    box_rows: u32,
    swizzle: Swizzle,
) -> Result<TensorMap> {
    let (dtype, size) = match elem {
        TileElem::Bf16 => (sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2u64),
        TileElem::E4m3 => (sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8, 1u64),
    };
    let (mode, box_bytes) = match swizzle {
        Swizzle::B64 => (sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B, 64),
        Swizzle::B128 => (sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B, 128),
    };
    let dims = [cols as u64, rows as u64];
    let strides = [cols as u64 * size];
    let boxes = [(box_bytes / size) as u32, box_rows];
    let element_strides = [1u32, 1];
    let mut map = TensorMap([0; 16]);
    // SAFETY: every pointer names a live local of the length the rank (2) implies; the map is
    // 64-byte aligned and 128 bytes long.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            (&mut map as *mut TensorMap).cast(),
            dtype,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            mode,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Gpu(format!("cuTensorMapEncodeTiled ({rows} x {cols} at {ptr:#x}): {r:?}")));
    }
    Ok(map)
}
