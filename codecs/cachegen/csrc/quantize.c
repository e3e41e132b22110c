/* Quantization, elementwise (FORMAT.md section 3): quantize and dequantize steps, query-aware key
 * rounding, and the exact row sums of the protected-row rule. */
#include "ransc.h"

/* ---- quantization, elementwise ------------------------------------------------------------------ */

/* One element of quant.quantize: q = min(max(floor((x - lo) * inv + 0.5), 0), top), each step one
 * fp32 operation. v stays far inside int32 range (|v| <= ~257 for the groups quant.py builds). */
static inline uint8_t quant_one(float x, float lo, float inv, float top) {
    float v = x - lo;
    v = v * inv;
    v = v + 0.5f;
    float f = (float)(int32_t)v;  /* truncation, then one step down for negatives: floor */
    f = f > v ? f - 1.0f : f;
    f = f < 0.0f ? 0.0f : f;
    f = f > top ? top : f;
    return (uint8_t)f;
}

RANSC_DOC(ransc_quantize_doc,
"quantize(x, layers, tokens, channels, lo, inv, bm1, per_channel, q_out)\n\n"
"The elementwise step of quant.quantize, fused: q = uint8(min(max(floor((x - lo) * inv + 0.5), 0), Bm1)),\n"
"each operation one IEEE fp32 operation as torch does it (built with -ffp-contract=off).\n"
"x fp32 [L, T, C]; bm1 fp32 [L]. per_channel: lo, inv fp32 [L, nseg, C] (groups per layer, 256-token\n"
"segment and channel); else lo, inv fp32 [L, T] (groups per layer and token).");

