// Precise RoI Pooling (Jiang et al., ECCV 2018; mmcv's PrRoIPool), forward,
// gradient with respect to the input, and gradient with respect to the
// boxes. A bin's value is the integral of the bilinearly interpolated
// feature map over the bin divided by the bin's area: no sampling grid, no
// rounding of the box.
//
// Conventions (mmcv's prroi_pool kernel):
//   X1 = x1 * s, Y1 = y1 * s, X2 = x2 * s, Y2 = y2 * s (no half-pixel shift);
//   bin_w = max(X2 - X1, 0) / PW, bin_h likewise;
//   bin (ph, pw) spans [X1 + bin_w * pw, that + bin_w] across and
//   [Y1 + bin_h * ph, that + bin_h] down;
//   the map is f(y, x) = sum_ij x[i][j] hat(y - i) hat(x - j), hat(t) =
//   max(1 - |t|, 0): bilinear between pixel centres, and over the unit cells
//   around the map it falls linearly to 0 at y = -1, y = H, x = -1, x = W
//   (mmcv reads 0 for every pixel outside the map); beyond those, 0.
// A bin of zero width or height gives 0 (as mmcv's zero area), and so does
// one whose edges, size or 1/size are not finite in the accumulation type
// (a box whose scaled corners overflow).
//
// The integral is separable: over a bin [y0, y1] x [x0, x1] it is
// sum_ij x[i][j] Y_i X_j with Y_i = integral of hat(y - i) over [y0, y1]
// (the bilinear surface integrated cell by cell, each cell's four corner
// coefficients being products of one such integral per axis), so the bin's
// value is sum_i wy_i sum_j wx_j x[i][j] with per-axis weights w = Y / (y1 -
// y0). Only the pixels of the map with a non-zero weight are visited: a bin
// costs at most H x W per channel, however large the box.
//
// Box gradient (mmcv's coor backward): moving a bin's left edge `left` to
// the right takes the line integral of f along that edge off the integral
// and shrinks the area, so d value / d left = (value - L_left) / (right -
// left), L_left being the mean of f along the left edge; likewise
// d value / d right = (L_right - value) / (right - left), and the same down.
// The edges move with the box's corners as left = X1 (1 - pw / PW) +
// X2 pw / PW and right = X1 (1 - (pw + 1) / PW) + X2 (pw + 1) / PW, and
// X1 = x1 * s: the chain rule gives d/dx1 and d/dx2 (rows: d/dy1, d/dy2).
#include "curoi_common.cuh"

// One box: its image and where its bins start. batch_index -1: unusable.
template <typename A>
struct PrRoiBox {
  int64_t batch_index;
  A x1, y1, bin_w, bin_h;
};

template <typename A>
CUROI_DEVICE PrRoiBox<A> prroi_box(const A* box, int64_t batch,
                                   int64_t pooled_height, int64_t pooled_width,
                                   A spatial_scale) {
  PrRoiBox<A> g;
  g.batch_index = curoi_box_batch(box, batch);
  g.x1 = g.y1 = g.bin_w = g.bin_h = (A)0;
  if (g.batch_index < 0) return g;
  g.x1 = box[1] * spatial_scale;
  g.y1 = box[2] * spatial_scale;
  // A NaN size (inf - inf after an overflow) stays NaN and empties the bins.
  g.bin_w = curoi_max(box[3] * spatial_scale - g.x1, (A)0) / (A)pooled_width;
  g.bin_h = curoi_max(box[4] * spatial_scale - g.y1, (A)0) / (A)pooled_height;
  return g;
}

// One bin along one axis: its edges lo, hi, 1 / (hi - lo), and the pixels
// first .. last-1 of the map that it weighs (none: first == last). An empty
// bin has inv 0 and no pixels.
template <typename A>
struct PrRoiAxis {
  A lo, hi, inv;
  int64_t first, last;
};

template <typename A>
CUROI_DEVICE PrRoiAxis<A> prroi_axis(A start, A bin, int64_t p, int64_t size) {
  PrRoiAxis<A> axis;
  axis.lo = start + bin * (A)p;
  axis.hi = axis.lo + bin;
  // The size as the edges give it: the weights below integrate over
  // [lo, hi], and dividing by exactly that length keeps the mean of a
  // constant the constant even where rounding made hi - lo differ from bin.
  const A size_of_bin = axis.hi - axis.lo;
  axis.inv = (A)1 / size_of_bin;
  axis.first = axis.last = 0;
  if (!(size_of_bin > (A)0 && curoi_isfinite(axis.lo) &&
        curoi_isfinite(axis.hi) && curoi_isfinite(axis.inv))) {
    axis.lo = axis.hi = axis.inv = (A)0;
    return axis;
  }
  // Pixel i has weight where (i - 1, i + 1) meets [lo, hi]: floor(lo) ..
  // ceil(hi), clipped to the map.
  axis.first = curoi_clamp_to_int(floor(axis.lo), (A)0, (A)size);
  axis.last = curoi_clamp_to_int(ceil(axis.hi) + (A)1, (A)0, (A)size);
  if (axis.last < axis.first) axis.last = axis.first;
  return axis;
}

