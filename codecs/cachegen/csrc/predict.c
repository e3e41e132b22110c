/* Cross-layer prediction (FORMAT.md section 3, predict.py). */
#include "ransc.h"


RANSC_DOC(ransc_predict_doc,
"predict(x, rows, features, channels, w, b, out)\n\n"
"Cross-layer prediction (predict.py): out[t, j] = b[j], then for i = 0 .. F-1 in order\n"
"out[t, j] = out[t, j] + x[t, i] * w[i, j], the product rounded to fp32, then the sum (built with\n"
"-ffp-contract=off: no fused multiply-add). x fp32 [rows, F], w fp32 [F, C], b fp32 [C], out fp32 [rows, C].");

/* Register-blocked: 4 rows x 16 columns of accumulators stay in vector registers over the whole
 * sum; every lane still computes acc = acc + x * w for i = 0 .. F-1 in order (vector mul and add are
 * the IEEE fp32 operations; -ffp-contract=off keeps them unfused), so the result is the scalar loop's.
 * GCC's vector extensions; target_clones picks the AVX2 build at load time where the CPU has it. */
typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4)));

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PREDICT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PREDICT_CLONES
#endif

PREDICT_CLONES
static void predict_rows(const float *x, Py_ssize_t rows, Py_ssize_t F, Py_ssize_t C, const float *w,
                         const float *b, float *out) {
    Py_ssize_t t = 0;
    const Py_ssize_t cv = C - C % 16;
    for (; t + 4 <= rows; t += 4) {
        const float *x0 = x + t * F, *x1 = x0 + F, *x2 = x1 + F, *x3 = x2 + F;
        for (Py_ssize_t j = 0; j < cv; j += 16) {
            const v8f b0 = *(const v8fu *)(b + j), b1 = *(const v8fu *)(b + j + 8);
            v8f a00 = b0, a01 = b1, a10 = b0, a11 = b1, a20 = b0, a21 = b1, a30 = b0, a31 = b1;
            for (Py_ssize_t i = 0; i < F; i++) {
                const v8f w0 = *(const v8fu *)(w + i * C + j), w1 = *(const v8fu *)(w + i * C + j + 8);
                const float s0 = x0[i], s1 = x1[i], s2 = x2[i], s3 = x3[i];
                const v8f v0 = {s0, s0, s0, s0, s0, s0, s0, s0}, v1 = {s1, s1, s1, s1, s1, s1, s1, s1};
                const v8f v2 = {s2, s2, s2, s2, s2, s2, s2, s2}, v3 = {s3, s3, s3, s3, s3, s3, s3, s3};
                a00 = a00 + v0 * w0; a01 = a01 + v0 * w1;
                a10 = a10 + v1 * w0; a11 = a11 + v1 * w1;
                a20 = a20 + v2 * w0; a21 = a21 + v2 * w1;
                a30 = a30 + v3 * w0; a31 = a31 + v3 * w1;
            }
            *(v8fu *)(out + t * C + j) = a00; *(v8fu *)(out + t * C + j + 8) = a01;
            *(v8fu *)(out + (t + 1) * C + j) = a10; *(v8fu *)(out + (t + 1) * C + j + 8) = a11;
            *(v8fu *)(out + (t + 2) * C + j) = a20; *(v8fu *)(out + (t + 2) * C + j + 8) = a21;
            *(v8fu *)(out + (t + 3) * C + j) = a30; *(v8fu *)(out + (t + 3) * C + j + 8) = a31;
        }
    }
    for (; t < rows; t++) {
        const float *xr = x + t * F;
        for (Py_ssize_t j = 0; j < cv; j += 16) {
            v8f a0 = *(const v8fu *)(b + j), a1 = *(const v8fu *)(b + j + 8);
            for (Py_ssize_t i = 0; i < F; i++) {
                const float s = xr[i];
                const v8f v = {s, s, s, s, s, s, s, s};
                a0 = a0 + v * *(const v8fu *)(w + i * C + j);
                a1 = a1 + v * *(const v8fu *)(w + i * C + j + 8);
            }
            *(v8fu *)(out + t * C + j) = a0; *(v8fu *)(out + t * C + j + 8) = a1;
        }
    }
    /* the columns past the last block of 16, one at a time */
    for (Py_ssize_t r = 0; r < rows && cv < C; r++) {
        const float *xr = x + r * F;
        for (Py_ssize_t j = cv; j < C; j++) {
            float acc = b[j];
            for (Py_ssize_t i = 0; i < F; i++) acc = acc + xr[i] * w[i * C + j];
            out[r * C + j] = acc;
        }
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
