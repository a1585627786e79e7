// The Welford merge of csrc/common/math.h, as the CUDA kernels use it (each thread's values in
// two passes, then Chan's merge across threads in a shuffle-tree order), against a double
// two-pass reference, on rows far from zero mean and of awkward lengths, split as the kernels
// split them (at most 64 values per thread). Compiled and run by
// tests/test_native_math.py; prints the worst relative errors of the mean and the variance.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/common/math.h"

using onestep::Welford;

// One thread's state from its values, as csrc/cuda/rows.cuh's thread_welford computes it.
static Welford thread_state(const std::vector<float>& v) {
  float sum = 0.0f;
  for (float x : v) sum += x;
  const float count = static_cast<float>(v.size());
  const float mean = v.empty() ? 0.0f : sum / count;
  float m2 = 0.0f;
  for (float x : v) m2 += (x - mean) * (x - mean);
  return Welford{mean, m2, count};
}

int main() {
  std::mt19937 rng(1234);
  double worst_mean = 0.0, worst_var = 0.0;
  const int widths[] = {1, 7, 64, 384, 1000, 1152, 2432, 3072, 8192};
  const double offsets[] = {0.0, 64.0, 1000.0};
  for (int D : widths) {
    for (double offset : offsets) {
      // as the kernels split a row: at most 64 values per thread (8 vectors of 8), up to 256
      // threads per row
      int fewest = 1;
      while (fewest * 64 < D) fewest *= 2;
      for (int threads = fewest; threads <= 256; threads *= 4) {
        std::normal_distribution<float> normal(static_cast<float>(offset), 1.0f);
        std::vector<float> row(D);
        for (float& x : row) x = normal(rng);
        // thread t holds elements t, t + threads, ... (the kernels' column layout)
        std::vector<Welford> states(threads);
        for (int t = 0; t < threads; ++t) {
          std::vector<float> mine;
          for (int d = t; d < D; d += threads) mine.push_back(row[d]);
          states[t] = thread_state(mine);
        }
        for (int step = 1; step < threads; step *= 2)  // the xor-shuffle tree
          for (int t = 0; t + step < threads; t += 2 * step)
            states[t] = onestep::welford_merge(states[t], states[t + step]);
        double mean = 0.0, m2 = 0.0;
        for (float x : row) mean += x;
        mean /= D;
        for (float x : row) m2 += (x - mean) * (x - mean);
        const double var = m2 / D, got_var = states[0].m2 / states[0].count;
        worst_mean = std::fmax(worst_mean, std::fabs(states[0].mean - mean) / std::sqrt(var + 1e-12));
        if (D > 1) worst_var = std::fmax(worst_var, std::fabs(got_var - var) / var);
        if (states[0].count != static_cast<float>(D)) {
          std::printf("count %g for D=%d\n", states[0].count, D);
          return 1;
        }
      }
    }
  }
  std::printf("%.3g %.3g\n", worst_mean, worst_var);
  return 0;
}
