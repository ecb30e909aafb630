// RoI max pooling, forward and backward.
//
// Two conventions for where a box's bins lie on the feature map:
//   torchvision (Caffe, ONNX MaxRoiPool): box corners rounded to whole pixels,
//     x2/y2 inclusive, bins floor(p*bin)..ceil((p+1)*bin) from the rounded start;
//   mmcv (mmdetection): continuous corners x1*s and (x2+1)*s, bins
//     floor(p*bin + start)..ceil((p+1)*bin + start).
// Both clip bins to the map. An empty bin gives 0 with argmax -1.
// The forward kernel's argmax may be null: then only the maxima are written.
// Its entries are int64, or int32 when the kernels' argmax_32 is 1 (as
// torchvision keeps them): half the memory the backward has to read, which
// is most of the backward's time.
//
// argmax is the flat index h*W + w inside the feature plane of the maximum,
// the first one in row-major order on ties. A NaN counts as larger than any
// number (as in numpy.argmax and torch.max), so NaNs propagate.
// The bins and the maximum of a bin are in roi_pool_bins.cuh.
#include "roi_pool_bins.cuh"

// Where the forward writes its argmax: nowhere (data null), or int64 or
// int32 entries.
struct RoiPoolArgmax {
  void* data;
  int narrow;  // 1: int32 entries
};

CUROI_DEVICE void roi_pool_store_argmax(const RoiPoolArgmax& argmax, int64_t i,
                                        int64_t where) {
  if (argmax.narrow)
    static_cast<int32_t*>(argmax.data)[i] = (int32_t)where;
  else
    static_cast<int64_t*>(argmax.data)[i] = where;
}

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// Forward: a thread per (box, bin, tile of channels) (curoi_channel_tile):
// the box's image and the bin's limits are found once, then each channel of
// the tile is one bin maximum. `groups` tiles split a box's channels.
template <bool ChannelsLast, typename T>
CUROI_DEVICE void roi_pool_forward_loop(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int convention, int64_t groups,
    T* output, RoiPoolArgmax argmax) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_rois * pooled_height * pooled_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, channels, groups, pooled_height, pooled_width);
    const A* box = rois + t.k * 5;
    const int64_t b = roi_pool_box(box, batch, spatial_scale, convention);
    int64_t hstart = 0, hend = 0, wstart = 0, wend = 0;
    if (b >= 0) {
      roi_pool_bin(box[2], box[4], spatial_scale, t.ph, pooled_height, height,
                   convention, &hstart, &hend);
      roi_pool_bin(box[1], box[3], spatial_scale, t.pw, pooled_width, width,
                   convention, &wstart, &wend);
    }
    const CuroiTileAt at = curoi_tile_at<ChannelsLast>(
        CuroiSameChannel(), t, b, channels, height * width, pooled_height,
        pooled_width);
#pragma unroll 1
    for (int64_t i = 0; i < at.count; ++i) {
      int64_t best_index = -1;
      A best = (A)0;
      if (b >= 0)
        best = roi_pool_max<T, A>(input + at.in + i * at.in_step, width,
                                  at.pixel_step, hstart, hend, wstart, wend,
                                  &best_index);
      const int64_t out = at.out + i * at.out_step;
      output[out] = curoi_store<T>(best);
      if (argmax.data) roi_pool_store_argmax(argmax, out, best_index);
    }
  }
}

template <typename T>
CUROI_DEVICE void roi_pool_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int convention,
    int channels_last, int64_t groups, T* output, RoiPoolArgmax argmax) {
  if (channels_last)
    roi_pool_forward_loop<true>(input, rois, num_rois, batch, channels,
                                height, width, pooled_height, pooled_width,
                                spatial_scale, convention, groups, output,
                                argmax);
  else
    roi_pool_forward_loop<false>(input, rois, num_rois, batch, channels,
                                 height, width, pooled_height, pooled_width,
                                 spatial_scale, convention, groups, output,
                                 argmax);
}

