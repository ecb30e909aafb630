// RoI Align, max modes: the largest value over a bin's samples rather than
// their mean, on the geometry of roi_align_geometry.cuh.
//
//   CUROI_ALIGN_MAX_ONNX (ONNX RoiAlign mode "max", as its reference and
//     onnxruntime compute it): each sample's value is the largest of its four
//     weighted bilinear corner terms w * x (not their sum); the output is the
//     largest sample value, the first one winning ties. A sample off the map
//     has the value 0 * x[0] (all four weights 0 on pixel 0). The comparison
//     is a < b ? b : a throughout, as std::max and Python's max, so a NaN
//     counts only where it comes first. It has no gradient.
//   CUROI_ALIGN_MAX_INTERP (mmcv's RoIAlign with pool_mode "max"): each
//     sample's value is its bilinear interpolation (0 off the map); the first
//     largest wins, and a NaN beats any number (the first NaN wins), as in
//     roi_pool. `argmax` (optional) receives the winning sample's index
//     iy * grid_w + ix in the bin's sampling grid, -1 when there is none,
//     when it lies off the map (its value 0 depends on no pixel) or when
//     the grid has no int64 indices (roi_align_max_indexable).
//
// The backward (interpolated mode only) sends each output's gradient to the
// four pixels around the sample that argmax names, with that sample's
// bilinear weights: the sample's position is recomputed from the box, the
// bin and the index through the shared geometry, so it is the very position
// the forward evaluated (mmcv stores the position itself instead). An argmax
// that names no sample of the grid (-1, out of range: it comes from the
// caller) or a sample off the map passes nothing.
//
// A bin without samples (an empty box with adaptive sampling) gives 0.
//
// Bounded work: along an axis with more than CUROI_SCAN_SAMPLES samples only
// those that can land on the map are visited (the rest share one value, taken
// once), and a densely sampled axis visits two samples per pixel zone: within
// a zone every bilinear weight is linear in the sample's position, so each
// sample value (a weighted term, or their sum) is linear along the axis and
// its largest value over the zone's samples is at the first or the last one.
#include "roi_align_tiles.cuh"

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

// Whether the samples of a bin's grid have int64 indices iy * grid_w + ix:
// each side's grid must be represented (at most CUROI_MAX_GRID, so that its
// count is the grid) and the whole grid must have fewer than 2^63 samples.
// Adaptive sampling of a box billions of pixels wide in both directions (or
// 1e15 along one) breaks that: its winners are reported as -1, passing no
// gradient, rather than as wrapped or rescaled indices. Below 3037000499
// per side the product fits: no division.
template <typename A>
CUROI_DEVICE bool roi_align_max_indexable(const RoiAlignAxis<A>& ay,
                                          const RoiAlignAxis<A>& ax) {
  if (!(ay.grid <= (A)CUROI_MAX_GRID && ax.grid <= (A)CUROI_MAX_GRID))
    return false;
  const int64_t side = 3037000499LL;  // floor(sqrt(2^63 - 1))
  if (ay.count <= side && ax.count <= side) return true;
  return ax.count <= 0 || ay.count <= 0x7fffffffffffffffLL / ax.count;
}

// The value of a sample with taps (ty, tx), or of one off the map. Pixel
// (h, w) of the plane is plane[(h * width + w) * step]: step 1 in NCHW, C
// channels-last; the layout changes the addresses, not the operations.
template <typename T, typename A>
CUROI_DEVICE A roi_align_max_value(const T* plane, int64_t width,
                                   int64_t step, int mode, bool on_map,
                                   const RoiAlignTap<A>& ty,
                                   const RoiAlignTap<A>& tx) {
  if (!on_map)
    return mode == CUROI_ALIGN_MAX_ONNX ? (A)0 * curoi_load<A>(plane[0]) : (A)0;
  const T* row_lo = plane + ty.lo * width * step;
  const T* row_hi = plane + ty.hi * width * step;
  const int64_t lo = tx.lo * step, hi = tx.hi * step;
  const A t1 = ty.w_lo * tx.w_lo * curoi_load<A>(row_lo[lo]);
  const A t2 = ty.w_lo * tx.w_hi * curoi_load<A>(row_lo[hi]);
  const A t3 = ty.w_hi * tx.w_lo * curoi_load<A>(row_hi[lo]);
  const A t4 = ty.w_hi * tx.w_hi * curoi_load<A>(row_hi[hi]);
  if (mode == CUROI_ALIGN_MAX_INTERP) return t1 + t2 + t3 + t4;
  A v = t1;
  v = v < t2 ? t2 : v;
  v = v < t3 ? t3 : v;
  return v < t4 ? t4 : v;
}

