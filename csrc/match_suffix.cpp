// umim::match_suffix on CPU: decode-time merge check (paper §3.4, App. D pseudocode 4).
#include <ATen/ATen.h>

#include "rule_index.h"

namespace umim {

void check_rule_table(const at::Tensor& rules, const at::Tensor& index, int64_t max_n);

void check_match_suffix_args(const at::Tensor& tails, const at::Tensor& num_raw,
                             const at::Tensor& rules, const at::Tensor& index, int64_t max_n) {
  check_rule_table(rules, index, max_n);
  TORCH_CHECK(tails.scalar_type() == at::kLong && tails.dim() == 2 && tails.size(1) == kRuleWidth,
              "tails must be int64 [B, 4], got ", tails.scalar_type(), " ", tails.sizes());
  TORCH_CHECK(num_raw.scalar_type() == at::kInt && num_raw.dim() == 1 &&
                  num_raw.size(0) == tails.size(0),
              "num_raw must be int32 [B]");
  TORCH_CHECK(tails.device() == num_raw.device() && tails.device() == rules.device(),
              "tails, num_raw, rules and index must be on the same device");
}

at::Tensor match_suffix_cpu(const at::Tensor& tails_in, const at::Tensor& num_raw_in,
                            const at::Tensor& rules_in, const at::Tensor& index_in,
                            int64_t max_n) {
  check_match_suffix_args(tails_in, num_raw_in, rules_in, index_in, max_n);
  const at::Tensor tails = tails_in.contiguous(), num_raw = num_raw_in.contiguous();
  const at::Tensor rules = rules_in.contiguous(), index = index_in.contiguous();
  const RuleTable table{rules.data_ptr<int32_t>(), index.data_ptr<int32_t>(), index.size(0)};

  const int64_t batch = tails.size(0);
  at::Tensor out = at::empty({batch}, num_raw.options());
  const int64_t* tail = tails.data_ptr<int64_t>();
  const int32_t* raw = num_raw.data_ptr<int32_t>();
  int32_t* rule = out.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    rule[b] = match_suffix_one(tail + b * kRuleWidth, raw[b], table, static_cast<int>(max_n));
  }
  return out;
}

}  // namespace umim