// Pixel i's weight in a bin: the mean of hat(y - i) over [lo, hi], as the
// integrals over the two unit cells that meet at i. In a cell [c, c + 1]
// the coordinate u = y - c is exact for c >= 0 (a difference of numbers
// within a factor 2 of each other), and each integral is written as the
// overlap's length times the mean weight over it: a narrow bin keeps its
// relative precision, where the difference of antiderivatives would cancel.
// In the cell [-1, 0], left of pixel 0, y itself is the coordinate
// (u = y + 1 would round).
template <typename A>
CUROI_DEVICE A prroi_weight(const PrRoiAxis<A>& axis, int64_t i) {
  const A at = (A)i;
  A w = (A)0;
  if (i == 0) {
    // hat(y) = 1 + y on [-1, 0].
    const A a = curoi_max(axis.lo, (A)-1), b = curoi_min(axis.hi, (A)0);
    if (b > a) w += (b - a) * ((A)1 + (A)0.5 * (a + b));
  } else {
    // The cell [i - 1, i], whose upper corner i weighs u.
    const A c = (A)(i - 1);
    const A s = curoi_max(axis.lo, c) - c, t = curoi_min(axis.hi, at) - c;
    if (t > s) w += (t - s) * ((A)0.5 * (s + t));
  }
  // The cell [i, i + 1], whose lower corner i weighs 1 - u.
  const A s = curoi_max(axis.lo, at) - at;
  const A t = curoi_min(axis.hi, at + (A)1) - at;
  if (t > s) w += (t - s) * ((A)1 - (A)0.5 * (s + t));
  return w * axis.inv;
}

// The linear interpolation at v along one axis, with 0 outside the map:
// pixels first .. last-1 (at most two: floor(v) with weight 1 - t, the next
// with t, t = v - floor(v)), those of the map only. For the box gradient,
// where f is read along a bin's edges.
template <typename A>
struct PrRoiEdge {
  int64_t first, last;
  A w0, w1;  // the weights of pixels first and first + 1
};

template <typename A>
CUROI_DEVICE PrRoiEdge<A> prroi_edge(A v, int64_t size) {
  PrRoiEdge<A> e;
  e.first = e.last = 0;
  e.w0 = e.w1 = (A)0;
  if (size < 1 || !(v > (A)-1 && v < (A)size)) return e;  // f is 0 there
  const A f = floor(v);
  const int64_t i = (int64_t)f;  // in [-1, size - 1]
  const A t = v - f;
  if (i < 0) {
    e.first = 0;  // only pixel 0, the upper neighbour
    e.last = 1;
    e.w0 = t;
    return e;
  }
  e.first = i;
  e.last = i + 2 < size ? i + 2 : size;
  e.w0 = (A)1 - t;
  e.w1 = t;
  return e;
}

template <typename A>
CUROI_DEVICE A prroi_weight(const PrRoiEdge<A>& e, int64_t i) {
  return i == e.first ? e.w0 : e.w1;
}

// sum_i wy(i) sum_j wx(j) x[i][j] over one plane, pixel (h, w) at
// plane[(h * width + w) * step]: a bin's value (both weights a PrRoiAxis)
// or the mean of f along one of its edges (one a PrRoiEdge).
template <typename T, typename A, typename Rows, typename Cols>
CUROI_DEVICE A prroi_separable_sum(const T* plane, int64_t step, int64_t width,
                                   const Rows& rows, const Cols& cols) {
  A sum = (A)0;
  for (int64_t i = rows.first; i < rows.last; ++i) {
    const T* row = plane + i * width * step;
    A part = (A)0;
    for (int64_t j = cols.first; j < cols.last; ++j)
      part += prroi_weight(cols, j) * curoi_load<A>(row[j * step]);
    sum += prroi_weight(rows, i) * part;
  }
  return sum;
}

// A bin's gradient with respect to its four edges, summed over channels:
// sum_c g_c (value_c - L_c) for the left and top edges and
// sum_c g_c (L_c - value_c) for the right and bottom ones (see the top),
// before the division by the bin's size.
template <typename A>
struct PrRoiEdgeGrad {
  A left, right, top, bottom;
};

template <typename A>
CUROI_DEVICE void prroi_edge_grad_add(PrRoiEdgeGrad<A>* e, A g, A value,
                                      A left, A right, A top, A bottom) {
  e->left += g * (value - left);
  e->right += g * (right - value);
  e->top += g * (value - top);
  e->bottom += g * (bottom - value);
}