// The gradient flows to the argmax of each bin; several bins (and boxes) may
// share one, so the adds go through Sum (CuroiFloatSum or the deterministic
// CuroiFixedSum), atomically. The gradient has the accumulation type.
template <bool ChannelsLast, typename I, typename T, typename Sum>
CUROI_DEVICE void roi_pool_backward_loop(
    const T* grad_output, const I* argmax,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_rois * channels * pooled_height * pooled_width;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiOutputIndex at = curoi_output_at<ChannelsLast>(
        index, total, channels, pooled_height, pooled_width);
    const int64_t b = curoi_box_batch(rois + at.k * 5, batch);
    const int64_t where = argmax[index];
    // argmax comes from the caller: never trust it to lie in the plane.
    if (b >= 0 && where >= 0 && where < height * width) {
      const CuroiPlane p =
          curoi_plane<ChannelsLast>(b, at.c, channels, height * width);
      curoi_sum_add(grad_input, p.at + where * p.step,
                    curoi_load<A>(grad_output[index]));
    }
  }
}

template <typename I, typename T, typename Sum>
CUROI_DEVICE void roi_pool_backward_indexed(
    const T* grad_output, const I* argmax,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, int channels_last, const Sum& grad_input) {
  if (channels_last)
    roi_pool_backward_loop<true>(grad_output, argmax, rois, num_rois, batch,
                                 channels, height, width, pooled_height,
                                 pooled_width, grad_input);
  else
    roi_pool_backward_loop<false>(grad_output, argmax, rois, num_rois, batch,
                                  channels, height, width, pooled_height,
                                  pooled_width, grad_input);
}

#else
// ------------------------------------------------------------- CPU loops
#include <vector>

// The maximum of one bin and its first position, for the CPU, with the
// rules of roi_pool_max. Written so that the compiler turns the comparison
// into branch-free selects: bins are a few pixels, and a mispredicted branch
// per new maximum would cost more than the reads (measured: 2.5x). The scan
// starts below every number, so an all -inf bin ends with no position and
// takes its first pixel; NaNs are only detected (v * 0 is NaN for NaN and
// infinite v), and a bin with one is searched again for the first NaN.
template <typename T, typename A>
static inline A roi_pool_max_cpu(const T* plane, int64_t width, int64_t hstart,
                                 int64_t hend, int64_t wstart, int64_t wend,
                                 int64_t* best_index) {
  A best = -(A)INFINITY;
  int64_t where = -1;
  A poison = (A)0;
  for (int64_t h = hstart; h < hend; ++h) {
    for (int64_t w = wstart; w < wend; ++w) {
      const A v = curoi_load<A>(plane[h * width + w]);
      poison += v * (A)0;
      if (v > best) {
        best = v;
        where = h * width + w;
      }
    }
  }
  if (poison != poison) {
    for (int64_t h = hstart; h < hend; ++h)
      for (int64_t w = wstart; w < wend; ++w) {
        const A v = curoi_load<A>(plane[h * width + w]);
        if (v != v) {
          *best_index = h * width + w;
          return v;
        }
      }
  }
  if (where < 0) {
    if (!(hend > hstart && wend > wstart)) {
      *best_index = -1;
      return (A)0;
    }
    where = hstart * width + wstart;
    best = curoi_load<A>(plane[where]);
  }
  *best_index = where;
  return best;
}

// roi_pool_max_cpu's second look at a bin, for a channel whose pixel
// (h, w) is pixel[(h * width + w) * stride]: with `nan`, the first NaN if
// there is one; otherwise (or if the NaN detector fired on infinities
// alone) the first position above -inf, which the caller found to be
// none: the first pixel, or 0 at -1 for an empty bin.
template <typename T, typename A>
static A roi_pool_max_lanes_again(const T* pixel, int64_t width,
                                  int64_t stride, int64_t hstart, int64_t hend,
                                  int64_t wstart, int64_t wend, bool nan,
                                  int64_t* best_index) {
  A best = -(A)INFINITY;
  int64_t where = -1;
  for (int64_t h = hstart; h < hend; ++h)
    for (int64_t w = wstart; w < wend; ++w) {
      const A v = curoi_load<A>(pixel[(h * width + w) * stride]);
      if (nan && v != v) {
        *best_index = h * width + w;
        return v;
      }
      if (v > best) {
        best = v;
        where = h * width + w;
      }
    }
  if (where < 0) {
    if (!(hend > hstart && wend > wstart)) {
      *best_index = -1;
      return (A)0;
    }
    where = hstart * width + wstart;
    best = curoi_load<A>(pixel[where * stride]);
  }
  *best_index = where;
  return best;
}

