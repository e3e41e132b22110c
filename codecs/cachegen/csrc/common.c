/* Argument and buffer checks shared by every stage. */
#include "ransc.h"

int shape_from(Py_ssize_t layers, Py_ssize_t tokens, Py_ssize_t channels, Shape *sh) {
    /* L * T * C <= 2**40 keeps every size and offset below far from Py_ssize_t overflow */
    const Py_ssize_t limit = (Py_ssize_t)1 << 40;
    if (layers < 1 || tokens < 1 || channels < 1 || tokens > limit / layers
        || channels > limit / (layers * tokens)) {
        PyErr_SetString(PyExc_ValueError, "layers, tokens and channels must be positive, with a product <= 2**40");
        return -1;
    }
    sh->layers = layers;
    sh->tokens = tokens;
    sh->channels = channels;
    sh->nseg = (tokens + SEGMENT - 1) / SEGMENT;
    sh->streams = 2 * layers * channels * sh->nseg;
    return 0;
}

/* Buffer size checks: the wrapper passes correctly typed arrays; these keep a wrong call from
 * touching memory outside them. */
int need(const Py_buffer *b, Py_ssize_t bytes, const char *what) {
    if (b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s buffer holds %zd bytes, needs %zd", what, b->len, bytes);
        return -1;
    }
    return 0;
}

int check_offsets(const Py_buffer *off, Py_ssize_t table_len, Py_ssize_t (*block)(int),
                         const char *what) {
    if (need(off, 257 * (Py_ssize_t)sizeof(int64_t), what) < 0) return -1;
    const int64_t *o = (const int64_t *)off->buf;
    for (int b = 0; b <= MAX_ALPHABET; b++) {
        if (o[b] < 0) continue;
        if (b < 2 || o[b] > table_len - block(b)) {
            PyErr_Format(PyExc_ValueError, "%s offset of alphabet %d is out of range", what, b);
            return -1;
        }
    }
    return 0;
}

/* block sizes in elements, per alphabet B */
Py_ssize_t enc_block(int b) { return (Py_ssize_t)NUM_TABLES * 2 * b * 2; }  /* uint64 pairs, twice */
Py_ssize_t dec_block(int b) { (void)b; return (Py_ssize_t)NUM_TABLES * M; }  /* uint32 */
Py_ssize_t cost_block(int b) { return (Py_ssize_t)b * NUM_TABLES; }  /* int16 [B][64] */

/* Alphabets in [2, 256], equal within each block of per_block streams (a (K/V, layer) block,
 * which the coders rely on). */
int check_levels(const int64_t *slev, Py_ssize_t n, Py_ssize_t per_block) {
    for (Py_ssize_t k = 0; k < n; k++) {
        if (slev[k] < 2 || slev[k] > MAX_ALPHABET) {
            PyErr_Format(PyExc_ValueError, "stream %zd has alphabet %lld outside [2, 256]", k,
                         (long long)slev[k]);
            return -1;
        }
        if (slev[k] != slev[k - k % per_block]) {
            PyErr_Format(PyExc_ValueError, "stream %zd's alphabet differs from its layer's", k);
            return -1;
        }
    }
    return 0;
}