// The box's gradient (before the factor s), in the order x1, y1, x2, y2.
template <typename A>
struct PrRoiBoxGrad {
  A x1, y1, x2, y2;
};

// Add bin (ph, pw)'s edge gradient to the box's through the chain rule for
// its edges (see the top).
template <typename A>
CUROI_DEVICE void prroi_box_grad_add(PrRoiBoxGrad<A>* box,
                                     const PrRoiEdgeGrad<A>& e,
                                     const PrRoiAxis<A>& ay,
                                     const PrRoiAxis<A>& ax, int64_t ph,
                                     int64_t pw, int64_t pooled_height,
                                     int64_t pooled_width) {
  const A gx0 = e.left * ax.inv, gx1 = e.right * ax.inv;
  const A gy0 = e.top * ay.inv, gy1 = e.bottom * ay.inv;
  const A PW = (A)pooled_width, PH = (A)pooled_height;
  const A pw0 = (A)pw, pw1 = (A)(pw + 1), ph0 = (A)ph, ph1 = (A)(ph + 1);
  box->x1 += (gx0 * (PW - pw0) + gx1 * (PW - pw1)) / PW;
  box->x2 += (gx0 * pw0 + gx1 * pw1) / PW;
  box->y1 += (gy0 * (PH - ph0) + gy1 * (PH - ph1)) / PH;
  box->y2 += (gy0 * ph0 + gy1 * ph1) / PH;
}

template <typename A>
CUROI_DEVICE void prroi_store_box_grad(A* grad_rois, const PrRoiBoxGrad<A>& d,
                                       A spatial_scale) {
  grad_rois[0] = (A)0;
  grad_rois[1] = d.x1 * spatial_scale;
  grad_rois[2] = d.y1 * spatial_scale;
  grad_rois[3] = d.x2 * spatial_scale;
  grad_rois[4] = d.y2 * spatial_scale;
}

// Where output element (k, c, ph, pw) lies in [K, C, PH, PW] (channels-last:
// [K, PH, PW, C]).
CUROI_DEVICE int64_t prroi_output_at(int channels_last, int64_t k, int64_t c,
                                     int64_t bin, int64_t channels,
                                     int64_t bins) {
  return channels_last ? (k * bins + bin) * channels + c
                       : (k * channels + c) * bins + bin;
}

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// Forward and input gradient: a thread per (box, bin, tile of channels)
// (curoi_channel_tile): the box and the bin's pixel ranges are found once
// per tile, then each channel of the tile is one bin integral (the weights
// computed as the loops visit the pixels). The layout only moves the
// addresses: a channels-last element runs the very operations of its NCHW
// twin, so the results are the same bits, transposed.

template <bool ChannelsLast, typename T>
CUROI_DEVICE void prroi_pool_forward_loop(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int64_t groups, T* output) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_rois * pooled_height * pooled_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, channels, groups, pooled_height, pooled_width);
    const PrRoiBox<A> g = prroi_box(rois + t.k * 5, batch, pooled_height,
                                    pooled_width, spatial_scale);
    const bool reads = g.batch_index >= 0;
    const PrRoiAxis<A> ay = prroi_axis(g.y1, g.bin_h, t.ph, height);
    const PrRoiAxis<A> ax = prroi_axis(g.x1, g.bin_w, t.pw, width);
    const CuroiTileAt at =
        curoi_tile_at<ChannelsLast>(CuroiSameChannel(), t, g.batch_index,
                                    channels, height * width, pooled_height,
                                    pooled_width);
#pragma unroll 1
    for (int64_t i = 0; i < at.count; ++i) {
      const A value =
          reads ? prroi_separable_sum<T, A>(input + at.in + i * at.in_step,
                                            at.pixel_step, width, ay, ax)
                : (A)0;
      output[at.out + i * at.out_step] = curoi_store<T>(value);
    }
  }
}

// Each output gradient spreads over its bin's pixels; bins of one box and of
// different boxes overlap, so the adds go through Sum (CuroiFloatSum or the
// deterministic CuroiFixedSum), atomically: one term per (bin, pixel). A
// thread per (box, bin, tile of channels), as the forward's.
template <bool ChannelsLast, typename T, typename Sum>
CUROI_DEVICE void prroi_pool_backward_loop(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int64_t groups,
    const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_rois * pooled_height * pooled_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, channels, groups, pooled_height, pooled_width);
    const PrRoiBox<A> g = prroi_box(rois + t.k * 5, batch, pooled_height,
                                    pooled_width, spatial_scale);
    if (g.batch_index < 0) continue;
    const PrRoiAxis<A> ay = prroi_axis(g.y1, g.bin_h, t.ph, height);
    const PrRoiAxis<A> ax = prroi_axis(g.x1, g.bin_w, t.pw, width);
    const CuroiTileAt at =
        curoi_tile_at<ChannelsLast>(CuroiSameChannel(), t, g.batch_index,
                                    channels, height * width, pooled_height,
                                    pooled_width);
