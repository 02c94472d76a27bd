// Appends one position to every sequence's KV cache of a batched decode step in one launch
// (instead of a copy per sequence for keys and for values: at 64 sequences and 16 layers, 2,048
// launches a step). Thread per element of the new rows.
//
// k, v: the step's new rows, [kv_heads, b, d] contiguous (the batch laid out as the time axis).
// meta[7 i .. 7 i + 7] = {k pointer, v pointer, k head stride, k row stride, v head stride, v row
// stride, position}: sequence i's cache buffers (element type T), element (head h, position p,
// column c) at pointer + h * head stride + p * row stride + c; the position written (the cache's
// length before the step). One array for the whole batch: one host-to-device copy.
//
// CPU reference: `KvCache::append` (candle's slice_set); crates/engine/tests/cuda_parity.rs
// checks batched decoding, which appends through this kernel on a GPU, against the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T>
__device__ void kv_append(const T* __restrict__ k, const T* __restrict__ v,
                          const long long* __restrict__ meta, int b, int kv_heads, int d) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)kv_heads * b * d;
    if (idx >= total) return;
    const int c = (int)(idx % d);
    const long long row = idx / d;
    const int i = (int)(row % b), h = (int)(row / b);
    const long long* m_i = meta + 7 * i;
    T* kd = reinterpret_cast<T*>(m_i[0]) + h * m_i[2] + m_i[6] * m_i[3] + c;
    T* vd = reinterpret_cast<T*>(m_i[1]) + h * m_i[4] + m_i[6] * m_i[5] + c;
    *kd = k[idx];
    *vd = v[idx];
}

#define KV_APPEND(NAME, T)                                                                              \
    extern "C" __global__ void NAME(const T* k, const T* v, const long long* meta, int b, int kv_heads, \
                                    int d) {                                                            \
        kv_append<T>(k, v, meta, b, kv_heads, d);                                                       \
    }

KV_APPEND(kv_append_f32, float)
KV_APPEND(kv_append_bf16, __nv_bfloat16)
KV_APPEND(kv_append_f16, __half)
