// The extension's Python module.
#include "common.h"
#include "decode_model.h"

// The kernels release the GIL so the server's event loop keeps running while a step computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  // starts, sink: an optional key window per row (attention sinks plus a recent window): row b sees keys
  // t < sink and t >= starts[b]; None sees its whole context.
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache (float32)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("ctx_lens"),
        py::arg("scale"), py::arg("starts") = py::none(), py::arg("sink") = 0, release());
  m.def("kivi_decode_attention", &kivi_decode_attention, "decode attention over a KIVI-quantized cache",
        py::arg("q"), py::arg("cache"), py::arg("tables"), py::arg("lens"), py::arg("slots"), py::arg("bits"),
        py::arg("scale"), py::arg("starts") = py::none(), py::arg("sink") = 0, release());
  m.def("w8a8_linear", &w8a8_linear, "int8-weight linear with on-the-fly int8 activations (AVX2)", release());
  m.def("w4a8_linear", &w4a8_linear, "int4-weight linear with on-the-fly int8 activations (AVX2)", release());
  m.def("dequantize_into", &dequantize_into, "float32 weights from a packed int8 / int4 layer, into a given tensor",
        release());
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension (float32)", release());
  m.def("silu_mul", &silu_mul, "silu(gate) * up for a fused [gate | up] tensor (float32)", release());
  m.def("rope_", &rope_, "rotary embedding in place (float32, half-split layout)", release());
  py::class_<DecodeLinear>(m, "DecodeLinear")
      .def(py::init<int64_t, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>());
  py::class_<DecodeModel>(m, "DecodeModel")
      .def(py::init<int64_t, int64_t, int64_t, double, torch::Tensor>())
      .def("add_layer", &DecodeModel::add_layer)
      .def("forward", &DecodeModel::forward, "all layers for a batch of decode tokens", py::arg("x"),
           py::arg("cos"), py::arg("sin"), py::arg("caches"), py::arg("slots"), py::arg("tables"),
           py::arg("ctx_lens"), py::arg("scale"), py::arg("starts") = py::none(), py::arg("sink") = 0,
           py::arg("alone") = false, py::arg("skip") = py::none(), release())
      .def("forward_kivi", &DecodeModel::forward_kivi, "all layers for a batch of decode tokens, KIVI caches",
           py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("caches"), py::arg("res_index"),
           py::arg("tables"), py::arg("ctx_lens"), py::arg("res_slots"), py::arg("bits"), py::arg("scale"),
           py::arg("starts") = py::none(), py::arg("sink") = 0, release());
}
