// RoI Align on rotated boxes (average), forward and backward, with the
// numbers of detectron2's ROIAlignRotated and mmcv's RoIAlignRotated, and
// the gradient with respect to the boxes (below, "how a sample moves with
// its box").
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
// on the map plus a binary search per row that crosses it; the box gradient
// visits the same samples.
#include "roi_align_tiles.cuh"

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
  int64_t groups;  // the GPU loops' channel tiles (curoi_channel_tile)
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

// One sample of a bin that lands on the map: where it lies in the box
// (yy, xx) and on the map (y, x), and how many samples it stands for (n > 1
// where consecutive samples round to the same coordinates), with the mean of
// their indices in the bin's grid (iy, ix): the box gradient needs the sum
// of a term linear in the index over them, which is n times its value at
// the mean.
template <typename A>
struct RoiAlignRotatedPoint {
  A yy, xx, y, x;
  A iy, ix;
  A n;
};

// visit(point, ty, tx) for every sample of bin (ay, ax) of box g that lands
// on the map, with its taps. Small grids (the usual case) visit every sample
// in order, as detectron2's loop does.
template <typename A, typename F>
CUROI_DEVICE void roi_align_rotated_points(const RoiAlignRotatedBox<A>& g,
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
    const A iy = (A)0.5 * ((A)row + (A)(next - 1));
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
      RoiAlignRotatedPoint<A> p;
      p.yy = yy;
      p.xx = xx;
      p.y = roi_align_rotated_y(g, yc, xx);
      p.x = roi_align_rotated_x(g, ys, xx);
      p.iy = iy;
      p.ix = (A)0.5 * ((A)column + (A)(after - 1));
      p.n = rows * (A)(after - column);
      column = after;
      RoiAlignTap<A> ty, tx;
      if (roi_align_bilinear_tap(p.y, height, &ty) &&
          roi_align_bilinear_tap(p.x, width, &tx))
        visit(p, ty, tx);
    }
  }
}

// visit(ty, tx, n) for every sample of bin (ay, ax) of box g that lands on
// the map, with its taps; n > 1 stands for n samples with the same
// coordinates.
template <typename A, typename F>
CUROI_DEVICE void roi_align_rotated_samples(const RoiAlignRotatedBox<A>& g,
                                            const RoiAlignAxis<A>& ay,
                                            const RoiAlignAxis<A>& ax,
                                            int64_t height, int64_t width,
                                            const F& visit) {
  roi_align_rotated_points(
      g, ay, ax, height, width,
      [&](const RoiAlignRotatedPoint<A>& p, const RoiAlignTap<A>& ty,
          const RoiAlignTap<A>& tx) { visit(ty, tx, p.n); });
}

// ------------------------------------------- how a sample moves with its box
// The gradient with respect to the boxes (the boxes_backward kernels):
// d loss / d (cx, cy, w, h, angle) of each box row, for the gradient of its
// output. With the names above, sample (iy, ix) of bin (ph, pw) lies in the
// box at
//   yy = h * f_y,  f_y = (ph + (iy + 0.5) / grid_h) / PH - 1/2,
//   xx = w * f_x,  f_x likewise,
// and on the map at y = yy cos - xx sin + cy, x = yy sin + xx cos + cx, so
//   d(y, x)/d cx = (0, 1),          d(y, x)/d cy = (1, 0),
//   d(y, x)/d w = f_x (-sin, cos),  d(y, x)/d h = f_y (cos, sin),
//   d(y, x)/d theta = (-(yy sin + xx cos), yy cos - xx sin).
// Back to the numbers of the box row: d cx/d x = d cy/d y = s; d w/d width
// = d h/d height = s, but 0 where mmcv's max(size, 1) (aligned=False) picks
// 1; d theta/d angle = pi/180 (detectron2, degrees), 1 (mmcv), -1 (mmcv,
// clockwise). The grid (adaptive: ceil(size / pooled)) and the divisor are
// piecewise constant in the box: their derivative is 0 wherever it exists,
// and they are constants here, as in RoI Align's box gradient.
//
// The bilinear value moves with y only strictly inside the map's
// interpolation range, 0 < y < H - 1: there it is (1 - l) * row lo + l *
// row (lo + 1), lo = floor(y), l = y - lo (each row read at x as the value
// reads it), of slope row (lo + 1) - row lo. Off the map the sample adds
// nothing, and in the clamped bands (y <= 0 reads row 0, y >= H - 1 the
// last row) its value does not depend on y: slope 0. At an integer y inside
// the map the slope is that of the cell [y, y + 1], the one the forward's
// floor takes (the side RoI Align's box gradient takes too, see
// roi_align_geometry.cuh); at y = 0 and y = H - 1 the forward clamps: slope
// 0. x likewise. Where a slope exists the cell's rows are the taps' lo and
// hi, so both slopes read the four pixels that the value reads.

