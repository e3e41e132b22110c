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

/* 8-lane helpers for the layer step (GCC vector extensions: ymm where the clone has AVX2, else two
 * xmm). A select is a bitwise blend, so min and max keep the reference's comparisons. */
typedef float ls_vf __attribute__((vector_size(32)));
typedef float ls_vfu __attribute__((vector_size(32), aligned(4)));
typedef int32_t ls_vi __attribute__((vector_size(32)));
#define LS_W 8
/* macros, not functions: a 32-byte vector argument or return value changes the ABI between builds */
#define ls_sel(m, a, b) ((ls_vf)(((ls_vi)(a) & (m)) | ((ls_vi)(b) & ~(m))))
#define ls_abs(v) ((ls_vf)((ls_vi)(v) & (0x7FFFFFFF + (ls_vi){0})))
ALWAYS_INLINE float f_abs(float v) { uint32_t u; memcpy(&u, &v, 4); u &= 0x7FFFFFFFu; memcpy(&v, &u, 4); return v; }

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LS_CLONES
#endif

/* min, max and max |.| of a row of C values (torch.amin, amax, abs().amax: exact, any order). */
LS_CLONES
static void row_reduce(const float *a, Py_ssize_t C, float *mn_out, float *mx_out, float *am_out) {
    float mn = a[0], mx = a[0], am = f_abs(a[0]);
    Py_ssize_t c = 0;
    if (C >= LS_W) {
        ls_vf vmn = *(const ls_vfu *)a, vmx = vmn, vam = ls_abs(vmn);
        for (c = LS_W; c + LS_W <= C; c += LS_W) {
            const ls_vf v = *(const ls_vfu *)(a + c), av = ls_abs(v);
            vmn = ls_sel(v < vmn, v, vmn);
            vmx = ls_sel(v > vmx, v, vmx);
            vam = ls_sel(av > vam, av, vam);
        }
        mn = vmn[0], mx = vmx[0], am = vam[0];
        for (int i = 1; i < LS_W; i++) {
            mn = vmn[i] < mn ? vmn[i] : mn;
            mx = vmx[i] > mx ? vmx[i] : mx;
            am = vam[i] > am ? vam[i] : am;
        }
    }
    for (; c < C; c++) {
        const float v = a[c], av = f_abs(v);
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
        am = av > am ? av : am;
    }
    *mn_out = mn, *mx_out = mx, *am_out = am;
}

/* Per channel min and max over rows t0 .. t1-1 of a [., C] into mn, mx [C]. */
LS_CLONES
static void col_minmax(const float *a, Py_ssize_t t0, Py_ssize_t t1, Py_ssize_t C, float *restrict mn, float *restrict mx) {
    memcpy(mn, a + t0 * C, (size_t)C * sizeof(float));
    memcpy(mx, a + t0 * C, (size_t)C * sizeof(float));
    for (Py_ssize_t t = t0 + 1; t < t1; t++) {
        const float *restrict ar = a + t * C;
        for (Py_ssize_t c = 0; c < C; c++) {
            const float v = ar[c];
            mn[c] = v < mn[c] ? v : mn[c];
            mx[c] = v > mx[c] ? v : mx[c];
        }
    }
}

typedef uint8_t ls_vq __attribute__((vector_size(8)));
typedef uint8_t ls_vb __attribute__((vector_size(32)));

/* quant_one over a row of C values, LS_W lanes at a time: lo and inv per element (lr, ir) or, when
 * lr is NULL, the scalars ls, is. The same fp32 operations as quant_one, lane by lane. */