// The taps of the sample that `argmax` names in the bin's grid, placed by
// the bin's axes exactly as the forward placed it. False when argmax names
// no sample of the grid (it comes from the caller: never trust it) or one
// off the map, whose value 0 depends on no pixel.
template <typename A>
CUROI_DEVICE bool roi_align_max_winner_taps(const RoiAlignAxis<A>& ay,
                                            const RoiAlignAxis<A>& ax,
                                            int64_t argmax, int64_t height,
                                            int64_t width, RoiAlignTap<A>* ty,
                                            RoiAlignTap<A>* tx) {
  if (argmax < 0 || ay.count <= 0 || ax.count <= 0) return false;
  if (!roi_align_max_indexable(ay, ax)) return false;  // the forward gives -1
  const int64_t iy = argmax / ax.count;
  if (iy >= ay.count) return false;  // argmax >= grid_h * grid_w
  const int64_t ix = argmax - iy * ax.count;
  return roi_align_sample_tap(ay, iy, height, ty) &&
         roi_align_sample_tap(ax, ix, width, tx);
}

// The gradient `grad` of one output to the four pixels of its winning
// sample, each with the weight the forward gave that pixel. Pixel (h, w)
// of the plane is at + (h * width + w) * step in the gradient.
template <typename A, typename Sum>
CUROI_DEVICE void roi_align_max_scatter(const Sum& grad_input, int64_t at,
                                        int64_t width, int64_t step, A grad,
                                        const RoiAlignTap<A>& ty,
                                        const RoiAlignTap<A>& tx) {
  const int64_t row_lo = at + ty.lo * width * step;
  const int64_t row_hi = at + ty.hi * width * step;
  const int64_t lo = tx.lo * step, hi = tx.hi * step;
  curoi_sum_add(grad_input, row_lo + lo, grad * (ty.w_lo * tx.w_lo));
  curoi_sum_add(grad_input, row_lo + hi, grad * (ty.w_lo * tx.w_hi));
  curoi_sum_add(grad_input, row_hi + lo, grad * (ty.w_hi * tx.w_lo));
  curoi_sum_add(grad_input, row_hi + hi, grad * (ty.w_hi * tx.w_hi));
}

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// A thread per (box, bin, tile of channels) (curoi_channel_tile): the box,
// the bin's axes and what the visits skip are found once per tile, then each
// channel of the tile is one bin maximum. The layout only moves the
// addresses: a channels-last element runs the very operations of its NCHW
// twin, so the results are the same bits, transposed.

// What a bin's maxima share across channels.
template <typename A>
struct RoiAlignMaxBin {
  RoiAlignElement<A> e;
  bool skips;      // samples the visits skip share one value, taken first
  bool indexable;  // roi_align_max_indexable
};

template <typename A>
CUROI_DEVICE RoiAlignMaxBin<A> roi_align_max_bin_of(const RoiAlignElement<A>& e,
                                                    int64_t height,
                                                    int64_t width) {
  RoiAlignMaxBin<A> bin;
  bin.e = e;
  bin.skips = roi_align_max_skips(e.y, height) || roi_align_max_skips(e.x, width);
  bin.indexable = roi_align_max_indexable(e.y, e.x);
  return bin;
}

