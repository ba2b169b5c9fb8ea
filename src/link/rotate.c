/* The int8 codecs' outlier selection and rotation on the host (src/link/rotation.py), one call per message.

   The same operations in the same order as torch's definition there, so the same bits: a product, a sum
   or a difference is one IEEE operation, rounded to nearest (built with -ffp-contract=off, no fast math).
   A position's hidden = m * a values, a the largest power of two dividing hidden, m odd:

     rotate:  times the signs (exact), then a Walsh-Hadamard transform of each of the m blocks of a values
              (unnormalized: butterflies u + w, u - w, in stages of width 1, 2, 4, ...), then block i of
              the result = mix[i][0] * block 0 + mix[i][1] * block 1 + ... (in that order; `mix` holds
              the 1 / sqrt(a) that makes the whole orthogonal);
     inverse: the mirror: blocks mixed by mix's transpose, transformed, times the signs.

   Every row is rotated on its own, so a position's bits do not depend on the rows beside it. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void walsh_hadamard(float *v, long a) {
    for (long h = 1; h < a; h <<= 1)
        for (long b = 0; b < a; b += 2 * h)
            for (long t = 0; t < h; t++) {
                const float u = v[b + t], w = v[b + h + t];
                v[b + t] = u + w;
                v[b + h + t] = u - w;
            }
}

/* out block i = sum over j, in order, of coefficient (i, j) * block j; coefficient (i, j) is mix[i][j], or mix[j][i]
   where `transposed`. */
static void mix_blocks(const float *in, long m, long a, const float *mix, int transposed, float *out) {
    for (long i = 0; i < m; i++) {
        float *o = out + i * a;
        const float first = transposed ? mix[i] : mix[i * m];
        for (long t = 0; t < a; t++) o[t] = first * in[t];
        for (long j = 1; j < m; j++) {
            const float c = transposed ? mix[j * m + i] : mix[i * m + j];
            const float *block = in + j * a;
            for (long t = 0; t < a; t++) o[t] = o[t] + c * block[t];
        }
    }
}

/* Per row of x [count, m * a]: the k channels of largest magnitude (the earlier channel first among equal
   magnitudes, largest first, as a stable descending sort gives them) into index and values [count, k], and the
   row with those channels zeroed, rotated, into rotated [count, m * a]. Returns 0, or -1 (nothing decided) where
   a value is not finite or k is out of range: torch's path then decides. */
int outliers_rotate(const float *x, long count, long m, long a, int k, const float *signs, const float *mix,
                    int64_t *index, float *values, float *rotated) {
    const long hidden = m * a;
    if (k < 0 || k > hidden || count < 0 || m < 1 || a < 1) return -1;
    float *rest = malloc(sizeof(float) * (size_t)hidden), *largest = malloc(sizeof(float) * (size_t)(k + 1));
    int status = rest && largest ? 0 : -1;
    for (long r = 0; r < count && status == 0; r++) {
        const float *row = x + r * hidden;
        int64_t *chosen = index + r * k;
        int held = 0;
        for (long i = 0; i < hidden; i++) {
            const float magnitude = fabsf(row[i]);
            if (!isfinite(magnitude)) {
                status = -1;
                break;
            }
            if (k == 0 || (held == k && !(magnitude > largest[k - 1]))) continue;
            int at = held < k ? held++ : k - 1;
            for (; at > 0 && magnitude > largest[at - 1]; at--) { /* strictly larger passes: equals keep their order */
                largest[at] = largest[at - 1];
                chosen[at] = chosen[at - 1];
            }
            largest[at] = magnitude;
            chosen[at] = i;
        }
        if (status) break;
        for (long i = 0; i < hidden; i++) rest[i] = row[i] * signs[i];
        for (int j = 0; j < k; j++) {
            values[r * k + j] = row[chosen[j]];
            rest[chosen[j]] = 0.0f * signs[chosen[j]]; /* as torch: the channel zeroed, then times its sign */
        }
        for (long b = 0; b < m; b++) walsh_hadamard(rest + b * a, a);
        mix_blocks(rest, m, a, mix, 0, rotated + r * hidden);
    }
    free(rest);
    free(largest);
    return status;
}

/* The inverse rotation of each row of rotated [count, m * a], with the k outliers of index and values [count, k]
   put in place (in order: a later one wins), into out. Returns 0, or -1 where an index is out of range. */
int restore(const float *rotated, long count, long m, long a, int k, const float *signs, const float *mix,
            const int64_t *index, const float *values, float *out) {
    const long hidden = m * a;
    if (k < 0 || count < 0 || m < 1 || a < 1) return -1;
    for (long r = 0; r < count; r++) {
        float *row = out + r * hidden;
        mix_blocks(rotated + r * hidden, m, a, mix, 1, row);
        for (long b = 0; b < m; b++) walsh_hadamard(row + b * a, a);
        for (long i = 0; i < hidden; i++) row[i] = row[i] * signs[i];
        for (int j = 0; j < k; j++) {
            const int64_t channel = index[r * k + j];
            if (channel < 0 || channel >= hidden) return -1;
            row[channel] = values[r * k + j];
        }
    }
    return 0;
}