ALWAYS_INLINE void quant_row(const float *restrict xr, uint8_t *restrict qr, const float *lr, const float *ir,
                             float ls, float is, float top, Py_ssize_t C) {
    const ls_vf zero = {0}, half = zero + 0.5f, topv = zero + top;
    Py_ssize_t c = 0;
    for (; c + LS_W <= C; c += LS_W) {
        const ls_vf lo = lr != NULL ? *(const ls_vfu *)(lr + c) : zero + ls;
        const ls_vf inv = lr != NULL ? *(const ls_vfu *)(ir + c) : zero + is;
        ls_vf v = *(const ls_vfu *)(xr + c) - lo;
        v = v * inv;
        v = v + half;
        ls_vf f = __builtin_convertvector(__builtin_convertvector(v, ls_vi), ls_vf);  /* truncation */
        f = f + __builtin_convertvector(f > v, ls_vf);  /* one step down where that rounded up: floor */
        f = ls_sel(f < zero, zero, f);
        f = ls_sel(f > topv, topv, f);
        const ls_vb bytes = (ls_vb)__builtin_convertvector(f, ls_vi);  /* each lane in 0 .. 255: its low byte */
#if defined(__clang__) || __GNUC__ >= 12
        const ls_vq qv = __builtin_shufflevector(bytes, bytes, 0, 4, 8, 12, 16, 20, 24, 28);
#else  /* GCC before 12: __builtin_shuffle, the low 8 bytes of its result */
        const ls_vb sel = {0, 4, 8, 12, 16, 20, 24, 28};
        const ls_vb packed = __builtin_shuffle(bytes, sel);
        ls_vq qv;
        memcpy(&qv, &packed, sizeof qv);
#endif
        memcpy(qr + c, &qv, sizeof qv);
    }
    for (; c < C; c++) qr[c] = quant_one(xr[c], lr != NULL ? lr[c] : ls, lr != NULL ? ir[c] : is, top);
}

