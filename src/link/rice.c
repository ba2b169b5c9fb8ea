/* The int8 codec's Rice code in C, with the rounding before it and the scaling after it (src/link/rice.py).

   The same bytes and the same floats as the numpy definition (rice_encode, rice_decode in rice.py): one
   IEEE division or product per value, rounding to nearest with ties to even, no contraction (built with
   -ffp-contract=off). Each function returns -1 where numpy's path must decide instead: a value that is
   not finite or a code past `capacity` (encoding), a buffer that is not exactly a code (decoding, where
   numpy then says why). */
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "unary runs are read and written as little-endian 64-bit words"
#endif

/* x rounded to the nearest integer, ties to even, as np.rint: for 0 <= a < 2**23, a + 2**23 lies where floats
   are 1 apart, so the sum rounds a in the default rounding mode; from 2**23 every float is an integer. */
static inline float round_even(float x) {
    const float a = __builtin_fabsf(x); /* sign by bit operations: a branch on it mispredicts half the time */
    if (!(a < 8388608.0f)) return x;    /* also NaN */
    return __builtin_copysignf((a + 8388608.0f) - 8388608.0f, x);
}

/* count and hidden that a message can have: not negative, and count * hidden * 8 bits within a long. */
static inline int valid_shape(long count, long hidden, int k) {
    return k >= 0 && k <= 8 && count >= 0 && hidden >= 0 && (hidden == 0 || count <= (1L << 58) / hidden);
}

static inline uint64_t zigzag(float rounded) { /* rounded: an integer-valued float, |x| < 2**62 */
    int64_t q = (int64_t)rounded;
    return ((uint64_t)q << 1) ^ (uint64_t)(q >> 63);
}

/* rice_encode(np.rint(rotated / step[row]), k) into out[0 .. capacity): the k low bits of every zigzagged value,
   end to end in little-endian bit order, zero-padded to a byte, then every value's z >> k in unary (that many
   ones and a zero), zero-padded to a byte. The low bits take exactly (n k + 7) / 8 bytes, so both runs are
   written in one pass over the values. Returns the bytes written, or -1.

   The unary runs go through a 64-bit register: each value ORs its run of ones in, the whole word is stored,
   and the bytes it completed are passed. No store is read back (an 8-byte read of a byte just stored stalls
   the pipeline) and no branch depends on the data below runs of 56 (a branch on a value's sign or a loop over
   its run's bytes mispredicts about once a value: 17 to 23 ns a value on the EPYC, against 4 here). */
long rice_round_encode(const float *rotated, long count, long hidden, const float *step, int k, uint8_t *out, long capacity) {
    if (!valid_shape(count, hidden, k) || capacity < 8) return -1;
    const long n = count * hidden, low_size = (n * k + 7) / 8;
    const uint64_t mask = (1ull << k) - 1;
    if (low_size > capacity - 8) return -1;
    uint8_t *low = out, *at = out + low_size;
    const uint8_t *const last = out + capacity - 8; /* where a word may still be stored whole */
    uint64_t low_word = 0, word = 0;
    unsigned low_fill = 0, fill = 0; /* bits in use, below 8 between values */
    for (long r = 0; r < count; r++) {
        const float s = step[r], *row = rotated + r * hidden;
        for (long i = 0; i < hidden; i++) {
            const float v = round_even(row[i] / s);
            if (!(v < 4.6e18f && v > -4.6e18f)) return -1; /* not finite, or past what a zigzag holds */
            const uint64_t z = zigzag(v);
            low_word |= (z & mask) << low_fill;
            low_fill += (unsigned)k;
            if (low_fill >= 8) { /* k <= 8: at most one whole byte per value */
                *low++ = (uint8_t)low_word;
                low_word >>= 8;
                low_fill -= 8;
            }
            uint64_t ones = z >> k;
            for (; ones > 56; ones -= 32) { /* rare: 32 ones at a time */
                if (at > last) return -1;
                word |= 0xFFFFFFFFull << fill;
                memcpy(at, &word, 8);
                at += 4;
                word >>= 32;
            }
            if (at > last) return -1;
            word |= ((1ull << ones) - 1) << fill; /* then the terminating zero */
            fill += (unsigned)ones + 1;
            memcpy(at, &word, 8);
            const unsigned whole = fill >> 3;
            at += whole;
            word = (word >> (4 * whole)) >> (4 * whole); /* two shifts: one of 64 would be undefined */
            fill &= 7;
        }
    }
    if (low_fill) *low = (uint8_t)low_word;
    return (long)(at - out) + (fill ? 1 : 0);
}

/* The count * hidden integers of such a code, each times its row's step, into out (float32). Returns 0 where
   `buffer` is exactly the code of count * hidden values (zero padding, no byte after the last value), else -1. */
int rice_decode_scale(const uint8_t *buffer, long length, long count, long hidden, int k, const float *step, float *out) {
    if (!valid_shape(count, hidden, k) || length < 0) return -1;
    const long n = count * hidden, low_size = (n * k + 7) / 8;
    const uint64_t mask = (1ull << k) - 1;
    if (n == 0) return length == 0 ? 0 : -1;
    if (length < low_size + (n + 7) / 8) return -1;
    const long padding = low_size * 8 - n * k;
    if (padding && (buffer[low_size - 1] >> (8 - padding))) return -1;
    const uint8_t *unary = buffer + low_size;
    const long unary_size = length - low_size;
    long byte = 0, next_low = 0;
    unsigned bit = 0;
    uint64_t acc = 0;
    int have = 0;
    for (long r = 0; r < count; r++) {
        const float s = step[r];
        for (long i = 0; i < hidden; i++) {
            while (have < k) {
                acc |= (uint64_t)buffer[next_low++] << have;
                have += 8;
            }
            const uint64_t low = acc & mask;
            acc >>= k;
            have -= k;
            uint64_t ones = 0;
            if (byte + 8 <= unary_size) { /* the run's end within the next 64 bits: found without a branch per byte */
                uint64_t word;
                memcpy(&word, unary + byte, 8);
                const uint64_t zeros = ~(word >> bit) & (~0ull >> bit);
                if (zeros) {
                    const unsigned end = bit + (unsigned)__builtin_ctzll(zeros) + 1;
                    ones = end - 1 - bit;
                    byte += end >> 3;
                    bit = end & 7;
                    goto decoded;
                }
            }
            for (;;) {
                if (byte >= unary_size) return -1; /* fewer than n zeros */
                const unsigned avail = 8 - bit, zeros = ~((unsigned)unary[byte] >> bit) & ((1u << avail) - 1);
                if (!zeros) {
                    ones += avail;
                    byte++;
                    bit = 0;
                    continue;
                }
                const unsigned t = (unsigned)__builtin_ctz(zeros);
                ones += t;
                bit += t + 1;
                if (bit == 8) {
                    bit = 0;
                    byte++;
                }
                break;
            }
        decoded:;
            const uint64_t z = (ones << k) | low;
            const int64_t q = (int64_t)(z >> 1) ^ -(int64_t)(z & 1);
            out[r * hidden + i] = (float)q * s;
        }
    }
    if (bit == 0) return byte == unary_size ? 0 : -1; /* the last zero ended its byte */
    return byte + 1 == unary_size && !(unary[byte] >> bit) ? 0 : -1;
}