// One output element: the maximum over the bin's samples in one plane.
template <typename T, typename A>
CUROI_DEVICE A roi_align_max_bin(const T* plane, int64_t step,
                                 const RoiAlignMaxBin<A>& bin, int64_t height,
                                 int64_t width, int mode, int64_t* winner) {
  const RoiAlignAxis<A>& ay = bin.e.y;
  const RoiAlignAxis<A>& ax = bin.e.x;
  A best = (A)0;
  bool any = false;
  *winner = -1;
  if (ay.count <= 0 || ax.count <= 0) return best;
  RoiAlignTap<A> ty, tx;
  if (bin.skips) {
    best = roi_align_max_value(plane, width, step, mode, false, ty, tx);
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
      const A v =
          roi_align_max_value(plane, width, step, mode, on_y && on_x, ty, tx);
      if (roi_align_max_better(mode, any, v, best)) {
        best = v;
        any = true;
        // The grid index, or -1 off the map (such a winner, 0, passes no
        // gradient), as for the skipped samples taken first.
        *winner = on_y && on_x && bin.indexable ? iy * ax.count + ix : -1;
      }
    }
  }
  return best;
}

template <bool ChannelsLast, typename T>
CUROI_DEVICE void roi_align_max_forward_loop(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    int mode, int64_t groups, T* output, int64_t* argmax) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_rois * pooled_height * pooled_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, channels, groups, pooled_height, pooled_width);
    const RoiAlignMaxBin<A> bin = roi_align_max_bin_of(
        roi_align_element(rois, t.k, t.ph, t.pw, batch, height, width,
                          pooled_height, pooled_width, spatial_scale,
                          sampling_ratio, aligned),
        height, width);
    const bool reads = bin.e.box.batch_index >= 0;
    const CuroiTileAt at = curoi_tile_at<ChannelsLast>(
        CuroiSameChannel(), t, bin.e.box.batch_index, channels,
        height * width, pooled_height, pooled_width);
    const T* plane = input + at.in;
#pragma unroll 1
    for (int64_t i = 0; i < at.count; ++i) {
      A best = (A)0;
      int64_t winner = -1;
      if (reads)
        best = roi_align_max_bin(plane, at.pixel_step, bin, height, width,
                                 mode, &winner);
      const int64_t out = at.out + i * at.out_step;
      output[out] = curoi_store<T>(best);
      if (argmax) argmax[out] = winner;
      if (reads) plane += at.in_step;
    }
  }
}

template <typename T>
CUROI_DEVICE void roi_align_max_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    int mode, int channels_last, int64_t groups, T* output, int64_t* argmax) {
  if (channels_last)
    roi_align_max_forward_loop<true>(input, rois, num_rois, batch, channels,
                                     height, width, pooled_height,
                                     pooled_width, spatial_scale,
                                     sampling_ratio, aligned, mode, groups,
                                     output, argmax);
  else
    roi_align_max_forward_loop<false>(input, rois, num_rois, batch, channels,
                                      height, width, pooled_height,
                                      pooled_width, spatial_scale,
                                      sampling_ratio, aligned, mode, groups,
                                      output, argmax);
}

// Each output gradient goes to its winning sample's four pixels; bins of
// one box and of different boxes share pixels, so the adds go through Sum
// (CuroiFloatSum or the deterministic CuroiFixedSum), atomically. A thread
// per (box, bin, tile of channels), as the forward's.
template <bool ChannelsLast, typename T, typename Sum>
CUROI_DEVICE void roi_align_max_backward_loop(
    const T* grad_output, const int64_t* argmax,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int sampling_ratio, int aligned, int64_t groups, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_rois * pooled_height * pooled_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, channels, groups, pooled_height, pooled_width);
    const RoiAlignElement<A> e = roi_align_element(
        rois, t.k, t.ph, t.pw, batch, height, width, pooled_height,
        pooled_width, spatial_scale, sampling_ratio, aligned);
    if (e.box.batch_index < 0) continue;
    const CuroiTileAt at = curoi_tile_at<ChannelsLast>(
        CuroiSameChannel(), t, e.box.batch_index, channels,
        height * width, pooled_height, pooled_width);
