// Position-sensitive RoI pooling (R-FCN), forward and backward, with the
// numbers of torchvision's ps_roi_pool: the AVERAGE of each bin, where
// output channel c reads input channel (c*PH + ph)*PW + pw in bin (ph, pw)
// (ps_roi.cuh). Along each axis (x shown; y alike with H):
//   start = round(x1*s), end = round(x2*s) (halves away from zero),
//   size = max(end - start, 1), bin = size / PW,
//   bin pw covers [floor(pw*bin) + start, ceil((pw+1)*bin) + start),
//   both ends clipped to [0, W-1].
// Clipping the exclusive end to W-1 (torchvision's quirk, kept for its
// numbers) means the last column and the last row are never read. The
// output is the bin's sum over its area, 0 for an empty bin.
//
// The backward is the exact gradient of this forward: grad / area to every
// pixel of the bin as the forward clipped it. torchvision's own backward
// clips the ends to W and H instead, so at the bottom and right edges it is
// not the gradient of its forward (it sends gradient to the last row and
// column, which its forward never reads); curoi's is.
//
// A box with an unusable batch index or coordinate (see curoi_box_batch), or
// whose scaled corners overflow, reads nothing and sends no gradient. Every
// bin is clipped to the map, so a huge box costs at most a map per bin.
#include "ps_roi.cuh"

// Bin p's [start, end) along one axis, clipped to [0, size - 1] (see the
// top). In A throughout: the box may lie far beyond any integer type.
template <typename A>
CUROI_DEVICE void ps_roi_pool_bin(A box_lo, A box_hi, A scale, int64_t p,
                                  int64_t pooled, int64_t size,
                                  int64_t* start, int64_t* end) {
  *start = *end = 0;
  const A lo = round(box_lo * scale);
  const A hi = round(box_hi * scale);
  const A bin = curoi_max(hi - lo, (A)1) / (A)pooled;
  const A s = floor((A)p * bin) + lo;
  const A e = ceil((A)(p + 1) * bin) + lo;
  // Scaled corners beyond A's range give inf or NaN: nothing is read.
  if (!(curoi_isfinite(s) && curoi_isfinite(e)) || size < 1) return;
  // The bound (A)size may round above size in float: clip again as integers.
  *start = curoi_min(curoi_clamp_to_int(s, (A)0, (A)size), size - 1);
  *end = curoi_min(curoi_clamp_to_int(e, (A)0, (A)size), size - 1);
}

// Bin (ph, pw) of a box: rows [hstart, hend) and columns [wstart, wend).
struct PsRoiPoolBin {
  int64_t hstart, hend, wstart, wend;
};

template <typename A>
CUROI_DEVICE PsRoiPoolBin ps_roi_pool_box_bin(const A* box, A spatial_scale,
                                              int64_t ph, int64_t pw,
                                              int64_t height, int64_t width,
                                              int64_t pooled_height,
                                              int64_t pooled_width) {
  PsRoiPoolBin bin;
  ps_roi_pool_bin(box[2], box[4], spatial_scale, ph, pooled_height, height,
                  &bin.hstart, &bin.hend);
  ps_roi_pool_bin(box[1], box[3], spatial_scale, pw, pooled_width, width,
                  &bin.wstart, &bin.wend);
  return bin;
}

// The divisor of a bin's sum; 0 for an empty bin, which reads nothing.
template <typename A>
CUROI_DEVICE A ps_roi_pool_area(const PsRoiPoolBin& bin) {
  if (!(bin.hend > bin.hstart && bin.wend > bin.wstart)) return (A)0;
  return (A)((bin.hend - bin.hstart) * (bin.wend - bin.wstart));
}

// The mean of a bin of a plane whose pixel (h, w) is plane[(h*width + w) *
// step], summed row by row as torchvision does; 0 for an empty bin.
template <typename T, typename A>
CUROI_DEVICE A ps_roi_pool_mean(const T* plane, int64_t width, int64_t step,
                                const PsRoiPoolBin& bin) {
  const A area = ps_roi_pool_area<A>(bin);
  if (!(area > (A)0)) return (A)0;
  A sum = (A)0;
  for (int64_t h = bin.hstart; h < bin.hend; ++h) {
    const T* row = plane + h * width * step;
    for (int64_t w = bin.wstart; w < bin.wend; ++w)
      sum += curoi_load<A>(row[w * step]);
  }
  return sum / area;
}

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// A thread per (box, bin, tile of output channels) (curoi_channel_tile,
// `groups` tiles a box): the box's image, the bin and its area are found
// once, then each output channel c of the tile reads input channel
// roi_input_channel(c, bin) (curoi_tile_at places them).

