// RoI Align on rotated boxes (average), forward and backward, with the
// numbers of detectron2's ROIAlignRotated and mmcv's RoIAlignRotated.
//
// A box row is (batch index, centre x, centre y, width, height, angle). In
// feature-map coordinates, with s = spatial_scale:
//   convention 0, detectron2: offset 0.5; theta = angle * pi / 180 (degrees,
//     counter-clockwise). detectron2 has no `aligned` or `clockwise`: both
//     are ignored.
//   convention 1, mmcv: offset = aligned ? 0.5 : 0; theta = angle (radians),
//     -angle when `clockwise`; width and height at least 1 when not aligned.
//   cx = x*s - offset, cy = y*s - offset, w = width*s, h = height*s;
//   bin_h = h / PH, grid_h = sampling_ratio if > 0 else ceil(h / PH) (w
//   likewise); sample (iy, ix) of bin (ph, pw), in box coordinates
//     yy = -h/2 + ph*bin_h + (iy + 0.5)*bin_h/grid_h, xx likewise,
//   lies on the map at the box turned by theta about its centre:
//     y = yy*cos(theta) - xx*sin(theta) + cy,
//     x = yy*sin(theta) + xx*cos(theta) + cx,
//   and is read as RoI Align reads a sample (roi_align_bilinear_tap: off
//   [-1, H] x [-1, W] it adds 0). A bin's value is the sum of its samples
//   over max(grid_h*grid_w, 1), the samples off the map included.
//
// Bounded work: a huge box with adaptive sampling has a huge grid, but only
// its samples on the map are ever visited. A row of samples (one yy) lies on
// a straight line, and along it both map coordinates are monotone in ix
// (every rounded operation is monotone), so the row's samples on the map are
// one run of ix, found by binary search on the very coordinates the sums
// use. The rows that can cross the map are those whose yy lies within the
// map's projection onto the box's yy axis, widened by a bound on rounding
// (RoiAlignRotatedBox::reach). Consecutive samples whose coordinates round
// to the same value (boxes far larger than float resolves) are taken once,
// with their number as a weight. Work is then of the order of the samples
// on the map plus a binary search per row that crosses it.
#include "roi_align_geometry.cuh"

#define CUROI_ROTATED_DETECTRON2 0
#define CUROI_ROTATED_MMCV 1

// A box whose scaled centre or size exceeds this magnitude reads nothing:
// float resolves nothing finer than 1e23 pixels there, and the geometry's
// sums (projections of the map, margins) stay finite below it.
#define CUROI_ROTATED_MAX_EXTENT 1e30

#define CUROI_PI 3.14159265358979323846

// Machine epsilon of the accumulation type.
CUROI_DEVICE float roi_align_rotated_epsilon(float) {
  return 1.1920928955078125e-7f;
}
CUROI_DEVICE double roi_align_rotated_epsilon(double) {
  return 2.220446049250313e-16;
}

// sin(theta) and cos(theta) of a box, theta = angle * pi / 180 (degrees) or
// angle (radians). Float computes in float throughout: CUDA's sinf and cosf
// reduce huge arguments in double, so float has its own, as accurate as
// theirs (within 2 ulp) on every angle a box has: degrees are reduced
// exactly (fmod by 360 and by quarter turns), radians below 1e5 by a
// three-part pi/2 (Cody and Waite), larger ones first modulo float's 2*pi
// (their sine means nothing in float anyway, but stays in [-1, 1]). The
// polynomials on [-pi/4, pi/4] are Cephes's sinf and cosf.
CUROI_DEVICE void roi_align_rotated_sincos(float angle, bool degrees,
                                           float* sin_t, float* cos_t) {
  float r, k;
  if (degrees) {
    const float a = fmodf(angle, 360.0f);
    k = rintf(a / 90.0f);
    r = (a - k * 90.0f) * (float)(CUROI_PI / 180);
  } else {
    float x = angle;
    if (!(fabsf(x) <= 1e5f)) x = fmodf(x, (float)(2 * CUROI_PI));
    k = rintf(x * (float)(2 / CUROI_PI));
    r = ((x - k * 1.5703125f) - k * 4.8375129699707031e-4f) -
        k * 7.5497899548918821e-8f;
  }
  const float z = r * r;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z -
                   1.6666654611e-1f) * z * r + r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                   4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  switch ((int)k & 3) {  // theta = r + k * pi/2
    case 0: *sin_t = s; *cos_t = c; break;
    case 1: *sin_t = c; *cos_t = -s; break;
    case 2: *sin_t = -s; *cos_t = -c; break;
    default: *sin_t = -c; *cos_t = s; break;
  }
}

