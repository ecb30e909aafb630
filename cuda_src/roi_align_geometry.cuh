// RoI Align's geometry, shared by every RoI Align kernel (average and max
// modes): where a box's bins lie, where their samples fall, and each
// sample's bilinear taps, with the semantics of torchvision, detectron2,
// mmcv and ONNX RoiAlign:
//   offset = aligned ? 0.5 : 0, start = x1*s - offset, size = (x2-x1)*s,
//   size = max(size, 1) only when not aligned;
//   grid = sampling_ratio if > 0 else ceil(size / pooled);
//   sample i of a bin at start + p*bin + (i + 0.5)*bin/grid;
//   a sample with y < -1 or y > H (x likewise) reads nothing; otherwise
//   coordinates clamp at 0 and the last row/column uses the edge value.
//
// All arithmetic is in the accumulation type A (float for float32 and half
// precision, double for float64): no double-precision instruction in a
// float kernel, which consumer GPUs run at 1/32 to 1/64 of the float rate.
#ifndef CUROI_ROI_ALIGN_GEOMETRY_CUH
#define CUROI_ROI_ALIGN_GEOMETRY_CUH

#include "curoi_common.cuh"

// Largest sample grid per axis that is represented. Only samples that land
// within [-1, size] are visited (see roi_align_axis), so this bound never
// changes a result; it keeps integer conversions defined.
#define CUROI_MAX_GRID 1e15

// Up to this many samples per bin side, every sample is visited and tested
// (the usual case: torchvision's loop exactly); beyond it, the samples that
// can land on the map are found by binary search first.
#define CUROI_SCAN_SAMPLES 64

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
  int64_t count;  // samples in the grid, as an integer
  bool dense;     // summed per pixel ("zones", below) instead of per sample
  int64_t first;  // first sample index (dense: first zone) to visit
  int64_t last;   // one past the last one
};

// Sample i's position, as torchvision computes it. For a given axis it is
// monotone in i (each operation is monotone in i), non-decreasing when
// bin >= 0 and non-increasing when bin < 0, which the searches below use.
template <typename A>
CUROI_DEVICE A roi_align_position(const RoiAlignAxis<A>& axis, int64_t i) {
  return axis.base + ((A)i + (A)0.5) * axis.bin / axis.grid;
}

