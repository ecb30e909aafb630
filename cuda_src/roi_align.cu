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
// within [-1, size] are visited (see roi_align_sample_range), so this bound
// never changes a result; it keeps integer conversions defined.
#define CUROI_MAX_GRID 1e15

// Where one output bin samples the map, along one axis.
template <typename A>
struct RoiAlignAxis {
  A base;         // start + p*bin: the bin's first edge
  A bin;          // bin size
  A grid;         // samples per bin (may be huge for a huge box)
  int64_t first;  // first sample index that can land in [-1, size]
  int64_t last;   // one past the last such index
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
  const int64_t n = curoi_clamp_to_int(axis.grid, (A)0, (A)CUROI_MAX_GRID);
  axis.first = 0;
  axis.last = n;
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
  return axis;
}

template <typename A>
CUROI_DEVICE A roi_align_sample(const RoiAlignAxis<A>& axis, int64_t i) {
  return axis.base + ((A)i + (A)0.5) * axis.bin / axis.grid;
}

// Bilinear weights of the four neighbours of (y, x); false when the sample
// lies outside [-1, height] x [-1, width] and contributes nothing.
template <typename A>
CUROI_DEVICE bool roi_align_bilinear(int64_t height, int64_t width, A y, A x,
                                     int64_t* y_low, int64_t* y_high,
                                     int64_t* x_low, int64_t* x_high,
                                     A* w_ll, A* w_lh, A* w_hl, A* w_hh) {
  if (!(y >= (A)-1 && y <= (A)height && x >= (A)-1 && x <= (A)width))
    return false;
  if (y <= (A)0) y = (A)0;
  if (x <= (A)0) x = (A)0;
  *y_low = (int64_t)y;
  *x_low = (int64_t)x;
  if (*y_low >= height - 1) {
    *y_high = *y_low = height - 1;
    y = (A)*y_low;
  } else {
    *y_high = *y_low + 1;
  }
  if (*x_low >= width - 1) {
    *x_high = *x_low = width - 1;
    x = (A)*x_low;
  } else {
    *x_high = *x_low + 1;
  }
  const A ly = y - (A)*y_low, lx = x - (A)*x_low;
  const A hy = (A)1 - ly, hx = (A)1 - lx;
  *w_ll = hy * hx;
  *w_lh = hy * lx;
  *w_hl = ly * hx;
  *w_hh = ly * lx;
  return true;
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
  const int64_t total = num_rois * channels * pooled_height * pooled_width;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const int64_t pw = index % pooled_width;
    const int64_t ph = (index / pooled_width) % pooled_height;
    const int64_t c = (index / pooled_width / pooled_height) % channels;
    const int64_t k = index / pooled_width / pooled_height / channels;

    const RoiAlignBin<A> bin =
        roi_align_bin(rois + k * 5, batch, height, width, ph, pw,
                      pooled_height, pooled_width, spatial_scale,
                      sampling_ratio, aligned);
    A sum = (A)0;
    if (bin.batch_index >= 0) {
      const T* plane =
          input + (bin.batch_index * channels + c) * height * width;
      for (int64_t iy = bin.y.first; iy < bin.y.last; ++iy) {
        const A y = roi_align_sample(bin.y, iy);
        for (int64_t ix = bin.x.first; ix < bin.x.last; ++ix) {
          const A x = roi_align_sample(bin.x, ix);
          int64_t y0, y1, x0, x1;
          A w00, w01, w10, w11;
          if (!roi_align_bilinear(height, width, y, x, &y0, &y1, &x0, &x1,
                                  &w00, &w01, &w10, &w11))
            continue;
          sum += w00 * curoi_load<A>(plane[y0 * width + x0]) +
                 w01 * curoi_load<A>(plane[y0 * width + x1]) +
                 w10 * curoi_load<A>(plane[y1 * width + x0]) +
                 w11 * curoi_load<A>(plane[y1 * width + x1]);
        }
      }
    }
    output[index] = curoi_store<T>(sum / bin.count);
  }
}

// Each output gradient spreads over the four neighbours of every sample of
// its bin; bins of one box and different boxes overlap, hence atomic adds.
// grad_input has the accumulation type (float for half precision).
template <typename T>
CUROI_DEVICE void roi_align_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    typename AccType<T>::type* grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_rois * channels * pooled_height * pooled_width;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const int64_t pw = index % pooled_width;
    const int64_t ph = (index / pooled_width) % pooled_height;
    const int64_t c = (index / pooled_width / pooled_height) % channels;
    const int64_t k = index / pooled_width / pooled_height / channels;

    const RoiAlignBin<A> bin =
        roi_align_bin(rois + k * 5, batch, height, width, ph, pw,
                      pooled_height, pooled_width, spatial_scale,
                      sampling_ratio, aligned);
    if (bin.batch_index < 0) continue;
    const A g = curoi_load<A>(grad_output[index]) / bin.count;
    A* plane = grad_input + (bin.batch_index * channels + c) * height * width;
    for (int64_t iy = bin.y.first; iy < bin.y.last; ++iy) {
      const A y = roi_align_sample(bin.y, iy);
      for (int64_t ix = bin.x.first; ix < bin.x.last; ++ix) {
        const A x = roi_align_sample(bin.x, ix);
        int64_t y0, y1, x0, x1;
        A w00, w01, w10, w11;
        if (!roi_align_bilinear(height, width, y, x, &y0, &y1, &x0, &x1,
                                &w00, &w01, &w10, &w11))
          continue;
        curoi_atomic_add(plane + y0 * width + x0, g * w00);
        curoi_atomic_add(plane + y0 * width + x1, g * w01);
        curoi_atomic_add(plane + y1 * width + x0, g * w10);
        curoi_atomic_add(plane + y1 * width + x1, g * w11);
      }
    }
  }
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
    roi_align_backward<T>(grad_output, rois, num_rois, batch, channels,        \
                          height, width, pooled_height, pooled_width,          \
                          spatial_scale, sampling_ratio, aligned, grad_input); \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_ROI_ALIGN)