/* quant.quantize's elementwise step over a whole [L, T, C] (ransc_quantize). */
LS_CLONES
static void quantize_all(const float *x, uint8_t *q, const float *lo, const float *inv, const float *bm,
                         Py_ssize_t layers, Py_ssize_t T, Py_ssize_t C, Py_ssize_t nseg, int per_channel) {
    for (Py_ssize_t l = 0; l < layers; l++)
        for (Py_ssize_t t = 0; t < T; t++) {
            const float *xr = x + (l * T + t) * C;
            uint8_t *qr = q + (l * T + t) * C;
            if (per_channel) {
                const Py_ssize_t g = (l * nseg + t / SEGMENT) * C;
                quant_row(xr, qr, lo + g, inv + g, 0.0f, 0.0f, bm[l], C);
            } else {
                quant_row(xr, qr, NULL, NULL, lo[l * T + t], inv[l * T + t], bm[l], C);
            }
        }
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
        quantize_all(x, q, lo, inv, bm, layers, T, C, nseg, per_channel);
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

/* One block of up to RK_TOKENS tokens (t0 ..) of one (layer, head): rounding.round_keys' loop,
 * left-looking: channel k (in rounding order) starts from x and subtracts, in order m = 0 .. k-1,
 * the feedback e_m * f[m, k] of every channel rounded before it: the same operations in the same
 * order per element as the reference's right-looking loop (each product rounded, then the
 * difference; -ffp-contract=off: no FMA), so the same bits. The block's RK_TOKENS tokens are the
 * lanes of RK_V vectors kept in registers over the whole sum, and the errors E [D][RK_TOKENS] of
 * the channels done stay in L1. RK_TOKENS divides SEGMENT, so a block's tokens share one segment:
 * per channel, lo, inv and step are constants of the block. Lanes past the last token (nt <
 * RK_TOKENS) repeat the block's first token (finite values, never stored); every lane's error
 * feeds only its own lane. */
#define RK_TOKENS 64
#define RK_V (RK_TOKENS / 16)
typedef float rk_vf __attribute__((vector_size(64)));
typedef int32_t rk_vi __attribute__((vector_size(64)));

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RK_CLONES
#endif

RK_CLONES
static void rk_block(float *restrict E, const float *x, uint8_t *q, const int64_t *cr, const float *f,
                     const float *r, const float *lo, const float *inv, const float *st, float top,
                     Py_ssize_t l, Py_ssize_t t0, Py_ssize_t nt, Py_ssize_t T, Py_ssize_t C, Py_ssize_t nseg,
                     Py_ssize_t D) {
    const Py_ssize_t gbase = (l * nseg + t0 / SEGMENT) * C;
    const float *xb = x + (l * T + t0) * C;
    uint8_t *qb = q + (l * T + t0) * C;
    const rk_vf zero = {0}, half = zero + 0.5f, topv = zero + top;
    for (Py_ssize_t k = 0; k < D; k++) {
        const Py_ssize_t c = cr[k];
        float lane[RK_TOKENS];
        for (Py_ssize_t i = 0; i < RK_TOKENS; i++) lane[i] = xb[(i < nt ? i : 0) * C + c];
        rk_vf acc[RK_V];
        for (int v = 0; v < RK_V; v++) memcpy(&acc[v], lane + 16 * v, sizeof(rk_vf));
        for (Py_ssize_t m = 0; m < k; m++) {
            const float fm = f[m * D + k];
            const float *em = E + m * RK_TOKENS;
            for (int v = 0; v < RK_V; v++) {
                rk_vf ev;
                memcpy(&ev, em + 16 * v, sizeof(rk_vf));
                const rk_vf u = ev * fm;
                acc[v] = acc[v] - u;
            }
        }
        const float lc = lo[gbase + c], ic = inv[gbase + c], sc = st[gbase + c], rk = r[k];
        float *ek = E + k * RK_TOKENS;
        for (int v = 0; v < RK_V; v++) {
            rk_vf t = acc[v] - lc;
            t = t * ic;
            t = t + half;
            rk_vf fl = __builtin_convertvector(__builtin_convertvector(t, rk_vi), rk_vf);  /* truncation */
            fl = fl + __builtin_convertvector(fl > t, rk_vf);  /* one step down where it rounded up: floor */
            fl = (rk_vf)((rk_vi)fl & ~(fl < zero));
            const rk_vi over = fl > topv;
            fl = (rk_vf)(((rk_vi)fl & ~over) | ((rk_vi)topv & over));
            rk_vf y = fl * sc;
            y = y + lc;
            const rk_vf d = acc[v] - y;
            const rk_vf e = d * rk;
            memcpy(ek + 16 * v, &e, sizeof(rk_vf));
            const rk_vi qi = __builtin_convertvector(fl, rk_vi);
            for (int i = 0; i < 16 && 16 * v + i < nt; i++) qb[(16 * v + i) * C + c] = (uint8_t)qi[i];
        }
    }
}

/* Every (layer, head, token block) of x [L, T, C]: the loop of ransc_round_keys and of the layer step. */
static void round_keys_all(float *buf, const float *x, uint8_t *q, const int64_t *cols, const float *F,
                           const float *R, const float *lo, const float *inv, const float *st, const float *bm,
                           Py_ssize_t layers, Py_ssize_t heads, Py_ssize_t T, Py_ssize_t C, Py_ssize_t nseg,
                           Py_ssize_t D) {
    for (Py_ssize_t l = 0; l < layers; l++)
        for (Py_ssize_t h = 0; h < heads; h++)
            for (Py_ssize_t t0 = 0; t0 < T; t0 += RK_TOKENS)
                rk_block(buf, x, q, cols + l * C + h * D, F + (l * heads + h) * D * D, R + (l * heads + h) * D,
                         lo, inv, st, bm[l], l, t0, T - t0 < RK_TOKENS ? T - t0 : RK_TOKENS, T, C, nseg, D);
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
    buf = (float *)PyMem_RawCalloc((size_t)hd * RK_TOKENS, sizeof(float));  /* E of rk_block */
    if (buf == NULL) { PyErr_NoMemory(); goto done; }
    {
        const float *x = (const float *)xb.buf, *lo = (const float *)lob.buf, *inv = (const float *)invb.buf;
        const float *st = (const float *)stb.buf, *bm = (const float *)bmb.buf, *F = (const float *)fb.buf;
        const float *R = (const float *)rb.buf;
        const int64_t *cols = (const int64_t *)colb.buf;
        uint8_t *q = (uint8_t *)qb.buf;
        const Py_ssize_t T = tokens, C = channels, D = hd;
        Py_BEGIN_ALLOW_THREADS
        round_keys_all(buf, x, q, cols, F, R, lo, inv, st, bm, layers, heads, T, C, sh.nseg, D);
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

/* ---- one (K/V, layer) step of the predicted encoder ---------------------------------------------- */

/* fp32 -> fp16 bits, round to nearest even (IEEE, as torch's .to(torch.float16)); NaN stays NaN. */
static uint16_t f32_to_f16(float value) {
    uint32_t x;
    memcpy(&x, &value, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* >= 65520: rounds to infinity */
    if (ax >= 0x38800000u) {  /* a normal fp16: drop 13 mantissa bits, ties to even */
        uint32_t h = (ax - (112u << 23)) >> 13;
        const uint32_t rem = ax & 0x1FFFu;
        h += rem > 0x1000u || (rem == 0x1000u && (h & 1u));
        return (uint16_t)(sign | h);
    }
    if (ax < 0x33000000u) return (uint16_t)sign;  /* <= 2**-25: zero (the tie included) */
    /* a subnormal fp16: units of 2**-24 */
    const uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u, shift = 126u - e;
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), tie = 1u << (shift - 1u);
    h += rem > tie || (rem == tie && (h & 1u));
    return (uint16_t)(sign | h);
}

static float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u;
    uint32_t x;
    if (e == 31) x = sign | 0x7F800000u | (m << 13);
    else if (e) x = sign | ((e + 112u) << 23) | (m << 13);
    else {
        float v = (float)m * 0x1p-24f;  /* exact */
        memcpy(&x, &v, sizeof x);
        x |= sign;
    }
    float out;
    memcpy(&out, &x, sizeof out);
    return out;
}

/* quant.fp16_round_down: the largest fp16 <= v (v finite fp32); fp16_round_up = -round_down(-v). */
static uint16_t f16_round_down(float v) {
    const uint16_t h = f32_to_f16(v);
    const float hf = f16_to_f32(h);
    if (!(hf > v)) return h;
    if (hf > 0.0f) return (uint16_t)(h - 1u);
    if (hf < 0.0f) return (uint16_t)(h + 1u);
    return 0x8001u;
}

static uint16_t f16_round_up(float v) { return (uint16_t)(f16_round_down(-v) ^ 0x8000u); }

RANSC_DOC(ransc_f16_bounds_doc,
"f16_bounds(x, n, lo_out, hi_out)\n\n"
"quant.fp16_round_down and fp16_round_up of n fp32 values x: lo_out, hi_out uint16 [n] (fp16 bits).");

PyObject *ransc_f16_bounds(PyObject *self, PyObject *args) {
    Py_buffer xb = {0}, lob = {0}, hib = {0};
    Py_ssize_t n;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "y*nw*w*", &xb, &n, &lob, &hib)) return NULL;
    if (n < 0 || need(&xb, n * (Py_ssize_t)sizeof(float), "x") < 0 || need(&lob, 2 * n, "lo") < 0
        || need(&hib, 2 * n, "hi") < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        ((uint16_t *)lob.buf)[i] = f16_round_down(((const float *)xb.buf)[i]);
        ((uint16_t *)hib.buf)[i] = f16_round_up(((const float *)xb.buf)[i]);
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&xb); PyBuffer_Release(&lob); PyBuffer_Release(&hib);
    return ret;
}

