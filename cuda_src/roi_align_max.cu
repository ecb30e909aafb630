// RoI Align, max modes: the largest value over a bin's samples rather than
// their mean, on the geometry of roi_align_geometry.cuh.
//
//   CUROI_ALIGN_MAX_ONNX (ONNX RoiAlign mode "max", as its reference and
//     onnxruntime compute it): each sample's value is the largest of its four
//     weighted bilinear corner terms w * x (not their sum); the output is the
//     largest sample value, the first one winning ties. A sample off the map
//     has the value 0 * x[0] (all four weights 0 on pixel 0). The comparison
//     is a < b ? b : a throughout, as std::max and Python's max, so a NaN
//     counts only where it comes first.
//   CUROI_ALIGN_MAX_INTERP (mmcv's RoIAlign with pool_mode "max"): each
//     sample's value is its bilinear interpolation (0 off the map); the first
//     largest wins, and a NaN beats any number (the first NaN wins), as in
//     roi_pool. `argmax` (optional) receives the winning sample's index
//     iy * grid_w + ix in the bin's sampling grid, -1 when there is none or
//     it lies off the map (its value 0 depends on no pixel).
//
// A bin without samples (an empty box with adaptive sampling) gives 0.
//
// Bounded work: along an axis with more than CUROI_SCAN_SAMPLES samples only
// those that can land on the map are visited (the rest share one value, taken
// once), and a densely sampled axis visits two samples per pixel zone: within
// a zone every bilinear weight is linear in the sample's position, so each
// sample value (a weighted term, or their sum) is linear along the axis and
// its largest value over the zone's samples is at the first or the last one.
#include "roi_align_geometry.cuh"

#define CUROI_ALIGN_MAX_ONNX 0
#define CUROI_ALIGN_MAX_INTERP 1

// The v-th sample of an axis that the max modes visit, or -1 when there is
// none: sample first + v normally; with dense sampling, the first (v even) or
// the last (v odd) sample of zone first + v / 2.
template <typename A>
CUROI_DEVICE int64_t roi_align_max_sample(const RoiAlignAxis<A>& axis,
                                          int64_t v, int64_t size) {
  if (!axis.dense) return axis.first + v;
  int64_t i0, i1;
  roi_align_zone_samples(axis, axis.first + v / 2, &i0, &i1);
  if (i1 <= i0) return -1;
  if (v % 2 == 0) return i0;
  return i1 - 1 > i0 ? i1 - 1 : -1;
}

template <typename A>
CUROI_DEVICE int64_t roi_align_max_visits(const RoiAlignAxis<A>& axis) {
  const int64_t n = axis.last - axis.first;
  return axis.dense ? 2 * n : n;
}

// Whether the axis has samples that the visits skip (off the map, beyond
// the searched range). With few samples every one is visited in order.
template <typename A>
CUROI_DEVICE bool roi_align_max_skips(const RoiAlignAxis<A>& axis,
                                      int64_t size) {
  if (axis.count <= CUROI_SCAN_SAMPLES) return false;
  if (!(curoi_isfinite(axis.base) && curoi_isfinite(axis.bin))) return true;
  int64_t first, last;
  roi_align_samples_on_map(axis, size, &first, &last);
  return first > 0 || last < axis.count;
}

// Whether `v` replaces `best` as the maximum (the first candidate always
// does).
template <typename A>
CUROI_DEVICE bool roi_align_max_better(int mode, bool any, A v, A best) {
  if (!any) return true;
  if (mode == CUROI_ALIGN_MAX_ONNX) return best < v;
  return v > best || (v != v && best == best);
}

// The value of sample (iy, ix), either of which may be off the map.
template <typename T, typename A>
CUROI_DEVICE A roi_align_max_value(const T* plane, int64_t width, int mode,
                                   bool on_map, const RoiAlignTap<A>& ty,
                                   const RoiAlignTap<A>& tx) {
  if (!on_map)
    return mode == CUROI_ALIGN_MAX_ONNX ? (A)0 * curoi_load<A>(plane[0]) : (A)0;
  const A t1 = ty.w_lo * tx.w_lo * curoi_load<A>(plane[ty.lo * width + tx.lo]);
  const A t2 = ty.w_lo * tx.w_hi * curoi_load<A>(plane[ty.lo * width + tx.hi]);
  const A t3 = ty.w_hi * tx.w_lo * curoi_load<A>(plane[ty.hi * width + tx.lo]);
  const A t4 = ty.w_hi * tx.w_hi * curoi_load<A>(plane[ty.hi * width + tx.hi]);
  if (mode == CUROI_ALIGN_MAX_INTERP) return t1 + t2 + t3 + t4;
  A v = t1;
  v = v < t2 ? t2 : v;
  v = v < t3 ? t3 : v;
  return v < t4 ? t4 : v;
}

