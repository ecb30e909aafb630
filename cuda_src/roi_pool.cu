// RoI max pooling, forward and backward.
//
// Two conventions for where a box's bins lie on the feature map:
//   torchvision (Caffe, ONNX MaxRoiPool): box corners rounded to whole pixels,
//     x2/y2 inclusive, bins floor(p*bin)..ceil((p+1)*bin) from the rounded start;
//   mmcv (mmdetection): continuous corners x1*s and (x2+1)*s, bins
//     floor(p*bin + start)..ceil((p+1)*bin + start).
// Both clip bins to the map. An empty bin gives 0 with argmax -1.
//
// argmax is the flat index h*W + w inside the feature plane of the maximum,
// the first one in row-major order on ties. A NaN counts as larger than any
// number (as in numpy.argmax and torch.max), so NaNs propagate.
#include "curoi_common.cuh"

#define CUROI_POOL_TORCHVISION 0
#define CUROI_POOL_MMCV 1

// Bin [start, end) along one axis, already clipped to [0, size].
template <typename A>
CUROI_DEVICE void roi_pool_bin(A box_lo, A box_hi, A scale, int64_t p,
                               int64_t pooled, int64_t size, int convention,
                               int64_t* start, int64_t* end) {
  A s, e;
  if (convention == CUROI_POOL_MMCV) {
    const A lo = box_lo * scale;
    const A bin = ((box_hi + (A)1) * scale - lo) / (A)pooled;
    s = floor((A)p * bin + lo);
    e = ceil((A)(p + 1) * bin + lo);
  } else {
    const A lo = round(box_lo * scale);
    const A hi = round(box_hi * scale);
    const A bin = curoi_max(hi - lo + (A)1, (A)1) / (A)pooled;
    s = floor((A)p * bin) + lo;
    e = ceil((A)(p + 1) * bin) + lo;
  }
  // A box whose scaled corners overflow the arithmetic type (float32 boxes
  // times a large spatial_scale) gives inf or NaN here: it reads nothing, as
  // in roi_align, rather than letting NaN clamp to the map's first pixel.
  if (!(curoi_isfinite(s) && curoi_isfinite(e))) {
    *start = *end = 0;
    return;
  }
  *start = curoi_clamp_to_int(s, (A)0, (A)size);
  *end = curoi_clamp_to_int(e, (A)0, (A)size);
}

template <typename T>
CUROI_DEVICE void roi_pool_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int convention, T* output,
    int64_t* argmax) {
  typedef typename AccType<T>::type A;
  CUROI_FOR_EACH_BIN(bin, num_rois, channels, pooled_height, pooled_width) {
    const A* box = rois + bin.k * 5;
    const int64_t b = curoi_box_batch(box, batch);
    int64_t hstart = 0, hend = 0, wstart = 0, wend = 0;
    if (b >= 0) {
      // mmcv gives a box of no positive extent no bins at all.
      const bool degenerate =
          convention == CUROI_POOL_MMCV &&
          !((box[3] + (A)1) * spatial_scale - box[1] * spatial_scale > (A)0 &&
            (box[4] + (A)1) * spatial_scale - box[2] * spatial_scale > (A)0);
      if (!degenerate) {
        roi_pool_bin(box[2], box[4], spatial_scale, bin.ph, pooled_height,
                     height, convention, &hstart, &hend);
        roi_pool_bin(box[1], box[3], spatial_scale, bin.pw, pooled_width,
                     width, convention, &wstart, &wend);
      }
    }
    const bool empty = !(hend > hstart && wend > wstart);

    CUROI_FOR_EACH_CHANNEL(c, index, bin, channels, pooled_height,
                           pooled_width) {
      A best = (A)0;
      int64_t best_index = -1;
      if (!empty) {
        const T* plane = input + (b * channels + c) * height * width;
        for (int64_t h = hstart; h < hend; ++h) {
          for (int64_t w = wstart; w < wend; ++w) {
            const int64_t at = h * width + w;
            const A v = curoi_load<A>(plane[at]);
            if (best_index < 0 || v > best || (v != v && best == best)) {
              best = v;
              best_index = at;
            }
          }
        }
      }
      output[index] = curoi_store<T>(best);
      argmax[index] = best_index;
    }
  };
}

// The gradient flows to the argmax of each bin; several bins (and boxes) may
// share one, so the adds go through Sum (CuroiFloatSum or the deterministic
// CuroiFixedSum). The gradient has the accumulation type.
template <typename T, typename Sum>
CUROI_DEVICE void roi_pool_backward(
    const T* grad_output, const int64_t* argmax,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  CUROI_FOR_EACH_BIN_OF_OWNED_CHANNELS(bin, num_rois, channels, pooled_height,
                                       pooled_width) {
    const int64_t b = curoi_box_batch(rois + bin.k * 5, batch);
    if (b < 0) return;
    CUROI_FOR_EACH_OWNED_CHANNEL(c, index, bin, channels, pooled_height,
                                 pooled_width) {
      const int64_t at = argmax[index];
      // argmax comes from the caller: never trust it to lie in the plane.
      if (at >= 0 && at < height * width) {
        curoi_sum_add(grad_input, (b * channels + c) * height * width + at,
                      curoi_load<A>(grad_output[index]));
      }
    }
  };
}

#define CUROI_DEFINE_ROI_POOL(T, suffix)                                       \
  CUROI_KERNEL void roi_pool_forward_##suffix(                                 \
      const T* input, const AccType<T>::type* rois, int64_t num_rois,          \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int convention, T* output,               \
      int64_t* argmax) {                                                       \
    roi_pool_forward<T>(input, rois, num_rois, batch, channels, height, width, \
                        pooled_height, pooled_width, spatial_scale,            \
                        convention, output, argmax);                           \
  }                                                                            \
  CUROI_KERNEL void roi_pool_backward_##suffix(                                \
      const T* grad_output, const int64_t* argmax,                             \
      const AccType<T>::type* rois, int64_t num_rois, int64_t batch,           \
      int64_t channels, int64_t height, int64_t width, int64_t pooled_height,  \
      int64_t pooled_width, AccType<T>::type* grad_input) {                    \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_input;                                                     \
    roi_pool_backward<T>(grad_output, argmax, rois, num_rois, batch,           \
                         channels, height, width, pooled_height, pooled_width, \
                         sum);                                                 \
  }                                                                            \
  CUROI_KERNEL void roi_pool_backward_fixed_##suffix(                          \
      const T* grad_output, const int64_t* argmax,                             \
      const AccType<T>::type* rois, int64_t num_rois, int64_t batch,           \
      int64_t channels, int64_t height, int64_t width, int64_t pooled_height,  \
      int64_t pooled_width, const double* max_abs, int64_t* fixed,             \
      AccType<T>::type* grad_input) {                                          \
    roi_pool_backward<T>(                                                      \
        grad_output, argmax, rois, num_rois, batch, channels, height, width,   \
        pooled_height, pooled_width,                                           \
        curoi_fixed_sum(grad_input, fixed, max_abs,                            \
                        num_rois * pooled_height * pooled_width));             \
  }                                                                            \
  CUROI_KERNEL void roi_pool_fixed_finish_##suffix(                            \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_input) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_input);              \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_ROI_POOL)
