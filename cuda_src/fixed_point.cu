// The deterministic backward's scale: max |v| over the finite entries of a
// gradient (0 when there are none), as a double, in one reading pass and
// with no temporary but the one-element result. The families' fixed-point
// sums (CuroiFixedSum in curoi_common.cuh) choose their exponent from it.
//
// The result must hold 0 before the launch: every thread (GPU) or
// participant (CPU) folds the largest magnitude it saw into it with an
// atomic maximum, so the order of the folds cannot change it. Magnitudes
// are computed in the accumulation type (float for float32 and half
// precision, whose conversion to double is exact).
#include "curoi_common.cuh"

#if defined(CUROI_GPU_LOOPS)
// Each thread strides over the values; each warp then folds its threads'
// maxima into one before a single atomic (the launch gives few threads:
// curoi._ops caps their number, so few atomics meet at one address).
template <typename T>
CUROI_DEVICE void fixed_point_scale(const T* values, int64_t count,
                                    double* max_abs) {
  typedef typename AccType<T>::type A;
  A largest = (A)0;
  CUDA_1D_KERNEL_LOOP(i, count) {
    const A v = curoi_load<A>(values[i]);
    const A magnitude = v < (A)0 ? -v : v;
    if (curoi_isfinite(magnitude) && magnitude > largest) largest = magnitude;
  }
  const double folded = curoi_warp_max((double)largest);
  if (curoi_warp_leader()) curoi_atomic_max_nonnegative(max_abs, folded);
}
#else
// Each participant scans one contiguous share of the values.
template <typename T>
CUROI_DEVICE void fixed_point_scale(const T* values, int64_t count,
                                    double* max_abs) {
  typedef typename AccType<T>::type A;
  curoi_parallel_shares(count, count, [&](int p, int n) {
    const int64_t begin = count * p / n, end = count * (p + 1) / n;
    A largest = (A)0;
    for (int64_t i = begin; i < end; ++i) {
      const A v = values[i];
      const A magnitude = v < (A)0 ? -v : v;
      if (curoi_isfinite(magnitude) && magnitude > largest) largest = magnitude;
    }
    curoi_atomic_max_nonnegative(max_abs, (double)largest);
  });
}
#endif

#define CUROI_DEFINE_FIXED_POINT(T, suffix)                                   \
  CUROI_KERNEL void fixed_point_scale_##suffix(const T* values, int64_t count, \
                                               double* max_abs) {             \
    fixed_point_scale<T>(values, count, max_abs);                             \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_FIXED_POINT)
