// RoI Align's tiles of channels, for every family whose bins average
// bilinear samples (RoI Align, position-sensitive, multiscale and rotated
// RoI Align).
//
// Which input channel an output channel reads is a channel map
// (curoi_common.cuh: CuroiSameChannel, and ps_roi.cuh's for
// position-sensitive pooling).
//
// GPU loops: a thread per (box, bin, tile of output channels)
// (curoi_channel_tile) finds the bin's geometry once; the bin's samples are
// then visited once per CUROI_ALIGN_CHUNK channels of the tile, each sample's
// taps and weights shared by the chunk. Each channel's sum adds the same
// terms in the same order as a thread of its own would (sample by sample,
// the four taps of a sample summed first), so the split never changes a
// result.
#ifndef CUROI_ROI_ALIGN_TILES_CUH
#define CUROI_ROI_ALIGN_TILES_CUH

#include "roi_align_geometry.cuh"

// One sample's bilinear value: its taps ty (rows, at row_lo and row_hi) and
// tx (pixels lo and hi of those rows), as torchvision sums them.
template <typename A, typename T>
CUROI_DEVICE A roi_align_bilinear(const T* row_lo, const T* row_hi,
                                  int64_t lo, int64_t hi,
                                  const RoiAlignTap<A>& ty,
                                  const RoiAlignTap<A>& tx) {
  return ty.w_lo * tx.w_lo * curoi_load<A>(row_lo[lo]) +
         ty.w_lo * tx.w_hi * curoi_load<A>(row_lo[hi]) +
         ty.w_hi * tx.w_lo * curoi_load<A>(row_hi[lo]) +
         ty.w_hi * tx.w_hi * curoi_load<A>(row_hi[hi]);
}

#if defined(CUROI_GPU_LOOPS)
// Channels of a tile summed together: one accumulator each, kept in
// registers whatever the sampling grid, the taps' weights computed once for
// all of them.
#define CUROI_ALIGN_CHUNK 8

// A chunk's sums, as the bin's samples are visited: f(ty, tx) adds one
// sample's value to each channel's sum, f(ty, tx, n) n samples' at the same
// place (rotated RoI Align).
template <typename T, typename A>
struct RoiAlignChunkSums {
  A* sum;
  int n;  // channels in the chunk, <= CUROI_ALIGN_CHUNK
  const T* plane;  // the chunk's first channel's plane
  int64_t row, pixel_step, in_step;

  CUROI_MEMBER void add(const RoiAlignTap<A>& ty, const RoiAlignTap<A>& tx,
                        bool weighted, A w) const {
    const T* row_lo = plane + ty.lo * row;
    const T* row_hi = plane + ty.hi * row;
    const int64_t lo = tx.lo * pixel_step, hi = tx.hi * pixel_step;
#pragma unroll
    for (int j = 0; j < CUROI_ALIGN_CHUNK; ++j) {
      if (j >= n) break;
      const A v = roi_align_bilinear(row_lo, row_hi, lo, hi, ty, tx);
      sum[j] += weighted ? w * v : v;
      row_lo += in_step;
      row_hi += in_step;
    }
  }
  CUROI_MEMBER void operator()(const RoiAlignTap<A>& ty,
                               const RoiAlignTap<A>& tx) const {
    add(ty, tx, false, (A)1);
  }
  CUROI_MEMBER void operator()(const RoiAlignTap<A>& ty,
                               const RoiAlignTap<A>& tx, A n) const {
    add(ty, tx, true, n);
  }
};

