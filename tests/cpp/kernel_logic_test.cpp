// The CUDA kernels' host-checkable logic, on the CPU: the launch plan (tasks, packs, offsets),
// the element walk each thread runs (alignment split, vectors, coverage), the strided layout of
// scale_, and the per-element accumulate / combine / scaled-pass math of ../../csrc/stats.h, which
// the device runs as is. Built with g++ and run by tests/test_kernel_logic.py; prints one line per
// failed check and exits non-zero on any.
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "plan.h"
#include "stats.h"

using namespace gradwatch;
using plan::kChunk;
using plan::kSmall;

static int failures = 0;
static long checks = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    ++checks;                                              \
    if (!(cond)) {                                         \
      if (++failures <= 40) {                              \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                          \
        std::printf("\n");                                 \
      }                                                    \
    }                                                      \
  } while (0)

// ---- the element walk ------------------------------------------------------------------------

// Every element of a flat run visited exactly once over all lanes, vectors 16-byte aligned.
static void check_walk(uintptr_t address, int64_t n, int esize, int stride) {
  const plan::VecSplit s = plan::vec_split(address, n, esize);
  std::vector<int> seen(static_cast<size_t>(n), 0);
  bool aligned = true;
  for (int lane = 0; lane < stride; ++lane) {
    auto vec = [&](int64_t i) {
      aligned = aligned && (address + static_cast<uintptr_t>(i) * esize) % 16 == 0;
      for (int k = 0; k < s.per_vec; ++k) seen[static_cast<size_t>(i + k)] += 1;
    };
    plan::walk(
        s, n, lane, stride, [&](int64_t i) { seen[static_cast<size_t>(i)] += 1; },
        [&](int64_t a, int64_t b, int64_t c, int64_t d) {
          vec(a);
          vec(b);
          vec(c);
          vec(d);
        },
        vec);
  }
  int64_t bad = 0;
  for (int v : seen) bad += v != 1;
  CHECK(bad == 0, "address %% 16 = %d, n = %lld, esize %d, stride %d: %lld elements not visited once",
        int(address % 16), (long long)n, esize, stride, (long long)bad);
  CHECK(aligned, "misaligned vector load at address %% 16 = %d", int(address % 16));
  if (address % esize == 0 && n >= 64) CHECK(s.nvec > 0, "no vectors for an aligned run of %lld", (long long)n);
}

static void test_walk() {
  const int64_t sizes[] = {0, 1, 7, 8, 31, 32, 33, 4095, 4096, 4097, 65535, 65536, 65537, 3 * 65536 + 5};
  for (int esize : {2, 4, 8}) {
    for (int misalign = 0; misalign < 16; misalign += esize) {
      for (int64_t n : sizes) {
        for (int stride : {32, 256}) check_walk(0x10000 + misalign, n, esize, stride);
      }
    }
  }
  check_walk(0x10001, 1000, 4, 32);  // not even element-aligned: all scalar, still complete
}

// ---- the plan --------------------------------------------------------------------------------

