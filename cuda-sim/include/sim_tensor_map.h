// The emulator's encoding of a CUtensorMap (128 opaque bytes on the host side): written by
// cuTensorMapEncodeTiled (driver.cpp) after the driver's checks, read by the TMA instructions
// (hopper.cpp). The magic word tells a map apart from bytes that are not one.
#pragma once
#include <cstdint>

struct sim_tensor_map {
    uint32_t magic;
    uint8_t rank, elem_size, swizzle, oob_nan;  // swizzle: CUtensorMapSwizzle (0 none, 1 32B, 2 64B, 3 128B)
    uint64_t address;
    uint64_t dims[5];
    uint64_t strides[4];  // bytes between consecutive indices of dims 1..rank-1
    uint16_t box[5];
    uint8_t element_strides[5];
};
static_assert(sizeof(sim_tensor_map) <= 128, "a tensor map is 128 bytes");
#define SIM_TENSOR_MAP_MAGIC 0x544d4150u  // "TMAP"
