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

#define PRED_BLOCK(NAME, VEC, VECU, W, MAXR, MAXV)                                                        \
ALWAYS_INLINE void NAME(const int nr, const int nv, const float *x, Py_ssize_t t, Py_ssize_t F,           \
                        Py_ssize_t C, Py_ssize_t j, const float *w, const float *b, float *out) {         \
    VEC a[MAXR][MAXV];                                                                                    \
    for (int r = 0; r < nr; r++)                                                                          \
        for (int v = 0; v < nv; v++) a[r][v] = *(const VECU *)(b + j + W * v);                            \
    const float *xr = x + t * F;                                                                          \
    for (Py_ssize_t i = 0; i < F; i++) {                                                                  \
        VEC wv[MAXV];                                                                                     \
        for (int v = 0; v < nv; v++) wv[v] = *(const VECU *)(w + i * C + j + W * v);                      \
        for (int r = 0; r < nr; r++) {                                                                    \
            const float s = xr[r * F + i]; /* broadcast by the vector-scalar product */                   \
            for (int v = 0; v < nv; v++) a[r][v] = a[r][v] + s * wv[v];                                   \
        }                                                                                                 \
    }                                                                                                     \
    for (int r = 0; r < nr; r++)                                                                          \
        for (int v = 0; v < nv; v++) *(VECU *)(out + (t + r) * C + j + W * v) = a[r][v];                  \
}

/* The rows t .. t + nr - 1 (nr a constant after inlining), every column: blocks of MAXV vectors, then
 * of one vector, then single columns. */
#define PRED_ROWS_OF(NAME, BLOCK, W, MAXV)                                                                \
ALWAYS_INLINE void NAME(const int nr, const float *x, Py_ssize_t t, Py_ssize_t F, Py_ssize_t C,          \
                        const float *w, const float *b, float *out) {                                     \
    Py_ssize_t j = 0;                                                                                     \
    for (; j + W * MAXV <= C; j += W * MAXV) BLOCK(nr, MAXV, x, t, F, C, j, w, b, out);                   \
    for (; j + W <= C; j += W) BLOCK(nr, 1, x, t, F, C, j, w, b, out);                                    \
    for (; j < C; j++)                                                                                    \
        for (int r = 0; r < nr; r++) {                                                                    \
            const float *xr = x + (t + r) * F;                                                            \
            float acc = b[j];                                                                             \
            for (Py_ssize_t i = 0; i < F; i++) acc = acc + xr[i] * w[i * C + j];                          \
            out[(t + r) * C + j] = acc;                                                                   \
        }                                                                                                 \
}

/* All rows: blocks of MAXR rows, then one block of the rest (TAIL: a switch over 1 .. MAXR - 1). */
#define PREDICT_ALL(NAME, ATTR, ROWS_OF, MAXR, TAIL)                                                      \
ATTR static void NAME(const float *x, Py_ssize_t rows, Py_ssize_t F, Py_ssize_t C, const float *w,        \
                      const float *b, float *out) {                                                       \
    Py_ssize_t t = 0;                                                                                     \
    for (; t + MAXR <= rows; t += MAXR) ROWS_OF(MAXR, x, t, F, C, w, b, out);                             \
    switch (rows - t) { TAIL(ROWS_OF) default: break; }                                                   \
}
#define CASE(ROWS_OF, N) case N: ROWS_OF(N, x, t, F, C, w, b, out); break;
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

static void predict_rows(const float *x, Py_ssize_t rows, Py_ssize_t F, Py_ssize_t C, const float *w,
                         const float *b, float *out) {
#ifdef HAVE_AVX512_PREDICT
    if (__builtin_cpu_supports("avx512f") && !getenv("RANSC_NO_AVX512")) {
        predict_avx512(x, rows, F, C, w, b, out);
        return;
    }
#endif
    predict_narrow(x, rows, F, C, w, b, out);
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
        predict_rows(x, rows, features, channels, w, b, out);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&xb); PyBuffer_Release(&wb); PyBuffer_Release(&bb); PyBuffer_Release(&ob);
    return ret;
}
