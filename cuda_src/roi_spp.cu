// Spatial pyramid pooling over boxes (SPPnet): for each box, RoI Pool over an
// l x l grid for each pyramid level l, all levels in one launch. The bins are
// roi_pool's (roi_pool_bins.cuh, both conventions); mode says what a bin
// gives:
//   max (0): its maximum, with roi_pool's rules (first maximum in row-major
//     order, NaN beats any number), and that pixel's flat index h*W + w as an
//     int32 argmax (the argmax output may be null); an empty bin gives 0 and
//     argmax -1;
//   avg (1): the mean over the same bin's pixels, 0 for an empty bin (argmax
//     is neither read nor written: it may be null).
//
// levels (RoiSppLevels, passed by value) holds the grid sizes, e.g. {1, 2,
// 4}; bins = sum of l*l.
// The output is [K, C * bins], each box's row the levels' [C, l, l] blocks one
// after the other (level by level, then channel, then row, then column): the
// concatenation of roi_pool(x, boxes, (l, l)).reshape(K, -1) over the levels.
// It keeps this order whatever the input's layout; channels_last moves only
// the input and its gradient ([N, H, W, C]). A level below 1 has no bins;
// output entries past the levels' bins (bins larger than their sum) are 0 and
// -1; levels whose bins go past `bins` are cut there.
//
// Backward: max sends each output's gradient to its argmax pixel (an argmax
// outside the plane sends nothing); avg spreads it evenly over its bin.
#include "roi_pool_bins.cuh"

#define CUROI_SPP_MAX 0
#define CUROI_SPP_AVG 1

// Levels are clamped to [0, CUROI_SPP_MAX_LEVEL], so that l*l and C*l*l
// cannot overflow; a larger grid could not be held in memory anyway.
#define CUROI_SPP_MAX_LEVEL ((int64_t)1 << 20)

// The grid sizes, at most ROI_SPP_MAX_LEVELS of them (curoi._kernels
// mirrors this layout; the front ends refuse more).
#define ROI_SPP_MAX_LEVELS 16
struct RoiSppLevels {
  int64_t size[ROI_SPP_MAX_LEVELS];
  int64_t count;
};

// How many entries of the table are levels, clamped to what it holds.
CUROI_DEVICE int64_t roi_spp_count(const RoiSppLevels& levels) {
  return curoi_max(curoi_min(levels.count, (int64_t)ROI_SPP_MAX_LEVELS),
                   (int64_t)0);
}

CUROI_DEVICE int64_t roi_spp_level(const int64_t* levels, int64_t i) {
  const int64_t l = levels[i];
  return l < 0 ? 0 : (l > CUROI_SPP_MAX_LEVEL ? CUROI_SPP_MAX_LEVEL : l);
}

// Element j of a box's output row [C * bins]: level size l, channel c and
// bin (ph, pw). False past the last level.
struct RoiSppAt {
  int64_t level, c, ph, pw;
};

CUROI_DEVICE bool roi_spp_at(const int64_t* levels, int64_t num_levels,
                             int64_t channels, int64_t j, RoiSppAt* at) {
  for (int64_t i = 0; i < num_levels; ++i) {
    const int64_t l = roi_spp_level(levels, i);
    const int64_t area = l * l;
    // j < channels * area, without the product (it may not fit).
    if (area > 0 && j / area < channels) {
      const int64_t c = j / area;
      const int64_t r = j - c * area;
      at->level = l;
      at->c = c;
      at->ph = r / l;
      at->pw = r - at->ph * l;
      return true;
    }
    if (area > 0) j -= channels * area;
  }
  return false;
}

// The mean of rows [hstart, hend) x columns [wstart, wend) of a plane whose
// pixel (h, w) is plane[(h * width + w) * step]; 0 for an empty bin. Summed
// in row-major order in either layout.
template <typename T, typename A>
CUROI_DEVICE A roi_spp_mean(const T* plane, int64_t width, int64_t step,
                            int64_t hstart, int64_t hend, int64_t wstart,
                            int64_t wend) {
  if (!(hend > hstart && wend > wstart)) return (A)0;
  A sum = (A)0;
  for (int64_t h = hstart; h < hend; ++h) {
    const T* row = plane + h * width * step;
    for (int64_t w = wstart; w < wend; ++w) sum += curoi_load<A>(row[w * step]);
  }
  return sum / (A)((hend - hstart) * (wend - wstart));
}

