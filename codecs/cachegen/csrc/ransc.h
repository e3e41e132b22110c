/* Shared declarations of the compiled cachegen CPU path (the `_ransc` extension module).
 *
 * The module is split by stage, as dietgpu splits its coder: common.c (argument and buffer checks),
 * stats.c (histogram, center and table choice, delta-stream choice), quantize.c (elementwise quantize
 * and dequantize, query-aware key rounding, protected-row sums), predict.c (cross-layer prediction),
 * rans.c (kvmesh-rans32x16 encode and decode), sidecode.c (sections 1-4's coded form) and module.c (the Python method table). Every stage is
 * byte-identical to the numpy/torch reference in tests/codecs/reference and to the Triton kernels;
 * FORMAT.md is the specification. Only the Python C API and the buffer protocol are used: pip builds
 * this with build isolation, where numpy's headers are absent.
 *
 * Every function works on a whole chunk: the quantized symbols q [2, L, T, C] uint8 (row-major),
 * and the S = 2*L*C*nseg streams of FORMAT.md (stream k = ((kv*L + l)*C + c)*nseg + g holds
 * q[kv, l, 256g .. 256g+n_k, c]). The streams are read and written in place in q's layout, so no
 * transposed copy is needed. Tables come in per-alphabet blocks located by an offset array of 257
 * int64 entries (offset[B] = -1 where the caller supplied no block for alphabet B).
 *
 * Integer arithmetic only, except the fp32 (de)quantization and prediction steps (built with
 * -ffp-contract=off so none is fused). The GIL is released during the loops.
 */
#ifndef KVMESH_RANSC_H
#define KVMESH_RANSC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PROB_BITS 12
#define M (1u << PROB_BITS)
#define RANS_L (1u << 16)
#define SEGMENT 256
#define NUM_TABLES 64
#define MAX_ALPHABET 256

/* decode error codes, mapped to CodecError messages by native.py */
#define ERR_COUNT_RANGE 1   /* a stream's word count is outside [2, n_k + 2] */
#define ERR_COUNT_SUM 2     /* the word counts do not add up to the words stored */
#define ERR_CENTER 3        /* center >= B */
#define ERR_TABLE 4         /* table index >= NUM_TABLES */
#define ERR_FINAL 6         /* a stream does not end in state L having read exactly its words */
#define ERR_ALPHABET 7      /* a stream's alphabet has no table block */

typedef struct {
    Py_ssize_t layers, tokens, channels, nseg, streams;
} Shape;

/* common.c */
int shape_from(Py_ssize_t layers, Py_ssize_t tokens, Py_ssize_t channels, Shape *sh);
int need(const Py_buffer *b, Py_ssize_t bytes, const char *what);
int check_offsets(const Py_buffer *off, Py_ssize_t table_len, Py_ssize_t (*block)(int), const char *what);
Py_ssize_t enc_block(int b);
Py_ssize_t dec_block(int b);
Py_ssize_t cost_block(int b);
int check_levels(const int64_t *slev, Py_ssize_t n, Py_ssize_t per_block);

/* Streams of the same (K/V, layer) block and segment have the same length and alphabet: the coder
 * runs LANES of them (adjacent channels) side by side, so their independent state chains overlap
 * in the CPU instead of each waiting on its own multiply-add latency. */
#define LANES 4
#define MAX_GROUP 8  /* channels per coded stream, at most (layout.py) */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* The symbols of nl <= LANES adjacent channels at p, lane j in bits 8j..8j+7. */
ALWAYS_INLINE uint32_t load_lanes(const uint8_t *p, const int nl) {
    uint32_t quad = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(&quad, p, (size_t)nl);
#else
    for (int j = 0; j < nl; j++) quad |= (uint32_t)p[j] << (8 * j);
#endif
    return quad;
}

/* A method's docstring, defined next to it and listed in module.c's method table. */
#define RANSC_DOC(name, text) const char name[] = text

/* The module's methods (METH_VARARGS), by stage. */
#define RANSC_METHOD(f) PyObject *ransc_##f(PyObject *self, PyObject *args); extern const char ransc_##f##_doc[]
RANSC_METHOD(histogram);   /* stats.c */
RANSC_METHOD(choose);
RANSC_METHOD(models);
RANSC_METHOD(quantize);    /* quantize.c */
RANSC_METHOD(round_keys);
RANSC_METHOD(dequantize);
RANSC_METHOD(row_sums);
RANSC_METHOD(f16_bounds);
RANSC_METHOD(quantize_layer);
RANSC_METHOD(layer_residual);
RANSC_METHOD(predict);     /* predict.c */
RANSC_METHOD(predict_parts);
RANSC_METHOD(predict_fixed);
RANSC_METHOD(to_fixed);
RANSC_METHOD(encode);      /* rans.c */
RANSC_METHOD(decode);
RANSC_METHOD(side_encode); /* sidecode.c */
RANSC_METHOD(side_decode);
#undef RANSC_METHOD

#endif
