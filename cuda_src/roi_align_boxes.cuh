// RoI Align (average)'s gradient with respect to its boxes: d loss / d (x1,
// y1, x2, y2) of each box, for the gradient of its output. How a sample and
// its bilinear value move with the box is in roi_align_geometry.cuh
// (RoiAlignSlope); here the loops that sum
//   d loss/d x1 = s * sum over channels c, bins, samples (iy, ix) of
//       grad[k, c, bin] / count * (1 - t_w f_ix) * d value/d x (sample),
// and likewise for y1 (with f_iy, t_h), and for x2, y2 with t f in place of
// 1 - t f. Channel maps (M, roi_align_loops.cuh) say which input channel an
// output channel reads, as in the forward.
//
// Bitwise deterministic, without float atomics: the boxes_backward kernel
// writes one partial sum [4] per (box, bin), summed over the bin's channels
// and samples by one thread in a fixed order, into a scratch array
// partial[K, PH*PW, 4] (x1, y1, x2, y2, times s); boxes_backward_finish then
// adds each box's bins in bin order into grad_rois[K, 5] (0 in the batch
// column). A box that reads nothing (roi_align_box's batch_index -1) gets 0.
// Work is bounded as in the forward: only samples that land on the map (or
// a dense axis's zones) are visited.
#ifndef CUROI_ROI_ALIGN_BOXES_CUH
#define CUROI_ROI_ALIGN_BOXES_CUH

#include "roi_align_loops.cuh"

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// One thread per (box, bin): channel after channel, the y slopes against the
// x taps (d/d y1, y2), then the y taps against the x slopes (d/d x1, x2).
// The layout only moves the addresses, so channels-last gives the same bits.
template <bool ChannelsLast, typename Map, typename T>
CUROI_DEVICE void roi_align_boxes_backward_loop(
    const Map& map, const T* grad_output, const T* input,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int sampling_ratio, int aligned, typename AccType<T>::type* partial) {
  typedef typename AccType<T>::type A;
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t bins = pooled_height * pooled_width;
  const int64_t total = num_rois * bins;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiOutputIndex at =
        curoi_output_index(index, total, 1, pooled_height, pooled_width);
    const int64_t bin = index - at.k * bins;
    const RoiAlignElement<A> e =
        roi_align_element(rois, at, batch, height, width, pooled_height,
                          pooled_width, spatial_scale, sampling_ratio, aligned);
    const RoiAlignAxis<A>& ay = e.y;
    const RoiAlignAxis<A>& ax = e.x;
    A x1 = (A)0, y1 = (A)0, x2 = (A)0, y2 = (A)0;
    if (e.box.batch_index >= 0) {
      A follow_w, follow_h;
      roi_align_box_follows(rois + at.k * 5, spatial_scale, aligned,
                            &follow_w, &follow_h);
      for (int64_t c = 0; c < out_channels; ++c) {
        const CuroiPlane p = curoi_plane<ChannelsLast>(
            e.box.batch_index, roi_input_channel(map, c, bin), channels,
            height * width);
        const T* plane = input + p.at;
        const int64_t row = width * p.step;
        const A grad =
            curoi_load<A>(grad_output[ChannelsLast
                                          ? index * out_channels + c
                                          : (at.k * out_channels + c) * bins +
                                                bin]) /
            e.box.count;
        // d value / d y at each y sample, against the x taps.
        A dy1 = (A)0, dy2 = (A)0;
        for (int64_t ey = ay.first; ey < ay.last; ++ey) {
          RoiAlignSlope<A> sy;
          if (!roi_align_slope(ay, ey, at.ph, pooled_height, height, &sy))
            continue;
          const T* row_lo = plane + sy.lo * row;
          const T* row_hi = row_lo + row;
          A d = (A)0;
          for (int64_t ex = ax.first; ex < ax.last; ++ex) {
            RoiAlignTap<A> tx;
            if (!roi_align_tap(ax, ex, width, &tx)) continue;
            const int64_t lo = tx.lo * p.step, hi = tx.hi * p.step;
            d += tx.w_lo * (curoi_load<A>(row_hi[lo]) -
                            curoi_load<A>(row_lo[lo])) +
                 tx.w_hi * (curoi_load<A>(row_hi[hi]) -
                            curoi_load<A>(row_lo[hi]));
          }
          const A moved = follow_h * sy.f;
          dy1 += (sy.n - moved) * d;
          dy2 += moved * d;
        }
        // d value / d x at each x sample, against the y taps.
        A dx1 = (A)0, dx2 = (A)0;
        for (int64_t ex = ax.first; ex < ax.last; ++ex) {
          RoiAlignSlope<A> sx;
          if (!roi_align_slope(ax, ex, at.pw, pooled_width, width, &sx))
            continue;
          const int64_t lo = sx.lo * p.step, hi = lo + p.step;
          A d = (A)0;
          for (int64_t ey = ay.first; ey < ay.last; ++ey) {
            RoiAlignTap<A> ty;
            if (!roi_align_tap(ay, ey, height, &ty)) continue;
            const T* row_lo = plane + ty.lo * row;
            const T* row_hi = plane + ty.hi * row;
            d += ty.w_lo * (curoi_load<A>(row_lo[hi]) -
                            curoi_load<A>(row_lo[lo])) +
                 ty.w_hi * (curoi_load<A>(row_hi[hi]) -
                            curoi_load<A>(row_hi[lo]));
          }
          const A moved = follow_w * sx.f;
          dx1 += (sx.n - moved) * d;
          dx2 += moved * d;
        }
        x1 += grad * dx1;
        y1 += grad * dy1;
        x2 += grad * dx2;
        y2 += grad * dy2;
      }
    }
    A* out = partial + index * 4;
    out[0] = spatial_scale * x1;
    out[1] = spatial_scale * y1;
    out[2] = spatial_scale * x2;
    out[3] = spatial_scale * y2;
  }
}

