/* Cross-layer prediction (FORMAT.md section 3, predict.py). */
#include "ransc.h"

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