// The tile's outputs: each channel's sum over the bin's samples, visited by
// samples(f) (see RoiAlignChunkSums), divided by count; zeros for a box that
// reads nothing (reads false).
template <typename T, typename A, typename Samples>
CUROI_DEVICE void roi_align_tile_means(const T* input,
                                       const CuroiTileAt& at, bool reads,
                                       A count, int64_t width,
                                       const Samples& samples, T* output) {
  if (!reads) {
    for (int64_t i = 0; i < at.count; ++i)
      output[at.out + i * at.out_step] = curoi_store<T>((A)0);
    return;
  }
#pragma unroll 1
  for (int64_t c0 = 0; c0 < at.count; c0 += CUROI_ALIGN_CHUNK) {
    A sum[CUROI_ALIGN_CHUNK];
#pragma unroll
    for (int j = 0; j < CUROI_ALIGN_CHUNK; ++j) sum[j] = (A)0;
    RoiAlignChunkSums<T, A> f;
    f.sum = sum;
    f.n = (int)curoi_min(at.count - c0, (int64_t)CUROI_ALIGN_CHUNK);
    f.plane = input + at.in + c0 * at.in_step;
    f.row = width * at.pixel_step;
    f.pixel_step = at.pixel_step;
    f.in_step = at.in_step;
    samples(f);
#pragma unroll
    for (int j = 0; j < CUROI_ALIGN_CHUNK; ++j) {
      if (j >= f.n) break;
      output[at.out + (c0 + j) * at.out_step] = curoi_store<T>(sum[j] / count);
    }
  }
}

// A chunk's gradients (already divided by the count) to the taps of each
// sample the bin's samples visit: f(ty, tx) one sample's, f(ty, tx, n) n
// samples' at the same place.
template <typename A, typename Sum>
struct RoiAlignChunkScatter {
  const A* grad;
  int n;
  const Sum* grad_input;
  int64_t plane;  // the chunk's first channel's plane, an index
  int64_t row, pixel_step, in_step;

  CUROI_MEMBER void add(const RoiAlignTap<A>& ty, const RoiAlignTap<A>& tx,
                        bool weighted, A w) const {
    int64_t row_lo = plane + ty.lo * row;
    int64_t row_hi = plane + ty.hi * row;
    const int64_t lo = tx.lo * pixel_step, hi = tx.hi * pixel_step;
#pragma unroll
    for (int j = 0; j < CUROI_ALIGN_CHUNK; ++j) {
      if (j >= n) break;
      const A g = weighted ? grad[j] * w : grad[j];
      curoi_sum_add(*grad_input, row_lo + lo, g * ty.w_lo * tx.w_lo);
      curoi_sum_add(*grad_input, row_lo + hi, g * ty.w_lo * tx.w_hi);
      curoi_sum_add(*grad_input, row_hi + lo, g * ty.w_hi * tx.w_lo);
      curoi_sum_add(*grad_input, row_hi + hi, g * ty.w_hi * tx.w_hi);
      row_lo += in_step;
      row_hi += in_step;
    }
  }
  CUROI_MEMBER void operator()(const RoiAlignTap<A>& ty,
                               const RoiAlignTap<A>& tx) const {
    add(ty, tx, false, (A)1);
  }
  CUROI_MEMBER void operator()(const RoiAlignTap<A>& ty,
                               const RoiAlignTap<A>& tx, A n) const {
    add(ty, tx, true, n);
  }
};

// The tile's output gradients, each divided by count, to the taps of the
// bin's samples, visited by samples(f) (see RoiAlignChunkScatter); nothing
// for a box that reads nothing.
template <typename T, typename A, typename Sum, typename Samples>
CUROI_DEVICE void roi_align_tile_scatter(const T* grad_output,
                                         const Sum& grad_input,
                                         const CuroiTileAt& at, bool reads,
                                         A count, int64_t width,
                                         const Samples& samples) {
  if (!reads) return;
#pragma unroll 1
  for (int64_t c0 = 0; c0 < at.count; c0 += CUROI_ALIGN_CHUNK) {
    const int n = (int)curoi_min(at.count - c0, (int64_t)CUROI_ALIGN_CHUNK);
    A grad[CUROI_ALIGN_CHUNK];
#pragma unroll
    for (int j = 0; j < CUROI_ALIGN_CHUNK; ++j)
      grad[j] = j < n ? curoi_load<A>(
                            grad_output[at.out + (c0 + j) * at.out_step]) /
                            count
                      : (A)0;
    RoiAlignChunkScatter<A, Sum> f;
    f.grad = grad;
    f.n = n;
    f.grad_input = &grad_input;
    f.plane = at.in + c0 * at.in_step;
    f.row = width * at.pixel_step;
    f.pixel_step = at.pixel_step;
    f.in_step = at.in_step;
    samples(f);
  }
}
#endif  // CUROI_GPU_LOOPS

#endif  // CUROI_ROI_ALIGN_TILES_CUH
