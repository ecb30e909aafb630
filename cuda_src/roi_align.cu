// RoI Align (average), forward and backward, with the semantics of
// torchvision, detectron2, mmcv and ONNX RoiAlign:
//   offset = aligned ? 0.5 : 0, start = x1*s - offset, size = (x2-x1)*s,
//   size = max(size, 1) only when not aligned;
//   grid = sampling_ratio if > 0 else ceil(size / pooled);
//   sample i of a bin at start + p*bin + (i + 0.5)*bin/grid;
//   a sample with y < -1 or y > H (x likewise) adds 0 but counts in the
//   divisor max(grid_h*grid_w, 1); otherwise coordinates clamp at 0 and the
//   last row/column uses the edge value.
#include "curoi_common.cuh"

// Largest sample grid per axis that is represented. Only samples that land
// within [-1, size] are visited (see roi_align_axis), so this bound never
// changes a result; it keeps integer conversions defined.
#define CUROI_MAX_GRID 1e15

// Dense sampling: an axis with more than CUROI_DENSE_SAMPLES samples on the
// map, packed closer than CUROI_DENSE_STEP pixels apart, is summed pixel by
// pixel in closed form rather than sample by sample. Adaptive sampling never
// packs samples that densely (its step is at least half a pixel), nor does
// any sampling_ratio up to 64; a huge sampling_ratio would otherwise cost
// grid^2 samples per bin, whatever the size of the map.
#define CUROI_DENSE_SAMPLES 64
#define CUROI_DENSE_STEP 0.25

// Where one output bin samples the map, along one axis.
template <typename A>
struct RoiAlignAxis {
  A base;         // start + p*bin: the bin's first edge
  A bin;          // bin size
  A grid;         // samples per bin (may be huge for a huge box)
  bool dense;     // summed per pixel ("zones", below) instead of per sample
  int64_t first;  // first sample index (dense: first zone) to visit
  int64_t last;   // one past the last one
  // Dense mode: sample i (0 <= i < count) lies at low + (i + 0.5) * step,
  // step > 0 (a reversed box lists the same samples from the other end).
  double low, step;
  int64_t count;
};

// Sample i lies at base + (i + 0.5) * bin / grid. Skipping samples that fall
// outside [-1, size] changes no sum (they add exactly 0), and bounds the work
// by the map size rather than by the box size. The range is found in double
// and widened by two samples on each side; each sample is still tested by the
// exact bilinear rule.
template <typename A>
CUROI_DEVICE RoiAlignAxis<A> roi_align_axis(A roi_start, A roi_size,
                                            int64_t p, int64_t pooled,
                                            int sampling_ratio, int64_t size) {
  RoiAlignAxis<A> axis;
  axis.bin = roi_size / (A)pooled;
  axis.base = roi_start + (A)p * axis.bin;
  axis.grid = sampling_ratio > 0 ? (A)sampling_ratio : ceil(roi_size / (A)pooled);
  axis.dense = false;
  const int64_t n = curoi_clamp_to_int(axis.grid, (A)0, (A)CUROI_MAX_GRID);
  axis.first = 0;
  axis.last = n;
  axis.count = n;
  axis.low = (double)axis.base;
  axis.step = 0.0;
  if (n == 0) return axis;
  const double step = (double)axis.bin / (double)axis.grid;
  if (step == 0.0) return axis;  // every sample at base: test them as they are
  double lo = (-1.0 - (double)axis.base) / step - 0.5;
  double hi = ((double)size - (double)axis.base) / step - 0.5;
  if (step < 0.0) { const double t = lo; lo = hi; hi = t; }
  const int64_t first = curoi_clamp_to_int(ceil(lo) - 2.0, 0.0, (double)n);
  const int64_t last = curoi_clamp_to_int(floor(hi) + 3.0, 0.0, (double)n);
  axis.first = first < n ? first : n;
  axis.last = last < n ? last : n;
  if (axis.last - axis.first > CUROI_DENSE_SAMPLES &&
      fabs(step) < CUROI_DENSE_STEP) {
    axis.dense = true;
    axis.step = fabs(step);
    axis.low = step > 0.0 ? (double)axis.base
                          : (double)axis.base + (double)n * step;
    // Zones -1 .. size-1 (see roi_align_zone), limited to those the samples
    // on the map can reach.
    const double a = axis.low + ((double)axis.first + 0.5) * axis.step;
    const double b = axis.low + ((double)axis.last - 0.5) * axis.step;
    const int64_t zfirst = curoi_clamp_to_int(floor(a) - 1.0, -1.0, (double)size);
    const int64_t zlast = curoi_clamp_to_int(floor(b) + 2.0, -1.0, (double)size);
    axis.first = zfirst;
    axis.last = zlast;
  }
  return axis;
}