static void check_plan(const std::vector<plan::Input>& inputs, const char* what) {
  const plan::Plan p = plan::make_plan(inputs, {});
  CHECK(static_cast<int64_t>(p.words.size()) == p.shape.words(), "%s: table size", what);
  const plan::Table t = plan::view(p.words.data(), p.shape);
  // Tasks of each tensor: in order, contiguous, covering [0, numel) exactly, none empty.
  for (size_t i = 0; i < inputs.size(); ++i) {
    int64_t next = 0;
    for (int64_t k = t.tensor_task_begin[i]; k < t.tensor_task_begin[i + 1]; ++k) {
      const plan::Task task = plan::task_at(t, k);
      CHECK(task.tensor == static_cast<int64_t>(i) && task.offset == next && task.length > 0 &&
                task.length <= kChunk && task.address == inputs[i].address && task.dtype == inputs[i].dtype,
            "%s: tensor %zu task %lld", what, i, (long long)k);
      next += task.length;
    }
    CHECK(next == inputs[i].numel, "%s: tensor %zu covered %lld of %lld", what, i, (long long)next,
          (long long)inputs[i].numel);
  }
  // Blocks: consecutive task ranges covering all tasks; a pack holds only small tasks.
  CHECK(t.block_task_begin[0] == 0 && t.block_task_begin[p.shape.num_blocks] == p.shape.num_tasks, "%s: blocks", what);
  for (int64_t b = 0; b < p.shape.num_blocks; ++b) {
    const int64_t first = t.block_task_begin[b], last = t.block_task_begin[b + 1];
    CHECK(last > first, "%s: empty block %lld", what, (long long)b);
    const bool whole = last - first == 1 && plan::block_reads_whole_task(plan::task_at(t, first).length);
    int64_t elements = 0;
    for (int64_t k = first; k < last; ++k) {
      const int64_t len = plan::task_at(t, k).length;
      elements += len;
      if (!whole) CHECK(len <= kSmall, "%s: block %lld packs a task of %lld", what, (long long)b, (long long)len);
    }
    CHECK(last - first <= plan::kMaxTasksPerPack && elements < kChunk + kSmall, "%s: pack %lld too big", what,
          (long long)b);
  }
}

static void test_plans() {
  std::mt19937_64 rng(7);
  const int64_t edges[] = {0, 1, 7, 4095, 4096, 4097, 65535, 65536, 65537, 3 * 65536 + 5};
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<plan::Input> in;
    const int n = 1 + static_cast<int>(rng() % 40);
    for (int i = 0; i < n; ++i) {
      const int64_t numel = rng() % 3 == 0 ? edges[rng() % 10] : static_cast<int64_t>(rng() % 20000);
      const Dtype dt = static_cast<Dtype>(rng() % 4);
      in.push_back(plan::Input{0x7f0000000000ull + (rng() % 100000) * 2 * element_size(dt), numel, dt, -1});
    }
    check_plan(in, "random list");
  }
  // Pack limits: 20 x 4096, 200 x 1, a small tensor after a large one, empties interleaved.
  check_plan(std::vector<plan::Input>(20, plan::Input{0x1000, 4096, Dtype::Float, -1}), "20 x 4096");
  check_plan(std::vector<plan::Input>(200, plan::Input{0x1000, 1, Dtype::Half, -1}), "200 x 1");
  check_plan({{0x1000, 65537, Dtype::Float, -1}, {0x2000, 3, Dtype::Float, -1}, {0x3000, 0, Dtype::Float, -1},
              {0x4000, 5, Dtype::Double, -1}, {0x5000, 0, Dtype::Float, -1}},
             "small after large, empties");
  // More than 2^31 and 2^32 elements: 64-bit offsets (planning only).
  for (int64_t big : {(int64_t(1) << 31) + 100, (int64_t(1) << 32) + 5}) {
    const plan::Plan p = plan::make_plan({{0x1000, big, Dtype::Half, -1}}, {});
    const plan::Table t = plan::view(p.words.data(), p.shape);
    const plan::Task last = plan::task_at(t, p.shape.num_tasks - 1);
    CHECK(p.shape.num_tasks == (big + kChunk - 1) / kChunk && last.offset + last.length == big &&
              last.offset >= (int64_t(1) << 31),
          "2^31+ plan: %lld tasks, last at %lld", (long long)p.shape.num_tasks, (long long)last.offset);
    check_walk(0x1000 + static_cast<uintptr_t>(last.offset) * 2, last.length, 2, 256);
  }
  // 100k tiny tensors: packs of at most 64, every tensor one task.
  std::vector<plan::Input> tiny;
  for (int i = 0; i < 100000; ++i) tiny.push_back({0x1000 + 64ull * i, 1 + i % 13, Dtype::Float, -1});
  check_plan(tiny, "100k tiny");
  const plan::Plan p = plan::make_plan(tiny, {});
  CHECK(p.shape.num_tasks == 100000 && p.shape.num_blocks == (100000 + 63) / 64, "100k tiny: %lld blocks",
        (long long)p.shape.num_blocks);
}

