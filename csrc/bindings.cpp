// Op registration for the extension fastgpt._C: the schemas, the shared input checks and
// the CPU implementations. CUDA implementations register themselves in their .cu files.
#include "adamw.h"

#include <Python.h>
#include <torch/library.h>

namespace fastgpt {

void check_adamw_inputs(const AdamWStep& s, c10::DeviceType device_type) {
  const size_t n = s.params.size();
  TORCH_CHECK(s.grads.size() == n && s.exp_avgs.size() == n && s.exp_avg_sqs.size() == n,
              "adamw_step: params, grads, exp_avgs and exp_avg_sqs must have the same length, "
              "got ", n, ", ", s.grads.size(), ", ", s.exp_avgs.size(), ", ",
              s.exp_avg_sqs.size());
  const c10::Device device = n ? s.params[0].device() : c10::Device(device_type);
  TORCH_CHECK(device.type() == device_type, "adamw_step: expected ", device_type,
              " tensors, got ", device);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& param = s.params[t];
    const at::Tensor* tensors[] = {&param, &s.grads[t], &s.exp_avgs[t], &s.exp_avg_sqs[t]};
    const char* names[] = {"param", "grad", "exp_avg", "exp_avg_sq"};
    for (int k = 0; k < 4; ++k) {
      TORCH_CHECK(tensors[k]->device() == device, "adamw_step: ", names[k], " ", t, " is on ",
                  tensors[k]->device(), ", the params on ", device);
      TORCH_CHECK(tensors[k]->is_contiguous(), "adamw_step: ", names[k], " ", t,
                  " must be contiguous");
      TORCH_CHECK(tensors[k]->numel() == param.numel(), "adamw_step: ", names[k], " ", t,
                  " has ", tensors[k]->numel(), " elements, its param ", param.numel());
    }
    const auto dtype = param.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "adamw_step: param ", t, " must be float32, bfloat16 or float16, got ", dtype);
    TORCH_CHECK(s.grads[t].scalar_type() == dtype, "adamw_step: grad ", t, " is ",
                s.grads[t].scalar_type(), ", its param ", dtype);
    TORCH_CHECK(s.exp_avgs[t].scalar_type() == at::kFloat &&
                    s.exp_avg_sqs[t].scalar_type() == at::kFloat,
                "adamw_step: exp_avg and exp_avg_sq ", t, " must be float32");
  }
  const std::optional<at::Tensor>* scalars[] = {&s.grad_scale, &s.lr_tensor, &s.step_tensor};
  const char* scalar_names[] = {"grad_scale", "lr_tensor", "step_tensor"};
  for (int k = 0; k < 3; ++k) {
    const std::optional<at::Tensor>& t = *scalars[k];
    TORCH_CHECK(!t.has_value() || (t->numel() == 1 && t->scalar_type() == at::kFloat &&
                                   t->device() == device),
                "adamw_step: ", scalar_names[k], " must be a one-element float32 tensor on ",
                device);
  }
}

}  // namespace fastgpt

TORCH_LIBRARY(fastgpt, m) {
  m.def(
      "adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, Tensor? grad_scale, Tensor? lr_tensor=None, "
      "Tensor? step_tensor=None) -> ()");
}

// Attention's shared arithmetic (csrc/philox.h), for the tests and the kernels' test mode:
// the Philox block of a counter, and the (B*H, T, T) dropout keep-mask of a call.
namespace fastgpt {
std::vector<int64_t> philox4x32_10_cpu(int64_t c0, int64_t c1, int64_t c2, int64_t c3,
                                       int64_t k0, int64_t k1);
at::Tensor attention_dropout_mask_cpu(int64_t seed, int64_t offset, int64_t batch_heads,
                                      int64_t seq_len, double p);
}  // namespace fastgpt

TORCH_LIBRARY_FRAGMENT(fastgpt, m) {
  m.def("philox4x32_10(int c0, int c1, int c2, int c3, int k0, int k1) -> int[]",
        &fastgpt::philox4x32_10_cpu);
  m.def("attention_dropout_mask(int seed, int offset, int batch_heads, int seq_len, "
        "float p) -> Tensor",
        &fastgpt::attention_dropout_mask_cpu);
  // (out, lse) of causal attention on q, k, v (B, H, T, D); CUDA only (csrc/attention.cu)
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, float scale, float dropout_p, "
        "int seed, int offset) -> (Tensor, Tensor)");
  // (dq, dk, dv) from the forward's out and lse; CUDA only (csrc/attention.cu)
  m.def("attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor grad_out, float scale, float dropout_p, int seed, int offset, "
        "bool deterministic) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("adamw_step",
         &fastgpt::adamw_step_op<fastgpt::adamw_step_cpu, c10::DeviceType::CPU>);
}

// `import fastgpt._C` loads the library (and so registers the ops); the module is empty.
#define FASTGPT_CONCAT_(a, b) a##b
#define FASTGPT_CONCAT(a, b) FASTGPT_CONCAT_(a, b)
PyMODINIT_FUNC FASTGPT_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