#define MODE_CHANNEL 0
#define MODE_TOKEN 1
#define MODE_TOKEN_SYMMETRIC 2
#define MODE_CHANNEL_SHARED_STEP 3

/* q and y of rows 0 .. R-1 (one layer): q = quant_one per element unless have_q (rounded already),
 * y = q * step + lo (+ pred), rows marked in mask replaced by the next restored row. Groups: per
 * (segment, channel) when channel_mode, else per row. */
LS_CLONES
static void quant_dequant_rows(const float *x, uint8_t *q, float *y, const float *lo, const float *inv,
                               const float *st, float top, Py_ssize_t R, Py_ssize_t C, int channel_mode,
                               int have_q, const float *pred, const uint8_t *mask, const float *restored) {
    for (Py_ssize_t t = 0; t < R; t++) {
        const float *restrict xr = x + t * C;
        uint8_t *restrict qr = q + t * C;
        float *restrict yr = y + t * C;
        if (channel_mode) {
            const float *restrict lr = lo + (t / SEGMENT) * C, *restrict ir = inv + (t / SEGMENT) * C;
            const float *restrict sr = st + (t / SEGMENT) * C;
            if (!have_q) quant_row(xr, qr, lr, ir, 0.0f, 0.0f, top, C);
            if (mask != NULL && mask[t]) continue;
            for (Py_ssize_t c = 0; c < C; c++) {
                float v = (float)qr[c] * sr[c];
                yr[c] = v + lr[c];
            }
        } else {
            const float lt = lo[t], it = inv[t], stt = st[t];
            if (!have_q) quant_row(xr, qr, NULL, NULL, lt, it, top, C);
            if (mask != NULL && mask[t]) continue;
            for (Py_ssize_t c = 0; c < C; c++) {
                float v = (float)qr[c] * stt;
                yr[c] = v + lt;
            }
        }
        if (pred != NULL) {
            const float *restrict pr = pred + t * C;
            for (Py_ssize_t c = 0; c < C; c++) yr[c] = yr[c] + pr[c];
        }
    }
    if (mask != NULL)
        for (Py_ssize_t t = 0; t < R; t++)
            if (mask[t]) {
                memcpy(y + t * C, restored, (size_t)C * sizeof(float));
                restored += C;
            }
}

