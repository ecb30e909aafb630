// Crop and resize, TensorFlow's tf.image.crop_and_resize (the CropAndResize,
// CropAndResizeGradImage and CropAndResizeGradBoxes kernels), with TF's
// numbers: forward, gradient of the image, gradient of the boxes.
//
// Box k is row k of rois [K, 5]: (b, y1, x1, y2, x2), the corners in
// normalised coordinates (0 and 1 are the centres of the first and last
// pixel) on image b (TensorFlow's box_indices[k], which the front ends put in
// the first column). Crop row y of a crop of crop_height rows samples image
// row
//   in_y = y1*(H-1) + y * ((y2-y1)*(H-1)/(crop_height-1))  if crop_height > 1,
//   in_y = 0.5*(y1+y2)*(H-1)                               otherwise,
// and crop column x image column in_x, likewise from x1, x2, W, crop_width.
// A box with y2 < y1 (x2 < x1) gives the crop flipped. A point with in_y
// outside [0, H-1] or in_x outside [0, W-1], NaN included, is
// extrapolation_value and has no gradient. Otherwise
// - bilinear reads rows floor(in_y), ceil(in_y), columns floor(in_x),
//   ceil(in_x), with yl = in_y - floor(in_y), xl = in_x - floor(in_x):
//     top = tl + (tr - tl)*xl, bottom = bl + (br - bl)*xl,
//     out = top + (bottom - top)*yl;
// - nearest reads row round(in_y), column round(in_x), rounding halves away
//   from zero (C's roundf, as TF).
// Each output element is one sample, so the work is bounded by the output's
// size whatever the boxes say: there is no sampling grid to bound.
//
// Arithmetic is in the accumulation type: float for float32 and half
// precision, which gives TF's float32 numbers, and double for float64 (TF
// computes its float64 images in float, with float32 boxes and crops).
// The coordinates are those of TF's CPU kernel, on both backends: TF's own
// GPU forward computes y1*(H-1) + y*(y2-y1)*((H-1)/(crop_height-1)), which
// may differ in the last bit (and so, for nearest, by a pixel at a tie).
//
// A box index outside [0, N) (or NaN) reads nothing: its crop is
// extrapolation_value and it gets no gradient; a fractional one is
// truncated. TF raises an error there; curoi cannot check on the device
// without making the host wait for the result.
//
// The gradient of the boxes is TF's CropAndResizeBackpropBoxes: per point on
// the map, with the bilinear corners,
//   gy = (1-xl)*(bl - tl) + xl*(br - tr),  gx = (1-yl)*(tr - tl) + yl*(br - bl),
// times the output gradient, summed over the channels; then
//   dy1 += gy * (H-1 - y*ratio_h), dy2 += gy * y*ratio_h  (ratio_h =
//   (H-1)/(crop_height-1)), or both gy * 0.5*(H-1) when crop_height == 1,
// and dx1, dx2 likewise. TF uses this bilinear derivative for the nearest
// method too, so a model ported from TF trains the same; and it maps points
// there through (y2-y1)*ratio_h rather than the forward's
// (y2-y1)*(H-1)/(crop_height-1), which may round differently: kept as well.
// It is deterministic: every box's sum runs in a fixed order (channels,
// then bins), by the two kernels boxes_backward (one partial sum per bin) and
// boxes_backward_finish (the bins of a box added in order), on both backends.
#include "curoi_common.cuh"

#define CROP_AND_RESIZE_BILINEAR 0
#define CROP_AND_RESIZE_NEAREST 1

// ------------------------------------------------------------ the formulas
// The image coordinate that crop row (or column) i of `crop` samples, on an
// axis of `size` pixels, from the box's normalised ends lo and hi: TF's
// forward and image-gradient mapping, operation for operation.
template <typename A>
CUROI_DEVICE A crop_and_resize_position(A lo, A hi, int64_t i, int64_t crop,
                                        int64_t size) {
  const A extent = (A)(size - 1);
  if (crop > 1) {
    const A scale = (hi - lo) * extent / (A)(crop - 1);
    return lo * extent + (A)i * scale;
  }
  return (A)0.5 * (lo + hi) * extent;
}

// (H-1)/(crop-1), the box gradient's step per crop row (0 for one row).
template <typename A>
CUROI_DEVICE A crop_and_resize_ratio(int64_t crop, int64_t size) {
  return crop > 1 ? (A)(size - 1) / (A)(crop - 1) : (A)0;
}

// The box gradient's mapping (TF's CropAndResizeBackpropBoxes): the same
// coordinate but with the scale computed as (hi - lo) * ratio.
template <typename A>
CUROI_DEVICE A crop_and_resize_grad_position(A lo, A hi, int64_t i,
                                             int64_t crop, int64_t size) {
  const A extent = (A)(size - 1);
  if (crop > 1)
    return lo * extent + (A)i * ((hi - lo) * crop_and_resize_ratio<A>(crop, size));
  return (A)0.5 * (lo + hi) * extent;
}

