// Multiscale RoI Align, forward and backward: RoI Align over a feature
// pyramid in one launch, each box pooled from the one level that its size
// selects (the FPN paper's eq. 1), as torchvision's MultiScaleRoIAlign and
// detectron2's ROIPooler do with a launch per level and a gather/scatter on
// the host.
//
// The levels are passed by value, as one MultiscaleLevels argument (the
// kernel's arguments are all a CUDA graph records, so nothing is copied to
// the device per call): the addresses of their feature maps (gradients,
// backward), their sizes (H_l, W_l) and spatial scales. Level l
// is [N, C, H_l, W_l] ([N, H_l, W_l, C] channels-last), and every box is
// pooled from it with RoI Align's formulas (roi_align_geometry.cuh) and
// loops (roi_align_loops.cuh), with H_l, W_l and scales[l]: the numbers are
// bitwise those of roi_align on that level's boxes.
//
// The level of a box (batch index, x1, y1, x2, y2), in the accumulation type
// A (float for float32 and half precision, double for float64), with
// lvl0 = canonical_level and s0 = canonical_scale:
//   s = sqrt((x2 - x1) * (y2 - y1))      (its area in image coordinates)
//   rule 0 (torchvision's LevelMapper):  k = floor((lvl0 + log2(s / s0)) + eps)
//   rule 1 (detectron2's assign_boxes_to_levels):
//                                        k = floor(lvl0 + log2(s / s0 + eps))
//   k = min(max(k, k_min), k_max); the box's level is k - k_min,
// where k_min = trunc(-log2(scales[0])) and k_max = trunc(-log2(scales[L-1]))
// (a pyramid of strides 2^k_min .. 2^k_max, level l at scale 2^-(k_min+l)).
// The operations are the peers' and in their order: both compute in the
// boxes' dtype (float32, usually; A is float for float32 boxes), so float32
// kernels pick the peers' levels. Where lvl0 + log2(s / s0) (+ eps) lies
// within float32's rounding (2^-22 .. 2^-21 there) of an integer, float32
// and float64 may disagree: the box (0, 0, 224, 223.99968) is level 2 (k =
// 4) in float32 and level 1 in float64 by rule 0 with eps 1e-6, and
// (0, 0, 448, 447.99994) level 3 in float32, level 2 in float64 by rule 1
// (4 + log2(s/224) = 5 - 1e-7 rounds to 5 in float32). log2 itself may
// differ by an ulp between libraries (glibc, CUDA, PyTorch's vectorised
// one), which can move such boxes too. Rule 1 is also older torchvision's
// (eps 1e-6 inside the log); detectron2 uses eps 1e-8 or, in later
// versions, sys.float_info.epsilon.
//
// Where the rule gives no level, the box reads nothing (output 0, no
// gradient), as both peers leave it: a NaN k (a negative area, one of x2 < x1
// and y2 < y1; NaN corners) matches none of their levels. An area of 0
// gives k = -inf, the lowest level; one that overflows, the highest. A level
// outside [0, L) (scales that are not consecutive powers of two) or with no
// pixels reads nothing either. With one level both peers skip the rule and
// pool every box from it; so does this kernel.
#include "roi_align_loops.cuh"

CUROI_DEVICE float multiscale_sqrt(float v) { return sqrtf(v); }
CUROI_DEVICE double multiscale_sqrt(double v) { return sqrt(v); }
CUROI_DEVICE float multiscale_log2(float v) { return log2f(v); }
CUROI_DEVICE double multiscale_log2(double v) { return log2(v); }

// The pyramid's levels: at most MULTISCALE_MAX_LEVELS (curoi._kernels
// mirrors this layout; the front ends refuse more levels). The scales come
// in both accumulation types, so that float kernels convert nothing.
#define MULTISCALE_MAX_LEVELS 16
struct MultiscaleLevels {
  int64_t address[MULTISCALE_MAX_LEVELS];  // each level's array, as an int64
  int64_t size[2 * MULTISCALE_MAX_LEVELS];  // H_l, W_l
  float scale_f32[MULTISCALE_MAX_LEVELS];
  double scale_f64[MULTISCALE_MAX_LEVELS];
  int64_t count;
};

CUROI_DEVICE const float* multiscale_scales(const MultiscaleLevels& levels,
                                            float) {
  return levels.scale_f32;
}
CUROI_DEVICE const double* multiscale_scales(const MultiscaleLevels& levels,
                                             double) {
  return levels.scale_f64;
}

