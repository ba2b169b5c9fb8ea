/* y = x @ W.T for a few rows at a time, with W's columns stored as panels (src/panels.py says why).

   x: rows x k_len, row-major. panels: W.T cut into column panels of PANEL columns, each stored whole,
   [k_len, PANEL] row-major, one after another; the last one zero-padded. y: rows x n, row-major.

   Each weight is read from memory once per 256 rows (up to 14 rows at a time are held in registers
   while a panel streams past; more reuse the panel from the caches), and the next rows of the panel
   are prefetched while the current ones are multiplied. The pass that streams a panel in from memory
   is the slow one, so it holds as many rows as the registers allow: 14 with panels of 32 columns (with
   48 columns it was 8, and 9-12 rows cost 13-15% more). Every output sums over k in order with one
   fused multiply-add per term, so a row's result does not depend on the other rows.

   With `threads` > 1 the panels are shared out among that many OpenMP threads (built with -fopenmp; the
   runtime is the libgomp torch has loaded): each panel is computed whole by one thread with the same
   instructions, so the result does not depend on the thread count either.

   panel_gemm_bf16 is the same over bf16 x, W and y, for CPUs with AVX512_BF16: a panel holds W.T's rows in
   pairs, [k_len / 2, PANEL, 2], and one VDPBF16PS adds two terms (k, k + 1) to each fp32 accumulator; the
   sums are rounded to bf16 (to nearest even) once, at the end. k_len must be even.

   bias: NULL, or n fp32 values each output's sum starts from (added before any rounding). */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define VECS 2        /* 16-float vectors per panel row */
#define PANEL (16 * VECS)
#define ROWS 14       /* rows held in registers: 14 x VECS accumulators, VECS weights and a broadcast in 31 of the 32 */
#define AHEAD 16      /* panel rows prefetched ahead (2 KiB); measured best of 8, 16, 32, 64 */
#define CHUNK 256     /* rows that take every panel before the next rows start: they stay in the caches meanwhile */

static __mmask16 part_mask(long width, int vector) {
    long left = width - 16L * vector;
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* Every row's sums start at this panel's bias (fp32, NULL for none): added in fp32 before any rounding. */
static inline __attribute__((always_inline)) void start_sums(__m512 acc[ROWS][VECS], const int rows, const float *bias, long width) {
    __m512 start[VECS];
    for (int v = 0; v < VECS; v++) start[v] = bias ? _mm512_maskz_loadu_ps(part_mask(width, v), bias + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 14
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < VECS; v++) acc[r][v] = start[v];
}

/* Whether this build shares a product's panels among threads (built with OpenMP). */
int panel_gemm_threads(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Called with a constant `rows` (see panel_gemm), so that each row count compiles to its own loop with
   its accumulators in registers; with a variable count GCC keeps them on the stack. */
static inline __attribute__((always_inline)) void panel_rows(const float *x, const int rows, long k_len, const float *panel,
                                                             float *y, long n, long width, const float *bias) {
    __m512 acc[ROWS][VECS];
    start_sums(acc, rows, bias, width);
    for (long k = 0; k < k_len; k++) {
        const float *w = panel + k * PANEL;
        __m512 wv[VECS];
        for (int v = 0; v < VECS; v++) {
            _mm_prefetch((const char *)(w + AHEAD * PANEL + 16 * v), _MM_HINT_T0);
            wv[v] = _mm512_loadu_ps(w + 16 * v);
        }
#pragma GCC unroll 14
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_set1_ps(x[r * k_len + k]);
            for (int v = 0; v < VECS; v++) acc[r][v] = _mm512_fmadd_ps(wv[v], xv, acc[r][v]);
        }
    }
#pragma GCC unroll 14
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < VECS; v++)
            _mm512_mask_storeu_ps(y + r * n + 16 * v, part_mask(width, v), acc[r][v]);
}