template <bool ChannelsLast, typename T>
CUROI_DEVICE void ps_roi_pool_forward_loop(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int64_t groups, T* output) {
  typedef typename AccType<T>::type A;
  const PsRoiChannels map = ps_roi_channels(pooled_height, pooled_width);
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t total = num_rois * pooled_height * pooled_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, out_channels, groups, pooled_height, pooled_width);
    const A* box = rois + t.k * 5;
    const int64_t b = curoi_box_batch(box, batch);
    PsRoiPoolBin bin = {0, 0, 0, 0};
    if (b >= 0)
      bin = ps_roi_pool_box_bin(box, spatial_scale, t.ph, t.pw, height, width,
                                pooled_height, pooled_width);
    const CuroiTileAt at = curoi_tile_at<ChannelsLast>(
        map, t, b, channels, height * width, pooled_height, pooled_width);
#pragma unroll 1
    for (int64_t i = 0; i < at.count; ++i) {
      const A value = ps_roi_pool_mean<T, A>(input + at.in + i * at.in_step,
                                             width, at.pixel_step, bin);
      output[at.out + i * at.out_step] = curoi_store<T>(value);
    }
  }
}

template <typename T>
CUROI_DEVICE void ps_roi_pool_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int channels_last, int64_t groups,
    T* output) {
  if (channels_last)
    ps_roi_pool_forward_loop<true>(input, rois, num_rois, batch, channels,
                                   height, width, pooled_height, pooled_width,
                                   spatial_scale, groups, output);
  else
    ps_roi_pool_forward_loop<false>(input, rois, num_rois, batch, channels,
                                    height, width, pooled_height,
                                    pooled_width, spatial_scale, groups,
                                    output);
}

// Each output gradient, over its bin's area, goes to every pixel of the bin;
// bins of different boxes overlap, so the adds go through Sum (CuroiFloatSum
// or the deterministic CuroiFixedSum), atomically. Tiled as the forward.
template <bool ChannelsLast, typename T, typename Sum>
CUROI_DEVICE void ps_roi_pool_backward_loop(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int64_t groups,
    const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const PsRoiChannels map = ps_roi_channels(pooled_height, pooled_width);
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t total = num_rois * pooled_height * pooled_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, out_channels, groups, pooled_height, pooled_width);
    const A* box = rois + t.k * 5;
    const int64_t b = curoi_box_batch(box, batch);
    if (b < 0) continue;
    const PsRoiPoolBin bin =
        ps_roi_pool_box_bin(box, spatial_scale, t.ph, t.pw, height, width,
                            pooled_height, pooled_width);
    const A area = ps_roi_pool_area<A>(bin);
    if (!(area > (A)0)) continue;
    const CuroiTileAt at = curoi_tile_at<ChannelsLast>(
        map, t, b, channels, height * width, pooled_height, pooled_width);
#pragma unroll 1
    for (int64_t i = 0; i < at.count; ++i) {
      const A grad = curoi_load<A>(grad_output[at.out + i * at.out_step]) / area;
      const int64_t plane = at.in + i * at.in_step;
      for (int64_t h = bin.hstart; h < bin.hend; ++h)
        for (int64_t w = bin.wstart; w < bin.wend; ++w)
          curoi_sum_add(grad_input, plane + (h * width + w) * at.pixel_step,
                        grad);
    }
  }
}

template <typename T, typename Sum>
CUROI_DEVICE void ps_roi_pool_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int channels_last,
    int64_t groups, const Sum& grad_input) {
  if (channels_last)
    ps_roi_pool_backward_loop<true>(grad_output, rois, num_rois, batch,
                                    channels, height, width, pooled_height,
                                    pooled_width, spatial_scale, groups,
                                    grad_input);
  else
    ps_roi_pool_backward_loop<false>(grad_output, rois, num_rois, batch,
                                     channels, height, width, pooled_height,
                                     pooled_width, spatial_scale, groups,
                                     grad_input);
}

