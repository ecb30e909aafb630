// RoI Align (average)'s loops, forward and backward: the mean of a bin's
// samples, a sample off the map adding 0 but counting in the divisor
// max(grid_h*grid_w, 1). The geometry (bins, samples, taps) is in
// roi_align_geometry.cuh, the channel maps and the GPU's tiles of channels
// in roi_align_tiles.cuh.
//
// Two operators run these loops: RoI Align (roi_align.cu), where output
// channel c reads input channel c, and position-sensitive RoI Align
// (ps_roi_align.cu), where it reads a different input channel in each bin;
// a channel map M, a template argument, says which. Everywhere below
// `channels` is the input's channel count, which fixes the input's and the
// gradient's layout.
#ifndef CUROI_ROI_ALIGN_LOOPS_CUH
#define CUROI_ROI_ALIGN_LOOPS_CUH

#include "roi_align_tiles.cuh"

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// A thread per (box, bin, tile of output channels): roi_align_tiles.cuh.

// A bin's samples in order, row after row, for the tiles' sums
// (roi_align_tile_means, roi_align_tile_scatter). Shared with the loops of
// multiscale RoI Align (multiscale_roi_align.cu), which give each tile the
// size and scale of its box's level.
template <typename A>
struct RoiAlignBinSamples {
  const RoiAlignElement<A>* e;
  int64_t height, width;

  template <typename F>
  CUROI_MEMBER void operator()(const F& f) const {
    for (int64_t ey = e->y.first; ey < e->y.last; ++ey) {
      RoiAlignTap<A> ty;
      if (!roi_align_tap(e->y, ey, height, &ty)) continue;
      for (int64_t ex = e->x.first; ex < e->x.last; ++ex) {
        RoiAlignTap<A> tx;
        if (!roi_align_tap(e->x, ex, width, &tx)) continue;
        f(ty, tx);
      }
    }
  }
};

template <typename A>
CUROI_DEVICE RoiAlignBinSamples<A> roi_align_bin_samples(
    const RoiAlignElement<A>& e, int64_t height, int64_t width) {
  RoiAlignBinSamples<A> samples;
  samples.e = &e;
  samples.height = height;
  samples.width = width;
  return samples;
}

template <bool ChannelsLast, typename Map, typename T>
CUROI_DEVICE void roi_align_forward_loop(
    const Map& map, const T* input, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    int64_t groups, T* output) {
  typedef typename AccType<T>::type A;
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t total = num_rois * pooled_height * pooled_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, out_channels, groups, pooled_height, pooled_width);
    const RoiAlignElement<A> e = roi_align_element(
        rois, t.k, t.ph, t.pw, batch, height, width, pooled_height,
        pooled_width, spatial_scale, sampling_ratio, aligned);
    roi_align_tile_means(
        input,
        curoi_tile_at<ChannelsLast>(map, t, e.box.batch_index, channels,
                                    height * width, pooled_height,
                                    pooled_width),
        e.box.batch_index >= 0, e.box.count, width,
        roi_align_bin_samples(e, height, width), output);
  }
}

template <typename Map, typename T>
CUROI_DEVICE void roi_align_forward(
    const Map& map, const T* input, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    int channels_last, int64_t groups, T* output) {
  if (channels_last)
    roi_align_forward_loop<true>(map, input, rois, num_rois, batch, channels,
                                 height, width, pooled_height, pooled_width,
                                 spatial_scale, sampling_ratio, aligned,
                                 groups, output);
  else
    roi_align_forward_loop<false>(map, input, rois, num_rois, batch, channels,
                                  height, width, pooled_height, pooled_width,
                                  spatial_scale, sampling_ratio, aligned,
                                  groups, output);
}

