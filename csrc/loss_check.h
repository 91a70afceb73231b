// The loss side of the check, once for both backends: Detector.detect_loss (a loss spike or a
// non-finite loss, the loss's running statistics updated) and StepLoss (a step's micro-batch losses:
// their mean, the worst spike, the flags OR-ed), for one observed loss, in double precision. The
// Python Detector and StepLoss are its oracle (tests/test_loss_check.py).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "check.h"

namespace gradwatch::check {

constexpr double kLossMinSpike = 0.1;          // a spike is at least this far above the mean on that scale
constexpr int kLossPacket = 3 + kNumKinds;     // _records.encode_loss: mean, spike value, its threshold, flags
constexpr int kLossPacketWords = kLossPacket + 1;  // and the running total of the step's losses
constexpr int kLossConfigSize = 5;

struct LossConfig {
  double sigma;
  int64_t warmup;
  int64_t clamp_after;
  double huber;
  double ema;
};

inline namespace GRADWATCH_CHECK_ISA {

// The micro_batch-th loss (1-based) of a step: judged, learned, and folded into the step's packet
// (float64 [kLossPacketWords]) and flags (bool [kNumKinds]); the first one resets both.
C10_HOST_DEVICE inline void observe_loss(const LossConfig& c, double* mean, double* var, int64_t* count, double value,
                                         int64_t micro_batch, double* packet, bool* flags) {
  const double y = ::asinh(value / kLossUnit);
  const bool armed = *count >= c.warmup;
  const double limit = armed ? *mean + clamp_min(c.sigma * sqrt_clamped(*var), kLossMinSpike) : inf();
  const bool ok = finite(value);
  const bool spike = armed && ok && y > limit;
  update_running(*mean, *var, *count, y, finite(y), spike, c.huber, c.clamp_after, c.ema);
  const double threshold = kLossUnit * ::sinh(limit);
  double& total = packet[kLossPacket];
  if (micro_batch <= 1) {
    for (int k = 0; k < kNumKinds; ++k) flags[k] = false;
    total = value;
    packet[1] = value;
    packet[2] = threshold;
  } else {
    // the worst spiking micro-batch is what a spike event reports
    const bool worse = spike && (!flags[kLossSpike] || value > packet[1]);
    if (worse) {
      packet[1] = value;
      packet[2] = threshold;
    }
    total += value;
  }
  flags[kLossNonfinite] = flags[kLossNonfinite] || !ok;
  flags[kLossSpike] = flags[kLossSpike] || spike;
  packet[0] = total / static_cast<double>(micro_batch <= 1 ? 1 : micro_batch);
  for (int k = 0; k < kNumKinds; ++k) packet[3 + k] = flags[k] ? 1.0 : 0.0;
}

}  // namespace GRADWATCH_CHECK_ISA

// Parses loss_check's float[] config (layout: gradwatch/fused_check.py, loss_config); error or null.
inline const char* parse_loss_config(const double* v, int64_t size, LossConfig& c) {
  if (size != kLossConfigSize) return "config must have 5 entries (sigma, warmup, clamp_after, huber, ema)";
  c = LossConfig{v[0], static_cast<int64_t>(v[1]), static_cast<int64_t>(v[2]), v[3], v[4]};
  return nullptr;
}

}  // namespace gradwatch::check
