// Registers the UMIM matcher ops as torch.ops.umim.* (CPU always, CUDA if built with it).
#include <torch/extension.h>
#include <torch/library.h>

namespace umim {
at::Tensor build_rule_index(const at::Tensor& rules);
at::Tensor find_spans_cpu(const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                          const at::Tensor& rules, const at::Tensor& index, int64_t max_n);
at::Tensor match_suffix_cpu(const at::Tensor& tails, const at::Tensor& num_raw,
                            const at::Tensor& rules, const at::Tensor& index, int64_t max_n);
#ifdef UMIM_WITH_CUDA
at::Tensor find_spans_cuda(const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                           const at::Tensor& rules, const at::Tensor& index, int64_t max_n);
at::Tensor match_suffix_cuda(const at::Tensor& tails, const at::Tensor& num_raw,
                             const at::Tensor& rules, const at::Tensor& index, int64_t max_n);
#endif
}  // namespace umim

TORCH_LIBRARY(umim, m) {
  m.def("build_rule_index(Tensor rules) -> Tensor");
  m.def("find_spans(Tensor tokens, Tensor cu_seqlens, Tensor rules, Tensor index, int max_n)"
        " -> Tensor");
  m.def("match_suffix(Tensor tails, Tensor num_raw, Tensor rules, Tensor index, int max_n)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(umim, CPU, m) {
  m.impl("build_rule_index", &umim::build_rule_index);
  m.impl("find_spans", &umim::find_spans_cpu);
  m.impl("match_suffix", &umim::match_suffix_cpu);
}

#ifdef UMIM_WITH_CUDA
TORCH_LIBRARY_IMPL(umim, CUDA, m) {
  m.impl("find_spans", &umim::find_spans_cuda);
  m.impl("match_suffix", &umim::match_suffix_cuda);
}
#endif

// Empty module so that `import vllm_umim._C` loads the library and runs the registrations.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
