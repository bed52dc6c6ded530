// kvcore data-movement kernels: scatter new K/V into pages, gather pages into contiguous
// tensors, copy pages (copy-on-write), swap pages to and from the host tier. Loaded at
// run time with cupy.RawModule (NVRTC).
//
// Shapes use the glossary names: L layers, P num_pages, S page_size, H num_kv_heads,
// D head_dim, T tokens, B batch. One layer's K (or V) pool is P pages whose
// in-page block is contiguous, [S, H, D] (NHD) or [H, S, D] (HND), while the distance
// between pages (`page_stride`) is free: kvcore's own [L, 2, P, ...] pool, vLLM's
// per-layer [2, P, ...] and [P, 2, ...] tensors and separate K and V tensors all fit.
// Every pointer and stride below is in units of the vector type V (see
// kvcore_common.cuh); `row` is one (token, head) run of D elements = row_vecs vectors.
//
// The argument lists of the extern "C" entry points at the bottom are mirrored, name by
// name, in kvcore/backends/kernel_abi.py; tests/test_kernel_abi.py checks that they agree.
#include "kvcore_common.cuh"

namespace kvcore {

// Memory operations each thread keeps in flight per loop trip: loads are issued
// together, then stores. Measured on the H200 (bf16, 8 x 128, 64 x 1,024 tokens):
// scatter is fastest at 4 tokens per trip (8 went from 3.9 to 3.5 TB/s); the page
// copies of gather and copy_pages gain about 3% at 8 vectors per trip.
constexpr int UNROLL = 4;        // scatter: tokens per block trip (the host sizes grids by it)
constexpr int COPY_UNROLL = 8;   // gather, copy_pages: vectors per thread per trip

// Offset, in vectors, of row (offset_in_page, head) inside one page's block.
__device__ __forceinline__ long long in_page_row(int layout, long long off, long long head,
                                                 long long page_size, long long num_heads,
                                                 long long row_vecs) {
  if (layout == KVCORE_LAYOUT_NHD) {
    return (off * num_heads + head) * row_vecs;
  }
  return (head * page_size + off) * row_vecs;
}

// page = slot / page_size with a shift when page_size is a power of two (page_shift >= 0).
__device__ __forceinline__ long long page_of(long long slot, long long page_size, int page_shift) {
  return page_shift >= 0 ? (slot >> page_shift) : slot / page_size;
}

// Copy n vectors from src_a to dst_a and n from src_b to dst_b (K and V together, so a
// thread has 2 * COPY_UNROLL loads in flight), COPY_UNROLL per thread per trip.
template <typename V>
__device__ __forceinline__ void block_copy2(V* __restrict__ dst_a, const V* __restrict__ src_a,
                                            V* __restrict__ dst_b, const V* __restrict__ src_b,
                                            long long n) {
  const long long step = (long long)blockDim.x * COPY_UNROLL;
  for (long long base = threadIdx.x; base < n; base += step) {
    V a[COPY_UNROLL], b[COPY_UNROLL];
#pragma unroll
    for (int u = 0; u < COPY_UNROLL; ++u) {
      const long long j = base + (long long)u * blockDim.x;
      if (j < n) {
        a[u] = src_a[j];
        b[u] = src_b[j];
      }
    }
#pragma unroll
    for (int u = 0; u < COPY_UNROLL; ++u) {
      const long long j = base + (long long)u * blockDim.x;
      if (j < n) {
        dst_a[j] = a[u];
        dst_b[j] = b[u];
      }
    }
  }
}

// Copy n vectors from src to dst, COPY_UNROLL per thread per trip.
template <typename V>
__device__ __forceinline__ void block_copy(V* __restrict__ dst, const V* __restrict__ src,
                                           long long n) {
  const long long step = (long long)blockDim.x * COPY_UNROLL;
  for (long long base = threadIdx.x; base < n; base += step) {
    V buf[COPY_UNROLL];
#pragma unroll
    for (int u = 0; u < COPY_UNROLL; ++u) {
      const long long j = base + (long long)u * blockDim.x;
      if (j < n) buf[u] = src[j];
    }
#pragma unroll
    for (int u = 0; u < COPY_UNROLL; ++u) {
      const long long j = base + (long long)u * blockDim.x;
      if (j < n) dst[j] = buf[u];
    }
  }
}

// scatter: blocks stride over tokens, UNROLL tokens per trip; each thread owns fixed
// (head, vector) positions of a token row, so the division that splits them is done
// once per thread. K and V move in the same launch; a key-only pool (MLA) passes
// v = v_pool = nullptr and moves K alone.
template <typename V>
__device__ void scatter(const V* __restrict__ k,        // [T, H, D] with strides below
                        const V* __restrict__ v,        // [T, H, D] with strides below
                        long long k_stride_t, long long k_stride_h,
                        long long v_stride_t, long long v_stride_h,
                        const slot_t* __restrict__ slot_mapping,  // [T], -1 = skip
                        V* __restrict__ k_pool,         // layer's K pool, page p at p * page_stride
                        V* __restrict__ v_pool,         // layer's V pool, likewise
                        long long num_tokens, long long num_slots, long long page_stride,
                        int layout, long long page_size, int page_shift, long long num_heads,
                        long long row_vecs, int* __restrict__ error_word) {
  const int vecs_per_token = (int)(num_heads * row_vecs);
  const long long stride = (long long)gridDim.x * UNROLL;
  const bool has_v = v_pool != nullptr;
  for (int j = threadIdx.x; j < vecs_per_token; j += blockDim.x) {
    const int head = j / (int)row_vecs;
    const int w = j - head * (int)row_vecs;
    const long long k_src = head * k_stride_h + w;
    const long long v_src = head * v_stride_h + w;
    for (long long t0 = (long long)blockIdx.x * UNROLL; t0 < num_tokens; t0 += stride) {
      slot_t slot[UNROLL];
      V kbuf[UNROLL], vbuf[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const long long t = t0 + u;
        slot[u] = t < num_tokens ? slot_mapping[t] : KVCORE_PADDING_SLOT;
        if (slot[u] != KVCORE_PADDING_SLOT) {
          kbuf[u] = k[t * k_stride_t + k_src];
          if (has_v) vbuf[u] = v[t * v_stride_t + v_src];
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (slot[u] == KVCORE_PADDING_SLOT) continue;
        if (slot[u] < 0 || slot[u] >= num_slots) {
          if (j == 0) atomicOr(error_word, KVCORE_ERR_SLOT_OUT_OF_RANGE);
          continue;
        }
        const long long page = page_of(slot[u], page_size, page_shift);
        const long long off = slot[u] - page * page_size;
        const long long dst = page * page_stride +
                              in_page_row(layout, off, head, page_size, num_heads, row_vecs) + w;
        k_pool[dst] = kbuf[u];
        if (has_v) v_pool[dst] = vbuf[u];
      }
    }
  }
}

// gather: one block per page entry of the batch (grid-stride); the block finds its
// sequence by binary search over page_indptr, then copies the page's valid tokens. In
// NHD those tokens are one contiguous run of the page, so the copy is a straight one.
// Entries beyond page_indptr[batch] (padding of fixed-size metadata) are never read.
// A key-only pool passes v_pool = v_out = nullptr.
template <typename V>
__device__ void gather(const V* __restrict__ k_pool, const V* __restrict__ v_pool,
                       const int* __restrict__ page_indptr,    // [B + 1], first element 0
                       const int* __restrict__ page_indices,   // [page_indptr[B]]
                       const int* __restrict__ last_page_len,  // [B], in [0, S]
                       const long long* __restrict__ token_indptr,  // [B + 1]
                       V* __restrict__ k_out,                  // [out_rows, H, D]
                       V* __restrict__ v_out,                  // [out_rows, H, D]
                       int batch, long long out_rows, long long num_pages,
                       long long page_stride, int layout, long long page_size,
                       long long num_heads, long long row_vecs, int* __restrict__ error_word) {
  const int nnz = page_indptr[batch];
  const int vecs_per_token = (int)(num_heads * row_vecs);
  for (long long e = blockIdx.x; e < nnz; e += gridDim.x) {
    int lo = 0, hi = batch - 1;  // last b with page_indptr[b] <= e
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (page_indptr[mid] <= e) lo = mid; else hi = mid - 1;
    }
    const int b = lo;
    const long long page = page_indices[e];
    if (page < 0 || page >= num_pages) {
      if (threadIdx.x == 0) atomicOr(error_word, KVCORE_ERR_PAGE_OUT_OF_RANGE);
      continue;
    }
    const long long pos = e - page_indptr[b];
    const bool is_last = (e == page_indptr[b + 1] - 1);
    const long long count = is_last ? last_page_len[b] : page_size;
    const long long first_row = token_indptr[b] + pos * page_size;
    if (first_row + count > out_rows) {
      if (threadIdx.x == 0) atomicOr(error_word, KVCORE_ERR_OUTPUT_TOO_SMALL);
      continue;
    }
    const long long out_base = first_row * vecs_per_token;
    const long long page_base = page * page_stride;
    if (layout == KVCORE_LAYOUT_NHD) {
      if (v_pool != nullptr) {
        block_copy2(k_out + out_base, k_pool + page_base, v_out + out_base,
                    v_pool + page_base, count * vecs_per_token);
      } else {
        block_copy(k_out + out_base, k_pool + page_base, count * vecs_per_token);
      }
      continue;
    }
    for (int j = threadIdx.x; j < vecs_per_token; j += blockDim.x) {
      const int head = j / (int)row_vecs;
      const int w = j - head * (int)row_vecs;
#pragma unroll 4
      for (long long off = 0; off < count; ++off) {
        const long long src =
            page_base + in_page_row(layout, off, head, page_size, num_heads, row_vecs) + w;
        const long long dst = out_base + off * vecs_per_token + j;
        k_out[dst] = k_pool[src];
        if (v_pool != nullptr) v_out[dst] = v_pool[src];
      }
    }
  }
}

// copy_pages: one block per (pair, layer, K/V) chunk. A page of one layer's K or V is
// contiguous in both layouts (page_vecs vectors), so each chunk is a straight copy;
// pools[] holds each (layer, K/V) pool's base address, so the layers may be separate
// allocations (adopted per-layer tensors).
template <typename V>
__device__ void copy_pages(const unsigned long long* __restrict__ pools,  // [num_pools] bytes
                           const page_id_t* __restrict__ src,  // [num_pairs]
                           const page_id_t* __restrict__ dst,  // [num_pairs]
                           long long num_pairs, long long num_pools, long long num_pages,
                           long long page_stride, long long page_vecs,
                           int* __restrict__ error_word) {
  const long long num_chunks = num_pairs * num_pools;
  for (long long c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const long long pool = c / num_pairs;         // = layer * 2 + (0 for K, 1 for V)
    const long long pair = c - pool * num_pairs;  // pairs fastest: neighbours share a layer
    const long long s = src[pair], d = dst[pair];
    if (s < 0 || s >= num_pages || d < 0 || d >= num_pages) {
      if (threadIdx.x == 0) atomicOr(error_word, KVCORE_ERR_PAGE_OUT_OF_RANGE);
      continue;
    }
    V* base = reinterpret_cast<V*>(pools[pool]);
    block_copy(base + d * page_stride, base + s * page_stride, page_vecs);
  }
}

// swap_pages: page pairs between the device pool and the host tier, in either direction,
// in one launch. The host tier is page-locked host memory that the device reads and
// writes through its mapping (the same address under UVA), page-major: host page h is
// num_pools contiguous chunks of page_vecs vectors, chunk (slot, K/V) at
// (h * num_pools + slot * 2 + kv) * page_vecs. One block per (pair, slot, K/V) chunk,
// pairs slowest, so neighbouring blocks cover neighbouring host bytes (long PCIe runs).
// Reads of host memory are latency bound (a round trip over PCIe per load): each thread
// issues COPY_UNROLL 16-byte loads before its first store, and several blocks per SM
// keep tens of KB in flight per SM, so both directions stay at the link's rate.
template <typename V>
__device__ void swap_pages(const page_id_t* __restrict__ device_pages,  // [num_pairs]
                           const page_id_t* __restrict__ host_pages,    // [num_pairs]
                           long long num_pairs, int to_host,
                           const unsigned long long* __restrict__ pools,  // [num_pools] bytes
                           V* __restrict__ host_pool, long long num_pools, long long num_pages,
                           long long num_host_pages, long long page_stride,
                           long long page_vecs, int* __restrict__ error_word) {
  const long long num_chunks = num_pairs * num_pools;
  for (long long c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const long long pair = c / num_pools;
    const long long pool = c - pair * num_pools;  // = slot * 2 + (0 for K, 1 for V)
    const long long d = device_pages[pair], h = host_pages[pair];
    if (d < 0 || d >= num_pages || h < 0 || h >= num_host_pages) {
      if (threadIdx.x == 0) atomicOr(error_word, KVCORE_ERR_PAGE_OUT_OF_RANGE);
      continue;
    }
    V* dev = reinterpret_cast<V*>(pools[pool]) + d * page_stride;
    V* host = host_pool + (h * num_pools + pool) * page_vecs;
    if (to_host) {
      block_copy(host, dev, page_vecs);
    } else {
      block_copy(dev, host, page_vecs);
    }
  }
}

// ---- fp8 e4m3 pools --------------------------------------------------------------------
// The conversions of kvcore/fp8.py, bit for bit (tests/test_fp8.py checks the NumPy side
// exhaustively; the CUDA tests compare the two byte for byte). Real value = fp8 value x
// scale. Quantize: y = x / scale in float32 (IEEE division), NaN -> 0x7F, clamp to
// +-448, then the hardware's round-to-nearest-even conversion. Dequantize: e4m3 value x
// scale in float32, rounded to nearest even to float16 / bfloat16; NaN -> canonical NaN.

__device__ __forceinline__ float half_to_float(unsigned short h, int bf16) {
  if (bf16) return __uint_as_float(((unsigned int)h) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f, int bf16) {
  if (f != f) return bf16 ? 0x7FC0 : 0x7E00;
  if (bf16) {
    const unsigned int bits = __float_as_uint(f);
    return (unsigned short)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// The float32 quotient x / scale, rounded to nearest even, the value the e4m3 rounding
// starts from: the IEEE division (__fdiv_rn). Measured on the H200 (bench_fp8.py, both
// variants in one process), it is faster than the alternative below (2.47 against 2.15
// TB/s for 64 x 1,024 tokens), so it is what ships; -DKVCORE_FP8_RECIPROCAL builds the
// alternative, which the benchmark measures beside it. The alternative: with the scale's
// reciprocal inv = RN(1 / scale) computed once, Markstein's correction gives the same
// quotient with three: q0 = RN(x * inv) is within 1.5 ulp of x / scale, the remainder
// r = x - q0 * scale is exact in one fma, and RN(q0 + r * inv) is the rounded quotient.
// Conditions, checked once per scale by reciprocal_ok: scale and inv normal, and no
// underflow in r for any quotient that can change a code (|q| >= 2**-11: anything
// smaller quantizes to a signed zero, whatever its last bits), so scale >= 2**-90.
// The quotient takes x's sign (a zero x would otherwise give +0 for -0).
// Past |q0| = 440 every value saturates to +-448 (the e4m3 midpoint below 448 is 432),
// so q0 is used as it is there, which also keeps an overflow (q0 = inf) from turning
// into inf - inf. tests/test_fp8.py replays these steps exactly in NumPy over every
// float16 / bfloat16 input at each test scale; the CUDA tests compare the kernel's codes
// with the division's (the NumPy oracle) byte for byte.
__device__ __forceinline__ bool reciprocal_ok(float scale) {
  return scale >= 0x1p-90f && scale < 0x1p+125f;
}

__device__ __forceinline__ float scaled(float x, float scale, float inv, bool by_reciprocal) {
#ifdef KVCORE_FP8_RECIPROCAL
  if (by_reciprocal) {
    const float q0 = __fmul_rn(x, inv);
    const float r = __fmaf_rn(-q0, scale, x);
    const float q1 = __fmaf_rn(r, inv, q0);
    // x = -0 gives r = +0 and q1 = +0 + -0 = +0: the quotient keeps x's sign explicitly
    return fabsf(q0) < 440.0f ? copysignf(q1, x) : q0;
  }
#endif
  return __fdiv_rn(x, scale);
}

// Two values to two e4m3 codes in one conversion (lo in the low byte). The saturating
// conversion already maps |y| > 448 (inf included) to +-448, so no clamp comes first;
// a NaN input becomes 0x7F whatever its sign, as kvcore.fp8.quantize writes it.
__device__ __forceinline__ unsigned short e4m3x2(float lo, float hi, float scale, float inv,
                                                 bool by_reciprocal) {
  const float y_lo = scaled(lo, scale, inv, by_reciprocal);
  const float y_hi = scaled(hi, scale, inv, by_reciprocal);
  unsigned short pair;   // cvt puts its first operand in the high byte
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(y_hi), "f"(y_lo));
  if (lo != lo) pair = (unsigned short)((pair & 0xFF00u) | 0x7Fu);
  if (hi != hi) pair = (unsigned short)((pair & 0x00FFu) | 0x7F00u);
  return pair;
}

// What a kernel knows of one scale: the scale, its reciprocal, and which path to take.
struct Scale {
  float scale, inv;
  bool by_reciprocal;
  // Set in the body, for the device pass only: nvcc's host pass parses a __device__
  // constructor's initializers, where the device intrinsics are not declared.
  __device__ __forceinline__ explicit Scale(float s) : scale(s), inv(0.0f), by_reciprocal(false) {
#ifdef __CUDA_ARCH__
    inv = __frcp_rn(s);
    by_reciprocal = reciprocal_ok(s);
#endif
  }
};

__device__ __forceinline__ float e4m3_value(unsigned int c) {
  if ((c & 0x7Fu) == 0x7Fu) return __uint_as_float(0x7FC00000u);
  const unsigned int e = (c >> 3) & 0xFu, m = c & 0x7u;
  const float v = e == 0 ? (float)m * 0.001953125f   // subnormal: m * 2**-9
                         : __uint_as_float(((e + 120u) << 23) | (m << 20));
  return (c & 0x80u) ? -v : v;
}

// E fp8 codes per vector: Codes<E> holds them (E bytes), Halves<E> the E 16-bit inputs.
template <int E> struct Codes;
template <> struct Codes<8> { typedef uint2 T; typedef uint4 H; };
template <> struct Codes<4> { typedef unsigned int T; typedef uint2 H; };
template <> struct Codes<2> { typedef unsigned short T; typedef unsigned int H; };
template <> struct Codes<1> { typedef unsigned char T; typedef unsigned short H; };

template <int E>
__device__ __forceinline__ typename Codes<E>::T quantize_vec(typename Codes<E>::H in,
                                                             const Scale& s, int bf16) {
  typename Codes<E>::T out;
  const unsigned short* h = reinterpret_cast<const unsigned short*>(&in);
  if constexpr (E == 1) {
    const float x = half_to_float(h[0], bf16);
    out = (unsigned char)(e4m3x2(x, x, s.scale, s.inv, s.by_reciprocal) & 0xFFu);
  } else {
    unsigned short* pairs = reinterpret_cast<unsigned short*>(&out);
#pragma unroll
    for (int i = 0; i < E; i += 2) {
      pairs[i / 2] = e4m3x2(half_to_float(h[i], bf16), half_to_float(h[i + 1], bf16), s.scale,
                            s.inv, s.by_reciprocal);
    }
  }
  return out;
}

template <int E>
__device__ __forceinline__ typename Codes<E>::H dequantize_vec(typename Codes<E>::T in,
                                                               float scale, int bf16) {
  typename Codes<E>::H out;
  const unsigned char* c = reinterpret_cast<const unsigned char*>(&in);
  unsigned short* h = reinterpret_cast<unsigned short*>(&out);
#pragma unroll
  for (int i = 0; i < E; ++i) h[i] = float_to_half(__fmul_rn(e4m3_value(c[i]), scale), bf16);
  return out;
}

// scatter_fp8: scatter's loop, quantizing on the way. Inputs are float16 / bfloat16
// (bf16 = 1) [T, H, D] with strides in elements; the pools hold codes, page p at
// p * page_stride bytes; scales[0] / scales[1] are this layer's k_scale / v_scale. Each
// thread moves E elements of a row: 2E bytes in, E bytes out.
template <int E>
__device__ void scatter_fp8(const unsigned short* __restrict__ k,
                            const unsigned short* __restrict__ v,
                            long long k_stride_t, long long k_stride_h, long long v_stride_t,
                            long long v_stride_h, const slot_t* __restrict__ slot_mapping,
                            unsigned char* __restrict__ k_pool,
                            unsigned char* __restrict__ v_pool,  // nullptr: key-only
                            const float* __restrict__ scales,    // [2] k_scale, v_scale
                            long long num_tokens, long long num_slots, long long page_stride,
                            int layout, long long page_size, int page_shift,
                            long long num_heads, long long head_dim, int bf16,
                            int* __restrict__ error_word) {
  typedef typename Codes<E>::T C;
  typedef typename Codes<E>::H H;
  const long long row_vecs = head_dim / E;
  const int vecs_per_token = (int)(num_heads * row_vecs);
  const long long stride = (long long)gridDim.x * UNROLL;
  const bool has_v = v_pool != nullptr;
  const Scale k_scale(scales[0]);
  const Scale v_scale(has_v ? scales[1] : 1.0f);
  for (int j = threadIdx.x; j < vecs_per_token; j += blockDim.x) {
    const int head = j / (int)row_vecs;
    const int w = (j - head * (int)row_vecs) * E;   // element offset in the row
    const long long k_src = head * k_stride_h + w;
    const long long v_src = head * v_stride_h + w;
    for (long long t0 = (long long)blockIdx.x * UNROLL; t0 < num_tokens; t0 += stride) {
      slot_t slot[UNROLL];
      H kbuf[UNROLL], vbuf[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const long long t = t0 + u;
        slot[u] = t < num_tokens ? slot_mapping[t] : KVCORE_PADDING_SLOT;
        if (slot[u] != KVCORE_PADDING_SLOT) {
          kbuf[u] = *reinterpret_cast<const H*>(k + t * k_stride_t + k_src);
          if (has_v) vbuf[u] = *reinterpret_cast<const H*>(v + t * v_stride_t + v_src);
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (slot[u] == KVCORE_PADDING_SLOT) continue;
        if (slot[u] < 0 || slot[u] >= num_slots) {
          if (j == 0) atomicOr(error_word, KVCORE_ERR_SLOT_OUT_OF_RANGE);
          continue;
        }
        const long long page = page_of(slot[u], page_size, page_shift);
        const long long off = slot[u] - page * page_size;
        const long long dst = page * page_stride +
                              in_page_row(layout, off, head, page_size, num_heads, head_dim) + w;
        *reinterpret_cast<C*>(k_pool + dst) = quantize_vec<E>(kbuf[u], k_scale, bf16);
        if (has_v) *reinterpret_cast<C*>(v_pool + dst) = quantize_vec<E>(vbuf[u], v_scale, bf16);
      }
    }
  }
}

// scatter_fp8_th: the quantizing write of a pool with per-(token, head) scales (a side
// pool [P, S, H] of float32 per layer and K/V, slot * H + head). One warp per (token,
// head) row, grid-stride over the T * H rows; lane i moves vectors i, i + 32, ... of the
// row. Pass one takes the row's amax (exact: a maximum rounds nothing; NaN is tracked
// apart because fmaxf drops it), so scale = amax / 448 in float32 (IEEE division), 1.0
// unless finite and >= 2**-116 (kvcore.fp8.token_head_scales); pass two quantizes with
// it (re-read from L1) and lane 0 stores the scale. blockDim is a multiple of 32.
template <int E>
__device__ __forceinline__ void quantize_row(const unsigned short* __restrict__ row,
                                             unsigned char* __restrict__ codes,
                                             float* __restrict__ scale_out,
                                             long long row_vecs, int lane, int bf16) {
  typedef typename Codes<E>::T C;
  typedef typename Codes<E>::H H;
  float amax = 0.0f;
  bool nan = false;
  for (long long i = lane; i < row_vecs; i += 32) {
    const H in = *reinterpret_cast<const H*>(row + i * E);
    const unsigned short* h = reinterpret_cast<const unsigned short*>(&in);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float x = half_to_float(h[e], bf16);
      nan |= (x != x);
      amax = fmaxf(amax, fabsf(x));
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
  }
  nan = __any_sync(0xFFFFFFFFu, nan);
  // 1.0 below kvcore.fp8.MIN_SCALE (2**-116): CuPy compiles with -ftz=true, and from
  // there up no subnormal can change a code or a dequantized value (see kvcore/fp8.py);
  // a flushed amax or quotient lands below it too, so flushing or not, the same scale.
  const float quotient = __fdiv_rn(amax, 448.0f);
  const Scale s(nan || !(quotient >= 0x1p-116f && quotient <= 3.40282347e38f) ? 1.0f
                                                                             : quotient);
  for (long long i = lane; i < row_vecs; i += 32) {
    *reinterpret_cast<C*>(codes + i * E) =
        quantize_vec<E>(*reinterpret_cast<const H*>(row + i * E), s, bf16);
  }
  if (lane == 0) *scale_out = s.scale;
}

template <int E>
__device__ void scatter_fp8_th(const unsigned short* __restrict__ k,
                               const unsigned short* __restrict__ v,
                               long long k_stride_t, long long k_stride_h, long long v_stride_t,
                               long long v_stride_h, const slot_t* __restrict__ slot_mapping,
                               unsigned char* __restrict__ k_pool,
                               unsigned char* __restrict__ v_pool,  // nullptr: key-only
                               float* __restrict__ k_scale_pool,    // [P, S, H]
                               float* __restrict__ v_scale_pool,    // [P, S, H] or nullptr
                               long long num_tokens, long long num_slots, long long page_stride,
                               int layout, long long page_size, int page_shift,
                               long long num_heads, long long head_dim, int bf16,
                               int* __restrict__ error_word) {
  const int lane = threadIdx.x & 31;
  const long long warps_per_block = blockDim.x >> 5;
  const long long num_rows = num_tokens * num_heads;
  const long long row_vecs = head_dim / E;
  for (long long r = blockIdx.x * warps_per_block + (threadIdx.x >> 5); r < num_rows;
       r += gridDim.x * warps_per_block) {
    const long long t = r / num_heads;
    const long long head = r - t * num_heads;
    const slot_t slot = slot_mapping[t];
    if (slot == KVCORE_PADDING_SLOT) continue;
    if (slot < 0 || slot >= num_slots) {
      if (lane == 0 && head == 0) atomicOr(error_word, KVCORE_ERR_SLOT_OUT_OF_RANGE);
      continue;
    }
    const long long page = page_of(slot, page_size, page_shift);
    const long long off = slot - page * page_size;
    const long long dst = page * page_stride +
                          in_page_row(layout, off, head, page_size, num_heads, head_dim);
    quantize_row<E>(k + t * k_stride_t + head * k_stride_h, k_pool + dst,
                    k_scale_pool + slot * num_heads + head, row_vecs, lane, bf16);
    if (v_pool != nullptr) {
      quantize_row<E>(v + t * v_stride_t + head * v_stride_h, v_pool + dst,
                      v_scale_pool + slot * num_heads + head, row_vecs, lane, bf16);
    }
  }
}

// gather_fp8: gather's walk over page entries, dequantizing each code to float16 /
// bfloat16 (bf16 = 1) into contiguous [out_rows, H, D] outputs. Offsets in elements.
// With per-(token, head) scales, k_scale_pool / v_scale_pool are the layer's side pools
// ([P, S, H], scale of (page, off, head) at (page * S + off) * H + head); nullptr: the
// layer's scales[0] / scales[1].
template <int E>
__device__ void gather_fp8(const unsigned char* __restrict__ k_pool,
                           const unsigned char* __restrict__ v_pool,   // nullptr: key-only
                           const int* __restrict__ page_indptr,    // [B + 1], first element 0
                           const int* __restrict__ page_indices,   // [page_indptr[B]]
                           const int* __restrict__ last_page_len,  // [B], in [0, S]
                           const long long* __restrict__ token_indptr,  // [B + 1]
                           unsigned short* __restrict__ k_out,     // [out_rows, H, D]
                           unsigned short* __restrict__ v_out,     // [out_rows, H, D]
                           const float* __restrict__ scales,       // [2] k_scale, v_scale
                           const float* __restrict__ k_scale_pool,  // [P, S, H] or nullptr
                           const float* __restrict__ v_scale_pool,  // [P, S, H] or nullptr
                           int batch, long long out_rows, long long num_pages,
                           long long page_stride, int layout, long long page_size,
                           long long num_heads, long long head_dim, int bf16,
                           int* __restrict__ error_word) {
  typedef typename Codes<E>::T C;
  typedef typename Codes<E>::H H;
  const int nnz = page_indptr[batch];
  const long long row_vecs = head_dim / E;
  const int vecs_per_token = (int)(num_heads * row_vecs);
  const bool has_v = v_pool != nullptr;
  const float k_scale = scales[0];
  const float v_scale = has_v ? scales[1] : 1.0f;
  for (long long e = blockIdx.x; e < nnz; e += gridDim.x) {
    int lo = 0, hi = batch - 1;  // last b with page_indptr[b] <= e
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (page_indptr[mid] <= e) lo = mid; else hi = mid - 1;
    }
    const int b = lo;
    const long long page = page_indices[e];
    if (page < 0 || page >= num_pages) {
      if (threadIdx.x == 0) atomicOr(error_word, KVCORE_ERR_PAGE_OUT_OF_RANGE);
      continue;
    }
    const long long pos = e - page_indptr[b];
    const bool is_last = (e == page_indptr[b + 1] - 1);
    const long long count = is_last ? last_page_len[b] : page_size;
    const long long first_row = token_indptr[b] + pos * page_size;
    if (first_row + count > out_rows) {
      if (threadIdx.x == 0) atomicOr(error_word, KVCORE_ERR_OUTPUT_TOO_SMALL);
      continue;
    }
    const long long out_base = first_row * num_heads * head_dim;
    const long long page_base = page * page_stride;
    const long long n = count * vecs_per_token;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
      const long long off = i / vecs_per_token;       // token in the page
      const long long j = i - off * vecs_per_token;   // (head, vector) in the row
      const long long head = j / row_vecs;
      const long long w = (j - head * row_vecs) * E;
      const long long src =
          page_base + in_page_row(layout, off, head, page_size, num_heads, head_dim) + w;
      const long long dst = out_base + i * E;
      const long long scale_idx = (page * page_size + off) * num_heads + head;
      *reinterpret_cast<H*>(k_out + dst) = dequantize_vec<E>(
          *reinterpret_cast<const C*>(k_pool + src),
          k_scale_pool != nullptr ? k_scale_pool[scale_idx] : k_scale, bf16);
      if (has_v) {
        *reinterpret_cast<H*>(v_out + dst) = dequantize_vec<E>(
            *reinterpret_cast<const C*>(v_pool + src),
            v_scale_pool != nullptr ? v_scale_pool[scale_idx] : v_scale, bf16);
      }
    }
  }
}

}  // namespace kvcore

// extern "C" entry points, one per vector width: kvcore_<op>_w<bytes>. Keep each list in
// step with kvcore/backends/kernel_abi.py (checked by tests/test_kernel_abi.py).
#define KVCORE_INSTANTIATE(V, BYTES)                                                         \
  extern "C" __global__ void kvcore_scatter_w##BYTES(                                       \
      const V* k, const V* v, long long k_stride_t, long long k_stride_h,                   \
      long long v_stride_t, long long v_stride_h, const slot_t* slot_mapping, V* k_pool,     \
      V* v_pool, long long num_tokens, long long num_slots, long long page_stride,           \
      int layout, long long page_size, int page_shift, long long num_heads,                  \
      long long row_vecs, int* error_word) {                                                 \
    kvcore::scatter<V>(k, v, k_stride_t, k_stride_h, v_stride_t, v_stride_h, slot_mapping,   \
                       k_pool, v_pool, num_tokens, num_slots, page_stride, layout, page_size, \
                       page_shift, num_heads, row_vecs, error_word);                         \
  }                                                                                          \
  extern "C" __global__ void kvcore_gather_w##BYTES(                                        \
      const V* k_pool, const V* v_pool, const int* page_indptr, const int* page_indices,     \
      const int* last_page_len, const long long* token_indptr, V* k_out, V* v_out,           \
      int batch, long long out_rows, long long num_pages, long long page_stride, int layout,  \
      long long page_size, long long num_heads, long long row_vecs, int* error_word) {       \
    kvcore::gather<V>(k_pool, v_pool, page_indptr, page_indices, last_page_len,              \
                      token_indptr, k_out, v_out, batch, out_rows, num_pages, page_stride,   \
                      layout, page_size, num_heads, row_vecs, error_word);                   \
  }                                                                                          \
  extern "C" __global__ void kvcore_copy_pages_w##BYTES(                                    \
      const unsigned long long* pools, const page_id_t* src, const page_id_t* dst,           \
      long long num_pairs, long long num_pools, long long num_pages, long long page_stride,  \
      long long page_vecs, int* error_word) {                                                \
    kvcore::copy_pages<V>(pools, src, dst, num_pairs, num_pools, num_pages, page_stride,     \
                          page_vecs, error_word);                                            \
  }                                                                                          \
  extern "C" __global__ void kvcore_swap_pages_w##BYTES(                                    \
      const page_id_t* device_pages, const page_id_t* host_pages, long long num_pairs,       \
      int to_host, const unsigned long long* pools, V* host_pool, long long num_pools,       \
      long long num_pages, long long num_host_pages, long long page_stride,                  \
      long long page_vecs, int* error_word) {                                                \
    kvcore::swap_pages<V>(device_pages, host_pages, num_pairs, to_host, pools, host_pool,    \
                          num_pools, num_pages, num_host_pages, page_stride, page_vecs,      \
                          error_word);                                                       \
  }