// How many entries of the table are levels, clamped to what it holds.
CUROI_DEVICE int64_t multiscale_count(const MultiscaleLevels& levels) {
  return curoi_max(curoi_min(levels.count, (int64_t)MULTISCALE_MAX_LEVELS),
                   (int64_t)0);
}

// A level table entry is the address of an array, as an int64.
template <typename P>
CUROI_DEVICE P* multiscale_pointer(int64_t address) {
  return (P*)(uint64_t)address;
}

// The level rule's arguments, with k_min and k_max worked out once.
template <typename A>
struct MultiscaleRule {
  const int64_t* sizes;  // [L, 2]: H_l, W_l
  const A* scales;       // [L]
  int64_t num_levels;
  A k_min, k_max, canonical_level, canonical_scale, eps;
  int rule;
};

// trunc(-log2(scale)), as Python's int() of it; clamped so that any scale
// converts (a front end refuses scales that are not powers of two).
template <typename A>
CUROI_DEVICE A multiscale_stride_exponent(A scale) {
  return (A)curoi_clamp_to_int(-multiscale_log2(scale), (A)-4096, (A)4096);
}

template <typename A>
CUROI_DEVICE MultiscaleRule<A> multiscale_rule(const int64_t* sizes,
                                               const A* scales,
                                               int64_t num_levels,
                                               A canonical_scale,
                                               int canonical_level, A eps,
                                               int rule) {
  MultiscaleRule<A> r;
  r.sizes = sizes;
  r.scales = scales;
  r.num_levels = num_levels;
  r.k_min = r.k_max = (A)0;
  if (num_levels > 0) {
    r.k_min = multiscale_stride_exponent(scales[0]);
    r.k_max = multiscale_stride_exponent(scales[num_levels - 1]);
  }
  r.canonical_level = (A)canonical_level;
  r.canonical_scale = canonical_scale;
  r.eps = eps;
  r.rule = rule;
  return r;
}

// The level box (x1, y1, x2, y2 at box[1] .. box[4]) is pooled from, or -1
// for none.
template <typename A>
CUROI_DEVICE int64_t multiscale_level(const MultiscaleRule<A>& r,
                                      const A* box) {
  if (r.num_levels < 1) return -1;
  int64_t level = 0;
  if (r.num_levels > 1) {
    const A area = (box[3] - box[1]) * (box[4] - box[2]);
    const A s = multiscale_sqrt(area);
    const A v =
        r.rule == 1
            ? r.canonical_level + multiscale_log2(s / r.canonical_scale + r.eps)
            : (r.canonical_level + multiscale_log2(s / r.canonical_scale)) +
                  r.eps;
    A k = floor(v);
    if (!(k == k)) return -1;  // NaN: no level
    // torch.clamp(k, min, max): the minimum first, then the maximum.
    k = k < r.k_min ? r.k_min : k;
    k = k > r.k_max ? r.k_max : k;
    const A index = k - r.k_min;
    if (!(index >= (A)0 && index < (A)r.num_levels)) return -1;
    level = (int64_t)index;
  }
  if (r.sizes[2 * level] <= 0 || r.sizes[2 * level + 1] <= 0) return -1;
  return level;
}

// Where level l's gradient starts in the one int64 buffer of the
// deterministic sum, which holds the levels back to back: after the
// N * C * H_j * W_j elements of every level j < l.
CUROI_DEVICE int64_t multiscale_fixed_offset(const int64_t* sizes,
                                             int64_t batch, int64_t channels,
                                             int64_t level) {
  int64_t pixels = 0;
  for (int64_t j = 0; j < level; ++j) pixels += sizes[2 * j] * sizes[2 * j + 1];
  return batch * channels * pixels;
}

// The backward's sums, one per level: its Sum (see curoi_common.cuh) is
// multiscale_level_sum(sums, level).
template <typename A>
struct MultiscaleFloatSums {
  const int64_t* grads;  // addresses of the levels' gradients
};

template <typename A>
CUROI_DEVICE CuroiFloatSum<A> multiscale_level_sum(
    const MultiscaleFloatSums<A>& sums, int64_t level) {
  CuroiFloatSum<A> sum;
  sum.grad = multiscale_pointer<A>(sums.grads[level]);
  return sum;
}

template <typename A>
struct MultiscaleFixedSums {
  const int64_t* grads;
  const int64_t* sizes;
  int64_t batch, channels;
  int64_t* fixed;  // every level's fixed-point sums, back to back
  double scale;    // 2^e, the same for every level (one bound on all sums)
};