// How a point reads one axis: pixels lo = floor(v) and hi = ceil(v), hi with
// weight lerp = v - lo (bilinear), or pixel `nearest` = round(v).
template <typename A>
struct CropTap {
  int64_t lo, hi, nearest;
  A lerp;
};

// False for a coordinate off [0, size-1] (or NaN): the point is
// extrapolated. The indices are clamped to size-1 as well: (A)(size-1)
// rounds up when float cannot hold it (size > 2^24), and no pixel past the
// last may be read.
template <typename A>
CUROI_DEVICE bool crop_and_resize_tap(A v, int64_t size, CropTap<A>* tap) {
  if (!(v >= (A)0 && v <= (A)(size - 1))) return false;
  const A f = floor(v);
  tap->lo = curoi_min((int64_t)f, size - 1);
  tap->hi = curoi_min((int64_t)ceil(v), size - 1);
  tap->nearest = curoi_min((int64_t)round(v), size - 1);
  tap->lerp = v - f;
  return true;
}

// The image a box reads, or -1 for an index outside [0, batch).
template <typename A>
CUROI_DEVICE int64_t crop_and_resize_batch(const A* rois, int64_t k,
                                           int64_t batch) {
  const A b = rois[k * 5];
  return b >= (A)0 && b < (A)batch ? (int64_t)b : -1;  // NaN fails both
}

// Box k's (y1, x1, y2, x2).
template <typename A>
CUROI_DEVICE const A* crop_and_resize_box(const A* rois, int64_t k) {
  return rois + k * 5 + 1;
}

// The bilinear corners of a point: pixel (row, column) of a plane lies at
// plane[(row * width + column) * step].
template <typename A>
struct CropCorners {
  A tl, tr, bl, br;
};

template <typename A, typename T>
CUROI_DEVICE CropCorners<A> crop_and_resize_corners(const T* plane,
                                                    int64_t width, int64_t step,
                                                    const CropTap<A>& ty,
                                                    const CropTap<A>& tx) {
  const T* top = plane + ty.lo * width * step;
  const T* bottom = plane + ty.hi * width * step;
  CropCorners<A> c;
  c.tl = curoi_load<A>(top[tx.lo * step]);
  c.tr = curoi_load<A>(top[tx.hi * step]);
  c.bl = curoi_load<A>(bottom[tx.lo * step]);
  c.br = curoi_load<A>(bottom[tx.hi * step]);
  return c;
}

// TF's interpolation, in its order of operations.
template <typename A>
CUROI_DEVICE A crop_and_resize_lerp(const CropCorners<A>& c,
                                    const CropTap<A>& ty,
                                    const CropTap<A>& tx) {
  const A top = c.tl + (c.tr - c.tl) * tx.lerp;
  const A bottom = c.bl + (c.br - c.bl) * tx.lerp;
  return top + (bottom - top) * ty.lerp;
}

template <typename A, typename T>
CUROI_DEVICE A crop_and_resize_value(const T* plane, int64_t width,
                                     int64_t step, const CropTap<A>& ty,
                                     const CropTap<A>& tx, int method) {
  if (method == CROP_AND_RESIZE_NEAREST)
    return curoi_load<A>(plane[(ty.nearest * width + tx.nearest) * step]);
  return crop_and_resize_lerp(
      crop_and_resize_corners<A>(plane, width, step, ty, tx), ty, tx);
}

// The adjoint of the bilinear read for one output gradient g: TF's terms
// for the top left, top right, bottom left and bottom right pixels,
// dtop = (1-yl)*g shared as (1-xl)*dtop and xl*dtop, and dbottom = yl*g
// likewise.
template <typename A>
struct CropTerms {
  A tl, tr, bl, br;
};

template <typename A>
CUROI_DEVICE CropTerms<A> crop_and_resize_terms(A yl, A xl, A g) {
  const A dtop = ((A)1 - yl) * g, dbottom = yl * g;
  CropTerms<A> t;
  t.tl = ((A)1 - xl) * dtop;
  t.tr = xl * dtop;
  t.bl = ((A)1 - xl) * dbottom;
  t.br = xl * dbottom;
  return t;
}

// The terms added to gradient elements tl, tr, bl, br, in that order.
template <typename A, typename Sum>
CUROI_DEVICE void crop_and_resize_scatter_bilinear(const Sum& grad, int64_t tl,
                                                   int64_t tr, int64_t bl,
                                                   int64_t br, A yl, A xl,
                                                   A g) {
  const CropTerms<A> t = crop_and_resize_terms(yl, xl, g);
  curoi_sum_add(grad, tl, t.tl);
  curoi_sum_add(grad, tr, t.tr);
  curoi_sum_add(grad, bl, t.bl);
  curoi_sum_add(grad, br, t.br);
}

