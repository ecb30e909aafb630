// Position-sensitive RoI Align (R-FCN), forward and backward, with the
// numbers of torchvision's ps_roi_align: RoI Align's with aligned=True, i.e.
//   start = x1*s - 0.5, size = (x2-x1)*s (no minimum size), bin = size/pooled;
//   grid = sampling_ratio if > 0 else ceil(size / pooled);
//   sample i of bin p at start + p*bin + (i + 0.5)*bin/grid, read bilinearly
//   (off [-1, H] x [-1, W] it adds 0 but counts), averaged over the grid;
// where output channel c reads input channel (c*PH + ph)*PW + pw in bin
// (ph, pw) (ps_roi.cuh).
//
// One difference: torchvision divides by grid_h * grid_w even when it is 0
// (an empty box with adaptive sampling) and returns NaN there; curoi divides
// by max(grid_h*grid_w, 1) as RoI Align does, so such a bin gives 0 and
// sends no gradient (it has no samples).
//
// The geometry is roi_align_geometry.cuh's, so a huge box visits only the
// samples that can land on the map; the loops are RoI Align's
// (roi_align_loops.cuh), with the position-sensitive channel map: the CPU's
// per-box weight tables are RoI Align's own, shared by all channels.
#include "ps_roi.cuh"
#include "roi_align_loops.cuh"

// The gradient of an input pixel sums, per box, the terms of the one bin that
// reads its channel, whose weights total at most 1: so |sum| <= K * max|g|,
// the bound the fixed-point sum needs (terms = num_rois).
#define CUROI_DEFINE_PS_ROI_ALIGN(T, suffix)                                   \
  CUROI_KERNEL void ps_roi_align_forward_##suffix(                             \
      const T* input, const AccType<T>::type* rois, int64_t num_rois,          \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int sampling_ratio, int channels_last,   \
      int64_t groups, T* output) {                                             \
    roi_align_forward<PsRoiChannels, T>(                                       \
        ps_roi_channels(pooled_height, pooled_width), input, rois, num_rois,   \
        batch, channels, height, width, pooled_height, pooled_width,           \
        spatial_scale, sampling_ratio, 1, channels_last, groups, output);      \
  }                                                                            \
  CUROI_KERNEL void ps_roi_align_backward_##suffix(                            \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_rois,    \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int sampling_ratio, int channels_last,   \
      int64_t groups, AccType<T>::type* grad_input) {                          \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_input;                                                     \
    roi_align_backward<PsRoiChannels, T>(                                      \
        ps_roi_channels(pooled_height, pooled_width), grad_output, rois,       \
        num_rois, batch, channels, height, width, pooled_height,               \
        pooled_width, spatial_scale, sampling_ratio, 1, channels_last, groups, \
        sum);                                                                  \
  }                                                                            \
  CUROI_KERNEL void ps_roi_align_backward_fixed_##suffix(                      \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_rois,    \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int sampling_ratio, int channels_last,   \
      int64_t groups, const double* max_abs, int64_t* fixed,                   \
      AccType<T>::type* grad_input) {                                          \
    roi_align_backward<PsRoiChannels, T>(                                      \
        ps_roi_channels(pooled_height, pooled_width), grad_output, rois,       \
        num_rois, batch, channels, height, width, pooled_height,               \
        pooled_width, spatial_scale, sampling_ratio, 1, channels_last, groups, \
        curoi_fixed_sum(grad_input, fixed, max_abs, num_rois));                \
  }                                                                            \
  CUROI_KERNEL void ps_roi_align_fixed_finish_##suffix(                        \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_input) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_input);              \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_PS_ROI_ALIGN)