template <typename A>
CUROI_DEVICE CuroiFixedSum<A> multiscale_level_sum(
    const MultiscaleFixedSums<A>& sums, int64_t level) {
  CuroiFixedSum<A> sum;
  sum.grad = multiscale_pointer<A>(sums.grads[level]);
  sum.fixed = sums.fixed + multiscale_fixed_offset(sums.sizes, sums.batch,
                                                   sums.channels, level);
  sum.scale = sums.scale;
  return sum;
}

// Every level's gradient += its fixed-point sums * 2^-e: curoi_fixed_finish
// on each level's slice of the buffer in turn.
template <typename A>
CUROI_DEVICE void multiscale_fixed_finish(const int64_t* fixed,
                                          const double* max_abs, int64_t terms,
                                          const int64_t* sizes,
                                          int64_t num_levels, int64_t batch,
                                          int64_t channels,
                                          const int64_t* grads) {
  int64_t offset = 0;
  for (int64_t l = 0; l < num_levels; ++l) {
    const int64_t total = batch * channels * sizes[2 * l] * sizes[2 * l + 1];
    curoi_fixed_finish(fixed + offset, max_abs, terms, total,
                       multiscale_pointer<A>(grads[l]));
    offset += total;
  }
}

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// A thread per (box, bin, tile of channels), as RoI Align's: its box's level,
// then RoI Align's tile on that level (roi_align_tile_means /
// roi_align_tile_scatter over roi_align_bin_samples).

template <bool ChannelsLast, typename T>
CUROI_DEVICE void multiscale_roi_align_forward_loop(
    const int64_t* features, const MultiscaleRule<typename AccType<T>::type>& r,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t pooled_height, int64_t pooled_width,
    int sampling_ratio, int aligned, int64_t groups, T* output) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_rois * pooled_height * pooled_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, channels, groups, pooled_height, pooled_width);
    const int64_t level = multiscale_level(r, rois + t.k * 5);
    // A box of no level reads nothing: RoI Align's unusable box, whose tile
    // writes zeros.
    const int64_t height = level >= 0 ? r.sizes[2 * level] : 1;
    const int64_t width = level >= 0 ? r.sizes[2 * level + 1] : 1;
    RoiAlignElement<A> e = roi_align_element(
        rois, t.k, t.ph, t.pw, batch, height, width, pooled_height,
        pooled_width, level >= 0 ? r.scales[level] : (A)1, sampling_ratio,
        aligned);
    if (level < 0) e.box.batch_index = -1;
    roi_align_tile_means(
        level >= 0 ? multiscale_pointer<const T>(features[level])
                   : (const T*)nullptr,
        curoi_tile_at<ChannelsLast>(CuroiSameChannel(), t,
                                    e.box.batch_index, channels,
                                    height * width, pooled_height,
                                    pooled_width),
        e.box.batch_index >= 0, e.box.count, width,
        roi_align_bin_samples(e, height, width), output);
  }
}

template <typename T>
CUROI_DEVICE void multiscale_roi_align_forward(
    const int64_t* features, const MultiscaleRule<typename AccType<T>::type>& r,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t pooled_height, int64_t pooled_width,
    int sampling_ratio, int aligned, int channels_last, int64_t groups,
    T* output) {
  if (channels_last)
    multiscale_roi_align_forward_loop<true>(features, r, rois, num_rois,
                                            batch, channels, pooled_height,
                                            pooled_width, sampling_ratio,
                                            aligned, groups, output);
  else
    multiscale_roi_align_forward_loop<false>(features, r, rois, num_rois,
                                             batch, channels, pooled_height,
                                             pooled_width, sampling_ratio,
                                             aligned, groups, output);
}

template <bool ChannelsLast, typename T, typename Sums>
CUROI_DEVICE void multiscale_roi_align_backward_loop(
    const T* grad_output, const MultiscaleRule<typename AccType<T>::type>& r,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t pooled_height, int64_t pooled_width,
    int sampling_ratio, int aligned, int64_t groups, const Sums& sums) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_rois * pooled_height * pooled_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, channels, groups, pooled_height, pooled_width);
    const int64_t level = multiscale_level(r, rois + t.k * 5);
    if (level < 0) continue;
    const int64_t height = r.sizes[2 * level];
    const int64_t width = r.sizes[2 * level + 1];
    const RoiAlignElement<A> e = roi_align_element(
        rois, t.k, t.ph, t.pw, batch, height, width, pooled_height,
        pooled_width, r.scales[level], sampling_ratio, aligned);
    roi_align_tile_scatter(
        grad_output, multiscale_level_sum(sums, level),
        curoi_tile_at<ChannelsLast>(CuroiSameChannel(), t,
                                    e.box.batch_index, channels,
                                    height * width, pooled_height,
                                    pooled_width),
        e.box.batch_index >= 0, e.box.count, width,
        roi_align_bin_samples(e, height, width));
  }
}