// Each output gradient spreads over the four neighbours of every sample of
// its bin; bins of one box and different boxes overlap, so the adds go
// through Sum (CuroiFloatSum or the deterministic CuroiFixedSum), atomically.
template <bool ChannelsLast, typename Map, typename T, typename Sum>
CUROI_DEVICE void roi_align_backward_loop(
    const Map& map, const T* grad_output,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int sampling_ratio, int aligned, int64_t groups, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t total = num_rois * pooled_height * pooled_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, out_channels, groups, pooled_height, pooled_width);
    const RoiAlignElement<A> e = roi_align_element(
        rois, t.k, t.ph, t.pw, batch, height, width, pooled_height,
        pooled_width, spatial_scale, sampling_ratio, aligned);
    roi_align_tile_scatter(
        grad_output, grad_input,
        curoi_tile_at<ChannelsLast>(map, t, e.box.batch_index, channels,
                                    height * width, pooled_height,
                                    pooled_width),
        e.box.batch_index >= 0, e.box.count, width,
        roi_align_bin_samples(e, height, width));
  }
}

template <typename Map, typename T, typename Sum>
CUROI_DEVICE void roi_align_backward(
    const Map& map, const T* grad_output,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int sampling_ratio, int aligned, int channels_last, int64_t groups,
    const Sum& grad_input) {
  if (channels_last)
    roi_align_backward_loop<true>(map, grad_output, rois, num_rois, batch,
                                  channels, height, width, pooled_height,
                                  pooled_width, spatial_scale, sampling_ratio,
                                  aligned, groups, grad_input);
  else
    roi_align_backward_loop<false>(map, grad_output, rois, num_rois, batch,
                                   channels, height, width, pooled_height,
                                   pooled_width, spatial_scale,
                                   sampling_ratio, aligned, groups,
                                   grad_input);
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
// The loops run over positions k = 0 .. num_rois-1 of a list of boxes: box k
// itself, or box order[k] when an order is given (multiscale RoI Align runs
// these loops once per pyramid level, on the boxes of that level); index[]
// holds the box, which places its output and gradient rows.
template <typename A>
struct RoiAlignGroup {
  RoiAlignBox<A> box[CUROI_BOX_GROUP];
  RoiAlignWeights<A> y[CUROI_BOX_GROUP], x[CUROI_BOX_GROUP];
  int64_t index[CUROI_BOX_GROUP];

  void build(const A* rois, const int64_t* order, int64_t first, int64_t end,
             int64_t batch, int64_t height, int64_t width,
             int64_t pooled_height, int64_t pooled_width, A spatial_scale,
             int sampling_ratio, int aligned) {
    for (int64_t k = first; k < end; ++k) {
      const int64_t i = k - first;
      index[i] = order != nullptr ? order[k] : k;
      box[i] = roi_align_box(rois + index[i] * 5, batch, pooled_height,
                             pooled_width, spatial_scale, sampling_ratio,
                             aligned);
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

// Every bin of boxes k0 .. k1-1 in output channels c .. c+U-1, from the
// group's tables.
template <int U, typename Map, typename T, typename A>
static void roi_align_forward_channels(const Map& map, const T* input,
                                       const RoiAlignGroup<A>& group,
                                       int64_t k0, int64_t k1, int64_t c,
                                       int64_t channels, int64_t height,
                                       int64_t width, int64_t pooled_height,
                                       int64_t pooled_width, T* output) {
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  const int64_t out_channels = roi_output_channels(map, channels);
  // From one output channel's plane to the next one's, in the same bin.
  const int64_t lane = roi_channel_step(map) * plane_size;
  for (int64_t k = k0; k < k1; ++k) {
    const RoiAlignBox<A>& g = group.box[k - k0];
    const RoiAlignWeights<A>& wy = group.y[k - k0];
    const RoiAlignWeights<A>& wx = group.x[k - k0];
    T* out = output + (group.index[k - k0] * out_channels + c) * bins;
    if (g.batch_index < 0) {
      for (int64_t i = 0; i < U * bins; ++i) out[i] = curoi_store<T>((A)0);
      continue;
    }
    const T* image = input + g.batch_index * channels * plane_size;
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      const int64_t rows = wy.length[ph];
      const int64_t row0 = wy.begin[ph] * width;
      const A* w_row = wy.weight.data() + wy.offset[ph];
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const int64_t bin = ph * pooled_width + pw;
        const int64_t cols = wx.length[pw];
        const T* col0 = image +
                        roi_input_channel(map, c, bin) * plane_size +
                        row0 + wx.begin[pw];
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
              part[u] += w * curoi_load<A>(row[u * lane + j]);
          }
          for (int u = 0; u < U; ++u) sum[u] += w_row[r] * part[u];
        }
        for (int u = 0; u < U; ++u) out[u * bins + bin] = curoi_store<T>(sum[u] / g.count);
      }
    }
  }
}

