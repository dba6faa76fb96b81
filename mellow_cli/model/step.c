/* The language model (model/llama.py) over a few new tokens against its KV cache, in plain C:
   decode steps (one token per row) and choice scoring (a few tokens per choice, every choice of
   a row after the same prefix).

   Why: in eager torch a decode step is about 25 small operations per layer, each a few
   microseconds of dispatch, around matrix-vector products that themselves take about 10 ms;
   this does the whole forward in one call, reading each weight once for all the tokens, in half
   precision or 8 bits, and summing in float32. Choices need no copy of the prefix's cache: each
   choice's tokens go to slots of their own after it and see the prefix and their own earlier
   tokens only. fused.py compiles this on the user's machine for its instruction set
   (-march=native) and falls back to torch's forward if it cannot.

   The arithmetic is llama.py's: RMSNorm, q/k/v as one matrix, rotary ("rotate half", with the
   signed sine table of RotaryEmbedding.span), grouped-query attention over the float32 KV cache
   that the torch prefill filled (laid out (rows, kv_heads, max_len, head_dim) per layer), the
   output projection, SwiGLU, the last norm and the head. Activations stay float32 throughout,
   and half-precision weights are widened as they are read; int8 weights meet the activations
   rounded to 16-bit integers (see quantize16). */

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { F16 = 0, BF16 = 1, INT8 = 2 };

/* The model's sizes (fused.py fills them in this order). */
typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, max_len, kind, threads;
    double eps;
} Dims;

/* Per layer, in this order: qkv, o, gate_up, down weights; their scales (int8) or 0; the two norm
   weights; the k and v caches. Then the last norm, the head and its scales. */
enum { QKV, O, GATE_UP, DOWN, QKV_S, O_S, GATE_UP_S, DOWN_S, NORM_IN, NORM_POST, K_CACHE, V_CACHE, PER_LAYER };

/* Tokens are multiplied by a weight row in groups of up to GROUP, the row widened once. */
#define GROUP 4

static inline float widen_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float widen_f16(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, sizeof f);
    return (float)f;
}

#if defined(__AVX2__) || defined(__F16C__)
static inline float sum8(__m256 v) {
    __m128 d = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    d = _mm_add_ps(d, _mm_movehl_ps(d, d));
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}
#endif

/* out[j] = sum_i w[i] * x[j * stride + i] for j < nr, float16 w. Compilers do not vectorize the
   conversion by themselves (without AVX512-FP16), so it is spelled out for AVX512 and for AVX2
   with F16C; elsewhere the plain loop below does all of it. `nr` is a
   constant at each call (see dots_f16), so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dots_f16_n(const uint16_t *w, const float *x, int64_t stride, int64_t n, float *out,
                              const int nr) {
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 acc[GROUP], acc2 = _mm512_setzero_ps();
    for (int j = 0; j < nr; j++) acc[j] = _mm512_setzero_ps();
    if (nr == 1) {  /* one token: two chains of sums, so the adds do not wait on each other */
        for (; i + 32 <= n; i += 32) {
            acc[0] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i))),
                                     _mm512_loadu_ps(x + i), acc[0]);
            acc2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i + 16))),
                                   _mm512_loadu_ps(x + i + 16), acc2);
        }
    }
    for (; i + 16 <= n; i += 16) {
        __m512 wide = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i)));
        for (int j = 0; j < nr; j++) acc[j] = _mm512_fmadd_ps(wide, _mm512_loadu_ps(x + j * stride + i), acc[j]);
    }
    acc[0] = _mm512_add_ps(acc[0], acc2);
    for (int j = 0; j < nr; j++) out[j] = _mm512_reduce_add_ps(acc[j]);
