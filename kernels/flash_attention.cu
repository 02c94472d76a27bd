// Fused attention forward for bf16/f16 on tensor cores (FlashAttention-2's algorithm): the scores
// never leave the chip. One block of 4 warps takes 64 query rows of one (batch, head); each warp
// owns 16 rows. For every tile of 64 keys: K and V tiles are staged in shared memory, each warp
// computes its 16 x 64 scores with `mma.sync.m16n8k16` (f32 accumulation), masks them, updates
// its rows' running max and sum (online softmax, in the log2 domain), rescales its output
// accumulators and adds P·V with P rounded to the input type (as FlashAttention does). The
// output is written once, as [batch, q_len, heads, d] (what the output projection reads).
//
// Semantics (equal to `vvlm_engine::attention`'s CPU kernel up to rounding): query row i of a
// (batch, head) sees keys j < kv_len, and with `causal` only j <= past + i; head h reads kv head
// h / (heads / kv_heads) (grouped-query attention);
//   out_i = sum_j softmax_j(scale * q_i . k_j) v_j.
// q, k, v: element strides (batch, head, row) given, last dimension contiguous; every row start
// 16-byte aligned (the caller checks: strides and offsets multiples of 8, d a multiple of 8).
// DP: the head size padded to a multiple of 16 (the mma's k); columns d..DP are zeros.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16" for .bf16/.f16, lane = 4 * group + t):
//   A (16x16, row): a0 = (group, 2t..2t+1), a1 = (group+8, 2t..), a2 = (group, 2t+8..),
//                   a3 = (group+8, 2t+8..)
//   B (16x8, col):  b0 = (k 2t..2t+1, n group), b1 = (k 2t+8..2t+9, n group)
//   C (16x8, f32):  c0, c1 = (group, 2t..2t+1), c2, c3 = (group+8, 2t..2t+1)
// so the scores' C fragments of two adjacent 8-key tiles are, packed in pairs, the A fragment
// of P for the next product: no shuffle between the two.
//
// CPU reference: `vvlm_engine::attention::attention` (fused f32 kernel) and
// `reference_attention`; crates/engine/tests/cuda_parity.rs compares them on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <math.h>

constexpr int BLOCK_M = 64;  // query rows per block
constexpr int BLOCK_N = 64;  // keys per tile
constexpr int THREADS = 128; // 4 warps of 16 rows

template <typename T> struct Mma;

template <> struct Mma<__nv_bfloat16> {
    __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    // lo in the low 16 bits (the smaller column index), hi in the high.
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    __device__ __forceinline__ static void store2(__nv_bfloat16* p, float lo, float hi) {
        *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);
    }
};

template <> struct Mma<__half> {
    __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
    __device__ __forceinline__ static void store2(__half* p, float lo, float hi) {
        *reinterpret_cast<__half2*>(p) = __floats2half2_rn(lo, hi);
    }
};

// Rows r0..r0+64 of a [len, d] matrix (row stride `stride`) into a [64][DP + 8] shared tile,
// 16 bytes per load; rows past `len` and columns past `d` are zeros.
template <typename T, int DP>
__device__ __forceinline__ void load_tile(T (*tile)[DP + 8], const T* src, long long stride, int r0, int len, int d) {
    constexpr int VECS = DP / 8;
    for (int i = threadIdx.x; i < BLOCK_N * VECS; i += THREADS) {
        const int r = i / VECS, c = (i % VECS) * 8;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (r0 + r < len && c < d) x = *reinterpret_cast<const uint4*>(src + (long long)(r0 + r) * stride + c);
        *reinterpret_cast<uint4*>(&tile[r][c]) = x;
    }
}

__device__ __forceinline__ uint32_t load_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Four 8x8 16-bit matrices from shared memory, transposed (`ldmatrix ... .x4.trans`): lanes
// 8i..8i+7 give the addresses of matrix i's 8 rows (16 bytes each, 16-byte aligned), and lane
// = 4 * group + t receives in r[i] matrix i's elements (row 2t, column group) and (row 2t + 1,
// column group), packed: with the rows keys and the columns head columns, exactly an
// m16n8k16 B fragment of V (b0 = keys 2t..2t+1, b1 = keys 2t+8..2t+9, column group). One
// instruction for two 8-column blocks, where reading the fragments by 16-bit loads took four a
// block (the V side of the H200's first profile: attention ~87 TFLOP/s).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