#pragma unroll 1
    for (int64_t c = 0; c < at.count; ++c) {
      const A grad = curoi_load<A>(grad_output[at.out + c * at.out_step]);
      const int64_t plane = at.in + c * at.in_step;
      for (int64_t i = ay.first; i < ay.last; ++i) {
        const A grad_row = grad * prroi_weight(ay, i);
        const int64_t row = plane + i * width * at.pixel_step;
        for (int64_t j = ax.first; j < ax.last; ++j)
          curoi_sum_add(grad_input, row + j * at.pixel_step,
                        grad_row * prroi_weight(ax, j));
      }
    }
  }
}

// The box gradient: one thread per box sums its bins, bin after bin and
// channel after channel within a bin, and writes the box's row: no atomics,
// the same bits on every run.
template <typename T>
CUROI_DEVICE void prroi_pool_boxes_backward_loop(
    const T* grad_output, const T* input,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int channels_last, typename AccType<T>::type* grad_rois) {
  typedef typename AccType<T>::type A;
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  CUDA_1D_KERNEL_LOOP(k, num_rois) {
    PrRoiBoxGrad<A> d;
    d.x1 = d.y1 = d.x2 = d.y2 = (A)0;
    const PrRoiBox<A> g = prroi_box(rois + k * 5, batch, pooled_height,
                                    pooled_width, spatial_scale);
    for (int64_t bin = 0; g.batch_index >= 0 && bin < bins; ++bin) {
      const int64_t ph = bin / pooled_width, pw = bin % pooled_width;
      const PrRoiAxis<A> ay = prroi_axis(g.y1, g.bin_h, ph, height);
      const PrRoiAxis<A> ax = prroi_axis(g.x1, g.bin_w, pw, width);
      if (ay.inv == (A)0 || ax.inv == (A)0) continue;  // an empty bin
      const PrRoiEdge<A> left = prroi_edge(ax.lo, width);
      const PrRoiEdge<A> right = prroi_edge(ax.hi, width);
      const PrRoiEdge<A> top = prroi_edge(ay.lo, height);
      const PrRoiEdge<A> bottom = prroi_edge(ay.hi, height);
      PrRoiEdgeGrad<A> e;
      e.left = e.right = e.top = e.bottom = (A)0;
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t image = g.batch_index * channels * plane_size;
        const T* plane = input + image + (channels_last ? c : c * plane_size);
        const int64_t step = channels_last ? channels : 1;
        const A grad = curoi_load<A>(grad_output[prroi_output_at(
            channels_last, k, c, bin, channels, bins)]);
        prroi_edge_grad_add(
            &e, grad,
            prroi_separable_sum<T, A>(plane, step, width, ay, ax),
            prroi_separable_sum<T, A>(plane, step, width, ay, left),
            prroi_separable_sum<T, A>(plane, step, width, ay, right),
            prroi_separable_sum<T, A>(plane, step, width, top, ax),
            prroi_separable_sum<T, A>(plane, step, width, bottom, ax));
      }
      prroi_box_grad_add(&d, e, ay, ax, ph, pw, pooled_height, pooled_width);
    }
    prroi_store_box_grad(grad_rois + k * 5, d, spatial_scale);
  }
}

template <typename T>
CUROI_DEVICE void prroi_pool_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int channels_last,
    int64_t groups, T* output) {
  if (channels_last)
    prroi_pool_forward_loop<true>(input, rois, num_rois, batch, channels,
                                  height, width, pooled_height, pooled_width,
                                  spatial_scale, groups, output);
  else
    prroi_pool_forward_loop<false>(input, rois, num_rois, batch, channels,
                                   height, width, pooled_height, pooled_width,
                                   spatial_scale, groups, output);
}

template <typename T, typename Sum>
CUROI_DEVICE void prroi_pool_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int channels_last,
    int64_t groups, const Sum& grad_input) {
  if (channels_last)
    prroi_pool_backward_loop<true>(grad_output, rois, num_rois, batch,
                                   channels, height, width, pooled_height,
                                   pooled_width, spatial_scale, groups,
                                   grad_input);
  else
    prroi_pool_backward_loop<false>(grad_output, rois, num_rois, batch,
                                    channels, height, width, pooled_height,
                                    pooled_width, spatial_scale, groups,
                                    grad_input);
}

template <typename T>
CUROI_DEVICE void prroi_pool_boxes_backward(
    const T* grad_output, const T* input,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int channels_last, typename AccType<T>::type* grad_rois) {
  prroi_pool_boxes_backward_loop<T>(grad_output, input, rois, num_rois, batch,
                                    channels, height, width, pooled_height,
                                    pooled_width, spatial_scale, channels_last,
                                    grad_rois);
}