// Double: detectron2's formula as written, with the C library's sin, cos.
CUROI_DEVICE void roi_align_rotated_sincos(double angle, bool degrees,
                                           double* sin_t, double* cos_t) {
  const double theta = degrees ? angle * CUROI_PI / 180 : angle;
  *sin_t = sin(theta);
  *cos_t = cos(theta);
}

// The kernels' scalar arguments.
template <typename A>
struct RoiAlignRotatedArgs {
  int64_t batch, channels, height, width, pooled_height, pooled_width;
  A spatial_scale;
  int sampling_ratio, convention, aligned, clockwise;
};

// What every bin of one box shares. batch_index is -1 for a box that must
// read nothing: batch index outside [0, N) or not finite, a value that is
// not finite, a scaled centre or size beyond CUROI_ROTATED_MAX_EXTENT.
template <typename A>
struct RoiAlignRotatedBox {
  int64_t batch_index;
  A center_h, center_w;  // cy, cx above
  A roi_h, roi_w;        // h, w above
  A cos_t, sin_t;        // cos(theta), sin(theta), once per box
  A count;               // the divisor max(grid_h*grid_w, 1)
  // How far (in pixels, along yy) a row can lie outside the map's
  // projection and still have a sample that rounds onto the map. A sample
  // on the map lies within |centre| + map size of the centre, so its
  // coordinates, their rounding errors and the error from
  // |cos^2 + sin^2 - 1| are bounded by that, times a few units of epsilon:
  // a hundred units here. The size of the box does not enter: a huge box
  // around the map costs no more rows than the map has.
  A reach;
};

template <typename A>
CUROI_DEVICE RoiAlignRotatedBox<A> roi_align_rotated_box(
    const A* box, const RoiAlignRotatedArgs<A>& a) {
  RoiAlignRotatedBox<A> g;
  g.batch_index = -1;
  g.center_h = g.center_w = g.roi_h = g.roi_w = g.reach = (A)0;
  g.cos_t = g.count = (A)1;
  g.sin_t = (A)0;
  const A b = box[0];
  if (!(b >= (A)0) || !(b < (A)a.batch)) return g;  // NaN fails both
  if (a.height <= 0 || a.width <= 0) return g;
  for (int j = 1; j < 6; ++j)
    if (!curoi_isfinite(box[j])) return g;
  const bool mmcv = a.convention == CUROI_ROTATED_MMCV;
  const bool aligned = !mmcv || a.aligned;
  const A offset = aligned ? (A)0.5 : (A)0;
  g.center_w = box[1] * a.spatial_scale - offset;
  g.center_h = box[2] * a.spatial_scale - offset;
  g.roi_w = box[3] * a.spatial_scale;
  g.roi_h = box[4] * a.spatial_scale;
  if (!aligned) {
    g.roi_w = curoi_max(g.roi_w, (A)1);
    g.roi_h = curoi_max(g.roi_h, (A)1);
  }
  const A extent = curoi_max(curoi_max(fabs(g.center_w), fabs(g.center_h)),
                             curoi_max(fabs(g.roi_w), fabs(g.roi_h)));
  if (!(extent <= (A)CUROI_ROTATED_MAX_EXTENT)) return g;  // also NaN, inf
  roi_align_rotated_sincos(mmcv && a.clockwise ? -box[5] : box[5], !mmcv,
                           &g.sin_t, &g.cos_t);
  // A negative grid (a box of negative size, adaptive) has no samples.
  const A gy = a.sampling_ratio > 0 ? (A)a.sampling_ratio
                                    : ceil(g.roi_h / (A)a.pooled_height);
  const A gx = a.sampling_ratio > 0 ? (A)a.sampling_ratio
                                    : ceil(g.roi_w / (A)a.pooled_width);
  g.count = curoi_max(curoi_max(gy, (A)0) * curoi_max(gx, (A)0), (A)1);
  const A around = curoi_max(fabs(g.center_w), fabs(g.center_h)) +
                   curoi_max((A)a.height, (A)a.width) + (A)1;
  g.reach = (A)128 * roi_align_rotated_epsilon((A)0) * around;
  g.batch_index = (int64_t)b;
  return g;
}

// Bin p's samples along one box axis of length `size`: they start at -size/2.
template <typename A>
CUROI_DEVICE RoiAlignAxis<A> roi_align_rotated_axis(A size, int64_t p,
                                                    int64_t pooled,
                                                    int sampling_ratio) {
  return roi_align_bin_axis(-size / (A)2, size, p, pooled, sampling_ratio);
}