// The adjoint of crop_and_resize_value for one output gradient g, into the
// gradient plane whose pixel (row, column) is at + (row * width + column) *
// step.
template <typename A, typename Sum>
CUROI_DEVICE void crop_and_resize_scatter(const Sum& grad, int64_t at,
                                          int64_t width, int64_t step,
                                          const CropTap<A>& ty,
                                          const CropTap<A>& tx, int method,
                                          A g) {
  if (method == CROP_AND_RESIZE_NEAREST) {
    curoi_sum_add(grad, at + (ty.nearest * width + tx.nearest) * step, g);
    return;
  }
  const int64_t top = at + ty.lo * width * step;
  const int64_t bottom = at + ty.hi * width * step;
  const int64_t left = tx.lo * step, right = tx.hi * step;
  crop_and_resize_scatter_bilinear(grad, top + left, top + right,
                                   bottom + left, bottom + right, ty.lerp,
                                   tx.lerp, g);
}

// The multipliers of a point's gy (gx) in dy1 and dy2 (dx1 and dx2): the
// derivatives of its coordinate with respect to the box's two ends.
template <typename A>
CUROI_DEVICE void crop_and_resize_end_factors(int64_t i, int64_t crop,
                                              int64_t size, A* lo, A* hi) {
  if (crop > 1) {
    *hi = (A)i * crop_and_resize_ratio<A>(crop, size);
    *lo = (A)(size - 1) - *hi;
  } else {
    *lo = *hi = (A)0.5 * (A)(size - 1);
  }
}

// One bin's share of its box's gradient, written to partial[0..3] as
// (dy1, dx1, dy2, dx2): the sums of g*gy and g*gx over the channels, in
// channel order, times the end factors. Channel c of the output gradient is
// grad[c * grad_step]; pixel (row, column) of channel c of the box's image
// is image[(row * width + column) * pixel_step + c * channel_step].
template <typename T, typename A>
CUROI_DEVICE void crop_and_resize_box_grad_bin(
    const T* grad, int64_t grad_step, const T* image, int64_t pixel_step,
    int64_t channel_step, const A* box, int64_t batch_index, int64_t ph,
    int64_t pw, int64_t channels, int64_t height, int64_t width,
    int64_t crop_height, int64_t crop_width, A* partial) {
  CropTap<A> ty, tx;
  if (batch_index < 0 ||
      !crop_and_resize_tap(crop_and_resize_grad_position(
                               box[0], box[2], ph, crop_height, height),
                           height, &ty) ||
      !crop_and_resize_tap(crop_and_resize_grad_position(
                               box[1], box[3], pw, crop_width, width),
                           width, &tx)) {
    for (int j = 0; j < 4; ++j) partial[j] = (A)0;
    return;
  }
  const T* top = image + ty.lo * width * pixel_step;
  const T* bottom = image + ty.hi * width * pixel_step;
  const int64_t left = tx.lo * pixel_step, right = tx.hi * pixel_step;
  A sum_y = (A)0, sum_x = (A)0;
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t at = c * channel_step;
    const A tl = curoi_load<A>(top[left + at]);
    const A tr = curoi_load<A>(top[right + at]);
    const A bl = curoi_load<A>(bottom[left + at]);
    const A br = curoi_load<A>(bottom[right + at]);
    const A g = curoi_load<A>(grad[c * grad_step]);
    const A gy = ((A)1 - tx.lerp) * (bl - tl) + tx.lerp * (br - tr);
    const A gx = ((A)1 - ty.lerp) * (tr - tl) + ty.lerp * (br - bl);
    sum_y += gy * g;
    sum_x += gx * g;
  }
  A y_lo, y_hi, x_lo, x_hi;
  crop_and_resize_end_factors<A>(ph, crop_height, height, &y_lo, &y_hi);
  crop_and_resize_end_factors<A>(pw, crop_width, width, &x_lo, &x_hi);
  partial[0] = sum_y * y_lo;
  partial[1] = sum_x * x_lo;
  partial[2] = sum_y * y_hi;
  partial[3] = sum_x * x_hi;
}

// Where the box gradient's bin (k, ph, pw) finds its data, in either layout:
// calls crop_and_resize_box_grad_bin with the strides of the layout.
template <typename T>
CUROI_DEVICE void crop_and_resize_box_grad_at(
    const T* grad_output, const T* image,
    const typename AccType<T>::type* rois,
    int64_t k, int64_t ph, int64_t pw, int64_t batch, int64_t channels,
    int64_t height, int64_t width, int64_t crop_height, int64_t crop_width,
    int channels_last, typename AccType<T>::type* partial) {
  const int64_t bins = crop_height * crop_width;
  const int64_t bin = ph * crop_width + pw;
  const int64_t b = crop_and_resize_batch(rois, k, batch);
  const int64_t plane_size = height * width;
  const int64_t image_at = b < 0 ? 0 : b * channels * plane_size;
  if (channels_last)
    crop_and_resize_box_grad_bin(grad_output + (k * bins + bin) * channels, 1,
                                 image + image_at, channels, 1,
                                 crop_and_resize_box(rois, k), b, ph, pw,
                                 channels, height, width, crop_height,
                                 crop_width,
                                 partial + (k * bins + bin) * 4);
  else
    crop_and_resize_box_grad_bin(grad_output + k * channels * bins + bin, bins,
                                 image + image_at, 1, plane_size,
                                 crop_and_resize_box(rois, k), b, ph, pw,
                                 channels, height, width, crop_height,
                                 crop_width,
                                 partial + (k * bins + bin) * 4);
}