#else
// ------------------------------------------------------------- CPU loops
// The weights depend on the box and the bin, not the channel: they are
// computed once per box into tables that all its channels share (the same
// prroi_weight values the GPU computes on the fly), and a channel then costs
// one multiply-add per pixel of the bin.
#include <type_traits>
#include <vector>

// One box's bins along one axis: bin p's axis, its weights
// weight[offset[p] + i - axis[p].first] for pixels axis[p].first ..
// axis[p].last-1, and (for the box gradient) the interpolation along its
// lower and upper edges.
template <typename A>
struct PrRoiWeights {
  std::vector<PrRoiAxis<A> > axis;
  std::vector<PrRoiEdge<A> > lower, upper;
  std::vector<int64_t> offset;
  std::vector<A> weight;

  void build(A start, A bin, int64_t pooled, int64_t size, bool edges) {
    axis.resize((size_t)pooled);
    offset.resize((size_t)pooled);
    lower.resize(edges ? (size_t)pooled : 0);
    upper.resize(edges ? (size_t)pooled : 0);
    weight.clear();
    for (int64_t p = 0; p < pooled; ++p) {
      const PrRoiAxis<A> a = prroi_axis(start, bin, p, size);
      axis[p] = a;
      offset[p] = (int64_t)weight.size();
      for (int64_t i = a.first; i < a.last; ++i)
        weight.push_back(prroi_weight(a, i));
      if (edges) {
        lower[p] = prroi_edge(a.lo, size);
        upper[p] = prroi_edge(a.hi, size);
      }
    }
  }

  const A* weights(int64_t p) const { return weight.data() + offset[p]; }
};

// The tables of a group of boxes (see CuroiItems).
template <typename A>
struct PrRoiGroup {
  PrRoiBox<A> box[CUROI_BOX_GROUP];
  PrRoiWeights<A> y[CUROI_BOX_GROUP], x[CUROI_BOX_GROUP];

  void build(const A* rois, int64_t first, int64_t end, int64_t batch,
             int64_t height, int64_t width, int64_t pooled_height,
             int64_t pooled_width, A spatial_scale, bool edges) {
    for (int64_t k = first; k < end; ++k) {
      const int64_t i = k - first;
      box[i] = prroi_box(rois + k * 5, batch, pooled_height, pooled_width,
                         spatial_scale);
      if (box[i].batch_index < 0) continue;
      y[i].build(box[i].y1, box[i].bin_h, pooled_height, height, edges);
      x[i].build(box[i].x1, box[i].bin_w, pooled_width, width, edges);
    }
  }
};

// Weights along one axis as the CPU loops read them: pixels first ..
// first + count - 1 with weights w[0 ..].
template <typename A>
struct PrRoiSpan {
  int64_t first, count;
  const A* w;
};

template <typename A>
static PrRoiSpan<A> prroi_bin_span(const PrRoiWeights<A>& t, int64_t p) {
  PrRoiSpan<A> s = {t.axis[p].first, t.axis[p].last - t.axis[p].first,
                    t.weights(p)};
  return s;
}

// An edge's pixels; `w` holds its two weights.
template <typename A>
static PrRoiSpan<A> prroi_edge_span(const PrRoiEdge<A>& e, A* w) {
  w[0] = e.w0;
  w[1] = e.w1;
  PrRoiSpan<A> s = {e.first, e.last - e.first, w};
  return s;
}

// Channels computed together in NCHW: U independent sums per bin share each
// weight load.
#define CUROI_PRROI_LANES 4

// sum[u] = sum_i wy_i sum_j wx_j x_u[i][j] for `lanes` channels (U of them
// when U > 0), lane u's pixel (h, w) at pixels[u * lane_stride + (h * width
// + w) * step]. Each lane runs the operations of prroi_separable_sum in its
// order, so the results depend neither on the lanes nor on the layout.
template <int U, typename T, typename A>
static void prroi_sum_lanes(const T* pixels, int64_t lanes,
                            int64_t lane_stride, int64_t width, int64_t step,
                            const PrRoiSpan<A>& rows, const PrRoiSpan<A>& cols,
                            A* __restrict__ sum, A* __restrict__ part) {
  const int64_t n = U > 0 ? U : lanes;
  for (int64_t u = 0; u < n; ++u) sum[u] = (A)0;
  for (int64_t r = 0; r < rows.count; ++r) {
    const T* row = pixels + ((rows.first + r) * width + cols.first) * step;
    for (int64_t u = 0; u < n; ++u) part[u] = (A)0;
    for (int64_t j = 0; j < cols.count; ++j) {
      const A w = cols.w[j];
      const T* __restrict__ pixel = row + j * step;
      for (int64_t u = 0; u < n; ++u)
        part[u] += w * curoi_load<A>(pixel[u * lane_stride]);
    }
    const A wr = rows.w[r];
    for (int64_t u = 0; u < n; ++u) sum[u] += wr * part[u];
  }
}