template <typename Map, typename T>
CUROI_DEVICE void roi_align_boxes_backward(
    const Map& map, const T* grad_output, const T* input,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int sampling_ratio, int aligned, int channels_last,
    typename AccType<T>::type* partial) {
  if (channels_last)
    roi_align_boxes_backward_loop<true>(
        map, grad_output, input, rois, num_rois, batch, channels, height,
        width, pooled_height, pooled_width, spatial_scale, sampling_ratio,
        aligned, partial);
  else
    roi_align_boxes_backward_loop<false>(
        map, grad_output, input, rois, num_rois, batch, channels, height,
        width, pooled_height, pooled_width, spatial_scale, sampling_ratio,
        aligned, partial);
}

#else
// ------------------------------------------------------------- CPU loops
// Separable, as the forward's tables (RoiAlignWeights): per bin and axis, one
// value weight and two slope weights per touched pixel (the sums over the
// bin's samples of the taps' weights, and of -1/+1 on rows lo/lo+1 times
// 1 - t f and t f). Then per channel the bin costs rows x columns x 3
// multiply-adds:
//   y1 = sum_r first_y[r] * sum_j value_x[j] v[r][j], y2 likewise,
//   x1 = sum_r value_y[r] * sum_j first_x[j] v[r][j], x2 likewise.
// One thread sums a whole box (its bins in order, channels in order within
// each bin), so the bits do not depend on the number of threads; both
// layouts run these operations in this order (only the strides differ), so
// channels-last gives the same bits.
#include <vector>

template <typename A>
struct RoiAlignSlopeWeights {
  std::vector<int64_t> begin, length, offset;
  std::vector<A> value, first, second;

  void build(A roi_start, A roi_size, A follow, int64_t pooled,
             int sampling_ratio, int64_t size) {
    begin.assign(pooled, 0);
    length.assign(pooled, 0);
    offset.assign(pooled, 0);
    value.clear();
    first.clear();
    second.clear();
    for (int64_t p = 0; p < pooled; ++p) {
      const RoiAlignAxis<A> axis =
          roi_align_axis(roi_start, roi_size, p, pooled, sampling_ratio, size);
      int64_t lo = size, hi = -1;
      RoiAlignTap<A> tap;
      RoiAlignSlope<A> slope;
      for (int64_t e = axis.first; e < axis.last; ++e) {
        if (roi_align_tap(axis, e, size, &tap)) {
          lo = curoi_min(lo, tap.lo);
          hi = curoi_max(hi, tap.hi);
        }
        if (roi_align_slope(axis, e, p, pooled, size, &slope)) {
          lo = curoi_min(lo, slope.lo);
          hi = curoi_max(hi, slope.lo + 1);
        }
      }
      if (hi < lo) continue;
      begin[p] = lo;
      length[p] = hi - lo + 1;
      offset[p] = (int64_t)value.size();
      const size_t grown = value.size() + (size_t)(hi - lo + 1);
      value.resize(grown, (A)0);
      first.resize(grown, (A)0);
      second.resize(grown, (A)0);
      A* w = value.data() + offset[p] - lo;
      A* w1 = first.data() + offset[p] - lo;
      A* w2 = second.data() + offset[p] - lo;
      for (int64_t e = axis.first; e < axis.last; ++e) {
        if (roi_align_tap(axis, e, size, &tap)) {
          w[tap.lo] += tap.w_lo;
          w[tap.hi] += tap.w_hi;
        }
        if (roi_align_slope(axis, e, p, pooled, size, &slope)) {
          const A moved = follow * slope.f;
          w1[slope.lo] -= slope.n - moved;
          w1[slope.lo + 1] += slope.n - moved;
          w2[slope.lo] -= moved;
          w2[slope.lo + 1] += moved;
        }
      }
    }
  }
};

