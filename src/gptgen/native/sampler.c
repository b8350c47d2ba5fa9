/* gptgen's CPU sampler kernels: the two row scans a decode step pays for after the model, written as
 * plain C so one call does in microseconds what a chain of eager PyTorch reductions does in milliseconds.
 * Built on first use by gptgen/generation/native.py with the machine's C compiler; every function
 * reports rows it does not handle (a NaN, too many ties) so the caller can take the PyTorch path.
 *
 *   gg_argmax           first index of the largest value of each row (torch.argmax's answer)
 *   gg_top_candidates   every token whose score is at least the row's k-th largest (ties included),
 *                       in increasing token-id order
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static float scalar_max(const float *x, int64_t n, float best, int *nan) {
    int bad = 0;
    for (int64_t j = 0; j < n; j++) {
        float v = x[j];
        bad |= (v != v);
        best = v > best ? v : best;
    }
    *nan |= bad;
    return best;
}

/* Largest value of n >= 1 floats, and whether any is NaN (then the returned maximum is meaningless). */
static float block_max(const float *x, int64_t n, int *nan) {
#if defined(__AVX512F__)
    if (n >= 16) {
        __m512 m = _mm512_loadu_ps(x);
        __mmask16 bad = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
        int64_t j = 16;
        for (; j + 16 <= n; j += 16) {
            __m512 v = _mm512_loadu_ps(x + j);
            bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            m = _mm512_max_ps(m, v);
        }
        *nan |= bad != 0;
        return scalar_max(x + j, n - j, _mm512_reduce_max_ps(m), nan);
    }
#elif defined(__AVX2__)
    if (n >= 8) {
        __m256 m = _mm256_loadu_ps(x);
        __m256 bad = _mm256_cmp_ps(m, m, _CMP_UNORD_Q);
        int64_t j = 8;
        for (; j + 8 <= n; j += 8) {
            __m256 v = _mm256_loadu_ps(x + j);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            m = _mm256_max_ps(m, v);
        }
        *nan |= _mm256_movemask_ps(bad) != 0;
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        return scalar_max(x + j, n - j, _mm_cvtss_f32(h), nan);
    }
#endif
    *nan |= (x[0] != x[0]);
    return scalar_max(x + 1, n - 1, x[0], nan);
}

/* Bit j set where x[j] >= t, for the n <= BLOCK floats of a block. */
static uint64_t block_at_least(const float *x, int64_t n, float t) {
    uint64_t mask = 0;
    int64_t j = 0;
#if defined(__AVX512F__)
    __m512 tv = _mm512_set1_ps(t);
    for (; j + 16 <= n; j += 16)
        mask |= (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), tv, _CMP_GE_OQ) << j;
#elif defined(__AVX2__)
    __m256 tv = _mm256_set1_ps(t);
    for (; j + 8 <= n; j += 8)
        mask |= (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), tv, _CMP_GE_OQ)) << j;
#endif
    for (; j < n; j++)
        mask |= (uint64_t)(x[j] >= t) << j;
    return mask;
}

/* out[r] = the first index of the row's maximum; -1 for a row that holds a NaN. */
void gg_argmax(const float *scores, int64_t rows, int64_t vocab, int64_t stride, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *s = scores + r * stride;
        int nan = 0;
        float best = block_max(s, vocab < BLOCK ? vocab : BLOCK, &nan);
        int64_t best_block = 0;
        for (int64_t b = BLOCK; b < vocab; b += BLOCK) {
            float m = block_max(s + b, vocab - b < BLOCK ? vocab - b : BLOCK, &nan);
            if (m > best) { best = m; best_block = b; }
        }
        if (nan) { out[r] = -1; continue; }
        int64_t i = best_block;
        while (s[i] != best) i++;
        out[r] = i;
    }
}

/* Min-heap of floats: heap[0] is the smallest of the k largest values seen so far. */
static void sift_down(float *heap, int64_t k, int64_t i) {
    float v = heap[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= k) break;
        if (c + 1 < k && heap[c + 1] < heap[c]) c++;
        if (heap[c] >= v) break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = v;
}

static void sift_up(float *heap, int64_t i) {
    float v = heap[i];
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (heap[p] <= v) break;
        heap[i] = heap[p];
        i = p;
    }
    heap[i] = v;
}