#else
// ------------------------------------------------------------- CPU loops
#include <vector>

// The bins of a group of boxes (see CuroiItems), found once per work item
// and shared by all channels: per box its image (-1: reads nothing) and
// [start, end) of each row bin and each column bin.
struct PsRoiPoolGroup {
  int64_t image[CUROI_BOX_GROUP];
  std::vector<int64_t> rows, cols;
  int64_t pooled_height, pooled_width;

  template <typename A>
  void build(const A* rois, int64_t first, int64_t end, int64_t batch,
             int64_t height, int64_t width, int64_t ph_count,
             int64_t pw_count, A spatial_scale) {
    pooled_height = ph_count;
    pooled_width = pw_count;
    rows.resize((size_t)(CUROI_BOX_GROUP * 2 * pooled_height));
    cols.resize((size_t)(CUROI_BOX_GROUP * 2 * pooled_width));
    for (int64_t k = first; k < end; ++k) {
      const A* box = rois + k * 5;
      const int64_t i = k - first;
      image[i] = curoi_box_batch(box, batch);
      if (image[i] < 0) continue;
      int64_t* r = rows.data() + i * 2 * pooled_height;
      int64_t* q = cols.data() + i * 2 * pooled_width;
      for (int64_t ph = 0; ph < pooled_height; ++ph)
        ps_roi_pool_bin(box[2], box[4], spatial_scale, ph, pooled_height,
                        height, &r[2 * ph], &r[2 * ph + 1]);
      for (int64_t pw = 0; pw < pooled_width; ++pw)
        ps_roi_pool_bin(box[1], box[3], spatial_scale, pw, pooled_width,
                        width, &q[2 * pw], &q[2 * pw + 1]);
    }
  }

  // Bin (ph, pw) of the group's i-th box.
  PsRoiPoolBin bin(int64_t i, int64_t ph, int64_t pw) const {
    const int64_t* r = rows.data() + i * 2 * pooled_height + 2 * ph;
    const int64_t* q = cols.data() + i * 2 * pooled_width + 2 * pw;
    PsRoiPoolBin b;
    b.hstart = r[0];
    b.hend = r[1];
    b.wstart = q[0];
    b.wend = q[1];
    return b;
  }
};

// Every bin of boxes k0 .. k1-1 in output channels c0 .. c1-1.
template <typename T, typename A>
static void ps_roi_pool_forward_nchw(const T* input,
                                     const PsRoiPoolGroup& group, int64_t k0,
                                     int64_t k1, int64_t c0, int64_t c1,
                                     int64_t channels, int64_t height,
                                     int64_t width, int64_t pooled_height,
                                     int64_t pooled_width, T* output) {
  const PsRoiChannels map = ps_roi_channels(pooled_height, pooled_width);
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t bins = map.bins, plane_size = height * width;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t b = group.image[k - k0];
    for (int64_t c = c0; c < c1; ++c) {
      T* out = output + (k * out_channels + c) * bins;
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        for (int64_t pw = 0; pw < pooled_width; ++pw) {
          const int64_t at = ph * pooled_width + pw;
          A value = (A)0;
          if (b >= 0)
            value = ps_roi_pool_mean<T, A>(
                input + (b * channels + roi_input_channel(map, c, at)) *
                            plane_size,
                width, 1, group.bin(k - k0, ph, pw));
          out[at] = curoi_store<T>(value);
        }
      }
    }
  }
}

