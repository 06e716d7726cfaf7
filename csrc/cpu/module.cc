// Python module exposing the CPU FFI handlers as capsules: {target name: capsule}, and the rules
// the lowering asks of C++: the conv family's CUDA workspace (csrc/common/conv_workspace.h) and
// plan (csrc/common/conv_plan.h), so that each is computed in one place for the lowering and the
// kernels.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "conv_plan.h"
#include "conv_workspace.h"
#include "targets.h"

namespace nb = nanobind;
namespace jcn = jax_convnet;

JCN_FOR_EACH_TARGET(JCN_DECLARE_CPU)

namespace {

int64_t attr(const nb::dict& attrs, const char* name) {
  if (!attrs.contains(name)) throw nb::value_error((std::string("missing attribute ") + name).c_str());
  return nb::cast<int64_t>(attrs[name]);
}

// The params and geometry of a conv call from the op (0 filter_acts, 1 image_acts,
// 2 weight_acts), the three tensors' dims and the call's attributes (as the FFI gets them).
struct Call {
  jcn::ConvParams params;
  jcn::ConvGeometry geometry;
};
Call conv_call(int op, const std::vector<int64_t>& images, const std::vector<int64_t>& filters,
               const std::vector<int64_t>& hidden, const nb::dict& attrs) {
  if (op < 0 || op > 2) throw nb::value_error("op must be 0, 1 or 2");
  if (images.size() != 4 || filters.size() != 4 || hidden.size() != 4)
    throw nb::value_error("images, filters and hidden take 4 dims each");
  Call c{{jcn::Layout(attr(attrs, "layout")), attr(attrs, "stride_h"), attr(attrs, "stride_w"),
          attr(attrs, "pad_top"), attr(attrs, "pad_bottom"), attr(attrs, "pad_left"),
          attr(attrs, "pad_right"), attr(attrs, "partial_sum"),
          jcn::Precision(attr(attrs, "precision"))},
         {}};
  const std::string error =
      jcn::make_conv_geometry(c.params, images.data(), filters.data(), hidden.data(), &c.geometry);
  if (!error.empty()) throw nb::value_error(error.c_str());
  return c;
}

// The workspace of a CUDA conv custom call by part (bytes), for the element type and the
// lowering's caps.
nb::dict conv_workspace(int op, const std::vector<int64_t>& images,
                        const std::vector<int64_t>& filters, const std::vector<int64_t>& hidden,
                        const nb::dict& attrs, int64_t itemsize, bool float32, bool batch_known,
                        int64_t fft_cap, int64_t ia_columns_cap, int64_t wa_padded_images_cap) {
  const jcn::ConvGeometry g = conv_call(op, images, filters, hidden, attrs).geometry;
  const jcn::ConvWorkspaceCaps caps{fft_cap, ia_columns_cap, wa_padded_images_cap};
  const jcn::ConvWorkspace w =
      jcn::conv_workspace(jcn::ConvOp(op), g, itemsize, float32, batch_known, caps);
  nb::dict d;
  d["fft"] = w.fft;
  d["ia_columns"] = w.ia_columns;
  d["tf32_copies"] = w.tf32_copies;
  d["wa_partial_sums"] = w.wa_partial_sums;
  d["wa_padded_images"] = w.wa_padded_images;
  d["total"] = w.total();
  return d;
}

// The route of a CUDA conv call with a workspace of `workspace_bytes` on the described device
// (compute capability, SM count, opt-in shared memory per block, TMA kernels usable).
nb::dict conv_plan(int op, const std::vector<int64_t>& images, const std::vector<int64_t>& filters,
                   const std::vector<int64_t>& hidden, const nb::dict& attrs, int64_t itemsize,
                   bool float32, int64_t workspace_bytes, int cc_major, int cc_minor,
                   int64_t sm_count, int64_t smem_optin, bool tma) {
  const Call c = conv_call(op, images, filters, hidden, attrs);
  const jcn::ConvDevice device{cc_major, cc_minor, sm_count, smem_optin, tma};
  const jcn::ConvPlan plan =
      jcn::plan_conv(jcn::ConvOp(op), c.geometry, c.params.pad_bottom, c.params.pad_right,
                     itemsize, float32, device, workspace_bytes);
  nb::dict d;
  d["route"] = std::string(jcn::route_name(plan.route));
  d["tile_n"] = plan.tile_n;
  d["split"] = plan.split;
  return d;
}

}  // namespace

NB_MODULE(_cpu_kernels, m) {
  m.def("registrations", []() {
    nb::dict d;
#define JCN_ADD(name, sym) d[name] = nb::capsule(reinterpret_cast<void*>(sym##Cpu));
    JCN_FOR_EACH_TARGET(JCN_ADD)
#undef JCN_ADD
    return d;
  });
  m.def("conv_workspace", &conv_workspace, nb::arg("op"), nb::arg("images"), nb::arg("filters"),
        nb::arg("hidden"), nb::arg("attrs"), nb::arg("itemsize"), nb::arg("float32"),
        nb::arg("batch_known"), nb::arg("fft_cap"), nb::arg("ia_columns_cap"),
        nb::arg("wa_padded_images_cap"));
  m.def("conv_plan", &conv_plan, nb::arg("op"), nb::arg("images"), nb::arg("filters"),
        nb::arg("hidden"), nb::arg("attrs"), nb::arg("itemsize"), nb::arg("float32"),
        nb::arg("workspace_bytes"), nb::arg("cc_major"), nb::arg("cc_minor"),
        nb::arg("sm_count"), nb::arg("smem_optin"), nb::arg("tma"));
  m.attr("CONV_WORKSPACE_DEFAULT_CAPS") =
      nb::make_tuple(jcn::ConvWorkspaceCaps{}.fft, jcn::ConvWorkspaceCaps{}.ia_columns,
                     jcn::ConvWorkspaceCaps{}.wa_padded_images);
}
