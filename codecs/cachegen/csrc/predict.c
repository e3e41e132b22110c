/* Cross-layer prediction (FORMAT.md section 3, predict.py). */
#include "ransc.h"

#include <math.h>
#include <stdlib.h>


RANSC_DOC(ransc_predict_doc,
"predict(x, rows, features, channels, w, b, out)\n\n"
"Cross-layer prediction (predict.py): out[t, j] = b[j], then for i = 0 .. F-1 in order\n"
"out[t, j] = out[t, j] + x[t, i] * w[i, j], the product rounded to fp32, then the sum (built with\n"
"-ffp-contract=off: no fused multiply-add). x fp32 [rows, F], w fp32 [F, C], b fp32 [C], out fp32 [rows, C].");

/* Every lane computes acc = b[j]; acc = acc + x[t, i] * w[i, j] for i = 0 .. F-1 in order: the
 * vector mul and add are the IEEE fp32 operations and -ffp-contract=off keeps them unfused, so any
 * blocking over rows t and columns j gives the scalar loop's bits (only the order over i is fixed).
 *
 * Register-blocked: a block of ROWS rows x NV vectors of columns stays in vector registers over the
 * whole sum, each weight vector loaded once per ROWS rows and each feature broadcast once per block,
 * so the loop runs at the multiply and add ports' rate, not the loads'. Two builds of one template
 * (GCC vector extensions): AVX-512, 6 rows x 64 columns (24 of the 32 zmm registers), chosen at run
 * time where the CPU has it; else 4 rows x 16 columns of 8-lane vectors (8 of 16 ymm registers),
 * cloned for AVX2 and the portable baseline. Column tails use narrower blocks, then one column at a
 * time; row tails a block specialised for their count. */
typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4)));
typedef float v16f __attribute__((vector_size(64)));
typedef float v16fu __attribute__((vector_size(64), aligned(4)));

/* The features come in P parts of K columns each (F = P * K: the decoded layers codec.py's features()
 * would concatenate, read in place), feature i = p * K + k being column k of part p. With add, the
 * block stores out + prediction (the decoder's dequantized residual plus its prediction: one fp32
 * sum, the same bits either way round). */