// Channels-last: every bin of boxes k0 .. k1-1 in output channels c0 .. c1-1,
// the channel innermost (contiguous for RoI Align: one vectorisable loop per
// weight). Each channel's sum runs the operations of
// roi_align_forward_channels in the same order (rows of column sums), so the
// results are its bits.
template <typename Map, typename T, typename A>
static void roi_align_forward_nhwc(const Map& map, const T* input,
                                   const RoiAlignGroup<A>& group, int64_t k0,
                                   int64_t k1, int64_t c0, int64_t c1,
                                   int64_t channels, int64_t height,
                                   int64_t width, int64_t pooled_height,
                                   int64_t pooled_width, T* output,
                                   A* __restrict__ sum, A* __restrict__ part) {
  const int64_t bins = pooled_height * pooled_width;
  const int64_t n = c1 - c0;
  const int64_t row_stride = width * channels;
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t step = roi_channel_step(map);
  for (int64_t k = k0; k < k1; ++k) {
    const RoiAlignBox<A>& g = group.box[k - k0];
    const RoiAlignWeights<A>& wy = group.y[k - k0];
    const RoiAlignWeights<A>& wx = group.x[k - k0];
    T* out_box = output + group.index[k - k0] * bins * out_channels + c0;
    if (g.batch_index < 0) {
      for (int64_t bin = 0; bin < bins; ++bin)
        for (int64_t c = 0; c < n; ++c)
          out_box[bin * out_channels + c] = curoi_store<T>((A)0);
      continue;
    }
    const T* image = input + g.batch_index * height * row_stride;
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      const int64_t rows = wy.length[ph];
      const int64_t row0 = wy.begin[ph] * row_stride;
      const A* w_row = wy.weight.data() + wy.offset[ph];
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const int64_t bin = ph * pooled_width + pw;
        const int64_t cols = wx.length[pw];
        const T* col0 = image + row0 + wx.begin[pw] * channels +
                        roi_input_channel(map, c0, bin);
        const A* w_col = wx.weight.data() + wx.offset[pw];
        for (int64_t c = 0; c < n; ++c) sum[c] = (A)0;
        for (int64_t r = 0; r < rows; ++r) {
          const T* row = col0 + r * row_stride;
          for (int64_t c = 0; c < n; ++c) part[c] = (A)0;
          for (int64_t j = 0; j < cols; ++j) {
            const A w = w_col[j];
            const T* __restrict__ pixel = row + j * channels;
            for (int64_t c = 0; c < n; ++c)
              part[c] += w * curoi_load<A>(pixel[c * step]);
          }
          const A wr = w_row[r];
          for (int64_t c = 0; c < n; ++c) sum[c] += wr * part[c];
        }
        T* out = out_box + bin * out_channels;
        for (int64_t c = 0; c < n; ++c) out[c] = curoi_store<T>(sum[c] / g.count);
      }
    }
  }
}

// The boxes order[0 .. num_rois-1] (all boxes 0 .. num_rois-1 when order is
// null), see RoiAlignGroup.
template <typename Map, typename T>
static void roi_align_forward_listed(
    const Map& map, const T* input, const typename AccType<T>::type* rois,
    const int64_t* order, int64_t num_rois, int64_t batch, int64_t channels,
    int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int sampling_ratio, int aligned, int channels_last, T* output) {
  typedef typename AccType<T>::type A;
  const CuroiItems items =
      curoi_items(num_rois, roi_output_channels(map, channels));
  const int64_t bins = pooled_height * pooled_width;
  const int64_t cost = CUROI_BOX_GROUP * items.block * bins * 4;
  curoi_parallel_for(items.count(), 1, cost, [&](int64_t item) {
    static thread_local RoiAlignGroup<A> group;
    const int64_t k0 = items.first_box(item), k1 = items.end_box(item);
    group.build(rois, order, k0, k1, batch, height, width, pooled_height,
                pooled_width, spatial_scale, sampling_ratio, aligned);
    const int64_t c1 = items.end_channel(item);
    int64_t c = items.first_channel(item);
    if (channels_last) {
      static thread_local std::vector<A> sum, part;
      sum.resize((size_t)(c1 - c));
      part.resize((size_t)(c1 - c));
      roi_align_forward_nhwc<Map, T, A>(map, input, group, k0, k1, c, c1,
                                        channels, height, width,
                                        pooled_height, pooled_width, output,
                                        sum.data(), part.data());
      return;
    }
    for (; c + CUROI_LANES <= c1; c += CUROI_LANES)
      roi_align_forward_channels<CUROI_LANES, Map, T, A>(
          map, input, group, k0, k1, c, channels, height, width,
          pooled_height, pooled_width, output);
    for (; c < c1; ++c)
      roi_align_forward_channels<1, Map, T, A>(map, input, group, k0, k1, c,
                                               channels, height, width,
                                               pooled_height, pooled_width,
                                               output);
  });
}