#elif defined(__F16C__) && defined(__FMA__)
    __m256 acc[GROUP], acc2 = _mm256_setzero_ps();
    for (int j = 0; j < nr; j++) acc[j] = _mm256_setzero_ps();
    if (nr == 1) {
        for (; i + 16 <= n; i += 16) {
            acc[0] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))),
                                     _mm256_loadu_ps(x + i), acc[0]);
            acc2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8))),
                                   _mm256_loadu_ps(x + i + 8), acc2);
        }
    }
    for (; i + 8 <= n; i += 8) {
        __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i)));
        for (int j = 0; j < nr; j++) acc[j] = _mm256_fmadd_ps(wide, _mm256_loadu_ps(x + j * stride + i), acc[j]);
    }
    acc[0] = _mm256_add_ps(acc[0], acc2);
    for (int j = 0; j < nr; j++) out[j] = sum8(acc[j]);
#else
    for (int j = 0; j < nr; j++) out[j] = 0.0f;
#endif
    for (; i < n; i++) {
        float wide = widen_f16(w[i]);
        for (int j = 0; j < nr; j++) out[j] += wide * x[j * stride + i];
    }
}

static void dots_f16(const uint16_t *w, const float *x, int64_t stride, int64_t n, float *out, int nr) {
    switch (nr) {
        case 1: dots_f16_n(w, x, stride, n, out, 1); break;
        case 2: dots_f16_n(w, x, stride, n, out, 2); break;
        case 3: dots_f16_n(w, x, stride, n, out, 3); break;
        default: dots_f16_n(w, x, stride, n, out, 4); break;
    }
}

/* int8 weights meet the activations rounded to 16-bit integers, one scale per block of QBLOCK:
   integer products (two instructions per 32 weights on AVX512, three per 16 on AVX2) where
   widening every weight to float would make the step compute-bound. The rounding moves an
   activation by at most 1/65534 of its block's largest, far below the weights' own 8-bit
   rounding. */
#define QBLOCK 64

static int64_t blocks(int64_t n) { return (n + QBLOCK - 1) / QBLOCK; }

static void quantize16(const float *x, int16_t *q, float *scales, int64_t n) {
    for (int64_t b = 0; b < blocks(n); b++) {
        int64_t start = b * QBLOCK, end = start + QBLOCK < n ? start + QBLOCK : n;
        float top = 0.0f;
        for (int64_t i = start; i < end; i++) top = fabsf(x[i]) > top ? fabsf(x[i]) : top;
        float inv = top > 0.0f ? 32767.0f / top : 0.0f;
        scales[b] = top / 32767.0f;
        for (int64_t i = start; i < end; i++) q[i] = (int16_t)lrintf(x[i] * inv);
    }
}

/* out[j] = sum_i w[i] * q_j[i] * scale_j[block of i] for j < nr (q_j = q + j * n). */
static inline __attribute__((always_inline)) void dots_i8_n(const int8_t *w, const int16_t *q, const float *scales, int64_t n, float *out,
                             const int nr) {
    int64_t b = 0, nb = blocks(n);
    for (int j = 0; j < nr; j++) out[j] = 0.0f;
#if defined(__AVX512BW__)
    __m512 acc[GROUP];
    for (int j = 0; j < nr; j++) acc[j] = _mm512_setzero_ps();
    for (; (b + 1) * QBLOCK <= n; b++) {
        const int8_t *wb = w + b * QBLOCK;
        __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)wb));
        __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wb + 32)));
        for (int j = 0; j < nr; j++) {
            const int16_t *qb = q + j * n + b * QBLOCK;
#if defined(__AVX512VNNI__)
            __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(qb));
            s = _mm512_dpwssd_epi32(s, w1, _mm512_loadu_si512(qb + 32));
#else
            __m512i s = _mm512_add_epi32(_mm512_madd_epi16(w0, _mm512_loadu_si512(qb)),
                                         _mm512_madd_epi16(w1, _mm512_loadu_si512(qb + 32)));
#endif
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(scales[j * nb + b]), acc[j]);
        }
    }
    for (int j = 0; j < nr; j++) out[j] = _mm512_reduce_add_ps(acc[j]);