// Whether the value moves with coordinate v on an axis of `size` pixels.
template <typename A>
CUROI_DEVICE bool roi_align_rotated_moves(A v, int64_t size) {
  return v > (A)0 && v < (A)(size - 1);
}

// What one sample (its n samples) adds to d(cx, cy, w, h, theta), in map
// units, per unit of d value/d x (x[j]) and of d value/d y (y[j]).
template <typename A>
struct RoiAlignRotatedPull {
  A x[5], y[5];
};

template <typename A>
CUROI_DEVICE RoiAlignRotatedPull<A> roi_align_rotated_pull(
    const RoiAlignRotatedBox<A>& g, const RoiAlignRotatedPoint<A>& p,
    const RoiAlignAxis<A>& ay, const RoiAlignAxis<A>& ax, int64_t ph,
    int64_t pw, int64_t pooled_height, int64_t pooled_width) {
  const A c = g.cos_t, s = g.sin_t, n = p.n;
  const A fy =
      n * (((A)ph + (p.iy + (A)0.5) / ay.grid) / (A)pooled_height - (A)0.5);
  const A fx =
      n * (((A)pw + (p.ix + (A)0.5) / ax.grid) / (A)pooled_width - (A)0.5);
  RoiAlignRotatedPull<A> d;
  d.x[0] = n;
  d.y[0] = (A)0;
  d.x[1] = (A)0;
  d.y[1] = n;
  d.x[2] = fx * c;
  d.y[2] = -fx * s;
  d.x[3] = fy * s;
  d.y[3] = fy * c;
  d.x[4] = n * (p.yy * c - p.xx * s);
  d.y[4] = -n * (p.yy * s + p.xx * c);
  return d;
}

// The factors that take a bin's sums in map units to the numbers of the box
// row (cx, cy, w, h, angle), the divisor included.
template <typename A>
CUROI_DEVICE void roi_align_rotated_box_scales(
    const A* box, const RoiAlignRotatedArgs<A>& a,
    const RoiAlignRotatedBox<A>& g, A* scale) {
  const bool mmcv = a.convention == CUROI_ROTATED_MMCV;
  const bool at_least_one = mmcv && !a.aligned;
  const A s = a.spatial_scale / g.count;
  scale[0] = scale[1] = s;
  // As the forward's curoi_max(size, 1), which keeps the size itself when
  // it equals 1: there the size follows the box.
  scale[2] = at_least_one && box[3] * a.spatial_scale < (A)1 ? (A)0 : s;
  scale[3] = at_least_one && box[4] * a.spatial_scale < (A)1 ? (A)0 : s;
  const A turn = !mmcv ? (A)(CUROI_PI / 180) : a.clockwise ? (A)-1 : (A)1;
  scale[4] = turn / g.count;
}

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// A thread per (box, bin, tile of channels), as RoI Align's
// (roi_align_tiles.cuh): the box's rotation, the bin's grid and the
// samples' taps are found once per chunk of the tile's channels.

// A bin's samples, for the tiles' sums (roi_align_tile_means,
// roi_align_tile_scatter): roi_align_rotated_samples.
template <typename A>
struct RoiAlignRotatedBinSamples {
  const RoiAlignRotatedBox<A>* g;
  const RoiAlignAxis<A>* y;
  const RoiAlignAxis<A>* x;
  int64_t height, width;

  template <typename F>
  CUROI_MEMBER void operator()(const F& f) const {
    roi_align_rotated_samples(*g, *y, *x, height, width, f);
  }
};

template <typename A>
CUROI_DEVICE RoiAlignRotatedBinSamples<A> roi_align_rotated_bin_samples(
    const RoiAlignRotatedBox<A>& g, const RoiAlignAxis<A>& y,
    const RoiAlignAxis<A>& x, int64_t height, int64_t width) {
  RoiAlignRotatedBinSamples<A> samples;
  samples.g = &g;
  samples.y = &y;
  samples.x = &x;
  samples.height = height;
  samples.width = width;
  return samples;
}

