// RoI Align (average), forward and backward, with the semantics of
// torchvision, detectron2, mmcv and ONNX RoiAlign:
//   offset = aligned ? 0.5 : 0, start = x1*s - offset, size = (x2-x1)*s,
//   size = max(size, 1) only when not aligned;
//   grid = sampling_ratio if > 0 else ceil(size / pooled);
//   sample i of a bin at start + p*bin + (i + 0.5)*bin/grid;
//   a sample with y < -1 or y > H (x likewise) adds 0 but counts in the
//   divisor max(grid_h*grid_w, 1); otherwise coordinates clamp at 0 and the
//   last row/column uses the edge value.
//
// All arithmetic is in the accumulation type A (float for float32 and half
// precision, double for float64): no double-precision instruction in a
// float kernel, which consumer GPUs run at 1/32 to 1/64 of the float rate.
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

// Skipping samples that fall outside [-1, size] changes no sum (they add
// exactly 0), and bounds the work by the map size rather than by the box
// size.
template <typename A>
CUROI_DEVICE RoiAlignAxis<A> roi_align_axis(A roi_start, A roi_size,
                                            int64_t p, int64_t pooled,
                                            int sampling_ratio, int64_t size) {
  RoiAlignAxis<A> axis;
  axis.bin = roi_size / (A)pooled;
  axis.base = roi_start + (A)p * axis.bin;
  axis.grid = sampling_ratio > 0 ? (A)sampling_ratio : ceil(roi_size / (A)pooled);
  axis.dense = false;
  axis.count = curoi_clamp_to_int(axis.grid, (A)0, (A)CUROI_MAX_GRID);
  axis.first = 0;
  axis.last = axis.count;
  if (axis.count <= CUROI_SCAN_SAMPLES) return axis;
  if (!(curoi_isfinite(axis.base) && curoi_isfinite(axis.bin))) {
    axis.last = 0;  // positions not finite: no sample can land on the map
    return axis;
  }
  if (axis.bin >= (A)0) {
    axis.first = roi_align_first_beyond(axis, (A)-1, false);
    axis.last = roi_align_first_beyond(axis, (A)size, true);
  } else {
    axis.first = roi_align_first_beyond(axis, (A)size, false);
    axis.last = roi_align_first_beyond(axis, (A)-1, true);
  }
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

// Sample i as torchvision interpolates it: outside [-1, size] it adds
// nothing; below 0 it reads the first pixel, at or past size-1 the last.
template <typename A>
CUROI_DEVICE bool roi_align_sample_tap(const RoiAlignAxis<A>& axis, int64_t i,
                                       int64_t size, RoiAlignTap<A>* tap) {
  A v = roi_align_position(axis, i);
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

// The sum of the sample taps over one zone of the axis, in closed form: zone
// -1 is [-1, 0] (all weight on pixel 0), zone z in [0, size-2] is (z, z+1]
// (weights 1 - (v - z) on z and v - z on z+1, summed as an arithmetic
// series), zone size-1 is (size-1, size] (all weight on pixel size-1). The
// zones partition [-1, size]; at their inner edges the weights agree, so the
// values are those of the per-sample sum up to rounding. Which samples lie
// in a zone is decided by the exact sample rule (binary search).
template <typename A>
CUROI_DEVICE bool roi_align_zone_tap(const RoiAlignAxis<A>& axis, int64_t z,
                                     int64_t size, RoiAlignTap<A>* tap) {
  const A lo_edge = (A)(z < 0 ? -1 : z);  // inclusive for zone -1 only
  const A hi_edge = (A)(z < 0 ? 0 : z + 1);
  int64_t i0, i1;
  if (axis.bin >= (A)0) {
    i0 = roi_align_first_beyond(axis, lo_edge, z >= 0);
    i1 = roi_align_first_beyond(axis, hi_edge, true);
  } else {
    i0 = roi_align_first_beyond(axis, hi_edge, false);
    i1 = roi_align_first_beyond(axis, lo_edge, z < 0);
  }
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

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// One thread per output element, each sample read through its four taps.

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
    const CuroiOutputIndex at = curoi_output_index(
        index, total, channels, pooled_height, pooled_width);
    const RoiAlignBox<A> g =
        roi_align_box(rois + at.k * 5, batch, pooled_height, pooled_width,
                      spatial_scale, sampling_ratio, aligned);
    A sum = (A)0;
    if (g.batch_index >= 0) {
      const RoiAlignAxis<A> ay = roi_align_axis(
          g.start_h, g.roi_h, at.ph, pooled_height, sampling_ratio, height);
      const RoiAlignAxis<A> ax = roi_align_axis(
          g.start_w, g.roi_w, at.pw, pooled_width, sampling_ratio, width);
      const T* plane = input + (g.batch_index * channels + at.c) * height * width;
      for (int64_t ey = ay.first; ey < ay.last; ++ey) {
        RoiAlignTap<A> ty;
        if (!roi_align_tap(ay, ey, height, &ty)) continue;
        const T* row_lo = plane + ty.lo * width;
        const T* row_hi = plane + ty.hi * width;
        for (int64_t ex = ax.first; ex < ax.last; ++ex) {
          RoiAlignTap<A> tx;
          if (!roi_align_tap(ax, ex, width, &tx)) continue;
          sum += ty.w_lo * tx.w_lo * curoi_load<A>(row_lo[tx.lo]) +
                 ty.w_lo * tx.w_hi * curoi_load<A>(row_lo[tx.hi]) +
                 ty.w_hi * tx.w_lo * curoi_load<A>(row_hi[tx.lo]) +
                 ty.w_hi * tx.w_hi * curoi_load<A>(row_hi[tx.hi]);
        }
      }
    }
    output[index] = curoi_store<T>(sum / g.count);
  }
}

// Each output gradient spreads over the four neighbours of every sample of
// its bin; bins of one box and different boxes overlap, so the adds go
// through Sum (CuroiFloatSum or the deterministic CuroiFixedSum), atomically.
template <typename T, typename Sum>
CUROI_DEVICE void roi_align_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_rois * channels * pooled_height * pooled_width;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiOutputIndex at = curoi_output_index(
        index, total, channels, pooled_height, pooled_width);
    const RoiAlignBox<A> g =
        roi_align_box(rois + at.k * 5, batch, pooled_height, pooled_width,
                      spatial_scale, sampling_ratio, aligned);
    if (g.batch_index < 0) continue;
    const RoiAlignAxis<A> ay = roi_align_axis(
        g.start_h, g.roi_h, at.ph, pooled_height, sampling_ratio, height);
    const RoiAlignAxis<A> ax = roi_align_axis(
        g.start_w, g.roi_w, at.pw, pooled_width, sampling_ratio, width);
    const A grad = curoi_load<A>(grad_output[index]) / g.count;
    const int64_t plane = (g.batch_index * channels + at.c) * height * width;
    for (int64_t ey = ay.first; ey < ay.last; ++ey) {
      RoiAlignTap<A> ty;
      if (!roi_align_tap(ay, ey, height, &ty)) continue;
      const int64_t row_lo = plane + ty.lo * width;
      const int64_t row_hi = plane + ty.hi * width;
      for (int64_t ex = ax.first; ex < ax.last; ++ex) {
        RoiAlignTap<A> tx;
        if (!roi_align_tap(ax, ex, width, &tx)) continue;
        curoi_sum_add(grad_input, row_lo + tx.lo, grad * ty.w_lo * tx.w_lo);
        curoi_sum_add(grad_input, row_lo + tx.hi, grad * ty.w_lo * tx.w_hi);
        curoi_sum_add(grad_input, row_hi + tx.lo, grad * ty.w_hi * tx.w_lo);
        curoi_sum_add(grad_input, row_hi + tx.hi, grad * ty.w_hi * tx.w_hi);
      }
    }
  }
}