// roi_pool_max_cpu for two channels at once: two independent chains of
// comparisons, interleaved, where one would wait on its own. Written out with
// scalars: the compiler keeps the same code in arrays out of registers and
// loses the selects (measured 4x slower).
template <typename T, typename A>
static inline void roi_pool_max_cpu_pair(const T* plane0, const T* plane1,
                                         int64_t width, int64_t hstart,
                                         int64_t hend, int64_t wstart,
                                         int64_t wend, A* best,
                                         int64_t* best_index) {
  A best0 = -(A)INFINITY, best1 = -(A)INFINITY;
  int64_t where0 = -1, where1 = -1;
  A poison0 = (A)0, poison1 = (A)0;
  for (int64_t h = hstart; h < hend; ++h) {
    for (int64_t w = wstart; w < wend; ++w) {
      const int64_t at = h * width + w;
      const A v0 = curoi_load<A>(plane0[at]);
      const A v1 = curoi_load<A>(plane1[at]);
      poison0 += v0 * (A)0;
      poison1 += v1 * (A)0;
      if (v0 > best0) {
        best0 = v0;
        where0 = at;
      }
      if (v1 > best1) {
        best1 = v1;
        where1 = at;
      }
    }
  }
  // NaNs and all -inf (or empty) bins: the one-channel rules.
  if (poison0 != poison0 || where0 < 0)
    best0 = roi_pool_max_cpu<T, A>(plane0, width, hstart, hend, wstart, wend,
                                   &where0);
  if (poison1 != poison1 || where1 < 0)
    best1 = roi_pool_max_cpu<T, A>(plane1, width, hstart, hend, wstart, wend,
                                   &where1);
  best[0] = best0;
  best[1] = best1;
  best_index[0] = where0;
  best_index[1] = where1;
}

// Every bin of boxes k0 .. k1-1 in channels c .. c + pair (one channel, or
// two with pair), from the group's tables (batch index, row bins, column
// bins per box).
template <bool pair, typename T, typename A>
static void roi_pool_forward_channels(
    const T* input, int64_t k0, int64_t k1, int64_t c,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, const int64_t* image, const int64_t* rows,
    const int64_t* cols, T* output, RoiPoolArgmax argmax) {
  const int64_t bins = pooled_height * pooled_width;
  constexpr int64_t count = pair ? 2 : 1;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t i = k - k0;
    const int64_t first = (k * channels + c) * bins;
    T* out = output + first;
    if (image[i] < 0) {
      for (int64_t j = 0; j < count * bins; ++j) out[j] = curoi_store<T>((A)0);
      if (argmax.data)
        for (int64_t j = 0; j < count * bins; ++j) roi_pool_store_argmax(argmax, first + j, -1);
      continue;
    }
    const T* plane = input + (image[i] * channels + c) * height * width;
    const int64_t* r = rows + i * 2 * pooled_height;
    const int64_t* q = cols + i * 2 * pooled_width;
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const int64_t bin = ph * pooled_width + pw;
        A best[2];
        int64_t where[2];
        if constexpr (pair) {
          roi_pool_max_cpu_pair<T, A>(plane, plane + height * width, width,
                                      r[2 * ph], r[2 * ph + 1], q[2 * pw],
                                      q[2 * pw + 1], best, where);
        } else {
          best[0] = roi_pool_max_cpu<T, A>(plane, width, r[2 * ph],
                                           r[2 * ph + 1], q[2 * pw],
                                           q[2 * pw + 1], &where[0]);
        }
        for (int64_t u = 0; u < count; ++u) {
          out[u * bins + bin] = curoi_store<T>(best[u]);
          if (argmax.data) roi_pool_store_argmax(argmax, first + u * bins + bin, where[u]);
        }
      }
    }
  }
}

// A flat position h * W + w in an integer as wide as A (int32 for float,
// int64 for double), so that the selects of roi_pool_max_lanes vectorise
// lane for lane. A plane of 2^31 pixels or more takes int64 in any case.
template <typename A>
struct RoiPoolPosition {
  typedef int64_t type;
};
template <>
struct RoiPoolPosition<float> {
  typedef int32_t type;
};