/* For each row r, with k = ks[r] (1 <= k <= vocab): the tokens whose score is at least the row's k-th
 * largest score (counting repeats, as torch.topk(...).values[k-1]), in increasing id order, written to
 * out_values / out_ids (rows, cap); entries past a row's count are -inf and the row's last candidate id.
 * counts[r] = the number of such tokens, -1 for a row holding a NaN; a count above cap means the row's
 * candidates were not all written. Returns 0, or -1 when memory for the heap could not be had. */
int gg_top_candidates(const float *scores, int64_t rows, int64_t vocab, int64_t stride, const int64_t *ks,
                      int64_t cap, float *out_values, int64_t *out_ids, int64_t *counts) {
    int64_t kmax = 1;
    for (int64_t r = 0; r < rows; r++) kmax = ks[r] > kmax ? ks[r] : kmax;
    int64_t nblocks = (vocab + BLOCK - 1) / BLOCK;
    float *heap = (float *)malloc(sizeof(float) * (size_t)(kmax + nblocks));
    if (!heap) return -1;
    float *maxima = heap + kmax;
    const float neg_inf = -__builtin_inff();
    for (int64_t r = 0; r < rows; r++) {
        const float *s = scores + r * stride;
        int64_t k = ks[r] < 1 ? 1 : (ks[r] > vocab ? vocab : ks[r]);
        int nan = 0;
        for (int64_t b = 0; b < nblocks; b++) {
            int64_t n = vocab - b * BLOCK < BLOCK ? vocab - b * BLOCK : BLOCK;
            maxima[b] = block_max(s + b * BLOCK, n, &nan);
        }
        float *vals = out_values + r * cap;
        int64_t *ids = out_ids + r * cap;
        if (nan) {
            counts[r] = -1;
            for (int64_t j = 0; j < cap; j++) { vals[j] = neg_inf; ids[j] = 0; }
            continue;
        }
        /* The k-th largest block maximum is a floor for the k-th largest value (those k maxima are k
         * tokens): only blocks whose maximum reaches it, and their tokens at or above it, can matter. */
        int64_t kb = k < nblocks ? k : nblocks;
        int64_t filled = 0;
        for (int64_t b = 0; b < nblocks; b++) {
            float v = maxima[b];
            if (filled < kb) {
                heap[filled] = v;
                sift_up(heap, filled);
                filled++;
            } else if (v > heap[0]) {
                heap[0] = v;
                sift_down(heap, kb, 0);
            }
        }
        float floor = k <= nblocks ? heap[0] : neg_inf;
        /* the k-th largest value: a heap of the k largest among the tokens at or above the floor */
        filled = 0;
        for (int64_t b = 0; b < nblocks; b++) {
            if (maxima[b] < floor || (filled == k && maxima[b] <= heap[0])) continue;
            int64_t start = b * BLOCK, n = start + BLOCK < vocab ? BLOCK : vocab - start;
            for (uint64_t m = block_at_least(s + start, n, floor); m; m &= m - 1) {
                float v = s[start + __builtin_ctzll(m)];
                if (filled < k) {
                    heap[filled] = v;
                    sift_up(heap, filled);
                    filled++;
                } else if (v > heap[0]) {
                    heap[0] = v;
                    sift_down(heap, k, 0);
                }
            }
        }
        float kth = heap[0];
        /* every token at or above it, in id order */
        int64_t count = 0;
        for (int64_t b = 0; b < nblocks; b++) {
            if (maxima[b] < kth) continue;
            int64_t start = b * BLOCK, n = start + BLOCK < vocab ? BLOCK : vocab - start;
            for (uint64_t m = block_at_least(s + start, n, kth); m; m &= m - 1) {
                int64_t i = start + __builtin_ctzll(m);
                if (count < cap) { vals[count] = s[i]; ids[count] = i; }
                count++;
            }
        }
        counts[r] = count;
        int64_t last = count > 0 ? ids[(count < cap ? count : cap) - 1] : 0;
        for (int64_t j = count; j < cap; j++) { vals[j] = neg_inf; ids[j] = last; }
    }
    free(heap);
    return 0;
}