template <typename Map, typename T>
static void roi_align_forward(
    const Map& map, const T* input, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    int channels_last, int64_t /* groups */, T* output) {
  roi_align_forward_listed(map, input, rois, (const int64_t*)nullptr,
                           num_rois, batch, channels, height, width,
                           pooled_height, pooled_width, spatial_scale,
                           sampling_ratio, aligned, channels_last, output);
}

// The gradient of every bin of boxes k0 .. k1-1 in output channels
// c .. c+U-1 (each input channel's plane in box order, bin order: the order
// does not depend on U), sharing each weight between the U channels.
template <int U, typename Map, typename T, typename A, typename Sum>
static void roi_align_backward_channels(const Map& map, const T* grad_output,
                                        const RoiAlignGroup<A>& group,
                                        int64_t k0, int64_t k1, int64_t c,
                                        int64_t channels, int64_t height,
                                        int64_t width, int64_t pooled_height,
                                        int64_t pooled_width,
                                        const Sum& grad_input) {
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t lane = roi_channel_step(map) * plane_size;
  for (int64_t k = k0; k < k1; ++k) {
    const RoiAlignBox<A>& g = group.box[k - k0];
    if (g.batch_index < 0) continue;
    const RoiAlignWeights<A>& wy = group.y[k - k0];
    const RoiAlignWeights<A>& wx = group.x[k - k0];
    const int64_t image = g.batch_index * channels * plane_size;
    const T* grad_bins =
        grad_output + (group.index[k - k0] * out_channels + c) * bins;
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      const int64_t rows = wy.length[ph];
      const int64_t row0 = wy.begin[ph] * width;
      const A* w_row = wy.weight.data() + wy.offset[ph];
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const int64_t bin = ph * pooled_width + pw;
        A grad[U];
        for (int u = 0; u < U; ++u)
          grad[u] = curoi_load<A>(grad_bins[u * bins + bin]) / g.count;
        const int64_t cols = wx.length[pw];
        const int64_t col0 = image +
                             roi_input_channel(map, c, bin) * plane_size +
                             row0 + wx.begin[pw];
        const A* w_col = wx.weight.data() + wx.offset[pw];
        for (int64_t r = 0; r < rows; ++r) {
          A grad_row[U];
          for (int u = 0; u < U; ++u) grad_row[u] = grad[u] * w_row[r];
          for (int64_t j = 0; j < cols; ++j) {
            const A w = w_col[j];
            for (int u = 0; u < U; ++u)
              curoi_sum_add(grad_input, col0 + u * lane + r * width + j,
                            grad_row[u] * w);
          }
        }
      }
    }
  }
}