// The map coordinates of sample xx on the row whose yy*cos and yy*sin are
// yc and ys, in the order of the formulas above (one definition, so that
// the searches and the sums round alike).
template <typename A>
CUROI_DEVICE A roi_align_rotated_y(const RoiAlignRotatedBox<A>& g, A yc, A xx) {
  return yc - xx * g.sin_t + g.center_h;
}
template <typename A>
CUROI_DEVICE A roi_align_rotated_x(const RoiAlignRotatedBox<A>& g, A ys, A xx) {
  return ys + xx * g.cos_t + g.center_w;
}

// The indices [*first, *last) in [0, n) at which lo <= v(i) <= hi, for v
// monotone in i (either way), by binary search.
template <typename A, typename V>
CUROI_DEVICE void roi_align_rotated_run(int64_t n, A lo, A hi, const V& v,
                                        int64_t* first, int64_t* last) {
  *first = *last = 0;
  if (n <= 0) return;
  const bool upward = v(0) <= v(n - 1);
  // The first index whose value lies beyond `edge` in the direction the
  // values move (strictly or not).
  auto beyond = [&](A edge, bool strict) {
    int64_t a = 0, b = n;
    while (a < b) {
      const int64_t mid = a + (b - a) / 2;
      const A p = v(mid);
      const bool past = upward ? (strict ? p > edge : p >= edge)
                               : (strict ? p < edge : p <= edge);
      if (past) {
        b = mid;
      } else {
        a = mid + 1;
      }
    }
    return a;
  };
  *first = beyond(upward ? lo : hi, false);
  *last = beyond(upward ? hi : lo, true);
}

// visit(ty, tx, n) for every sample of bin (ay, ax) of box g that lands on
// the map, with its taps; n > 1 stands for n samples with the same
// coordinates. Small grids (the usual case) visit every sample in order, as
// detectron2's loop does.
template <typename A, typename F>
CUROI_DEVICE void roi_align_rotated_samples(const RoiAlignRotatedBox<A>& g,
                                            const RoiAlignAxis<A>& ay,
                                            const RoiAlignAxis<A>& ax,
                                            int64_t height, int64_t width,
                                            const F& visit) {
  const A c = g.cos_t, s = g.sin_t;
  const bool search_rows = ay.count > CUROI_SCAN_SAMPLES;
  const bool search_columns = ax.count > CUROI_SCAN_SAMPLES;
  int64_t row = 0, rows_end = ay.count;
  if (search_rows) {
    // yy = (y - cy)*cos + (x - cx)*sin over the corners of the map.
    const A y0 = (A)-1 - g.center_h, y1 = (A)height - g.center_h;
    const A x0 = (A)-1 - g.center_w, x1 = (A)width - g.center_w;
    const A lo = curoi_min(y0 * c, y1 * c) + curoi_min(x0 * s, x1 * s);
    const A hi = curoi_max(y0 * c, y1 * c) + curoi_max(x0 * s, x1 * s);
    roi_align_samples_between(ay, lo - g.reach, hi + g.reach, &row, &rows_end);
  }
  while (row < rows_end) {
    const A yy = roi_align_position(ay, row);
    int64_t next = row + 1;
    if (search_rows && next < rows_end && roi_align_position(ay, next) == yy)
      next = curoi_min(roi_align_first_beyond(ay, yy, true), rows_end);
    const A rows = (A)(next - row);
    row = next;
    const A yc = yy * c, ys = yy * s;
    int64_t column = 0, columns_end = ax.count;
    if (search_columns) {
      int64_t y_first, y_last, x_first, x_last;
      roi_align_rotated_run(
          ax.count, (A)-1, (A)height,
          [&](int64_t i) {
            return roi_align_rotated_y(g, yc, roi_align_position(ax, i));
          },
          &y_first, &y_last);
      roi_align_rotated_run(
          ax.count, (A)-1, (A)width,
          [&](int64_t i) {
            return roi_align_rotated_x(g, ys, roi_align_position(ax, i));
          },
          &x_first, &x_last);
      column = curoi_max(y_first, x_first);
      columns_end = curoi_min(y_last, x_last);
    }
    while (column < columns_end) {
      const A xx = roi_align_position(ax, column);
      int64_t after = column + 1;
      if (search_columns && after < columns_end &&
          roi_align_position(ax, after) == xx)
        after = curoi_min(roi_align_first_beyond(ax, xx, true), columns_end);
      const A n = rows * (A)(after - column);
      column = after;
      RoiAlignTap<A> ty, tx;
      if (roi_align_bilinear_tap(roi_align_rotated_y(g, yc, xx), height, &ty) &&
          roi_align_bilinear_tap(roi_align_rotated_x(g, ys, xx), width, &tx))
        visit(ty, tx, n);
    }
  }
}

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// One thread per output element, each sample read through its four taps.
// The layout only moves the addresses (curoi_plane), so a channels-last
// element runs the very operations of its NCHW twin.

