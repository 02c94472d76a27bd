// Decode attention for a batch of sequences in one launch: the new position of every sequence
// attends to its own KV cache, wherever that cache lives (a pointer per sequence), so a batched
// decode step costs one launch per layer instead of three per sequence (two matmuls and a
// softmax each).
//
// One block of 8 warps per (head, sequence). The sequence's `len` keys are split into 8
// contiguous ranges, one per warp; a warp walks its keys GROUP at a time with the head
// dimension spread over its lanes (two adjacent elements per lane per 64 columns: 128-byte rows
// read whole): it loads the group's key and value rows first (GROUP loads in flight instead of
// one: on an H200 a warp waiting on one key's load and then its value's took ~1 us a key, and
// decode after a 4096-token prompt ran at 81 tok/s against 374 after a short one), reduces the
// group's dot products by shuffles side by side, then updates a running max, sum and weighted
// value sum key by key in order (online softmax, log2 domain: the same arithmetic in the same
// order as one key at a time, so the results are the same bit for bit). The 8 partial results are merged through shared memory:
//   M = max_w m_w;  out = sum_w 2^(m_w - M) o_w / sum_w 2^(m_w - M) l_w.
//
// q, out: [B, heads, d] contiguous. meta[7 i .. 7 i + 7] = {k pointer, v pointer, k head stride,
// k row stride, v head stride, v row stride, len}: sequence i's keys and values (element type T),
// head hk's row j at pointer + hk * head stride + j * row stride (elements), `len` rows (one
// array for the whole batch: one host-to-device copy). Head h reads kv head h / (heads /
// kv_heads). d even, <= 256.
//
// CPU reference: `vvlm_engine::attention::decode_attention_batch`'s CPU kernel (and
// `reference_attention`); crates/engine/tests/cuda_parity.rs compares them on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <math.h>

constexpr int WARPS = 8;
constexpr int MAX_D = 256;
constexpr int PAIRS = MAX_D / 64;  // column pairs per lane
constexpr int GROUP = 4;           // keys a warp loads before it reduces them

__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ float2 load2(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half(v); }

template <typename T>
__device__ void decode_attention(
    const T* __restrict__ q, T* __restrict__ out, const long long* __restrict__ meta,
    int heads, int kv_heads, int d, float scale_log2) {
    __shared__ float part_m[WARPS], part_l[WARPS];
    __shared__ float part_o[WARPS][MAX_D];
    const int h = blockIdx.x, i = blockIdx.y;
    const int hk = h / (heads / kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long* m_i = meta + 7 * i;
    const int len = (int)m_i[6];
    const T* k = reinterpret_cast<const T*>(m_i[0]) + hk * m_i[2];
    const T* v = reinterpret_cast<const T*>(m_i[1]) + hk * m_i[4];
    const long long k_row = m_i[3], v_row = m_i[5];
    const T* qh = q + ((long long)i * heads + h) * d;

    float2 qv[PAIRS], o[PAIRS];
#pragma unroll
    for (int p = 0; p < PAIRS; ++p) {
        const int c = 64 * p + 2 * lane;
        qv[p] = c < d ? load2(qh + c) : make_float2(0.0f, 0.0f);
        o[p] = make_float2(0.0f, 0.0f);
    }
    float m = -INFINITY, l = 0.0f;
    const int per = (len + WARPS - 1) / WARPS;
    const int j0 = min(len, warp * per), j1 = min(len, j0 + per);
    for (int j = j0; j < j1; j += GROUP) {
        const int n = min(GROUP, j1 - j);
        // The group's key and value rows, all loads issued before any is used.
        float2 kv[GROUP][PAIRS], vv[GROUP][PAIRS];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
#pragma unroll
            for (int p = 0; p < PAIRS; ++p) {
                const int c = 64 * p + 2 * lane;
                const bool in = g < n && c < d;
                kv[g][p] = in ? load2(k + (long long)(j + g) * k_row + c) : make_float2(0.0f, 0.0f);
                vv[g][p] = in ? load2(v + (long long)(j + g) * v_row + c) : make_float2(0.0f, 0.0f);
            }
        }
        float s[GROUP];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            s[g] = 0.0f;
#pragma unroll
            for (int p = 0; p < PAIRS; ++p) {
                const int c = 64 * p + 2 * lane;
                if (c < d) {
                    s[g] = fmaf(qv[p].x, kv[g][p].x, s[g]);
                    s[g] = fmaf(qv[p].y, kv[g][p].y, s[g]);
                }
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
            for (int g = 0; g < GROUP; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], off);
        }
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            if (g < n) {
                const float sg = s[g] * scale_log2;
                const float m_new = fmaxf(m, sg);
                const float corr = exp2f(m - m_new);  // 0 for the first key (m = -inf)
                const float w = exp2f(sg - m_new);
                l = l * corr + w;
#pragma unroll
                for (int p = 0; p < PAIRS; ++p) {
                    const int c = 64 * p + 2 * lane;
                    if (c < d) {
                        o[p].x = fmaf(w, vv[g][p].x, o[p].x * corr);
                        o[p].y = fmaf(w, vv[g][p].y, o[p].y * corr);
                    }
                }
                m = m_new;
            }
        }
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
#pragma unroll
    for (int p = 0; p < PAIRS; ++p) {
        const int c = 64 * p + 2 * lane;
        if (c < d) {
            part_o[warp][c] = o[p].x;
            part_o[warp][c + 1] = o[p].y;
        }
    }
    __syncthreads();
    float big = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) big = fmaxf(big, part_m[w]);
    float total = 0.0f, scale[WARPS];
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        // A warp with no keys (len < 8) has m = -inf: weight 0.
        scale[w] = part_m[w] == -INFINITY ? 0.0f : exp2f(part_m[w] - big);
        total = fmaf(scale[w], part_l[w], total);
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    T* oh = out + ((long long)i * heads + h) * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float x = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) x = fmaf(scale[w], part_o[w][c], x);
        store1(oh + c, x * inv);
    }
}

#define DECODE_ATTENTION(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME(                                  \
        const T* q, T* out, const long long* meta, int heads, int kv_heads, int d,                  \
        float scale_log2) {                                                                         \
        decode_attention<T>(q, out, meta, heads, kv_heads, d, scale_log2);                          \
    }

DECODE_ATTENTION(decode_attention_f32, float)
DECODE_ATTENTION(decode_attention_bf16, __nv_bfloat16)
DECODE_ATTENTION(decode_attention_f16, __half)