/* quant.quantize_params + quant.grid of one layer x [R, C]: the side tensors (fp16 bits lo16 and
 * hi16, fp32 d32 as quant.side_spec lays out a layer), and per group lo, inv, step fp32: groups
 * [nseg, C] in channel modes, [R] in token modes. Every value as the torch reference computes it:
 * exact min/max, the fp16 bounds, then single fp32 operations. */
static void layer_grid(const float *x, Py_ssize_t R, Py_ssize_t C, Py_ssize_t nseg, int mode, float bm1,
                       uint16_t *lo16, uint16_t *hi16, float *d32, float *lo, float *inv, float *st) {
    if (mode == MODE_CHANNEL || mode == MODE_CHANNEL_SHARED_STEP) {
        for (Py_ssize_t s = 0; s < nseg; s++) {
            const Py_ssize_t t1 = (s + 1) * SEGMENT < R ? (s + 1) * SEGMENT : R;
            float *mn = lo + s * C, *mx = st + s * C;  /* the segment's min and max, then replaced */
            col_minmax(x, s * SEGMENT, t1, C, mn, mx);
            float dmax = 0.0f;
            for (Py_ssize_t c = 0; c < C; c++) {
                const uint16_t l16 = f16_round_down(mn[c]), h16 = f16_round_up(mx[c]);
                lo16[s * C + c] = l16;
                if (mode == MODE_CHANNEL) hi16[s * C + c] = h16;
                const float l32 = f16_to_f32(l16), d = f16_to_f32(h16) - l32;
                lo[s * C + c] = l32;
                st[s * C + c] = d;  /* the span for now */
                dmax = c == 0 || d > dmax ? d : dmax;
            }
            if (mode == MODE_CHANNEL_SHARED_STEP) d32[s] = dmax;
            for (Py_ssize_t c = 0; c < C; c++) {
                const float d = mode == MODE_CHANNEL ? st[s * C + c] : dmax;
                inv[s * C + c] = d > 0.0f ? bm1 / d : 0.0f;
                st[s * C + c] = d / bm1;
            }
        }
        return;
    }
    for (Py_ssize_t t = 0; t < R; t++) {
        float l32, d, mn, mx, am;
        row_reduce(x + t * C, C, &mn, &mx, &am);
        if (mode == MODE_TOKEN_SYMMETRIC) {
            const uint16_t a16 = f16_round_up(am);
            lo16[t] = a16;
            const float af = f16_to_f32(a16);
            l32 = -af;
            d = af - l32;
        } else {
            lo16[t] = f16_round_down(mn);
            hi16[t] = f16_round_up(mx);
            l32 = f16_to_f32(lo16[t]);
            d = f16_to_f32(hi16[t]) - l32;
        }
        lo[t] = l32;
        inv[t] = d > 0.0f ? bm1 / d : 0.0f;
        st[t] = d / bm1;
    }
}

RANSC_DOC(ransc_quantize_layer_doc,
"quantize_layer(x, rows, channels, mode, bm1, lo16_out, hi16_out, d32_out, q_out, y_out, pred, mask,\n"
"               restored, cols, factor, recip, heads, head_dim, flags)\n\n"
"One layer of one of K or V, whole: quant.quantize_params (the side tensors into lo16_out, hi16_out:\n"
"fp16 bits, and d32_out: fp32, as quant.side_spec lays out one layer; unused ones may be empty), the\n"
"symbols (rounded along the profile when flags & 1: cols int64 [C], factor fp32 [heads, D, D], recip\n"
"fp32 [heads, D] of the layer; channel modes only), then the decoded values y = q * step + lo, plus\n"
"pred fp32 [R, C] when flags & 2, with the rows where mask uint8 [R] is 1 replaced, in order, by\n"
"restored fp32 [n, C] when flags & 4. x fp32 [R, C]; bm1 = levels - 1. The same bits as the stage by\n"
"stage path (quantize_half, dequantize_half, the sum and the protected rows of codec.py).");