template <bool ChannelsLast, typename T>
CUROI_DEVICE void roi_align_rotated_forward_loop(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    const RoiAlignRotatedArgs<typename AccType<T>::type>& a, T* output) {
  typedef typename AccType<T>::type A;
  const int64_t total =
      num_rois * a.channels * a.pooled_height * a.pooled_width;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiOutputIndex at = curoi_output_at<ChannelsLast>(
        index, total, a.channels, a.pooled_height, a.pooled_width);
    const RoiAlignRotatedBox<A> g = roi_align_rotated_box(rois + at.k * 6, a);
    A sum = (A)0;
    if (g.batch_index >= 0) {
      const RoiAlignAxis<A> ay = roi_align_rotated_axis(
          g.roi_h, at.ph, a.pooled_height, a.sampling_ratio);
      const RoiAlignAxis<A> ax = roi_align_rotated_axis(
          g.roi_w, at.pw, a.pooled_width, a.sampling_ratio);
      const CuroiPlane p = curoi_plane<ChannelsLast>(
          g.batch_index, at.c, a.channels, a.height * a.width);
      const T* plane = input + p.at;
      const int64_t row_step = a.width * p.step;
      roi_align_rotated_samples(
          g, ay, ax, a.height, a.width,
          [&](const RoiAlignTap<A>& ty, const RoiAlignTap<A>& tx, A n) {
            const T* row_lo = plane + ty.lo * row_step;
            const T* row_hi = plane + ty.hi * row_step;
            const int64_t lo = tx.lo * p.step, hi = tx.hi * p.step;
            sum += n * (ty.w_lo * tx.w_lo * curoi_load<A>(row_lo[lo]) +
                        ty.w_lo * tx.w_hi * curoi_load<A>(row_lo[hi]) +
                        ty.w_hi * tx.w_lo * curoi_load<A>(row_hi[lo]) +
                        ty.w_hi * tx.w_hi * curoi_load<A>(row_hi[hi]));
          });
    }
    output[index] = curoi_store<T>(sum / g.count);
  }
}

template <typename T>
CUROI_DEVICE void roi_align_rotated_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    const RoiAlignRotatedArgs<typename AccType<T>::type>& a,
    int channels_last, T* output) {
  if (channels_last)
    roi_align_rotated_forward_loop<true>(input, rois, num_rois, a, output);
  else
    roi_align_rotated_forward_loop<false>(input, rois, num_rois, a, output);
}

// Each output gradient spreads over the taps of its bin's samples; bins and
// boxes overlap, so the adds go through Sum, atomically.
template <bool ChannelsLast, typename T, typename Sum>
CUROI_DEVICE void roi_align_rotated_backward_loop(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, const RoiAlignRotatedArgs<typename AccType<T>::type>& a,
    const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t total =
      num_rois * a.channels * a.pooled_height * a.pooled_width;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiOutputIndex at = curoi_output_at<ChannelsLast>(
        index, total, a.channels, a.pooled_height, a.pooled_width);
    const RoiAlignRotatedBox<A> g = roi_align_rotated_box(rois + at.k * 6, a);
    if (g.batch_index < 0) continue;
    const A grad = curoi_load<A>(grad_output[index]) / g.count;
    const RoiAlignAxis<A> ay = roi_align_rotated_axis(
        g.roi_h, at.ph, a.pooled_height, a.sampling_ratio);
    const RoiAlignAxis<A> ax = roi_align_rotated_axis(
        g.roi_w, at.pw, a.pooled_width, a.sampling_ratio);
    const CuroiPlane p = curoi_plane<ChannelsLast>(
        g.batch_index, at.c, a.channels, a.height * a.width);
    const int64_t row_step = a.width * p.step;
    roi_align_rotated_samples(
        g, ay, ax, a.height, a.width,
        [&](const RoiAlignTap<A>& ty, const RoiAlignTap<A>& tx, A n) {
          const A gn = grad * n;
          const int64_t row_lo = p.at + ty.lo * row_step;
          const int64_t row_hi = p.at + ty.hi * row_step;
          const int64_t lo = tx.lo * p.step, hi = tx.hi * p.step;
          curoi_sum_add(grad_input, row_lo + lo, gn * ty.w_lo * tx.w_lo);
          curoi_sum_add(grad_input, row_lo + hi, gn * ty.w_lo * tx.w_hi);
          curoi_sum_add(grad_input, row_hi + lo, gn * ty.w_hi * tx.w_lo);
          curoi_sum_add(grad_input, row_hi + hi, gn * ty.w_hi * tx.w_hi);
        });
  }
}