#pragma unroll 1
    for (int64_t i = 0; i < at.count; ++i) {
      const int64_t out = at.out + i * at.out_step;
      const int64_t where = argmax[out];
      RoiAlignTap<A> ty, tx;
      // No winner, one off the map, or an index that names no sample.
      if (where < 0 ||
          !roi_align_max_winner_taps(e.y, e.x, where, height, width, &ty, &tx))
        continue;
      roi_align_max_scatter(grad_input, at.in + i * at.in_step, width,
                            at.pixel_step, curoi_load<A>(grad_output[out]), ty,
                            tx);
    }
  }
}

template <typename T, typename Sum>
CUROI_DEVICE void roi_align_max_backward(
    const T* grad_output, const int64_t* argmax,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int sampling_ratio, int aligned, int channels_last, int64_t groups,
    const Sum& grad_input) {
  if (channels_last)
    roi_align_max_backward_loop<true>(grad_output, argmax, rois, num_rois,
                                      batch, channels, height, width,
                                      pooled_height, pooled_width,
                                      spatial_scale, sampling_ratio, aligned,
                                      groups, grad_input);
  else
    roi_align_max_backward_loop<false>(grad_output, argmax, rois, num_rois,
                                       batch, channels, height, width,
                                       pooled_height, pooled_width,
                                       spatial_scale, sampling_ratio, aligned,
                                       groups, grad_input);
}

#else
// ------------------------------------------------------------- CPU loops
// A bin's sampling (its axes, which samples are visited, their taps) depends
// on the box and the bin, not the channel: it is found once per box group
// into tables that every channel shares, and each channel then costs the
// value and the comparison of each visited sample. Several channels run
// through a bin together (lanes), sharing each visited sample's taps.
#include <vector>

// One visited sample of one axis: its index in the grid, whether it lands
// on the map, and its taps there.
template <typename A>
struct RoiAlignMaxVisit {
  int64_t index;
  bool on;
  RoiAlignTap<A> tap;
};

// Every bin of one box along one axis: bin p's axis, whether its visits
// skip samples, and its visits visit[first[p]] .. visit[first[p + 1] - 1],
// in the order roi_align_max_sample gives them.
template <typename A>
struct RoiAlignMaxAxes {
  std::vector<RoiAlignAxis<A>> axis;
  std::vector<unsigned char> skips;
  std::vector<int64_t> first;
  std::vector<RoiAlignMaxVisit<A>> visit;

  // The backward needs the axes alone (with_visits false).
  void build(A roi_start, A roi_size, int64_t pooled, int sampling_ratio,
             int64_t size, bool with_visits) {
    axis.resize((size_t)pooled);
    skips.assign((size_t)pooled, 0);
    first.assign((size_t)pooled + 1, 0);
    visit.clear();
    for (int64_t p = 0; p < pooled; ++p) {
      const RoiAlignAxis<A> a =
          roi_align_axis(roi_start, roi_size, p, pooled, sampling_ratio, size);
      axis[p] = a;
      first[p] = (int64_t)visit.size();
      if (!with_visits) continue;
      skips[p] = roi_align_max_skips(a, size);
      const int64_t visits = roi_align_max_visits(a);
      for (int64_t v = 0; v < visits; ++v) {
        RoiAlignMaxVisit<A> s;
        s.index = roi_align_max_sample(a, v, size);
        if (s.index < 0) continue;
        s.tap.lo = s.tap.hi = 0;
        s.tap.w_lo = s.tap.w_hi = (A)0;
        s.on = roi_align_sample_tap(a, s.index, size, &s.tap);
        visit.push_back(s);
      }
    }
    first[pooled] = (int64_t)visit.size();
  }
};

// The tables of a group of boxes (see CuroiItems).
template <typename A>
struct RoiAlignMaxGroup {
  RoiAlignBox<A> box[CUROI_BOX_GROUP];
  RoiAlignMaxAxes<A> y[CUROI_BOX_GROUP], x[CUROI_BOX_GROUP];