#if defined(CUROI_GPU_LOOPS)
// ------------------------------------------------------------- GPU loops
// Forward and image gradient: a thread per (box, crop pixel, tile of
// channels) (curoi_channel_tile), which finds the box's image and the
// pixel's taps once for the tile's channels; box gradient: a thread per bin
// of a box. The layout only moves the addresses: a channels-last element
// runs the very operations of its NCHW twin.

// A crop pixel's image and taps; false where it reads nothing (its box's
// image is not usable, or it lies off the image).
template <typename A>
CUROI_DEVICE bool crop_and_resize_pixel(const A* rois, int64_t k,
                                        int64_t batch, int64_t ph, int64_t pw,
                                        int64_t height, int64_t width,
                                        int64_t crop_height,
                                        int64_t crop_width, int64_t* b,
                                        CropTap<A>* ty, CropTap<A>* tx) {
  *b = crop_and_resize_batch(rois, k, batch);
  if (*b < 0) return false;
  const A* box = crop_and_resize_box(rois, k);
  return crop_and_resize_tap(crop_and_resize_position(box[0], box[2], ph,
                                                      crop_height, height),
                             height, ty) &&
         crop_and_resize_tap(crop_and_resize_position(box[1], box[3], pw,
                                                      crop_width, width),
                             width, tx);
}

template <bool ChannelsLast, typename T>
CUROI_DEVICE void crop_and_resize_forward_loop(
    const T* image, const typename AccType<T>::type* rois, int64_t num_boxes,
    int64_t batch, int64_t channels, int64_t height, int64_t width,
    int64_t crop_height, int64_t crop_width,
    typename AccType<T>::type extrapolation_value, int method,
    int64_t groups, T* output) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_boxes * crop_height * crop_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, channels, groups, crop_height, crop_width);
    int64_t b;
    CropTap<A> ty, tx;
    const bool reads =
        crop_and_resize_pixel(rois, t.k, batch, t.ph, t.pw, height, width,
                              crop_height, crop_width, &b, &ty, &tx);
    const CuroiTileAt at = curoi_tile_at<ChannelsLast>(
        CuroiSameChannel(), t, reads ? b : -1, channels, height * width,
        crop_height, crop_width);
#pragma unroll 1
    for (int64_t i = 0; i < at.count; ++i) {
      const A value =
          reads ? crop_and_resize_value(image + at.in + i * at.in_step, width,
                                        at.pixel_step, ty, tx, method)
                : extrapolation_value;
      output[at.out + i * at.out_step] = curoi_store<T>(value);
    }
  }
}

template <typename T>
CUROI_DEVICE void crop_and_resize_forward(
    const T* image, const typename AccType<T>::type* rois, int64_t num_boxes,
    int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t crop_height,
    int64_t crop_width, typename AccType<T>::type extrapolation_value,
    int method, int channels_last, int64_t groups, T* output) {
  if (channels_last)
    crop_and_resize_forward_loop<true>(image, rois, num_boxes,
                                       batch, channels, height, width,
                                       crop_height, crop_width,
                                       extrapolation_value, method, groups,
                                       output);
  else
    crop_and_resize_forward_loop<false>(image, rois, num_boxes,
                                        batch, channels, height, width,
                                        crop_height, crop_width,
                                        extrapolation_value, method, groups,
                                        output);
}

// Crops of one box and of different boxes overlap in the image, so the adds
// go through Sum (CuroiFloatSum or the deterministic CuroiFixedSum),
// atomically.
template <bool ChannelsLast, typename T, typename Sum>
CUROI_DEVICE void crop_and_resize_backward_loop(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_boxes, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t crop_height, int64_t crop_width, int method,
    int64_t groups, const Sum& grad_image) {
  typedef typename AccType<T>::type A;
  const int64_t total = num_boxes * crop_height * crop_width * groups;
  CUDA_1D_KERNEL_LOOP(index, total) {
    const CuroiChannelTile t = curoi_channel_tile<ChannelsLast>(
        index, total, channels, groups, crop_height, crop_width);
    int64_t b;
    CropTap<A> ty, tx;
    if (!crop_and_resize_pixel(rois, t.k, batch, t.ph, t.pw, height, width,
                               crop_height, crop_width, &b, &ty, &tx))
      continue;
    const CuroiTileAt at = curoi_tile_at<ChannelsLast>(
        CuroiSameChannel(), t, b, channels, height * width, crop_height,
        crop_width);
#pragma unroll 1
    for (int64_t i = 0; i < at.count; ++i)
      crop_and_resize_scatter(
          grad_image, at.in + i * at.in_step, width, at.pixel_step, ty, tx,
          method, curoi_load<A>(grad_output[at.out + i * at.out_step]));
  }
}

