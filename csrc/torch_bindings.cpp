// Every compiled op of layerroute_rt: schemas (`Tensor(a!)` marks what an op writes) and their
// CPU and CUDA kernels. Python wrappers and fake (meta) impls live in layerroute_rt/ops.py.
// New ops: declare the schema here, add the kernels, and a wrapper plus register_fake there.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(layerroute, m) {
  m.def("compact_rows(Tensor mask) -> (Tensor index, Tensor count)");
}

TORCH_LIBRARY_IMPL(layerroute, CPU, m) {
  m.impl("compact_rows", &layerroute::compact_rows_cpu);
}

#ifdef LAYERROUTE_WITH_CUDA
TORCH_LIBRARY_IMPL(layerroute, CUDA, m) {
  m.impl("compact_rows", &layerroute::compact_rows_cuda);
}
#endif

// An empty Python module, so that `import layerroute_rt._C` loads this library and the static
// registrations above run.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "layerroute_rt's compiled ops, as torch.ops.layerroute.*",
      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