// Channels-last: the same, the channel innermost. Each channel's sum runs
// ps_roi_pool_mean's operations in its order (row by row), so the results
// are the NCHW loop's bits.
template <typename T, typename A>
static void ps_roi_pool_forward_nhwc(const T* input,
                                     const PsRoiPoolGroup& group, int64_t k0,
                                     int64_t k1, int64_t c0, int64_t c1,
                                     int64_t channels, int64_t height,
                                     int64_t width, int64_t pooled_height,
                                     int64_t pooled_width, T* output,
                                     A* __restrict__ sum) {
  const PsRoiChannels map = ps_roi_channels(pooled_height, pooled_width);
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t bins = map.bins, n = c1 - c0;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t b = group.image[k - k0];
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const int64_t at = ph * pooled_width + pw;
        T* out = output + (k * bins + at) * out_channels + c0;
        const PsRoiPoolBin bin =
            b >= 0 ? group.bin(k - k0, ph, pw) : PsRoiPoolBin{0, 0, 0, 0};
        const A area = ps_roi_pool_area<A>(bin);
        if (!(area > (A)0)) {
          for (int64_t c = 0; c < n; ++c) out[c] = curoi_store<T>((A)0);
          continue;
        }
        const T* image = input + b * height * width * channels +
                         roi_input_channel(map, c0, at);
        for (int64_t c = 0; c < n; ++c) sum[c] = (A)0;
        for (int64_t h = bin.hstart; h < bin.hend; ++h) {
          for (int64_t w = bin.wstart; w < bin.wend; ++w) {
            const T* pixel = image + (h * width + w) * channels;
            for (int64_t c = 0; c < n; ++c)
              sum[c] += curoi_load<A>(pixel[c * bins]);
          }
        }
        for (int64_t c = 0; c < n; ++c) out[c] = curoi_store<T>(sum[c] / area);
      }
    }
  }
}

// Work items of box groups and output-channel blocks (CuroiItems); a box's
// bins are found once per item and shared by its channels. `groups`, the
// GPU launch's channel tiles, means nothing to these loops.
template <typename T>
static void ps_roi_pool_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int channels_last,
    int64_t /* groups */, T* output) {
  typedef typename AccType<T>::type A;
  const PsRoiChannels map = ps_roi_channels(pooled_height, pooled_width);
  const CuroiItems items =
      curoi_items(num_rois, roi_output_channels(map, channels));
  const int64_t cost = CUROI_BOX_GROUP * items.block * map.bins * 4;
  curoi_parallel_for(items.count(), 1, cost, [&](int64_t item) {
    static thread_local PsRoiPoolGroup group;
    const int64_t k0 = items.first_box(item), k1 = items.end_box(item);
    const int64_t c0 = items.first_channel(item), c1 = items.end_channel(item);
    group.build(rois, k0, k1, batch, height, width, pooled_height,
                pooled_width, spatial_scale);
    if (channels_last) {
      static thread_local std::vector<A> sum;
      sum.resize((size_t)(c1 - c0));
      ps_roi_pool_forward_nhwc<T, A>(input, group, k0, k1, c0, c1, channels,
                                     height, width, pooled_height,
                                     pooled_width, output, sum.data());
    } else {
      ps_roi_pool_forward_nchw<T, A>(input, group, k0, k1, c0, c1, channels,
                                     height, width, pooled_height,
                                     pooled_width, output);
    }
  });
}

// The gradient of every bin of boxes k0 .. k1-1 in output channels
// c0 .. c1-1. An input channel feeds one output channel and one bin, so each
// gradient pixel receives its terms box after box, in either layout and
// whatever the blocks: the same bits on any number of threads, and in NHWC
// the NCHW bits transposed.
template <typename T, typename A, typename Sum>
static void ps_roi_pool_backward_block(const T* grad_output,
                                       const PsRoiPoolGroup& group,
                                       int64_t k0, int64_t k1, int64_t c0,
                                       int64_t c1, int64_t channels,
                                       int64_t height, int64_t width,
                                       int64_t pooled_height,
                                       int64_t pooled_width,
                                       int channels_last,
                                       const Sum& grad_input,
                                       A* __restrict__ grad) {
  const PsRoiChannels map = ps_roi_channels(pooled_height, pooled_width);
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t bins = map.bins, plane_size = height * width;
  const int64_t n = c1 - c0;
  // Where pixel (h, w) of input channel ci lies: image + ci * channel_step +
  // (h * width + w) * pixel_step.
  const int64_t channel_step = channels_last ? 1 : plane_size;
  const int64_t pixel_step = channels_last ? channels : 1;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t b = group.image[k - k0];
    if (b < 0) continue;
    const int64_t image = b * channels * plane_size;
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const int64_t at = ph * pooled_width + pw;
        const PsRoiPoolBin bin = group.bin(k - k0, ph, pw);
        const A area = ps_roi_pool_area<A>(bin);
        if (!(area > (A)0)) continue;
        for (int64_t c = 0; c < n; ++c) {
          const int64_t o = channels_last
                                ? (k * bins + at) * out_channels + c0 + c
                                : (k * out_channels + c0 + c) * bins + at;
          grad[c] = curoi_load<A>(grad_output[o]) / area;
        }
        const int64_t first =
            image + roi_input_channel(map, c0, at) * channel_step;
        const int64_t lane = bins * channel_step;
        for (int64_t h = bin.hstart; h < bin.hend; ++h) {
          for (int64_t w = bin.wstart; w < bin.wend; ++w) {
            const int64_t pixel = first + (h * width + w) * pixel_step;
            for (int64_t c = 0; c < n; ++c)
              curoi_sum_add(grad_input, pixel + c * lane, grad[c]);
          }
        }
      }
    }
  }
}

