// Appends one position to every sequence's KV cache of a batched decode step in one launch
// (instead of a copy per sequence for keys and for values: at 64 sequences and 16 layers, 2,048
// launches a step). Thread per element of the new rows.
//
// k, v: the step's new rows, [kv_heads, b, d] contiguous (the batch laid out as the time axis).
// k_dst[i], v_dst[i]: sequence i's cache buffers (element type T); element (head h, position p,
// column c) at dst + h * head_stride + p * row_stride + c, strides[i] = {k head, k row, v head,
// v row}; pos[i]: the position written (the cache's length before the step).
//
// CPU reference: `KvCache::append` (candle's slice_set); crates/engine/tests/cuda_parity.rs
// checks batched decoding, which appends through this kernel on a GPU, against the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T>
__device__ void kv_append(const T* __restrict__ k, const T* __restrict__ v,
                          const unsigned long long* __restrict__ k_dst, const unsigned long long* __restrict__ v_dst,
                          const long long* __restrict__ strides, const int* __restrict__ pos,
                          int b, int kv_heads, int d) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)kv_heads * b * d;
    if (idx >= total) return;
    const int c = (int)(idx % d);
    const long long row = idx / d;
    const int i = (int)(row % b), h = (int)(row / b);
    T* kd = reinterpret_cast<T*>(k_dst[i]) + h * strides[4 * i] + (long long)pos[i] * strides[4 * i + 1] + c;
    T* vd = reinterpret_cast<T*>(v_dst[i]) + h * strides[4 * i + 2] + (long long)pos[i] * strides[4 * i + 3] + c;
    *kd = k[idx];
    *vd = v[idx];
}

#define KV_APPEND(NAME, T)                                                                              \
    extern "C" __global__ void NAME(const T* k, const T* v, const unsigned long long* k_dst,            \
                                    const unsigned long long* v_dst, const long long* strides,          \
                                    const int* pos, int b, int kv_heads, int d) {                       \
        kv_append<T>(k, v, k_dst, v_dst, strides, pos, b, kv_heads, d);                                 \
    }

KV_APPEND(kv_append_f32, float)
KV_APPEND(kv_append_bf16, __nv_bfloat16)
KV_APPEND(kv_append_f16, __half)