// The gradient of one bin in `lanes` channels: lane u's grad[u] to its
// pixels (as in prroi_sum_lanes, `at` the first lane's pixel (0, 0) in the
// gradient), term grad_u * wy_i * wx_j per pixel, rows then columns.
template <int U, typename A, typename Sum>
static void prroi_scatter_lanes(const Sum& grad_input, int64_t at,
                                int64_t lanes, int64_t lane_stride,
                                int64_t width, int64_t step,
                                const PrRoiSpan<A>& rows,
                                const PrRoiSpan<A>& cols,
                                const A* __restrict__ grad,
                                A* __restrict__ grad_row) {
  const int64_t n = U > 0 ? U : lanes;
  for (int64_t r = 0; r < rows.count; ++r) {
    const A wr = rows.w[r];
    for (int64_t u = 0; u < n; ++u) grad_row[u] = grad[u] * wr;
    const int64_t row = at + ((rows.first + r) * width + cols.first) * step;
    for (int64_t j = 0; j < cols.count; ++j) {
      const A w = cols.w[j];
      const int64_t pixel = row + j * step;
      for (int64_t u = 0; u < n; ++u)
        curoi_sum_add(grad_input, pixel + u * lane_stride, grad_row[u] * w);
    }
  }
}

// Lanes of channels through every bin of boxes k0 .. k1-1: channels c0 ..
// c1-1 of the item, CUROI_PRROI_LANES at a time in NCHW (planes apart),
// all at once channels-last (the channel innermost, contiguous).
template <typename F>
static void prroi_lanes(int channels_last, int64_t c0, int64_t c1,
                        const F& f) {
  if (channels_last) {
    f(c0, c1 - c0, std::integral_constant<int, 0>());
    return;
  }
  int64_t c = c0;
  for (; c + CUROI_PRROI_LANES <= c1; c += CUROI_PRROI_LANES)
    f(c, (int64_t)CUROI_PRROI_LANES,
      std::integral_constant<int, CUROI_PRROI_LANES>());
  for (; c < c1; ++c) f(c, (int64_t)1, std::integral_constant<int, 1>());
}

template <typename T>
static void prroi_pool_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int channels_last,
    int64_t /* groups */, T* output) {
  typedef typename AccType<T>::type A;
  const CuroiItems items = curoi_items(num_rois, channels);
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  const int64_t cost = CUROI_BOX_GROUP * items.block * bins * 4;
  // Pixel (h, w) of channel c is (h * W + w) * step + c * lane_stride from
  // its image.
  const int64_t step = channels_last ? channels : 1;
  const int64_t lane_stride = channels_last ? 1 : plane_size;
  curoi_parallel_for(items.count(), 1, cost, [&](int64_t item) {
    static thread_local PrRoiGroup<A> group;
    static thread_local std::vector<A> sum, part;
    const int64_t k0 = items.first_box(item), k1 = items.end_box(item);
    const int64_t c0 = items.first_channel(item), c1 = items.end_channel(item);
    group.build(rois, k0, k1, batch, height, width, pooled_height,
                pooled_width, spatial_scale, false);
    sum.resize((size_t)curoi_max(c1 - c0, (int64_t)CUROI_PRROI_LANES));
    part.resize(sum.size());
    for (int64_t k = k0; k < k1; ++k) {
      const PrRoiBox<A>& g = group.box[k - k0];
      if (g.batch_index < 0) {
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t bin = 0; bin < bins; ++bin)
            output[prroi_output_at(channels_last, k, c, bin, channels, bins)] =
                curoi_store<T>((A)0);
        continue;
      }
      const PrRoiWeights<A>& wy = group.y[k - k0];
      const PrRoiWeights<A>& wx = group.x[k - k0];
      const T* image = input + g.batch_index * channels * plane_size;
      prroi_lanes(channels_last, c0, c1, [&](int64_t c, int64_t lanes,
                                             auto u_const) {
        constexpr int U = decltype(u_const)::value;
        for (int64_t bin = 0; bin < bins; ++bin) {
          const PrRoiSpan<A> rows = prroi_bin_span(wy, bin / pooled_width);
          const PrRoiSpan<A> cols = prroi_bin_span(wx, bin % pooled_width);
          prroi_sum_lanes<U, T, A>(image + c * lane_stride, lanes,
                                   lane_stride, width, step, rows, cols,
                                   sum.data(), part.data());
          for (int64_t u = 0; u < lanes; ++u)
            output[prroi_output_at(channels_last, k, c + u, bin, channels,
                                   bins)] = curoi_store<T>(sum[u]);
        }
      });
    }
  });
}