template <typename T, typename Sum>
CUROI_DEVICE void roi_align_rotated_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, const RoiAlignRotatedArgs<typename AccType<T>::type>& a,
    int channels_last, const Sum& grad_input) {
  if (channels_last)
    roi_align_rotated_backward_loop<true>(grad_output, rois, num_rois, a,
                                          grad_input);
  else
    roi_align_rotated_backward_loop<false>(grad_output, rois, num_rois, a,
                                           grad_input);
}

#else
// ------------------------------------------------------------- CPU loops
// detectron2's pre_calc, shared further: a box's taps (pixel and weight) are
// computed once per box group and bin, taps on the same pixel merged, and
// every channel then costs one multiply-add per merged tap. The merged sums
// equal the per-sample ones up to rounding order.
#include <algorithm>
#include <vector>

template <typename A>
struct RoiAlignRotatedTap {
  int64_t pixel;  // h * W + w in a plane
  A weight;
};

// One box's merged taps: bin b reads taps begin[b] .. begin[b+1]-1, in
// increasing pixel order.
template <typename A>
struct RoiAlignRotatedTaps {
  std::vector<int64_t> begin;
  std::vector<int64_t> pixel;
  std::vector<A> weight;
};

// Sorts one bin's taps by pixel, keeping the order of equal pixels (so that
// their weights are added in the order the samples come).
template <typename A>
static void roi_align_rotated_sort(std::vector<RoiAlignRotatedTap<A>>& taps) {
  const size_t n = taps.size();
  if (n > 64) {
    std::stable_sort(taps.begin(), taps.end(),
                     [](const RoiAlignRotatedTap<A>& l,
                        const RoiAlignRotatedTap<A>& r) {
                       return l.pixel < r.pixel;
                     });
    return;
  }
  for (size_t i = 1; i < n; ++i) {  // few taps: insertion sort
    const RoiAlignRotatedTap<A> t = taps[i];
    size_t j = i;
    for (; j > 0 && taps[j - 1].pixel > t.pixel; --j) taps[j] = taps[j - 1];
    taps[j] = t;
  }
}

template <typename A>
static void roi_align_rotated_build_taps(
    const RoiAlignRotatedBox<A>& g, const RoiAlignRotatedArgs<A>& a,
    RoiAlignRotatedTaps<A>& out, std::vector<RoiAlignRotatedTap<A>>& raw) {
  const int64_t bins = a.pooled_height * a.pooled_width;
  out.begin.assign((size_t)bins + 1, 0);
  out.pixel.clear();
  out.weight.clear();
  if (g.batch_index < 0) return;
  const int64_t width = a.width;
  for (int64_t ph = 0; ph < a.pooled_height; ++ph) {
    const RoiAlignAxis<A> ay = roi_align_rotated_axis(
        g.roi_h, ph, a.pooled_height, a.sampling_ratio);
    for (int64_t pw = 0; pw < a.pooled_width; ++pw) {
      const RoiAlignAxis<A> ax = roi_align_rotated_axis(
          g.roi_w, pw, a.pooled_width, a.sampling_ratio);
      raw.clear();
      roi_align_rotated_samples(
          g, ay, ax, a.height, a.width,
          [&](const RoiAlignTap<A>& ty, const RoiAlignTap<A>& tx, A n) {
            const A lo = n * ty.w_lo, hi = n * ty.w_hi;
            raw.push_back({ty.lo * width + tx.lo, lo * tx.w_lo});
            raw.push_back({ty.lo * width + tx.hi, lo * tx.w_hi});
            raw.push_back({ty.hi * width + tx.lo, hi * tx.w_lo});
            raw.push_back({ty.hi * width + tx.hi, hi * tx.w_hi});
          });
      roi_align_rotated_sort(raw);
      const size_t first = out.pixel.size();
      for (const RoiAlignRotatedTap<A>& t : raw) {
        if (out.pixel.size() > first && out.pixel.back() == t.pixel) {
          out.weight.back() += t.weight;
        } else {
          out.pixel.push_back(t.pixel);
          out.weight.push_back(t.weight);
        }
      }
      out.begin[(size_t)(ph * a.pooled_width + pw + 1)] =
          (int64_t)out.pixel.size();
    }
  }
}

// The tables of a group of boxes (see CuroiItems), built once per work item.
template <typename A>
struct RoiAlignRotatedGroup {
  RoiAlignRotatedBox<A> box[CUROI_BOX_GROUP];
  RoiAlignRotatedTaps<A> taps[CUROI_BOX_GROUP];
  std::vector<RoiAlignRotatedTap<A>> raw;  // one bin's taps before merging