// The maximum of one bin and its first position in n channels at once: the
// pixel (h, w) of lane u is pixels[(h * width + w) * stride + u] (channels-
// last, or a channels-last copy of NCHW planes). The rules of
// roi_pool_max_cpu, channel by channel: the same scan order, strict >, the
// same NaN detector, and the same second look for the rare lane with a NaN
// or with no number above -inf (or an empty bin). The lanes are the
// innermost loop: selects the compiler vectorises.
template <typename T, typename A, typename P>
static void roi_pool_max_lanes(const T* pixels, int64_t width, int64_t stride,
                               int64_t n, int64_t hstart, int64_t hend,
                               int64_t wstart, int64_t wend,
                               A* __restrict__ best, P* __restrict__ where,
                               A* __restrict__ poison) {
  for (int64_t u = 0; u < n; ++u) {
    best[u] = -(A)INFINITY;
    where[u] = -1;
    poison[u] = (A)0;
  }
  for (int64_t h = hstart; h < hend; ++h) {
    for (int64_t w = wstart; w < wend; ++w) {
      const P at = (P)(h * width + w);
      const T* __restrict__ pixel = pixels + (h * width + w) * stride;
      for (int64_t u = 0; u < n; ++u) {
        const A v = curoi_load<A>(pixel[u]);
        poison[u] += v * (A)0;
        const A b = best[u];
        // The position through a mask: GCC leaves a select of it a branch,
        // and the loop scalar.
        const P larger = -(P)(v > b);
        best[u] = v > b ? v : b;
        where[u] = (where[u] & ~larger) | (at & larger);
      }
    }
  }
  for (int64_t u = 0; u < n; ++u) {
    if (poison[u] == poison[u] && where[u] >= 0) continue;
    int64_t position = -1;
    best[u] = roi_pool_max_lanes_again<T, A>(pixels + u, width, stride, hstart,
                                             hend, wstart, wend,
                                             poison[u] != poison[u], &position);
    where[u] = (P)position;
  }
}

// Channels-last: every bin of boxes k0 .. k1-1 in channels c0 .. c1-1, all
// channels of a bin at once (roi_pool_max_lanes).
template <typename T, typename A, typename P>
static void roi_pool_forward_nhwc(
    const T* input, int64_t k0, int64_t k1, int64_t c0, int64_t c1,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, const int64_t* image, const int64_t* rows,
    const int64_t* cols, T* output, RoiPoolArgmax argmax, A* best, P* where,
    A* poison) {
  const int64_t bins = pooled_height * pooled_width;
  const int64_t n = c1 - c0;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t i = k - k0;
    const int64_t box_first = k * bins * channels + c0;
    T* out_box = output + box_first;
    if (image[i] < 0) {
      for (int64_t bin = 0; bin < bins; ++bin) {
        for (int64_t c = 0; c < n; ++c)
          out_box[bin * channels + c] = curoi_store<T>((A)0);
        if (argmax.data)
          for (int64_t c = 0; c < n; ++c)
            roi_pool_store_argmax(argmax, box_first + bin * channels + c, -1);
      }
      continue;
    }
    const T* pixels = input + image[i] * height * width * channels + c0;
    const int64_t* r = rows + i * 2 * pooled_height;
    const int64_t* q = cols + i * 2 * pooled_width;
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        roi_pool_max_lanes<T, A, P>(pixels, width, channels, n, r[2 * ph],
                                    r[2 * ph + 1], q[2 * pw], q[2 * pw + 1],
                                    best, where, poison);
        const int64_t bin = ph * pooled_width + pw;
        T* out = out_box + bin * channels;
        for (int64_t c = 0; c < n; ++c) out[c] = curoi_store<T>(best[c]);
        if (argmax.data)
          for (int64_t c = 0; c < n; ++c)
            roi_pool_store_argmax(argmax, box_first + bin * channels + c,
                                  (int64_t)where[c]);
      }
    }
  }
}