template <typename T, typename Sum>
CUROI_DEVICE void crop_and_resize_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_boxes, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t crop_height,
    int64_t crop_width, int method, int channels_last, int64_t groups,
    const Sum& grad_image) {
  if (channels_last)
    crop_and_resize_backward_loop<true>(grad_output, rois,
                                        num_boxes, batch, channels, height,
                                        width, crop_height, crop_width, method,
                                        groups, grad_image);
  else
    crop_and_resize_backward_loop<false>(grad_output, rois,
                                         num_boxes, batch, channels, height,
                                         width, crop_height, crop_width,
                                         method, groups, grad_image);
}

// One thread per bin of a box, its channels in order; the bins' partial
// sums are added by curoi_boxes_finish, in order: no atomics.
template <typename T>
CUROI_DEVICE void crop_and_resize_boxes_backward(
    const T* grad_output, const T* image,
    const typename AccType<T>::type* rois,
    int64_t num_boxes, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t crop_height, int64_t crop_width,
    int channels_last, typename AccType<T>::type* partial) {
  const int64_t total = num_boxes * crop_height * crop_width;
  CUDA_1D_KERNEL_LOOP(index, total) {
    int64_t d[4];
    curoi_unflatten(index, total, crop_width, crop_height, num_boxes, d);
    crop_and_resize_box_grad_at(grad_output, image, rois, d[2],
                                d[1], d[0], batch, channels, height, width,
                                crop_height, crop_width, channels_last,
                                partial);
  }
}

#else
// ------------------------------------------------------------- CPU loops
// A point's taps depend on its box and its crop row or column, not on the
// channel: they are computed once per box into row and column tables that
// all its channels share (CropAndResizeGroup), and each channel then costs
// an interpolation per point. Channels-last runs the channel innermost, over
// contiguous memory.
#include <vector>

// One axis of one box: the tap of each crop row (column), and whether it
// lies on the map.
template <typename A>
struct CropAxisTable {
  std::vector<CropTap<A>> tap;
  std::vector<unsigned char> inside;

  void build(A lo, A hi, int64_t crop, int64_t size) {
    tap.resize((size_t)crop);
    inside.assign((size_t)crop, 0);
    for (int64_t i = 0; i < crop; ++i)
      inside[i] = crop_and_resize_tap(
          crop_and_resize_position(lo, hi, i, crop, size), size, &tap[i]);
  }
};

// The tables of a group of boxes (see CuroiItems), built once per work item.
template <typename A>
struct CropAndResizeGroup {
  int64_t batch_index[CUROI_BOX_GROUP];
  CropAxisTable<A> y[CUROI_BOX_GROUP], x[CUROI_BOX_GROUP];

  void build(const A* rois, int64_t first,
             int64_t end, int64_t batch, int64_t height, int64_t width,
             int64_t crop_height, int64_t crop_width) {
    for (int64_t k = first; k < end; ++k) {
      const int64_t i = k - first;
      batch_index[i] = crop_and_resize_batch(rois, k, batch);
      if (batch_index[i] < 0) continue;
      const A* box = crop_and_resize_box(rois, k);
      y[i].build(box[0], box[2], crop_height, height);
      x[i].build(box[1], box[3], crop_width, width);
    }
  }
};

// Boxes k0 .. k1-1 in channels c0 .. c1-1, NCHW: one channel plane at a
// time, read by each of its crop's points.
template <typename T, typename A>
static void crop_and_resize_forward_nchw(
    const T* image, const CropAndResizeGroup<A>& group, int64_t k0,
    int64_t k1, int64_t c0, int64_t c1, int64_t channels, int64_t height,
    int64_t width, int64_t crop_height, int64_t crop_width,
    A extrapolation_value, int method, T* output) {
  const int64_t bins = crop_height * crop_width;
  const int64_t plane_size = height * width;
  const T outside = curoi_store<T>(extrapolation_value);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t b = group.batch_index[k - k0];
    if (b < 0) {
      T* out = output + (k * channels + c0) * bins;
      for (int64_t i = 0; i < (c1 - c0) * bins; ++i) out[i] = outside;
      continue;
    }
    const CropAxisTable<A>& ty = group.y[k - k0];
    const CropAxisTable<A>& tx = group.x[k - k0];
    for (int64_t c = c0; c < c1; ++c) {
      const T* plane = image + (b * channels + c) * plane_size;
      T* out = output + (k * channels + c) * bins;
      for (int64_t y = 0; y < crop_height; ++y) {
        T* row = out + y * crop_width;
        if (!ty.inside[y]) {
          for (int64_t x = 0; x < crop_width; ++x) row[x] = outside;
          continue;
        }
        for (int64_t x = 0; x < crop_width; ++x)
          row[x] = tx.inside[x]
                       ? curoi_store<T>(crop_and_resize_value(
                             plane, width, (int64_t)1, ty.tap[y], tx.tap[x],
                             method))
                       : outside;
      }
    }
  }
}

