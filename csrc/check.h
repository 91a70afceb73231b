// The whole check of one step, written once for both backends: the detector's per-stream update and
// flags (gradwatch/detect.py, "detector v2") and the built-in policies' decision
// (gradwatch/policies.py). Plain C++ with C10_HOST_DEVICE functions, double precision; the CPU op
// (cpu/grad_check_cpu.cpp) runs the phases one after the other, the CUDA kernel
// (cuda/grad_check_cuda.cu) runs them in one block, threads over the parameters.
//
// The Python Detector and policies are the readable oracle: every line here mirrors one there, in
// the same order of floating-point operations where that order decides rounding, and
// tests/test_fused_check.py drives both on the same streams (flags identical, statistics within
// 1e-12). Change one, change the other.
//
// A check runs in three phases:
//   1. judge_step (one thread): the total norm's stream and the residual given the loss (its
//      running regression), the early blow-up reference, the rolling window. Decides what the
//      whole step learns (a spiking total blocks learning before arming; a flagged step never
//      widens a spread) and writes the record's head fields it knows.
//   2. judge_param (one call per parameter row, independent): the parameter's log-norm and log
//      share streams: flags, thresholds, z, the Huber-clamped update; writes the row of the record.
//   3. the policies, in decision order: gating ones (zero, skip, raise) from the OR of every row's
//      flag bits, then clipping ones (clip, adaptive_clip) from the factors so far.
//
// Only cuda/grad_check_cuda.cu and cpu/grad_check_cpu.cpp include this file, each compiled once
// (never with a CPU capability's -m flags); the inline namespace keeps that true should a
// per-capability file ever include it (see stats.h).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <math.h>

#ifdef CPU_CAPABILITY
#define GRADWATCH_CHECK_ISA CPU_CAPABILITY
#else
#define GRADWATCH_CHECK_ISA portable
#endif