  void build(const A* rois, int64_t first, int64_t end,
             const RoiAlignRotatedArgs<A>& a) {
    for (int64_t k = first; k < end; ++k) {
      const int64_t i = k - first;
      box[i] = roi_align_rotated_box(rois + k * 6, a);
      roi_align_rotated_build_taps(box[i], a, taps[i], raw);
    }
  }
};

// Channels computed together: U independent sums share each tap's load.
#define CUROI_ROTATED_LANES 4

// Every bin of boxes k0 .. k1-1 in channels c .. c+U-1.
template <int U, typename T, typename A>
static void roi_align_rotated_forward_channels(
    const T* input, const RoiAlignRotatedGroup<A>& group, int64_t k0,
    int64_t k1, int64_t c, const RoiAlignRotatedArgs<A>& a, T* output) {
  const int64_t bins = a.pooled_height * a.pooled_width;
  const int64_t plane_size = a.height * a.width;
  for (int64_t k = k0; k < k1; ++k) {
    const RoiAlignRotatedBox<A>& g = group.box[k - k0];
    const RoiAlignRotatedTaps<A>& t = group.taps[k - k0];
    T* out = output + (k * a.channels + c) * bins;
    if (g.batch_index < 0) {
      for (int64_t i = 0; i < U * bins; ++i) out[i] = curoi_store<T>((A)0);
      continue;
    }
    const T* plane = input + (g.batch_index * a.channels + c) * plane_size;
    for (int64_t bin = 0; bin < bins; ++bin) {
      A sum[U];
      for (int u = 0; u < U; ++u) sum[u] = (A)0;
      for (int64_t e = t.begin[bin]; e < t.begin[bin + 1]; ++e) {
        const A w = t.weight[e];
        const T* pixel = plane + t.pixel[e];
        for (int u = 0; u < U; ++u)
          sum[u] += w * curoi_load<A>(pixel[u * plane_size]);
      }
      for (int u = 0; u < U; ++u)
        out[u * bins + bin] = curoi_store<T>(sum[u] / g.count);
    }
  }
}

// Channels-last: every bin of boxes k0 .. k1-1 in channels c0 .. c1-1, the
// channel innermost and contiguous. Each channel's sum runs the operations
// of roi_align_rotated_forward_channels in the same order: the same bits.
template <typename T, typename A>
static void roi_align_rotated_forward_nhwc(
    const T* input, const RoiAlignRotatedGroup<A>& group, int64_t k0,
    int64_t k1, int64_t c0, int64_t c1, const RoiAlignRotatedArgs<A>& a,
    T* output, A* __restrict__ sum) {
  const int64_t bins = a.pooled_height * a.pooled_width;
  const int64_t channels = a.channels;
  const int64_t n = c1 - c0;
  for (int64_t k = k0; k < k1; ++k) {
    const RoiAlignRotatedBox<A>& g = group.box[k - k0];
    const RoiAlignRotatedTaps<A>& t = group.taps[k - k0];
    T* out_box = output + k * bins * channels + c0;
    if (g.batch_index < 0) {
      for (int64_t bin = 0; bin < bins; ++bin)
        for (int64_t c = 0; c < n; ++c)
          out_box[bin * channels + c] = curoi_store<T>((A)0);
      continue;
    }
    const T* image = input + g.batch_index * a.height * a.width * channels + c0;
    for (int64_t bin = 0; bin < bins; ++bin) {
      for (int64_t c = 0; c < n; ++c) sum[c] = (A)0;
      for (int64_t e = t.begin[bin]; e < t.begin[bin + 1]; ++e) {
        const A w = t.weight[e];
        const T* __restrict__ pixel = image + t.pixel[e] * channels;
        for (int64_t c = 0; c < n; ++c) sum[c] += w * curoi_load<A>(pixel[c]);
      }
      T* out = out_box + bin * channels;
      for (int64_t c = 0; c < n; ++c) out[c] = curoi_store<T>(sum[c] / g.count);
    }
  }
}