PyObject *ransc_quantize_layer(PyObject *self, PyObject *args) {
    Py_buffer xb = {0}, lob = {0}, hib = {0}, db = {0}, qb = {0}, yb = {0}, pb = {0}, mb = {0}, rb = {0};
    Py_buffer colb = {0}, fb = {0}, recb = {0};
    Py_ssize_t rows, channels, heads, hd;
    int mode, flags;
    float bm1;
    PyObject *ret = NULL;
    float *scratch = NULL;
    if (!PyArg_ParseTuple(args, "y*nnifw*w*w*w*w*y*y*y*y*y*y*nni", &xb, &rows, &channels, &mode, &bm1, &lob, &hib,
                          &db, &qb, &yb, &pb, &mb, &rb, &colb, &fb, &recb, &heads, &hd, &flags))
        return NULL;
    Shape sh;
    if (shape_from(1, rows, channels, &sh) < 0) goto done;
    if (mode < 0 || mode > 3 || !(bm1 >= 1.0f && bm1 <= 255.0f)) {
        PyErr_SetString(PyExc_ValueError, "mode must be 0..3 and bm1 in [1, 255]");
        goto done;
    }
    const int channel_mode = mode == MODE_CHANNEL || mode == MODE_CHANNEL_SHARED_STEP;
    const Py_ssize_t R = rows, C = channels, nseg = sh.nseg, n = R * C;
    const Py_ssize_t groups = channel_mode ? nseg * C : R;
    const Py_ssize_t side16 = channel_mode ? nseg * C : R;
    if (need(&xb, n * 4, "x") < 0 || need(&qb, n, "q") < 0 || need(&yb, n * 4, "y") < 0
        || need(&lob, side16 * 2, "lo16") < 0
        || ((mode == MODE_CHANNEL || mode == MODE_TOKEN) && need(&hib, side16 * 2, "hi16") < 0)
        || (mode == MODE_CHANNEL_SHARED_STEP && need(&db, nseg * 4, "d32") < 0)
        || ((flags & 2) && need(&pb, n * 4, "pred") < 0) || ((flags & 4) && need(&mb, R, "mask") < 0))
        goto done;
    if (flags & 1) {
        if (!channel_mode || heads < 1 || hd < 1 || heads * hd != C) {
            PyErr_SetString(PyExc_ValueError, "key rounding needs a channel mode and heads * head_dim == channels");
            goto done;
        }
        if (need(&colb, C * 8, "cols") < 0 || need(&fb, heads * hd * hd * 4, "factor") < 0
            || need(&recb, heads * hd * 4, "recip") < 0)
            goto done;
        for (Py_ssize_t i = 0; i < C; i++)
            if (((const int64_t *)colb.buf)[i] < 0 || ((const int64_t *)colb.buf)[i] >= C) {
                PyErr_SetString(PyExc_ValueError, "cols holds a channel out of range");
                goto done;
            }
    }
    Py_ssize_t nrest = 0;
    if (flags & 4) {
        for (Py_ssize_t t = 0; t < R; t++) nrest += ((const uint8_t *)mb.buf)[t] != 0;
        if (need(&rb, nrest * C * 4, "restored") < 0) goto done;
    }
    scratch = (float *)PyMem_RawMalloc(((size_t)3 * groups + (size_t)(hd > 0 ? hd : 1) * RK_TOKENS) * sizeof(float));
    if (scratch == NULL) { PyErr_NoMemory(); goto done; }
    {
        const float *x = (const float *)xb.buf;
        float *lo = scratch, *inv = scratch + groups, *st = scratch + 2 * groups, *E = scratch + 3 * groups;
        uint8_t *q = (uint8_t *)qb.buf;
        float *y = (float *)yb.buf;
        Py_BEGIN_ALLOW_THREADS
        layer_grid(x, R, C, nseg, mode, bm1, (uint16_t *)lob.buf, (uint16_t *)hib.buf, (float *)db.buf, lo, inv, st);
        if (flags & 1)
            round_keys_all(E, x, q, (const int64_t *)colb.buf, (const float *)fb.buf, (const float *)recb.buf,
                           lo, inv, st, &bm1, 1, heads, R, C, nseg, hd);
        quant_dequant_rows(x, q, y, lo, inv, st, bm1, R, C, channel_mode, flags & 1,
                           (flags & 2) ? (const float *)pb.buf : NULL, (flags & 4) ? (const uint8_t *)mb.buf : NULL,
                           (const float *)rb.buf);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyMem_RawFree(scratch);
    PyBuffer_Release(&xb); PyBuffer_Release(&lob); PyBuffer_Release(&hib); PyBuffer_Release(&db);
    PyBuffer_Release(&qb); PyBuffer_Release(&yb); PyBuffer_Release(&pb); PyBuffer_Release(&mb);
    PyBuffer_Release(&rb); PyBuffer_Release(&colb); PyBuffer_Release(&fb); PyBuffer_Release(&recb);
    return ret;
}

RANSC_DOC(ransc_layer_residual_doc,
"layer_residual(target, pred, rows, channels, mode, r_out, spans_out)\n\n"
"r = target - pred (fp32 [R, C]) and the spans predict.residual_levels compares, fp32: spans_out[0 ..\n"
"n-1] of target, spans_out[n .. 2n-1] of r; channel modes: n = 1, the largest (max - min over tokens)\n"
"of any channel; symmetric token mode: n = R, max |.| per token; token mode: n = R, max - min per token.");

PyObject *ransc_layer_residual(PyObject *self, PyObject *args) {
    Py_buffer xb = {0}, pb = {0}, rb = {0}, sb = {0};
    Py_ssize_t rows, channels;
    int mode;
    PyObject *ret = NULL;
    float *mm = NULL;
    if (!PyArg_ParseTuple(args, "y*y*nniw*w*", &xb, &pb, &rows, &channels, &mode, &rb, &sb)) return NULL;
    Shape sh;
    if (shape_from(1, rows, channels, &sh) < 0) goto done;
    if (mode < 0 || mode > 3) { PyErr_SetString(PyExc_ValueError, "mode must be 0..3"); goto done; }
    const int channel_mode = mode == MODE_CHANNEL || mode == MODE_CHANNEL_SHARED_STEP;
    const Py_ssize_t R = rows, C = channels, n = R * C, ns = channel_mode ? 1 : R;
    if (need(&xb, n * 4, "target") < 0 || need(&pb, n * 4, "pred") < 0 || need(&rb, n * 4, "r") < 0
        || need(&sb, 2 * ns * 4, "spans") < 0)
        goto done;
    mm = (float *)PyMem_RawMalloc((size_t)4 * C * sizeof(float));
    if (mm == NULL) { PyErr_NoMemory(); goto done; }
    {
        const float *x = (const float *)xb.buf, *p = (const float *)pb.buf;
        float *r = (float *)rb.buf, *spans = (float *)sb.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) r[i] = x[i] - p[i];
        for (int which = 0; which < 2; which++) {
            const float *a = which ? r : x;
            float *out = spans + which * ns;
            if (channel_mode) {
                float *mn = mm, *mx = mm + C;
                col_minmax(a, 0, R, C, mn, mx);
                float best = 0.0f;
                for (Py_ssize_t c = 0; c < C; c++) {
                    const float d = mx[c] - mn[c];
                    best = c == 0 || d > best ? d : best;
                }
                out[0] = best;
            } else {
                for (Py_ssize_t t = 0; t < R; t++) {
                    float mn, mx, am;
                    row_reduce(a + t * C, C, &mn, &mx, &am);
                    out[t] = mode == MODE_TOKEN_SYMMETRIC ? am : mx - mn;
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyMem_RawFree(mm);
    PyBuffer_Release(&xb); PyBuffer_Release(&pb); PyBuffer_Release(&rb); PyBuffer_Release(&sb);
    return ret;
}
