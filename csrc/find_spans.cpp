// umim::find_spans on CPU: prefill span search (paper §3.4, App. D pseudocode 3).
#include <ATen/ATen.h>

#include "rule_index.h"

namespace umim {

void check_rule_table(const at::Tensor& rules, const at::Tensor& index, int64_t max_n);

void check_find_spans_args(const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                           const at::Tensor& rules, const at::Tensor& index, int64_t max_n) {
  check_rule_table(rules, index, max_n);
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.dim() == 1, "tokens must be int64 [N]");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && cu_seqlens.dim() == 1 &&
                  cu_seqlens.size(0) >= 1,
              "cu_seqlens must be int64 [B + 1]");
  TORCH_CHECK(tokens.device() == cu_seqlens.device() && tokens.device() == rules.device(),
              "tokens, cu_seqlens, rules and index must be on the same device");
}

at::Tensor find_spans_cpu(const at::Tensor& tokens_in, const at::Tensor& cu_seqlens_in,
                          const at::Tensor& rules_in, const at::Tensor& index_in, int64_t max_n) {
  check_find_spans_args(tokens_in, cu_seqlens_in, rules_in, index_in, max_n);
  const at::Tensor tokens = tokens_in.contiguous(), cu_seqlens = cu_seqlens_in.contiguous();
  const at::Tensor rules = rules_in.contiguous(), index = index_in.contiguous();
  const RuleTable table{rules.data_ptr<int32_t>(), index.data_ptr<int32_t>(), index.size(0)};

  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const int64_t num_seqs = cu_seqlens.size(0) - 1, num_tokens = tokens.size(0);
  TORCH_CHECK(cu[0] == 0 && cu[num_seqs] == num_tokens,
              "cu_seqlens must start at 0 and end at len(tokens)");
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK(cu[b] <= cu[b + 1], "cu_seqlens must be non-decreasing");
  }
  at::Tensor out = at::empty({num_tokens}, tokens.options().dtype(at::kInt));
  const int64_t* tok = tokens.data_ptr<int64_t>();
  int32_t* span = out.data_ptr<int32_t>();
  for (int64_t b = 0; b < num_seqs; ++b) {
    find_spans_one(tok + cu[b], cu[b + 1] - cu[b], table, static_cast<int>(max_n), span + cu[b]);
  }
  return out;
}

}  // namespace umim
