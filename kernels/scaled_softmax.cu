// Softmax over the last dimension of attention scores, with the 1/sqrt(d) scale and the causal
// mask applied inside (no scaled copy of the scores, no mask tensor, no masked copy: one read
// and one write of the scores instead of four passes of candle's ops).
//
// x, y: [rows, kv] contiguous. Row r is query position i = r % q_len of its head (the scores
// are laid out [batch, kv_heads, rep * q_len, kv], rep-major). With `causal`, key j is visible
// to row r when j <= past + i; hidden keys get probability 0. Per row, in f32:
//   m = max_j visible (scale * x_j);  s = sum_j visible exp(scale * x_j - m);
//   y_j = exp(scale * x_j - m) * (1 / s)   (0 where hidden)
// One block per row; threads stride over the row; warp-shuffle then shared-memory reductions.
//
// The CPU reference is `vvlm_engine::attention::ScaledSoftmax::cpu_fwd` (same formula, in row
// order); crates/engine/tests/cuda_parity.rs compares the two on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "dtype.cuh"
#include <math.h>

// The block's maximum (is_max) or sum of v, returned to every thread. blockDim.x is a multiple
// of 32 and at most 1024.
__device__ float block_reduce(float v, bool is_max) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();  // every thread has read the previous call's result
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? partial[lane] : (is_max ? -INFINITY : 0.0f);
        for (int o = 16; o > 0; o >>= 1) {
            float w = __shfl_xor_sync(0xffffffffu, v, o);
            v = is_max ? fmaxf(v, w) : v + w;
        }
        if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    return partial[0];
}

template <typename T>
__device__ void scaled_softmax(const T* x, T* y, int kv, int q_len, int past, int causal, float scale) {
    const long long row = blockIdx.x;
    const T* xr = x + row * kv;
    T* yr = y + row * kv;
    int visible = kv;
    if (causal) {
        const int i = (int)(row % q_len);
        visible = min(kv, past + i + 1);
    }
    float m = -INFINITY;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) m = fmaxf(m, scale * load(xr + j));
    m = block_reduce(m, true);
    float s = 0.0f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) s += expf(scale * load(xr + j) - m);
    s = block_reduce(s, false);
    const float inv = 1.0f / s;
    for (int j = threadIdx.x; j < kv; j += blockDim.x)
        store(yr + j, j < visible ? expf(scale * load(xr + j) - m) * inv : 0.0f);
}

extern "C" __global__ void scaled_softmax_f32(const float* x, float* y, int kv, int q_len, int past, int causal, float scale) {
    scaled_softmax(x, y, kv, q_len, past, causal, scale);
}
extern "C" __global__ void scaled_softmax_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int kv, int q_len, int past, int causal, float scale) {
    scaled_softmax(x, y, kv, q_len, past, causal, scale);
}
extern "C" __global__ void scaled_softmax_f16(const __half* x, __half* y, int kv, int q_len, int past, int causal, float scale) {
    scaled_softmax(x, y, kv, q_len, past, causal, scale);
}