namespace gradwatch::check {

// Columns of every flag tensor: gradwatch.detect.KINDS (checked by tests/test_fused_check.py).
constexpr int kNonfiniteKind = 0;
constexpr int kNormLimit = 1;
constexpr int kTotalNormLimit = 2;
constexpr int kRollingMean = 3;
constexpr int kSpike = 4;
constexpr int kVanishing = 5;
constexpr int kLossSpike = 6;
constexpr int kLossNonfinite = 7;
constexpr int kNumKinds = 8;

// The record's head: gradwatch._records.Head.
constexpr int kHeadTotalNorm = 0;
constexpr int kHeadMaxAbs = 1;
constexpr int kHeadNonfinite = 2;
constexpr int kHeadClipFactor = 3;
constexpr int kHeadSkip = 4;
constexpr int kHeadRaise = 5;
constexpr int kHeadScalerSkipped = 6;
constexpr int kHeadTotalThreshold = 7;
constexpr int kHeadRollingMean = 8;
constexpr int kHeadTotalZ = 9;
constexpr int kHeadSize = 10;

// Per parameter, after the statistics' columns: spike threshold, vanishing threshold, z, then the
// flags (gradwatch._records.Column).
constexpr int kDetectColumns = 3;

enum PolicyType : int {
  kPolicyZero = 1,          // factors of flagged parameters to 0
  kPolicySkip = 2,          // skip (Skip, Rollback)
  kPolicyRaise = 3,         // consecutive-hit counter; raise and skip when it reaches `after`
  kPolicyClip = 4,          // max-norm clipping
  kPolicyAdaptiveClip = 5,  // clipping to exp(mean + z std) of the log total norm once armed
};

constexpr int kMaxPolicies = 16;
constexpr int kConfigVersion = 1;
constexpr int kConfigHead = 24;     // scalar fields before the policies
constexpr int kPolicyWords = 6;     // per policy: type, kinds mask, extras offset, slot, a, b
constexpr double kTiny = 1e-30;     // log(0) stand-in (detect._TINY)
constexpr double kLossUnit = 0.01;  // loss_scale's unit (detect._LOSS_UNIT)
constexpr double kSmallestFactor = 4.9406564584124654e-324;  // 2**-1074: a clip never rounds to 0

struct PolicySpec {
  int type;
  int kinds;     // bit k: kind k triggers this policy
  int extras;    // offset of its extras (total, limit, coef) in the record's extras; -1: none
  int slot;      // Raise: its counter in the integer state
  double a;      // Clip: max_norm; AdaptiveClip: z; Raise: after
  double b;      // AdaptiveClip: max_norm during warm-up (NaN: none)
};

// DetectorConfig, with the logarithms Python computes (math.log) so that both sides use the same
// doubles. Optional limits are NaN when off. Layout of the float[] it is parsed from: fused_check.py.
struct Config {
  int64_t num_params;
  int64_t warmup;
  int64_t clamp_after;
  int64_t rolling_window;
  int64_t early_steps;
  double sigma;
  double ema;
  double max_norm;
  double max_total_norm;
  double rolling_limit;
  double total_sigma;
  double resid_sigma;
  double huber;
  double log_min_spike;
  double log_total_spike;
  double log_vanishing;
  double log_early_factor;  // NaN: the early blow-up rule is off
  bool per_param;
  int num_policies;
  int num_extras;
  int num_raise;
  PolicySpec policies[kMaxPolicies];
};

// The detector's state, updated in place. Streams (S = 2 N + 2): the parameters' log-norms, the
// total's, the parameters' log shares, the total's residual given the loss.
struct State {
  double* mean;          // [S]
  double* var;           // [S]
  int64_t* count;        // [S]
  double* regression;    // [4] mean x, mean y, cov, var y
  double* early_max;     // [1]
  double* window;        // [rolling_window], oldest first
  int64_t* window_count; // [1]
  int64_t* raise_count;  // [num_raise]
};

struct Inputs {
  const double* packed;      // [n + 1, stride], columns norm, max|g|, non-finite count, ...
  int64_t n;                 // parameter rows
  int64_t stride;            // columns of packed
  const int64_t* index;      // [n] watched parameter of each row, or null (row i is parameter i)
  const bool* ignore;        // scalar or null: a GradScaler's own skip (nothing flagged or learned)
  const double* loss;        // scalar or null: the step's loss (judges the total norm's residual)
  const bool* loss_flags;    // [kNumKinds] or null: flags of the step's losses
};

// What phase 1 hands to the parameters and to the decision.
struct StepInfo {
  bool keep;
  bool finite_total;
  bool step_flagged;  // the total spiked or is not finite: no spread widens this step
  bool block;         // the total spiked before arming (early blow-up): nothing is learned
  bool armed_total;
  double log_total;
  double mean_total;  // before this step's update (AdaptiveClip's limit)
  double std_total;
  int flags;          // the step-level flag bits (row n)
};

// Record layout offsets.
C10_HOST_DEVICE inline int64_t record_columns(int64_t stride) { return stride + kDetectColumns + kNumKinds; }
C10_HOST_DEVICE inline int64_t record_params_offset(const Config& c) { return kHeadSize + 2 * kNumKinds + c.num_extras; }
C10_HOST_DEVICE inline int64_t record_size(const Config& c, int64_t n, int64_t stride) {
  return record_params_offset(c) + n * record_columns(stride);
}

inline namespace GRADWATCH_CHECK_ISA {

C10_HOST_DEVICE inline bool finite(double x) { return x - x == 0.0; }
C10_HOST_DEVICE inline double nan() { return NAN; }
C10_HOST_DEVICE inline double inf() { return INFINITY; }
// torch.clamp_min / clamp_max / maximum semantics: a NaN operand gives NaN.
C10_HOST_DEVICE inline double clamp_min(double x, double lo) { return x < lo ? lo : x; }
C10_HOST_DEVICE inline double clamp_max(double x, double hi) { return x > hi ? hi : x; }
C10_HOST_DEVICE inline double maximum(double a, double b) { return (a != a || b != b) ? nan() : (a > b ? a : b); }
C10_HOST_DEVICE inline double minimum(double a, double b) { return (a != a || b != b) ? nan() : (a < b ? a : b); }
// torch.fmin: a NaN operand is ignored.
C10_HOST_DEVICE inline double fmin_(double a, double b) { return a != a ? b : (b != b ? a : (b < a ? b : a)); }
C10_HOST_DEVICE inline double sqrt_clamped(double var) { return ::sqrt(clamp_min(var, 0.0)); }

// RunningStats' EMA weight: the cumulative mean for the first 1 / (1 - ema) observations.
C10_HOST_DEVICE inline double ema_weight(int64_t count, double ema) {
  return clamp_min(1.0 / static_cast<double>(count + 1), 1.0 - ema);
}

// RunningStats.update_ for one value: learns x where ok; a flagged value moves only the mean; from
// the clamp_after-th observation on, the deviation enters clamped to +-huber sd. The one rule for the
// detector's streams (update_stream) and the loss (loss_check.h).
C10_HOST_DEVICE inline void update_running(double& mean, double& var, int64_t& count, double x, bool ok, bool flagged,
                                           double huber, int64_t clamp_after, double ema) {
  const double m = mean, v = var;
  const int64_t n = count;
  const double half = huber * sqrt_clamped(v);
  double diff = ok ? x - m : 0.0;
  if (n >= clamp_after) diff = minimum(maximum(diff, -half), half);
  const double a = ema_weight(n, ema);
  const double incr = a * diff;
  if (ok && !flagged) var = (1.0 - a) * (v + diff * incr);
  mean = m + incr;
  count = n + (ok ? 1 : 0);
}

C10_HOST_DEVICE inline void update_stream(const Config& c, State& s, int64_t k, double x, bool ok, bool flagged) {
  update_running(s.mean[k], s.var[k], s.count[k], x, ok, flagged, c.huber, c.clamp_after, c.ema);
}

// One stream's judgement (Detector.detect's "adaptive rules, all streams at once").
struct Judgement {
  double mean;
  double std;
  bool armed;
  double z;
  double spike_log;  // log threshold above which x spikes
};

C10_HOST_DEVICE inline Judgement judge(const State& s, int64_t k, double x, bool armable, double sigma,
                                       double floor, double unarmed_limit, const Config& c) {
  Judgement j;
  j.mean = s.mean[k];
  j.std = sqrt_clamped(s.var[k]);
  j.armed = armable && s.count[k] >= c.warmup;
  const double diff = x - j.mean;
  const double up = maximum(sigma * j.std, floor);
  j.z = j.armed ? diff / clamp_min(j.std, 1e-12) : 0.0;
  j.spike_log = j.armed ? j.mean + up : unarmed_limit;
  return j;
}

C10_HOST_DEVICE inline double log_norm(double norm) { return ::log(clamp_min(norm, kTiny)); }

C10_HOST_DEVICE inline int bit(bool on, int kind) { return on ? (1 << kind) : 0; }

// Phase 1: the total norm, its residual given the loss, the early reference, the rolling window.
C10_HOST_DEVICE inline StepInfo judge_step(const Config& c, const Inputs& in, State& s, double* record) {
  const int64_t N = c.num_params;
  const int64_t total_k = N, resid_k = 2 * N + 1;
  const double* row = in.packed + in.n * in.stride;
  StepInfo info;
  info.keep = in.ignore == nullptr || !*in.ignore;
  const double norm_t = row[0];
  info.log_total = log_norm(norm_t);
  info.finite_total = row[2] == 0.0 && finite(info.log_total);

  double resid = 0.0, explained = 0.0, y = 0.0;
  bool resid_ok = false;
  if (in.loss != nullptr) {
    y = ::asinh(*in.loss / kLossUnit);
    const double* r = s.regression;
    const double beta = clamp_max(clamp_min(r[2] / clamp_min(r[3], 1e-12), 0.0), 2.0);
    explained = r[0] + beta * (y - r[1]);
    resid = info.log_total - explained;
    resid_ok = info.finite_total && finite(y);
  }

  double early = inf();
  if (c.log_early_factor == c.log_early_factor && s.count[total_k] >= c.early_steps) {
    early = s.early_max[0] + c.log_early_factor;
  }
  const Judgement t = judge(s, total_k, info.log_total, true, c.total_sigma, c.log_total_spike, early, c);
  const Judgement r = judge(s, resid_k, resid, true, c.resid_sigma, c.log_total_spike, inf(), c);
  const bool total_spike = (info.finite_total && info.log_total > t.spike_log) || (resid_ok && resid > r.spike_log);
  info.armed_total = t.armed;
  info.mean_total = t.mean;
  info.std_total = t.std;
  info.step_flagged = total_spike || !info.finite_total;
  info.block = total_spike && !t.armed;

  const bool learn_t = info.finite_total && !info.block && info.keep;
  const bool learn_r = resid_ok && !info.block && info.keep;
  if (in.loss != nullptr && learn_r && !info.step_flagged) {  // Detector._learn_beta_
    double* g = s.regression;
    const double a = ema_weight(s.count[resid_k], c.ema);
    const double dx = info.log_total - g[0], dy = y - g[1];
    const double n0 = g[0] + a * dx, n1 = g[1] + a * dy;
    const double n2 = (1.0 - a) * (g[2] + a * dx * dy), n3 = (1.0 - a) * (g[3] + a * dy * dy);
    g[0] = n0;
    g[1] = n1;
    g[2] = n2;
    g[3] = n3;
  }
  update_stream(c, s, total_k, info.log_total, learn_t, info.step_flagged);
  update_stream(c, s, resid_k, resid, learn_r, info.step_flagged);
  if (learn_t && s.count[total_k] <= c.early_steps) s.early_max[0] = maximum(s.early_max[0], info.log_total);

  // The rolling window of total norms (Detector._roll_).
  const bool roll = info.finite_total && info.keep;
  const int64_t k = c.rolling_window;
  if (roll) {
    for (int64_t i = 0; i + 1 < k; ++i) s.window[i] = s.window[i + 1];
    s.window[k - 1] = norm_t;
  }
  s.window_count[0] += roll ? 1 : 0;
  double sum = 0.0;
  for (int64_t i = 0; i < k; ++i) sum += s.window[i];
  const double rolling = s.window_count[0] >= k ? sum / static_cast<double>(k) : nan();

  int flags = bit(row[2] > 0.0, kNonfiniteKind) | bit(total_spike, kSpike);
  if (c.max_total_norm == c.max_total_norm) flags |= bit(norm_t > c.max_total_norm, kTotalNormLimit);
  if (c.rolling_limit == c.rolling_limit) flags |= bit(rolling > c.rolling_limit, kRollingMean);
  info.flags = info.keep ? flags : 0;

  // fmin: a NaN loss is ignored (the residual's threshold is then NaN)
  const double total_thr = fmin_(t.spike_log, r.spike_log + explained);
  record[kHeadTotalNorm] = row[0];
  record[kHeadMaxAbs] = row[1];
  record[kHeadNonfinite] = row[2];
  record[kHeadScalerSkipped] = info.keep ? 0.0 : 1.0;
  record[kHeadTotalThreshold] = ::exp(total_thr);
  record[kHeadRollingMean] = rolling;
  record[kHeadTotalZ] = t.z;
  for (int kind = 0; kind < kNumKinds; ++kind) {
    record[kHeadSize + kind] = (info.flags >> kind) & 1 ? 1.0 : 0.0;
    record[kHeadSize + kNumKinds + kind] = 0.0;  // seen by: single process
  }
  return info;
}

// Phase 2, parameter row i: its log-norm and log-share streams. Writes its record row; returns its
// flag bits.
C10_HOST_DEVICE inline int judge_param(const Config& c, const Inputs& in, const StepInfo& info, State& s,
                                       int64_t i, double* record) {
  const int64_t N = c.num_params;
  const int64_t p = in.index == nullptr ? i : in.index[i];
  const int64_t share_k = N + 1 + p;
  const double* row = in.packed + i * in.stride;
  const double norm = row[0];
  const double x = log_norm(norm);
  const bool good = row[2] == 0.0 && finite(x);
  const double xs = x - info.log_total;
  const bool good_s = good && info.finite_total;

  const Judgement j = judge(s, p, x, c.per_param, c.sigma, c.log_min_spike, inf(), c);
  const Judgement js = judge(s, share_k, xs, c.per_param, c.sigma, c.log_min_spike, inf(), c);
  const double down = clamp_max(-c.sigma * j.std, c.log_vanishing);
  const double vanish_log = j.armed ? j.mean + down : -inf();
  const bool spike = good && x > j.spike_log;
  const bool vanish = good && x < vanish_log;
  const bool spike_s = good_s && xs > js.spike_log;

  const bool learn_ok = !info.block && info.keep && c.per_param;
  update_stream(c, s, p, x, good && learn_ok, spike || vanish || info.step_flagged);
  update_stream(c, s, share_k, xs, good_s && learn_ok, spike_s || info.step_flagged);

  int flags = bit(row[2] > 0.0, kNonfiniteKind) | bit(spike || spike_s, kSpike) | bit(vanish, kVanishing);
  if (c.max_norm == c.max_norm) flags |= bit(norm > c.max_norm, kNormLimit);
  if (!info.keep) flags = 0;

  double* out = record + record_params_offset(c) + i * record_columns(in.stride);
  for (int64_t col = 0; col < in.stride; ++col) out[col] = row[col];
  out[in.stride] = ::exp(fmin_(j.spike_log, js.spike_log + info.log_total));
  out[in.stride + 1] = ::exp(vanish_log);
  out[in.stride + 2] = j.z;
  for (int kind = 0; kind < kNumKinds; ++kind) out[in.stride + kDetectColumns + kind] = (flags >> kind) & 1 ? 1.0 : 0.0;
  return flags;
}

// The flag bits of parameter row i, read back from its record row (phase 3 runs after phase 2).
C10_HOST_DEVICE inline int param_flags(const Config& c, const Inputs& in, const double* record, int64_t i) {
  const double* out = record + record_params_offset(c) + i * record_columns(in.stride) + in.stride + kDetectColumns;
  int flags = 0;
  for (int kind = 0; kind < kNumKinds; ++kind) flags |= out[kind] != 0.0 ? (1 << kind) : 0;
  return flags;
}

// The step-level flag bits a policy's "any" sees: the step's, the losses' and every parameter's.
C10_HOST_DEVICE inline int loss_bits(const Inputs& in) {
  int flags = 0;
  if (in.loss_flags != nullptr) {
    for (int kind = 0; kind < kNumKinds; ++kind) flags |= in.loss_flags[kind] ? (1 << kind) : 0;
  }
  return flags;
}

// Phase 3 state of the decision.
struct Decision {
  bool skip;
  bool raise_now;
  double clip_factor;
};

// DecisionContext.flagged(kinds)'s step-level answer.
C10_HOST_DEVICE inline bool hit(const PolicySpec& p, const StepInfo& info, int any_bits) {
  return info.keep && (any_bits & p.kinds) != 0;
}

// A gating policy's step-level part (skip, raise).
C10_HOST_DEVICE inline void gate(const PolicySpec& p, const StepInfo& info, int any_bits, State& s, Decision& d) {
  const bool h = hit(p, info, any_bits);
  if (p.type == kPolicySkip) {
    d.skip = d.skip || h;
  } else if (p.type == kPolicyRaise) {
    int64_t& count = s.raise_count[p.slot];
    if (info.keep) count = h ? count + 1 : 0;
    const bool fire = static_cast<double>(count) >= p.a;
    d.raise_now = d.raise_now || fire;
    d.skip = d.skip || fire;
  }
}

// Zero: parameter i's factor (flagged parameters of its kinds are zeroed).
C10_HOST_DEVICE inline double zero_factor(const PolicySpec& p, const StepInfo& info, int flags, double factor) {
  return (info.keep && (flags & p.kinds) != 0) ? 0.0 : factor;
}

// Clip: parameter i's share of the clipped norm (a zeroed gradient counts 0, even a NaN one).
C10_HOST_DEVICE inline double clip_term(const Inputs& in, int64_t i, double factor) {
  const double v = factor == 0.0 ? 0.0 : in.packed[i * in.stride] * factor;
  return v * v;
}

// Clip / AdaptiveClip: the coefficient from the sum of clip_term; writes the policy's extras.
C10_HOST_DEVICE inline double clip_coef(const PolicySpec& p, const StepInfo& info, double sumsq, double* extras) {
  double limit = p.a;
  bool active = true;
  if (p.type == kPolicyAdaptiveClip) {
    limit = ::exp(info.mean_total + p.a * info.std_total);
    if (p.b != p.b) {
      active = info.armed_total;
    } else if (!info.armed_total) {
      limit = p.b;
    }
  }
  const double total = ::sqrt(sumsq);
  double coef = clamp_max(clamp_min(limit / (total + 1e-6), kSmallestFactor), 1.0);
  if (!(active && finite(total) && info.keep)) coef = 1.0;
  if (p.extras >= 0) {
    extras[p.extras] = total;
    extras[p.extras + 1] = limit;
    extras[p.extras + 2] = coef;
  }
  return coef;
}

C10_HOST_DEVICE inline void write_decision(const Decision& d, double* record) {
  record[kHeadClipFactor] = d.clip_factor;
  record[kHeadSkip] = d.skip ? 1.0 : 0.0;
  record[kHeadRaise] = d.raise_now ? 1.0 : 0.0;
}

}  // namespace GRADWATCH_CHECK_ISA

// A whole number in [lo, hi]: the config's counts, offsets and slots are cast to integers and index
// the state and the record, so a NaN, a fraction or an out-of-range value is refused before the cast.
inline bool whole_in(double x, double lo, double hi) { return x >= lo && x <= hi && x == std::floor(x); }

// Parses the float[] config (layout: gradwatch/fused_check.py, _config); returns an error message or null.
// Every offset and slot the op writes through is checked against the sizes it allocates or checks
// (the record's extras, the Raise counters): a hand-made config gets an error, never a stray write.
inline const char* parse_config(const double* v, int64_t size, Config& c) {
  if (size < kConfigHead) return "config is too short";
  if (v[0] != kConfigVersion) return "config has an unknown version";
  constexpr double kMaxCount = 9007199254740992.0;  // 2**53: every whole double below is exact
  for (const int k : {1, 2, 3, 4, 5}) {
    if (!whole_in(v[k], 0.0, kMaxCount)) return "config has a negative or fractional count (parameters, window...)";
  }
  if (!whole_in(v[19], 0.0, kMaxPolicies)) return "config has too many policies (at most 16)";
  if (!whole_in(v[20], 0.0, 3.0 * kMaxPolicies)) return "config has a bad extras size (0 to 3 per policy)";
  if (!whole_in(v[21], 0.0, kMaxPolicies)) return "config has a bad Raise count (0 to 16)";
  c.num_params = static_cast<int64_t>(v[1]);
  c.warmup = static_cast<int64_t>(v[2]);
  c.clamp_after = static_cast<int64_t>(v[3]);
  c.rolling_window = static_cast<int64_t>(v[4]);
  c.early_steps = static_cast<int64_t>(v[5]);
  c.sigma = v[6];
  c.ema = v[7];
  c.max_norm = v[8];
  c.max_total_norm = v[9];
  c.rolling_limit = v[10];
  c.total_sigma = v[11];
  c.resid_sigma = v[12];
  c.huber = v[13];
  c.log_min_spike = v[14];
  c.log_total_spike = v[15];
  c.log_vanishing = v[16];
  c.log_early_factor = v[17];
  c.per_param = v[18] != 0.0;
  c.num_policies = static_cast<int>(v[19]);
  c.num_extras = static_cast<int>(v[20]);
  c.num_raise = static_cast<int>(v[21]);
  if (c.num_params < 1 || c.rolling_window < 1) return "config has no parameters or an empty window";
  if (c.num_policies < 0 || c.num_policies > kMaxPolicies) return "config has too many policies (at most 16)";
  if (size != kConfigHead + kPolicyWords * c.num_policies) return "config size does not match its policy count";
  for (int i = 0; i < c.num_policies; ++i) {
    const double* w = v + kConfigHead + kPolicyWords * i;
    if (!whole_in(w[0], kPolicyZero, kPolicyAdaptiveClip)) return "config has an unknown policy type";
    if (!whole_in(w[1], 0.0, (1 << kNumKinds) - 1)) return "config has a bad kinds mask";
    if (!whole_in(w[2], -1.0, 3.0 * kMaxPolicies) || !whole_in(w[3], -1.0, kMaxPolicies)) {
      return "config has a bad extras offset or Raise slot";
    }
    c.policies[i] = PolicySpec{static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]),
                               static_cast<int>(w[3]), w[4], w[5]};
    const PolicySpec& p = c.policies[i];
    const bool clips = p.type == kPolicyClip || p.type == kPolicyAdaptiveClip;
    if (clips && p.extras >= 0 && p.extras + 3 > c.num_extras) return "config has a clip's extras past the record's";
    if (p.type == kPolicyRaise && (p.slot < 0 || p.slot >= c.num_raise)) return "config has a Raise slot out of range";
  }
  return nullptr;
}

}  // namespace gradwatch::check
