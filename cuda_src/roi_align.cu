// RoI Align (average), forward and backward: the mean of a bin's samples,
// with torchvision's, detectron2's, mmcv's and ONNX RoiAlign's numbers. A
// sample off the map adds 0 but counts in the divisor max(grid_h*grid_w, 1).
// The geometry (bins, samples, taps) is in roi_align_geometry.cuh, the loops
// (shared with position-sensitive RoI Align) in roi_align_loops.cuh, the
// gradient with respect to the boxes in roi_align_boxes.cuh.
#include "roi_align_boxes.cuh"

#define CUROI_DEFINE_ROI_ALIGN(T, suffix)                                      \
  CUROI_KERNEL void roi_align_forward_##suffix(                                \
      const T* input, const AccType<T>::type* rois, int64_t num_rois,          \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int sampling_ratio, int aligned,         \
      int channels_last, int64_t groups, T* output) {                          \
    roi_align_forward<CuroiSameChannel, T>(                                    \
        CuroiSameChannel(), input, rois, num_rois, batch, channels, height,    \
        width, pooled_height, pooled_width, spatial_scale, sampling_ratio,     \
        aligned, channels_last, groups, output);                               \
  }                                                                            \
  CUROI_KERNEL void roi_align_backward_##suffix(                               \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_rois,    \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int sampling_ratio, int aligned,         \
      int channels_last, int64_t groups, AccType<T>::type* grad_input) {       \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_input;                                                     \
    roi_align_backward<CuroiSameChannel, T>(                                   \
        CuroiSameChannel(), grad_output, rois, num_rois, batch, channels,      \
        height, width, pooled_height, pooled_width, spatial_scale,             \
        sampling_ratio, aligned, channels_last, groups, sum);                  \
  }                                                                            \
  CUROI_KERNEL void roi_align_backward_fixed_##suffix(                         \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_rois,    \
      int64_t batch, int64_t channels, int64_t height, int64_t width,          \
      int64_t pooled_height, int64_t pooled_width,                             \
      AccType<T>::type spatial_scale, int sampling_ratio, int aligned,         \
      int channels_last, int64_t groups, const double* max_abs,                \
      int64_t* fixed, AccType<T>::type* grad_input) {                          \
    roi_align_backward<CuroiSameChannel, T>(                                   \
        CuroiSameChannel(), grad_output, rois, num_rois, batch, channels,      \
        height, width, pooled_height, pooled_width, spatial_scale,             \
        sampling_ratio, aligned, channels_last, groups,                        \
        curoi_fixed_sum(grad_input, fixed, max_abs,                            \
                        num_rois * pooled_height * pooled_width));             \
  }                                                                            \
  CUROI_KERNEL void roi_align_fixed_finish_##suffix(                           \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_input) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_input);              \
  }                                                                            \
  CUROI_KERNEL void roi_align_boxes_backward_##suffix(                         \
      const T* grad_output, const T* input, const AccType<T>::type* rois,      \
      int64_t num_rois, int64_t batch, int64_t channels, int64_t height,       \
      int64_t width, int64_t pooled_height, int64_t pooled_width,              \
      AccType<T>::type spatial_scale, int sampling_ratio, int aligned,         \
      int channels_last, AccType<T>::type* partial) {                          \
    roi_align_boxes_backward<CuroiSameChannel, T>(                             \
        CuroiSameChannel(), grad_output, input, rois, num_rois, batch,         \
        channels, height, width, pooled_height, pooled_width, spatial_scale,   \
        sampling_ratio, aligned, channels_last, partial);                      \
  }                                                                            \
  CUROI_KERNEL void roi_align_boxes_backward_finish_##suffix(                  \
      const AccType<T>::type* partial, int64_t num_rois, int64_t bins,         \
      AccType<T>::type* grad_rois) {                                           \
    curoi_boxes_finish(partial, num_rois, bins, 5, 1, grad_rois);              \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_ROI_ALIGN)