#else
// ------------------------------------------------------------- CPU loops
// Bilinear weights are separable: a bin's samples collapse to one weight per
// touched row and one per touched column (the sums of the samples' taps on
// each), and the bin's value is sum_r wy[r] * sum_c wx[c] * x[r][c]. The
// weights depend on the box and the bin, not the channel: they are computed
// once per box into tables that all its channels share, and each channel
// then costs rows x columns multiply-adds per bin (9 at sampling_ratio 2)
// instead of 4 per sample (16). Samples outside the map add no weight, as
// in the per-sample rule; the sums equal it up to rounding order.
#include <vector>

// Per-bin pixel weights along one axis of one box: bin p touches pixels
// begin[p] .. begin[p] + length[p] - 1 with weights weight[offset[p] + j].
template <typename A>
struct RoiAlignWeights {
  std::vector<int64_t> begin, length, offset;
  std::vector<A> weight;

  void build(A roi_start, A roi_size, int64_t pooled, int sampling_ratio,
             int64_t size) {
    begin.assign(pooled, 0);
    length.assign(pooled, 0);
    offset.assign(pooled, 0);
    weight.clear();
    for (int64_t p = 0; p < pooled; ++p) {
      const RoiAlignAxis<A> axis =
          roi_align_axis(roi_start, roi_size, p, pooled, sampling_ratio, size);
      // Taps move monotonically along the axis, so the first and last ones
      // bound the touched pixels; min/max keeps this exact either way.
      int64_t lo = size, hi = -1;
      RoiAlignTap<A> tap;
      for (int64_t e = axis.first; e < axis.last; ++e) {
        if (!roi_align_tap(axis, e, size, &tap)) continue;
        lo = curoi_min(lo, tap.lo);
        hi = curoi_max(hi, tap.hi);
      }
      if (hi < lo) continue;
      begin[p] = lo;
      length[p] = hi - lo + 1;
      offset[p] = (int64_t)weight.size();
      weight.resize(weight.size() + (size_t)(hi - lo + 1), (A)0);
      A* w = weight.data() + offset[p] - lo;
      for (int64_t e = axis.first; e < axis.last; ++e) {
        if (!roi_align_tap(axis, e, size, &tap)) continue;
        w[tap.lo] += tap.w_lo;
        w[tap.hi] += tap.w_hi;
      }
    }
  }
};

