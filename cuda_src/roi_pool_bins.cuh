// RoI max pooling's bins, shared by roi_pool.cu and roi_spp.cu (spatial
// pyramid pooling, whose levels are RoI Pool grids): where a box's bins lie
// under each convention, whether a box reads anything, and the maximum of a
// bin with its position.
//
//   torchvision (Caffe, ONNX MaxRoiPool): box corners rounded to whole pixels,
//     x2/y2 inclusive, bins floor(p*bin)..ceil((p+1)*bin) from the rounded start;
//   mmcv (mmdetection): continuous corners x1*s and (x2+1)*s, bins
//     floor(p*bin + start)..ceil((p+1)*bin + start).
// Both clip bins to the map.
#ifndef CUROI_ROI_POOL_BINS_CUH
#define CUROI_ROI_POOL_BINS_CUH

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

// The bins of one box along both axes: rows [hstart, hend) and columns
// [wstart, wend) of bin (ph, pw); batch_index -1 for a box that reads nothing.
template <typename A>
CUROI_DEVICE int64_t roi_pool_box(const A* box, int64_t batch, A spatial_scale,
                                  int convention) {
  const int64_t b = curoi_box_batch(box, batch);
  if (b < 0) return -1;
  // mmcv gives a box of no positive extent no bins at all.
  if (convention == CUROI_POOL_MMCV &&
      !((box[3] + (A)1) * spatial_scale - box[1] * spatial_scale > (A)0 &&
        (box[4] + (A)1) * spatial_scale - box[2] * spatial_scale > (A)0))
    return -1;
  return b;
}

// The maximum of rows [hstart, hend) x columns [wstart, wend) of a plane
// whose pixel (h, w) is plane[(h * width + w) * step] (step 1 in NCHW, C
// channels-last), and its flat index h * width + w (-1 and 0 for an empty
// bin). The first maximum in row-major order wins; a NaN beats any number
// and the first NaN wins.
template <typename T, typename A>
CUROI_DEVICE A roi_pool_max(const T* plane, int64_t width, int64_t step,
                            int64_t hstart, int64_t hend, int64_t wstart,
                            int64_t wend, int64_t* best_index) {
  if (!(hend > hstart && wend > wstart)) {
    *best_index = -1;
    return (A)0;
  }
  // First the maximum, without branches that depend on the data (a NaN is
  // only noted); then the first position that holds it.
  A best = curoi_load<A>(plane[(hstart * width + wstart) * step]);
  bool nan = false;
  for (int64_t h = hstart; h < hend; ++h) {
    const T* row = plane + h * width * step;
    for (int64_t w = wstart; w < wend; ++w) {
      const A v = curoi_load<A>(row[w * step]);
      nan |= v != v;
      best = v > best ? v : best;
    }
  }
  for (int64_t h = hstart; h < hend; ++h) {
    const T* row = plane + h * width * step;
    for (int64_t w = wstart; w < wend; ++w) {
      const A v = curoi_load<A>(row[w * step]);
      // The first NaN, if there is one, else the first maximum.
      if (nan ? v != v : v == best) {
        *best_index = h * width + w;
        return v;
      }
    }
  }
  *best_index = -1;  // unreachable: the maximum is in the bin
  return best;
}

#endif  // CUROI_ROI_POOL_BINS_CUH