// ---- strided layouts of scale_ -------------------------------------------------------------------

static std::set<int64_t> brute_force(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  std::set<int64_t> offsets{0};
  for (size_t d = 0; d < sizes.size(); ++d) {
    std::set<int64_t> next;
    for (int64_t o : offsets) {
      for (int64_t k = 0; k < sizes[d]; ++k) next.insert(o + k * strides[d]);
    }
    offsets = next;
  }
  return offsets;
}

static void check_layout(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides, bool ok) {
  plan::StridedLayout l;
  int64_t distinct = -1;
  const std::string why = plan::strided_layout(sizes, strides, &l, &distinct);
  CHECK(why.empty() == ok, "layout accepted=%d, expected %d (%s)", int(why.empty()), int(ok), why.c_str());
  if (!why.empty()) return;
  std::vector<int64_t> words(plan::kLayoutWords);
  words[0] = l.ndim;
  for (int d = 0; d < plan::kMaxDims; ++d) {
    words[1 + d] = l.sizes[d];
    words[1 + plan::kMaxDims + d] = l.strides[d];
  }
  std::multiset<int64_t> got;
  for (int64_t i = 0; i < distinct; ++i) got.insert(plan::offset_of(words.data(), i));
  const std::set<int64_t> want = brute_force(sizes, strides);
  const bool empty = std::find(sizes.begin(), sizes.end(), 0) != sizes.end();
  CHECK(empty ? got.empty() : std::multiset<int64_t>(want.begin(), want.end()) == got,
        "offsets of the layout differ from the distinct memory (%zu vs %zu)", got.size(), want.size());
}

static void test_layouts() {
  check_layout({4, 3}, {0, 1}, true);              // expanded rows
  check_layout({3, 5}, {10, 2}, true);             // every other column
  check_layout({2, 3, 4}, {1, 8, 2}, true);        // permuted, with gaps
  check_layout({5, 1, 7}, {14, 99, 2}, true);      // size-1 dim with any stride
  check_layout({2, 0, 3}, {3, 1, 1}, true);        // empty
  check_layout({6, 4}, {0, 0}, true);              // a scalar expanded
  check_layout({4, 4}, {2, 1}, false);             // overlapping rows (as_strided)
  check_layout({3, 3}, {1, 1}, false);
  std::vector<int64_t> sizes(10, 2), strides(10);
  for (int d = 0; d < 10; ++d) strides[d] = int64_t(1) << (2 * (9 - d) + 1);
  check_layout(sizes, strides, false);             // ten dims that cannot merge
  plan::StridedLayout flat;
  int64_t distinct = 0;
  plan::strided_layout({4, 3}, {3, 1}, &flat, &distinct);
  CHECK(plan::is_flat(flat) && distinct == 12, "a contiguous layout is flat");
}

static void test_overlap() {
  using R = std::vector<std::pair<uintptr_t, uintptr_t>>;
  using P = std::pair<int64_t, int64_t>;
  CHECK(plan::first_overlap(R{{0, 8}, {8, 16}, {100, 104}}).first == -1, "adjacent ranges do not overlap");
  CHECK(plan::first_overlap(R{{100, 200}, {0, 8}, {150, 151}}) == P(0, 2), "contained");
  CHECK(plan::first_overlap(R{{0, 8}, {0, 8}}) == P(0, 1), "the same tensor twice");
  CHECK(plan::first_overlap(R{{0, 0}, {0, 8}}).first == -1, "empty tensors never overlap");
}

// ---- accumulate, combine, scaled pass --------------------------------------------------------