  void build(const A* rois, int64_t first, int64_t end, int64_t batch,
             int64_t height, int64_t width, int64_t pooled_height,
             int64_t pooled_width, A spatial_scale, int sampling_ratio,
             int aligned, bool with_visits) {
    for (int64_t k = first; k < end; ++k) {
      const int64_t i = k - first;
      box[i] = roi_align_box(rois + k * 5, batch, pooled_height, pooled_width,
                             spatial_scale, sampling_ratio, aligned);
      if (box[i].batch_index < 0) continue;
      y[i].build(box[i].start_h, box[i].roi_h, pooled_height, sampling_ratio,
                 height, with_visits);
      x[i].build(box[i].start_w, box[i].roi_w, pooled_width, sampling_ratio,
                 width, with_visits);
    }
  }
};

// Channels that run through a bin together in NCHW.
#define CUROI_MAX_LANES 4

// The maximum of bin (ph, pw) in `lanes` channels, lane u's pixel (h, w) at
// pixels[u * lane_stride + (h * width + w) * step], and the winners' grid
// indices. Each lane runs the operations of the GPU's roi_align_max_bin in
// its order (the same candidates, values and comparisons), so the results
// do not depend on the lanes or the layout.
template <typename T, typename A>
static void roi_align_max_bin_lanes(const T* pixels, int64_t lanes,
                                    int64_t lane_stride, int64_t width,
                                    int64_t step, int mode,
                                    const RoiAlignMaxAxes<A>& wy, int64_t ph,
                                    const RoiAlignMaxAxes<A>& wx, int64_t pw,
                                    A* __restrict__ best,
                                    int64_t* __restrict__ winner) {
  for (int64_t u = 0; u < lanes; ++u) {
    best[u] = (A)0;
    winner[u] = -1;
  }
  const RoiAlignAxis<A>& ay = wy.axis[ph];
  const RoiAlignAxis<A>& ax = wx.axis[pw];
  if (ay.count <= 0 || ax.count <= 0) return;
  bool any = false;
  if (wy.skips[ph] || wx.skips[pw]) {
    const RoiAlignTap<A> none = {0, 0, (A)0, (A)0};
    for (int64_t u = 0; u < lanes; ++u)
      best[u] = roi_align_max_value(pixels + u * lane_stride, width, step,
                                    mode, false, none, none);
    any = true;
  }
  const bool indexable = roi_align_max_indexable(ay, ax);
  const RoiAlignMaxVisit<A>* ys = wy.visit.data();
  const RoiAlignMaxVisit<A>* xs = wx.visit.data();
  for (int64_t sy = wy.first[ph]; sy < wy.first[ph + 1]; ++sy) {
    const RoiAlignMaxVisit<A>& vy = ys[sy];
    for (int64_t sx = wx.first[pw]; sx < wx.first[pw + 1]; ++sx) {
      const RoiAlignMaxVisit<A>& vx = xs[sx];
      const bool on = vy.on && vx.on;
      const int64_t index = on && indexable ? vy.index * ax.count + vx.index : -1;
      for (int64_t u = 0; u < lanes; ++u) {
        const A v = roi_align_max_value(pixels + u * lane_stride, width, step,
                                        mode, on, vy.tap, vx.tap);
        if (roi_align_max_better(mode, any, v, best[u])) {
          best[u] = v;
          winner[u] = index;
        }
      }
      any = true;  // the first candidate was taken by every lane
    }
  }
}

