// The op schemas (declared once, here) and the Python module that loads the kernels.
#include <ATen/Version.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/kernels.h"

// grad_stats returns one packed float64 tensor of shape [N + 1, 3] on the tensors' device.
// Row i < N is (L2 norm, max |x|, non-finite count) of tensors[i]; row N is the same three
// statistics over all tensors (total norm, global max |x|, total non-finite count).
// float64 keeps counts exact past 2^24 and lets a distributed reduction combine rows losslessly.
// The columns are named once, in stats.h (kNorm, kMaxAbs, kNonfinite), with the one combine rule.
// grad_stats_hist returns the same statistics and, from the same read pass, an int64 [N, kHistBins]
// log2 magnitude histogram: row i counts tensors[i]'s elements by zero / floor(log2|x|) binade /
// non-finite (layout in hist.h); each row sums to the tensor's numel. A sibling op rather than a flag,
// so grad_stats keeps its schema and the statistics-only pass stays the code it always was.
// scale_ multiplies tensors[i] in place by factors[i] (float32 or float64, one per tensor): 1 skips
// the tensor, 0 writes zeros, strided and expanded views scale each memory location once, tensors
// that share memory are refused, and version counters are bumped (tensor_list.h, stats.h).
TORCH_LIBRARY(gradwatch, m) {
  m.def("grad_stats(Tensor[] tensors) -> Tensor");
  m.def("grad_stats_hist(Tensor[] tensors) -> (Tensor, Tensor)");
  m.def("scale_(Tensor(a!)[] tensors, Tensor factors) -> ()");
  // grad_check runs the whole check of one step on packed statistics (grad_stats' output): the
  // detector's running state (fstate float64, istate int64, updated in place), every flag kind and
  // the built-in policies' decision, in one call (math: check.h; config and state layout:
  // gradwatch/fused_check.py). Returns (record float64 [L]: the monitor's record payload,
  // factors float64 [n]: what scale_ multiplies each gradient by, skip bool []).
  m.def(
      "grad_check(Tensor packed, Tensor(a!) fstate, Tensor(b!) istate, float[] config, Tensor? index=None, "
      "Tensor? ignore=None, Tensor? loss=None, Tensor? loss_flags=None) -> (Tensor, Tensor, Tensor)");
  // grad_stats_check is grad_stats then grad_check in one op (on CUDA: the task walk, then the
  // rows, row N and the check in one block: two launches). Returns (packed, record, factors, skip).
  m.def(
      "grad_stats_check(Tensor[] tensors, Tensor(a!) fstate, Tensor(b!) istate, float[] config, "
      "Tensor? index=None, Tensor? ignore=None, Tensor? loss=None, Tensor? loss_flags=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // loss_check judges one observed loss and folds it into its step's loss packet, in place: the
  // loss's running statistics (mean, var float64 [1], count int64 [1]), packet float64 [12]
  // (_records.encode_loss's layout, then the running total) and flags bool [8]; micro_batch counts
  // the step's losses from 1 (1 resets the packet). Math: loss_check.h.
  m.def(
      "loss_check(Tensor loss, Tensor(a!) mean, Tensor(b!) var, Tensor(c!) count, Tensor(d!) packet, "
      "Tensor(e!) flags, int micro_batch, float[] config) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradwatch compiled kernels (ops are registered under torch.ops.gradwatch)";
  m.def("cpu_kernel_capability", &gradwatch::cpu::selected_capability,
        "Name of the CPU kernel variant picked for this processor (DEFAULT, AVX2 or AVX512).");
  m.attr("log2_hist_bins") = gradwatch::kHistBins;
  m.attr("log2_hist_min_exp") = gradwatch::kHistMinExp;
  m.attr("log2_hist_max_exp") = gradwatch::kHistMaxExp;
}