#elif defined(__AVX2__)
    __m256 acc[GROUP];
    for (int j = 0; j < nr; j++) acc[j] = _mm256_setzero_ps();
    for (; (b + 1) * QBLOCK <= n; b++) {
        const int8_t *wb = w + b * QBLOCK;
        __m256i wide[QBLOCK / 16];
        for (int k = 0; k < QBLOCK / 16; k++) wide[k] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + 16 * k)));
        for (int j = 0; j < nr; j++) {
            const int16_t *qb = q + j * n + b * QBLOCK;
            __m256i s = _mm256_setzero_si256();
            for (int k = 0; k < QBLOCK / 16; k++)
                s = _mm256_add_epi32(s, _mm256_madd_epi16(wide[k], _mm256_loadu_si256((const __m256i *)(qb + 16 * k))));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(scales[j * nb + b]), acc[j]);
        }
    }
    for (int j = 0; j < nr; j++) out[j] = sum8(acc[j]);
#endif
    for (; b < nb; b++) {
        int64_t start = b * QBLOCK, end = start + QBLOCK < n ? start + QBLOCK : n;
        for (int j = 0; j < nr; j++) {
            int32_t block = 0;
            for (int64_t i = start; i < end; i++) block += (int32_t)w[i] * q[j * n + i];
            out[j] += (float)block * scales[j * nb + b];
        }
    }
}

static void dots_i8(const int8_t *w, const int16_t *q, const float *scales, int64_t n, float *out, int nr) {
    switch (nr) {
        case 1: dots_i8_n(w, q, scales, n, out, 1); break;
        case 2: dots_i8_n(w, q, scales, n, out, 2); break;
        case 3: dots_i8_n(w, q, scales, n, out, 3); break;
        default: dots_i8_n(w, q, scales, n, out, 4); break;
    }
}

/* y[t, r] = sum_c w[r, c] * x[t, c] (times scale[r] for int8) for the `tokens` rows of x, the
   weight rows split among the threads; each weight row is read once for every token. `work`
   holds the int8 path's rounded activations (tokens * (2 * cols + 4 * blocks(cols)) bytes). */
static void matmul(const void *w, const float *scale, int kind, const float *x, float *y, int64_t tokens,
                   int64_t rows, int64_t cols, int threads, void *work) {
    int16_t *xq = work;
    float *xs = (float *)(xq + tokens * cols + (tokens * cols & 1));
    if (kind == INT8)
        for (int64_t t = 0; t < tokens; t++) quantize16(x + t * cols, xq + t * cols, xs + t * blocks(cols), cols);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t t = 0; t < tokens; t += GROUP) {
            int nr = tokens - t < GROUP ? (int)(tokens - t) : GROUP;
            float out[GROUP];
            if (kind == F16) {
                dots_f16((const uint16_t *)w + r * cols, x + t * cols, cols, cols, out, nr);
            } else if (kind == BF16) {
                const uint16_t *row = (const uint16_t *)w + r * cols;
                for (int j = 0; j < nr; j++) {
                    const float *xj = x + (t + j) * cols;
                    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                    for (int64_t c = 0; c < cols; c++) sum += widen_bf16(row[c]) * xj[c];
                    out[j] = sum;
                }
            } else {
                dots_i8((const int8_t *)w + r * cols, xq + t * cols, xs + t * blocks(cols), cols, out, nr);
                for (int j = 0; j < nr; j++) out[j] *= scale[r];
            }
            for (int j = 0; j < nr; j++) y[(t + j) * rows + r] = out[j];
        }
    }
}

static void rms_norm(const float *x, const float *weight, float *out, int64_t n, double eps) {
    float squares = 0.0f;
    for (int64_t i = 0; i < n; i++) squares += x[i] * x[i];
    float inv = 1.0f / sqrtf(squares / (float)n + (float)eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
}

/* Llama's "rotate half" with the minus sign of the first half kept in `signed_sin`. */
static void rotate(float *v, const float *cos, const float *signed_sin, int64_t d) {
    float tmp[512];
    int64_t half = d / 2;
    for (int64_t i = 0; i < d; i++) tmp[i] = v[(i + half) % d];
    for (int64_t i = 0; i < d; i++) v[i] = v[i] * cos[i] + tmp[i] * signed_sin[i];
}

static inline float dot(const float *a, const float *b, int64_t d) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; i++) s += a[i] * b[i];
    return s;
}

