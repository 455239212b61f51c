// umim::find_spans on CUDA: one thread per sequence runs the CPU scan (rule_index.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "rule_index.h"

namespace umim {

void check_find_spans_args(const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                           const at::Tensor& rules, const at::Tensor& index, int64_t max_n);

__global__ void find_spans_kernel(const int64_t* tokens, const int64_t* cu_seqlens,
                                  int64_t num_seqs, RuleTable table, int max_n, int32_t* out) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= num_seqs) return;
  const int64_t start = cu_seqlens[b];
  find_spans_one(tokens + start, cu_seqlens[b + 1] - start, table, max_n, out + start);
}

// cu_seqlens values are trusted here (checking them would need a device sync).
at::Tensor find_spans_cuda(const at::Tensor& tokens_in, const at::Tensor& cu_seqlens_in,
                           const at::Tensor& rules_in, const at::Tensor& index_in, int64_t max_n) {
  check_find_spans_args(tokens_in, cu_seqlens_in, rules_in, index_in, max_n);
  const c10::cuda::OptionalCUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), cu_seqlens = cu_seqlens_in.contiguous();
  const at::Tensor rules = rules_in.contiguous(), index = index_in.contiguous();
  const RuleTable table{rules.data_ptr<int32_t>(), index.data_ptr<int32_t>(), index.size(0)};

  const int64_t num_seqs = cu_seqlens.size(0) - 1;
  at::Tensor out = at::empty({tokens.size(0)}, tokens.options().dtype(at::kInt));
  if (num_seqs == 0 || tokens.size(0) == 0) return out;
  constexpr int kThreads = 128;
  const int64_t blocks = (num_seqs + kThreads - 1) / kThreads;
  find_spans_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      tokens.data_ptr<int64_t>(), cu_seqlens.data_ptr<int64_t>(), num_seqs, table,
      static_cast<int>(max_n), out.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace umim