template <bool ChannelsLast, typename T>
CUROI_DEVICE void roi_align_rotated_forward_loop(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    const RoiAlignRotatedArgs<typename AccType<T>::type>& a, T* output) {
  typedef typename AccType<T>::type A;
  const int64_t total =
      num_rois * a.pooled_height * a.pooled_width * a.groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, a.channels, a.groups, a.pooled_height, a.pooled_width);
    const RoiAlignRotatedBox<A> g = roi_align_rotated_box(rois + t.k * 6, a);
    const RoiAlignAxis<A> ay = roi_align_rotated_axis(
        g.roi_h, t.ph, a.pooled_height, a.sampling_ratio);
    const RoiAlignAxis<A> ax = roi_align_rotated_axis(
        g.roi_w, t.pw, a.pooled_width, a.sampling_ratio);
    roi_align_tile_means(
        input,
        curoi_tile_at<ChannelsLast>(CuroiSameChannel(), t,
                                    g.batch_index, a.channels,
                                    a.height * a.width, a.pooled_height,
                                    a.pooled_width),
        g.batch_index >= 0, g.count, a.width,
        roi_align_rotated_bin_samples(g, ay, ax, a.height, a.width), output);
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
      num_rois * a.pooled_height * a.pooled_width * a.groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, a.channels, a.groups, a.pooled_height, a.pooled_width);
    const RoiAlignRotatedBox<A> g = roi_align_rotated_box(rois + t.k * 6, a);
    const RoiAlignAxis<A> ay = roi_align_rotated_axis(
        g.roi_h, t.ph, a.pooled_height, a.sampling_ratio);
    const RoiAlignAxis<A> ax = roi_align_rotated_axis(
        g.roi_w, t.pw, a.pooled_width, a.sampling_ratio);
    roi_align_tile_scatter(
        grad_output, grad_input,
        curoi_tile_at<ChannelsLast>(CuroiSameChannel(), t,
                                    g.batch_index, a.channels,
                                    a.height * a.width, a.pooled_height,
                                    a.pooled_width),
        g.batch_index >= 0, g.count, a.width,
        roi_align_rotated_bin_samples(g, ay, ax, a.height, a.width));
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

// The box gradient, first pass: one thread per (box, bin) writes the bin's
// share of d/d(cx, cy, w, h, angle) into partial[K, PH*PW, 5]; sample after
// sample, the slopes of the bin's channels in channel order, each sample's
// four pixels read once for both. The layout only moves the addresses, so
// channels-last gives the same bits.
template <bool ChannelsLast, typename T>
CUROI_DEVICE void roi_align_rotated_boxes_backward_loop(
    const T* grad_output, const T* input,
    const typename AccType<T>::type* rois, int64_t num_rois,
    const RoiAlignRotatedArgs<typename AccType<T>::type>& a,
    typename AccType<T>::type* partial) {
  typedef typename AccType<T>::type A;
  const int64_t bins = a.pooled_height * a.pooled_width;
  const int64_t total = num_rois * bins;
  const int64_t channels = a.channels;
  const int64_t plane_size = a.height * a.width;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiOutputIndex at = curoi_output_index(
        index, total, 1, a.pooled_height, a.pooled_width);
    const int64_t bin = index - at.k * bins;
    const A* box = rois + at.k * 6;
    const RoiAlignRotatedBox<A> g = roi_align_rotated_box(box, a);
    A sum[5] = {(A)0, (A)0, (A)0, (A)0, (A)0};
    A scale[5] = {(A)0, (A)0, (A)0, (A)0, (A)0};
    if (g.batch_index >= 0) {
      const RoiAlignAxis<A> ay = roi_align_rotated_axis(
          g.roi_h, at.ph, a.pooled_height, a.sampling_ratio);
      const RoiAlignAxis<A> ax = roi_align_rotated_axis(
          g.roi_w, at.pw, a.pooled_width, a.sampling_ratio);
      const CuroiPlane p =
          curoi_plane<ChannelsLast>(g.batch_index, 0, channels, plane_size);
      const int64_t channel_step = ChannelsLast ? 1 : plane_size;
      const int64_t row_step = a.width * p.step;
      const T* image = input + p.at;
      const T* grad_bin =
          grad_output + (ChannelsLast ? index * channels
                                      : at.k * channels * bins + bin);
      const int64_t grad_step = ChannelsLast ? 1 : bins;
      roi_align_rotated_points(
          g, ay, ax, a.height, a.width,
          [&](const RoiAlignRotatedPoint<A>& pt, const RoiAlignTap<A>& ty,
              const RoiAlignTap<A>& tx) {
            const bool along_y = roi_align_rotated_moves(pt.y, a.height);
            const bool along_x = roi_align_rotated_moves(pt.x, a.width);
            if (!along_y && !along_x) return;
            const int64_t lo_lo = ty.lo * row_step + tx.lo * p.step;
            const int64_t lo_hi = ty.lo * row_step + tx.hi * p.step;
            const int64_t hi_lo = ty.hi * row_step + tx.lo * p.step;
            const int64_t hi_hi = ty.hi * row_step + tx.hi * p.step;
            A dy = (A)0, dx = (A)0;
            for (int64_t c = 0; c < channels; ++c) {
              const T* plane = image + c * channel_step;
              const A grad = curoi_load<A>(grad_bin[c * grad_step]);
              const A v00 = curoi_load<A>(plane[lo_lo]);
              const A v01 = curoi_load<A>(plane[lo_hi]);
              const A v10 = curoi_load<A>(plane[hi_lo]);
              const A v11 = curoi_load<A>(plane[hi_hi]);
              if (along_y)
                dy += grad * (tx.w_lo * (v10 - v00) + tx.w_hi * (v11 - v01));
              if (along_x)
                dx += grad * (ty.w_lo * (v01 - v00) + ty.w_hi * (v11 - v10));
            }
            const RoiAlignRotatedPull<A> d =
                roi_align_rotated_pull(g, pt, ay, ax, at.ph, at.pw,
                                       a.pooled_height, a.pooled_width);
            for (int j = 0; j < 5; ++j) {
              if (along_x) sum[j] += d.x[j] * dx;
              if (along_y) sum[j] += d.y[j] * dy;
            }
          });
      roi_align_rotated_box_scales(box, a, g, scale);
    }
    A* out = partial + index * 5;
    for (int j = 0; j < 5; ++j) out[j] = scale[j] * sum[j];
  }
}