// One axis's share of a bilinear read: rows (or columns) lo and hi with
// weights w_lo and w_hi. The 2-D weights are products of the two axes'.
template <typename A>
struct RoiAlignTap {
  int64_t lo, hi;
  A w_lo, w_hi;
};

// Sample i as torchvision interpolates it: outside [-1, size] it adds
// nothing; below 0 it reads the first pixel, at or past size-1 the last.
template <typename A>
CUROI_DEVICE bool roi_align_sample_tap(const RoiAlignAxis<A>& axis, int64_t i,
                                       int64_t size, RoiAlignTap<A>* tap) {
  A v = axis.base + ((A)i + (A)0.5) * axis.bin / axis.grid;
  if (!(v >= (A)-1 && v <= (A)size)) return false;
  if (v <= (A)0) v = (A)0;
  tap->lo = (int64_t)v;
  if (tap->lo >= size - 1) {
    tap->hi = tap->lo = size - 1;
    v = (A)tap->lo;
  } else {
    tap->hi = tap->lo + 1;
  }
  const A l = v - (A)tap->lo;
  tap->w_lo = (A)1 - l;
  tap->w_hi = l;
  return true;
}

// Number of dense samples at or below v (or strictly below v).
CUROI_DEVICE int64_t roi_align_count_upto(double low, double step,
                                          int64_t count, double v,
                                          bool inclusive) {
  const double t = (v - low) / step - 0.5;
  const double k = inclusive ? floor(t) + 1.0 : ceil(t);
  return curoi_clamp_to_int(k, 0.0, (double)count);
}

// The sum of the sample taps over one zone of the axis, in closed form: zone
// -1 is [-1, 0] (all weight on pixel 0), zone z in [0, size-2] is (z, z+1]
// (weights 1 - (v - z) on z and v - z on z+1, summed as an arithmetic
// series), zone size-1 is (size-1, size] (all weight on pixel size-1). The
// zones partition [-1, size]; at their inner edges the weights agree, so the
// values are those of the per-sample sum up to rounding.
template <typename A>
CUROI_DEVICE bool roi_align_zone_tap(const RoiAlignAxis<A>& axis, int64_t z,
                                     int64_t size, RoiAlignTap<A>* tap) {
  const double lo_edge = (double)(z < 0 ? -1 : z);
  const double hi_edge = (double)(z < 0 ? 0 : z + 1);
  const int64_t i0 = roi_align_count_upto(axis.low, axis.step, axis.count,
                                          lo_edge, z >= 0);
  const int64_t i1 = roi_align_count_upto(axis.low, axis.step, axis.count,
                                          hi_edge, true);
  if (i1 <= i0) return false;
  const double n = (double)(i1 - i0);
  if (z < 0 || z >= size - 1) {
    tap->lo = tap->hi = z < 0 ? 0 : size - 1;
    tap->w_lo = (A)n;
    tap->w_hi = (A)0;
    return true;
  }
  // Mean position of samples i0 .. i1-1, less z: the mean weight on z+1.
  const double mean = axis.low + axis.step * (0.5 * (double)(i0 + i1 - 1) + 0.5);
  const double high = n * (mean - (double)z);
  tap->lo = z;
  tap->hi = z + 1;
  tap->w_lo = (A)(n - high);
  tap->w_hi = (A)high;
  return true;
}

