/* One decode step of the language model (model/llama.py) for one row, in plain C.

   Why: in eager torch a step is about 25 small operations per layer, each a few microseconds of
   dispatch, around matrix-vector products that themselves take about 10 ms; this does the whole
   step in one call, the products reading half-precision or 8-bit weights and summing in float32.
   fused.py compiles it on the user's machine for that machine's instruction set (-march=native)
   and falls back to the torch step if it cannot.

   The arithmetic is llama.py's: RMSNorm, q/k/v as one matrix, rotary ("rotate half", with the
   signed sine table of RotaryEmbedding.span), grouped-query attention over the float32 KV cache
   that the torch prefill filled (laid out (kv_heads, max_len, head_dim) per layer), the output
   projection, SwiGLU, the last norm and the head. Activations stay float32 throughout, and
   half-precision weights are widened as they are read; int8 weights meet the activations rounded
   to 16-bit integers (see quantize16). */

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX512BW__)
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

static inline float widen_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* sum_i w[i] * x[i] for float16 w. Compilers do not vectorize the conversion by themselves
   (without AVX512-FP16), so it is spelled out for AVX512 and for AVX2 with F16C. */
static inline float dot_f16(const uint16_t *w, const float *x, int64_t n) {
    float sum = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        a = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i))), _mm512_loadu_ps(x + i), a);
        b = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i + 16))),
                            _mm512_loadu_ps(x + i + 16), b);
    }
    sum = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
#elif defined(__F16C__) && defined(__FMA__)
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))), _mm256_loadu_ps(x + i), a);
        b = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8))), _mm256_loadu_ps(x + i + 8), b);
    }
    __m256 c = _mm256_add_ps(a, b);
    __m128 d = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
    d = _mm_add_ps(d, _mm_movehl_ps(d, d));
    sum = _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
#endif
    for (; i < n; i++) {
        _Float16 h;
        memcpy(&h, w + i, sizeof h);
        sum += (float)h * x[i];
    }
    return sum;
}

/* int8 weights meet the activations rounded to 16-bit integers, one scale per block of QBLOCK:
   integer products (two instructions per 32 weights on AVX512) where widening every weight to
   float would make the step compute-bound. The rounding moves an activation by at most 1/65534
   of its block's largest, far below the weights' own 8-bit rounding. */
#define QBLOCK 64

static void quantize16(const float *x, int16_t *q, float *scales, int64_t n) {
    for (int64_t b = 0; b * QBLOCK < n; b++) {
        int64_t start = b * QBLOCK, end = start + QBLOCK < n ? start + QBLOCK : n;
        float top = 0.0f;
        for (int64_t i = start; i < end; i++) top = fabsf(x[i]) > top ? fabsf(x[i]) : top;
        float inv = top > 0.0f ? 32767.0f / top : 0.0f;
        scales[b] = top / 32767.0f;
        for (int64_t i = start; i < end; i++) q[i] = (int16_t)lrintf(x[i] * inv);
    }
}

static inline float dot_i8(const int8_t *w, const int16_t *q, const float *scales, int64_t n) {
    float sum = 0.0f;
    int64_t b = 0;
#if defined(__AVX512BW__)
    __m512 acc = _mm512_setzero_ps();
    for (; (b + 1) * QBLOCK <= n; b++) {
        const int8_t *wb = w + b * QBLOCK;
        const int16_t *qb = q + b * QBLOCK;
        __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)wb));
        __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wb + 32)));
#if defined(__AVX512VNNI__)
        __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(qb));
        s = _mm512_dpwssd_epi32(s, w1, _mm512_loadu_si512(qb + 32));
#else
        __m512i s = _mm512_add_epi32(_mm512_madd_epi16(w0, _mm512_loadu_si512(qb)),
                                     _mm512_madd_epi16(w1, _mm512_loadu_si512(qb + 32)));
#endif
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(scales[b]), acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; b * QBLOCK < n; b++) {
        int64_t start = b * QBLOCK, end = start + QBLOCK < n ? start + QBLOCK : n;
        int32_t block = 0;
        for (int64_t i = start; i < end; i++) block += (int32_t)w[i] * q[i];
        sum += (float)block * scales[b];
    }
    return sum;
}

/* y[r] = sum_c w[r, c] * x[c] (times scale[r] for int8), rows split among the threads; `work`
   holds the int8 path's rounded activations (2 * cols + 4 * (cols / QBLOCK + 1) bytes). */