// The first sample index in [0, count] whose position lies beyond v in the
// direction the samples move (upward: position > v, or >= v when not
// strict; downward: < v, or <= v), by binary search.
template <typename A>
CUROI_DEVICE int64_t roi_align_first_beyond(const RoiAlignAxis<A>& axis, A v,
                                            bool strict) {
  const bool upward = axis.bin >= (A)0;
  int64_t lo = 0, hi = axis.count;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const A p = roi_align_position(axis, mid);
    const bool beyond = upward ? (strict ? p > v : p >= v)
                               : (strict ? p < v : p <= v);
    if (beyond) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// The samples first .. last-1 of an axis whose positions lie in [lo, hi]
// (last < first when none do).
template <typename A>
CUROI_DEVICE void roi_align_samples_between(const RoiAlignAxis<A>& axis, A lo,
                                            A hi, int64_t* first,
                                            int64_t* last) {
  if (axis.bin >= (A)0) {
    *first = roi_align_first_beyond(axis, lo, false);
    *last = roi_align_first_beyond(axis, hi, true);
  } else {
    *first = roi_align_first_beyond(axis, hi, false);
    *last = roi_align_first_beyond(axis, lo, true);
  }
}

// The samples first .. last-1 of an axis whose positions lie in [-1, size].
template <typename A>
CUROI_DEVICE void roi_align_samples_on_map(const RoiAlignAxis<A>& axis,
                                           int64_t size, int64_t* first,
                                           int64_t* last) {
  roi_align_samples_between(axis, (A)-1, (A)size, first, last);
}

// Skipping samples that fall outside [-1, size] changes no sum (they add
// exactly 0), and bounds the work by the map size rather than by the box
// size.
// Bin p's samples along one axis, every one of them (first 0, last count):
// sample i at roi_start + p*bin + (i + 0.5)*bin/grid.
template <typename A>
CUROI_DEVICE RoiAlignAxis<A> roi_align_bin_axis(A roi_start, A roi_size,
                                                int64_t p, int64_t pooled,
                                                int sampling_ratio) {
  RoiAlignAxis<A> axis;
  axis.bin = roi_size / (A)pooled;
  axis.base = roi_start + (A)p * axis.bin;
  axis.grid = sampling_ratio > 0 ? (A)sampling_ratio : ceil(roi_size / (A)pooled);
  axis.dense = false;
  axis.count = curoi_clamp_to_int(axis.grid, (A)0, (A)CUROI_MAX_GRID);
  axis.first = 0;
  axis.last = axis.count;
  return axis;
}

template <typename A>
CUROI_DEVICE RoiAlignAxis<A> roi_align_axis(A roi_start, A roi_size,
                                            int64_t p, int64_t pooled,
                                            int sampling_ratio, int64_t size) {
  RoiAlignAxis<A> axis =
      roi_align_bin_axis(roi_start, roi_size, p, pooled, sampling_ratio);
  if (axis.count <= CUROI_SCAN_SAMPLES) return axis;
  if (!(curoi_isfinite(axis.base) && curoi_isfinite(axis.bin))) {
    axis.last = 0;  // positions not finite: no sample can land on the map
    return axis;
  }
  roi_align_samples_on_map(axis, size, &axis.first, &axis.last);
  if (axis.last < axis.first) axis.last = axis.first;
  const A step = axis.bin / axis.grid;
  if (axis.last - axis.first > CUROI_DENSE_SAMPLES &&
      fabs(step) < (A)CUROI_DENSE_STEP) {
    // Zones -1 .. size-1 (see roi_align_zone_tap), limited to those that
    // the samples on the map reach.
    const A a = roi_align_position(axis, axis.first);
    const A b = roi_align_position(axis, axis.last - 1);
    const A low = curoi_min(a, b), high = curoi_max(a, b);
    axis.dense = true;
    axis.first = curoi_clamp_to_int(floor(low) - (A)1, (A)-1, (A)size);
    axis.last = curoi_clamp_to_int(floor(high) + (A)2, (A)-1, (A)size);
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

// Position v as torchvision interpolates it: outside [-1, size] it adds
// nothing; below 0 it reads the first pixel, at or past size-1 the last.
template <typename A>
CUROI_DEVICE bool roi_align_bilinear_tap(A v, int64_t size,
                                         RoiAlignTap<A>* tap) {
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

// Sample i of an axis-aligned bin.
template <typename A>
CUROI_DEVICE bool roi_align_sample_tap(const RoiAlignAxis<A>& axis, int64_t i,
                                       int64_t size, RoiAlignTap<A>* tap) {
  return roi_align_bilinear_tap(roi_align_position(axis, i), size, tap);
}

// The sum of the sample taps over one zone of the axis, in closed form: zone
// -1 is [-1, 0] (all weight on pixel 0), zone z in [0, size-2] is (z, z+1]
// (weights 1 - (v - z) on z and v - z on z+1, summed as an arithmetic
// series), zone size-1 is (size-1, size] (all weight on pixel size-1). The
// zones partition [-1, size]; at their inner edges the weights agree, so the
// values are those of the per-sample sum up to rounding. Which samples lie
// in a zone is decided by the exact sample rule (binary search).
// The samples i0 .. i1-1 of a dense axis that lie in zone z (see below).
template <typename A>
CUROI_DEVICE void roi_align_zone_samples(const RoiAlignAxis<A>& axis,
                                         int64_t z, int64_t* i0, int64_t* i1) {
  const A lo_edge = (A)(z < 0 ? -1 : z);  // inclusive for zone -1 only
  const A hi_edge = (A)(z < 0 ? 0 : z + 1);
  if (axis.bin >= (A)0) {
    *i0 = roi_align_first_beyond(axis, lo_edge, z >= 0);
    *i1 = roi_align_first_beyond(axis, hi_edge, true);
  } else {
    *i0 = roi_align_first_beyond(axis, hi_edge, false);
    *i1 = roi_align_first_beyond(axis, lo_edge, z < 0);
  }
}

template <typename A>
CUROI_DEVICE bool roi_align_zone_tap(const RoiAlignAxis<A>& axis, int64_t z,
                                     int64_t size, RoiAlignTap<A>* tap) {
  int64_t i0, i1;
  roi_align_zone_samples(axis, z, &i0, &i1);
  if (i1 <= i0) return false;
  const A n = (A)(i1 - i0);
  if (z < 0 || z >= size - 1) {
    tap->lo = tap->hi = z < 0 ? 0 : size - 1;
    tap->w_lo = n;
    tap->w_hi = (A)0;
    return true;
  }
  // Mean position of samples i0 .. i1-1, less z: the mean weight on z+1.
  const A step = axis.bin / axis.grid;
  const A mean = axis.base + step * ((A)0.5 * ((A)i0 + (A)(i1 - 1)) + (A)0.5);
  const A high = n * curoi_min(curoi_max(mean - (A)z, (A)0), (A)1);
  tap->lo = z;
  tap->hi = z + 1;
  tap->w_lo = n - high;
  tap->w_hi = high;
  return true;
}

template <typename A>
CUROI_DEVICE bool roi_align_tap(const RoiAlignAxis<A>& axis, int64_t e,
                                int64_t size, RoiAlignTap<A>* tap) {
  return axis.dense ? roi_align_zone_tap(axis, e, size, tap)
                    : roi_align_sample_tap(axis, e, size, tap);
}

// What every bin of one box shares. batch_index is -1 for a box that must
// read nothing.
template <typename A>
struct RoiAlignBox {
  int64_t batch_index;
  A start_h, start_w, roi_h, roi_w;
  A count;  // the divisor: every sample of the grid, on the map or not
};

template <typename A>
CUROI_DEVICE RoiAlignBox<A> roi_align_box(const A* box, int64_t batch,
                                          int64_t pooled_height,
                                          int64_t pooled_width,
                                          A spatial_scale, int sampling_ratio,
                                          int aligned) {
  RoiAlignBox<A> g;
  g.batch_index = curoi_box_batch(box, batch);
  g.count = (A)1;
  g.start_h = g.start_w = g.roi_h = g.roi_w = (A)0;
  if (g.batch_index < 0) return g;
  const A offset = aligned ? (A)0.5 : (A)0;
  g.start_w = box[1] * spatial_scale - offset;
  g.start_h = box[2] * spatial_scale - offset;
  g.roi_w = box[3] * spatial_scale - offset - g.start_w;
  g.roi_h = box[4] * spatial_scale - offset - g.start_h;
  if (!aligned) {
    g.roi_w = curoi_max(g.roi_w, (A)1);
    g.roi_h = curoi_max(g.roi_h, (A)1);
  }
  // A negative grid (aligned box with x2 < x1) has no samples at all.
  const A gy = sampling_ratio > 0 ? (A)sampling_ratio
                                  : ceil(g.roi_h / (A)pooled_height);
  const A gx = sampling_ratio > 0 ? (A)sampling_ratio
                                  : ceil(g.roi_w / (A)pooled_width);
  g.count = curoi_max(curoi_max(gy, (A)0) * curoi_max(gx, (A)0), (A)1);
  return g;
}

// Everything one bin's loops need, for the GPU loops: its box, and its bin's
// sampling along each axis (computed for an unusable box too, harmlessly,
// from its zeroed corners).
template <typename A>
struct RoiAlignElement {
  RoiAlignBox<A> box;
  RoiAlignAxis<A> y, x;
};

template <typename A>
CUROI_DEVICE RoiAlignElement<A> roi_align_element(
    const A* rois, int64_t k, int64_t ph, int64_t pw, int64_t batch,
    int64_t height, int64_t width, int64_t pooled_height, int64_t pooled_width,
    A spatial_scale, int sampling_ratio, int aligned) {
  RoiAlignElement<A> e;
  e.box = roi_align_box(rois + k * 5, batch, pooled_height, pooled_width,
                        spatial_scale, sampling_ratio, aligned);
  e.y = roi_align_axis(e.box.start_h, e.box.roi_h, ph, pooled_height,
                       sampling_ratio, height);
  e.x = roi_align_axis(e.box.start_w, e.box.roi_w, pw, pooled_width,
                       sampling_ratio, width);
  return e;
}

template <typename A>
CUROI_DEVICE RoiAlignElement<A> roi_align_element(
    const A* rois, const CuroiOutputIndex& at, int64_t batch, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    A spatial_scale, int sampling_ratio, int aligned) {
  return roi_align_element(rois, at.k, at.ph, at.pw, batch, height, width,
                           pooled_height, pooled_width, spatial_scale,
                           sampling_ratio, aligned);
}

// ------------------------------------------- how a sample moves with its box
// The gradient with respect to the boxes (roi_align_boxes.cuh). Along one
// axis, sample i of bin p lies at
//   position = x1*s - offset + size * f_i,  f_i = (p + (i + 0.5)/grid) / pooled,
//   size = (x2 - x1)*s,
// so d position/d x1 = s * (1 - t*f_i) and d position/d x2 = s * t*f_i, where
// t = 1 when the size follows the corners and t = 0 where aligned=False's
// max(size, 1) picks 1 (the size is then a constant). The grid (adaptive:
// ceil(size / pooled)) and the divisor are piecewise constant in the box:
// their derivative is 0 wherever it exists, and they are treated as constants.
//
// The bilinear value moves with the position only strictly inside the map's
// interpolation range: for 0 < v < size - 1 it is (1 - l) * x[lo] + l * x[lo+1]
// with lo = floor(v), l = v - lo, of slope x[lo+1] - x[lo]. Elsewhere the
// derivative is 0: off the map (v < -1 or v > size) the sample adds nothing,
// and in the clamped bands (v <= 0 reads row 0, v >= size - 1 the last row)
// its value does not depend on v. At a pixel edge (v an integer) the cell is
// the one that the forward's branch takes: [v, v + 1], the right/lower one
// (floor), except v = 0 and v = size - 1, where the forward clamps (slope 0).

// Where a sample (or, on a dense axis, a zone of samples) moves the value:
// rows lo and lo + 1 (weights -1 and +1 per unit of position), n samples
// whose fractions f_i sum to f.
template <typename A>
struct RoiAlignSlope {
  int64_t lo;
  A n, f;
};

// Per sample: the rule above.
template <typename A>
CUROI_DEVICE bool roi_align_sample_slope(const RoiAlignAxis<A>& axis,
                                         int64_t i, int64_t p, int64_t pooled,
                                         int64_t size, RoiAlignSlope<A>* slope) {
  const A v = roi_align_position(axis, i);
  if (!(v > (A)0 && v < (A)(size - 1))) return false;
  slope->lo = (int64_t)v;
  slope->n = (A)1;
  slope->f = ((A)p + ((A)i + (A)0.5) / axis.grid) / (A)pooled;
  return true;
}

// On a dense axis (see roi_align_axis), per cell z in [0, size - 2]: the
// samples with z <= v < z + 1 (0 < v < 1 for cell 0), found by binary search
// with the per-sample rule's comparisons, and the sum of their fractions in
// closed form (an arithmetic series: n times the fraction of the mean index).
// The cells partition (0, size - 1) as floor does; cells -1 and size - 1 are
// the clamped bands.
template <typename A>
CUROI_DEVICE bool roi_align_zone_slope(const RoiAlignAxis<A>& axis, int64_t z,
                                       int64_t p, int64_t pooled, int64_t size,
                                       RoiAlignSlope<A>* slope) {
  if (z < 0 || z > size - 2) return false;
  int64_t i0, i1;
  if (axis.bin >= (A)0) {
    i0 = roi_align_first_beyond(axis, (A)z, z == 0);
    i1 = roi_align_first_beyond(axis, (A)(z + 1), false);
  } else {
    i0 = roi_align_first_beyond(axis, (A)(z + 1), true);
    i1 = roi_align_first_beyond(axis, (A)z, z > 0);
  }
  if (i1 <= i0) return false;
  slope->lo = z;
  slope->n = (A)(i1 - i0);
  const A mean = (A)0.5 * ((A)i0 + (A)(i1 - 1)) + (A)0.5;
  slope->f = slope->n * (((A)p + mean / axis.grid) / (A)pooled);
  return true;
}

// Element e of an axis (a sample, or a zone/cell of a dense axis): the same
// elements that roi_align_tap visits.
template <typename A>
CUROI_DEVICE bool roi_align_slope(const RoiAlignAxis<A>& axis, int64_t e,
                                  int64_t p, int64_t pooled, int64_t size,
                                  RoiAlignSlope<A>* slope) {
  return axis.dense ? roi_align_zone_slope(axis, e, p, pooled, size, slope)
                    : roi_align_sample_slope(axis, e, p, pooled, size, slope);
}

// t above, per axis: 1 where the box's size follows its corners, 0 where
// aligned=False's max(size, 1) picks 1 (curoi_max keeps the size itself
// when it equals 1, so there t = 1).
template <typename A>
CUROI_DEVICE void roi_align_box_follows(const A* box, A spatial_scale,
                                        int aligned, A* follow_w,
                                        A* follow_h) {
  const A offset = aligned ? (A)0.5 : (A)0;
  const A start_w = box[1] * spatial_scale - offset;
  const A start_h = box[2] * spatial_scale - offset;
  const A size_w = box[3] * spatial_scale - offset - start_w;
  const A size_h = box[4] * spatial_scale - offset - start_h;
  *follow_w = aligned || !(size_w < (A)1) ? (A)1 : (A)0;
  *follow_h = aligned || !(size_h < (A)1) ? (A)1 : (A)0;
}

#endif  // CUROI_ROI_ALIGN_GEOMETRY_CUH
