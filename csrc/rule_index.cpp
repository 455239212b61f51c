// umim::build_rule_index: hash index over the merge rules (paper §3.1); see rule_index.h.
#include <ATen/ATen.h>

#include "rule_index.h"

namespace umim {

// Argument checks shared by every op that reads a (rules, index) pair, on any device.
void check_rule_table(const at::Tensor& rules, const at::Tensor& index, int64_t max_n) {
  TORCH_CHECK(rules.scalar_type() == at::kInt && rules.dim() == 2 && rules.size(1) == kRuleWidth,
              "rules must be int32 [R, 4], got ", rules.scalar_type(), " ", rules.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt && index.dim() == 1, "index must be int32 1-D");
  const int64_t capacity = index.size(0);
  TORCH_CHECK(capacity >= 16 && (capacity & (capacity - 1)) == 0 && capacity >= 2 * rules.size(0),
              "index capacity ", capacity, " is not from build_rule_index(rules)");
  TORCH_CHECK(rules.device() == index.device(), "rules and index must be on the same device");
  TORCH_CHECK(max_n >= 2 && max_n <= kRuleWidth, "max_n must be in [2, 4], got ", max_n);
}

at::Tensor build_rule_index(const at::Tensor& rules_in) {
  TORCH_CHECK(rules_in.device().is_cpu(), "build_rule_index runs on CPU; move rules to CPU");
  TORCH_CHECK(rules_in.scalar_type() == at::kInt && rules_in.dim() == 2 &&
                  rules_in.size(1) == kRuleWidth,
              "rules must be int32 [R, 4], got ", rules_in.scalar_type(), " ", rules_in.sizes());
  const at::Tensor rules = rules_in.contiguous();
  const int64_t num_rules = rules.size(0);
  TORCH_CHECK(num_rules < (int64_t{1} << 30), "too many rules: ", num_rules);

  int64_t capacity = 16;
  while (capacity < 4 * num_rules) capacity *= 2;  // at most 1/4 full: misses rarely probe
  at::Tensor index = at::full({capacity}, kNone, rules.options());

  const RuleTable table{rules.data_ptr<int32_t>(), index.data_ptr<int32_t>(), capacity};
  int32_t* slots = index.data_ptr<int32_t>();
  for (int64_t r = 0; r < num_rules; ++r) {
    const int32_t* row = table.rules + r * kRuleWidth;
    int n = 0;
    while (n < kRuleWidth && row[n] >= 0) ++n;
    for (int k = n; k < kRuleWidth; ++k) {
      TORCH_CHECK(row[k] == -1, "rule ", r, ": token ids must be >= 0 and padded with -1");
    }
    TORCH_CHECK(n >= 2, "rule ", r, " has length ", n, "; rules have 2..4 tokens");
    const int64_t slot = find_slot(row, n, table);  // row is its own key: tokens, then -1s
    TORCH_CHECK(slots[slot] == kNone, "duplicate rule: rule ", r, " equals rule ", slots[slot]);
    slots[slot] = static_cast<int32_t>(r);
  }
  return index;
}

}  // namespace umim