// One bin of one box in one channel: the value, and (max) the argmax.
template <typename T, typename A>
CUROI_DEVICE A roi_spp_bin_value(const T* plane, int64_t width, int64_t step,
                                 int64_t hstart, int64_t hend, int64_t wstart,
                                 int64_t wend, int mode, int64_t* where) {
  if (mode == CUROI_SPP_AVG) {
    *where = -1;
    return roi_spp_mean<T, A>(plane, width, step, hstart, hend, wstart, wend);
  }
  return roi_pool_max<T, A>(plane, width, step, hstart, hend, wstart, wend,
                            where);
}

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// One thread per output element: its level, channel and bin from its place
// in the box's row, its bin from roi_pool_bin. The layout only moves the
// input's addresses, so channels-last gives the NCHW bits.
template <bool ChannelsLast, typename T>
CUROI_DEVICE void roi_spp_forward_loop(
    const T* input, const typename AccType<T>::type* rois,
    const int64_t* levels, int64_t num_levels, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t bins, typename AccType<T>::type spatial_scale, int convention,
    int mode, T* output, int32_t* argmax) {
  typedef typename AccType<T>::type A;
  const int64_t row = channels * bins;
  const int64_t total = num_rois * row;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const int64_t k = index / row;
    const A* box = rois + k * 5;
    RoiSppAt at;
    const int64_t b = roi_pool_box(box, batch, spatial_scale, convention);
    A value = (A)0;
    int64_t where = -1;
    if (b >= 0 &&
        roi_spp_at(levels, num_levels, channels, index - k * row, &at)) {
      int64_t hstart, hend, wstart, wend;
      roi_pool_bin(box[2], box[4], spatial_scale, at.ph, at.level, height,
                   convention, &hstart, &hend);
      roi_pool_bin(box[1], box[3], spatial_scale, at.pw, at.level, width,
                   convention, &wstart, &wend);
      const CuroiPlane p =
          curoi_plane<ChannelsLast>(b, at.c, channels, height * width);
      value = roi_spp_bin_value<T, A>(input + p.at, width, p.step, hstart,
                                      hend, wstart, wend, mode, &where);
    }
    output[index] = curoi_store<T>(value);
    if (argmax != nullptr && mode == CUROI_SPP_MAX)
      argmax[index] = (int32_t)where;
  }
}

template <typename T>
CUROI_DEVICE void roi_spp_forward(
    const T* input, const typename AccType<T>::type* rois,
    const int64_t* levels, int64_t num_levels, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t bins, typename AccType<T>::type spatial_scale, int convention,
    int mode, int channels_last, T* output, int32_t* argmax) {
  if (channels_last)
    roi_spp_forward_loop<true>(input, rois, levels, num_levels, num_rois,
                               batch, channels, height, width, bins,
                               spatial_scale, convention, mode, output,
                               argmax);
  else
    roi_spp_forward_loop<false>(input, rois, levels, num_levels, num_rois,
                                batch, channels, height, width, bins,
                                spatial_scale, convention, mode, output,
                                argmax);
}

// Bins of one box and of different boxes overlap, so the adds go through
// Sum (CuroiFloatSum or the deterministic CuroiFixedSum), atomically.
template <bool ChannelsLast, typename T, typename Sum>
CUROI_DEVICE void roi_spp_backward_loop(
    const T* grad_output, const int32_t* argmax,
    const typename AccType<T>::type* rois, const int64_t* levels,
    int64_t num_levels, int64_t num_rois, int64_t batch, int64_t channels,
    int64_t height, int64_t width, int64_t bins,
    typename AccType<T>::type spatial_scale, int convention, int mode,
    const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t row = channels * bins;
  const int64_t total = num_rois * row;
  const int64_t plane_size = height * width;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const int64_t k = index / row;
    const A* box = rois + k * 5;
    RoiSppAt at;
    const int64_t b = mode == CUROI_SPP_MAX
                          ? curoi_box_batch(box, batch)
                          : roi_pool_box(box, batch, spatial_scale, convention);
    if (b < 0 ||
        !roi_spp_at(levels, num_levels, channels, index - k * row, &at))
      continue;
    const CuroiPlane p = curoi_plane<ChannelsLast>(b, at.c, channels, plane_size);
    const A grad = curoi_load<A>(grad_output[index]);
    if (mode == CUROI_SPP_MAX) {
      const int64_t where = argmax[index];
      // argmax comes from the caller: never trust it to lie in the plane.
      if (where >= 0 && where < plane_size)
        curoi_sum_add(grad_input, p.at + where * p.step, grad);
      continue;
    }
    int64_t hstart, hend, wstart, wend;
    roi_pool_bin(box[2], box[4], spatial_scale, at.ph, at.level, height,
                 convention, &hstart, &hend);
    roi_pool_bin(box[1], box[3], spatial_scale, at.pw, at.level, width,
                 convention, &wstart, &wend);
    if (!(hend > hstart && wend > wstart)) continue;
    const A share = grad / (A)((hend - hstart) * (wend - wstart));
    for (int64_t h = hstart; h < hend; ++h)
      for (int64_t w = wstart; w < wend; ++w)
        curoi_sum_add(grad_input, p.at + (h * width + w) * p.step, share);
  }
}