// Channels-last: every point of boxes k0 .. k1-1 in channels c0 .. c1-1,
// the channel innermost (one vectorisable loop per point). Each channel
// runs the operations of crop_and_resize_value, so the results are the
// NCHW loop's bits.
template <typename T, typename A>
static void crop_and_resize_forward_nhwc(
    const T* image, const CropAndResizeGroup<A>& group, int64_t k0,
    int64_t k1, int64_t c0, int64_t c1, int64_t channels, int64_t height,
    int64_t width, int64_t crop_height, int64_t crop_width,
    A extrapolation_value, int method, T* output) {
  const int64_t n = c1 - c0;
  const T outside = curoi_store<T>(extrapolation_value);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t b = group.batch_index[k - k0];
    const CropAxisTable<A>& ty = group.y[k - k0];
    const CropAxisTable<A>& tx = group.x[k - k0];
    const T* img = image + (b < 0 ? 0 : b * height * width * channels) + c0;
    for (int64_t y = 0; y < crop_height; ++y) {
      for (int64_t x = 0; x < crop_width; ++x) {
        T* __restrict__ out =
            output + ((k * crop_height + y) * crop_width + x) * channels + c0;
        if (b < 0 || !ty.inside[y] || !tx.inside[x]) {
          for (int64_t c = 0; c < n; ++c) out[c] = outside;
          continue;
        }
        const CropTap<A>& ry = ty.tap[y];
        const CropTap<A>& rx = tx.tap[x];
        if (method == CROP_AND_RESIZE_NEAREST) {
          const T* pixel = img + (ry.nearest * width + rx.nearest) * channels;
          for (int64_t c = 0; c < n; ++c)
            out[c] = curoi_store<T>(curoi_load<A>(pixel[c]));
          continue;
        }
        const T* tl = img + (ry.lo * width + rx.lo) * channels;
        const T* tr = img + (ry.lo * width + rx.hi) * channels;
        const T* bl = img + (ry.hi * width + rx.lo) * channels;
        const T* br = img + (ry.hi * width + rx.hi) * channels;
        const A xl = rx.lerp, yl = ry.lerp;
        for (int64_t c = 0; c < n; ++c) {
          const A v_tl = curoi_load<A>(tl[c]), v_tr = curoi_load<A>(tr[c]);
          const A v_bl = curoi_load<A>(bl[c]), v_br = curoi_load<A>(br[c]);
          const A top = v_tl + (v_tr - v_tl) * xl;
          const A bottom = v_bl + (v_br - v_bl) * xl;
          out[c] = curoi_store<T>(top + (bottom - top) * yl);
        }
      }
    }
  }
}

template <typename T>
static void crop_and_resize_forward(
    const T* image, const typename AccType<T>::type* rois, int64_t num_boxes,
    int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t crop_height,
    int64_t crop_width, typename AccType<T>::type extrapolation_value,
    int method, int channels_last, int64_t /* groups */, T* output) {
  typedef typename AccType<T>::type A;
  const CuroiItems items = curoi_items(num_boxes, channels);
  const int64_t cost = CUROI_BOX_GROUP * items.block * crop_height * crop_width;
  curoi_parallel_for(items.count(), 1, cost, [&](int64_t item) {
    static thread_local CropAndResizeGroup<A> group;
    const int64_t k0 = items.first_box(item), k1 = items.end_box(item);
    group.build(rois, k0, k1, batch, height, width, crop_height,
                crop_width);
    const int64_t c0 = items.first_channel(item), c1 = items.end_channel(item);
    if (channels_last)
      crop_and_resize_forward_nhwc<T, A>(image, group, k0, k1, c0, c1,
                                         channels, height, width, crop_height,
                                         crop_width, extrapolation_value,
                                         method, output);
    else
      crop_and_resize_forward_nchw<T, A>(image, group, k0, k1, c0, c1,
                                         channels, height, width, crop_height,
                                         crop_width, extrapolation_value,
                                         method, output);
  });
}

// Channels-last: the terms of n contiguous channels of one point, whose
// pixels' channel 0 lie at tl, tr, bl, br of the gradient and whose output
// gradients are g[0 .. n-1].
template <typename T, typename A, typename Sum>
static void crop_and_resize_scatter_channels(const Sum& grad, int64_t tl,
                                             int64_t tr, int64_t bl,
                                             int64_t br, A yl, A xl,
                                             const T* g, int64_t n) {
  for (int64_t c = 0; c < n; ++c)
    crop_and_resize_scatter_bilinear(grad, tl + c, tr + c, bl + c, br + c, yl,
                                     xl, curoi_load<A>(g[c]));
}