/* One query head against positions 0 .. n-1 of its key/value head and the `extra` slots after
   them (softmax of q.k / sqrt(d), then the weighted sum of v). */
static void attend(const float *q, const float *k, const float *v, float *out, float *scores, int64_t n,
                   const int64_t *extra, int64_t n_extra, int64_t d) {
    float scale = 1.0f / sqrtf((float)d), top = -INFINITY;
    for (int64_t t = 0; t < n + n_extra; t++) {
        int64_t at = t < n ? t : extra[t - n];
        scores[t] = dot(q, k + at * d, d) * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < n + n_extra; t++) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
    }
    float inv = 1.0f / total;
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < n + n_extra; t++) {
        float p = scores[t] * inv;
        const float *value = v + (t < n ? t : extra[t - n]) * d;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) out[i] += p * value[i];
    }
}

/* Where each part of mellow_forward's scratch memory starts, in floats, each 64-byte aligned. */
typedef struct {
    int64_t normed, qkv, mixed, delta, gate_up, scores, extra, counts, work, total;
} Layout;

static Layout layout(const Dims *dims, int64_t tokens, int64_t visible) {
    const int64_t h = dims->hidden, qkv_rows = (dims->heads + 2 * dims->kv_heads) * dims->head_dim;
    const int64_t widest = h > dims->intermediate ? h : dims->intermediate;
    const int64_t sizes[] = {
        tokens * h,                                     /* normed */
        tokens * qkv_rows,                              /* qkv */
        tokens * h,                                     /* mixed: the heads' outputs */
        tokens * h,                                     /* delta: o's and down's outputs */
        tokens * 2 * dims->intermediate,                /* gate_up */
        tokens * dims->heads * (visible + tokens),      /* scores */
        2 * tokens * tokens,                            /* extra: int64 slots each token sees */
        2 * tokens,                                     /* counts: int64 */
        tokens * (widest / 2 + 1 + blocks(widest)),     /* work: int8's rounded activations */
    };
    int64_t at[sizeof sizes / sizeof sizes[0] + 1];
    at[0] = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) at[i + 1] = at[i] + (sizes[i] + 15) / 16 * 16;
    Layout l = {at[0], at[1], at[2], at[3], at[4], at[5], at[6], at[7], at[8], at[9]};
    return l;
}

/* How many floats of scratch memory mellow_forward needs for `tokens` tokens seeing `visible`
   positions (fused.py allocates them; 16 more leave room to align the start). */
int64_t mellow_scratch_floats(const Dims *dims, int64_t tokens, int64_t visible) {
    return layout(dims, tokens, visible).total + 16;
}

/* `tokens` new tokens through the model. Token t belongs to cache row row[t], sits at rotary
   position pos[t], writes its key and value to slot[t] of that row, and sees positions
   0 .. visible-1 of the row and the slots of the tokens t' <= t of its own group[t]: a decode
   step is one token per row (slot = pos = visible), a choice is a group of tokens after a shared
   prefix. x (tokens, hidden) holds their embeddings and is overwritten (the residual stream);
   cos and signed_sin are RotaryEmbedding.span's tables (max_len, head_dim); `scratch` holds
   mellow_scratch_floats floats; logits (tokens, vocab) are written. */