// Work items of box groups and channel blocks (CuroiItems), each with the
// tables of its group.
template <typename T>
static void roi_align_max_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    int mode, int channels_last, int64_t /* groups */, T* output,
    int64_t* argmax) {
  typedef typename AccType<T>::type A;
  const CuroiItems items = curoi_items(num_rois, channels);
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  const int64_t cost = CUROI_BOX_GROUP * items.block * bins * 16;
  curoi_parallel_for(items.count(), 1, cost, [&](int64_t item) {
    static thread_local RoiAlignMaxGroup<A> group;
    static thread_local std::vector<A> best;
    static thread_local std::vector<int64_t> winner;
    const int64_t k0 = items.first_box(item), k1 = items.end_box(item);
    const int64_t c0 = items.first_channel(item), c1 = items.end_channel(item);
    group.build(rois, k0, k1, batch, height, width, pooled_height,
                pooled_width, spatial_scale, sampling_ratio, aligned, true);
    const int64_t n = c1 - c0;
    best.resize((size_t)curoi_max(n, (int64_t)CUROI_MAX_LANES));
    winner.resize(best.size());
    for (int64_t k = k0; k < k1; ++k) {
      const RoiAlignBox<A>& g = group.box[k - k0];
      const RoiAlignMaxAxes<A>& wy = group.y[k - k0];
      const RoiAlignMaxAxes<A>& wx = group.x[k - k0];
      const bool usable = g.batch_index >= 0;
      const int64_t b = usable ? g.batch_index : 0;  // no address below input
      if (channels_last) {
        // Bin by bin, every channel of the block together, the channel
        // innermost (contiguous).
        const T* image = input + b * plane_size * channels + c0;
        for (int64_t bin = 0; bin < bins; ++bin) {
          if (usable)
            roi_align_max_bin_lanes<T, A>(image, n, 1, width, channels, mode, wy,
                                          bin / pooled_width, wx,
                                          bin % pooled_width, best.data(),
                                          winner.data());
          const int64_t out = (k * bins + bin) * channels + c0;
          for (int64_t c = 0; c < n; ++c) {
            output[out + c] = curoi_store<T>(usable ? best[c] : (A)0);
            if (argmax) argmax[out + c] = usable ? winner[c] : -1;
          }
        }
        continue;
      }
      // A few channel planes at a time through every bin of the box.
      for (int64_t c = c0; c < c1; c += CUROI_MAX_LANES) {
        const int64_t lanes = curoi_min(c1 - c, (int64_t)CUROI_MAX_LANES);
        const T* planes = input + (b * channels + c) * plane_size;
        for (int64_t bin = 0; bin < bins; ++bin) {
          if (usable)
            roi_align_max_bin_lanes<T, A>(planes, lanes, plane_size, width, 1,
                                          mode, wy, bin / pooled_width, wx,
                                          bin % pooled_width, best.data(),
                                          winner.data());
          for (int64_t u = 0; u < lanes; ++u) {
            const int64_t out = (k * channels + c + u) * bins + bin;
            output[out] = curoi_store<T>(usable ? best[u] : (A)0);
            if (argmax) argmax[out] = usable ? winner[u] : -1;
          }
        }
      }
    }
  });
}

// Box group after box group (its axes found once by the calling thread),
// each block of channels is summed by one thread, so every gradient plane
// receives its terms box after box, bin after bin, in both layouts: no
// atomics, and the same bits whatever the number of threads or the layout.
template <typename T, typename Sum>
static void roi_align_max_backward(
    const T* grad_output, const int64_t* argmax,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int sampling_ratio, int aligned, int channels_last,
    int64_t /* groups */, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  int64_t block = (channels + 4 * curoi_threads() - 1) / (4 * curoi_threads());
  if (block < 1) block = 1;  // no channels: no blocks, and no division by 0
  const int64_t blocks = (channels + block - 1) / block;
  const int64_t cost = CUROI_BOX_GROUP * block * bins * 4;
  // Built by the calling thread, read by the workers: through a reference,
  // since in a worker the name of a thread_local means the worker's own.
  static thread_local RoiAlignMaxGroup<A> callers_group;
  RoiAlignMaxGroup<A>& group = callers_group;
  for (int64_t k0 = 0; k0 < num_rois; k0 += CUROI_BOX_GROUP) {
    const int64_t k1 = curoi_min(k0 + (int64_t)CUROI_BOX_GROUP, num_rois);
    group.build(rois, k0, k1, batch, height, width, pooled_height,
                pooled_width, spatial_scale, sampling_ratio, aligned, false);
    curoi_parallel_for(blocks, 1, cost, [&](int64_t i) {
      const int64_t c0 = i * block, c1 = curoi_min(c0 + block, channels);
      for (int64_t k = k0; k < k1; ++k) {
        const RoiAlignBox<A>& g = group.box[k - k0];
        if (g.batch_index < 0) continue;
        const RoiAlignMaxAxes<A>& wy = group.y[k - k0];
        const RoiAlignMaxAxes<A>& wx = group.x[k - k0];
        // (channel, bin) in NCHW, (bin, channel) channels-last: per channel
        // the bins come in the same order either way.
        const int64_t outer = channels_last ? bins : c1 - c0;
        const int64_t inner = channels_last ? c1 - c0 : bins;
        for (int64_t o = 0; o < outer; ++o) {
          for (int64_t j = 0; j < inner; ++j) {
            const int64_t c = c0 + (channels_last ? j : o);
            const int64_t bin = channels_last ? o : j;
            const int64_t at = channels_last ? (k * bins + bin) * channels + c
                                             : (k * channels + c) * bins + bin;
            const int64_t where = argmax[at];
            if (where < 0) continue;
            RoiAlignTap<A> ty, tx;
            if (!roi_align_max_winner_taps(wy.axis[bin / pooled_width],
                                           wx.axis[bin % pooled_width], where,
                                           height, width, &ty, &tx))
              continue;
            const int64_t plane =
                channels_last ? g.batch_index * plane_size * channels + c
                              : (g.batch_index * channels + c) * plane_size;
            roi_align_max_scatter(grad_input, plane, width,
                                  channels_last ? channels : 1,
                                  curoi_load<A>(grad_output[at]), ty, tx);
          }
        }
      }
    });
  }
}
#endif