template <typename T, typename Sum>
CUROI_DEVICE void roi_spp_backward(
    const T* grad_output, const int32_t* argmax,
    const typename AccType<T>::type* rois, const int64_t* levels,
    int64_t num_levels, int64_t num_rois, int64_t batch, int64_t channels,
    int64_t height, int64_t width, int64_t bins,
    typename AccType<T>::type spatial_scale, int convention, int mode,
    int channels_last, const Sum& grad_input) {
  if (channels_last)
    roi_spp_backward_loop<true>(grad_output, argmax, rois, levels, num_levels,
                                num_rois, batch, channels, height, width, bins,
                                spatial_scale, convention, mode, grad_input);
  else
    roi_spp_backward_loop<false>(grad_output, argmax, rois, levels,
                                 num_levels, num_rois, batch, channels, height,
                                 width, bins, spatial_scale, convention, mode,
                                 grad_input);
}

#else
// ------------------------------------------------------------- CPU loops
// Per box, the bins of every level are found once ([start, end) of each row
// bin and column bin, level after level) and shared by all its channels.
#include <vector>

struct RoiSppTables {
  int64_t image;                    // batch index, -1: reads nothing
  std::vector<int64_t> rows, cols;  // per level l, l pairs [start, end)

  // A box that reads nothing gets empty bins ([0, 0)), so that its entries
  // come out 0 and -1 from the same loop.
  template <typename A>
  void build(const A* box, const int64_t* levels, int64_t num_levels,
             int64_t batch, int64_t height, int64_t width, A spatial_scale,
             int convention, bool check_extent) {
    rows.clear();
    cols.clear();
    image = check_extent ? roi_pool_box(box, batch, spatial_scale, convention)
                         : curoi_box_batch(box, batch);
    for (int64_t i = 0; i < num_levels; ++i) {
      const int64_t l = roi_spp_level(levels, i);
      for (int64_t p = 0; p < l; ++p) {
        int64_t s = 0, e = 0;
        if (image >= 0)
          roi_pool_bin(box[2], box[4], spatial_scale, p, l, height,
                       convention, &s, &e);
        rows.push_back(s);
        rows.push_back(e);
        if (image >= 0)
          roi_pool_bin(box[1], box[3], spatial_scale, p, l, width, convention,
                       &s, &e);
        cols.push_back(s);
        cols.push_back(e);
      }
    }
  }
};

// Calls f(j, bin_rows, bin_cols) for channel c's elements of a box's row of
// row_size entries, level by level, bin by bin (j the element's place in
// the row), from the tables; stops at the end of the row. Every count is
// compared by division: C * l * l need not fit in 64 bits.
template <typename F>
static inline void roi_spp_each_bin(const RoiSppTables& t,
                                    const int64_t* levels, int64_t num_levels,
                                    int64_t channels, int64_t c,
                                    int64_t row_size, const F& f) {
  int64_t first = 0, table = 0;  // the level's first element, its tables
  for (int64_t i = 0; i < num_levels && first < row_size; ++i) {
    const int64_t l = roi_spp_level(levels, i);
    const int64_t area = l * l;
    if (area == 0) continue;
    const int64_t left = row_size - first;
    if (c > (left - 1) / area) return;  // channel c's block starts past the row
    const int64_t base = first + c * area;
    for (int64_t ph = 0; ph < l; ++ph) {
      for (int64_t pw = 0; pw < l; ++pw) {
        const int64_t j = base + ph * l + pw;
        if (j >= row_size) return;
        f(j, t.rows.data() + 2 * (table + ph), t.cols.data() + 2 * (table + pw));
      }
    }
    if (area > (left - 1) / channels) return;  // the next level starts past the row
    first += channels * area;
    table += l;
  }
}