#define PRED_BLOCK(NAME, VEC, VECU, W, MAXR, MAXV)                                                        \
ALWAYS_INLINE void NAME(const int nr, const int nv, const float *const *xs, int P, Py_ssize_t K,           \
                        Py_ssize_t t, Py_ssize_t C, Py_ssize_t j, const float *w, const float *b,          \
                        float *out, int add) {                                                            \
    VEC a[MAXR][MAXV];                                                                                    \
    for (int r = 0; r < nr; r++)                                                                          \
        for (int v = 0; v < nv; v++) a[r][v] = *(const VECU *)(b + j + W * v);                            \
    for (int p = 0; p < P; p++) {                                                                         \
        const float *xr = xs[p] + t * K;                                                                  \
        const float *wp = w + p * K * C;                                                                  \
        for (Py_ssize_t i = 0; i < K; i++) {                                                              \
            VEC wv[MAXV];                                                                                 \
            for (int v = 0; v < nv; v++) wv[v] = *(const VECU *)(wp + i * C + j + W * v);                 \
            for (int r = 0; r < nr; r++) {                                                                \
                const float s = xr[r * K + i]; /* broadcast by the vector-scalar product */               \
                for (int v = 0; v < nv; v++) a[r][v] = a[r][v] + s * wv[v];                               \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    for (int r = 0; r < nr; r++)                                                                          \
        for (int v = 0; v < nv; v++) {                                                                    \
            VECU *o = (VECU *)(out + (t + r) * C + j + W * v);                                            \
            *o = add ? *o + a[r][v] : a[r][v];                                                            \
        }                                                                                                 \
}

/* The rows t .. t + nr - 1 (nr a constant after inlining), every column: blocks of MAXV vectors, then
 * of one vector, then single columns. */
#define PRED_ROWS_OF(NAME, BLOCK, W, MAXV)                                                                \
ALWAYS_INLINE void NAME(const int nr, const float *const *xs, int P, Py_ssize_t K, Py_ssize_t t,          \
                        Py_ssize_t C, const float *w, const float *b, float *out, int add) {              \
    Py_ssize_t j = 0;                                                                                     \
    for (; j + W * MAXV <= C; j += W * MAXV) BLOCK(nr, MAXV, xs, P, K, t, C, j, w, b, out, add);          \
    for (; j + W <= C; j += W) BLOCK(nr, 1, xs, P, K, t, C, j, w, b, out, add);                           \
    for (; j < C; j++)                                                                                    \
        for (int r = 0; r < nr; r++) {                                                                    \
            float acc = b[j];                                                                             \
            for (int p = 0; p < P; p++) {                                                                 \
                const float *xr = xs[p] + (t + r) * K, *wp = w + p * K * C;                               \
                for (Py_ssize_t i = 0; i < K; i++) acc = acc + xr[i] * wp[i * C + j];                     \
            }                                                                                             \
            float *o = out + (t + r) * C + j;                                                             \
            *o = add ? *o + acc : acc;                                                                    \
        }                                                                                                 \
}

/* All rows: blocks of MAXR rows, then one block of the rest (TAIL: a switch over 1 .. MAXR - 1). */
#define PREDICT_ALL(NAME, ATTR, ROWS_OF, MAXR, TAIL)                                                      \
ATTR static void NAME(const float *const *xs, int P, Py_ssize_t K, Py_ssize_t rows, Py_ssize_t C,         \
                      const float *w, const float *b, float *out, int add) {                              \
    Py_ssize_t t = 0;                                                                                     \
    for (; t + MAXR <= rows; t += MAXR) ROWS_OF(MAXR, xs, P, K, t, C, w, b, out, add);                    \
    switch (rows - t) { TAIL(ROWS_OF) default: break; }                                                   \
}
#define CASE(ROWS_OF, N) case N: ROWS_OF(N, xs, P, K, t, C, w, b, out, add); break;
#define TAIL4(R) CASE(R, 3) CASE(R, 2) CASE(R, 1)
#define TAIL6(R) CASE(R, 5) CASE(R, 4) TAIL4(R)

PRED_BLOCK(block8, v8f, v8fu, 8, 4, 2)
PRED_ROWS_OF(rows8, block8, 8, 2)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
PREDICT_ALL(predict_narrow, __attribute__((target_clones("avx2", "default"))), rows8, 4, TAIL4)
#define HAVE_AVX512_PREDICT 1
PRED_BLOCK(block16, v16f, v16fu, 16, 6, 4)
PRED_ROWS_OF(rows16, block16, 16, 4)
PREDICT_ALL(predict_avx512, __attribute__((target("avx512f"))), rows16, 6, TAIL6)
#else
PREDICT_ALL(predict_narrow, , rows8, 4, TAIL4)
#endif

static void predict_rows(const float *const *xs, int P, Py_ssize_t K, Py_ssize_t rows, Py_ssize_t C,
                         const float *w, const float *b, float *out, int add) {
#ifdef HAVE_AVX512_PREDICT
    if (__builtin_cpu_supports("avx512f") && !getenv("RANSC_NO_AVX512")) {
        predict_avx512(xs, P, K, rows, C, w, b, out, add);
        return;
    }
#endif
    predict_narrow(xs, P, K, rows, C, w, b, out, add);
}

PyObject *ransc_predict(PyObject *self, PyObject *args) {
    Py_buffer xb = {0}, wb = {0}, bb = {0}, ob = {0};
    Py_ssize_t rows, features, channels;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnny*y*w*", &xb, &rows, &features, &channels, &wb, &bb, &ob)) return NULL;
    if (rows < 0 || features < 1 || channels < 1) {
        PyErr_SetString(PyExc_ValueError, "rows >= 0, features >= 1 and channels >= 1 required");
        goto done;
    }
    if (need(&xb, rows * features * (Py_ssize_t)sizeof(float), "x") < 0
        || need(&wb, features * channels * (Py_ssize_t)sizeof(float), "w") < 0
        || need(&bb, channels * (Py_ssize_t)sizeof(float), "b") < 0
        || need(&ob, rows * channels * (Py_ssize_t)sizeof(float), "out") < 0)
        goto done;
    {
        const float *x = (const float *)xb.buf, *w = (const float *)wb.buf, *b = (const float *)bb.buf;
        float *out = (float *)ob.buf;
        Py_BEGIN_ALLOW_THREADS
        const float *xs[1] = {x};
        predict_rows(xs, 1, features, rows, channels, w, b, out, 0);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&xb); PyBuffer_Release(&wb); PyBuffer_Release(&bb); PyBuffer_Release(&ob);
    return ret;
}

RANSC_DOC(ransc_predict_parts_doc,
"predict_parts(parts, x0, x1, x2, rows, width, channels, w, b, out, add)\n\n"
"predict with the features in place: the first parts (1 to 3) of x0, x1, x2 (fp32 [rows, width] each)\n"
"side by side are the features [rows, parts * width] (the unused ones may be any buffer). add: out =\n"
"out + the prediction (else out = the prediction); out fp32 [rows, channels]. The same bits as predict\n"
"on the concatenated features.");

PyObject *ransc_predict_parts(PyObject *self, PyObject *args) {
    Py_buffer xb[3] = {{0}, {0}, {0}}, wb = {0}, bb = {0}, ob = {0};
    Py_ssize_t rows, width, channels;
    int parts, add;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "iy*y*y*nnny*y*w*p", &parts, &xb[0], &xb[1], &xb[2], &rows, &width, &channels,
                          &wb, &bb, &ob, &add))
        return NULL;
    if (parts < 1 || parts > 3 || rows < 0 || width < 1 || channels < 1) {
        PyErr_SetString(PyExc_ValueError, "1 <= parts <= 3, rows >= 0, width >= 1 and channels >= 1 required");
        goto done;
    }
    for (int p = 0; p < parts; p++)
        if (need(&xb[p], rows * width * (Py_ssize_t)sizeof(float), "x") < 0) goto done;
    if (need(&wb, parts * width * channels * (Py_ssize_t)sizeof(float), "w") < 0
        || need(&bb, channels * (Py_ssize_t)sizeof(float), "b") < 0
        || need(&ob, rows * channels * (Py_ssize_t)sizeof(float), "out") < 0)
        goto done;
    {
        const float *xs[3] = {(const float *)xb[0].buf, (const float *)xb[1].buf, (const float *)xb[2].buf};
        Py_BEGIN_ALLOW_THREADS
        predict_rows(xs, parts, width, rows, channels, (const float *)wb.buf, (const float *)bb.buf,
                     (float *)ob.buf, add);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    for (int p = 0; p < 3; p++) PyBuffer_Release(&xb[p]);
    PyBuffer_Release(&wb); PyBuffer_Release(&bb); PyBuffer_Release(&ob);
    return ret;
}


/* ---- Fixed-point prediction (FORMAT.md section 3, "Fixed-point prediction"; predict.py) ----------
 *
 * Each part p (one decoded layer, int16 features X_p [rows, Kp], Kp = its width rounded up to even,
 * the padding zero) contributes A_p[t, j] = sum_i X_p[t, i] W_p[i, j], an exact int32 (the weights'
 * scales bound it below 2^31), so the sum's order is free: int16 pairs multiplied and added into int32
 * lanes (AVX512-VNNI vpdpwssd, or AVX2 vpmaddwd + vpaddd), two products per lane an instruction where
 * the fp32 form needs a multiply and an add per product. Then, in part order, P = P + float(A_p) *
 * 2^-(sx_p + sw_p[j]) from P = b: the conversion rounds to nearest even, the product is exact, the sum
 * one fp32 addition (built with -ffp-contract=off). Weights are packed [P, Kp / 2, C, 2]: each int32
 * lane of a vector load holds one column's weight pair for features 2i and 2i + 1. */

ALWAYS_INLINE float pow2_neg(int k) { /* 2^-k for k in [-126, 126]: from its exponent bits, exact */
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)(127 - k) << 23;
    return v.f;
}

typedef struct {
    const int16_t *x[3];
    int sx[3];
    int P;
    Py_ssize_t Kp, rows, C;
    const int16_t *w;   /* [P, Kp / 2, C, 2] */
    const int32_t *sw;  /* [P, C] */
    const float *b;
    float *out;
    int add;
} FixedArgs;

/* One output element the plain way: the columns the vector blocks leave, and the portable build. */
static inline void fixed_one(const FixedArgs *a, Py_ssize_t t, Py_ssize_t j) {
    float acc = a->b[j];
    const Py_ssize_t half = a->Kp / 2;
    for (int p = 0; p < a->P; p++) {
        const int16_t *xr = a->x[p] + t * a->Kp, *wp = a->w + (Py_ssize_t)p * half * a->C * 2;
        int32_t s = 0;
        for (Py_ssize_t i = 0; i < half; i++)
            s += (int32_t)xr[2 * i] * wp[(i * a->C + j) * 2] + (int32_t)xr[2 * i + 1] * wp[(i * a->C + j) * 2 + 1];
        acc = acc + (float)s * pow2_neg(a->sx[p] + a->sw[(Py_ssize_t)p * a->C + j]);
    }
    float *o = a->out + t * a->C + j;
    *o = a->add ? *o + acc : acc;
}

/* The portable build: a row at a time, the columns innermost (the compiler vectorises them). */
static void fixed_portable(const FixedArgs *a) {
    const Py_ssize_t C = a->C, half = a->Kp / 2;
    int32_t *s = malloc((size_t)C * sizeof(int32_t));
    float *acc = malloc((size_t)C * sizeof(float));
    if (s == NULL || acc == NULL) {  /* a few hundred bytes: fall back to one element at a time */
        for (Py_ssize_t t = 0; t < a->rows; t++)
            for (Py_ssize_t j = 0; j < C; j++) fixed_one(a, t, j);
    } else {
        for (Py_ssize_t t = 0; t < a->rows; t++) {
            memcpy(acc, a->b, (size_t)C * sizeof(float));
            for (int p = 0; p < a->P; p++) {
                const int16_t *xr = a->x[p] + t * a->Kp, *wp = a->w + (Py_ssize_t)p * half * C * 2;
                memset(s, 0, (size_t)C * sizeof(int32_t));
                for (Py_ssize_t i = 0; i < half; i++) {
                    const int32_t x0 = xr[2 * i], x1 = xr[2 * i + 1];
                    const int16_t *wi = wp + i * C * 2;
                    for (Py_ssize_t j = 0; j < C; j++) s[j] += x0 * wi[2 * j] + x1 * wi[2 * j + 1];
                }
                for (Py_ssize_t j = 0; j < C; j++)
                    acc[j] = acc[j] + (float)s[j] * pow2_neg(a->sx[p] + a->sw[(Py_ssize_t)p * C + j]);
            }
            float *o = a->out + t * C;
            for (Py_ssize_t j = 0; j < C; j++) o[j] = a->add ? o[j] + acc[j] : acc[j];
        }
    }
    free(s);
    free(acc);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_FIXED_SIMD 1

/* The int32 sums of one part for a block of nr rows x nv vectors of columns (constants after
 * inlining), kept in registers over the part's features and stored once into sums [MAXR][MAXV * LANES]. */
#define FIXED_DOT(NAME, ATTR, IV, LANES_, MAXR, MAXV, LOADI, STOREI, SET1, ZERO, DOT)                        \
ATTR ALWAYS_INLINE void NAME(const int nr, const int nv, const int16_t *xr, Py_ssize_t Kp, const int16_t *wp,  \
                             Py_ssize_t C, int32_t *sums) {                                                  \
    IV s[MAXR][MAXV];                                                                                         \
    for (int r = 0; r < nr; r++)                                                                              \
        for (int v = 0; v < nv; v++) s[r][v] = ZERO();                                                        \
    for (Py_ssize_t i = 0; i < Kp / 2; i++) {                                                                 \
        IV wv[MAXV];                                                                                          \
        for (int v = 0; v < nv; v++) wv[v] = LOADI((const void *)(wp + (i * C + LANES_ * v) * 2));            \
        for (int r = 0; r < nr; r++) {                                                                        \
            int32_t pair;                                                                                     \
            memcpy(&pair, xr + r * Kp + 2 * i, 4);                                                            \
            const IV xb = SET1(pair);                                                                         \
            for (int v = 0; v < nv; v++) s[r][v] = DOT(s[r][v], xb, wv[v]);                                   \
        }                                                                                                     \
    }                                                                                                         \
    for (int r = 0; r < nr; r++)                                                                              \
        for (int v = 0; v < nv; v++) STOREI((void *)(sums + r * MAXV * LANES_ + LANES_ * v), s[r][v]);        \
}

/* A block: per part its sums, then P = P + float(sum) * 2^-(sx + sw) (from P = b) on the stack; then
 * out = P (or out + P). */
#define FIXED_BLOCK(NAME, ATTR, DOTFN, LANES_, MAXR, MAXV)                                                    \
ATTR ALWAYS_INLINE void NAME(const FixedArgs *a, const int nr, const int nv, Py_ssize_t t, Py_ssize_t j) {    \
    enum { W = MAXV * LANES_ };                                                                               \
    float acc[MAXR][W] __attribute__((aligned(64)));                                                          \
    int32_t sums[MAXR * W] __attribute__((aligned(64)));                                                      \
    const Py_ssize_t C = a->C, n = (Py_ssize_t)nv * LANES_;                                                   \
    for (int r = 0; r < nr; r++)                                                                              \
        for (Py_ssize_t c = 0; c < n; c++) acc[r][c] = a->b[j + c];                                           \
    for (int p = 0; p < a->P; p++) {                                                                          \
        DOTFN(nr, nv, a->x[p] + t * a->Kp, a->Kp, a->w + (Py_ssize_t)p * a->Kp * C + j * 2, C, sums);         \
        const int32_t *sw = a->sw + (Py_ssize_t)p * C + j;                                                    \
        for (int r = 0; r < nr; r++)                                                                          \
            for (Py_ssize_t c = 0; c < n; c++) {                                                              \
                acc[r][c] = acc[r][c] + (float)sums[r * W + c] * pow2_neg(a->sx[p] + sw[c]);                  \
            }                                                                                                 \
    }                                                                                                         \
    for (int r = 0; r < nr; r++) {                                                                            \
        float *o = a->out + (t + r) * C + j;                                                                  \
        for (Py_ssize_t c = 0; c < n; c++) o[c] = a->add ? o[c] + acc[r][c] : acc[r][c];                      \
    }                                                                                                         \
}

/* All rows, the columns [0, C - C % LANES) in blocks (MAXV vectors, then one), the rest one by one. */
#define FIXED_ALL(NAME, ATTR, BLOCK, LANES_, MAXR, MAXV)                                                     \
ATTR static void NAME(const FixedArgs *a) {                                                                  \
    Py_ssize_t t = 0;                                                                                         \
    const Py_ssize_t C = a->C, wide = C - C % (LANES_ * MAXV), vec = C - C % LANES_;                          \
    for (; t + MAXR <= a->rows; t += MAXR) {                                                                  \
        for (Py_ssize_t j = 0; j < wide; j += LANES_ * MAXV) BLOCK(a, MAXR, MAXV, t, j);                      \
        for (Py_ssize_t j = wide; j < vec; j += LANES_) BLOCK(a, MAXR, 1, t, j);                              \
    }                                                                                                         \
    for (; t < a->rows; t++) {                                                                                \
        for (Py_ssize_t j = 0; j < wide; j += LANES_ * MAXV) BLOCK(a, 1, MAXV, t, j);                         \
        for (Py_ssize_t j = wide; j < vec; j += LANES_) BLOCK(a, 1, 1, t, j);                                 \
    }                                                                                                         \
    for (t = 0; t < a->rows; t++)                                                                             \
        for (Py_ssize_t j = vec; j < C; j++) fixed_one(a, t, j);                                              \
}

#define ATTR512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define Z_STOREI(p, v) _mm512_storeu_si512(p, v)
FIXED_DOT(fixed_dot512, ATTR512, __m512i, 16, 6, 4, _mm512_loadu_si512, Z_STOREI, _mm512_set1_epi32,
          _mm512_setzero_si512, _mm512_dpwssd_epi32)
FIXED_BLOCK(fixed_block512, ATTR512, fixed_dot512, 16, 6, 4)
FIXED_ALL(fixed_avx512, ATTR512, fixed_block512, 16, 6, 4)

#define ATTR256 __attribute__((target("avx2")))
#define Y_DOT(s, x, w) _mm256_add_epi32(s, _mm256_madd_epi16(x, w))
#define Y_LOADI(p) _mm256_loadu_si256((const __m256i *)(p))
#define Y_STOREI(p, v) _mm256_storeu_si256((__m256i *)(p), v)
FIXED_DOT(fixed_dot256, ATTR256, __m256i, 8, 4, 2, Y_LOADI, Y_STOREI, _mm256_set1_epi32, _mm256_setzero_si256, Y_DOT)
FIXED_BLOCK(fixed_block256, ATTR256, fixed_dot256, 8, 4, 2)
FIXED_ALL(fixed_avx2, ATTR256, fixed_block256, 8, 4, 2)
#endif

/* The widest build the CPU runs; RANSC_NO_AVX512 and RANSC_NO_AVX2 force narrower ones (the tests). */
static void predict_fixed_rows(const FixedArgs *a) {
#ifdef HAVE_FIXED_SIMD
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") && !getenv("RANSC_NO_AVX512")
        && !getenv("RANSC_NO_AVX2")) {
        fixed_avx512(a);
        return;
    }
    if (__builtin_cpu_supports("avx2") && !getenv("RANSC_NO_AVX2")) {
        fixed_avx2(a);
        return;
    }
#endif
    fixed_portable(a);
}

RANSC_DOC(ransc_predict_fixed_doc,
"predict_fixed(parts, x0, x1, x2, sx0, sx1, sx2, rows, width, channels, w, sw, b, out, add)\n\n"
"Fixed-point prediction (predict.py): the first parts (1 to 3) of x0, x1, x2 (int16 [rows, width] each,\n"
"width even, with scale exponents sx0, sx1, sx2) are the features; w int16 [parts, width / 2, channels, 2]\n"
"(pairs of feature rows interleaved), sw int32 [parts, channels], b fp32 [channels]. out fp32\n"
"[rows, channels] = the prediction (add: out + the prediction).");

PyObject *ransc_predict_fixed(PyObject *self, PyObject *args) {
    Py_buffer xb[3] = {{0}, {0}, {0}}, wb = {0}, swb = {0}, bb = {0}, ob = {0};
    FixedArgs a;
    int add;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "iy*y*y*iiinnny*y*y*w*p", &a.P, &xb[0], &xb[1], &xb[2], &a.sx[0], &a.sx[1], &a.sx[2],
                          &a.rows, &a.Kp, &a.C, &wb, &swb, &bb, &ob, &add))
        return NULL;
    if (a.P < 1 || a.P > 3 || a.rows < 0 || a.Kp < 2 || a.Kp % 2 || a.C < 1) {
        PyErr_SetString(PyExc_ValueError, "1 <= parts <= 3, rows >= 0, an even width >= 2 and channels >= 1 required");
        goto done;
    }
    for (int p = 0; p < a.P; p++) {
        if (need(&xb[p], a.rows * a.Kp * (Py_ssize_t)sizeof(int16_t), "x") < 0) goto done;
        if (a.sx[p] < -63 || a.sx[p] > 63) {
            PyErr_SetString(PyExc_ValueError, "feature scale exponents must lie in [-63, 63]");
            goto done;
        }
        a.x[p] = (const int16_t *)xb[p].buf;
    }
    for (int p = a.P; p < 3; p++) a.x[p] = a.x[0], a.sx[p] = 0;
    if (need(&wb, a.P * a.Kp * a.C * (Py_ssize_t)sizeof(int16_t), "w") < 0
        || need(&swb, a.P * a.C * (Py_ssize_t)sizeof(int32_t), "sw") < 0
        || need(&bb, a.C * (Py_ssize_t)sizeof(float), "b") < 0
        || need(&ob, a.rows * a.C * (Py_ssize_t)sizeof(float), "out") < 0)
        goto done;
    a.w = (const int16_t *)wb.buf;
    a.sw = (const int32_t *)swb.buf;
    for (Py_ssize_t i = 0; i < a.P * a.C; i++)
        if (a.sw[i] < -63 || a.sw[i] > 63) {
            PyErr_SetString(PyExc_ValueError, "weight scale exponents must lie in [-63, 63]");
            goto done;
        }
    a.b = (const float *)bb.buf;
    a.out = (float *)ob.buf;
    a.add = add;
    Py_BEGIN_ALLOW_THREADS
    predict_fixed_rows(&a);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    for (int p = 0; p < 3; p++) PyBuffer_Release(&xb[p]);
    PyBuffer_Release(&wb); PyBuffer_Release(&swb); PyBuffer_Release(&bb); PyBuffer_Release(&ob);
    return ret;
}

