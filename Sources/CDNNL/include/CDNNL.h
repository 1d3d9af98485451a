// Thin shim over oneDNN (Debian's libdnnl 2.6, GNU OpenMP inside) for the engine's bf16 kernels.
//
// The library is dlopen'ed on first use, like OpenBLAS. libgomp reads OMP_WAIT_POLICY once, when it loads, and
// its default (spin a while after every parallel region) would take the core that the engine's own threads
// or OpenBLAS's need next; so the shim sets OMP_WAIT_POLICY=PASSIVE (unless the user set it) before libgomp
// loads — at program start when libvips has brought libgomp in already (shim.c says how). Every call is
// serialised by one mutex and made from the engine's calling thread (never from inside a parallel loop), so one
// OpenMP team serves all calls.
#ifndef LORA_CDNNL_H
#define LORA_CDNNL_H

#include <stddef.h>

/// Loads libdnnl and creates its CPU engine and stream. 0 on success; otherwise `error` says why.
int lora_dnnl_load(char *error, int errorLength);

/// The ISA oneDNN dispatches to (its dnnl_cpu_isa_t value) and whether it includes AVX512-BF16 (1/0).
int lora_dnnl_isa(void);
int lora_dnnl_has_bf16(void);
/// libdnnl's version, "2.6.3".
const char *lora_dnnl_version(void);

/// OpenMP threads for oneDNN's calls (applied on the calling thread before each call).
void lora_dnnl_set_threads(int threads);

/// fp32 → bf16, round to nearest even (vcvtneps2bf16; only called where the CPU has AVX512-BF16).
void lora_dnnl_to_bf16(const float *src, unsigned short *dst, size_t count);

/// Row-major C[M,N] (fp32) = alpha · op(A)[M,K] · op(B)[K,N] + beta · C, computed in bf16 with fp32
/// accumulation. A and B are fp32 (converted to bf16 in the shim's scratch first) when aIsBF16/bIsBF16 is 0,
/// bf16 (used in place) when 1. lda/ldb are the row strides of A and B as stored. `bias` (N floats, or NULL; only
/// with alpha 1, beta 0) is added to every row by the GEMM itself (a fused post-op: no separate pass over C).
/// Returns 0, or a dnnl_status_t; `info` (if non-NULL, 256 bytes) receives the implementation's name.
int lora_dnnl_gemm(int transA, int transB, int M, int N, int K, float alpha,
                   const void *A, int aIsBF16, int lda, const void *B, int bIsBF16, int ldb,
                   float beta, float *C, int ldc, const float *bias, char *info);

/// `batch` products C_p[M,N] = alpha · op(A_p) · op(B_p) + beta · C_p, A_p = A + p·strideA (elements) and so on: bf16
/// operands, fp32 accumulation and output (the attention products, one per head). 0 or a dnnl_status_t.
int lora_dnnl_gemm_batched(int batch, int transA, int transB, int M, int N, int K, float alpha,
                           const unsigned short *A, int lda, long strideA, const unsigned short *B, int ldb, long strideB,
                           float beta, float *C, int ldc, long strideC, char *info);

/// A 2-D convolution (groups 1, dilation 1) on fp32 NCHW tensors, computed in bf16 with fp32 accumulation.
typedef struct {
    int n, cin, h, w, cout, kh, kw, stride, padding;
} lora_conv_shape;

/// Frozen weights [Cout, Cin, kh, kw] (fp32 or bf16) reordered once into the layout the forward (backward = 0)
/// or the input-gradient (backward = 1) primitive wants. NULL on failure. `bytes` receives its size.
/// `status` receives the dnnl_status_t of a failure.
void *lora_dnnl_conv_prepare(const lora_conv_shape *shape, int backward, const void *w, int wIsBF16, size_t *bytes,
                             int *status);
void lora_dnnl_conv_release(void *prepared);
/// A hash of the weights layout the (shape, direction) primitive wants: geometries with equal hashes share prepared
/// weights (a frozen kernel is reordered once per layout, not once per image size). 0 with `status` set on failure.
unsigned long long lora_dnnl_conv_weights_layout(const lora_conv_shape *shape, int backward, int *status);

/// y [N, Cout, Ho, Wo] = conv(x [N, Cin, H, W], prepared weights) + bias (may be NULL). 0 or a dnnl_status_t.
int lora_dnnl_conv_forward(const lora_conv_shape *shape, const float *x, const void *prepared, const float *bias,
                           float *y, char *info);
/// dX [N, Cin, H, W] from dY [N, Cout, Ho, Wo] and the prepared (backward = 1) weights.
int lora_dnnl_conv_backward_data(const lora_conv_shape *shape, const float *dy, const void *prepared, float *dx,
                                 char *info);

/// Wall time spent inside oneDNN per kind of call since the last reset (the calling thread waits for each call, so
/// these are the step's seconds in oneDNN), with the multiply-adds ×2 done: what a profiler cannot attribute, as
/// oneDNN's JIT-generated kernels carry no unwind information.
typedef struct {
    double seconds, flops;
    long calls;
} lora_dnnl_counter;
enum {
    LORA_DNNL_MATMUL,                 // bf16 matmuls (linear layers, LoRA products)
    LORA_DNNL_PACK,                   // fp32 → bf16 rounding of GEMM operands inside the shim
    LORA_DNNL_CONV_FORWARD,           // bf16 convolutions, forward
    LORA_DNNL_CONV_BACKWARD_DATA,     // bf16 convolutions, input gradient
    LORA_DNNL_REORDER,                // fp32 NCHW ↔ the convolutions' bf16 blocked layout, per call
    LORA_DNNL_BATCHED,                // batched bf16 products (attention, one per head)
    LORA_DNNL_COUNTERS
};
/// Copies the LORA_DNNL_COUNTERS counters into `out`; zeroes them when `reset` is 1.
void lora_dnnl_stats(lora_dnnl_counter *out, int reset);

#endif