// Where the levels' entries end in a row of row_size (the rest is 0 and -1).
static inline int64_t roi_spp_named_end(const int64_t* levels,
                                        int64_t num_levels, int64_t channels,
                                        int64_t row_size) {
  int64_t end = 0;
  for (int64_t i = 0; i < num_levels && end < row_size; ++i) {
    const int64_t area = roi_spp_level(levels, i) * roi_spp_level(levels, i);
    if (area == 0) continue;
    if (area > (row_size - end - 1) / channels) return row_size;
    end += channels * area;
  }
  return end;
}

// Work items of box groups and channel blocks (CuroiItems); each item
// writes the entries of its own channels, the first block also the entries
// past the levels.
template <typename T>
static void roi_spp_forward(
    const T* input, const typename AccType<T>::type* rois,
    const int64_t* levels, int64_t num_levels, int64_t num_rois,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t bins, typename AccType<T>::type spatial_scale, int convention,
    int mode, int channels_last, T* output, int32_t* argmax) {
  typedef typename AccType<T>::type A;
  const int64_t row_size = channels * bins;
  const int64_t plane_size = height * width;
  const int64_t channel_step = channels_last ? 1 : plane_size;
  const int64_t pixel_step = channels_last ? channels : 1;
  const bool with_argmax = argmax != nullptr && mode == CUROI_SPP_MAX;
  const int64_t named_end =
      roi_spp_named_end(levels, num_levels, channels, row_size);
  const CuroiItems items = curoi_items(num_rois, channels);
  const int64_t cost = CUROI_BOX_GROUP * items.block * bins * 4;
  curoi_parallel_for(items.count(), 1, cost, [&](int64_t item) {
    static thread_local RoiSppTables t;
    const int64_t c0 = items.first_channel(item), c1 = items.end_channel(item);
    for (int64_t k = items.first_box(item); k < items.end_box(item); ++k) {
      T* out = output + k * row_size;
      int32_t* arg = with_argmax ? argmax + k * row_size : nullptr;
      if (c0 == 0) {
        for (int64_t j = named_end; j < row_size; ++j) {
          out[j] = curoi_store<T>((A)0);
          if (arg) arg[j] = -1;
        }
      }
      t.build(rois + k * 5, levels, num_levels, batch, height, width,
              spatial_scale, convention, true);
      // A box that reads nothing has only empty bins: its planes are never
      // read, so any image will do.
      const T* image =
          input + (t.image < 0 ? 0 : t.image) * channels * plane_size;
      for (int64_t c = c0; c < c1; ++c) {
        const T* plane = image + c * channel_step;
        roi_spp_each_bin(
            t, levels, num_levels, channels, c, row_size,
            [&](int64_t j, const int64_t* r, const int64_t* q) {
              int64_t where;
              const A v = roi_spp_bin_value<T, A>(plane, width, pixel_step,
                                                  r[0], r[1], q[0], q[1],
                                                  mode, &where);
              out[j] = curoi_store<T>(v);
              if (arg) arg[j] = (int32_t)where;
            });
      }
    }
  });
}