// Box group after box group (its tables built once by the calling thread),
// each block of channels is summed by one thread, so every gradient plane
// receives its terms box after box, bin after bin, row after row, in both
// layouts: no atomics, and the same bits whatever the number of threads or
// the layout.
template <typename T, typename Sum>
static void prroi_pool_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int channels_last,
    int64_t /* groups */, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  const int64_t step = channels_last ? channels : 1;
  const int64_t lane_stride = channels_last ? 1 : plane_size;
  int64_t block =
      (channels + 4 * curoi_threads() - 1) / (4 * curoi_threads());
  block = (block + CUROI_PRROI_LANES - 1) / CUROI_PRROI_LANES *
          CUROI_PRROI_LANES;
  if (block < 1) block = 1;  // no channels: no blocks, and no division by 0
  const int64_t blocks = (channels + block - 1) / block;
  const int64_t cost = CUROI_BOX_GROUP * block * bins * 4;
  // Built by the calling thread, read by the workers: through a reference,
  // since in a worker the name of a thread_local means the worker's own.
  static thread_local PrRoiGroup<A> callers_group;
  PrRoiGroup<A>& group = callers_group;
  for (int64_t k0 = 0; k0 < num_rois; k0 += CUROI_BOX_GROUP) {
    const int64_t k1 = curoi_min(k0 + (int64_t)CUROI_BOX_GROUP, num_rois);
    group.build(rois, k0, k1, batch, height, width, pooled_height,
                pooled_width, spatial_scale, false);
    curoi_parallel_for(blocks, 1, cost, [&](int64_t i) {
      static thread_local std::vector<A> grad, grad_row;
      const int64_t c0 = i * block, c1 = curoi_min(c0 + block, channels);
      grad.resize((size_t)curoi_max(c1 - c0, (int64_t)CUROI_PRROI_LANES));
      grad_row.resize(grad.size());
      for (int64_t k = k0; k < k1; ++k) {
        const PrRoiBox<A>& g = group.box[k - k0];
        if (g.batch_index < 0) continue;
        const PrRoiWeights<A>& wy = group.y[k - k0];
        const PrRoiWeights<A>& wx = group.x[k - k0];
        const int64_t image = g.batch_index * channels * plane_size;
        prroi_lanes(channels_last, c0, c1, [&](int64_t c, int64_t lanes,
                                               auto u_const) {
          constexpr int U = decltype(u_const)::value;
          for (int64_t bin = 0; bin < bins; ++bin) {
            for (int64_t u = 0; u < lanes; ++u)
              grad[u] = curoi_load<A>(grad_output[prroi_output_at(
                  channels_last, k, c + u, bin, channels, bins)]);
            prroi_scatter_lanes<U, A>(
                grad_input, image + c * lane_stride, lanes, lane_stride,
                width, step, prroi_bin_span(wy, bin / pooled_width),
                prroi_bin_span(wx, bin % pooled_width), grad.data(),
                grad_row.data());
          }
        });
      }
    });
  }
}