template <typename T>
static void roi_align_rotated_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    const RoiAlignRotatedArgs<typename AccType<T>::type>& a,
    int channels_last, T* output) {
  typedef typename AccType<T>::type A;
  const CuroiItems items = curoi_items(num_rois, a.channels);
  const int64_t bins = a.pooled_height * a.pooled_width;
  const int64_t cost = CUROI_BOX_GROUP * items.block * bins * 16;
  curoi_parallel_for(items.count(), 1, cost, [&](int64_t item) {
    static thread_local RoiAlignRotatedGroup<A> group;
    const int64_t k0 = items.first_box(item), k1 = items.end_box(item);
    group.build(rois, k0, k1, a);
    const int64_t c1 = items.end_channel(item);
    int64_t c = items.first_channel(item);
    if (channels_last) {
      static thread_local std::vector<A> sum;
      sum.resize((size_t)(c1 - c));
      roi_align_rotated_forward_nhwc<T, A>(input, group, k0, k1, c, c1, a,
                                           output, sum.data());
      return;
    }
    for (; c + CUROI_ROTATED_LANES <= c1; c += CUROI_ROTATED_LANES)
      roi_align_rotated_forward_channels<CUROI_ROTATED_LANES, T, A>(
          input, group, k0, k1, c, a, output);
    for (; c < c1; ++c)
      roi_align_rotated_forward_channels<1, T, A>(input, group, k0, k1, c, a,
                                                  output);
  });
}

// The gradient of every bin of boxes k0 .. k1-1 in channels c .. c+U-1:
// each channel's plane receives its terms box after box, bin after bin,
// tap after tap, whatever U.
template <int U, typename T, typename A, typename Sum>
static void roi_align_rotated_backward_channels(
    const T* grad_output, const RoiAlignRotatedGroup<A>& group, int64_t k0,
    int64_t k1, int64_t c, const RoiAlignRotatedArgs<A>& a,
    const Sum& grad_input) {
  const int64_t bins = a.pooled_height * a.pooled_width;
  const int64_t plane_size = a.height * a.width;
  for (int64_t k = k0; k < k1; ++k) {
    const RoiAlignRotatedBox<A>& g = group.box[k - k0];
    if (g.batch_index < 0) continue;
    const RoiAlignRotatedTaps<A>& t = group.taps[k - k0];
    const int64_t plane = (g.batch_index * a.channels + c) * plane_size;
    const T* grad_bins = grad_output + (k * a.channels + c) * bins;
    for (int64_t bin = 0; bin < bins; ++bin) {
      A grad[U];
      for (int u = 0; u < U; ++u)
        grad[u] = curoi_load<A>(grad_bins[u * bins + bin]) / g.count;
      for (int64_t e = t.begin[bin]; e < t.begin[bin + 1]; ++e) {
        const A w = t.weight[e];
        const int64_t pixel = plane + t.pixel[e];
        for (int u = 0; u < U; ++u)
          curoi_sum_add(grad_input, pixel + u * plane_size, grad[u] * w);
      }
    }
  }
}

// Channels-last: as roi_align_rotated_backward_channels for the channels
// c0 .. c1-1, the channel innermost; the same terms in the same order.
template <typename T, typename A, typename Sum>
static void roi_align_rotated_backward_nhwc(
    const T* grad_output, const RoiAlignRotatedGroup<A>& group, int64_t k0,
    int64_t k1, int64_t c0, int64_t c1, const RoiAlignRotatedArgs<A>& a,
    const Sum& grad_input, A* __restrict__ grad) {
  const int64_t bins = a.pooled_height * a.pooled_width;
  const int64_t channels = a.channels;
  const int64_t n = c1 - c0;
  for (int64_t k = k0; k < k1; ++k) {
    const RoiAlignRotatedBox<A>& g = group.box[k - k0];
    if (g.batch_index < 0) continue;
    const RoiAlignRotatedTaps<A>& t = group.taps[k - k0];
    const int64_t image = g.batch_index * a.height * a.width * channels + c0;
    const T* grad_box = grad_output + k * bins * channels + c0;
    for (int64_t bin = 0; bin < bins; ++bin) {
      const T* grad_bin = grad_box + bin * channels;
      for (int64_t c = 0; c < n; ++c)
        grad[c] = curoi_load<A>(grad_bin[c]) / g.count;
      for (int64_t e = t.begin[bin]; e < t.begin[bin + 1]; ++e) {
        const A w = t.weight[e];
        const int64_t pixel = image + t.pixel[e] * channels;
        for (int64_t c = 0; c < n; ++c)
          curoi_sum_add(grad_input, pixel + c, grad[c] * w);
      }
    }
  }
}

