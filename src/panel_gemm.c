/* y = x @ W.T for a few rows at a time, with W's columns stored as panels (src/panels.py says why).

   x: rows x k_len, row-major. panels: W.T cut into column panels of PANEL columns, each stored whole,
   [k_len, PANEL] row-major, one after another; the last one zero-padded. y: rows x n, row-major.

   Each weight is read from memory once per 256 rows (up to 8 rows at a time are held in registers
   while a panel streams past; more reuse the panel from the caches), and the next rows of the panel
   are prefetched while the current ones are multiplied. Every output sums over k
   in order with one fused multiply-add per term, so a row's result does not depend on the other rows.

   With `threads` > 1 the panels are shared out among that many OpenMP threads (built with -fopenmp; the
   runtime is the libgomp torch has loaded): each panel is computed whole by one thread with the same
   instructions, so the result does not depend on the thread count either. */
#include <immintrin.h>
#include <stddef.h>

#define PANEL 48      /* three 16-float vectors: 8 rows x 3 accumulators fit the 32 AVX-512 registers */
#define ROWS 8
#define AHEAD 16      /* panel rows prefetched ahead (3 KiB); measured best of 8, 16, 32, 64 */
#define CHUNK 256     /* rows that take every panel before the next rows start: they stay in the caches meanwhile */

static __mmask16 part_mask(long width, int vector) {
    long left = width - 16L * vector;
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* Called with a constant `rows` (see panel_gemm), so that each row count compiles to its own loop with
   its accumulators in registers; with a variable count GCC keeps them on the stack. */
static inline __attribute__((always_inline)) void panel_rows(const float *x, const int rows, long k_len,
                                                             const float *panel, float *y, long n, long width) {
    __m512 acc[ROWS][3];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < 3; v++) acc[r][v] = _mm512_setzero_ps();
    for (long k = 0; k < k_len; k++) {
        const float *w = panel + k * PANEL;
        _mm_prefetch((const char *)(w + AHEAD * PANEL), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + AHEAD * PANEL + 16), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + AHEAD * PANEL + 32), _MM_HINT_T0);
        __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_set1_ps(x[r * k_len + k]);
            acc[r][0] = _mm512_fmadd_ps(w0, xv, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, xv, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(w2, xv, acc[r][2]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < 3; v++)
            _mm512_mask_storeu_ps(y + r * n + 16 * v, part_mask(width, v), acc[r][v]);
}

void panel_gemm(const float *x, long rows, long k_len, const float *panels, long n, float *y, int threads) {
    long count = (n + PANEL - 1) / PANEL;
    for (long first = 0; first < rows; first += CHUNK) {
        long last = first + CHUNK < rows ? first + CHUNK : rows;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
        for (long p = 0; p < count; p++) {
            const float *panel = panels + p * k_len * PANEL;
            long width = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
            for (long r = first; r < last; r += ROWS)
                switch (last - r < ROWS ? last - r : ROWS) {
#define ROWS_CASE(count) case count: panel_rows(x + r * k_len, count, k_len, panel, y + r * n + p * PANEL, n, width); break;
                    ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
#undef ROWS_CASE
                }
        }
    }
}
