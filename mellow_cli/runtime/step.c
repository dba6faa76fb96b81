/* The language model (runtime/llama.py) over a few new tokens against its KV cache, in plain C:
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
   rounded to 16-bit integers (see quantize16).

   Further down, the pieces of a layer over many positions (a prefill, the choices of a batch)
   that passes.py calls between oneDNN's products: attention for many queries
   (mellow_attention), and the norms, rotary, SwiGLU and residual sums around bfloat16
   products. */

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
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

/* float16 to float32, exact. Compilers differ in how they offer it (clang before 15 has no
   _Float16 on x86), so by F16C's instruction, by _Float16 where the compiler has it, else from
   the bits. */
static inline float widen_f16(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__FLT16_MANT_DIG__)
    _Float16 f;
    memcpy(&f, &h, sizeof f);
    return (float)f;
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13);  /* inf, NaN */
    } else if (exponent) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);  /* rebias 15 -> 127 */
    } else {
        f = (float)mantissa * 0x1p-24f;  /* zero and subnormals: mantissa * 2^-24, exact */
        memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    }
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* float32 to bfloat16, rounded to nearest even as torch's .to(torch.bfloat16) (NaN stays NaN). */
static inline uint16_t round_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static void round_bf16s(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = round_bf16(x[i]);
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

/* Which slots each token sees beyond the positions of its row it sees: those of its group's
   tokens up to itself (extra: tokens x tokens, counts: tokens). A token of no group (group < 0,
   a query whose key no token reads) sees none, not even its own. */
static void group_slots(int64_t tokens, const int64_t *slot, const int64_t *group, int64_t *extra, int64_t *counts) {
    for (int64_t t = 0; t < tokens; t++) {
        counts[t] = 0;
        for (int64_t u = 0; u <= t && group[t] >= 0; u++)
            if (group[u] == group[t]) extra[t * tokens + counts[t]++] = slot[u];
    }
}

/* Every head of every token (queries at q + t * q_stride + head * d) against positions
   0 .. seen[t]-1 of its cache row (0 .. visible-1 for every token without `seen`; seen[t] <=
   visible) and its extra slots (group_slots); out (tokens, heads * d); scores: tokens * heads *
   (visible + tokens) floats. */
static void attend_tokens(const float *q, int64_t q_stride, int64_t tokens, const int64_t *row, const int64_t *extra,
                          const int64_t *counts, int64_t visible, const int64_t *seen, const float *k_cache,
                          const float *v_cache, int64_t kvh, int64_t len, int64_t heads, int64_t d, float *out,
                          float *scores, int threads) {
    const int64_t rowsize = kvh * len * d;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < tokens * heads; task++) {
        int64_t t = task / heads, j = task % heads;
        int64_t g = j / (heads / kvh);  /* q head j reads kv head g, as SDPA's enable_gqa */
        const float *k = k_cache + row[t] * rowsize + g * len * d, *v = v_cache + row[t] * rowsize + g * len * d;
        attend(q + t * q_stride + j * d, k, v, out + (t * heads + j) * d, scores + task * (visible + tokens),
               seen ? seen[t] : visible, extra + t * tokens, counts[t], d);
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
   0 .. seen[t]-1 of the row (0 .. visible-1 without `seen`; seen[t] <= visible) and the slots of
   the tokens t' <= t of its own group[t] (none for a group < 0): a decode step is one token per
   row (slot = pos = visible when every row's prefix has one length), a choice is a group of
   tokens after a shared prefix. x (tokens, hidden) holds their embeddings and is overwritten (the residual stream);
   cos and signed_sin are RotaryEmbedding.span's tables (max_len, head_dim); `scratch` holds
   mellow_scratch_floats floats; logits (tokens, vocab) are written. */
void mellow_forward(const Dims *dims, void *const *p, float *x, int64_t tokens, const int64_t *row,
                    const int64_t *pos, const int64_t *slot, const int64_t *group, int64_t visible,
                    const int64_t *seen, const float *cos, const float *signed_sin, float *scratch, float *logits) {
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

    group_slots(tokens, slot, group, extra, counts);

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
        attend_tokens(qkv, qkv_rows, tokens, row, extra, counts, visible, seen, k_cache, v_cache, kvh, len, heads,
                      d, mixed, scores, threads);
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

/* ---- Attention for many queries (a prefill, answer choices) ------------------------------------

   Written with the compiler's vector types (GCC and clang) rather than intrinsics: one source
   that becomes 512-bit instructions where the CPU has them, pairs of 256-bit ones where it has
   AVX2, and narrower ones elsewhere. */

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  /* the vector types never cross this file's boundary */
#endif
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vf_u __attribute__((vector_size(64), aligned(4)));  /* unaligned loads and stores */
#define LANES 16
#define TILE 8  /* (query, head) pairs scored together */

/* e^x lane by lane (Cephes' expf: 2^n times a polynomial on [-ln2/2, ln2/2]), within 2 ulp;
   x below -87 gives about 1e-38 rather than 0 (callers zero masked lanes themselves). */
/* a where mask (all ones or zeros per lane), else b */
static inline __attribute__((always_inline)) vf select_lanes(vi mask, vf a, vf b) {
    return (vf)(((vi)a & mask) | ((vi)b & ~mask));
}

static inline __attribute__((always_inline)) vf exp_lanes(vf x) {
    const vf hi = (vf){0} + 88.3f, lo = (vf){0} - 87.3f;
    x = select_lanes(x > hi, hi, x);
    x = select_lanes(x < lo, lo, x);
    vf fx = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(fx, vi);  /* truncates toward zero: make it floor */
    vf nf = __builtin_convertvector(n, vf);
    vi down = nf > fx;
    nf = nf + __builtin_convertvector(down, vf);  /* down is -1 where truncation went up */
    n = n + down;
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi bits = (n + 127) << 23;
    vf two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static inline __attribute__((always_inline)) vf load_lanes(const float *p) { return *(const vf_u *)p; }
static inline __attribute__((always_inline)) void store_lanes(float *p, vf v) { *(vf_u *)p = v; }

static int64_t padded(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

typedef uint16_t vh __attribute__((vector_size(32), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint32_t vu_u __attribute__((vector_size(64), aligned(4)));

static inline __attribute__((always_inline)) vf widen_bf16_lanes(const uint16_t *p) {
    return (vf)(__builtin_convertvector(*(const vh *)p, vu) << 16);
}

/* x rounded to bfloat16 as round_bf16 does, each in the low half of its 32-bit lane. */
static inline __attribute__((always_inline)) vu bf16_bits_lanes(vf x) {
    vu bits = (vu)x, nan = (vu)((bits & 0x7fffffffu) > 0x7f800000u);
    vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (rounded & ~nan) | (((bits >> 16) | 0x40u) & nan);
}

static inline __attribute__((always_inline)) void round_bf16_lanes(uint16_t *p, vf x) {
    *(vh *)p = __builtin_convertvector(bf16_bits_lanes(x), vh);
}


/* Which keys a (query, head) pair sees: keys 0 .. seen-1 of its cache row but those in
   [hole_from, hole_to) (answer choices: the other choices' slots between the prefix and its own). */
typedef struct {
    int64_t seen, hole_from, hole_to;
} Keys;

/* Scores of the pairs r < TILE (query pointers q[r]) against keys 0 .. n-1 transposed to kt
   (head_dim, stride), times scale, into scores[r * stride + j]. */
static void score_tile(const float *const *q, const float *kt, int64_t stride, int64_t d, int64_t n, float scale,
                       float *scores) {
    for (int64_t j = 0; j < n; j += LANES) {
        vf acc[TILE] = {0};
        for (int64_t i = 0; i < d; i++) {
            vf k = load_lanes(kt + i * stride + j);
            for (int r = 0; r < TILE; r++) acc[r] += q[r][i] * k;
        }
        for (int r = 0; r < TILE; r++) store_lanes(scores + r * stride + j, acc[r] * scale);
    }
}

/* Softmax of the first `reals` rows of scores, unnormalized (e^(s - max)), each over the keys it
   sees (keys[r]), zero elsewhere up to padded(n); 1 / their sums into inv (0 for the others). */
static void softmax_tile(const Keys *keys, int64_t n, int64_t stride, float *scores, int64_t reals, float *inv) {
    vf iota;
    for (int u = 0; u < LANES; u++) iota[u] = (float)u;
    const vf minus_inf = (vf){0} - INFINITY;
    for (int r = 0; r < reals; r++) {
        float *s = scores + r * stride, top = -INFINITY, total = 0.0f;
        const int64_t seen = keys[r].seen, from = keys[r].hole_from, to = keys[r].hole_to;
        for (int64_t j = from; j < to && j < seen; j++) s[j] = -INFINITY;  /* weighs nothing below */
        const int64_t full = seen / LANES * LANES;
        const vi inside = iota < (float)(seen - full);  /* the keys of the last, partial chunk it sees */
        vf tops = minus_inf, totals = {0};
        for (int64_t j = 0; j < full; j += LANES) {
            vf x = load_lanes(s + j);
            tops = select_lanes(x > tops, x, tops);
        }
        if (full < seen) {
            vf x = select_lanes(inside, load_lanes(s + full), minus_inf);
            tops = select_lanes(x > tops, x, tops);
        }
        for (int u = 0; u < LANES; u++) top = tops[u] > top ? tops[u] : top;
        for (int64_t j = 0; j < padded(seen); j += LANES) {
            vf e = exp_lanes(load_lanes(s + j) - top);
            if (j == full) e = select_lanes(inside, e, (vf){0});  /* causal: keys after the query */
            if (j + LANES > from && j < to) {  /* the hole: exp_lanes gives 1e-38 for -inf, not 0 */
                vf at = iota + (float)j;
                e = select_lanes(at >= (float)from, select_lanes(at < (float)to, (vf){0}, e), e);
            }
            totals += e;
            store_lanes(s + j, e);
        }
        for (int u = 0; u < LANES; u++) total += totals[u];
        for (int64_t j = padded(seen); j < padded(n); j++) s[j] = 0.0f;
        inv[r] = 1.0f / total;
    }
    for (int r = reals; r < TILE; r++) inv[r] = 0.0f;
}

/* out[r] = inv[r] * sum_j scores[r * stride + j] * v[j] over keys 0 .. n-1 (v: (positions, d)). */
static void weigh_tile(const float *scores, int64_t stride, const float *v, int64_t d, int64_t n, const float *inv,
                       int64_t reals, float *const *out) {
    for (int64_t c = 0; c < d; c += LANES) {
        vf acc[TILE] = {0};
        for (int64_t j = 0; j < n; j++) {
            vf value = load_lanes(v + j * d + c);
            for (int r = 0; r < TILE; r++) acc[r] += scores[r * stride + j] * value;
        }
        for (int r = 0; r < reals; r++) store_lanes(out[r] + c, acc[r] * inv[r]);
    }
}

#if defined(__AVX512BF16__)
/* With AVX512-BF16, where the heads' outputs are rounded to bfloat16 for a bfloat16 product
   anyway, the two dot products take bfloat16 inputs (one instruction multiplies pairs and adds
   both to float32 sums, twice float32's work per instruction): q and k rounded to bfloat16 for
   the scores, the softmax's weights for the values. The values are rounded too, which leaves
   them as they are: they are the bfloat16 product's own outputs. The sums and the softmax stay
   float32. */
#define BF16_DOTS 1
#define BF16_MAX_D 256

/* score_tile with q and k rounded to bfloat16: keys in pairs of dimensions,
   kp[((i / 2) * stride + j) * 2 + i % 2] = k[j][i]. */
static void score_tile_bf16(const float *const *q, const uint16_t *kp, int64_t stride, int64_t d, int64_t n,
                            float scale, float *scores) {
    uint32_t pairs[TILE][BF16_MAX_D / 2];  /* q[r][i], q[r][i + 1] rounded: pairs[r][i / 2] */
    for (int r = 0; r < TILE; r++)
        for (int64_t i = 0; i < d; i += LANES) round_bf16_lanes((uint16_t *)pairs[r] + i, load_lanes(q[r] + i));
    for (int64_t j = 0; j < n; j += LANES) {
        __m512 acc[TILE];
        for (int r = 0; r < TILE; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t i = 0; i < d / 2; i++) {
            __m512bh k = (__m512bh)_mm512_loadu_si512(kp + (i * stride + j) * 2);
            for (int r = 0; r < TILE; r++) acc[r] = _mm512_dpbf16_ps(acc[r], k, (__m512bh)_mm512_set1_epi32((int)pairs[r][i]));
        }
        for (int r = 0; r < TILE; r++) _mm512_storeu_ps(scores + r * stride + j, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
    }
}

/* weigh_tile with the weights rounded to bfloat16 (into `rounded`, TILE rows of stride): values
   in pairs of keys, vp[((j / 2) * d + c) * 2 + j % 2] = v[j][c]. */
static void weigh_tile_bf16(const float *scores, int64_t stride, const uint16_t *vp, int64_t d, int64_t n,
                            const float *inv, int64_t reals, float *const *out, uint16_t *rounded) {
    const int64_t pairs = (n + 1) / 2;
    for (int r = 0; r < TILE; r++)
        for (int64_t j = 0; j < padded(n); j += LANES) round_bf16_lanes(rounded + r * stride + j, load_lanes(scores + r * stride + j));
    for (int64_t c = 0; c < d; c += LANES) {
        __m512 acc[TILE];
        for (int r = 0; r < TILE; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t j = 0; j < pairs; j++) {
            __m512bh value = (__m512bh)_mm512_loadu_si512(vp + (j * d + c) * 2);
            for (int r = 0; r < TILE; r++) {
                uint32_t w;
                memcpy(&w, rounded + r * stride + 2 * j, sizeof w);
                acc[r] = _mm512_dpbf16_ps(acc[r], value, (__m512bh)_mm512_set1_epi32((int)w));
            }
        }
        for (int r = 0; r < reals; r++) _mm512_storeu_ps(out[r] + c, _mm512_mul_ps(acc[r], _mm512_set1_ps(inv[r])));
    }
}
#else
#define BF16_DOTS 0
#define BF16_MAX_D 0
#endif

/* Runs of consecutive tokens on the same cache row, the tiles of their (query, head) pairs
   per key/value head, and the longest a run's keys go: where mellow_attention's work lies. */
typedef struct {
    int64_t runs, tasks, stride;
} Plan;

static Plan plan(int64_t n, const int64_t *row, const Keys *keys, int64_t group, int64_t kv_heads, int64_t *run_start,
                 int64_t *task_run, int64_t *task_tile) {
    Plan p = {0, 0, 0};
    for (int64_t t = 0; t < n; t++) {
        if (t == 0 || row[t] != row[t - 1]) run_start[p.runs++] = t;
        p.stride = keys[t].seen > p.stride ? keys[t].seen : p.stride;
    }
    run_start[p.runs] = n;
    p.stride = padded(p.stride);
    /* Later queries see more keys: their tiles go first, so the longest work starts early. */
    for (int64_t r = 0; r < p.runs; r++) {
        const int64_t tiles = ((run_start[r + 1] - run_start[r]) * group + TILE - 1) / TILE;
        for (int64_t g = 0; g < kv_heads; g++)
            for (int64_t back = 0; back < tiles; back++) {
                task_run[p.tasks] = r * kv_heads + g;
                task_tile[p.tasks++] = tiles - 1 - back;
            }
    }
    return p;
}

/* Floats of scratch memory mellow_attention needs for n tokens in `runs` runs of one cache row,
   seeing at most `visible` keys. */
int64_t mellow_attention_scratch_floats(int64_t n, int64_t runs, int64_t kv_heads, int64_t head_dim, int64_t visible,
                                        int64_t heads, int64_t threads) {
    const int64_t tiles = runs * kv_heads + (n * heads + TILE - 1) / TILE;
    return runs * kv_heads * head_dim * padded(visible) + threads * TILE * (2 * padded(visible) + head_dim)
           + 2 * (n + 1) + 4 * tiles + 6 * n + 16;  /* + run starts, tasks, keys: int64, two floats each */
}

/* Grouped-query attention of n tokens (queries at q + t * q_token, heads contiguous, each
   head_dim floats) against the caches (rows, kv_heads, max_len, head_dim): token t reads cache
   row row[t] and sees its keys 0 .. seen[t]-1 but [hole_from[t], hole_to[t]). A prefill is every
   row's next positions (seen: the position + 1, no hole); answer choices are tokens after a
   shared prefix, each also seeing its own choice's earlier tokens. Tokens of one row must be
   consecutive, `runs` stretches of them at most (as mellow_attention_scratch_floats was told).
   out (n, heads, head_dim): float32, or bfloat16 (rounded to nearest even) with
   `out_bf16`. Query head h reads key/value head h / (heads / kv_heads), as SDPA's enable_gqa.
   head_dim must be a multiple of 16 (passes.py checks).

   Eight (query, head) pairs of one key/value head are scored against sixteen keys at a time,
   from keys transposed once per row and head, every sum and the softmax in float32: torch's
   flash kernel takes about twice as long at a prefix's sizes (64-wide heads). */
void mellow_attention(const float *q, int64_t q_token, int64_t n, int64_t runs, const int64_t *row, const int64_t *seen,
                      const int64_t *hole_from, const int64_t *hole_to, const float *k_cache, const float *v_cache,
                      int64_t kv_heads, int64_t max_len, int64_t heads, int64_t d, void *out, int64_t out_bf16,
                      float *scratch, int64_t threads) {
    const int64_t group = heads / kv_heads;
    const float scale = 1.0f / sqrtf((float)d);
    const int bf16_dots = BF16_DOTS && out_bf16 && d <= BF16_MAX_D;
    int64_t visible = 0;
    for (int64_t t = 0; t < n; t++) visible = seen[t] > visible ? seen[t] : visible;
    const int64_t tiles_most = runs * kv_heads + (n * heads + TILE - 1) / TILE;
    float *kts = scratch, *tile_scores = kts + runs * kv_heads * d * padded(visible);
    int64_t *run_start = (int64_t *)(tile_scores + threads * TILE * (2 * padded(visible) + d));
    int64_t *task_run = run_start + n + 1, *task_tile = task_run + tiles_most;
    Keys *keys = (Keys *)(task_tile + tiles_most);
    int64_t found = 0;
    for (int64_t t = 0; t < n; t++) {
        keys[t] = (Keys){seen[t], hole_from[t], hole_to[t]};
        found += t == 0 || row[t] != row[t - 1];
    }
    if (found > runs) return;  /* more than the scratch was sized for: passes.py counts them first */
    const Plan p = plan(n, row, keys, group, kv_heads, run_start, task_run, task_tile);

#pragma omp parallel num_threads((int)threads)
    {
#pragma omp for schedule(static)
        for (int64_t rg = 0; rg < p.runs * kv_heads; rg++) {
            const int64_t r = rg / kv_heads, g = rg % kv_heads;
            const float *k = k_cache + (row[run_start[r]] * kv_heads + g) * max_len * d;
            float *kt = kts + rg * d * p.stride;
            int64_t most = 0;
            for (int64_t t = run_start[r]; t < run_start[r + 1]; t++) most = seen[t] > most ? seen[t] : most;
            if (bf16_dots) {
                /* The same room holds k in pairs of dimensions, then v in pairs of keys, both
                   bfloat16 (see score_tile_bf16, weigh_tile_bf16); zeros past the keys seen. */
                uint32_t *kp = (uint32_t *)kt, *vp = kp + d / 2 * p.stride, key[BF16_MAX_D / 2];
                const float *v = v_cache + (row[run_start[r]] * kv_heads + g) * max_len * d;
                for (int64_t j = 0; j < most; j++) {
                    for (int64_t i = 0; i < d; i += LANES) round_bf16_lanes((uint16_t *)key + i, load_lanes(k + j * d + i));
                    for (int64_t i = 0; i < d / 2; i++) kp[i * p.stride + j] = key[i];
                }
                for (int64_t i = 0; i < d / 2; i++) memset(kp + i * p.stride + most, 0, (p.stride - most) * sizeof *kp);
                for (int64_t j = 0; j < p.stride; j += 2)
                    for (int64_t i = 0; i < d; i += LANES) {
                        const vf zero = {0};
                        vu even = bf16_bits_lanes(j < most ? load_lanes(v + j * d + i) : zero);
                        vu odd = bf16_bits_lanes(j + 1 < most ? load_lanes(v + (j + 1) * d + i) : zero);
                        *(vu_u *)(vp + j / 2 * d + i) = even | odd << 16;
                    }
                continue;
            }
            for (int64_t i = 0; i < d; i++) {
                for (int64_t j = 0; j < most; j++) kt[i * p.stride + j] = k[j * d + i];
                for (int64_t j = most; j < p.stride; j++) kt[i * p.stride + j] = 0.0f;
            }
        }
        float *mine = tile_scores;
#ifdef _OPENMP
        mine += (int64_t)omp_get_thread_num() * TILE * (2 * p.stride + d);
#endif
        float *rounding = mine + TILE * p.stride;  /* a tile's outputs before bfloat16 */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < p.tasks; task++) {
            const int64_t rg = task_run[task], r = rg / kv_heads, g = rg % kv_heads, tile = task_tile[task];
            const int64_t first = run_start[r], pairs = (run_start[r + 1] - first) * group;
            const float *qs[TILE];
            float *outs[TILE];
            Keys sees[TILE];
            int64_t at[TILE], reals = 0;
            for (int i = 0; i < TILE; i++) {
                const int64_t pair = tile * TILE + i < pairs ? tile * TILE + i : pairs - 1;
                const int64_t t = first + pair / group, h = g * group + pair % group;
                reals += tile * TILE + i < pairs;
                qs[i] = q + t * q_token + h * d;
                at[i] = (t * heads + h) * d;
                outs[i] = out_bf16 ? rounding + i * d : (float *)out + at[i];
                sees[i] = keys[t];
            }
            const float *kt = kts + rg * d * p.stride;
            int64_t most = 0;
            float inv[TILE];
            for (int i = 0; i < reals; i++) most = sees[i].seen > most ? sees[i].seen : most;
#if BF16_DOTS
            if (bf16_dots) {
                uint16_t *weights = (uint16_t *)(rounding + TILE * d);  /* the softmax's, in bfloat16 */
                score_tile_bf16(qs, (const uint16_t *)kt, p.stride, d, most, scale, mine);
                softmax_tile(sees, most, p.stride, mine, reals, inv);
                weigh_tile_bf16(mine, p.stride, (const uint16_t *)kt + d * p.stride, d, most, inv, reals, outs, weights);
            } else
#endif
            {
                score_tile(qs, kt, p.stride, d, most, scale, mine);
                softmax_tile(sees, most, p.stride, mine, reals, inv);
                weigh_tile(mine, p.stride, v_cache + (row[first] * kv_heads + g) * max_len * d, d, most, inv, reals, outs);
            }
            if (out_bf16)
                for (int i = 0; i < reals; i++) round_bf16s(outs[i], (uint16_t *)out + at[i], d);
        }
    }
}

/* Whether this build shares its loops among threads (OpenMP); a compiler without it (Apple's
   clang, clang without libomp) builds every function for one thread. */
int mellow_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Whether mellow_attention takes bfloat16 dot products for bfloat16 outputs here (AVX512-BF16):
   passes.bfloat16_dots says what it then computes. */
int mellow_attention_bf16_dots(void) { return BF16_DOTS; }

/* Whether mellow_attention's 16-lane vectors are the CPU's own registers here: built without
   AVX512 the compiler splits each into several narrower ones and spills the tile, and torch's
   kernel is the faster one (passes.py then keeps it). */
int mellow_attention_native(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* ---- The rest of a prefill layer, between oneDNN's bfloat16 products -------------------------

   Where a precision multiplies several rows in bfloat16, a prefill's layer is four products and,
   between them, about twenty elementwise torch operations over every position, each a pass over
   memory, several of them only widening the products' bfloat16 outputs to float32 and rounding
   the next product's inputs back. These do the same arithmetic in a pass or two: passes.py's
   PrefillLayer calls them between the products. Every sum stays in float32 as in llama.py;
   bfloat16 appears exactly where the products round their inputs and outputs. */

/* One position: x + widen(y) into sum (when y), then RMSNorm(sum) * weight rounded to bfloat16
   into normed (when weight). */
static void add_norm_row(const float *x, const uint16_t *y, const float *weight, float eps, float *sum,
                         uint16_t *normed, int64_t h) {
    const int64_t full = h / LANES * LANES;
    if (y != NULL) {
        for (int64_t i = 0; i < full; i += LANES) store_lanes(sum + i, load_lanes(x + i) + widen_bf16_lanes(y + i));
        for (int64_t i = full; i < h; i++) sum[i] = x[i] + widen_bf16(y[i]);
        x = sum;
    }
    if (weight == NULL) return;
    vf squares = {0};
    for (int64_t i = 0; i < full; i += LANES) squares += load_lanes(x + i) * load_lanes(x + i);
    float total = 0.0f;
    for (int u = 0; u < LANES; u++) total += squares[u];
    for (int64_t i = full; i < h; i++) total += x[i] * x[i];
    const float inv = 1.0f / sqrtf(total / (float)h + eps);
    for (int64_t i = 0; i < full; i += LANES) round_bf16_lanes(normed + i, load_lanes(x + i) * inv * load_lanes(weight + i));
    for (int64_t i = full; i < h; i++) normed[i] = round_bf16(x[i] * inv * weight[i]);
}

/* For each of n positions (rows of h): sum = x + y (y bfloat16; none: sum is x) and
   normed = bfloat16(RMSNorm(sum) * weight) (no weight: no norm). */
void mellow_add_norm(const float *x, const uint16_t *y, const float *weight, double eps, float *sum,
                     uint16_t *normed, int64_t n, int64_t h, int64_t threads) {
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t t = 0; t < n; t++)
        add_norm_row(x + t * h, y == NULL ? NULL : y + t * h, weight, (float)eps, sum + t * h,
                     normed == NULL ? NULL : normed + t * h, h);
}

/* q, k, v of n tokens as the qkv product wrote them (bfloat16, (n, heads + 2 kv_heads, d)): q
   and k rotated into qk (float32, (n, heads + kv_heads, d)) with row pos[t] of the rotary tables
   (RotaryEmbedding.span's cos and signed sine, (positions, d)), and k and v stored at slot[t] of
   cache row row[t] (caches (rows, kv_heads, max_len, d)). */
void mellow_rotate_store(const uint16_t *qkv, int64_t n, const int64_t *pos, const int64_t *row, const int64_t *slot,
                         int64_t heads, int64_t kv_heads, int64_t d, const float *cos, const float *signed_sin,
                         float *qk, float *k_cache, float *v_cache, int64_t max_len, int64_t threads) {
    const int64_t half = d / 2, rotated = heads + kv_heads, all = heads + 2 * kv_heads;
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t t = 0; t < n; t++) {
        const uint16_t *in = qkv + t * all * d;
        float *out = qk + t * rotated * d;
        const float *c = cos + pos[t] * d, *s = signed_sin + pos[t] * d;
        for (int64_t j = 0; j < rotated; j++) {
            const uint16_t *head = in + j * d;
            float *o = out + j * d;
            /* The two halves apart, each a plain loop the compiler vectorizes (a modulo would not). */
            for (int64_t i = 0; i < half; i++) o[i] = widen_bf16(head[i]) * c[i] + widen_bf16(head[i + half]) * s[i];
            for (int64_t i = half; i < d; i++) o[i] = widen_bf16(head[i]) * c[i] + widen_bf16(head[i - half]) * s[i];
        }
        for (int64_t j = 0; j < kv_heads; j++) {
            float *k = k_cache + ((row[t] * kv_heads + j) * max_len + slot[t]) * d;
            float *v = v_cache + ((row[t] * kv_heads + j) * max_len + slot[t]) * d;
            memcpy(k, out + (heads + j) * d, d * sizeof(float));
            for (int64_t i = 0; i < d; i++) v[i] = widen_bf16(in[(rotated + j) * d + i]);
        }
    }
}

/* SwiGLU of n positions: out = bfloat16(silu(gate) * up), gate and up the two halves of each
   row of the gate_up product's bfloat16 output (n, 2 inter). */
void mellow_swiglu(const uint16_t *gate_up, uint16_t *out, int64_t n, int64_t inter, int64_t threads) {
    const int64_t full = inter / LANES * LANES;
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t t = 0; t < n; t++) {
        const uint16_t *gate = gate_up + t * 2 * inter, *up = gate + inter;
        uint16_t *o = out + t * inter;
        for (int64_t i = 0; i < full; i += LANES) {
            vf g = widen_bf16_lanes(gate + i);
            round_bf16_lanes(o + i, g / (1.0f + exp_lanes(-g)) * widen_bf16_lanes(up + i));
        }
        for (int64_t i = full; i < inter; i++) {
            float g = widen_bf16(gate[i]);
            o[i] = round_bf16(g / (1.0f + expf(-g)) * widen_bf16(up[i]));
        }
    }
}
