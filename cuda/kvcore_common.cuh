// kvcore shared definitions for the CUDA kernels. Values match kvcore/_typedefs.pxd.
#pragma once

typedef int page_id_t;        // a page id, or KVCORE_NO_PAGE
typedef long long slot_t;     // page_id * page_size + offset_in_page, or -1 (padding)

#define KVCORE_NO_PAGE (-1)
#define KVCORE_PADDING_SLOT (-1LL)

// Bits OR-ed into the device error word when a kernel meets an argument it refuses.
// The offending element is skipped, so no input can make a kernel write outside the pool.
#define KVCORE_ERR_SLOT_OUT_OF_RANGE 1
#define KVCORE_ERR_PAGE_OUT_OF_RANGE 2
#define KVCORE_ERR_OUTPUT_TOO_SMALL 4

#define KVCORE_LAYOUT_NHD 0
#define KVCORE_LAYOUT_HND 1

// Moved as opaque words: V is one of uint4 (16 B), uint2 (8 B), unsigned int (4 B),
// unsigned short (2 B). The host picks the widest V that divides the row and every
// pointer and stride, so bfloat16, float16 and float32 all move the same way.