// Box group after box group (tables built by the calling thread), each block
// of channels summed by one thread: no atomics, and the same bits whatever
// the number of threads.
template <typename T, typename Sum>
static void roi_align_rotated_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, const RoiAlignRotatedArgs<typename AccType<T>::type>& a,
    int channels_last, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t channels = a.channels;
  const int64_t bins = a.pooled_height * a.pooled_width;
  int64_t block = (channels + 4 * curoi_threads() - 1) / (4 * curoi_threads());
  block = (block + CUROI_ROTATED_LANES - 1) / CUROI_ROTATED_LANES *
          CUROI_ROTATED_LANES;
  if (block < 1) block = 1;  // no channels: no blocks, and no division by 0
  const int64_t blocks = (channels + block - 1) / block;
  const int64_t cost = CUROI_BOX_GROUP * block * bins * 16;
  // Built by the calling thread, read by the workers: through a reference,
  // since in a worker the name of a thread_local means the worker's own.
  static thread_local RoiAlignRotatedGroup<A> callers_group;
  RoiAlignRotatedGroup<A>& group = callers_group;
  for (int64_t k0 = 0; k0 < num_rois; k0 += CUROI_BOX_GROUP) {
    const int64_t k1 = curoi_min(k0 + (int64_t)CUROI_BOX_GROUP, num_rois);
    group.build(rois, k0, k1, a);
    curoi_parallel_for(blocks, 1, cost, [&](int64_t i) {
      const int64_t c0 = i * block, c1 = curoi_min(c0 + block, channels);
      if (channels_last) {
        static thread_local std::vector<A> grad;
        grad.resize((size_t)(c1 - c0));
        roi_align_rotated_backward_nhwc<T, A>(grad_output, group, k0, k1, c0,
                                              c1, a, grad_input, grad.data());
        return;
      }
      int64_t c = c0;
      for (; c + CUROI_ROTATED_LANES <= c1; c += CUROI_ROTATED_LANES)
        roi_align_rotated_backward_channels<CUROI_ROTATED_LANES, T, A>(
            grad_output, group, k0, k1, c, a, grad_input);
      for (; c < c1; ++c)
        roi_align_rotated_backward_channels<1, T, A>(grad_output, group, k0,
                                                     k1, c, a, grad_input);
    });
  }
}
#endif

template <typename A>
CUROI_DEVICE RoiAlignRotatedArgs<A> roi_align_rotated_args(
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width, A spatial_scale,
    int sampling_ratio, int convention, int aligned, int clockwise) {
  RoiAlignRotatedArgs<A> a;
  a.batch = batch;
  a.channels = channels;
  a.height = height;
  a.width = width;
  a.pooled_height = pooled_height;
  a.pooled_width = pooled_width;
  a.spatial_scale = spatial_scale;
  a.sampling_ratio = sampling_ratio;
  a.convention = convention;
  a.aligned = aligned;
  a.clockwise = clockwise;
  return a;
}

#define CUROI_ROTATED_PARAMS(T)                                                \
  const AccType<T>::type *rois, int64_t num_rois, int64_t batch,               \
      int64_t channels, int64_t height, int64_t width, int64_t pooled_height,  \
      int64_t pooled_width, AccType<T>::type spatial_scale,                    \
      int sampling_ratio, int convention, int aligned, int clockwise,          \
      int channels_last

#define CUROI_ROTATED_ARGS                                                     \
  roi_align_rotated_args(batch, channels, height, width, pooled_height,        \
                         pooled_width, spatial_scale, sampling_ratio,          \
                         convention, aligned, clockwise)

#define CUROI_DEFINE_ROI_ALIGN_ROTATED(T, suffix)                              \
  CUROI_KERNEL void roi_align_rotated_forward_##suffix(                        \
      const T* input, CUROI_ROTATED_PARAMS(T), T* output) {                    \
    roi_align_rotated_forward<T>(input, rois, num_rois, CUROI_ROTATED_ARGS,    \
                                 channels_last, output);                       \
  }                                                                            \
  CUROI_KERNEL void roi_align_rotated_backward_##suffix(                       \
      const T* grad_output, CUROI_ROTATED_PARAMS(T),                           \
      AccType<T>::type* grad_input) {                                          \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_input;                                                     \
    roi_align_rotated_backward<T>(grad_output, rois, num_rois,                 \
                                  CUROI_ROTATED_ARGS, channels_last, sum);     \
  }                                                                            \
  CUROI_KERNEL void roi_align_rotated_backward_fixed_##suffix(                 \
      const T* grad_output, CUROI_ROTATED_PARAMS(T), const double* max_abs,    \
      int64_t* fixed, AccType<T>::type* grad_input) {                          \
    roi_align_rotated_backward<T>(                                             \
        grad_output, rois, num_rois, CUROI_ROTATED_ARGS, channels_last,        \
        curoi_fixed_sum(grad_input, fixed, max_abs,                            \
                        num_rois * pooled_height * pooled_width));             \
  }                                                                            \
  CUROI_KERNEL void roi_align_rotated_fixed_finish_##suffix(                   \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_input) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_input);              \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_ROI_ALIGN_ROTATED)