// The tables of a group of boxes (see CuroiItems), built once per work item.
template <typename A>
struct RoiAlignGroup {
  RoiAlignBox<A> box[CUROI_BOX_GROUP];
  RoiAlignWeights<A> y[CUROI_BOX_GROUP], x[CUROI_BOX_GROUP];

  void build(const A* rois, int64_t first, int64_t end, int64_t batch,
             int64_t height, int64_t width, int64_t pooled_height,
             int64_t pooled_width, A spatial_scale, int sampling_ratio,
             int aligned) {
    for (int64_t k = first; k < end; ++k) {
      const int64_t i = k - first;
      box[i] = roi_align_box(rois + k * 5, batch, pooled_height, pooled_width,
                             spatial_scale, sampling_ratio, aligned);
      if (box[i].batch_index < 0) continue;
      y[i].build(box[i].start_h, box[i].roi_h, pooled_height, sampling_ratio,
                 height);
      x[i].build(box[i].start_w, box[i].roi_w, pooled_width, sampling_ratio,
                 width);
    }
  }
};

// Channels computed together: U independent sums per bin share each weight
// load, and keep the processor busy where one sum would wait on the last
// multiply-add.
#define CUROI_LANES 4

// Every bin of boxes k0 .. k1-1 in channels c .. c+U-1, from the group's
// tables.
template <int U, typename T, typename A>
static void roi_align_forward_channels(const T* input,
                                       const RoiAlignGroup<A>& group,
                                       int64_t k0, int64_t k1, int64_t c,
                                       int64_t channels, int64_t height,
                                       int64_t width, int64_t pooled_height,
                                       int64_t pooled_width, T* output) {
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  for (int64_t k = k0; k < k1; ++k) {
    const RoiAlignBox<A>& g = group.box[k - k0];
    const RoiAlignWeights<A>& wy = group.y[k - k0];
    const RoiAlignWeights<A>& wx = group.x[k - k0];
    T* out = output + (k * channels + c) * bins;
    if (g.batch_index < 0) {
      for (int64_t i = 0; i < U * bins; ++i) out[i] = curoi_store<T>((A)0);
      continue;
    }
    const T* plane = input + (g.batch_index * channels + c) * plane_size;
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      const int64_t rows = wy.length[ph];
      const T* row0 = plane + wy.begin[ph] * width;
      const A* w_row = wy.weight.data() + wy.offset[ph];
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const int64_t cols = wx.length[pw];
        const T* col0 = row0 + wx.begin[pw];
        const A* w_col = wx.weight.data() + wx.offset[pw];
        A sum[U];
        for (int u = 0; u < U; ++u) sum[u] = (A)0;
        for (int64_t r = 0; r < rows; ++r) {
          const T* row = col0 + r * width;
          A part[U];
          for (int u = 0; u < U; ++u) part[u] = (A)0;
          for (int64_t j = 0; j < cols; ++j) {
            const A w = w_col[j];
            for (int u = 0; u < U; ++u)
              part[u] += w * curoi_load<A>(row[u * plane_size + j]);
          }
          for (int u = 0; u < U; ++u) sum[u] += w_row[r] * part[u];
        }
        const int64_t bin = ph * pooled_width + pw;
        for (int u = 0; u < U; ++u) out[u * bins + bin] = curoi_store<T>(sum[u] / g.count);
      }
    }
  }
}

