// Merge-rule hash table shared by all UMIM matcher ops (paper §3.1, App. D).
//
// Rule set: int32 `rules` [R, 4]; row r holds the n (2..4) token ids of rule r, then -1s.
// Index:    int32 `index` [capacity], capacity a power of two; each slot is a rule id or -1
//           (empty). Open addressing with linear probing from slot hash & (capacity - 1).
// Hash:     h = n; for each token t: h = (h ^ uint64(t)) * 0x9e3779b97f4a7c15 (the 64-bit
//           golden ratio, as in splitmix64); hash = h ^ (h >> 32), which brings the well-mixed
//           high product bits down to the slot bits. On the rule sets we tried it probes
//           within 5% of an ideal hash; a splitmix64 finalizer would cost find_spans ~15%.
//
// Plain C++ with no torch dependency, so the same code runs on the host and in CUDA kernels.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define UMIM_INLINE static inline __host__ __device__
#else
#define UMIM_INLINE static inline
#endif

namespace umim {

constexpr int kRuleWidth = 4;     // columns of `rules` = longest rule (paper: n <= 4)
constexpr int32_t kNone = -1;     // empty index slot / "no rule"
constexpr int32_t kSingle = -1;   // find_spans: position stays a single token
constexpr int32_t kCovered = -2;  // find_spans: position is inside an earlier span

struct RuleTable {
  const int32_t* rules;  // [R, kRuleWidth]
  const int32_t* index;  // [capacity]
  int64_t capacity;      // power of two
};

// `key` is an n-gram laid out like a rule row: n token ids, then -1s.
UMIM_INLINE uint64_t hash_key(const int32_t* key, int n) {
  uint64_t h = static_cast<uint64_t>(n);
  for (int k = 0; k < n; ++k) h = (h ^ static_cast<uint64_t>(key[k])) * 0x9e3779b97f4a7c15ULL;
  return h ^ (h >> 32);
}

// Slot holding `key`, or else the empty slot where it would be inserted; -1 if the table is
// full (never for tables from build_rule_index, which are at most half full).
UMIM_INLINE int64_t find_slot(const int32_t* key, int n, const RuleTable& table) {
  const uint64_t mask = static_cast<uint64_t>(table.capacity) - 1;
  uint64_t slot = hash_key(key, n) & mask;
  for (int64_t probe = 0; probe < table.capacity; ++probe, slot = (slot + 1) & mask) {
    const int32_t r = table.index[slot];
    if (r == kNone) return static_cast<int64_t>(slot);
    const int32_t* row = table.rules + static_cast<int64_t>(r) * kRuleWidth;
    // Non-short-circuit &: one branch instead of four (measurably faster).
    if ((row[0] == key[0]) & (row[1] == key[1]) & (row[2] == key[2]) & (row[3] == key[3])) {
      return static_cast<int64_t>(slot);
    }
  }
  return -1;
}

// Rule id of the n-gram tokens[0:n], or -1.
UMIM_INLINE int32_t find_rule(const int64_t* tokens, int n, const RuleTable& table) {
  int32_t key[kRuleWidth] = {-1, -1, -1, -1};
  for (int k = 0; k < n; ++k) {
    if (tokens[k] < 0 || tokens[k] > INT32_MAX) return kNone;  // not a possible rule token
    key[k] = static_cast<int32_t>(tokens[k]);
  }
  const int64_t slot = find_slot(key, n, table);
  return slot < 0 ? kNone : table.index[slot];
}

// One pass of pseudocode 3: scan left to right and merge every window of N still-single
// positions that forms a rule of length N. (N is a template argument only for speed.)
template <int N>
UMIM_INLINE void merge_pass(const int64_t* tokens, int64_t len, const RuleTable& table,
                            int32_t* out) {
  for (int64_t i = 0; i + N <= len; ++i) {
    bool all_single = true;
    for (int k = 0; k < N; ++k) all_single = all_single && out[i + k] == kSingle;
    if (!all_single) continue;
    const int32_t r = find_rule(tokens + i, N, table);
    if (r == kNone) continue;
    out[i] = r;
    for (int k = 1; k < N; ++k) out[i + k] = kCovered;
    i += N - 1;
  }
}

// Prefill merge of one sequence (pseudocode 3): passes for n = max_n, ..., 2.
UMIM_INLINE void find_spans_one(const int64_t* tokens, int64_t len, const RuleTable& table,
                                int max_n, int32_t* out) {
  for (int64_t i = 0; i < len; ++i) out[i] = kSingle;
  if (max_n >= 4) merge_pass<4>(tokens, len, table, out);
  if (max_n >= 3) merge_pass<3>(tokens, len, table, out);
  merge_pass<2>(tokens, len, table, out);
}

// Decode-time check of one request (pseudocode 4). `tail` holds the last 4 elements of the
// compressed sequence, newest last; only the last `num_raw` are plain tokens. Returns the
// rule id of the longest n <= min(max_n, num_raw) whose last n tokens form a rule, or -1.
UMIM_INLINE int32_t match_suffix_one(const int64_t* tail, int num_raw, const RuleTable& table,
                                     int max_n) {
  const int hi = num_raw < max_n ? num_raw : max_n;
  for (int n = hi; n >= 2; --n) {
    const int32_t r = find_rule(tail + kRuleWidth - n, n, table);
    if (r != kNone) return r;
  }
  return kNone;
}

}  // namespace umim
