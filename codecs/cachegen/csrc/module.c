/* The `_ransc` module: its method table and error codes. */
#include "ransc.h"

static PyMethodDef methods[] = {
    {"histogram", ransc_histogram, METH_VARARGS, ransc_histogram_doc},
    {"choose", ransc_choose, METH_VARARGS, ransc_choose_doc},
    {"encode", ransc_encode, METH_VARARGS, ransc_encode_doc},
    {"decode", ransc_decode, METH_VARARGS, ransc_decode_doc},
    {"models", ransc_models, METH_VARARGS, ransc_models_doc},
    {"quantize", ransc_quantize, METH_VARARGS, ransc_quantize_doc},
    {"row_sums", ransc_row_sums, METH_VARARGS, ransc_row_sums_doc},
    {"dequantize", ransc_dequantize, METH_VARARGS, ransc_dequantize_doc},
    {"round_keys", ransc_round_keys, METH_VARARGS, ransc_round_keys_doc},
    {"predict", ransc_predict, METH_VARARGS, ransc_predict_doc},
    {"predict_parts", ransc_predict_parts, METH_VARARGS, ransc_predict_parts_doc},
    {"predict_fixed", ransc_predict_fixed, METH_VARARGS, ransc_predict_fixed_doc},
    {"to_fixed", ransc_to_fixed, METH_VARARGS, ransc_to_fixed_doc},
    {"f16_bounds", ransc_f16_bounds, METH_VARARGS, ransc_f16_bounds_doc},
    {"quantize_layer", ransc_quantize_layer, METH_VARARGS, ransc_quantize_layer_doc},
    {"layer_residual", ransc_layer_residual, METH_VARARGS, ransc_layer_residual_doc},
    {"side_encode", ransc_side_encode, METH_VARARGS, ransc_side_encode_doc},
    {"side_decode", ransc_side_decode, METH_VARARGS, ransc_side_decode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ransc",
    "Compiled rANS coder for the cachegen CPU path (byte-identical to rans.py; see native.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__ransc(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "ERR_COUNT_RANGE", ERR_COUNT_RANGE) < 0
        || PyModule_AddIntConstant(m, "ERR_COUNT_SUM", ERR_COUNT_SUM) < 0
        || PyModule_AddIntConstant(m, "ERR_CENTER", ERR_CENTER) < 0
        || PyModule_AddIntConstant(m, "ERR_TABLE", ERR_TABLE) < 0
        || PyModule_AddIntConstant(m, "ERR_FINAL", ERR_FINAL) < 0
        || PyModule_AddIntConstant(m, "ERR_ALPHABET", ERR_ALPHABET) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
