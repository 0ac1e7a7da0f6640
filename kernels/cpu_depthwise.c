/* Depthwise convolution taps on packed tokens, for the CPU: the loops of depthwise_gather.py without its
 * (rows, taps, channels) temporaries.
 *
 *   taps:           out[t, c] = sum_k w[k, c] * src[index[t, k], c]
 *   taps_backward:  dw[k, c]  = sum_i x[i, c] * g[index[i, k], c]
 *                   dx[i, c]  = sum_k w[k, c] * g[index[i, k], c]   (when dx is not NULL)
 *
 * An index equal to the number of source rows (`sources`) reads zero: the tap falls on a masked cell (any index
 * outside [0, sources) reads zero, so a bad table cannot read out of bounds).
 *
 * Over the inverse table, the backward reads each gathered gradient row once for both gradients (input and
 * tap weight), so a conv's backward is one pass over its gradient. Rows are split over OpenMP threads. Loaded
 * after PyTorch, the library binds to the OpenMP runtime PyTorch already loaded (same soname), so these
 * loops share PyTorch's thread pool instead of competing with it. The weight gradient sums one partial per
 * thread, in thread order. Built twice, with REAL = float and REAL = double.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef REAL
#define REAL float
#endif

/* No thread with fewer than 16 rows or 64k multiply-adds: below that a parallel region costs more than it saves. */
static int clamp_threads(int threads, int64_t rows, int64_t work) {
    while (threads > 1 && (rows < 16 * (int64_t)threads || work < 65536 * (int64_t)threads)) --threads;
    return threads < 1 ? 1 : threads;
}

int taps(const REAL *src, int64_t sources, const int64_t *index, const REAL *w, REAL *out, int64_t rows,
         int64_t taps, int64_t channels, int threads) {
    const int64_t C = channels, K = taps;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, rows, rows * K * C))
    for (int64_t t = 0; t < rows; ++t) {
        REAL *restrict o = out + t * C;
        const int64_t *idx = index + t * K;
        memset(o, 0, (size_t)C * sizeof(REAL));
        for (int64_t k = 0; k < K; ++k) {
            if ((uint64_t)idx[k] >= (uint64_t)sources) continue;
            const REAL *restrict s = src + idx[k] * C;
            const REAL *restrict wk = w + k * C;
            for (int64_t c = 0; c < C; ++c) o[c] += wk[c] * s[c];
        }
    }
    return 0;
}

int taps_backward(const REAL *x, const REAL *g, int64_t sources, const int64_t *index, const REAL *w, REAL *dx,
                  REAL *dw, int64_t rows, int64_t taps, int64_t channels, int threads) {
    const int64_t C = channels, K = taps, size = taps * channels;
    threads = clamp_threads(threads, rows, rows * size);
    REAL *partial = (REAL *)calloc((size_t)threads * (size_t)size, sizeof(REAL));
    if (partial == NULL) return -1;
#pragma omp parallel num_threads(threads)
    {
        const int p = omp_get_thread_num(), n = omp_get_num_threads();
        REAL *restrict mine = partial + (int64_t)p * size;
        for (int64_t i = rows * p / n; i < rows * (p + 1) / n; ++i) {
            const REAL *restrict xi = x + i * C;
            const int64_t *idx = index + i * K;
            REAL *restrict o = dx == NULL ? NULL : dx + i * C;
            if (o != NULL) memset(o, 0, (size_t)C * sizeof(REAL));
            for (int64_t k = 0; k < K; ++k) {
                if ((uint64_t)idx[k] >= (uint64_t)sources) continue;
                const REAL *restrict gk = g + idx[k] * C;
                REAL *restrict d = mine + k * C;
                if (o != NULL) {
                    const REAL *restrict wk = w + k * C;
                    for (int64_t c = 0; c < C; ++c) {
                        const REAL v = gk[c];
                        d[c] += xi[c] * v;
                        o[c] += wk[c] * v;
                    }
                } else {
                    for (int64_t c = 0; c < C; ++c) d[c] += xi[c] * gk[c];
                }
            }
        }
    }
    memcpy(dw, partial, (size_t)size * sizeof(REAL));
    for (int p = 1; p < threads; ++p)
        for (int64_t e = 0; e < size; ++e) dw[e] += partial[(int64_t)p * size + e];
    free(partial);
    return 0;
}