// Each box's batch index (-1: reads nothing), then [start, end) of each row
// bin and each column bin, for boxes k0 .. k1-1, at i = k - k0.
template <typename A>
static void roi_pool_tables(const A* rois, int64_t k0, int64_t k1,
                            int64_t batch, int64_t height, int64_t width,
                            int64_t pooled_height, int64_t pooled_width,
                            A spatial_scale, int convention, int64_t* image,
                            int64_t* rows, int64_t* cols) {
  for (int64_t k = k0; k < k1; ++k) {
    const A* box = rois + k * 5;
    const int64_t i = k - k0;
    image[i] = roi_pool_box(box, batch, spatial_scale, convention);
    if (image[i] < 0) continue;
    int64_t* r = rows + i * 2 * pooled_height;
    int64_t* q = cols + i * 2 * pooled_width;
    for (int64_t ph = 0; ph < pooled_height; ++ph)
      roi_pool_bin(box[2], box[4], spatial_scale, ph, pooled_height, height,
                   convention, &r[2 * ph], &r[2 * ph + 1]);
    for (int64_t pw = 0; pw < pooled_width; ++pw)
      roi_pool_bin(box[1], box[3], spatial_scale, pw, pooled_width, width,
                   convention, &q[2 * pw], &q[2 * pw + 1]);
  }
}

// NCHW through a channels-last copy: the planes of CUROI_POOL_LANES
// channels, all images, gathered into copy[(b * H * W + pixel) * lanes + u]
// (a few hundred KB that stay in L2), then every bin of every box in those
// channels at once (roi_pool_max_lanes, vectorised over the lanes), where
// the planes would take one scalar scan per channel. The same rules, so the
// same maxima and positions. Used when the boxes' bins outnumber the pixels
// copied, and the copy fits CUROI_POOL_COPY_BYTES.
// 16 lanes: W1's forward (1 thread) 0.74x the time of the per-channel
// scans, against 1.4x with 8 lanes (the compiler keeps 8 in memory) and
// 0.77x with 32.
#define CUROI_POOL_LANES 16
#define CUROI_POOL_COPY_BYTES (16 << 20)

template <typename T, typename A, typename P>
static void roi_pool_forward_copied(
    const T* input, int64_t num_rois, int64_t batch, int64_t channels,
    int64_t height, int64_t width, int64_t pooled_height, int64_t pooled_width,
    const int64_t* image, const int64_t* rows, const int64_t* cols, T* output,
    RoiPoolArgmax argmax) {
  constexpr int L = CUROI_POOL_LANES;
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  const int64_t blocks = (channels + L - 1) / L;
  curoi_parallel_for(blocks, 1, num_rois * bins * L * 4, [&](int64_t block) {
    static thread_local std::vector<T> copy;
    copy.resize((size_t)(batch * plane_size * L));
    const int64_t c = block * L, n = curoi_min((int64_t)L, channels - c);
    for (int64_t b = 0; b < batch; ++b) {
      const T* planes = input + (b * channels + c) * plane_size;
      T* pixels = copy.data() + b * plane_size * L;
      for (int64_t p = 0; p < plane_size; ++p)
        for (int u = 0; u < L; ++u)
          pixels[p * L + u] = u < n ? planes[u * plane_size + p]
                                    : curoi_store<T>((A)0);
    }
    A best[L], poison[L];
    P where[L];
    for (int64_t k = 0; k < num_rois; ++k) {
      const int64_t first = (k * channels + c) * bins;
      if (image[k] < 0) {
        for (int64_t u = 0; u < n; ++u)
          for (int64_t bin = 0; bin < bins; ++bin) {
            output[first + u * bins + bin] = curoi_store<T>((A)0);
            if (argmax.data)
              roi_pool_store_argmax(argmax, first + u * bins + bin, -1);
          }
        continue;
      }
      const T* pixels = copy.data() + image[k] * plane_size * L;
      const int64_t* r = rows + k * 2 * pooled_height;
      const int64_t* q = cols + k * 2 * pooled_width;
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        for (int64_t pw = 0; pw < pooled_width; ++pw) {
          roi_pool_max_lanes<T, A, P>(pixels, width, L, L, r[2 * ph],
                                      r[2 * ph + 1], q[2 * pw], q[2 * pw + 1],
                                      best, where, poison);
          const int64_t at = first + ph * pooled_width + pw;
          for (int64_t u = 0; u < n; ++u) {
            output[at + u * bins] = curoi_store<T>(best[u]);
            if (argmax.data)
              roi_pool_store_argmax(argmax, at + u * bins, (int64_t)where[u]);
          }
        }
      }
    }
  });
}