RANSC_DOC(ransc_to_fixed_doc,
"to_fixed(y, rows, cols, width, out, sx_min, sx_max) -> sx\n\n"
"A decoded layer y fp32 [rows, cols] as fixed-point features (predict.to_fixed): sx = 15 - e for the\n"
"smallest e with max |y| < 2^e, clamped to [sx_min, sx_max] (sx_max when y is all zero); out int16\n"
"[rows, width] (width >= cols, the columns past cols zero) = clamp(floor(y * 2^sx + 0.5), -32767, 32767).");

/* Scalar forms (the tails, and CPUs without AVX2). The largest magnitude compares bit patterns: for
 * finite values |y|'s bits order as |y| does, and an integer maximum vectorises in any order. */
static uint32_t max_abs_bits_plain(const float *y, Py_ssize_t n) {
    uint32_t m = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, y + i, 4);
        u &= 0x7fffffffu;
        m = u > m ? u : m;
    }
    return m;
}

ALWAYS_INLINE int16_t fixed_of(float y, float scale) {
    float v = floorf(y * scale + 0.5f);
    v = v < -32767.0f ? -32767.0f : (v > 32767.0f ? 32767.0f : v);
    return (int16_t)v;
}

static void to_fixed_plain(const float *y, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t width, float scale,
                           int16_t *out) {
    for (Py_ssize_t t = 0; t < rows; t++) {
        for (Py_ssize_t c = 0; c < cols; c++) out[t * width + c] = fixed_of(y[t * cols + c], scale);
        for (Py_ssize_t c = cols; c < width; c++) out[t * width + c] = 0;
    }
}