#define CUROI_DEFINE_ROI_ALIGN_MAX(T, suffix)                                  \
  CUROI_KERNEL void roi_align_max_forward_##suffix(                            \
      const T* input, const AccType<T>::type* rois, int64_t num_rois,          \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int sampling_ratio, int aligned,         \
      int mode, int channels_last, int64_t groups, T* output,                  \
      int64_t* argmax) {                                                       \
    roi_align_max_forward<T>(input, rois, num_rois, batch, channels, height,   \
                             width, pooled_height, pooled_width,               \
                             spatial_scale, sampling_ratio, aligned, mode,     \
                             channels_last, groups, output, argmax);           \
  }                                                                            \
  CUROI_KERNEL void roi_align_max_backward_##suffix(                           \
      const T* grad_output, const int64_t* argmax,                             \
      const AccType<T>::type* rois, int64_t num_rois, int64_t batch,           \
      int64_t channels, int64_t height, int64_t width, int64_t pooled_height,  \
      int64_t pooled_width, AccType<T>::type spatial_scale,                    \
      int sampling_ratio, int aligned, int channels_last, int64_t groups,      \
      AccType<T>::type* grad_input) {                                          \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_input;                                                     \
    roi_align_max_backward<T>(grad_output, argmax, rois, num_rois, batch,      \
                              channels, height, width, pooled_height,          \
                              pooled_width, spatial_scale, sampling_ratio,     \
                              aligned, channels_last, groups, sum);            \
  }                                                                            \
  CUROI_KERNEL void roi_align_max_backward_fixed_##suffix(                     \
      const T* grad_output, const int64_t* argmax,                             \
      const AccType<T>::type* rois, int64_t num_rois, int64_t batch,           \
      int64_t channels, int64_t height, int64_t width, int64_t pooled_height,  \
      int64_t pooled_width, AccType<T>::type spatial_scale,                    \
      int sampling_ratio, int aligned, int channels_last, int64_t groups,      \
      const double* max_abs, int64_t* fixed, AccType<T>::type* grad_input) {   \
    roi_align_max_backward<T>(                                                 \
        grad_output, argmax, rois, num_rois, batch, channels, height, width,   \
        pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned,   \
        channels_last, groups,                                                 \
        curoi_fixed_sum(grad_input, fixed, max_abs,                            \
                        num_rois * pooled_height * pooled_width));             \
  }                                                                            \
  CUROI_KERNEL void roi_align_max_fixed_finish_##suffix(                       \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_input) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_input);              \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_ROI_ALIGN_MAX)
