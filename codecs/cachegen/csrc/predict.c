/* Cross-layer prediction (FORMAT.md section 3, predict.py). */
#include "ransc.h"


RANSC_DOC(ransc_predict_doc,
"predict(x, rows, features, channels, w, b, out)\n\n"
"Cross-layer prediction (predict.py): out[t, j] = b[j], then for i = 0 .. F-1 in order\n"
"out[t, j] = out[t, j] + x[t, i] * w[i, j], the product rounded to fp32, then the sum (built with\n"
"-ffp-contract=off: no fused multiply-add). x fp32 [rows, F], w fp32 [F, C], b fp32 [C], out fp32 [rows, C].");

/* Every lane computes acc = b[j]; acc = acc + x[t, i] * w[i, j] for i = 0 .. F-1 in order: the
 * vector mul and add are the IEEE fp32 operations and -ffp-contract=off keeps them unfused, so any
 * blocking over rows t and columns j gives the scalar loop's bits (only the order over i is fixed).
 *
 * Register-blocked: a block of up to 8 rows x 32 columns (16 AVX-512 accumulators) stays in vector
 * registers over the whole sum, each weight vector loaded once per 8 rows and each feature broadcast
 * once per 32 columns, so the loop runs at the multiply and add ports' rate, not the loads'. GCC's
 * vector extensions; the AVX-512 build is chosen at load time (target_clones) where the CPU has it,
 * else AVX2, else the portable build (the same code, narrower registers). */
typedef float v16f __attribute__((vector_size(64)));
typedef float v16fu __attribute__((vector_size(64), aligned(4)));

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PREDICT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PREDICT_CLONES
#endif

#define PRED_ROWS 8
#define SPLAT(s) ((v16f){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s})

/* nr (<= PRED_ROWS) rows from t, nv (1 or 2) vectors of 16 columns from j. */
ALWAYS_INLINE void pred_block(const int nr, const int nv, const float *x, Py_ssize_t t, Py_ssize_t F,
                              Py_ssize_t C, Py_ssize_t j, const float *w, const float *b, float *out) {
    v16f a[PRED_ROWS][2];
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < nv; v++) a[r][v] = *(const v16fu *)(b + j + 16 * v);
    const float *xr = x + t * F;
    for (Py_ssize_t i = 0; i < F; i++) {
        v16f wv[2];
        for (int v = 0; v < nv; v++) wv[v] = *(const v16fu *)(w + i * C + j + 16 * v);
        for (int r = 0; r < nr; r++) {
            const v16f s = SPLAT(xr[r * F + i]);
            for (int v = 0; v < nv; v++) a[r][v] = a[r][v] + s * wv[v];
        }
    }
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < nv; v++) *(v16fu *)(out + (t + r) * C + j + 16 * v) = a[r][v];
}

/* The rows t .. t + nr - 1 (nr a constant after inlining), every column. */
ALWAYS_INLINE void pred_rows(const int nr, const float *x, Py_ssize_t t, Py_ssize_t F, Py_ssize_t C,
                             const float *w, const float *b, float *out) {
    Py_ssize_t j = 0;
    for (; j + 32 <= C; j += 32) pred_block(nr, 2, x, t, F, C, j, w, b, out);
    for (; j + 16 <= C; j += 16) pred_block(nr, 1, x, t, F, C, j, w, b, out);
    for (; j < C; j++)  /* the columns past the last block of 16, one at a time */
        for (int r = 0; r < nr; r++) {
            const float *xr = x + (t + r) * F;
            float acc = b[j];
            for (Py_ssize_t i = 0; i < F; i++) acc = acc + xr[i] * w[i * C + j];
            out[(t + r) * C + j] = acc;
        }
}

PREDICT_CLONES
static void predict_rows(const float *x, Py_ssize_t rows, Py_ssize_t F, Py_ssize_t C, const float *w,
                         const float *b, float *out) {
    Py_ssize_t t = 0;
    for (; t + PRED_ROWS <= rows; t += PRED_ROWS) pred_rows(PRED_ROWS, x, t, F, C, w, b, out);
    switch (rows - t) {  /* the last rows: one specialised block */
    case 7: pred_rows(7, x, t, F, C, w, b, out); break;
    case 6: pred_rows(6, x, t, F, C, w, b, out); break;
    case 5: pred_rows(5, x, t, F, C, w, b, out); break;
    case 4: pred_rows(4, x, t, F, C, w, b, out); break;
    case 3: pred_rows(3, x, t, F, C, w, b, out); break;
    case 2: pred_rows(2, x, t, F, C, w, b, out); break;
    case 1: pred_rows(1, x, t, F, C, w, b, out); break;
    default: break;
    }
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