#ifdef HAVE_FIXED_SIMD
__attribute__((target("avx2"))) static uint32_t max_abs_bits_avx2(const float *y, Py_ssize_t n) {
    __m256i m = _mm256_setzero_si256();
    const __m256i mask = _mm256_set1_epi32(0x7fffffff);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(y + i)), mask));
    uint32_t lanes[8], best = max_abs_bits_plain(y + i, n - i);
    _mm256_storeu_si256((__m256i *)lanes, m);
    for (int k = 0; k < 8; k++) best = lanes[k] > best ? lanes[k] : best;
    return best;
}

__attribute__((target("avx2"))) static void to_fixed_avx2(const float *y, Py_ssize_t rows, Py_ssize_t cols,
                                                          Py_ssize_t width, float scale, int16_t *out) {
    const __m256 s = _mm256_set1_ps(scale), half = _mm256_set1_ps(0.5f);
    const __m256 lo = _mm256_set1_ps(-32767.0f), hi = _mm256_set1_ps(32767.0f);
    for (Py_ssize_t t = 0; t < rows; t++) {
        const float *yr = y + t * cols;
        int16_t *o = out + t * width;
        Py_ssize_t c = 0;
        for (; c + 8 <= cols; c += 8) {
            __m256 v = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(yr + c), s), half));
            const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));  /* integers: exact */
            _mm_storeu_si128((__m128i *)(o + c),
                             _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
        }
        for (; c < cols; c++) o[c] = fixed_of(yr[c], scale);
        for (c = cols; c < width; c++) o[c] = 0;
    }
}
#endif