template <typename T>
static void roi_align_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    T* output) {
  typedef typename AccType<T>::type A;
  const CuroiItems items = curoi_items(num_rois, channels);
  const int64_t bins = pooled_height * pooled_width;
  const int64_t cost = CUROI_BOX_GROUP * items.block * bins * 4;
  curoi_parallel_for(items.count(), 1, cost, [&](int64_t item) {
    static thread_local RoiAlignGroup<A> group;
    const int64_t k0 = items.first_box(item), k1 = items.end_box(item);
    group.build(rois, k0, k1, batch, height, width, pooled_height,
                pooled_width, spatial_scale, sampling_ratio, aligned);
    const int64_t c1 = items.end_channel(item);
    int64_t c = items.first_channel(item);
    for (; c + CUROI_LANES <= c1; c += CUROI_LANES)
      roi_align_forward_channels<CUROI_LANES, T, A>(
          input, group, k0, k1, c, channels, height, width, pooled_height,
          pooled_width, output);
    for (; c < c1; ++c)
      roi_align_forward_channels<1, T, A>(input, group, k0, k1, c, channels,
                                          height, width, pooled_height,
                                          pooled_width, output);
  });
}

// The gradient of every bin of boxes k0 .. k1-1 in channels c .. c+U-1
// (each channel's plane in box order, bin order: the order does not depend
// on U), sharing each weight between the U channels.
template <int U, typename T, typename A, typename Sum>
static void roi_align_backward_channels(const T* grad_output,
                                        const RoiAlignGroup<A>& group,
                                        int64_t k0, int64_t k1, int64_t c,
                                        int64_t channels, int64_t height,
                                        int64_t width, int64_t pooled_height,
                                        int64_t pooled_width,
                                        const Sum& grad_input) {
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  for (int64_t k = k0; k < k1; ++k) {
    const RoiAlignBox<A>& g = group.box[k - k0];
    if (g.batch_index < 0) continue;
    const RoiAlignWeights<A>& wy = group.y[k - k0];
    const RoiAlignWeights<A>& wx = group.x[k - k0];
    const int64_t plane = (g.batch_index * channels + c) * plane_size;
    const T* grad_bins = grad_output + (k * channels + c) * bins;
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      const int64_t rows = wy.length[ph];
      const int64_t row0 = plane + wy.begin[ph] * width;
      const A* w_row = wy.weight.data() + wy.offset[ph];
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const int64_t bin = ph * pooled_width + pw;
        A grad[U];
        for (int u = 0; u < U; ++u)
          grad[u] = curoi_load<A>(grad_bins[u * bins + bin]) / g.count;
        const int64_t cols = wx.length[pw];
        const int64_t col0 = row0 + wx.begin[pw];
        const A* w_col = wx.weight.data() + wx.offset[pw];
        for (int64_t r = 0; r < rows; ++r) {
          A grad_row[U];
          for (int u = 0; u < U; ++u) grad_row[u] = grad[u] * w_row[r];
          for (int64_t j = 0; j < cols; ++j) {
            const A w = w_col[j];
            for (int u = 0; u < U; ++u)
              curoi_sum_add(grad_input, col0 + u * plane_size + r * width + j,
                            grad_row[u] * w);
          }
        }
      }
    }
  }
}

// Each thread owns a share of the channels and runs over every box for
// them, so every gradient plane is summed by one thread, box after box, bin
// after bin: no atomics, and the same bits whatever the number of threads.
template <typename T, typename Sum>
static void roi_align_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t bins = pooled_height * pooled_width;
  const int64_t work = num_rois * channels * bins * 4;
  curoi_parallel_shares(channels, work, [&](int part, int parts) {
    static thread_local RoiAlignGroup<A> group;
    const CuroiChannelRange owned = curoi_owned_channels(channels, part, parts);
    if (owned.end <= owned.begin) return;
    for (int64_t k0 = 0; k0 < num_rois; k0 += CUROI_BOX_GROUP) {
      const int64_t k1 = curoi_min(k0 + (int64_t)CUROI_BOX_GROUP, num_rois);
      group.build(rois, k0, k1, batch, height, width, pooled_height,
                  pooled_width, spatial_scale, sampling_ratio, aligned);
      int64_t c = owned.begin;
      for (; c + CUROI_LANES <= owned.end; c += CUROI_LANES)
        roi_align_backward_channels<CUROI_LANES, T, A>(
            grad_output, group, k0, k1, c, channels, height, width,
            pooled_height, pooled_width, grad_input);
      for (; c < owned.end; ++c)
        roi_align_backward_channels<1, T, A>(grad_output, group, k0, k1, c,
                                             channels, height, width,
                                             pooled_height, pooled_width,
                                             grad_input);
    }
  });
}
#endif

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