/* The bf16 kernel needs a compiler that knows AVX512_BF16 (GCC 10, clang 9); an older one builds the fp32 kernel alone. */
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define PANEL_BF16 1
#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* panel_rows over bf16: each step of the loop takes a pair of k, two bf16 of x as one 32-bit broadcast. */
static inline __attribute__((always_inline)) BF16 void panel_rows_bf16(const uint16_t *x, const int rows, long k_len,
                                                                       const uint16_t *panel, uint16_t *y, long n, long width,
                                                                       const float *bias) {
    __m512 acc[ROWS][VECS];
    start_sums(acc, rows, bias, width);
    for (long k = 0; k < k_len; k += 2) {
        const uint16_t *w = panel + k * PANEL;  /* PANEL pairs of bf16 per pair of k: VECS vectors */
        __m512bh wv[VECS];
        for (int v = 0; v < VECS; v++) {
            _mm_prefetch((const char *)(w + AHEAD * PANEL + 32 * v), _MM_HINT_T0);
            wv[v] = (__m512bh)_mm512_loadu_si512(w + 32 * v);
        }
#pragma GCC unroll 14
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, x + r * k_len + k, sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int v = 0; v < VECS; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], wv[v], xv);
        }
    }
#pragma GCC unroll 14
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < VECS; v++)
            _mm256_mask_storeu_epi16(y + r * n + 16 * v, part_mask(width, v), (__m256i)_mm512_cvtneps_pbh(acc[r][v]));
}

#endif

/* Every panel past each block of up to ROWS rows, CHUNK rows at a time, the panels shared out among `threads`.
   `rows_fn` is called with a constant row count (see panel_rows). */
#define PANEL_GEMM(name, type, rows_fn, attributes)                                                                    \
    attributes void name(const type *x, long rows, long k_len, const type *panels, long n, type *y, const float *bias, \
                         int threads) {                                                                                \
        long count = (n + PANEL - 1) / PANEL;                                                                          \
        for (long first = 0; first < rows; first += CHUNK) {                                                           \
            long last = first + CHUNK < rows ? first + CHUNK : rows;                                                   \
            _Pragma("omp parallel for num_threads(threads) schedule(static) if (threads > 1)")                         \
            for (long p = 0; p < count; p++) {                                                                         \
                const type *panel = panels + p * k_len * PANEL;                                                        \
                const float *start = bias ? bias + p * PANEL : (const float *)0;                                       \
                long width = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;                                            \
                for (long r = first; r < last; r += ROWS) {                                                            \
                    const type *block = x + r * k_len;                                                                 \
                    type *out = y + r * n + p * PANEL;                                                                 \
                    switch (last - r < ROWS ? last - r : ROWS) {                                                       \
                    case 1: rows_fn(block, 1, k_len, panel, out, n, width, start); break;                              \
                    case 2: rows_fn(block, 2, k_len, panel, out, n, width, start); break;                              \
                    case 3: rows_fn(block, 3, k_len, panel, out, n, width, start); break;                              \
                    case 4: rows_fn(block, 4, k_len, panel, out, n, width, start); break;                              \
                    case 5: rows_fn(block, 5, k_len, panel, out, n, width, start); break;                              \
                    case 6: rows_fn(block, 6, k_len, panel, out, n, width, start); break;                              \
                    case 7: rows_fn(block, 7, k_len, panel, out, n, width, start); break;                              \
                    case 8: rows_fn(block, 8, k_len, panel, out, n, width, start); break;                              \
                    case 9: rows_fn(block, 9, k_len, panel, out, n, width, start); break;                              \
                    case 10: rows_fn(block, 10, k_len, panel, out, n, width, start); break;                            \
                    case 11: rows_fn(block, 11, k_len, panel, out, n, width, start); break;                            \
                    case 12: rows_fn(block, 12, k_len, panel, out, n, width, start); break;                            \
                    case 13: rows_fn(block, 13, k_len, panel, out, n, width, start); break;                            \
                    case 14: rows_fn(block, 14, k_len, panel, out, n, width, start); break;                            \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }

PANEL_GEMM(panel_gemm, float, panel_rows, )
#ifdef PANEL_BF16
PANEL_GEMM(panel_gemm_bf16, uint16_t, panel_rows_bf16, BF16)
#endif