template <typename Map, typename T>
static void roi_align_boxes_backward(
    const Map& map, const T* grad_output, const T* input,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int sampling_ratio, int aligned, int channels_last,
    typename AccType<T>::type* partial) {
  typedef typename AccType<T>::type A;
  const int64_t bins = pooled_height * pooled_width;
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t plane_size = height * width;
  // Where pixel (r, j) of input channel ci lies: image + ci * channel_step +
  // (r * width + j) * pixel_step.
  const int64_t channel_step = channels_last ? 1 : plane_size;
  const int64_t pixel_step = channels_last ? channels : 1;
  const int64_t cost = out_channels * bins * 16;
  curoi_parallel_for(num_rois, 1, cost, [&](int64_t k) {
    static thread_local RoiAlignSlopeWeights<A> wy, wx;
    A* out = partial + k * bins * 4;
    for (int64_t i = 0; i < bins * 4; ++i) out[i] = (A)0;
    const A* box = rois + k * 5;
    const RoiAlignBox<A> g =
        roi_align_box(box, batch, pooled_height, pooled_width, spatial_scale,
                      sampling_ratio, aligned);
    if (g.batch_index < 0) return;
    A follow_w, follow_h;
    roi_align_box_follows(box, spatial_scale, aligned, &follow_w, &follow_h);
    wy.build(g.start_h, g.roi_h, follow_h, pooled_height, sampling_ratio,
             height);
    wx.build(g.start_w, g.roi_w, follow_w, pooled_width, sampling_ratio,
             width);
    const T* image = input + g.batch_index * channels * plane_size;
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      const int64_t rows = wy.length[ph];
      const A* value_y = wy.value.data() + wy.offset[ph];
      const A* first_y = wy.first.data() + wy.offset[ph];
      const A* second_y = wy.second.data() + wy.offset[ph];
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const int64_t bin = ph * pooled_width + pw;
        const int64_t cols = wx.length[pw];
        const A* value_x = wx.value.data() + wx.offset[pw];
        const A* first_x = wx.first.data() + wx.offset[pw];
        const A* second_x = wx.second.data() + wx.offset[pw];
        const T* corner =
            image + (wy.begin[ph] * width + wx.begin[pw]) * pixel_step;
        A x1 = (A)0, y1 = (A)0, x2 = (A)0, y2 = (A)0;
        for (int64_t c = 0; c < out_channels; ++c) {
          const A grad =
              curoi_load<A>(grad_output[channels_last
                                            ? (k * bins + bin) * out_channels + c
                                            : (k * out_channels + c) * bins +
                                                  bin]) /
              g.count;
          const T* pixels = corner + roi_input_channel(map, c, bin) * channel_step;
          A dx1 = (A)0, dy1 = (A)0, dx2 = (A)0, dy2 = (A)0;
          for (int64_t r = 0; r < rows; ++r) {
            const T* line = pixels + r * width * pixel_step;
            A sum = (A)0, sum1 = (A)0, sum2 = (A)0;
            for (int64_t j = 0; j < cols; ++j) {
              const A v = curoi_load<A>(line[j * pixel_step]);
              sum += value_x[j] * v;
              sum1 += first_x[j] * v;
              sum2 += second_x[j] * v;
            }
            dy1 += first_y[r] * sum;
            dy2 += second_y[r] * sum;
            dx1 += value_y[r] * sum1;
            dx2 += value_y[r] * sum2;
          }
          x1 += grad * dx1;
          y1 += grad * dy1;
          x2 += grad * dx2;
          y2 += grad * dy2;
        }
        A* o = out + bin * 4;
        o[0] = spatial_scale * x1;
        o[1] = spatial_scale * y1;
        o[2] = spatial_scale * x2;
        o[3] = spatial_scale * y2;
      }
    }
  });
}
#endif

#endif  // CUROI_ROI_ALIGN_BOXES_CUH
