// Python module exposing the CPU FFI handlers as capsules: {target name: capsule}.
#include <nanobind/nanobind.h>

#include "targets.h"

namespace nb = nanobind;

JCN_FOR_EACH_TARGET(JCN_DECLARE_CPU)

NB_MODULE(_cpu_kernels, m) {
  m.def("registrations", []() {
    nb::dict d;
#define JCN_ADD(name, sym) d[name] = nb::capsule(reinterpret_cast<void*>(sym##Cpu));
    JCN_FOR_EACH_TARGET(JCN_ADD)
#undef JCN_ADD
    return d;
  });
}