PyObject *ransc_quantize(PyObject *self, PyObject *args) {
    Py_buffer xb = {0}, lob = {0}, invb = {0}, bmb = {0}, qb = {0};
    Py_ssize_t layers, tokens, channels;
    int per_channel;
    Shape sh;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnny*y*y*pw*", &xb, &layers, &tokens, &channels, &lob, &invb, &bmb,
                          &per_channel, &qb))
        return NULL;
    if (shape_from(layers, tokens, channels, &sh) < 0) goto done;
    Py_ssize_t n = layers * tokens * channels;
    Py_ssize_t groups = per_channel ? layers * sh.nseg * channels : layers * tokens;
    if (need(&xb, n * (Py_ssize_t)sizeof(float), "x") < 0 || need(&qb, n, "q") < 0
        || need(&lob, groups * (Py_ssize_t)sizeof(float), "lo") < 0
        || need(&invb, groups * (Py_ssize_t)sizeof(float), "inv") < 0
        || need(&bmb, layers * (Py_ssize_t)sizeof(float), "bm1") < 0)
        goto done;
    {
        const float *x = (const float *)xb.buf, *lo = (const float *)lob.buf, *inv = (const float *)invb.buf;
        const float *bm = (const float *)bmb.buf;
        uint8_t *q = (uint8_t *)qb.buf;
        const Py_ssize_t T = tokens, C = channels, nseg = sh.nseg;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t l = 0; l < layers; l++) {
            const float top = bm[l];
            for (Py_ssize_t t = 0; t < T; t++) {
                const float *xr = x + (l * T + t) * C;
                uint8_t *qr = q + (l * T + t) * C;
                if (per_channel) {
                    const Py_ssize_t g = (l * nseg + t / SEGMENT) * C;
                    const float *lr = lo + g, *ir = inv + g;
                    for (Py_ssize_t c = 0; c < C; c++) qr[c] = quant_one(xr[c], lr[c], ir[c], top);
                } else {
                    const float lr = lo[l * T + t], ir = inv[l * T + t];
                    for (Py_ssize_t c = 0; c < C; c++) qr[c] = quant_one(xr[c], lr, ir, top);
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&xb); PyBuffer_Release(&lob); PyBuffer_Release(&invb); PyBuffer_Release(&bmb);
    PyBuffer_Release(&qb);
    return ret;
}

RANSC_DOC(ransc_round_keys_doc,
"round_keys(x, layers, tokens, channels, lo, inv, step, bm1, cols, factor, recip, heads, head_dim, q_out)\n\n"
"rounding.round_keys for a per-channel grid: per (layer, token, head) the channels are rounded in the\n"
"order cols gives, each one's error fed to the later ones along the profile factor. Every step one\n"
"IEEE fp32 operation in the reference's order (built with -ffp-contract=off), so the symbols equal\n"
"the torch reference's. x fp32 [L, T, C]; lo, inv, step fp32 [L, nseg, C]; bm1 fp32 [L]; cols int64\n"
"[L, C] (head h's channels in rounding order at h*head_dim ..); factor fp32 [L, heads, D, D]; recip\n"
"fp32 [L, heads, D]: the reciprocals of factor's diagonal.");

/* One block of up to RK_TOKENS tokens (t0 ..) of one (layer, head): rounding.round_keys' loop, with
 * the error feedback across the block's tokens (contiguous, fixed length: vectorised). buf: scratch
 * [D][RK_TOKENS]. Each product is rounded before its difference (-ffp-contract=off: no FMA). */
#define RK_TOKENS 32
static void rk_block(float *restrict buf, const float *x, uint8_t *q, const int64_t *cr, const float *f,
                     const float *r, const float *lo, const float *inv, const float *st, float top,
                     Py_ssize_t l, Py_ssize_t t0, Py_ssize_t nt, Py_ssize_t T, Py_ssize_t C, Py_ssize_t nseg,
                     Py_ssize_t D) {
    for (Py_ssize_t k = 0; k < D; k++)
        for (Py_ssize_t i = 0; i < RK_TOKENS; i++)
            buf[k * RK_TOKENS + i] = i < nt ? x[(l * T + t0 + i) * C + cr[k]] : 0.0f;
    for (Py_ssize_t k = 0; k < D; k++) {
        const Py_ssize_t c = cr[k];
        const float rk = r[k];
        const float *bk = buf + k * RK_TOKENS;
        float e[RK_TOKENS] = {0};
        for (Py_ssize_t i = 0; i < nt; i++) {
            const Py_ssize_t t = t0 + i, g = (l * nseg + t / SEGMENT) * C + c;
            const uint8_t v = quant_one(bk[i], lo[g], inv[g], top);
            q[(l * T + t) * C + c] = v;
            float y = (float)v * st[g];
            y = y + lo[g];
            const float d = bk[i] - y;
            e[i] = d * rk;
        }
        const float *fr = f + k * D;
        for (Py_ssize_t j = k + 1; j < D; j++) {
            const float fj = fr[j];
            float *restrict bj = buf + j * RK_TOKENS;
            for (Py_ssize_t i = 0; i < RK_TOKENS; i++) {
                const float u = e[i] * fj;
                bj[i] = bj[i] - u;
            }
        }
    }
}

PyObject *ransc_round_keys(PyObject *self, PyObject *args) {
    Py_buffer xb = {0}, lob = {0}, invb = {0}, stb = {0}, bmb = {0}, colb = {0}, fb = {0}, rb = {0}, qb = {0};
    Py_ssize_t layers, tokens, channels, heads, hd;
    Shape sh;
    PyObject *ret = NULL;
    float *buf = NULL;
    if (!PyArg_ParseTuple(args, "y*nnny*y*y*y*y*y*y*nnw*", &xb, &layers, &tokens, &channels, &lob, &invb, &stb,
                          &bmb, &colb, &fb, &rb, &heads, &hd, &qb))
        return NULL;
    if (shape_from(layers, tokens, channels, &sh) < 0) goto done;
    if (heads < 1 || hd < 1 || heads * hd != channels) {
        PyErr_SetString(PyExc_ValueError, "heads * head_dim must equal channels");
        goto done;
    }
    Py_ssize_t n = layers * tokens * channels, groups = layers * sh.nseg * channels;
    if (need(&xb, n * (Py_ssize_t)sizeof(float), "x") < 0 || need(&qb, n, "q") < 0
        || need(&lob, groups * (Py_ssize_t)sizeof(float), "lo") < 0
        || need(&invb, groups * (Py_ssize_t)sizeof(float), "inv") < 0
        || need(&stb, groups * (Py_ssize_t)sizeof(float), "step") < 0
        || need(&bmb, layers * (Py_ssize_t)sizeof(float), "bm1") < 0
        || need(&colb, layers * channels * (Py_ssize_t)sizeof(int64_t), "cols") < 0
        || need(&fb, layers * heads * hd * hd * (Py_ssize_t)sizeof(float), "factor") < 0
        || need(&rb, layers * heads * hd * (Py_ssize_t)sizeof(float), "recip") < 0)
        goto done;
    {
        const int64_t *cols = (const int64_t *)colb.buf;
        for (Py_ssize_t i = 0; i < layers * channels; i++)
            if (cols[i] < 0 || cols[i] >= channels) {
                PyErr_SetString(PyExc_ValueError, "cols holds a channel out of range");
                goto done;
            }
    }
    buf = (float *)PyMem_RawCalloc((size_t)hd * RK_TOKENS, sizeof(float));
    if (buf == NULL) { PyErr_NoMemory(); goto done; }
    {
        const float *x = (const float *)xb.buf, *lo = (const float *)lob.buf, *inv = (const float *)invb.buf;
        const float *st = (const float *)stb.buf, *bm = (const float *)bmb.buf, *F = (const float *)fb.buf;
        const float *R = (const float *)rb.buf;
        const int64_t *cols = (const int64_t *)colb.buf;
        uint8_t *q = (uint8_t *)qb.buf;
        const Py_ssize_t T = tokens, C = channels, D = hd;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t l = 0; l < layers; l++)
            for (Py_ssize_t h = 0; h < heads; h++)
                for (Py_ssize_t t0 = 0; t0 < T; t0 += RK_TOKENS)
                    rk_block(buf, x, q, cols + l * C + h * D, F + (l * heads + h) * D * D, R + (l * heads + h) * D,
                             lo, inv, st, bm[l], l, t0, T - t0 < RK_TOKENS ? T - t0 : RK_TOKENS, T, C, sh.nseg, D);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyMem_RawFree(buf);
    PyBuffer_Release(&xb); PyBuffer_Release(&lob); PyBuffer_Release(&invb); PyBuffer_Release(&stb);
    PyBuffer_Release(&bmb); PyBuffer_Release(&colb); PyBuffer_Release(&fb); PyBuffer_Release(&rb);
    PyBuffer_Release(&qb);
    return ret;
}

RANSC_DOC(ransc_dequantize_doc,
"dequantize(q, layers, tokens, channels, lo, step, per_channel, y_out)\n\n"
"quant.dequantize's elementwise step in one pass: y = float(q) * step + lo (two IEEE fp32 operations,\n"
"as torch does them). q uint8 [L, T, C] -> y fp32 [L, T, C]; lo, step fp32 [L, nseg, C] (per_channel)\n"
"or [L, T].");

PyObject *ransc_dequantize(PyObject *self, PyObject *args) {
    Py_buffer qb = {0}, lob = {0}, stb = {0}, yb = {0};
    Py_ssize_t layers, tokens, channels;
    int per_channel;
    Shape sh;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnny*y*pw*", &qb, &layers, &tokens, &channels, &lob, &stb, &per_channel, &yb))
        return NULL;
    if (shape_from(layers, tokens, channels, &sh) < 0) goto done;
    Py_ssize_t n = layers * tokens * channels;
    Py_ssize_t groups = per_channel ? layers * sh.nseg * channels : layers * tokens;
    if (need(&qb, n, "q") < 0 || need(&yb, n * (Py_ssize_t)sizeof(float), "y") < 0
        || need(&lob, groups * (Py_ssize_t)sizeof(float), "lo") < 0
        || need(&stb, groups * (Py_ssize_t)sizeof(float), "step") < 0)
        goto done;
    {
        const uint8_t *q = (const uint8_t *)qb.buf;
        const float *lo = (const float *)lob.buf, *st = (const float *)stb.buf;
        float *y = (float *)yb.buf;
        const Py_ssize_t T = tokens, C = channels, nseg = sh.nseg;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t l = 0; l < layers; l++) {
            for (Py_ssize_t t = 0; t < T; t++) {
                const uint8_t *qr = q + (l * T + t) * C;
                float *yr = y + (l * T + t) * C;
                if (per_channel) {
                    const Py_ssize_t g = (l * nseg + t / SEGMENT) * C;
                    const float *lr = lo + g, *sr = st + g;
                    for (Py_ssize_t c = 0; c < C; c++) {
                        float v = (float)qr[c] * sr[c];
                        yr[c] = v + lr[c];
                    }
                } else {
                    const float lr = lo[l * T + t], sr = st[l * T + t];
                    for (Py_ssize_t c = 0; c < C; c++) {
                        float v = (float)qr[c] * sr;
                        yr[c] = v + lr;
                    }
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&qb); PyBuffer_Release(&lob); PyBuffer_Release(&stb); PyBuffer_Release(&yb);
    return ret;
}

/* ---- protected rows: exact sums of fp16 magnitudes ---------------------------------------------- */

RANSC_DOC(ransc_row_sums_doc,
"row_sums(h, rows, channels, out)\n\n"
"out[r] = sum over c of |h[r, c]| as float64, exactly, for fp16 bit patterns h uint16 [rows, C]\n"
"(finite values): each term is an integer number of 2**-24 units, summed in int64; C <= 8192 keeps\n"
"the total below 2**53 units, so the float64 result is exact (codec.protected_rows).");

PyObject *ransc_row_sums(PyObject *self, PyObject *args) {
    Py_buffer hb = {0}, ob = {0};
    Py_ssize_t rows, channels;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nnw*", &hb, &rows, &channels, &ob)) return NULL;
    if (rows < 0 || channels < 1 || channels > 8192) {
        PyErr_SetString(PyExc_ValueError, "rows >= 0 and 1 <= channels <= 8192 required");
        goto done;
    }
    if (need(&hb, rows * channels * (Py_ssize_t)sizeof(uint16_t), "h") < 0
        || need(&ob, rows * (Py_ssize_t)sizeof(double), "out") < 0)
        goto done;
    {
        const uint16_t *h = (const uint16_t *)hb.buf;
        double *out = (double *)ob.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            const uint16_t *hr = h + r * channels;
            int64_t acc = 0;
            for (Py_ssize_t c = 0; c < channels; c++) {
                unsigned e = (hr[c] >> 10) & 31u, m = hr[c] & 1023u;
                /* subnormal: m units; normal: (1024 + m) * 2**(e - 1) units of 2**-24 */
                acc += e ? (int64_t)(1024u + m) << (e - 1) : (int64_t)m;
            }
            out[r] = (double)acc * 0x1p-24;
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&hb); PyBuffer_Release(&ob);
    return ret;
}