// One task as a group of `size` threads reads it on the device: each lane accumulates its elements
// (float32 lanes folded after each vector group), a fixed tree combines the lanes, and the scaled
// pass runs where needs_scaled_pass says so.
template <typename T>
static Partial task_partial(const std::vector<T>& x, int size) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const plan::VecSplit s = plan::vec_split(reinterpret_cast<uintptr_t>(x.data()), static_cast<int64_t>(x.size()), sizeof(T));
  std::vector<Partial> lanes(size);
  for (int lane = 0; lane < size; ++lane) {
    Accumulator<A> acc;
    auto vec = [&](int64_t i) {
      for (int k = 0; k < s.per_vec; ++k) acc.add(static_cast<A>(x[i + k]));
    };
    plan::walk(
        s, static_cast<int64_t>(x.size()), lane, size, [&](int64_t i) { acc.add(static_cast<A>(x[i])); },
        [&](int64_t a, int64_t b, int64_t c, int64_t d) {
          vec(a);
          vec(b);
          vec(c);
          vec(d);
          acc.fold();
        },
        [&](int64_t i) {
          vec(i);
          acc.fold();
        });
    lanes[lane] = acc.partial();
  }
  for (int offset = size / 2; offset > 0; offset /= 2) {
    for (int l = 0; l < offset; ++l) lanes[l] = combine(lanes[l], lanes[l + offset]);
  }
  Partial p = lanes[0];
  const Dtype dt = std::is_same_v<T, double> ? Dtype::Double : Dtype::Float;
  if (needs_scaled_pass(p, dt)) {
    const int e = scaled_pass_exponent(p.max_abs);
    const double inv = std::ldexp(1.0, -e);
    double sumsq = 0.0;
    for (T v : x) sumsq += scaled_square(static_cast<double>(v), inv);
    p = with_scaled_sumsq(p, sumsq, e);
  }
  return p;
}

template <typename T>
static long double oracle_norm(const std::vector<T>& x) {
  long double s = 0;  // x87 extended: exponent range far beyond float64's squares
  for (T v : x) s += static_cast<long double>(v) * static_cast<long double>(v);
  return std::sqrt(s);
}

static double row_norm(const Partial& p) {
  double row[kNumStats];
  write_row(row, p);
  return row[kNorm];
}

template <typename T>
static void check_norm(const std::vector<T>& x, double rtol, const char* what) {
  for (int size : {32, 256}) {
    const double got = row_norm(task_partial(x, size));
    const long double want = oracle_norm(x);
    const double rel = want == 0 ? std::fabs(got) : static_cast<double>(std::fabs((got - want) / want));
    CHECK(std::isfinite(got) && rel <= rtol, "%s (group %d): norm %.17g, oracle %.17Lg, rel %.2e", what, size, got,
          want, rel);
  }
}