// Channels-last: the gradient of every bin of boxes k0 .. k1-1 that falls
// in rows y0 .. y1-1 of image b, all channels (the channel innermost). Each
// gradient pixel gets the terms of roi_align_backward_channels, computed
// alike, in the same (box, bin, row, column) order, so the sums are its
// bits.
template <typename Map, typename T, typename A, typename Sum>
static void roi_align_backward_nhwc(const Map& map, const T* grad_output,
                                    const RoiAlignGroup<A>& group, int64_t k0,
                                    int64_t k1, int64_t b, int64_t y0,
                                    int64_t y1, int64_t channels,
                                    int64_t height, int64_t width,
                                    int64_t pooled_height,
                                    int64_t pooled_width,
                                    const Sum& grad_input,
                                    A* __restrict__ grad,
                                    A* __restrict__ grad_row) {
  const int64_t bins = pooled_height * pooled_width;
  const int64_t row_stride = width * channels;
  const int64_t n = roi_output_channels(map, channels);
  const int64_t step = roi_channel_step(map);
  const int64_t image = b * height * row_stride;
  for (int64_t k = k0; k < k1; ++k) {
    const RoiAlignBox<A>& g = group.box[k - k0];
    if (g.batch_index != b) continue;
    const RoiAlignWeights<A>& wy = group.y[k - k0];
    const RoiAlignWeights<A>& wx = group.x[k - k0];
    const T* grad_box = grad_output + group.index[k - k0] * bins * n;
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      // The bin's rows r (pixel rows begin + r) within y0 .. y1-1.
      const int64_t r0 = curoi_max(y0 - wy.begin[ph], (int64_t)0);
      const int64_t r1 = curoi_min(y1 - wy.begin[ph], wy.length[ph]);
      if (r1 <= r0) continue;
      const int64_t row0 = wy.begin[ph] * row_stride;
      const A* w_row = wy.weight.data() + wy.offset[ph];
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const int64_t bin = ph * pooled_width + pw;
        const T* grad_bin = grad_box + bin * n;
        for (int64_t c = 0; c < n; ++c)
          grad[c] = curoi_load<A>(grad_bin[c]) / g.count;
        const int64_t cols = wx.length[pw];
        const int64_t col0 = image + row0 + wx.begin[pw] * channels +
                             roi_input_channel(map, 0, bin);
        const A* w_col = wx.weight.data() + wx.offset[pw];
        for (int64_t r = r0; r < r1; ++r) {
          const A wr = w_row[r];
          for (int64_t c = 0; c < n; ++c) grad_row[c] = grad[c] * wr;
          for (int64_t j = 0; j < cols; ++j) {
            const A w = w_col[j];
            const int64_t pixel = col0 + r * row_stride + j * channels;
            for (int64_t c = 0; c < n; ++c)
              curoi_sum_add(grad_input, pixel + c * step, grad_row[c] * w);
          }
        }
      }
    }
  }
}

// NCHW RoI Align's backward with channels innermost: the channels of a
// block, CUROI_SCRATCH_LANES of them, are gathered into a channels-last
// copy of their gradient planes (scratch[(b * H * W + pixel) * lanes + u]),
// each bin's terms are added there as in roi_align_backward_nhwc (one
// vectorised add per weight for all the block's channels, where the planes
// would take one add per channel), and the copy goes back into the planes.
// Every gradient pixel receives the terms of roi_align_backward_channels,
// computed alike, in the same (box, bin, row, column) order, onto the same
// starting value: the same bits. Lanes past the last channel of the final
// block add zeros that are never copied back.
// 8 lanes (two SSE vectors of float): W1's backward (sampling_ratio 2, 1
// thread) takes 0.29x the time of the per-channel scatter, against 0.35x
// with 16 lanes and 0.38x with 4.
#define CUROI_SCRATCH_LANES 8

// Only for RoI Align's own channels (position-sensitive RoI Align writes
// 49 input channels per output channel) and the plain sum.
template <typename Map, typename Sum>
struct RoiAlignScratch {
  static const bool usable = false;
};
template <typename A>
struct RoiAlignScratch<CuroiSameChannel, CuroiFloatSum<A> > {
  static const bool usable = true;
};