// Work items of box groups and channel blocks (CuroiItems); a box's bins
// are found once per item and shared by its channels. NCHW with many boxes
// goes through roi_pool_forward_copied instead. `groups`, the GPU launch's
// channel tiles, means nothing to these loops.
template <typename T>
static void roi_pool_forward(
    const T* input, const typename AccType<T>::type* rois, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t pooled_height, int64_t pooled_width,
    typename AccType<T>::type spatial_scale, int convention,
    int channels_last, int64_t /* groups */, T* output, RoiPoolArgmax argmax) {
  typedef typename AccType<T>::type A;
  const int64_t bins = pooled_height * pooled_width;
  const bool wide = height * width > (int64_t)0x7fffffff;
  if (!channels_last && num_rois * bins >= batch * height * width &&
      batch * height * width <=
          CUROI_POOL_COPY_BYTES / (CUROI_POOL_LANES * (int64_t)sizeof(T))) {
    static thread_local std::vector<int64_t> callers_image, callers_rows,
        callers_cols;
    std::vector<int64_t>& image = callers_image;
    std::vector<int64_t>& rows = callers_rows;
    std::vector<int64_t>& cols = callers_cols;
    image.resize((size_t)num_rois);
    rows.resize((size_t)(num_rois * 2 * pooled_height));
    cols.resize((size_t)(num_rois * 2 * pooled_width));
    roi_pool_tables(rois, 0, num_rois, batch, height, width, pooled_height,
                    pooled_width, spatial_scale, convention, image.data(),
                    rows.data(), cols.data());
    // The copy's limit keeps its planes far below 2^31 pixels.
    roi_pool_forward_copied<T, A, typename RoiPoolPosition<A>::type>(
        input, num_rois, batch, channels, height, width, pooled_height,
        pooled_width, image.data(), rows.data(), cols.data(), output, argmax);
    return;
  }
  const CuroiItems items = curoi_items(num_rois, channels);
  const int64_t cost = CUROI_BOX_GROUP * items.block * bins * 4;
  curoi_parallel_for(items.count(), 1, cost, [&](int64_t item) {
    // Per box of the group: its batch index, then [start, end) of each row
    // bin and each column bin.
    static thread_local std::vector<int64_t> image, rows, cols;
    const int64_t k0 = items.first_box(item), k1 = items.end_box(item);
    image.resize(CUROI_BOX_GROUP);
    rows.resize(CUROI_BOX_GROUP * 2 * pooled_height);
    cols.resize(CUROI_BOX_GROUP * 2 * pooled_width);
    roi_pool_tables(rois, k0, k1, batch, height, width, pooled_height,
                    pooled_width, spatial_scale, convention, image.data(),
                    rows.data(), cols.data());
    if (channels_last) {
      const int64_t c0 = items.first_channel(item), c1 = items.end_channel(item);
      if (wide) {
        static thread_local std::vector<A> best, poison;
        static thread_local std::vector<int64_t> where;
        best.resize((size_t)(c1 - c0));
        poison.resize((size_t)(c1 - c0));
        where.resize((size_t)(c1 - c0));
        roi_pool_forward_nhwc<T, A, int64_t>(
            input, k0, k1, c0, c1, channels, height, width, pooled_height,
            pooled_width, image.data(), rows.data(), cols.data(), output,
            argmax, best.data(), where.data(), poison.data());
      } else {
        typedef typename RoiPoolPosition<A>::type P;
        static thread_local std::vector<A> best, poison;
        static thread_local std::vector<P> where;
        best.resize((size_t)(c1 - c0));
        poison.resize((size_t)(c1 - c0));
        where.resize((size_t)(c1 - c0));
        roi_pool_forward_nhwc<T, A, P>(
            input, k0, k1, c0, c1, channels, height, width, pooled_height,
            pooled_width, image.data(), rows.data(), cols.data(), output,
            argmax, best.data(), where.data(), poison.data());
      }
      return;
    }
    const int64_t c1 = items.end_channel(item);
    int64_t c = items.first_channel(item);
    for (; c + 1 < c1; c += 2)
      roi_pool_forward_channels<true, T, A>(
          input, k0, k1, c, channels, height, width, pooled_height,
          pooled_width, image.data(), rows.data(), cols.data(), output, argmax);
    if (c < c1)
      roi_pool_forward_channels<false, T, A>(
          input, k0, k1, c, channels, height, width, pooled_height,
          pooled_width, image.data(), rows.data(), cols.data(), output, argmax);
  });
}