KVCORE_INSTANTIATE(uint4, 16)
KVCORE_INSTANTIATE(uint2, 8)
KVCORE_INSTANTIATE(unsigned int, 4)
KVCORE_INSTANTIATE(unsigned short, 2)
KVCORE_INSTANTIATE(unsigned char, 1)

// fp8 entry points, one per codes-per-vector count: kvcore_<op>_w<E> moves E codes (E
// bytes of the pool, 2E bytes of float16 / bfloat16) per vector.
#define KVCORE_INSTANTIATE_FP8(BYTES)                                                        \
  extern "C" __global__ void kvcore_scatter_fp8_w##BYTES(                                   \
      const unsigned short* k, const unsigned short* v, long long k_stride_t,                \
      long long k_stride_h, long long v_stride_t, long long v_stride_h,                      \
      const slot_t* slot_mapping, unsigned char* k_pool, unsigned char* v_pool,              \
      const float* scales, long long num_tokens, long long num_slots, long long page_stride, \
      int layout, long long page_size, int page_shift, long long num_heads,                  \
      long long head_dim, int bf16, int* error_word) {                                       \
    kvcore::scatter_fp8<BYTES>(k, v, k_stride_t, k_stride_h, v_stride_t, v_stride_h,         \
                               slot_mapping, k_pool, v_pool, scales, num_tokens, num_slots,  \
                               page_stride, layout, page_size, page_shift, num_heads,        \
                               head_dim, bf16, error_word);                                  \
  }                                                                                          \
  extern "C" __global__ void kvcore_gather_fp8_w##BYTES(                                    \
      const unsigned char* k_pool, const unsigned char* v_pool, const int* page_indptr,      \
      const int* page_indices, const int* last_page_len, const long long* token_indptr,      \
      unsigned short* k_out, unsigned short* v_out, const float* scales,                    \
      const float* k_scale_pool, const float* v_scale_pool, int batch, long long out_rows,   \
      long long num_pages, long long page_stride, int layout, long long page_size,           \
      long long num_heads, long long head_dim, int bf16, int* error_word) {                  \
    kvcore::gather_fp8<BYTES>(k_pool, v_pool, page_indptr, page_indices, last_page_len,      \
                              token_indptr, k_out, v_out, scales, k_scale_pool, v_scale_pool, \
                              batch, out_rows, num_pages, page_stride, layout, page_size,    \
                              num_heads, head_dim, bf16, error_word);                        \
  }                                                                                          \
  extern "C" __global__ void kvcore_scatter_fp8_th_w##BYTES(                                \
      const unsigned short* k, const unsigned short* v, long long k_stride_t,                \
      long long k_stride_h, long long v_stride_t, long long v_stride_h,                      \
      const slot_t* slot_mapping, unsigned char* k_pool, unsigned char* v_pool,              \
      float* k_scale_pool, float* v_scale_pool, long long num_tokens, long long num_slots,   \
      long long page_stride, int layout, long long page_size, int page_shift,                \
      long long num_heads, long long head_dim, int bf16, int* error_word) {                  \
    kvcore::scatter_fp8_th<BYTES>(k, v, k_stride_t, k_stride_h, v_stride_t, v_stride_h,      \
                                  slot_mapping, k_pool, v_pool, k_scale_pool, v_scale_pool,  \
                                  num_tokens, num_slots, page_stride, layout, page_size,     \
                                  page_shift, num_heads, head_dim, bf16, error_word);        \
  }

KVCORE_INSTANTIATE_FP8(8)
KVCORE_INSTANTIATE_FP8(4)
KVCORE_INSTANTIATE_FP8(2)
KVCORE_INSTANTIATE_FP8(1)