template <typename T, typename Sums>
CUROI_DEVICE void multiscale_roi_align_backward(
    const T* grad_output, const MultiscaleRule<typename AccType<T>::type>& r,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t pooled_height, int64_t pooled_width,
    int sampling_ratio, int aligned, int channels_last, int64_t groups,
    const Sums& sums) {
  if (channels_last)
    multiscale_roi_align_backward_loop<true>(grad_output, r, rois, num_rois,
                                             batch, channels, pooled_height,
                                             pooled_width, sampling_ratio,
                                             aligned, groups, sums);
  else
    multiscale_roi_align_backward_loop<false>(grad_output, r, rois, num_rois,
                                              batch, channels, pooled_height,
                                              pooled_width, sampling_ratio,
                                              aligned, groups, sums);
}

#else
// ------------------------------------------------------------- CPU loops
// The boxes are sorted by level first (a stable counting sort: ascending box
// index within a level), then RoI Align's CPU loops run once per level on
// that level's boxes (roi_align_forward_listed), with their per-box weight
// tables shared by all channels, writing each box's own output rows. A
// gradient plane receives its level's boxes' terms in box order, as RoI
// Align's backward on those boxes alone would: the same bits whatever the
// number of threads.

// order[start[l] .. start[l+1]-1] are the boxes of level l, in ascending
// order; order[start[L] ..] those of no level.
template <typename A>
static void multiscale_sort(const MultiscaleRule<A>& r, const A* rois,
                            int64_t num_rois, std::vector<int64_t>& order,
                            std::vector<int64_t>& start) {
  const int64_t levels = r.num_levels > 0 ? r.num_levels : 0;
  static thread_local std::vector<int64_t> level_of;
  level_of.resize((size_t)num_rois);
  start.assign((size_t)levels + 2, 0);
  for (int64_t k = 0; k < num_rois; ++k) {
    const int64_t level = multiscale_level(r, rois + k * 5);
    level_of[k] = level >= 0 ? level : levels;
    ++start[level_of[k] + 1];
  }
  for (int64_t l = 0; l <= levels; ++l) start[l + 1] += start[l];
  order.resize((size_t)num_rois);
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t k = 0; k < num_rois; ++k) order[next[level_of[k]]++] = k;
}

template <typename T>
static void multiscale_roi_align_forward(
    const int64_t* features, const MultiscaleRule<typename AccType<T>::type>& r,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t pooled_height, int64_t pooled_width,
    int sampling_ratio, int aligned, int channels_last, int64_t /* groups */,
    T* output) {
  typedef typename AccType<T>::type A;
  static thread_local std::vector<int64_t> order, start;
  multiscale_sort(r, rois, num_rois, order, start);
  const int64_t levels = (int64_t)start.size() - 2;
  for (int64_t l = 0; l < levels; ++l) {
    if (start[l + 1] == start[l]) continue;
    roi_align_forward_listed(
        CuroiSameChannel(), multiscale_pointer<const T>(features[l]), rois,
        order.data() + start[l], start[l + 1] - start[l], batch, channels,
        r.sizes[2 * l], r.sizes[2 * l + 1], pooled_height, pooled_width,
        r.scales[l], sampling_ratio, aligned, channels_last, output);
  }
  // A box's output is one block of C * PH * PW in either layout.
  const int64_t block = channels * pooled_height * pooled_width;
  for (int64_t i = start[levels]; i < num_rois; ++i) {
    T* out = output + order[i] * block;
    for (int64_t j = 0; j < block; ++j) out[j] = curoi_store<T>((A)0);
  }
}

template <typename T, typename Sums>
static void multiscale_roi_align_backward(
    const T* grad_output, const MultiscaleRule<typename AccType<T>::type>& r,
    const typename AccType<T>::type* rois, int64_t num_rois, int64_t batch,
    int64_t channels, int64_t pooled_height, int64_t pooled_width,
    int sampling_ratio, int aligned, int channels_last, int64_t /* groups */,
    const Sums& sums) {
  static thread_local std::vector<int64_t> order, start;
  multiscale_sort(r, rois, num_rois, order, start);
  const int64_t levels = (int64_t)start.size() - 2;
  for (int64_t l = 0; l < levels; ++l) {
    if (start[l + 1] == start[l]) continue;
    roi_align_backward_listed(
        CuroiSameChannel(), grad_output, rois, order.data() + start[l],
        start[l + 1] - start[l], batch, channels, r.sizes[2 * l],
        r.sizes[2 * l + 1], pooled_height, pooled_width, r.scales[l],
        sampling_ratio, aligned, channels_last, multiscale_level_sum(sums, l));
  }
}
#endif

