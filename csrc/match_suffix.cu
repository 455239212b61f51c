// umim::match_suffix on CUDA: one thread per request runs the CPU check (rule_index.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "rule_index.h"

namespace umim {

void check_match_suffix_args(const at::Tensor& tails, const at::Tensor& num_raw,
                             const at::Tensor& rules, const at::Tensor& index, int64_t max_n);

__global__ void match_suffix_kernel(const int64_t* tails, const int32_t* num_raw, int64_t batch,
                                    RuleTable table, int max_n, int32_t* out) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  out[b] = match_suffix_one(tails + b * kRuleWidth, num_raw[b], table, max_n);
}

at::Tensor match_suffix_cuda(const at::Tensor& tails_in, const at::Tensor& num_raw_in,
                             const at::Tensor& rules_in, const at::Tensor& index_in,
                             int64_t max_n) {
  check_match_suffix_args(tails_in, num_raw_in, rules_in, index_in, max_n);
  const c10::cuda::OptionalCUDAGuard guard(tails_in.device());
  const at::Tensor tails = tails_in.contiguous(), num_raw = num_raw_in.contiguous();
  const at::Tensor rules = rules_in.contiguous(), index = index_in.contiguous();
  const RuleTable table{rules.data_ptr<int32_t>(), index.data_ptr<int32_t>(), index.size(0)};

  const int64_t batch = tails.size(0);
  at::Tensor out = at::empty({batch}, num_raw.options());
  if (batch == 0) return out;
  constexpr int kThreads = 128;
  const int64_t blocks = (batch + kThreads - 1) / kThreads;
  match_suffix_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      tails.data_ptr<int64_t>(), num_raw.data_ptr<int32_t>(), batch, table,
      static_cast<int>(max_n), out.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace umim