// The plain sum, when the four pixels differ (the point is not on a pixel
// row or column): no two adds of a channel touch one element, so the loop
// can be vectorised. Each element still gets the same single term.
template <typename T, typename A>
static void crop_and_resize_scatter_channels(const CuroiFloatSum<A>& grad,
                                             int64_t tl, int64_t tr,
                                             int64_t bl, int64_t br, A yl,
                                             A xl, const T* g, int64_t n) {
  if (tl == tr || tl == bl) {
    for (int64_t c = 0; c < n; ++c)
      crop_and_resize_scatter_bilinear(grad, tl + c, tr + c, bl + c, br + c,
                                       yl, xl, curoi_load<A>(g[c]));
    return;
  }
  A* __restrict__ p_tl = grad.grad + tl;
  A* __restrict__ p_tr = grad.grad + tr;
  A* __restrict__ p_bl = grad.grad + bl;
  A* __restrict__ p_br = grad.grad + br;
  for (int64_t c = 0; c < n; ++c) {
    const CropTerms<A> t = crop_and_resize_terms(yl, xl, curoi_load<A>(g[c]));
    p_tl[c] += t.tl;
    p_tr[c] += t.tr;
    p_bl[c] += t.bl;
    p_br[c] += t.br;
  }
}

// The image gradient of boxes k0 .. k1-1 in the owned channels c0 .. c1-1.
// Every gradient pixel receives its terms in (box, crop row, crop column)
// order, in either layout, so the two layouts give the same bits.
template <typename T, typename A, typename Sum>
static void crop_and_resize_backward_block(
    const T* grad_output, const CropAndResizeGroup<A>& group, int64_t k0,
    int64_t k1, int64_t c0, int64_t c1, int64_t channels, int64_t height,
    int64_t width, int64_t crop_height, int64_t crop_width, int method,
    int channels_last, const Sum& grad_image) {
  const int64_t bins = crop_height * crop_width;
  const int64_t plane_size = height * width;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t b = group.batch_index[k - k0];
    if (b < 0) continue;
    const CropAxisTable<A>& ty = group.y[k - k0];
    const CropAxisTable<A>& tx = group.x[k - k0];
    if (channels_last) {
      // The point's four pixels and weights once, then a loop over
      // contiguous channels.
      const int64_t img = b * plane_size * channels;
      for (int64_t y = 0; y < crop_height; ++y) {
        if (!ty.inside[y]) continue;
        const CropTap<A>& ry = ty.tap[y];
        for (int64_t x = 0; x < crop_width; ++x) {
          if (!tx.inside[x]) continue;
          const CropTap<A>& rx = tx.tap[x];
          const T* g = grad_output + (k * bins + y * crop_width + x) * channels;
          if (method == CROP_AND_RESIZE_NEAREST) {
            const int64_t at = img + (ry.nearest * width + rx.nearest) * channels;
            for (int64_t c = c0; c < c1; ++c)
              curoi_sum_add(grad_image, at + c, curoi_load<A>(g[c]));
            continue;
          }
          crop_and_resize_scatter_channels(
              grad_image, img + (ry.lo * width + rx.lo) * channels + c0,
              img + (ry.lo * width + rx.hi) * channels + c0,
              img + (ry.hi * width + rx.lo) * channels + c0,
              img + (ry.hi * width + rx.hi) * channels + c0, ry.lerp, rx.lerp,
              g + c0, c1 - c0);
        }
      }
      continue;
    }
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t plane = (b * channels + c) * plane_size;
      const T* g = grad_output + (k * channels + c) * bins;
      for (int64_t y = 0; y < crop_height; ++y) {
        if (!ty.inside[y]) continue;
        for (int64_t x = 0; x < crop_width; ++x) {
          if (!tx.inside[x]) continue;
          crop_and_resize_scatter(grad_image, plane, width, (int64_t)1,
                                  ty.tap[y], tx.tap[x], method,
                                  curoi_load<A>(g[y * crop_width + x]));
        }
      }
    }
  }
}

// Box group after box group, each block of channels is summed by one
// thread, which owns those channels of the gradient: no atomics, and the
// same bits whatever the number of threads.
template <typename T, typename Sum>
static void crop_and_resize_backward(
    const T* grad_output, const typename AccType<T>::type* rois,
    int64_t num_boxes, int64_t batch,
    int64_t channels, int64_t height, int64_t width, int64_t crop_height,
    int64_t crop_width, int method, int channels_last, int64_t /* groups */,
    const Sum& grad_image) {
  typedef typename AccType<T>::type A;
  const int64_t threads = curoi_threads();
  int64_t block = (channels + 4 * threads - 1) / (4 * threads);
  if (block < 1) block = 1;  // no channels: no blocks, and no division by 0
  const int64_t blocks = (channels + block - 1) / block;
  const int64_t cost = CUROI_BOX_GROUP * block * crop_height * crop_width * 4;
  // Built by the calling thread, read by the workers: through a reference,
  // since in a worker the name of a thread_local means the worker's own.
  static thread_local CropAndResizeGroup<A> callers_group;
  CropAndResizeGroup<A>& group = callers_group;
  for (int64_t k0 = 0; k0 < num_boxes; k0 += CUROI_BOX_GROUP) {
    const int64_t k1 = curoi_min(k0 + (int64_t)CUROI_BOX_GROUP, num_boxes);
    group.build(rois, k0, k1, batch, height, width, crop_height,
                crop_width);
    curoi_parallel_for(blocks, 1, cost, [&](int64_t i) {
      const int64_t c0 = i * block, c1 = curoi_min(c0 + block, channels);
      crop_and_resize_backward_block<T, A>(grad_output, group, k0, k1, c0, c1,
                                           channels, height, width,
                                           crop_height, crop_width, method,
                                           channels_last, grad_image);
    });
  }
}