// The fixed-point bound: a gradient element sums, per bin of every box, that
// bin's weights on it, which total at most 1; so |sum| <= K * PH * PW *
// max|g| (terms = num_rois * PH * PW), as for RoI Align.
#define CUROI_DEFINE_MULTISCALE_ROI_ALIGN(T, suffix)                           \
  CUROI_KERNEL void multiscale_roi_align_forward_##suffix(                     \
      CUROI_GRID_CONSTANT const MultiscaleLevels levels,                       \
      const AccType<T>::type* rois, int64_t num_rois, int64_t batch,           \
      int64_t channels, int64_t pooled_height, int64_t pooled_width,           \
      int sampling_ratio, int aligned, AccType<T>::type canonical_scale,       \
      int canonical_level, AccType<T>::type eps, int level_rule,               \
      int channels_last, int64_t groups, T* output) {                          \
    multiscale_roi_align_forward<T>(                                           \
        levels.address,                                                        \
        multiscale_rule(levels.size,                                           \
                        multiscale_scales(levels, AccType<T>::type()),         \
                        multiscale_count(levels), canonical_scale,             \
                        canonical_level, eps, level_rule),                     \
        rois, num_rois, batch, channels, pooled_height, pooled_width,          \
        sampling_ratio, aligned, channels_last, groups, output);               \
  }                                                                            \
  CUROI_KERNEL void multiscale_roi_align_backward_##suffix(                    \
      const T* grad_output, CUROI_GRID_CONSTANT const MultiscaleLevels levels, \
      const AccType<T>::type* rois, int64_t num_rois, int64_t batch,           \
      int64_t channels, int64_t pooled_height, int64_t pooled_width,           \
      int sampling_ratio, int aligned, AccType<T>::type canonical_scale,       \
      int canonical_level, AccType<T>::type eps, int level_rule,               \
      int channels_last, int64_t groups) {                                     \
    MultiscaleFloatSums<AccType<T>::type> sums;                                \
    sums.grads = levels.address;                                               \
    multiscale_roi_align_backward<T>(                                          \
        grad_output,                                                           \
        multiscale_rule(levels.size,                                           \
                        multiscale_scales(levels, AccType<T>::type()),         \
                        multiscale_count(levels), canonical_scale,             \
                        canonical_level, eps, level_rule),                     \
        rois, num_rois, batch, channels, pooled_height, pooled_width,          \
        sampling_ratio, aligned, channels_last, groups, sums);                 \
  }                                                                            \
  CUROI_KERNEL void multiscale_roi_align_backward_fixed_##suffix(              \
      const T* grad_output, CUROI_GRID_CONSTANT const MultiscaleLevels levels, \
      const AccType<T>::type* rois, int64_t num_rois, int64_t batch,           \
      int64_t channels, int64_t pooled_height, int64_t pooled_width,           \
      int sampling_ratio, int aligned, AccType<T>::type canonical_scale,       \
      int canonical_level, AccType<T>::type eps, int level_rule,               \
      int channels_last, int64_t groups, const double* max_abs,                \
      int64_t* fixed) {                                                        \
    MultiscaleFixedSums<AccType<T>::type> sums;                                \
    sums.grads = levels.address;                                               \
    sums.sizes = levels.size;                                                  \
    sums.batch = batch;                                                        \
    sums.channels = channels;                                                  \
    sums.fixed = fixed;                                                        \
    sums.scale = ldexp(1.0, curoi_fixed_exponent(                              \
                                *max_abs,                                      \
                                num_rois * pooled_height * pooled_width));     \
    multiscale_roi_align_backward<T>(                                          \
        grad_output,                                                           \
        multiscale_rule(levels.size,                                           \
                        multiscale_scales(levels, AccType<T>::type()),         \
                        multiscale_count(levels), canonical_scale,             \
                        canonical_level, eps, level_rule),                     \
        rois, num_rois, batch, channels, pooled_height, pooled_width,          \
        sampling_ratio, aligned, channels_last, groups, sums);                 \
  }                                                                            \
  CUROI_KERNEL void multiscale_roi_align_fixed_finish_##suffix(                \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      CUROI_GRID_CONSTANT const MultiscaleLevels levels, int64_t batch,        \
      int64_t channels) {                                                      \
    multiscale_fixed_finish<AccType<T>::type>(                                 \
        fixed, max_abs, terms, levels.size, multiscale_count(levels), batch,   \
        channels, levels.address);                                             \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_MULTISCALE_ROI_ALIGN)