// Blocks of channels handed out dynamically; within a block, box after box:
// every gradient plane is summed by one thread, in box, level and bin order
// (in both layouts), so no atomics and the same bits on any number of
// threads.
template <typename T, typename Sum>
static void roi_spp_backward(
    const T* grad_output, const int32_t* argmax,
    const typename AccType<T>::type* rois, const int64_t* levels,
    int64_t num_levels, int64_t num_rois, int64_t batch, int64_t channels,
    int64_t height, int64_t width, int64_t bins,
    typename AccType<T>::type spatial_scale, int convention, int mode,
    int channels_last, const Sum& grad_input) {
  typedef typename AccType<T>::type A;
  const int64_t row_size = channels * bins;
  const int64_t plane_size = height * width;
  const int64_t channel_step = channels_last ? 1 : plane_size;
  const int64_t pixel_step = channels_last ? channels : 1;
  int64_t block = (channels + 4 * curoi_threads() - 1) / (4 * curoi_threads());
  if (block < 1) block = 1;  // no channels: no blocks, and no division by 0
  const int64_t blocks = (channels + block - 1) / block;
  curoi_parallel_for(blocks, 1, block * num_rois * bins, [&](int64_t i) {
    static thread_local RoiSppTables t;
    const int64_t c0 = i * block, c1 = curoi_min(c0 + block, channels);
    for (int64_t k = 0; k < num_rois; ++k) {
      t.build(rois + k * 5, levels, num_levels, batch, height, width,
              spatial_scale, convention, mode != CUROI_SPP_MAX);
      if (t.image < 0) continue;
      const int64_t image = t.image * channels * plane_size;
      const T* grad_row = grad_output + k * row_size;
      const int32_t* arg_row = argmax ? argmax + k * row_size : nullptr;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t plane = image + c * channel_step;
        roi_spp_each_bin(
            t, levels, num_levels, channels, c, row_size,
            [&](int64_t j, const int64_t* r, const int64_t* q) {
              const A grad = curoi_load<A>(grad_row[j]);
              if (mode == CUROI_SPP_MAX) {
                const int64_t where = arg_row[j];
                // argmax comes from the caller: never trust it.
                if (where >= 0 && where < plane_size)
                  curoi_sum_add(grad_input, plane + where * pixel_step, grad);
                return;
              }
              if (!(r[1] > r[0] && q[1] > q[0])) return;
              const A share = grad / (A)((r[1] - r[0]) * (q[1] - q[0]));
              for (int64_t h = r[0]; h < r[1]; ++h)
                for (int64_t w = q[0]; w < q[1]; ++w)
                  curoi_sum_add(grad_input,
                                plane + (h * width + w) * pixel_step, share);
            });
      }
    }
  });
}
#endif

#define CUROI_DEFINE_ROI_SPP(T, suffix)                                        \
  CUROI_KERNEL void roi_spp_forward_##suffix(                                  \
      const T* input, const AccType<T>::type* rois,                            \
      CUROI_GRID_CONSTANT const RoiSppLevels levels, int64_t num_rois,         \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t bins, AccType<T>::type spatial_scale, int convention, int mode,  \
      int channels_last, T* output, int32_t* argmax) {                         \
    roi_spp_forward<T>(input, rois, levels.size, roi_spp_count(levels),        \
                       num_rois, batch, channels, height, width, bins,         \
                       spatial_scale, convention, mode, channels_last, output, \
                       argmax);                                                \
  }                                                                            \
  CUROI_KERNEL void roi_spp_backward_##suffix(                                 \
      const T* grad_output, const int32_t* argmax,                             \
      const AccType<T>::type* rois,                                            \
      CUROI_GRID_CONSTANT const RoiSppLevels levels, int64_t num_rois,         \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t bins, AccType<T>::type spatial_scale, int convention, int mode,  \
      int channels_last, AccType<T>::type* grad_input) {                       \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_input;                                                     \
    roi_spp_backward<T>(grad_output, argmax, rois, levels.size,                \
                        roi_spp_count(levels), num_rois, batch, channels,      \
                        height, width, bins, spatial_scale, convention, mode,  \
                        channels_last, sum);                                   \
  }                                                                            \
  CUROI_KERNEL void roi_spp_backward_fixed_##suffix(                           \
      const T* grad_output, const int32_t* argmax,                             \
      const AccType<T>::type* rois,                                            \
      CUROI_GRID_CONSTANT const RoiSppLevels levels, int64_t num_rois,         \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t bins, AccType<T>::type spatial_scale, int convention, int mode,  \
      int channels_last, const double* max_abs, int64_t* fixed,                \
      AccType<T>::type* grad_input) {                                          \
    roi_spp_backward<T>(grad_output, argmax, rois, levels.size,                \
                        roi_spp_count(levels), num_rois, batch, channels,      \
                        height, width, bins, spatial_scale, convention, mode,  \
                        channels_last,                                         \
                        curoi_fixed_sum(grad_input, fixed, max_abs,            \
                                        num_rois * bins));                     \
  }                                                                            \
  CUROI_KERNEL void roi_spp_fixed_finish_##suffix(                             \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_input) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_input);              \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_ROI_SPP)