// One output element: the maximum over the bin's samples in one plane.
template <typename T, typename A>
CUROI_DEVICE A roi_align_max_bin(const T* plane, const RoiAlignAxis<A>& ay,
                                 const RoiAlignAxis<A>& ax, int64_t height,
                                 int64_t width, int mode, int64_t* winner) {
  A best = (A)0;
  bool any = false;
  *winner = -1;
  if (ay.count <= 0 || ax.count <= 0) return best;
  RoiAlignTap<A> ty, tx;
  // Samples the visits skip share one value: take it first.
  if (roi_align_max_skips(ay, height) || roi_align_max_skips(ax, width)) {
    best = roi_align_max_value(plane, width, mode, false, ty, tx);
    any = true;
  }
  const int64_t visits_y = roi_align_max_visits(ay);
  const int64_t visits_x = roi_align_max_visits(ax);
  for (int64_t vy = 0; vy < visits_y; ++vy) {
    const int64_t iy = roi_align_max_sample(ay, vy, height);
    if (iy < 0) continue;
    const bool on_y = roi_align_sample_tap(ay, iy, height, &ty);
    for (int64_t vx = 0; vx < visits_x; ++vx) {
      const int64_t ix = roi_align_max_sample(ax, vx, width);
      if (ix < 0) continue;
      const bool on_x = roi_align_sample_tap(ax, ix, width, &tx);
      const A v = roi_align_max_value(plane, width, mode, on_y && on_x, ty, tx);
      if (roi_align_max_better(mode, any, v, best)) {
        best = v;
        any = true;
        // The grid index, or -1 off the map (such a winner, 0, passes no
        // gradient), as for the skipped samples taken first.
        *winner = on_y && on_x ? iy * ax.count + ix : -1;
      }
    }
  }
  return best;
}

// Every output element: one thread (GPU) or loop iteration (CPU) each; the
// max modes have no per-channel tables to share.
template <typename T>
CUROI_DEVICE void roi_align_max_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    int mode, T* output, int64_t* argmax) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_rois * channels * pooled_height * pooled_width;
  auto element = [&](int64_t index) {
    const CuroiOutputIndex at = curoi_output_index(
        index, total, channels, pooled_height, pooled_width);
    const RoiAlignElement<A> e =
        roi_align_element(rois, at, batch, height, width, pooled_height,
                          pooled_width, spatial_scale, sampling_ratio, aligned);
    A best = (A)0;
    int64_t winner = -1;
    if (e.box.batch_index >= 0) {
      best = roi_align_max_bin(
          input + (e.box.batch_index * channels + at.c) * height * width, e.y,
          e.x, height, width, mode, &winner);
    }
    output[index] = curoi_store<T>(best);
    if (argmax) argmax[index] = winner;
  };
#if defined(CUROI_GPU_LOOPS)
  CUDA_1D_KERNEL_LOOP(index, total) { element(index); }
#else
  curoi_parallel_for(total, 256, 16, element);
#endif
}

#define CUROI_DEFINE_ROI_ALIGN_MAX(T, suffix)                                  \
  CUROI_KERNEL void roi_align_max_forward_##suffix(                            \
      const T* input, const AccType<T>::type* rois, int64_t num_rois,          \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int sampling_ratio, int aligned,         \
      int mode, T* output, int64_t* argmax) {                                  \
    roi_align_max_forward<T>(input, rois, num_rois, batch, channels, height,   \
                             width, pooled_height, pooled_width,               \
                             spatial_scale, sampling_ratio, aligned, mode,     \
                             output, argmax);                                  \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_ROI_ALIGN_MAX)
