// Thin shim over OpenBLAS. OpenBLAS picks its kernels (OPENBLAS_CORETYPE) in a constructor that runs
// when the library is loaded, so lora-dist loads it itself with dlopen, after choosing the kernel:
// linking it normally would let it choose before main() runs.
#ifndef LORA_CBLAS_H
#define LORA_CBLAS_H

/// Loads libopenblas. If `coretype` is non-NULL, OPENBLAS_CORETYPE is set to it first (replacing any value).
/// Returns 0 on success, -1 if the library cannot be loaded, -2 if a symbol is missing.
/// `error` receives dlerror()'s text (truncated to `errorLength`).
int lora_blas_load(const char *coretype, char *error, int errorLength);

/// The OpenBLAS kernel family in use ("SkylakeX", "Haswell", ...). Requires a successful load.
const char *lora_blas_corename(void);
void lora_blas_set_threads(int threads);
int lora_blas_threads(void);

/// Row-major C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
void lora_sgemm(int transA, int transB, int M, int N, int K, float alpha,
                const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);

/// CPU features relevant to the choice of OpenBLAS kernel.
int lora_cpu_has_avx512_skx(void);   // AVX-512 F, CD, BW, DQ, VL: what OpenBLAS's SkylakeX kernels use
int lora_cpu_has_avx512_bf16(void);  // AVX512-BF16: Cooperlake kernels
int lora_cpu_has_avx2_fma(void);

#endif