// Boxes k0 .. k1-1 of one group into the scratch copy of channels
// c .. c + CUROI_SCRATCH_LANES - 1 (n of them real).
template <typename T, typename A>
static void roi_align_backward_scratch_group(
    const T* grad_output, const RoiAlignGroup<A>& group, int64_t k0,
    int64_t k1, int64_t c, int64_t n, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    A* __restrict__ scratch) {
  constexpr int L = CUROI_SCRATCH_LANES;
  const int64_t bins = pooled_height * pooled_width;
  for (int64_t k = k0; k < k1; ++k) {
    const RoiAlignBox<A>& g = group.box[k - k0];
    if (g.batch_index < 0) continue;
    const RoiAlignWeights<A>& wy = group.y[k - k0];
    const RoiAlignWeights<A>& wx = group.x[k - k0];
    A* image = scratch + g.batch_index * height * width * L;
    const T* grad_bins = grad_output + (group.index[k - k0] * channels + c) * bins;
    // The next box's gradient rows lie a whole box of channels further on:
    // too far for the hardware prefetcher to follow.
    if (k + 1 < k1) {
      const char* next = (const char*)(grad_output +
                                       (group.index[k + 1 - k0] * channels + c) * bins);
      for (int64_t at = 0; at < n * bins * (int64_t)sizeof(T); at += 64)
        curoi_prefetch(next + at);
    }
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      const int64_t rows = wy.length[ph];
      A* row0 = image + wy.begin[ph] * width * L;
      const A* w_row = wy.weight.data() + wy.offset[ph];
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const int64_t bin = ph * pooled_width + pw;
        A grad[L];
        for (int u = 0; u < L; ++u)
          grad[u] = u < n ? curoi_load<A>(grad_bins[u * bins + bin]) / g.count
                          : (A)0;
        const int64_t cols = wx.length[pw];
        A* col0 = row0 + wx.begin[pw] * L;
        const A* w_col = wx.weight.data() + wx.offset[pw];
        for (int64_t r = 0; r < rows; ++r) {
          A grad_row[L];
          for (int u = 0; u < L; ++u) grad_row[u] = grad[u] * w_row[r];
          A* row = col0 + r * width * L;
          for (int64_t j = 0; j < cols; ++j) {
            const A w = w_col[j];
            A* __restrict__ pixel = row + j * L;
            // Kept a loop, so that it is the one vectorised (unrolled first,
            // GCC vectorised the column loop, with shuffles).
#pragma GCC unroll 1
            for (int u = 0; u < L; ++u) pixel[u] += grad_row[u] * w;
          }
        }
      }
    }
  }
}

// Every group's tables for boxes 0 .. num_rois-1 (order as in
// RoiAlignGroup), built once, in parallel, for loops that give each thread
// a share of every box. The calling thread's own vector (a reference: in a
// worker, a thread_local's name means the worker's own), kept between calls
// so that its buffers are reused.
template <typename A>
static const std::vector<RoiAlignGroup<A> >& roi_align_all_tables(
    const A* rois, const int64_t* order, int64_t num_rois, int64_t batch,
    int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, A spatial_scale, int sampling_ratio, int aligned) {
  const int64_t groups = (num_rois + CUROI_BOX_GROUP - 1) / CUROI_BOX_GROUP;
  static thread_local std::vector<RoiAlignGroup<A> > callers_tables;
  std::vector<RoiAlignGroup<A> >& tables = callers_tables;
  if ((int64_t)tables.size() < groups) tables.resize((size_t)groups);
  const int64_t bins = pooled_height * pooled_width;
  curoi_parallel_for(groups, 1, CUROI_BOX_GROUP * bins * 8, [&](int64_t i) {
    const int64_t k0 = i * CUROI_BOX_GROUP;
    tables[i].build(rois, order, k0,
                    curoi_min(k0 + (int64_t)CUROI_BOX_GROUP, num_rois), batch,
                    height, width, pooled_height, pooled_width, spatial_scale,
                    sampling_ratio, aligned);
  });
  return tables;
}

// The scratch path (above) for the whole backward, if it applies: returns
// false, having done nothing, for other maps and sums, for a copy that would
// not fit CUROI_SCRATCH_BYTES, and where the boxes' terms are too few to pay
// for copying the planes (a few boxes on a large map: the gradient is
// allocated zeroed and only the pages the boxes touch are written).
#define CUROI_SCRATCH_BYTES (16 << 20)