template <typename A>
CUROI_DEVICE bool roi_align_tap(const RoiAlignAxis<A>& axis, int64_t e,
                                int64_t size, RoiAlignTap<A>* tap) {
  return axis.dense ? roi_align_zone_tap(axis, e, size, tap)
                    : roi_align_sample_tap(axis, e, size, tap);
}

// The geometry of output bin (ph, pw) of one box. batch_index is -1 for a box
// that must read nothing.
template <typename A>
struct RoiAlignBin {
  int64_t batch_index;
  RoiAlignAxis<A> y, x;
  A count;
};

template <typename A>
CUROI_DEVICE RoiAlignBin<A> roi_align_bin(const A* box, int64_t batch,
                                          int64_t height, int64_t width,
                                          int64_t ph, int64_t pw,
                                          int64_t pooled_height,
                                          int64_t pooled_width,
                                          A spatial_scale, int sampling_ratio,
                                          int aligned) {
  RoiAlignBin<A> bin;
  bin.batch_index = curoi_box_batch(box, batch);
  bin.count = (A)1;
  if (bin.batch_index < 0) return bin;
  const A offset = aligned ? (A)0.5 : (A)0;
  const A start_w = box[1] * spatial_scale - offset;
  const A start_h = box[2] * spatial_scale - offset;
  A roi_w = box[3] * spatial_scale - offset - start_w;
  A roi_h = box[4] * spatial_scale - offset - start_h;
  if (!aligned) {
    roi_w = curoi_max(roi_w, (A)1);
    roi_h = curoi_max(roi_h, (A)1);
  }
  bin.y = roi_align_axis(start_h, roi_h, ph, pooled_height, sampling_ratio, height);
  bin.x = roi_align_axis(start_w, roi_w, pw, pooled_width, sampling_ratio, width);
  // The divisor counts every sample of the grid, inside the map or not.
  // A negative grid (aligned box with x2 < x1) has no samples at all.
  const A gy = curoi_max(bin.y.grid, (A)0), gx = curoi_max(bin.x.grid, (A)0);
  bin.count = curoi_max(gy * gx, (A)1);
  return bin;
}

template <typename T>
CUROI_DEVICE void roi_align_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    T* output) {
  typedef typename AccType<T>::type A;
  CUROI_FOR_EACH_BIN(at, num_rois, channels, pooled_height, pooled_width) {
    const RoiAlignBin<A> bin =
        roi_align_bin(rois + at.k * 5, batch, height, width, at.ph, at.pw,
                      pooled_height, pooled_width, spatial_scale,
                      sampling_ratio, aligned);
    CUROI_FOR_EACH_CHANNEL(c, index, at, channels, pooled_height,
                           pooled_width) {
      A sum = (A)0;
      if (bin.batch_index >= 0) {
        const T* plane =
            input + (bin.batch_index * channels + c) * height * width;
        for (int64_t ey = bin.y.first; ey < bin.y.last; ++ey) {
          RoiAlignTap<A> ty;
          if (!roi_align_tap(bin.y, ey, height, &ty)) continue;
          const T* row_lo = plane + ty.lo * width;
          const T* row_hi = plane + ty.hi * width;
          for (int64_t ex = bin.x.first; ex < bin.x.last; ++ex) {
            RoiAlignTap<A> tx;
            if (!roi_align_tap(bin.x, ex, width, &tx)) continue;
            const A w00 = ty.w_lo * tx.w_lo, w01 = ty.w_lo * tx.w_hi;
            const A w10 = ty.w_hi * tx.w_lo, w11 = ty.w_hi * tx.w_hi;
            sum += w00 * curoi_load<A>(row_lo[tx.lo]) +
                   w01 * curoi_load<A>(row_lo[tx.hi]) +
                   w10 * curoi_load<A>(row_hi[tx.lo]) +
                   w11 * curoi_load<A>(row_hi[tx.hi]);
          }
        }
      }
      output[index] = curoi_store<T>(sum / bin.count);
    }
  };
}