// One box's bins in channels c .. c+U-1: argmax[u * bins + j] and
// grad[u * bins + j] go to the plane of sums[u]. The U planes' adds are
// interleaved, bin after bin: where bins share a maximum each add waits on
// the one before it, and independent chains overlap those waits. Out of
// line, so that the loop keeps its few pointers in registers (inlined,
// the addresses were rebuilt from the plane offsets each time and values
// spilled).
template <int U, typename I, typename T, typename Sum>
static CUROI_NOINLINE void roi_pool_scatter_bins(const I* __restrict__ argmax,
                                                 const T* __restrict__ grad,
                                                 int64_t bins,
                                                 int64_t plane_size,
                                                 const Sum* sums) {
  typedef typename AccType<T>::type A;
  Sum sum[U];
  for (int u = 0; u < U; ++u) sum[u] = sums[u];
  for (int64_t j = 0; j < bins; ++j) {
    for (int u = 0; u < U; ++u) {
      const int64_t where = argmax[u * bins + j];
      // argmax comes from the caller: never trust it to lie in the plane.
      if ((uint64_t)where < (uint64_t)plane_size)
        curoi_sum_add(sum[u], where, curoi_load<A>(grad[u * bins + j]));
    }
  }
}

// Bytes of gradient planes that a block of channels adds into (all images'
// planes of its channels): a quarter of a 2 MB L2, so that they stay there
// while the block's argmax and gradient rows stream past. W1 (NCHW, 1
// thread): 13.2 ms against 14.3 ms with 128 KB, 21.2 ms with the earlier
// blocks of a quarter of the channels.
#define CUROI_POOL_SCATTER_BYTES (512 * 1024)

// Blocks of channels handed out dynamically; within a block, box after box:
// every gradient plane is summed by one thread, in box and bin order (in
// both layouts, so channels-last sums the same terms in the same order).
// NCHW: a block's planes stay in the cache while the boxes add into them;
// each box's rows for the block are a short stretch, 50 KB from the last
// one in W1, which the hardware prefetcher does not follow, so the next
// box's rows are prefetched while this box's are added.
template <typename I, typename T, typename Sum>
static void roi_pool_backward_indexed(
    const T* grad_output, const I* argmax,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, int channels_last, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  // Each box's image (-1: reads nothing), found once by the calling thread;
  // a reference, since in a worker a thread_local's name means its own.
  static thread_local std::vector<int64_t> callers_images;
  std::vector<int64_t>& image = callers_images;
  image.resize((size_t)num_rois);
  for (int64_t k = 0; k < num_rois; ++k)
    image[k] = curoi_box_batch(rois + k * 5, batch);
  // At least four blocks per thread, for the balance; fewer channels per
  // block where their planes would not stay in the cache (NCHW).
  int64_t block = (channels + 4 * curoi_threads() - 1) / (4 * curoi_threads());
  if (!channels_last) {
    const int64_t plane_bytes = batch * plane_size * (int64_t)sizeof(A);
    const int64_t fit = CUROI_POOL_SCATTER_BYTES / curoi_max(plane_bytes, (int64_t)1);
    block = curoi_min(block, fit);
  }
  if (block < 1) block = 1;  // no channels: no blocks, and no division by 0
  const int64_t blocks = (channels + block - 1) / block;
  curoi_parallel_for(blocks, 1, block * num_rois * bins, [&](int64_t i) {
    const int64_t c0 = i * block, c1 = curoi_min(c0 + block, channels);
    if (channels_last) {
      for (int64_t k = 0; k < num_rois; ++k) {
        if (image[k] < 0) continue;
        const int64_t origin = image[k] * plane_size * channels;
        for (int64_t bin = 0; bin < bins; ++bin) {
          const int64_t first = (k * bins + bin) * channels;
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t where = argmax[first + c];
            if (where >= 0 && where < plane_size)
              curoi_sum_add(grad_input, origin + where * channels + c,
                            curoi_load<A>(grad_output[first + c]));
          }
        }
      }
      return;
    }
    constexpr int U = 2;
    for (int64_t k = 0; k < num_rois; ++k) {
      if (image[k] < 0) continue;
      for (int64_t c = c0; c < c1; c += U) {
        const int64_t first = (k * channels + c) * bins;
        const int64_t count = curoi_min((int64_t)U, c1 - c);
        if (k + 1 < num_rois) {
          const int64_t next = first + channels * bins;
          const char* g = (const char*)(grad_output + next);
          const char* a = (const char*)(argmax + next);
          for (int64_t at = 0; at < count * bins * (int64_t)sizeof(T); at += 64)
            curoi_prefetch(g + at);
          for (int64_t at = 0; at < count * bins * (int64_t)sizeof(I); at += 64)
            curoi_prefetch(a + at);
        }
        Sum sums[U];
        for (int64_t u = 0; u < count; ++u)
          sums[u] = curoi_sum_offset(grad_input,
                                     (image[k] * channels + c + u) * plane_size);
        if (count == U)
          roi_pool_scatter_bins<U>(argmax + first, grad_output + first, bins,
                                   plane_size, sums);
        else
          roi_pool_scatter_bins<1>(argmax + first, grad_output + first, bins,
                                   plane_size, sums);
      }
    }
  });
}
#endif