template <typename Map, typename T, typename Sum>
static bool roi_align_backward_scratch(
    const Map&, const T* grad_output, const typename AccType<T>::type* rois,
    const int64_t* order, int64_t num_rois, int64_t batch, int64_t channels,
    int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int sampling_ratio, int aligned, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  if constexpr (!RoiAlignScratch<Map, Sum>::usable) {
    return false;
  } else {
    constexpr int L = CUROI_SCRATCH_LANES;
    const int64_t plane_size = height * width;
    const int64_t pixels = batch * plane_size;
    const int64_t bins = pooled_height * pooled_width;
    if (pixels > CUROI_SCRATCH_BYTES / (L * (int64_t)sizeof(A)) ||
        num_rois * bins < pixels)
      return false;
    const int64_t groups = (num_rois + CUROI_BOX_GROUP - 1) / CUROI_BOX_GROUP;
    const std::vector<RoiAlignGroup<A> >& tables = roi_align_all_tables(
        rois, order, num_rois, batch, height, width, pooled_height,
        pooled_width, spatial_scale, sampling_ratio, aligned);
    const int64_t blocks = (channels + L - 1) / L;
    curoi_parallel_for(blocks, 1, num_rois * bins * L * 4, [&](int64_t i) {
      static thread_local std::vector<A> copy;
      copy.resize((size_t)(pixels * L));
      A* scratch = copy.data();
      const int64_t c = i * L, n = curoi_min((int64_t)L, channels - c);
      for (int64_t b = 0; b < batch; ++b) {
        const A* planes = grad_input.grad + (b * channels + c) * plane_size;
        A* image = scratch + b * plane_size * L;
        for (int64_t p = 0; p < plane_size; ++p)
          for (int u = 0; u < L; ++u)
            image[p * L + u] = u < n ? planes[u * plane_size + p] : (A)0;
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * CUROI_BOX_GROUP;
        roi_align_backward_scratch_group<T, A>(
            grad_output, tables[g], k0,
            curoi_min(k0 + (int64_t)CUROI_BOX_GROUP, num_rois), c, n,
            channels, height, width, pooled_height, pooled_width, scratch);
      }
      for (int64_t b = 0; b < batch; ++b) {
        A* planes = grad_input.grad + (b * channels + c) * plane_size;
        const A* image = scratch + b * plane_size * L;
        for (int64_t u = 0; u < n; ++u)
          for (int64_t p = 0; p < plane_size; ++p)
            planes[u * plane_size + p] = image[p * L + u];
      }
    });
    return true;
  }
}

// Bytes of gradient rows in one band of the NHWC backward (below): half a
// 2 MB L2. W1 (1 thread) is as fast with 0.5 or 2 MB.
#define CUROI_BAND_BYTES (1 << 20)