// The box gradient: boxes are shared among the threads, each box's row
// summed by one thread. Every bin's edge gradient receives its channels in
// channel order and the box's row its bins in bin order (the GPU loops'
// order), whichever loop runs outside: in NCHW a few channel planes at a
// time go through every bin (each plane's pixels read while in the cache),
// channels-last every channel of a bin at once. The same bits whatever the
// number of threads or the layout.
template <typename T>
static void prroi_pool_boxes_backward(
    const T* grad_output, const T* input,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int channels_last, typename AccType<T>::type* grad_rois) {
  typedef typename AccType<T>::type A;
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  const int64_t step = channels_last ? channels : 1;
  const int64_t lane_stride = channels_last ? 1 : plane_size;
  const int64_t cost = channels * bins * 16;
  curoi_parallel_for(num_rois, 1, cost, [&](int64_t k) {
    static thread_local PrRoiGroup<A> group;
    static thread_local std::vector<PrRoiEdgeGrad<A> > edges;
    // Per lane: the bin's value and the means along its four edges.
    static thread_local std::vector<A> value, left, right, top, bottom, part;
    const size_t lanes_max =
        (size_t)curoi_max(channels, (int64_t)CUROI_PRROI_LANES);
    for (std::vector<A>* v : {&value, &left, &right, &top, &bottom, &part})
      v->resize(lanes_max);
    const PrRoiEdgeGrad<A> zero = {(A)0, (A)0, (A)0, (A)0};
    edges.assign((size_t)bins, zero);
    group.build(rois, k, k + 1, batch, height, width, pooled_height,
                pooled_width, spatial_scale, true);
    const PrRoiBox<A>& g = group.box[0];
    const PrRoiWeights<A>& wy = group.y[0];
    const PrRoiWeights<A>& wx = group.x[0];
    PrRoiBoxGrad<A> d = {(A)0, (A)0, (A)0, (A)0};
    if (g.batch_index >= 0) {
      const T* image = input + g.batch_index * channels * plane_size;
      prroi_lanes(channels_last, 0, channels, [&](int64_t c, int64_t lanes,
                                                  auto u_const) {
        constexpr int U = decltype(u_const)::value;
        const T* pixels = image + c * lane_stride;
        for (int64_t bin = 0; bin < bins; ++bin) {
          const int64_t ph = bin / pooled_width, pw = bin % pooled_width;
          if (wy.axis[ph].inv == (A)0 || wx.axis[pw].inv == (A)0) continue;
          A w_left[2], w_right[2], w_top[2], w_bottom[2];
          const PrRoiSpan<A> rows = prroi_bin_span(wy, ph);
          const PrRoiSpan<A> cols = prroi_bin_span(wx, pw);
          const PrRoiSpan<A> l = prroi_edge_span(wx.lower[pw], w_left);
          const PrRoiSpan<A> r = prroi_edge_span(wx.upper[pw], w_right);
          const PrRoiSpan<A> t = prroi_edge_span(wy.lower[ph], w_top);
          const PrRoiSpan<A> b = prroi_edge_span(wy.upper[ph], w_bottom);
          prroi_sum_lanes<U, T, A>(pixels, lanes, lane_stride, width, step,
                                   rows, cols, value.data(), part.data());
          prroi_sum_lanes<U, T, A>(pixels, lanes, lane_stride, width, step,
                                   rows, l, left.data(), part.data());
          prroi_sum_lanes<U, T, A>(pixels, lanes, lane_stride, width, step,
                                   rows, r, right.data(), part.data());
          prroi_sum_lanes<U, T, A>(pixels, lanes, lane_stride, width, step,
                                   t, cols, top.data(), part.data());
          prroi_sum_lanes<U, T, A>(pixels, lanes, lane_stride, width, step,
                                   b, cols, bottom.data(), part.data());
          for (int64_t u = 0; u < lanes; ++u)
            prroi_edge_grad_add(
                &edges[bin],
                curoi_load<A>(grad_output[prroi_output_at(
                    channels_last, k, c + u, bin, channels, bins)]),
                value[u], left[u], right[u], top[u], bottom[u]);
        }
      });
      for (int64_t bin = 0; bin < bins; ++bin) {
        const int64_t ph = bin / pooled_width, pw = bin % pooled_width;
        if (wy.axis[ph].inv == (A)0 || wx.axis[pw].inv == (A)0) continue;
        prroi_box_grad_add(&d, edges[bin], wy.axis[ph], wx.axis[pw], ph, pw,
                           pooled_height, pooled_width);
      }
    }
    prroi_store_box_grad(grad_rois + k * 5, d, spatial_scale);
  });
}
#endif

#define CUROI_DEFINE_PRROI_POOL(T, suffix)                                     \
  CUROI_KERNEL void prroi_pool_forward_##suffix(                               \
      const T* input, const AccType<T>::type* rois, int64_t num_rois,          \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int channels_last, int64_t groups,       \
      T* output) {                                                             \
    prroi_pool_forward<T>(input, rois, num_rois, batch, channels, height,      \
                          width, pooled_height, pooled_width, spatial_scale,   \
                          channels_last, groups, output);                      \
  }                                                                            \
  CUROI_KERNEL void prroi_pool_backward_##suffix(                              \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_rois,    \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int channels_last, int64_t groups,       \
      AccType<T>::type* grad_input) {                                          \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_input;                                                     \
    prroi_pool_backward<T>(grad_output, rois, num_rois, batch, channels,       \
                           height, width, pooled_height, pooled_width,         \
                           spatial_scale, channels_last, groups, sum);         \
  }                                                                            \
  CUROI_KERNEL void prroi_pool_backward_fixed_##suffix(                        \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_rois,    \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int channels_last, int64_t groups,       \
      const double* max_abs, int64_t* fixed, AccType<T>::type* grad_input) {   \
    prroi_pool_backward<T>(                                                    \
        grad_output, rois, num_rois, batch, channels, height, width,           \
        pooled_height, pooled_width, spatial_scale, channels_last, groups,     \
        curoi_fixed_sum(grad_input, fixed, max_abs,                            \
                        num_rois * pooled_height * pooled_width));             \
  }                                                                            \
  CUROI_KERNEL void prroi_pool_fixed_finish_##suffix(                          \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_input) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_input);              \
  }                                                                            \
  CUROI_KERNEL void prroi_pool_boxes_backward_##suffix(                        \
      const T* grad_output, const T* input, const AccType<T>::type* rois,      \
      int64_t num_rois, int64_t batch, int64_t channels, int64_t height,       \
      int64_t width, int64_t pooled_height, int64_t pooled_width,              \
      AccType<T>::type spatial_scale, int channels_last,                       \
      AccType<T>::type* grad_rois) {                                           \
    prroi_pool_boxes_backward<T>(grad_output, input, rois, num_rois, batch,    \
                                 channels, height, width, pooled_height,       \
                                 pooled_width, spatial_scale, channels_last,   \
                                 grad_rois);                                   \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_PRROI_POOL)