static void matvec(const void *w, const float *scale, int kind, const float *x, float *y, int64_t rows,
                   int64_t cols, int threads, void *work) {
    int16_t *xq = work;
    float *xs = (float *)(xq + cols + (cols & 1));
    if (kind == INT8) quantize16(x, xq, xs, cols);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float sum = 0.0f;
        if (kind == F16) {
            sum = dot_f16((const uint16_t *)w + r * cols, x, cols);
        } else if (kind == BF16) {
            const uint16_t *row = (const uint16_t *)w + r * cols;
#pragma omp simd reduction(+ : sum)
            for (int64_t c = 0; c < cols; c++) sum += widen_bf16(row[c]) * x[c];
        } else {
            sum = dot_i8((const int8_t *)w + r * cols, xq, xs, cols) * scale[r];
        }
        y[r] = sum;
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

/* One query head against positions 0 .. n-1 of its key/value head (softmax of q.k / sqrt(d), then
   the weighted sum of v). */
static void attend(const float *q, const float *k, const float *v, float *out, float *scores, int64_t n,
                   int64_t d) {
    float scale = 1.0f / sqrtf((float)d), top = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        float s = 0.0f;
        const float *key = k + t * d;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < d; i++) s += q[i] * key[i];
        scores[t] = s * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < n; t++) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
    }
    float inv = 1.0f / total;
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        float p = scores[t] * inv;
        const float *value = v + t * d;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) out[i] += p * value[i];
    }
}

/* x (hidden) holds the token's embedding and is overwritten (the residual stream); `cos`,
   `signed_sin` are the rotary rows of position `pos`; `scratch` holds at least
   hidden * 3 + (heads + 2 * kv_heads) * head_dim + intermediate * 2 + max(hidden, intermediate)
   + heads * max_len + 16 floats; logits (vocab) are written. */
void mellow_step(const Dims *dims, void *const *p, float *x, int64_t pos, const float *cos,
                 const float *signed_sin, float *scratch, float *logits) {
    const int64_t h = dims->hidden, d = dims->head_dim, heads = dims->heads, kvh = dims->kv_heads;
    const int64_t inter = dims->intermediate, len = dims->max_len, n = pos + 1;
    const int kind = (int)dims->kind, threads = (int)dims->threads;
    const int64_t qkv_rows = (heads + 2 * kvh) * d;
    float *normed = scratch, *qkv = normed + h, *mixed = qkv + qkv_rows, *delta = mixed + h;
    float *gate_up = delta + h, *scores = gate_up + 2 * inter, *work = scores + heads * len;

    for (int64_t l = 0; l < dims->layers; l++) {
        void *const *w = p + l * PER_LAYER;
        float *k_cache = w[K_CACHE], *v_cache = w[V_CACHE];
        rms_norm(x, w[NORM_IN], normed, h, dims->eps);
        matvec(w[QKV], w[QKV_S], kind, normed, qkv, qkv_rows, h, threads, work);
        for (int64_t j = 0; j < heads + kvh; j++) rotate(qkv + j * d, cos, signed_sin, d);
        for (int64_t j = 0; j < kvh; j++) {
            memcpy(k_cache + (j * len + pos) * d, qkv + (heads + j) * d, d * sizeof(float));
            memcpy(v_cache + (j * len + pos) * d, qkv + (heads + kvh + j) * d, d * sizeof(float));
        }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t j = 0; j < heads; j++) {
            int64_t g = j / (heads / kvh);  /* q head j reads kv head g, as SDPA's enable_gqa */
            attend(qkv + j * d, k_cache + g * len * d, v_cache + g * len * d, mixed + j * d, scores + j * len, n, d);
        }
        matvec(w[O], w[O_S], kind, mixed, delta, h, h, threads, work);
        for (int64_t i = 0; i < h; i++) x[i] += delta[i];
        rms_norm(x, w[NORM_POST], normed, h, dims->eps);
        matvec(w[GATE_UP], w[GATE_UP_S], kind, normed, gate_up, 2 * inter, h, threads, work);
        for (int64_t i = 0; i < inter; i++) {
            float g = gate_up[i];
            gate_up[i] = g / (1.0f + expf(-g)) * gate_up[inter + i];
        }
        matvec(w[DOWN], w[DOWN_S], kind, gate_up, delta, h, inter, threads, work);
        for (int64_t i = 0; i < h; i++) x[i] += delta[i];
    }
    void *const *last = p + dims->layers * PER_LAYER;
    rms_norm(x, last[0], normed, h, dims->eps);
    matvec(last[1], last[2], kind, normed, logits, dims->vocab, h, threads, work);
}