// The backward on int32 or int64 argmax entries.
template <typename T, typename Sum>
CUROI_DEVICE void roi_pool_backward(
    const T* grad_output, const void* argmax, int argmax_32,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, int channels_last, const Sum& grad_input) {
  if (argmax_32)
    roi_pool_backward_indexed(grad_output, static_cast<const int32_t*>(argmax),
                              rois, num_rois, batch, channels, height, width,
                              pooled_height, pooled_width, channels_last,
                              grad_input);
  else
    roi_pool_backward_indexed(grad_output, static_cast<const int64_t*>(argmax),
                              rois, num_rois, batch, channels, height, width,
                              pooled_height, pooled_width, channels_last,
                              grad_input);
}

#define CUROI_DEFINE_ROI_POOL(T, suffix)                                       \
  CUROI_KERNEL void roi_pool_forward_##suffix(                                 \
      const T* input, const AccType<T>::type* rois, int64_t num_rois,          \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int convention, int channels_last,       \
      int argmax_32, int64_t groups, T* output, void* argmax) {                \
    RoiPoolArgmax where;                                                       \
    where.data = argmax;                                                       \
    where.narrow = argmax_32;                                                  \
    roi_pool_forward<T>(input, rois, num_rois, batch, channels, height, width, \
                        pooled_height, pooled_width, spatial_scale,            \
                        convention, channels_last, groups, output, where);     \
  }                                                                            \
  CUROI_KERNEL void roi_pool_backward_##suffix(                                \
      const T* grad_output, const void* argmax,                                \
      const AccType<T>::type* rois, int64_t num_rois, int64_t batch,           \
      int64_t channels, int64_t height, int64_t width, int64_t pooled_height,  \
      int64_t pooled_width, int channels_last, int argmax_32,                  \
      AccType<T>::type* grad_input) {                                          \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_input;                                                     \
    roi_pool_backward<T>(grad_output, argmax, argmax_32, rois, num_rois,       \
                         batch, channels, height, width, pooled_height,        \
                         pooled_width, channels_last, sum);                    \
  }                                                                            \
  CUROI_KERNEL void roi_pool_backward_fixed_##suffix(                          \
      const T* grad_output, const void* argmax,                                \
      const AccType<T>::type* rois, int64_t num_rois, int64_t batch,           \
      int64_t channels, int64_t height, int64_t width, int64_t pooled_height,  \
      int64_t pooled_width, int channels_last, int argmax_32,                  \
      const double* max_abs, int64_t* fixed, AccType<T>::type* grad_input) {   \
    roi_pool_backward<T>(                                                      \
        grad_output, argmax, argmax_32, rois, num_rois, batch, channels,       \
        height, width, pooled_height, pooled_width, channels_last,             \
        curoi_fixed_sum(grad_input, fixed, max_abs,                            \
                        num_rois * pooled_height * pooled_width));             \
  }                                                                            \
  CUROI_KERNEL void roi_pool_fixed_finish_##suffix(                            \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_input) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_input);              \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_ROI_POOL)