void mellow_forward(const Dims *dims, void *const *p, float *x, int64_t tokens, const int64_t *row,
                    const int64_t *pos, const int64_t *slot, const int64_t *group, int64_t visible,
                    const float *cos, const float *signed_sin, float *scratch, float *logits) {
    const int64_t h = dims->hidden, d = dims->head_dim, heads = dims->heads, kvh = dims->kv_heads;
    const int64_t inter = dims->intermediate, len = dims->max_len, rowsize = kvh * len * d;
    const int kind = (int)dims->kind, threads = (int)dims->threads;
    const int64_t qkv_rows = (heads + 2 * kvh) * d;
    Layout l = layout(dims, tokens, visible);
    float *base = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *normed = base + l.normed, *qkv = base + l.qkv, *mixed = base + l.mixed, *delta = base + l.delta;
    float *gate_up = base + l.gate_up, *scores = base + l.scores;
    int64_t *extra = (int64_t *)(base + l.extra), *counts = (int64_t *)(base + l.counts);
    void *work = base + l.work;

    /* Which slots each token sees beyond `visible`: its group's tokens up to itself. */
    for (int64_t t = 0; t < tokens; t++) {
        counts[t] = 0;
        for (int64_t u = 0; u <= t; u++)
            if (group[u] == group[t]) extra[t * tokens + counts[t]++] = slot[u];
    }

    for (int64_t l = 0; l < dims->layers; l++) {
        void *const *w = p + l * PER_LAYER;
        float *k_cache = w[K_CACHE], *v_cache = w[V_CACHE];
        for (int64_t t = 0; t < tokens; t++) rms_norm(x + t * h, w[NORM_IN], normed + t * h, h, dims->eps);
        matmul(w[QKV], w[QKV_S], kind, normed, qkv, tokens, qkv_rows, h, threads, work);
        for (int64_t t = 0; t < tokens; t++) {
            float *own = qkv + t * qkv_rows;
            for (int64_t j = 0; j < heads + kvh; j++) rotate(own + j * d, cos + pos[t] * d, signed_sin + pos[t] * d, d);
            for (int64_t j = 0; j < kvh; j++) {
                memcpy(k_cache + row[t] * rowsize + (j * len + slot[t]) * d, own + (heads + j) * d, d * sizeof(float));
                memcpy(v_cache + row[t] * rowsize + (j * len + slot[t]) * d, own + (heads + kvh + j) * d, d * sizeof(float));
            }
        }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t task = 0; task < tokens * heads; task++) {
            int64_t t = task / heads, j = task % heads;
            int64_t g = j / (heads / kvh);  /* q head j reads kv head g, as SDPA's enable_gqa */
            const float *k = k_cache + row[t] * rowsize + g * len * d, *v = v_cache + row[t] * rowsize + g * len * d;
            attend(qkv + t * qkv_rows + j * d, k, v, mixed + t * h + j * d, scores + task * (visible + tokens),
                   visible, extra + t * tokens, counts[t], d);
        }
        matmul(w[O], w[O_S], kind, mixed, delta, tokens, h, h, threads, work);
        for (int64_t i = 0; i < tokens * h; i++) x[i] += delta[i];
        for (int64_t t = 0; t < tokens; t++) rms_norm(x + t * h, w[NORM_POST], normed + t * h, h, dims->eps);
        matmul(w[GATE_UP], w[GATE_UP_S], kind, normed, gate_up, tokens, 2 * inter, h, threads, work);
        for (int64_t t = 0; t < tokens; t++) {
            float *gu = gate_up + t * 2 * inter, *a = gate_up + t * inter;  /* packed in place, in order */
            for (int64_t i = 0; i < inter; i++) {
                float g = gu[i];
                a[i] = g / (1.0f + expf(-g)) * gu[inter + i];
            }
        }
        matmul(w[DOWN], w[DOWN_S], kind, gate_up, delta, tokens, h, inter, threads, work);
        for (int64_t i = 0; i < tokens * h; i++) x[i] += delta[i];
    }
    void *const *last = p + dims->layers * PER_LAYER;
    for (int64_t t = 0; t < tokens; t++) rms_norm(x + t * h, last[0], normed + t * h, h, dims->eps);
    matmul(last[1], last[2], kind, normed, logits, tokens, dims->vocab, h, threads, work);
}