// Box group after box group, each block of output channels is summed by one
// thread; the input channels it writes are its own (each input channel
// feeds one output channel), so every gradient plane receives its terms box
// after box, bin after bin: no atomics, and the same bits whatever the
// number of threads. The boxes are order[0 .. num_rois-1] as in
// roi_align_forward_listed: each plane receives their terms in that order.
template <typename Map, typename T, typename Sum>
static void roi_align_backward_listed(
    const Map& map, const T* grad_output,
    const typename AccType<T>::type* rois, const int64_t* order,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int sampling_ratio, int aligned,
    int channels_last, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t bins = pooled_height * pooled_width;
  const int64_t out_channels = roi_output_channels(map, channels);
  if (!channels_last &&
      roi_align_backward_scratch(map, grad_output, rois, order, num_rois,
                                 batch, channels, height, width,
                                 pooled_height, pooled_width, spatial_scale,
                                 sampling_ratio, aligned, grad_input))
    return;
  if (channels_last) {
    // Bands of rows of one image, handed out dynamically; each band takes
    // every box's terms that fall in its rows, all channels at once. Every
    // gradient pixel is summed by one thread in (box, bin, row, column)
    // order, whatever the number of threads. A band's pixels stay in L2
    // (CUROI_BAND_BYTES), with at least four bands per thread for the
    // balance. Blocks of channels per group of boxes, as NCHW, took 1.6x
    // as long at 1 thread (shorter vectors, each box's gradient rows read
    // in pieces) and longer at 2 threads than at 1.
    const std::vector<RoiAlignGroup<A> >& tables = roi_align_all_tables(
        rois, order, num_rois, batch, height, width, pooled_height,
        pooled_width, spatial_scale, sampling_ratio, aligned);
    const int64_t groups = (num_rois + CUROI_BOX_GROUP - 1) / CUROI_BOX_GROUP;
    const int64_t row_bytes = width * channels * (int64_t)sizeof(A);
    const int64_t wanted =
        (4 * (int64_t)curoi_threads() + batch - 1) / curoi_max(batch, (int64_t)1);
    // At most 64 bands per image: each band looks at every box of its image.
    const int64_t fit = curoi_min(
        (height * row_bytes + CUROI_BAND_BYTES - 1) / CUROI_BAND_BYTES, (int64_t)64);
    const int64_t per_image =
        curoi_max(curoi_min(curoi_max(wanted, fit), height), (int64_t)1);
    const int64_t band = curoi_max((height + per_image - 1) / per_image, (int64_t)1);
    const int64_t bands = (height + band - 1) / band;  // per image
    curoi_parallel_for(batch * bands, 1, num_rois * bins * out_channels * 4 / bands,
                       [&](int64_t u) {
      const int64_t b = u / bands, y0 = u % bands * band;
      const int64_t y1 = curoi_min(y0 + band, height);
      static thread_local std::vector<A> grad, grad_row;
      grad.resize((size_t)out_channels);
      grad_row.resize((size_t)out_channels);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * CUROI_BOX_GROUP;
        roi_align_backward_nhwc<Map, T, A>(
            map, grad_output, tables[g], k0,
            curoi_min(k0 + (int64_t)CUROI_BOX_GROUP, num_rois), b, y0, y1,
            channels, height, width, pooled_height, pooled_width, grad_input,
            grad.data(), grad_row.data());
      }
    });
    return;
  }
  // Blocks of channels, handed out dynamically within each group of boxes:
  // a busy core does not hold the others back, as a fixed share would.
  int64_t block =
      (out_channels + 4 * curoi_threads() - 1) / (4 * curoi_threads());
  block = (block + CUROI_LANES - 1) / CUROI_LANES * CUROI_LANES;
  if (block < 1) block = 1;  // no channels: no blocks, and no division by 0
  const int64_t blocks = (out_channels + block - 1) / block;
  const int64_t cost = CUROI_BOX_GROUP * block * bins * 4;
  // Built by the calling thread, read by the workers: through a reference,
  // since in a worker the name of a thread_local means the worker's own.
  static thread_local RoiAlignGroup<A> callers_group;
  RoiAlignGroup<A>& group = callers_group;
  for (int64_t k0 = 0; k0 < num_rois; k0 += CUROI_BOX_GROUP) {
    const int64_t k1 = curoi_min(k0 + (int64_t)CUROI_BOX_GROUP, num_rois);
    group.build(rois, order, k0, k1, batch, height, width, pooled_height,
                pooled_width, spatial_scale, sampling_ratio, aligned);
    curoi_parallel_for(blocks, 1, cost, [&](int64_t i) {
      const int64_t c0 = i * block, c1 = curoi_min(c0 + block, out_channels);
      int64_t c = c0;
      for (; c + CUROI_LANES <= c1; c += CUROI_LANES)
        roi_align_backward_channels<CUROI_LANES, Map, T, A>(
            map, grad_output, group, k0, k1, c, channels, height, width,
            pooled_height, pooled_width, grad_input);
      for (; c < c1; ++c)
        roi_align_backward_channels<1, Map, T, A>(
            map, grad_output, group, k0, k1, c, channels, height, width,
            pooled_height, pooled_width, grad_input);
    });
  }
}

template <typename Map, typename T, typename Sum>
static void roi_align_backward(
    const Map& map, const T* grad_output,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, typename AccType<T>::type spatial_scale,
    int sampling_ratio, int aligned, int channels_last,
    int64_t /* groups */, const Sum& grad_input) {
  roi_align_backward_listed(map, grad_output, rois, (const int64_t*)nullptr,
                            num_rois, batch, channels, height, width,
                            pooled_height, pooled_width, spatial_scale,
                            sampling_ratio, aligned, channels_last,
                            grad_input);
}
#endif

#endif  // CUROI_ROI_ALIGN_LOOPS_CUH
