// Position-sensitive RoI pooling (R-FCN; torchvision's ps_roi_pool and
// ps_roi_align): the input's C = C_out * PH * PW channels hold one score map
// per output channel and bin, and output channel c reads, in bin (ph, pw),
// only input channel (c * PH + ph) * PW + pw. Outputs are [K, C_out, PH, PW]
// (channels-last: [K, PH, PW, C_out]).
//
// The kernels take the input's channel count C, which fixes the input's and
// the gradient's layout, and derive C_out = C / (PH * PW) from it: a C that
// is not a multiple of PH * PW (refused by the front ends) leaves its last
// channels unread rather than reading past the input.
#ifndef CUROI_PS_ROI_CUH
#define CUROI_PS_ROI_CUH

#include "curoi_common.cuh"

// The channel map of the tiled loops (curoi_common.cuh: roi_output_channels
// and company).
struct PsRoiChannels {
  int64_t bins;  // PH * PW
};

CUROI_DEVICE PsRoiChannels ps_roi_channels(int64_t pooled_height,
                                           int64_t pooled_width) {
  PsRoiChannels map;
  map.bins = pooled_height * pooled_width;
  return map;
}

CUROI_DEVICE int64_t roi_output_channels(const PsRoiChannels& map,
                                         int64_t channels) {
  // No bins means no output, and no division by zero.
  return map.bins > 0 ? channels / map.bins : 0;
}
CUROI_DEVICE int64_t roi_input_channel(const PsRoiChannels& map, int64_t c,
                                       int64_t bin) {
  return c * map.bins + bin;
}
CUROI_DEVICE int64_t roi_channel_step(const PsRoiChannels& map) {
  return map.bins;
}

#endif  // CUROI_PS_ROI_CUH