// Each output gradient spreads over the four neighbours of every sample of
// its bin; bins of one box and different boxes overlap, so the adds go
// through Sum (CuroiFloatSum or the deterministic CuroiFixedSum). The gradient
// has the accumulation type (float for half precision).
template <typename T, typename Sum>
CUROI_DEVICE void roi_align_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  CUROI_FOR_EACH_BIN_OF_OWNED_CHANNELS(at, num_rois, channels, pooled_height,
                                       pooled_width) {
    const RoiAlignBin<A> bin =
        roi_align_bin(rois + at.k * 5, batch, height, width, at.ph, at.pw,
                      pooled_height, pooled_width, spatial_scale,
                      sampling_ratio, aligned);
    if (bin.batch_index < 0) return;
    CUROI_FOR_EACH_OWNED_CHANNEL(c, index, at, channels, pooled_height,
                                 pooled_width) {
      const A g = curoi_load<A>(grad_output[index]) / bin.count;
      const int64_t plane = (bin.batch_index * channels + c) * height * width;
      for (int64_t ey = bin.y.first; ey < bin.y.last; ++ey) {
        RoiAlignTap<A> ty;
        if (!roi_align_tap(bin.y, ey, height, &ty)) continue;
        const int64_t row_lo = plane + ty.lo * width;
        const int64_t row_hi = plane + ty.hi * width;
        for (int64_t ex = bin.x.first; ex < bin.x.last; ++ex) {
          RoiAlignTap<A> tx;
          if (!roi_align_tap(bin.x, ex, width, &tx)) continue;
          const A w00 = ty.w_lo * tx.w_lo, w01 = ty.w_lo * tx.w_hi;
          const A w10 = ty.w_hi * tx.w_lo, w11 = ty.w_hi * tx.w_hi;
          curoi_sum_add(grad_input, row_lo + tx.lo, g * w00);
          curoi_sum_add(grad_input, row_lo + tx.hi, g * w01);
          curoi_sum_add(grad_input, row_hi + tx.lo, g * w10);
          curoi_sum_add(grad_input, row_hi + tx.hi, g * w11);
        }
      }
    }
  };
}

#define CUROI_DEFINE_ROI_ALIGN(T, suffix)                                      \
  CUROI_KERNEL void roi_align_forward_##suffix(                                \
      const T* input, const AccType<T>::type* rois, int64_t num_rois,          \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int sampling_ratio, int aligned,         \
      T* output) {                                                             \
    roi_align_forward<T>(input, rois, num_rois, batch, channels, height,       \
                         width, pooled_height, pooled_width, spatial_scale,    \
                         sampling_ratio, aligned, output);                     \
  }                                                                            \
  CUROI_KERNEL void roi_align_backward_##suffix(                               \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_rois,    \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int sampling_ratio, int aligned,         \
      AccType<T>::type* grad_input) {                                          \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_input;                                                     \
    roi_align_backward<T>(grad_output, rois, num_rois, batch, channels,        \
                          height, width, pooled_height, pooled_width,          \
                          spatial_scale, sampling_ratio, aligned, sum);        \
  }                                                                            \
  CUROI_KERNEL void roi_align_backward_fixed_##suffix(                         \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_rois,    \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int sampling_ratio, int aligned,         \
      const double* max_abs, int64_t* fixed, AccType<T>::type* grad_input) {   \
    roi_align_backward<T>(                                                     \
        grad_output, rois, num_rois, batch, channels, height, width,           \
        pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned,   \
        curoi_fixed_sum(grad_input, fixed, max_abs,                            \
                        num_rois * pooled_height * pooled_width));             \
  }                                                                            \
  CUROI_KERNEL void roi_align_fixed_finish_##suffix(                           \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_input) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_input);              \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_ROI_ALIGN)