// Box group after box group (bins found by the calling thread), blocks of
// output channels handed out dynamically; a block's input channels are its
// own, so no two threads add into one pixel: no atomics. `groups` is the
// GPU launch's, as in the forward.
template <typename T, typename Sum>
static void ps_roi_pool_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_rois, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int channels_last,
    int64_t /* groups */, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const PsRoiChannels map = ps_roi_channels(pooled_height, pooled_width);
  const int64_t out_channels = roi_output_channels(map, channels);
  int64_t block =
      (out_channels + 4 * curoi_threads() - 1) / (4 * curoi_threads());
  if (block < 1) block = 1;  // no channels: no blocks, and no division by 0
  const int64_t blocks = (out_channels + block - 1) / block;
  const int64_t cost = CUROI_BOX_GROUP * block * map.bins * 4;
  // A reference: in a worker, a thread_local's name means the worker's own.
  static thread_local PsRoiPoolGroup callers_group;
  PsRoiPoolGroup& group = callers_group;
  for (int64_t k0 = 0; k0 < num_rois; k0 += CUROI_BOX_GROUP) {
    const int64_t k1 = curoi_min(k0 + (int64_t)CUROI_BOX_GROUP, num_rois);
    group.build(rois, k0, k1, batch, height, width, pooled_height,
                pooled_width, spatial_scale);
    curoi_parallel_for(blocks, 1, cost, [&](int64_t i) {
      const int64_t c0 = i * block, c1 = curoi_min(c0 + block, out_channels);
      static thread_local std::vector<A> grad;
      grad.resize((size_t)(c1 - c0));
      ps_roi_pool_backward_block<T, A>(grad_output, group, k0, k1, c0, c1,
                                       channels, height, width, pooled_height,
                                       pooled_width, channels_last,
                                       grad_input, grad.data());
    });
  }
}
#endif

// The gradient of an input pixel sums, per box, one bin's grad / area: so
// |sum| <= K * max|g|, the bound the fixed-point sum needs (terms =
// num_rois).
#define CUROI_DEFINE_PS_ROI_POOL(T, suffix)                                    \
  CUROI_KERNEL void ps_roi_pool_forward_##suffix(                              \
      const T* input, const AccType<T>::type* rois, int64_t num_rois,          \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int channels_last, int64_t groups,       \
      T* output) {                                                             \
    ps_roi_pool_forward<T>(input, rois, num_rois, batch, channels, height,     \
                           width, pooled_height, pooled_width, spatial_scale,  \
                           channels_last, groups, output);                     \
  }                                                                            \
  CUROI_KERNEL void ps_roi_pool_backward_##suffix(                             \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_rois,    \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int channels_last, int64_t groups,       \
      AccType<T>::type* grad_input) {                                          \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_input;                                                     \
    ps_roi_pool_backward<T>(grad_output, rois, num_rois, batch, channels,      \
                            height, width, pooled_height, pooled_width,        \
                            spatial_scale, channels_last, groups, sum);        \
  }                                                                            \
  CUROI_KERNEL void ps_roi_pool_backward_fixed_##suffix(                       \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_rois,    \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int channels_last, int64_t groups,       \
      const double* max_abs, int64_t* fixed, AccType<T>::type* grad_input) {   \
    ps_roi_pool_backward<T>(grad_output, rois, num_rois, batch, channels,      \
                            height, width, pooled_height, pooled_width,        \
                            spatial_scale, channels_last, groups,              \
                            curoi_fixed_sum(grad_input, fixed, max_abs,        \
                                            num_rois));                        \
  }                                                                            \
  CUROI_KERNEL void ps_roi_pool_fixed_finish_##suffix(                         \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_input) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_input);              \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_PS_ROI_POOL)