static int use_avx2(void) {
#ifdef HAVE_FIXED_SIMD
    return __builtin_cpu_supports("avx2") && !getenv("RANSC_NO_AVX2");
#else
    return 0;
#endif
}

PyObject *ransc_to_fixed(PyObject *self, PyObject *args) {
    Py_buffer yb = {0}, ob = {0};
    Py_ssize_t rows, cols, width;
    int sx_min, sx_max, sx = 0;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnnw*ii", &yb, &rows, &cols, &width, &ob, &sx_min, &sx_max)) return NULL;
    if (rows < 0 || cols < 1 || width < cols || sx_min > sx_max || sx_min < -63 || sx_max > 63) {
        PyErr_SetString(PyExc_ValueError, "rows >= 0, 1 <= cols <= width and -63 <= sx_min <= sx_max <= 63 required");
        goto done;
    }
    if (need(&yb, rows * cols * (Py_ssize_t)sizeof(float), "y") < 0
        || need(&ob, rows * width * (Py_ssize_t)sizeof(int16_t), "out") < 0)
        goto done;
    {
        const float *y = (const float *)yb.buf;
        Py_BEGIN_ALLOW_THREADS
        const int avx2 = use_avx2();
#ifdef HAVE_FIXED_SIMD
        const uint32_t bits = avx2 ? max_abs_bits_avx2(y, rows * cols) : max_abs_bits_plain(y, rows * cols);
#else
        const uint32_t bits = max_abs_bits_plain(y, rows * cols);
#endif
        float m;
        memcpy(&m, &bits, 4);
        if (m == 0.0f) {
            sx = sx_max;
        } else {
            int e;
            frexpf(m, &e);
            sx = 15 - e < sx_min ? sx_min : (15 - e > sx_max ? sx_max : 15 - e);
        }
#ifdef HAVE_FIXED_SIMD
        if (avx2)
            to_fixed_avx2(y, rows, cols, width, ldexpf(1.0f, sx), (int16_t *)ob.buf);
        else
#endif
            to_fixed_plain(y, rows, cols, width, ldexpf(1.0f, sx), (int16_t *)ob.buf);
        Py_END_ALLOW_THREADS
    }
    ret = PyLong_FromLong(sx);
done:
    PyBuffer_Release(&yb); PyBuffer_Release(&ob);
    return ret;
}