template <typename T>
CUROI_DEVICE void roi_align_rotated_boxes_backward(
    const T* grad_output, const T* input,
    const typename AccType<T>::type* rois, int64_t num_rois,
    const RoiAlignRotatedArgs<typename AccType<T>::type>& a,
    int channels_last, typename AccType<T>::type* partial) {
  if (channels_last)
    roi_align_rotated_boxes_backward_loop<true>(grad_output, input, rois,
                                                num_rois, a, partial);
  else
    roi_align_rotated_boxes_backward_loop<false>(grad_output, input, rois,
                                                 num_rois, a, partial);
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

// Sorts one bin's taps (anything with a pixel) by pixel, keeping the order
// of equal pixels (so that their weights are added in the order the samples
// come).
template <typename Tap>
static void roi_align_rotated_sort(std::vector<Tap>& taps) {
  const size_t n = taps.size();
  if (n > 64) {
    std::stable_sort(taps.begin(), taps.end(),
                     [](const Tap& l, const Tap& r) {
                       return l.pixel < r.pixel;
                     });
    return;
  }
  for (size_t i = 1; i < n; ++i) {  // few taps: insertion sort
    const Tap t = taps[i];
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

// The box gradient, first pass. Per box, a table as the forward's: for each
// bin the pixels its samples' slopes read, merged and in pixel order, each
// with five weights, d(cx, cy, w, h, theta) per unit of the pixel's value
// (the pull of roi_align_rotated_pull times the pixel's share of d value/d x
// and d value/d y). A channel then costs five multiply-adds per pixel.
template <typename A>
struct RoiAlignRotatedSlopeTap {
  int64_t pixel;  // h * W + w in a plane
  A weight[5];
};

template <typename A>
struct RoiAlignRotatedSlopes {
  std::vector<int64_t> begin;  // bin b: taps begin[b] .. begin[b+1]-1
  std::vector<int64_t> pixel;
  std::vector<A> weight;  // five per tap
  std::vector<RoiAlignRotatedSlopeTap<A>> raw;  // one bin's, before merging

  void build(const RoiAlignRotatedBox<A>& g, const RoiAlignRotatedArgs<A>& a) {
    const int64_t bins = a.pooled_height * a.pooled_width;
    const int64_t width = a.width;
    begin.assign((size_t)bins + 1, 0);
    pixel.clear();
    weight.clear();
    for (int64_t ph = 0; ph < a.pooled_height; ++ph) {
      const RoiAlignAxis<A> ay = roi_align_rotated_axis(
          g.roi_h, ph, a.pooled_height, a.sampling_ratio);
      for (int64_t pw = 0; pw < a.pooled_width; ++pw) {
        const RoiAlignAxis<A> ax = roi_align_rotated_axis(
            g.roi_w, pw, a.pooled_width, a.sampling_ratio);
        raw.clear();
        roi_align_rotated_points(
            g, ay, ax, a.height, a.width,
            [&](const RoiAlignRotatedPoint<A>& pt, const RoiAlignTap<A>& ty,
                const RoiAlignTap<A>& tx) {
              const bool along_y = roi_align_rotated_moves(pt.y, a.height);
              const bool along_x = roi_align_rotated_moves(pt.x, a.width);
              if (!along_y && !along_x) return;
              const RoiAlignRotatedPull<A> d = roi_align_rotated_pull(
                  g, pt, ay, ax, ph, pw, a.pooled_height, a.pooled_width);
              // Each pixel's share of d value/d x and d value/d y.
              const A sx = along_x ? (A)1 : (A)0;
              const A sy = along_y ? (A)1 : (A)0;
              const int64_t pixels[4] = {
                  ty.lo * width + tx.lo, ty.lo * width + tx.hi,
                  ty.hi * width + tx.lo, ty.hi * width + tx.hi};
              const A by_x[4] = {-sx * ty.w_lo, sx * ty.w_lo, -sx * ty.w_hi,
                                 sx * ty.w_hi};
              const A by_y[4] = {-sy * tx.w_lo, -sy * tx.w_hi, sy * tx.w_lo,
                                 sy * tx.w_hi};
              for (int i = 0; i < 4; ++i) {
                RoiAlignRotatedSlopeTap<A> t;
                t.pixel = pixels[i];
                for (int j = 0; j < 5; ++j)
                  t.weight[j] = d.x[j] * by_x[i] + d.y[j] * by_y[i];
                raw.push_back(t);
              }
            });
        roi_align_rotated_sort(raw);
        const size_t first = pixel.size();
        for (const RoiAlignRotatedSlopeTap<A>& t : raw) {
          if (pixel.size() > first && pixel.back() == t.pixel) {
            A* w = weight.data() + weight.size() - 5;
            for (int j = 0; j < 5; ++j) w[j] += t.weight[j];
          } else {
            pixel.push_back(t.pixel);
            weight.insert(weight.end(), t.weight, t.weight + 5);
          }
        }
        begin[(size_t)(ph * a.pooled_width + pw + 1)] = (int64_t)pixel.size();
      }
    }
  }
};

// Boxes shared among the threads, each box's bins written by one thread:
// per bin, each channel's five sums over the table's pixels in pixel order,
// then the channels' products with their gradients in channel order. Both
// layouts run these operations in this order (channels-last keeps the sums
// of all channels while it walks the pixels once), so the bits depend
// neither on the layout nor on the number of threads.
template <typename T>
static void roi_align_rotated_boxes_backward(
    const T* grad_output, const T* input,
    const typename AccType<T>::type* rois, int64_t num_rois,
    const RoiAlignRotatedArgs<typename AccType<T>::type>& a,
    int channels_last, typename AccType<T>::type* partial) {
  typedef typename AccType<T>::type A;
  const int64_t bins = a.pooled_height * a.pooled_width;
  const int64_t channels = a.channels;
  const int64_t plane_size = a.height * a.width;
  const int64_t cost = channels * bins * 16;
  curoi_parallel_for(num_rois, 1, cost, [&](int64_t k) {
    static thread_local RoiAlignRotatedSlopes<A> table;
    static thread_local std::vector<A> sums;  // channels-last: five a channel
    A* out = partial + k * bins * 5;
    const A* box = rois + k * 6;
    const RoiAlignRotatedBox<A> g = roi_align_rotated_box(box, a);
    if (g.batch_index < 0) {
      for (int64_t i = 0; i < bins * 5; ++i) out[i] = (A)0;
      return;
    }
    table.build(g, a);
    A scale[5];
    roi_align_rotated_box_scales(box, a, g, scale);
    const T* image = input + g.batch_index * channels * plane_size;
    if (channels_last) sums.resize((size_t)(channels * 5));
    for (int64_t bin = 0; bin < bins; ++bin) {
      const int64_t e0 = table.begin[bin], e1 = table.begin[bin + 1];
      A acc[5] = {(A)0, (A)0, (A)0, (A)0, (A)0};
      if (channels_last) {
        A* __restrict__ s = sums.data();
        for (int64_t i = 0; i < channels * 5; ++i) s[i] = (A)0;
        for (int64_t e = e0; e < e1; ++e) {
          const A* w = table.weight.data() + e * 5;
          const T* __restrict__ pixel = image + table.pixel[e] * channels;
          for (int64_t c = 0; c < channels; ++c) {
            const A v = curoi_load<A>(pixel[c]);
            for (int j = 0; j < 5; ++j) s[c * 5 + j] += w[j] * v;
          }
        }
        const T* grad = grad_output + (k * bins + bin) * channels;
        for (int64_t c = 0; c < channels; ++c) {
          const A gc = curoi_load<A>(grad[c]);
          for (int j = 0; j < 5; ++j) acc[j] += gc * s[c * 5 + j];
        }
      } else {
        for (int64_t c = 0; c < channels; ++c) {
          const T* plane = image + c * plane_size;
          A s[5] = {(A)0, (A)0, (A)0, (A)0, (A)0};
          for (int64_t e = e0; e < e1; ++e) {
            const A* w = table.weight.data() + e * 5;
            const A v = curoi_load<A>(plane[table.pixel[e]]);
            for (int j = 0; j < 5; ++j) s[j] += w[j] * v;
          }
          const A gc =
              curoi_load<A>(grad_output[(k * channels + c) * bins + bin]);
          for (int j = 0; j < 5; ++j) acc[j] += gc * s[j];
        }
      }
      for (int j = 0; j < 5; ++j) out[bin * 5 + j] = scale[j] * acc[j];
    }
  });
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
  a.groups = 1;
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

// The forward and the backward take `groups` (the GPU loops' channel
// tiles) after the other scalars.
#define CUROI_DEFINE_ROI_ALIGN_ROTATED(T, suffix)                              \
  CUROI_KERNEL void roi_align_rotated_forward_##suffix(                        \
      const T* input, CUROI_ROTATED_PARAMS(T), int64_t groups, T* output) {    \
    RoiAlignRotatedArgs<AccType<T>::type> a = CUROI_ROTATED_ARGS;              \
    a.groups = groups;                                                         \
    roi_align_rotated_forward<T>(input, rois, num_rois, a, channels_last,      \
                                 output);                                      \
  }                                                                            \
  CUROI_KERNEL void roi_align_rotated_backward_##suffix(                       \
      const T* grad_output, CUROI_ROTATED_PARAMS(T), int64_t groups,           \
      AccType<T>::type* grad_input) {                                          \
    RoiAlignRotatedArgs<AccType<T>::type> a = CUROI_ROTATED_ARGS;              \
    a.groups = groups;                                                         \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_input;                                                     \
    roi_align_rotated_backward<T>(grad_output, rois, num_rois, a,              \
                                  channels_last, sum);                         \
  }                                                                            \
  CUROI_KERNEL void roi_align_rotated_backward_fixed_##suffix(                 \
      const T* grad_output, CUROI_ROTATED_PARAMS(T), int64_t groups,           \
      const double* max_abs, int64_t* fixed, AccType<T>::type* grad_input) {   \
    RoiAlignRotatedArgs<AccType<T>::type> a = CUROI_ROTATED_ARGS;              \
    a.groups = groups;                                                         \
    roi_align_rotated_backward<T>(                                             \
        grad_output, rois, num_rois, a, channels_last,                         \
        curoi_fixed_sum(grad_input, fixed, max_abs,                            \
                        num_rois * pooled_height * pooled_width));             \
  }                                                                            \
  CUROI_KERNEL void roi_align_rotated_fixed_finish_##suffix(                   \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_input) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_input);              \
  }                                                                            \
  CUROI_KERNEL void roi_align_rotated_boxes_backward_##suffix(                 \
      const T* grad_output, const T* input, CUROI_ROTATED_PARAMS(T),           \
      AccType<T>::type* partial) {                                             \
    roi_align_rotated_boxes_backward<T>(grad_output, input, rois, num_rois,    \
                                        CUROI_ROTATED_ARGS, channels_last,     \
                                        partial);                              \
  }                                                                            \
  CUROI_KERNEL void roi_align_rotated_boxes_backward_finish_##suffix(          \
      const AccType<T>::type* partial, int64_t num_rois, int64_t bins,         \
      AccType<T>::type* grad_rois) {                                           \
    curoi_boxes_finish_columns<5>(partial, num_rois, bins, 6, 1, grad_rois);   \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_ROI_ALIGN_ROTATED)