// One work item per crop row of a box: its bins, each over its channels in
// order (the taps computed once per bin, shared by the channels). Every
// bin's partial sum has one writer, so the thread count changes no bit.
template <typename T>
static void crop_and_resize_boxes_backward(
    const T* grad_output, const T* image,
    const typename AccType<T>::type* rois,
    int64_t num_boxes, int64_t batch, int64_t channels, int64_t height,
    int64_t width, int64_t crop_height, int64_t crop_width,
    int channels_last, typename AccType<T>::type* partial) {
  const int64_t cost = crop_width * (channels + 1) * 4;
  curoi_parallel_for(num_boxes * crop_height, 1, cost, [&](int64_t item) {
    const int64_t k = item / crop_height, ph = item - k * crop_height;
    for (int64_t pw = 0; pw < crop_width; ++pw)
      crop_and_resize_box_grad_at(grad_output, image, rois, k,
                                  ph, pw, batch, channels, height, width,
                                  crop_height, crop_width, channels_last,
                                  partial);
  });
}
#endif

// ------------------------------------------------------------------ kernels
#define CUROI_DEFINE_CROP_AND_RESIZE(T, suffix)                                \
  CUROI_KERNEL void crop_and_resize_forward_##suffix(                          \
      const T* image, const AccType<T>::type* rois, int64_t num_boxes,         \
      int64_t batch,                                                           \
      int64_t channels, int64_t height, int64_t width, int64_t crop_height,    \
      int64_t crop_width, AccType<T>::type extrapolation_value, int method,    \
      int channels_last, int64_t groups, T* output) {                          \
    crop_and_resize_forward<T>(image, rois, num_boxes, batch,                  \
                               channels, height, width, crop_height,           \
                               crop_width, extrapolation_value, method,        \
                               channels_last, groups, output);                 \
  }                                                                            \
  CUROI_KERNEL void crop_and_resize_backward_##suffix(                         \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_boxes,   \
      int64_t batch,                                                           \
      int64_t channels, int64_t height, int64_t width, int64_t crop_height,    \
      int64_t crop_width, int method, int channels_last, int64_t groups,       \
      AccType<T>::type* grad_image) {                                          \
    CuroiFloatSum<AccType<T>::type> sum;                                       \
    sum.grad = grad_image;                                                     \
    crop_and_resize_backward<T>(grad_output, rois, num_boxes,                  \
                                batch, channels, height, width, crop_height,   \
                                crop_width, method, channels_last, groups,     \
                                sum);                                          \
  }                                                                            \
  CUROI_KERNEL void crop_and_resize_backward_fixed_##suffix(                   \
      const T* grad_output, const AccType<T>::type* rois, int64_t num_boxes,   \
      int64_t batch,                                                           \
      int64_t channels, int64_t height, int64_t width, int64_t crop_height,    \
      int64_t crop_width, int method, int channels_last, int64_t groups,       \
      const double* max_abs, int64_t* fixed, AccType<T>::type* grad_image) {   \
    crop_and_resize_backward<T>(                                               \
        grad_output, rois, num_boxes, batch, channels, height,                 \
        width, crop_height, crop_width, method, channels_last, groups,         \
        curoi_fixed_sum(grad_image, fixed, max_abs,                            \
                        num_boxes * crop_height * crop_width));                \
  }                                                                            \
  CUROI_KERNEL void crop_and_resize_fixed_finish_##suffix(                     \
      const int64_t* fixed, const double* max_abs, int64_t terms,              \
      int64_t total, AccType<T>::type* grad_image) {                           \
    curoi_fixed_finish(fixed, max_abs, terms, total, grad_image);              \
  }                                                                            \
  CUROI_KERNEL void crop_and_resize_boxes_backward_##suffix(                   \
      const T* grad_output, const T* image, const AccType<T>::type* rois,      \
      int64_t num_boxes, int64_t batch,                                        \
      int64_t channels, int64_t height, int64_t width, int64_t crop_height,    \
      int64_t crop_width, int method, int channels_last,                       \
      AccType<T>::type* partial) {                                             \
    /* method changes nothing: TF differentiates the boxes through the */      \
    /* bilinear formula for both methods. */                                   \
    (void)method;                                                              \
    crop_and_resize_boxes_backward<T>(grad_output, image, rois,                \
                                      num_boxes, batch, channels, height,      \
                                      width, crop_height, crop_width,          \
                                      channels_last, partial);                 \
  }                                                                            \
  CUROI_KERNEL void crop_and_resize_boxes_backward_finish_##suffix(            \
      const AccType<T>::type* partial, int64_t num_boxes, int64_t bins,        \
      AccType<T>::type* grad_rois) {                                           \
    curoi_boxes_finish(partial, num_boxes, bins, 5, 1, grad_rois);             \
  }

CUROI_INSTANTIATE(CUROI_DEFINE_CROP_AND_RESIZE)
