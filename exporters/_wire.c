/* Placeholder: filled in by the per-record hot path work (issue 9). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_wire", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__wire(void) { return PyModule_Create(&moddef); }