static void test_math() {
  std::mt19937_64 rng(11);
  std::normal_distribution<double> normal;
  for (double scale : {1e-300, 1e-200, 1e-160, 1e-30, 1.0, 1e30, 1e160, 1e200, 1e300}) {
    std::vector<double> x(10000);
    for (double& v : x) v = normal(rng) * scale;
    check_norm(x, 1e-14, "float64 random");
  }
  check_norm(std::vector<double>(5000, 1e305), 1e-14, "float64 1e305: squares overflow");
  check_norm(std::vector<double>(3, 1e-310), 1e-12, "float64 subnormal");
  check_norm(std::vector<double>{1e308, 1e-308, 3.0}, 1e-15, "float64 mixed extremes");
  for (double scale : {1e-38, 1e-30, 1e-20, 1.0, 1e15, 1e19, 1e20, 1e30, 1e37}) {
    std::vector<float> x(65536 + 3);
    for (float& v : x) v = static_cast<float>(normal(rng) * 3.0 + 1.0) * static_cast<float>(scale);
    check_norm(x, 1e-7, "float32 random");
  }
  check_norm(std::vector<float>(5000, 1e20f), 1e-7, "float32 squares overflow (1e20)");
  check_norm(std::vector<float>(5000, 3e38f), 1e-7, "float32 near max");
  check_norm(std::vector<float>(1000, 1e-30f), 1e-7, "float32 squares underflow (1e-30)");

  // NaN and Inf: counted, NaN wins the max, no scaled pass.
  std::vector<float> bad(1000, 1.0f);
  bad[999] = NAN;
  bad[5] = INFINITY;
  const Partial p = task_partial(bad, 256);
  CHECK(p.nonfinite == 2 && std::isnan(p.max_abs) && std::isnan(row_norm(p)), "NaN and Inf in one task");

  // combine: equal exponents add bit for bit; huge + huge stays finite; order of magnitudes.
  Partial a{3.0, 1.0, 0, 0}, b{4.0, 2.0, 1, 0};
  const Partial c = combine(a, b);
  CHECK(c.sumsq == 7.0 && c.max_abs == 2.0 && c.nonfinite == 1 && c.exponent == 0, "plain combine");
  const Partial h = combine(Partial{1e308, 1e154, 0, 0}, Partial{1e308, 1e154, 0, 0});
  CHECK(std::fabs(row_norm(h) / std::sqrt(2e308L) - 1) < 1e-15, "two 1e308 sums of squares");
  Partial total{};
  for (int i = 0; i < 1000; ++i) total = combine(total, Partial{1e300 * 1e8, 0, 0, 0});  // 1e308 each
  CHECK(std::fabs(row_norm(total) / std::sqrt(1e311L) - 1) < 1e-14, "1000 sums of squares of 1e308");
  CHECK(combine(Partial{}, Partial{NAN, NAN, 1, 0}).sumsq != combine(Partial{}, Partial{NAN, NAN, 1, 0}).sumsq,
        "NaN sticks through combine");
  const Partial mixed = combine(Partial{1.0, 1, 0, 600}, Partial{1.0, 1, 0, -600});
  CHECK(row_norm(mixed) == std::ldexp(1.0, 600), "disparate exponents: the small one vanishes");
}

static void test_scale_factors() {
  CHECK(make_scale_factor(1.0).mode == ScaleMode::kSkip, "factor 1 skips");
  CHECK(make_scale_factor(0.0).mode == ScaleMode::kZero && make_scale_factor(-0.0).mode == ScaleMode::kZero,
        "factor +-0 writes zeros");
  CHECK(make_scale_factor(1e-50).mode == ScaleMode::kWide && make_scale_factor(1e40).mode == ScaleMode::kWide,
        "factors float32 cannot hold are wide");
  CHECK(make_scale_factor(0.5).mode == ScaleMode::kNarrow && make_scale_factor(NAN).mode == ScaleMode::kNarrow &&
            make_scale_factor(-INFINITY).mode == ScaleMode::kNarrow,
        "ordinary, NaN and Inf factors multiply");
  CHECK((scale_value<float, float>(1e30f, make_scale_factor(1e-50)) == static_cast<float>(static_cast<double>(1e30f) * 1e-50)),
        "a wide factor does not underflow to 0");
  CHECK((scale_value<float, float>(NAN, make_scale_factor(0.0)) == 0.0f), "zeros clear NaN");
  CHECK(std::isnan(scale_value<float, float>(2.0f, make_scale_factor(NAN))), "a NaN factor gives NaN");
  CHECK((scale_value<double, double>(1e50, make_scale_factor(1e-60)) == 1e50 * 1e-60), "float64 in float64");
  CHECK((scale_value<float, float>(3.0f, make_scale_factor(1.0 / 3.0)) == 3.0f * static_cast<float>(1.0 / 3.0)),
        "narrow: float32 product with the float32 factor");
}

int main() {
  test_walk();
  test_plans();
  test_layouts();
  test_overlap();
  test_math();
  test_scale_factors();
  std::printf("%s: %ld checks, %d failed\n", failures ? "FAILED" : "ok", checks, failures);
  return failures ? 1 : 0;
}