template <typename T, int DP>
__device__ void flash_attention(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    int q_len, int kv_len, int d, int heads, int kv_heads,
    long long qsb, long long qsh, long long qsr,
    long long ksb, long long ksh, long long ksr,
    long long vsb, long long vsh, long long vsr,
    int causal, int past, float scale_log2) {
    __shared__ __align__(16) T sk[BLOCK_N][DP + 8];
    __shared__ __align__(16) T sv[BLOCK_N][DP + 8];
    // Causal: the last query rows (the most key tiles) in the first blocks launched, so that
    // the long blocks do not finish the grid alone.
    const int qblock = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int m0 = qblock * BLOCK_M, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (heads / kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int group = lane >> 2, t = lane & 3;
    const T* qb = q + b * qsb + h * qsh;
    const T* kb = k + b * ksb + hk * ksh;
    const T* vb = v + b * vsb + hk * vsh;

    // The warp's 16 query rows as A fragments, staged through the K tile.
    load_tile<T, DP>(sk, qb, qsr, m0, q_len, d);
    __syncthreads();
    uint32_t qa[DP / 16][4];
    const int r = warp * 16 + group;
#pragma unroll
    for (int s = 0; s < DP / 16; ++s) {
        qa[s][0] = load_u32(&sk[r][s * 16 + 2 * t]);
        qa[s][1] = load_u32(&sk[r + 8][s * 16 + 2 * t]);
        qa[s][2] = load_u32(&sk[r][s * 16 + 8 + 2 * t]);
        qa[s][3] = load_u32(&sk[r + 8][s * 16 + 8 + 2 * t]);
    }
    __syncthreads();

    float acc[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    // This thread's two rows (group, group + 8): running max (log2 domain) and partial sum.
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    const int qi[2] = {m0 + r, m0 + r + 8};
    // Keys past the block's last visible one are never loaded.
    const int kv_end = causal ? min(kv_len, past + min(m0 + BLOCK_M, q_len)) : kv_len;

    for (int n0 = 0; n0 < kv_end; n0 += BLOCK_N) {
        load_tile<T, DP>(sk, kb, ksr, n0, kv_len, d);
        load_tile<T, DP>(sv, vb, vsr, n0, kv_len, d);
        __syncthreads();

        float s[BLOCK_N / 8][4];
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < DP / 16; ++ks) {
#pragma unroll
            for (int j = 0; j < BLOCK_N / 8; ++j) {
                const uint32_t b0 = load_u32(&sk[8 * j + group][ks * 16 + 2 * t]);
                const uint32_t b1 = load_u32(&sk[8 * j + group][ks * 16 + 8 + 2 * t]);
                Mma<T>::run(s[j], qa[ks], b0, b1);
            }
        }

        // Scale into the log2 domain, mask, and the rows' new maxima.
        float new_max[2] = {row_max[0], row_max[1]};
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = e >> 1;
                const int kj = n0 + 8 * j + 2 * t + (e & 1);
                const bool visible = kj < kv_len && (!causal || kj <= past + qi[row]);
                const float x = visible ? s[j][e] * scale_log2 : -INFINITY;
                s[j][e] = x;
                new_max[row] = fmaxf(new_max[row], x);
            }
        }
#pragma unroll
        for (int row = 0; row < 2; ++row) {
            // The 4 threads of a group hold the same two rows.
            new_max[row] = fmaxf(new_max[row], __shfl_xor_sync(0xffffffffu, new_max[row], 1));
            new_max[row] = fmaxf(new_max[row], __shfl_xor_sync(0xffffffffu, new_max[row], 2));
            // exp2(-inf - m) = 0 for a first visible tile; a row with nothing visible yet keeps 1.
            const float alpha = new_max[row] == -INFINITY ? 1.0f : exp2f(row_max[row] - new_max[row]);
            row_max[row] = new_max[row];
            row_sum[row] *= alpha;
#pragma unroll
            for (int n = 0; n < DP / 8; ++n) {
                acc[n][2 * row] *= alpha;
                acc[n][2 * row + 1] *= alpha;
            }
        }
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = e >> 1;
                const float p = row_max[row] == -INFINITY ? 0.0f : exp2f(s[j][e] - row_max[row]);
                s[j][e] = p;
                row_sum[row] += p;
            }
        }

        // acc += P · V, 16 keys per step: P's A fragment from the score tiles 2kk and 2kk + 1,
        // V's B fragments by ldmatrix: this lane addresses row `mr` of matrix `mi` (matrices 0,
        // 1: keys 0-7, 8-15 of the step, columns of block n; 2, 3: the same keys, block n + 1).
        const int mi = lane >> 3, mr = lane & 7;
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            const uint32_t pa[4] = {
                Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
            const int key = 16 * kk + 8 * (mi & 1) + mr;
#pragma unroll
            for (int n = 0; n < DP / 8; n += 2) {  // DP / 8 is even: DP is a multiple of 16
                uint32_t b[4];
                ldmatrix_x4_trans(b, &sv[key][8 * (n + (mi >> 1))]);
                Mma<T>::run(acc[n], pa, b[0], b[1]);
                Mma<T>::run(acc[n + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int row = 0; row < 2; ++row) {
        float l = row_sum[row];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        if (qi[row] >= q_len) continue;
        T* o = out + (((long long)b * q_len + qi[row]) * heads + h) * d;
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) {
            const int col = 8 * n + 2 * t;
            if (col < d) Mma<T>::store2(o + col, acc[n][2 * row] * inv, acc[n][2 * row + 1] * inv);
        }
    }
}

#define FLASH_ATTENTION(NAME, T, DP)                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                       \
        const T* q, const T* k, const T* v, T* out, int q_len, int kv_len, int d, int heads,          \
        int kv_heads, long long qsb, long long qsh, long long qsr, long long ksb, long long ksh,       \
        long long ksr, long long vsb, long long vsh, long long vsr, int causal, int past,             \
        float scale_log2) {                                                                           \
        flash_attention<T, DP>(q, k, v, out, q_len, kv_len, d, heads, kv_heads, qsb, qsh, qsr, ksb,   \
                               ksh, ksr, vsb, vsh, vsr, causal, past, scale_log2);                    \
    }

FLASH_ATTENTION(flash_attention_bf16_d32, __nv_bfloat16, 32)
FLASH_ATTENTION(flash_attention_bf16_d64, __nv_bfloat16, 64)
FLASH_ATTENTION(flash_attention_bf16_d80, __nv_bfloat16, 80)
FLASH_ATTENTION(flash_attention_bf16_d128, __nv_bfloat16, 128)
FLASH_ATTENTION(flash_attention_f16_d32, __half, 32)
FLASH_ATTENTION(flash_attention_f16_d64, __half, 64)
FLASH_ATTENTION(flash_attention_f16_d80, __half, 80)
FLASH_ATTENTION(flash_attention_f16_d128, __half, 128)
