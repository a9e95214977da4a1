/* Paged decode attention for the CPU, float32: each query token attends over its request's K/V
 * read in place from the block pool (no gather into a padded batch, no mask).
 *
 * Layouts (contiguous, but the block table's rows are `table_stride` apart):
 *   q, out       [num_tokens, num_heads, head_dim]
 *   k, v         one layer of the pool: [num_slots, num_kv_heads, head_dim],
 *                slot = block * block_size + offset
 *   block_table  int32 [num_tokens, table_cols]: token i's request's blocks, in order
 *   context_lens int32 [num_tokens]: the keys token i sees (its request's first context_lens[i])
 *
 * One task per (token, K/V head): the query heads that share the K/V head (its group) read each
 * key and value row once for the whole group. Two passes over the keys (scores, then the
 * softmax-weighted values), float32 throughout: softmax(q k^T * scale) v, unfused.
 *
 * The task body is inlined with the group and head size as constants for the shapes models use
 * (so the compiler keeps the group's queries and sums in vector registers), and with runtime
 * values otherwise. Threads: OpenMP, the runtime torch itself runs on (libgomp, linked by its
 * soname), so the worker's torch.set_num_threads holds here too. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 64
#define MAX_HEAD_DIM 256

/* exp(x) for x <= 0 (scores minus their maximum), vectorisable: x = n ln2 + r, |r| <= ln2 / 2,
 * e^r by its degree-6 Taylor polynomial (relative error < 2e-7, below float32's epsilon), 2^n
 * through the exponent bits. libm's expf is not vectorised without -ffast-math, whose start-up
 * code would set flush-to-zero for the whole process. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_roundf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { float f; int32_t i; } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

typedef float vec8 __attribute__((vector_size(32), aligned(4))); /* 8 floats, unaligned ok */

typedef int32_t vec8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define SHUFFLE(x, ...) __builtin_shufflevector(x, x, __VA_ARGS__)
#else
#define SHUFFLE(x, ...) __builtin_shuffle(x, (vec8i){__VA_ARGS__})
#endif

static inline float hsum8(vec8 x) { /* a tree of three shuffle-adds */
    x += SHUFFLE(x, 4, 5, 6, 7, 0, 1, 2, 3);
    x += SHUFFLE(x, 2, 3, 0, 1, 6, 7, 4, 5);
    x += SHUFFLE(x, 1, 0, 3, 2, 5, 4, 7, 6);
    return x[0];
}

/* One (token, K/V head): `q`/`out` are the group's rows [group][head_dim], `k`/`v` the layer's
 * pool offset to this K/V head (a slot's row is `row` floats), `scores` [group][len] scratch.
 * head_dim a multiple of 8 (8-float vectors: AVX2, or two NEON registers). */
static inline __attribute__((always_inline)) void attend(
    const float *restrict q, const float *restrict k, const float *restrict v,
    const int32_t *restrict blocks, int64_t len, int64_t row, int64_t block_size, float scale,
    float *restrict scores, float *restrict out, const int64_t group, const int64_t head_dim) {
    const int64_t nv = head_dim / 8;
    vec8 qv[group * nv], acc[group * nv];
    for (int64_t i = 0; i < group * nv; i++) {
        memcpy(&qv[i], q + 8 * i, sizeof(vec8));
        acc[i] = (vec8){0};
    }
    /* 1) scores[g][j] = q_g . k_j * scale, a block at a time */
    for (int64_t start = 0; start < len; start += block_size) {
        const float *kb = k + (int64_t)blocks[start / block_size] * block_size * row;
        const int64_t n = len - start < block_size ? len - start : block_size;
        for (int64_t t = 0; t < n; t++) {
            const vec8 *kr = (const vec8 *)(kb + t * row);
            for (int64_t g = 0; g < group; g++) {
                vec8 dot = qv[g * nv] * kr[0];
                for (int64_t c = 1; c < nv; c++) dot += qv[g * nv + c] * kr[c];
                scores[g * len + start + t] = hsum8(dot) * scale;
            }
        }
    }
    /* 2) softmax of each head's row, left unnormalised (divided once at the end) */
    float inv_sum[group];
    for (int64_t g = 0; g < group; g++) {
        float *restrict s = scores + g * len;
        float m = s[0];
        for (int64_t j = 1; j < len; j++) m = s[j] > m ? s[j] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < len; j++) {
            s[j] = exp_nonpositive(s[j] - m);
            sum += s[j];
        }
        inv_sum[g] = 1.0f / sum;
    }
    /* 3) out_g = sum_j p[g][j] v_j / sum_g */
    for (int64_t start = 0; start < len; start += block_size) {
        const float *vb = v + (int64_t)blocks[start / block_size] * block_size * row;
        const int64_t n = len - start < block_size ? len - start : block_size;
        for (int64_t t = 0; t < n; t++) {
            const vec8 *vr = (const vec8 *)(vb + t * row);
            for (int64_t g = 0; g < group; g++) {
                const float p = scores[g * len + start + t];
                for (int64_t c = 0; c < nv; c++) acc[g * nv + c] += p * vr[c];
            }
        }
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < nv; c++) {
            const vec8 o = acc[g * nv + c] * inv_sum[g];
            memcpy(out + (g * nv + c) * 8, &o, sizeof(vec8));
        }
}

#define ATTEND(G, D) attend(qg, kh_k, kh_v, blocks, len, row, block_size, scale, scores, og, G, D)

int splitwiser_paged_decode_f32(const float *q, const float *k, const float *v,
                                const int32_t *block_table, int64_t table_stride,
                                int64_t table_cols, const int32_t *context_lens, float *out,
                                int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                                int64_t head_dim, int64_t block_size, float scale) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0) return 1;
    const int64_t group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || head_dim % 8 || block_size <= 0) return 2;
    int64_t max_len = 1;
    for (int64_t i = 0; i < num_tokens; i++)
        if (context_lens[i] > max_len) max_len = context_lens[i];
    if (max_len > table_cols * block_size) return 3;
    const int64_t row = num_kv_heads * head_dim; /* one slot's floats */
    int failed = 0;

#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (size_t)(group * max_len));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 4;
        }
#pragma omp for schedule(dynamic, 2)
        for (int64_t task = 0; task < num_tokens * num_kv_heads; task++) {
            if (scores == NULL) continue;
            const int64_t i = task / num_kv_heads, kh = task % num_kv_heads;
            const int64_t len = context_lens[i];
            const int32_t *blocks = block_table + i * table_stride;
            const float *qg = q + (i * num_heads + kh * group) * head_dim;
            const float *kh_k = k + kh * head_dim, *kh_v = v + kh * head_dim;
            float *og = out + (i * num_heads + kh * group) * head_dim;
            if (len <= 0) {
                memset(og, 0, sizeof(float) * (size_t)(group * head_dim));
                continue;
            }
            if (group == 4 && head_dim == 32) ATTEND(4, 32);
            else if (group == 4 && head_dim == 64) ATTEND(4, 64);
            else if (group == 4 && head_dim == 128) ATTEND(4, 128);
            else if (group == 8 && head_dim == 64) ATTEND(8, 64);
            else if (group == 8 && head_dim == 128) ATTEND(8, 128);
            else if (group == 7 && head_dim == 64) ATTEND(7, 64);
            else if (group == 1 && head_dim == 64) ATTEND(1, 64);
            else if (group == 1 && head_dim == 128) ATTEND(1, 128);
            else ATTEND(group, head_dim);
        }
        free(scores);
    }
    return failed;
}
