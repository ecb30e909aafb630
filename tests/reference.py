"""Independent NumPy reference for curoi's RoI operators.

Written from the formulas in DESIGN.md section 3 and the text of issue 2, not
from the kernels in cuda_src/: it exists to catch bugs in them. It is slow on
purpose (plain Python loops over every box, bin and sample) and computes in
float64 whatever the input dtype, so that a float32 or half-precision result
from curoi can be compared with it at a tolerance that fits that dtype.

Conventions shared by every function here:

- ``boxes`` is a ``[K, 5]`` array (batch index, x1, y1, x2, y2) or a list of
  per-image ``[L, 4]`` arrays (image ``i`` gets batch index ``i``).
- A box whose batch index is not finite or outside ``[0, N)``, or with a
  coordinate that is not finite, produces 0 (argmax -1) and no gradient.
- ``output_size`` is an int or a pair ``(PH, PW)``.
"""

import math

import numpy as np

__all__ = [
    "WORKED_EXAMPLE_MAP",
    "crop_and_resize",
    "crop_and_resize_backward",
    "crop_and_resize_boxes_backward",


    "multiscale_level",
    "multiscale_roi_align",
    "multiscale_roi_align_backward",
    "normalize_boxes",
    "ps_roi_align",
    "ps_roi_align_backward",
    "ps_roi_pool",
    "ps_roi_pool_backward",
    "prroi_pool",
    "prroi_pool_backward",
    "prroi_pool_boxes_backward",
    "prroi_pool_quadrature",
    "roi_align",
    "roi_align_backward",
    "roi_align_boxes_backward",
    "roi_align_max_interpolated",
    "roi_align_max_interpolated_backward",
    "roi_align_max_interpolated_gather",
    "roi_align_rotated",
    "roi_align_rotated_backward",
    "roi_align_rotated_boxes_backward",
    "roi_align_rotated_weights",
    "roi_align_weights",
    "roi_pool",
    "roi_pool_backward",
    "roi_spp",
    "roi_spp_backward",
    "round_half_away",
]


# The 8 x 8 map of the worked example in DESIGN.md section 3, row by row.
WORKED_EXAMPLE_MAP = np.array([
    [0.88, 0.44, 0.14, 0.16, 0.37, 0.77, 0.96, 0.27],
    [0.19, 0.45, 0.57, 0.16, 0.63, 0.29, 0.71, 0.70],
    [0.66, 0.26, 0.82, 0.64, 0.54, 0.73, 0.59, 0.26],
    [0.85, 0.34, 0.76, 0.84, 0.29, 0.75, 0.62, 0.25],
    [0.32, 0.74, 0.21, 0.39, 0.34, 0.03, 0.33, 0.48],
    [0.20, 0.14, 0.16, 0.13, 0.73, 0.65, 0.96, 0.32],
    [0.19, 0.69, 0.09, 0.86, 0.88, 0.07, 0.01, 0.48],
    [0.83, 0.24, 0.97, 0.04, 0.24, 0.35, 0.50, 0.91],
])


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def normalize_boxes(boxes):
    """Return boxes as a float64 ``[K, 5]`` array (list form expanded)."""
    if isinstance(boxes, (list, tuple)):
        rows = []
        for i, b in enumerate(boxes):
            b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
            idx = np.full((b.shape[0], 1), float(i))
            rows.append(np.concatenate([idx, b], axis=1))
        if not rows:
            return np.zeros((0, 5), np.float64)
        return np.concatenate(rows, axis=0)
    b = np.asarray(boxes, dtype=np.float64)
    return b.reshape(-1, 5)


def _pair(output_size):
    if isinstance(output_size, (int, np.integer)):
        return int(output_size), int(output_size)
    ph, pw = output_size
    return int(ph), int(pw)


def _batch_index(box, n_images):
    """Image index of a box, or None when the box must be ignored."""
    if not all(math.isfinite(v) for v in box):
        return None
    b = box[0]
    if b < 0 or b >= n_images:
        return None
    return int(b)


def round_half_away(v):
    """C's round(): halves go away from zero (Python's round() does not).

    ``v - floor(v)`` is exact for doubles, so there is no ``floor(v + 0.5)``
    trap at 0.49999999999999994.
    """
    if v < 0:
        return -round_half_away(-v)
    f = math.floor(v)
    return int(f + 1) if v - f >= 0.5 else int(f)


# --------------------------------------------------------------------------
# RoI Align (average), torchvision / detectron2 semantics
# --------------------------------------------------------------------------


def _bilinear_taps(y, x, height, width):
    """The (row, col, weight) taps that bilinear interpolation at (y, x) uses.

    DESIGN.md section 3: a sample with y < -1 or y > H (x likewise) gives
    nothing; otherwise a coordinate below 0 is clamped to 0, and a sample at
    or past the last row/column uses the edge value.
    """
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    if y <= 0:
        y = 0.0
    if x <= 0:
        x = 0.0
    y_low = int(math.floor(y))
    x_low = int(math.floor(x))
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly = y - y_low
    lx = x - x_low
    hy = 1.0 - ly
    hx = 1.0 - lx
    return [
        (y_low, x_low, hy * hx),
        (y_low, x_high, hy * lx),
        (y_high, x_low, ly * hx),
        (y_high, x_high, ly * lx),
    ]


def _roi_align_grid(box, n_images, output_size, spatial_scale, sampling_ratio,
                    aligned):
    """Where RoI Align samples one box: ``None`` for an ignored box, else
    ``(n, start_h, start_w, bin_h, bin_w, grid_h, grid_w)``; sample
    ``(iy, ix)`` of bin ``(ph, pw)`` lies at :func:`_sample_position`."""
    n = _batch_index(box, n_images)
    if n is None:
        return None
    pooled_h, pooled_w = _pair(output_size)
    s = float(spatial_scale)
    offset = 0.5 if aligned else 0.0
    _, x1, y1, x2, y2 = (float(v) for v in box)
    start_w = x1 * s - offset
    start_h = y1 * s - offset
    end_w = x2 * s - offset
    end_h = y2 * s - offset
    roi_w = end_w - start_w
    roi_h = end_h - start_h
    if not aligned:
        # Legacy behaviour: malformed boxes are forced to 1x1 pixels.
        roi_w = max(roi_w, 1.0)
        roi_h = max(roi_h, 1.0)
    bin_h = roi_h / pooled_h
    bin_w = roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = grid_w = int(sampling_ratio)
    else:
        grid_h = int(math.ceil(roi_h / pooled_h))
        grid_w = int(math.ceil(roi_w / pooled_w))
    return n, start_h, start_w, bin_h, bin_w, grid_h, grid_w


def _sample_position(start, p, bin_size, i, grid):
    """Sample ``i`` of bin ``p`` along one axis: ``start + p*bin + (i +
    0.5)*bin/grid``."""
    return start + p * bin_size + (i + 0.5) * bin_size / grid


def _roi_align_samples(boxes, input_shape, output_size, spatial_scale,
                       sampling_ratio, aligned):
    """Where RoI Align samples, box by box: ``None`` for an ignored box,
    else ``(n, count, grid_w, bins)`` where ``bins[ph][pw]`` lists
    ``(iy, ix, taps)`` for every sample of the bin's grid, ``taps`` being
    :func:`_bilinear_taps` (empty off the map) and ``count`` the divisor."""
    boxes = normalize_boxes(boxes)
    n_images, _, height, width = (int(v) for v in input_shape)
    pooled_h, pooled_w = _pair(output_size)
    result = []
    for box in boxes:
        grid = _roi_align_grid(box, n_images, output_size, spatial_scale,
                               sampling_ratio, aligned)
        if grid is None:
            result.append(None)
            continue
        n, start_h, start_w, bin_h, bin_w, grid_h, grid_w = grid
        count = max(grid_h * grid_w, 1)
        bins = []
        for ph in range(pooled_h):
            row = []
            for pw in range(pooled_w):
                samples = []
                # range() of a negative grid is empty: such a bin has no
                # samples (and its count is clamped to 1).
                for iy in range(grid_h):
                    y = _sample_position(start_h, ph, bin_h, iy, grid_h)
                    for ix in range(grid_w):
                        x = _sample_position(start_w, pw, bin_w, ix, grid_w)
                        samples.append((iy, ix, _bilinear_taps(y, x, height, width)))
                row.append(samples)
            bins.append(row)
        result.append((n, count, grid_w, bins))
    return result


def roi_align_weights(boxes, input_shape, output_size, spatial_scale=1.0,
                      sampling_ratio=-1, aligned=False):
    """The RoI Align operator as an explicit sparse linear map.

    Returns a list with one entry per box: ``None`` for an ignored box, else
    ``(n, taps)`` where ``taps[ph][pw]`` is a list of ``(row, col, weight)``
    with the weight already divided by the sample count. Forward is
    ``y[k, c, ph, pw] = sum(w * x[n, c, row, col])`` and backward is its
    transpose, so both directions share this one loop over every sample.
    """
    result = []
    for entry in _roi_align_samples(boxes, input_shape, output_size,
                                    spatial_scale, sampling_ratio, aligned):
        if entry is None:
            result.append(None)
            continue
        n, count, _, bins = entry
        result.append((n, [[[(r, c, w / count) for _, _, taps in samples
                             for r, c, w in taps]
                            for samples in row] for row in bins]))
    return result


def roi_align_max_interpolated(x, boxes, output_size, spatial_scale=1.0,
                               sampling_ratio=-1, aligned=False):
    """mmcv's max-mode RoI Align, in float64: each bin's largest bilinear
    sample value (a sample off the map has the value 0), the first largest
    winning ties and a NaN beating any number (the first NaN wins, as in
    roi_pool), and the winner's index ``iy * grid_w + ix`` in the bin's
    grid, -1 for a winner off the map; a bin without samples gives 0 and
    -1. (Grids without int64 indices, see :func:`_grid_indexable`, are far
    too large for this loop over every sample.)"""
    x = np.asarray(x).astype(np.float64)
    pooled_h, pooled_w = _pair(output_size)
    k, c = len(normalize_boxes(boxes)), x.shape[1]
    y = np.zeros((k, c, pooled_h, pooled_w))
    winner = np.full((k, c, pooled_h, pooled_w), -1, np.int64)
    entries = _roi_align_samples(boxes, x.shape, output_size, spatial_scale,
                                 sampling_ratio, aligned)
    for i, entry in enumerate(entries):
        if entry is None:
            continue
        n, _, grid_w, bins = entry
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                seen = np.zeros(c, bool)
                for iy, ix, taps in bins[ph][pw]:
                    v = sum(w * x[n, :, r, col] for r, col, w in taps) \
                        if taps else np.zeros(c)
                    best = y[i, :, ph, pw]
                    better = ~seen | (v > best) | (np.isnan(v) & ~np.isnan(best))
                    seen = np.ones(c, bool)
                    y[i, better, ph, pw] = v[better]
                    winner[i, better, ph, pw] = iy * grid_w + ix if taps else -1
    return y, winner


def _grid_indexable(grid_h, grid_w):
    """Whether the interpolated max mode names the samples of a ``grid_h x
    grid_w`` grid by ``iy * grid_w + ix`` in an int64: at most 1e15 samples
    (curoi's largest represented grid) per side and fewer than 2**63 in
    all. Otherwise its winner is -1 and passes no gradient."""
    return grid_h <= 10**15 and grid_w <= 10**15 and grid_h * grid_w < 2**63


def _max_winner_taps(grid, ph, pw, index, height, width):
    """The bilinear taps of the sample that ``index`` names in bin (ph, pw)
    of a box's grid (see :func:`_roi_align_grid`): ``iy = index // grid_w``,
    ``ix = index % grid_w``. Empty when ``index`` is not in ``[0, grid_h *
    grid_w)`` (-1: no winner, or one off the map) or the sample is off the
    map."""
    _, start_h, start_w, bin_h, bin_w, grid_h, grid_w = grid
    index = int(index)
    if grid_h <= 0 or grid_w <= 0 or not 0 <= index < grid_h * grid_w:
        return []
    if not _grid_indexable(grid_h, grid_w):
        return []
    iy, ix = divmod(index, grid_w)
    return _bilinear_taps(_sample_position(start_h, ph, bin_h, iy, grid_h),
                          _sample_position(start_w, pw, bin_w, ix, grid_w),
                          height, width)


def roi_align_max_interpolated_gather(x, argmax, boxes, output_size,
                                      spatial_scale=1.0, sampling_ratio=-1,
                                      aligned=False):
    """The value of the sample that ``argmax`` names in each bin (0 where it
    names none), in float64: the interpolated max mode with its winners
    fixed, a linear map of ``x`` whose transpose is
    :func:`roi_align_max_interpolated_backward`."""
    x = np.asarray(x).astype(np.float64)
    argmax = np.asarray(argmax)
    boxes = normalize_boxes(boxes)
    n_images, _, height, width = x.shape
    y = np.zeros(argmax.shape)
    for k, box in enumerate(boxes):
        grid = _roi_align_grid(box, n_images, output_size, spatial_scale,
                               sampling_ratio, aligned)
        if grid is None:
            continue
        for c, ph, pw in np.ndindex(argmax.shape[1:]):
            taps = _max_winner_taps(grid, ph, pw, argmax[k, c, ph, pw], height, width)
            y[k, c, ph, pw] = sum(w * x[grid[0], c, r, col] for r, col, w in taps)
    return y


def roi_align_max_interpolated_backward(grad_output, argmax, boxes, input_shape,
                                        output_size, spatial_scale=1.0,
                                        sampling_ratio=-1, aligned=False):
    """Gradient of the interpolated max mode with respect to its input, in
    float64: each output's gradient goes to the bilinear taps of the sample
    that its ``argmax`` (the forward's) names, with their weights; an argmax
    outside ``[0, grid_h * grid_w)``, a sample off the map and an ignored
    box pass nothing."""
    g = np.asarray(grad_output).astype(np.float64)
    argmax = np.asarray(argmax)
    boxes = normalize_boxes(boxes)
    n_images, _, height, width = (int(v) for v in input_shape)
    gx = np.zeros((n_images, g.shape[1], height, width))
    for k, box in enumerate(boxes):
        grid = _roi_align_grid(box, n_images, output_size, spatial_scale,
                               sampling_ratio, aligned)
        if grid is None:
            continue
        for c, ph, pw in np.ndindex(g.shape[1:]):
            for r, col, w in _max_winner_taps(grid, ph, pw, argmax[k, c, ph, pw],
                                              height, width):
                gx[grid[0], c, r, col] += w * g[k, c, ph, pw]
    return gx


def roi_align(x, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
              aligned=False):
    """RoI Align forward, in float64. ``x`` is ``[N, C, H, W]``."""
    x = np.asarray(x).astype(np.float64)
    pooled_h, pooled_w = _pair(output_size)
    ops = roi_align_weights(boxes, x.shape, output_size, spatial_scale,
                            sampling_ratio, aligned)
    out = np.zeros((len(ops), x.shape[1], pooled_h, pooled_w), np.float64)
    for k, op in enumerate(ops):
        if op is None:
            continue
        n, taps = op
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                acc = np.zeros(x.shape[1], np.float64)
                for r, c, w in taps[ph][pw]:
                    acc += w * x[n, :, r, c]
                out[k, :, ph, pw] = acc
    return out


def roi_align_backward(grad_output, boxes, input_shape, output_size,
                       spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """Gradient of RoI Align with respect to its input, in float64."""
    g = np.asarray(grad_output).astype(np.float64)
    pooled_h, pooled_w = _pair(output_size)
    ops = roi_align_weights(boxes, input_shape, output_size, spatial_scale,
                            sampling_ratio, aligned)
    gx = np.zeros(tuple(int(v) for v in input_shape), np.float64)
    for k, op in enumerate(ops):
        if op is None:
            continue
        n, taps = op
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                for r, c, w in taps[ph][pw]:
                    gx[n, :, r, c] += w * g[k, :, ph, pw]
    return gx


def _bilinear_slopes(y, x, height, width):
    """d value/d y and d value/d x of the bilinear interpolation of
    :func:`_bilinear_taps` at (y, x), each as ``(row, col, weight)`` taps.

    Off the map (y < -1, y > H, x likewise) the sample adds nothing, so it
    moves nothing. Along y the value is ``(1 - ly) * v[y0] + ly * v[y0 + 1]``
    with ``y0 = floor(y)`` strictly inside ``(0, H - 1)``, of slope ``v[y0 +
    1] - v[y0]``; in the clamped bands (``y <= 0`` reads row 0, ``y >= H -
    1`` the last row) it does not depend on y: slope 0. So at an integer y
    inside the map the slope is that of the cell below it, ``[y, y + 1]``
    (the cell the forward's ``floor`` picks), and at ``y = 0`` and ``y = H -
    1`` it is 0. The other axis weighs the columns as the value does.
    """
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return [], []

    def value_weights(v, size):
        v = max(v, 0.0)
        lo = int(math.floor(v))
        if lo >= size - 1:
            return [(size - 1, 1.0)]
        return [(lo, 1.0 - (v - lo)), (lo + 1, v - lo)]

    def slope_weights(v, size):
        if not 0.0 < v < size - 1:
            return []
        lo = int(math.floor(v))
        return [(lo, -1.0), (lo + 1, 1.0)]

    d_y = [(r, c, wr * wc) for r, wr in slope_weights(y, height)
           for c, wc in value_weights(x, width)]
    d_x = [(r, c, wr * wc) for r, wr in value_weights(y, height)
           for c, wc in slope_weights(x, width)]
    return d_y, d_x


def roi_align_boxes_backward(grad_output, x, boxes, output_size,
                             spatial_scale=1.0, sampling_ratio=-1,
                             aligned=False):
    """Gradient of RoI Align with respect to its boxes, in float64: ``[K,
    5]``, d/d(x1, y1, x2, y2) in columns 1-4, 0 in the batch column and for
    an ignored box.

    By the chain rule through each sample's position. Along one axis,
    ``start = x1*s - offset`` and ``size = (x2 - x1)*s`` (not aligned:
    ``max(size, 1)``, a constant where the max picks 1), and sample ``i`` of
    bin ``p`` lies at ``start + size * a`` with ``a = (p + (i + 0.5)/grid) /
    pooled``; so ``d pos/d x1 = s - s*a`` and ``d pos/d x2 = s*a`` (``s`` and
    0 where the size is the constant 1). The sampling grid and the divisor
    are piecewise constant in the box and count as constants; the value's
    slope at each sample is :func:`_bilinear_slopes`.
    """
    x = np.asarray(x).astype(np.float64)
    g = np.asarray(grad_output).astype(np.float64)
    boxes = normalize_boxes(boxes)
    n_images, _, height, width = x.shape
    pooled_h, pooled_w = _pair(output_size)
    s = float(spatial_scale)
    offset = 0.5 if aligned else 0.0
    result = np.zeros((len(boxes), 5))
    for k, box in enumerate(boxes):
        grid = _roi_align_grid(box, n_images, output_size, spatial_scale,
                               sampling_ratio, aligned)
        if grid is None:
            continue
        n, start_h, start_w, bin_h, bin_w, grid_h, grid_w = grid
        count = max(grid_h * grid_w, 1)
        _, x1, y1, x2, y2 = (float(v) for v in box)
        # d size / d (far corner): s, or 0 where max(size, 1) picked 1.
        raw_w = (x2 * s - offset) - (x1 * s - offset)
        raw_h = (y2 * s - offset) - (y1 * s - offset)
        ds_w = 0.0 if (not aligned and raw_w < 1.0) else s
        ds_h = 0.0 if (not aligned and raw_h < 1.0) else s
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                gk = g[k, :, ph, pw] / count
                for iy in range(grid_h):
                    y = _sample_position(start_h, ph, bin_h, iy, grid_h)
                    a_y = (ph + (iy + 0.5) / grid_h) / pooled_h
                    for ix in range(grid_w):
                        xx = _sample_position(start_w, pw, bin_w, ix, grid_w)
                        a_x = (pw + (ix + 0.5) / grid_w) / pooled_w
                        d_y, d_x = _bilinear_slopes(y, xx, height, width)
                        dv_dy = float(sum(w * np.dot(gk, x[n, :, r, c])
                                          for r, c, w in d_y))
                        dv_dx = float(sum(w * np.dot(gk, x[n, :, r, c])
                                          for r, c, w in d_x))
                        result[k, 1] += dv_dx * (s - ds_w * a_x)
                        result[k, 2] += dv_dy * (s - ds_h * a_y)
                        result[k, 3] += dv_dx * ds_w * a_x
                        result[k, 4] += dv_dy * ds_h * a_y
    return result


# --------------------------------------------------------------------------
# RoI Align (average) on rotated boxes, detectron2 / mmcv semantics
# --------------------------------------------------------------------------

ROTATED_CONVENTIONS = ("detectron2", "mmcv")

# curoi's documented limit: a box whose scaled centre or size exceeds this
# magnitude reads nothing (float resolves nothing on the map there).
ROTATED_MAX_EXTENT = 1e30


def _rotated_geometry(box, spatial_scale, convention, aligned, clockwise):
    """A rotated box (batch index, cx, cy, w, h, angle) in feature-map
    coordinates: ``(cy, cx, h, w, theta)``, or None when it reads nothing.

    detectron2 (ROIAlignRotated): the centre always shifted by half a pixel,
    no minimum size, the angle in degrees (counter-clockwise); it has no
    ``aligned`` or ``clockwise``. mmcv (RoIAlignRotated): the shift only
    when ``aligned``, sizes of at least 1 x 1 pixel when not, the angle in
    radians, negated when ``clockwise``.
    """
    _, x, y, width, height, angle = (float(v) for v in box)
    s = float(spatial_scale)
    if convention == "detectron2":
        shifted = True
        theta = angle * math.pi / 180.0
    elif convention == "mmcv":
        shifted = bool(aligned)
        theta = -angle if clockwise else angle
    else:
        raise ValueError(convention)
    offset = 0.5 if shifted else 0.0
    cx, cy = x * s - offset, y * s - offset
    w, h = width * s, height * s
    if not shifted:
        w, h = max(w, 1.0), max(h, 1.0)
    if max(abs(cx), abs(cy), abs(w), abs(h)) > ROTATED_MAX_EXTENT:
        return None
    return cy, cx, h, w, theta


def _linear_range(a, b, lo, hi):
    """The real t with lo <= a*t + b <= hi, as (t0, t1); None if empty."""
    if a == 0:
        return (-math.inf, math.inf) if lo <= b <= hi else None
    t0, t1 = (lo - b) / a, (hi - b) / a
    return (min(t0, t1), max(t0, t1))


def _index_range(t_range, base, bin_size, grid):
    """The indices i in [0, grid) with base + (i + 0.5)*bin_size/grid in
    t_range, padded by two on each side (the exact test is made per
    sample)."""
    if t_range is None or grid <= 0:
        return range(0)
    step = bin_size / grid
    if step == 0:
        return range(grid)
    i0, i1 = ((t - base) / step - 0.5 for t in t_range)
    i0, i1 = min(i0, i1), max(i0, i1)
    if i1 < 0 or i0 >= grid:
        return range(0)
    start = max(int(math.floor(max(i0, -1.0))) - 2, 0)
    stop = min(int(math.ceil(min(i1, float(grid)))) + 3, grid)
    return range(start, stop)


def _rotated_points(geometry, input_shape, output_size, sampling_ratio, clip):
    """Where one rotated box (:func:`_rotated_geometry`) samples: ``(count,
    grid_h, grid_w, bins)`` where ``bins[ph][pw]`` lists ``(iy, ix, yy, xx,
    y, x)`` for every sample of the bin's grid: its indices, its position in
    the box and on the map.

    ``clip=True`` lists only the samples that can land on the map: rows of
    samples (one yy each) whose line does not cross the map, widened by a
    pixel, are skipped, and in the others only the samples whose xx lies
    where the line crosses the widened map are taken (closed form: each map
    coordinate is linear in xx). That changes no sum, and it makes boxes far
    larger than the map computable here."""
    _, _, height, width = (int(v) for v in input_shape)
    pooled_h, pooled_w = _pair(output_size)
    cy, cx, h, w, theta = geometry
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    bin_h, bin_w = h / pooled_h, w / pooled_w
    if sampling_ratio > 0:
        grid_h = grid_w = int(sampling_ratio)
    else:
        grid_h, grid_w = int(math.ceil(h / pooled_h)), int(math.ceil(w / pooled_w))
    count = max(grid_h * grid_w, 1)
    if not clip and max(grid_h, 0) * max(grid_w, 0) * pooled_h * pooled_w > 10**7:
        raise ValueError("too many samples for the brute-force reference: clip=True")
    margin = 1.0
    corners = [(y - cy) * cos_t + (x - cx) * sin_t
               for y in (-1.0, float(height)) for x in (-1.0, float(width))]
    yy_range = (min(corners) - margin, max(corners) + margin)
    bins = []
    for ph in range(pooled_h):
        row = []
        base_h = -h / 2 + ph * bin_h
        rows = (_index_range(yy_range, base_h, bin_h, grid_h) if clip
                else range(grid_h))
        for pw in range(pooled_w):
            base_w = -w / 2 + pw * bin_w
            points = []
            for iy in rows:
                yy = -h / 2 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                columns = range(grid_w)
                if clip:
                    on_x = _linear_range(cos_t, yy * sin_t + cx, -1 - margin,
                                         width + margin)
                    on_y = _linear_range(-sin_t, yy * cos_t + cy, -1 - margin,
                                         height + margin)
                    both = None
                    if on_x is not None and on_y is not None:
                        t0, t1 = max(on_x[0], on_y[0]), min(on_x[1], on_y[1])
                        both = (t0, t1) if t0 <= t1 else None
                    columns = _index_range(both, base_w, bin_w, grid_w)
                for ix in columns:
                    xx = -w / 2 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                    y = yy * cos_t - xx * sin_t + cy
                    x = yy * sin_t + xx * cos_t + cx
                    points.append((iy, ix, yy, xx, y, x))
            row.append(points)
        bins.append(row)
    return count, grid_h, grid_w, bins


def _roi_align_rotated_samples(boxes, input_shape, output_size, spatial_scale,
                               sampling_ratio, convention, aligned, clockwise,
                               clip):
    """As :func:`_roi_align_samples` for rotated boxes: ``None`` for a box
    that reads nothing, else ``(n, count, bins)`` where ``bins[ph][pw]``
    lists the taps of every sample of the bin's grid (``clip`` as in
    :func:`_rotated_points`)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    n_images, _, height, width = (int(v) for v in input_shape)
    result = []
    for box in boxes:
        n = _batch_index(box, n_images)
        geometry = None if n is None else _rotated_geometry(
            box, spatial_scale, convention, aligned, clockwise)
        if geometry is None:
            result.append(None)
            continue
        count, _, _, bins = _rotated_points(geometry, input_shape, output_size,
                                            sampling_ratio, clip)
        result.append((n, count, [[[_bilinear_taps(y, x, height, width)
                                    for _, _, _, _, y, x in points]
                                   for points in row] for row in bins]))
    return result


def roi_align_rotated_weights(boxes, input_shape, output_size, spatial_scale=1.0,
                              sampling_ratio=-1, convention="detectron2",
                              aligned=True, clockwise=False, clip=False):
    """Rotated RoI Align as an explicit sparse linear map, as
    :func:`roi_align_weights`: per box ``None`` or ``(n, taps)`` with
    ``taps[ph][pw]`` a list of ``(row, col, weight / count)``."""
    result = []
    for entry in _roi_align_rotated_samples(boxes, input_shape, output_size,
                                            spatial_scale, sampling_ratio,
                                            convention, aligned, clockwise, clip):
        if entry is None:
            result.append(None)
            continue
        n, count, bins = entry
        result.append((n, [[[(r, c, wt / count) for taps in samples
                             for r, c, wt in taps]
                            for samples in row] for row in bins]))
    return result


def roi_align_rotated(x, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
                      convention="detectron2", aligned=True, clockwise=False,
                      clip=False):
    """Rotated RoI Align forward, in float64. ``x`` is ``[N, C, H, W]``,
    ``boxes`` ``[K, 6]`` (batch index, cx, cy, w, h, angle)."""
    x = np.asarray(x).astype(np.float64)
    pooled_h, pooled_w = _pair(output_size)
    ops = roi_align_rotated_weights(boxes, x.shape, output_size, spatial_scale,
                                    sampling_ratio, convention, aligned, clockwise,
                                    clip)
    out = np.zeros((len(ops), x.shape[1], pooled_h, pooled_w), np.float64)
    for k, op in enumerate(ops):
        if op is None:
            continue
        n, taps = op
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                acc = np.zeros(x.shape[1], np.float64)
                for r, c, wt in taps[ph][pw]:
                    acc += wt * x[n, :, r, c]
                out[k, :, ph, pw] = acc
    return out


def roi_align_rotated_backward(grad_output, boxes, input_shape, output_size,
                               spatial_scale=1.0, sampling_ratio=-1,
                               convention="detectron2", aligned=True,
                               clockwise=False, clip=False):
    """Gradient of rotated RoI Align with respect to its input, in float64."""
    g = np.asarray(grad_output).astype(np.float64)
    pooled_h, pooled_w = _pair(output_size)
    ops = roi_align_rotated_weights(boxes, input_shape, output_size, spatial_scale,
                                    sampling_ratio, convention, aligned, clockwise,
                                    clip)
    gx = np.zeros(tuple(int(v) for v in input_shape), np.float64)
    for k, op in enumerate(ops):
        if op is None:
            continue
        n, taps = op
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                for r, c, wt in taps[ph][pw]:
                    gx[n, :, r, c] += wt * g[k, :, ph, pw]
    return gx


def roi_align_rotated_boxes_backward(grad_output, x, boxes, output_size,
                                     spatial_scale=1.0, sampling_ratio=-1,
                                     convention="detectron2", aligned=True,
                                     clockwise=False, clip=False):
    """Gradient of rotated RoI Align with respect to its boxes, in float64:
    ``[K, 6]``, d/d(cx, cy, w, h, angle) of the box rows as given (the angle
    in degrees for detectron2, in radians for mmcv, sign as passed) in
    columns 1-5, 0 in the batch column and for a box that reads nothing.

    By the chain rule through each sample's position. In the box, sample
    ``(iy, ix)`` of bin ``(ph, pw)`` lies at ``yy = -h/2 + ph*h/PH + (iy +
    0.5)*h/(PH*grid_h)`` (``xx`` alike), which is ``h`` times ``f_y = (ph +
    (iy + 0.5)/grid_h)/PH - 1/2``; on the map at ``y = yy cos - xx sin +
    cy``, ``x = yy sin + xx cos + cx``. The feature-map numbers follow the
    box row as :func:`_rotated_geometry` computes them: ``cx = X*s - off``
    (d/dX = s), ``w = W*s`` (d/dW = s, or 0 where mmcv's ``max(w, 1)``
    picks 1), ``theta = angle*pi/180`` (detectron2) or ``+-angle`` (mmcv,
    minus when clockwise). The sampling grid and the divisor are piecewise
    constant in the box and count as constants; the value's slope at each
    sample is :func:`_bilinear_slopes`. ``clip`` as in
    :func:`_rotated_points` (samples off the map have no slope anyway).
    """
    x = np.asarray(x).astype(np.float64)
    g = np.asarray(grad_output).astype(np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    n_images, _, height, width = x.shape
    pooled_h, pooled_w = _pair(output_size)
    s = float(spatial_scale)
    result = np.zeros((len(boxes), 6))
    for k, box in enumerate(boxes):
        n = _batch_index(box, n_images)
        geometry = None if n is None else _rotated_geometry(
            box, spatial_scale, convention, aligned, clockwise)
        if geometry is None:
            continue
        _, _, _, _, theta = geometry
        cos_t, sin_t = math.cos(theta), math.sin(theta)
        # d(w, h)/d(W, H): s, or 0 where max(size, 1) picked 1 (mmcv, not
        # aligned; at exactly 1 the size is its own).
        at_least_one = convention == "mmcv" and not aligned
        dw = 0.0 if at_least_one and float(box[3]) * s < 1.0 else s
        dh = 0.0 if at_least_one and float(box[4]) * s < 1.0 else s
        if convention == "detectron2":
            dtheta = math.pi / 180.0
        else:
            dtheta = -1.0 if clockwise else 1.0
        count, grid_h, grid_w, bins = _rotated_points(
            geometry, x.shape, output_size, sampling_ratio, clip)
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                gk = g[k, :, ph, pw] / count
                for iy, ix, yy, xx, y, xm in bins[ph][pw]:
                    d_y, d_x = _bilinear_slopes(y, xm, height, width)
                    dv_dy = float(sum(wt * np.dot(gk, x[n, :, r, c])
                                      for r, c, wt in d_y))
                    dv_dx = float(sum(wt * np.dot(gk, x[n, :, r, c])
                                      for r, c, wt in d_x))
                    f_y = (ph + (iy + 0.5) / grid_h) / pooled_h - 0.5
                    f_x = (pw + (ix + 0.5) / grid_w) / pooled_w - 0.5
                    # d(y, x) per unit of cx, cy, w, h, theta.
                    moves = ((0.0, s), (s, 0.0),
                             (-f_x * sin_t * dw, f_x * cos_t * dw),
                             (f_y * cos_t * dh, f_y * sin_t * dh),
                             (-(yy * sin_t + xx * cos_t) * dtheta,
                              (yy * cos_t - xx * sin_t) * dtheta))
                    for j, (m_y, m_x) in enumerate(moves):
                        result[k, j + 1] += dv_dy * m_y + dv_dx * m_x
    return result


# --------------------------------------------------------------------------
# RoI Pool (max)
# --------------------------------------------------------------------------


def _pool_bins(box, height, width, pooled_h, pooled_w, s, convention):
    """Per bin, the half-open pixel ranges ``(h0, h1, w0, w1)``, or None.

    None means the whole box is degenerate (mmcv convention, no positive
    extent) and every bin is empty.
    """
    _, x1, y1, x2, y2 = (float(v) for v in box)
    if convention == "torchvision":
        # Caffe / torchvision / ONNX MaxRoiPool: integer box corners
        # round(x*s), inclusive end, at least one pixel wide.
        start_w = round_half_away(x1 * s)
        start_h = round_half_away(y1 * s)
        end_w = round_half_away(x2 * s)
        end_h = round_half_away(y2 * s)
        roi_w = max(end_w - start_w + 1, 1)
        roi_h = max(end_h - start_h + 1, 1)
        bin_h = roi_h / pooled_h
        bin_w = roi_w / pooled_w

        def hrange(p):
            return (math.floor(p * bin_h) + start_h,
                    math.ceil((p + 1) * bin_h) + start_h)

        def wrange(p):
            return (math.floor(p * bin_w) + start_w,
                    math.ceil((p + 1) * bin_w) + start_w)
    elif convention == "mmcv":
        # mmcv / mmdetection: continuous corners x1*s and (x2+1)*s.
        start_w = x1 * s
        start_h = y1 * s
        roi_w = (x2 + 1.0) * s - start_w
        roi_h = (y2 + 1.0) * s - start_h
        if roi_w <= 0 or roi_h <= 0:
            return None
        bin_h = roi_h / pooled_h
        bin_w = roi_w / pooled_w

        def hrange(p):
            return (math.floor(p * bin_h + start_h),
                    math.ceil((p + 1) * bin_h + start_h))

        def wrange(p):
            return (math.floor(p * bin_w + start_w),
                    math.ceil((p + 1) * bin_w + start_w))
    else:
        raise ValueError(convention)

    def clip(v, hi):
        return min(max(v, 0), hi)

    bins = []
    for ph in range(pooled_h):
        h0, h1 = hrange(ph)
        h0, h1 = clip(h0, height), clip(h1, height)
        row = []
        for pw in range(pooled_w):
            w0, w1 = wrange(pw)
            w0, w1 = clip(w0, width), clip(w1, width)
            row.append((h0, h1, w0, w1))
        bins.append(row)
    return bins


def _greater(v, best):
    """Max-pool order: NaN is larger than any number; the first NaN wins."""
    if math.isnan(best):
        return False
    if math.isnan(v):
        return True
    return v > best


def roi_pool(x, boxes, output_size, spatial_scale=1.0,
             convention="torchvision"):
    """RoI max pool forward. Returns ``(y, argmax)``.

    ``y`` is float64; ``argmax`` is int64, the flat index ``h * W + w`` in
    the feature plane of the first maximum in row-major order, -1 for an
    empty bin (whose output is 0) and for ignored boxes.
    """
    x = np.asarray(x).astype(np.float64)
    n_images, channels, height, width = x.shape
    pooled_h, pooled_w = _pair(output_size)
    boxes = normalize_boxes(boxes)
    k_boxes = boxes.shape[0]
    out = np.zeros((k_boxes, channels, pooled_h, pooled_w), np.float64)
    arg = np.full((k_boxes, channels, pooled_h, pooled_w), -1, np.int64)
    for k, box in enumerate(boxes):
        n = _batch_index(box, n_images)
        if n is None:
            continue
        bins = _pool_bins(box, height, width, pooled_h, pooled_w,
                          float(spatial_scale), convention)
        if bins is None:
            continue
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                h0, h1, w0, w1 = bins[ph][pw]
                if h1 <= h0 or w1 <= w0:
                    continue  # empty bin: 0 and -1
                for c in range(channels):
                    best = None
                    best_idx = -1
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            v = x[n, c, h, w]
                            if best is None or _greater(v, best):
                                best = v
                                best_idx = h * width + w
                    out[k, c, ph, pw] = best
                    arg[k, c, ph, pw] = best_idx
    return out, arg


def roi_pool_backward(grad_output, argmax, boxes, input_shape):
    """RoI max pool backward: scatter-add each gradient to its argmax."""
    g = np.asarray(grad_output).astype(np.float64)
    argmax = np.asarray(argmax)
    n_images, channels, height, width = (int(v) for v in input_shape)
    boxes = normalize_boxes(boxes)
    gx = np.zeros((n_images, channels, height * width), np.float64)
    for k, box in enumerate(boxes):
        n = _batch_index(box, n_images)
        if n is None:
            continue
        for c in range(channels):
            for ph in range(g.shape[2]):
                for pw in range(g.shape[3]):
                    a = int(argmax[k, c, ph, pw])
                    if a >= 0:
                        gx[n, c, a] += g[k, c, ph, pw]
    return gx.reshape(n_images, channels, height, width)


# --------------------------------------------------------------------------
# Spatial pyramid pooling (SPPnet) over boxes
# --------------------------------------------------------------------------
#
# For each level l, RoI Pool's l x l bins; the output row of a box is the
# levels' [C, l, l] blocks one after the other: [K, C * sum(l * l)].


def roi_spp(x, boxes, levels, spatial_scale=1.0, convention="torchvision",
            mode="max"):
    """Spatial pyramid pooling forward, ``(y, argmax)``: ``y`` float64 ``[K,
    C * sum(l*l)]``. "max" concatenates :func:`roi_pool` per level (argmax
    as there, int64); "avg" takes the mean of each of the same bins
    (:func:`_pool_bins`), 0 for an empty bin or an ignored box, and its
    argmax is all -1."""
    x = np.asarray(x).astype(np.float64)
    boxes = normalize_boxes(boxes)
    n_images, channels, height, width = x.shape
    ys, args = [], []
    for l in (int(v) for v in levels):
        if mode == "max":
            y, a = roi_pool(x, boxes, (l, l), spatial_scale, convention)
        else:
            y = np.zeros((len(boxes), channels, l, l))
            a = np.full(y.shape, -1, np.int64)
            for k, box in enumerate(boxes):
                n = _batch_index(box, n_images)
                if n is None:
                    continue
                bins = _pool_bins(box, height, width, l, l, float(spatial_scale),
                                  convention)
                if bins is None:
                    continue
                for ph in range(l):
                    for pw in range(l):
                        h0, h1, w0, w1 = bins[ph][pw]
                        if h1 > h0 and w1 > w0:
                            y[k, :, ph, pw] = x[n, :, h0:h1, w0:w1].mean(axis=(1, 2))
        ys.append(y.reshape(len(boxes), -1))
        args.append(a.reshape(len(boxes), -1))
    if not ys:
        return np.zeros((len(boxes), 0)), np.zeros((len(boxes), 0), np.int64)
    return np.concatenate(ys, axis=1), np.concatenate(args, axis=1)


def roi_spp_backward(grad_output, argmax, boxes, levels, input_shape,
                     spatial_scale=1.0, convention="torchvision", mode="max"):
    """Spatial pyramid pooling backward, in float64: "max" is
    :func:`roi_pool_backward` of each level's block with its argmax; "avg"
    spreads each entry evenly over its bin."""
    g = np.asarray(grad_output).astype(np.float64)
    boxes = normalize_boxes(boxes)
    n_images, channels, height, width = (int(v) for v in input_shape)
    gx = np.zeros((n_images, channels, height, width))
    first = 0
    for l in (int(v) for v in levels):
        size = channels * l * l
        g_l = g[:, first:first + size].reshape(len(boxes), channels, l, l)
        if mode == "max":
            a_l = np.asarray(argmax)[:, first:first + size].reshape(g_l.shape)
            gx += roi_pool_backward(g_l, a_l, boxes, input_shape)
        else:
            for k, box in enumerate(boxes):
                n = _batch_index(box, n_images)
                if n is None:
                    continue
                bins = _pool_bins(box, height, width, l, l, float(spatial_scale),
                                  convention)
                if bins is None:
                    continue
                for ph in range(l):
                    for pw in range(l):
                        h0, h1, w0, w1 = bins[ph][pw]
                        if h1 > h0 and w1 > w0:
                            area = (h1 - h0) * (w1 - w0)
                            gx[n, :, h0:h1, w0:w1] += (g_l[k, :, ph, pw] / area)[:, None, None]
        first += size
    return gx


# --------------------------------------------------------------------------
# Position-sensitive RoI Pool and RoI Align (R-FCN), torchvision's semantics
# --------------------------------------------------------------------------
#
# The input has C = C_out * PH * PW channels; output channel c reads, in bin
# (ph, pw), only input channel (c * PH + ph) * PW + pw. Outputs are
# [K, C_out, PH, PW] with C_out = C // (PH * PW).


def _ps_channel(c, ph, pw, pooled_h, pooled_w):
    return (c * pooled_h + ph) * pooled_w + pw


def _ps_pool_range(lo, hi, p, pooled, size, s):
    """Bin p of one axis of torchvision's ps_roi_pool, in float64 as its
    double kernel computes it: corners round(v * s) (halves away from zero),
    size max(end - start, 1), bin [floor(p * bin) + start,
    ceil((p + 1) * bin) + start), both ends clipped to [0, size - 1] (so the
    last row/column is never read). Returns (start, end) as ints; a range
    that is not finite (overflow) is empty."""
    start = float(round_half_away(lo * s))
    end = float(round_half_away(hi * s))
    bin_size = max(end - start, 1.0) / pooled
    a = math.floor(p * bin_size) + start
    b = math.ceil((p + 1) * bin_size) + start
    if size < 1:
        return 0, 0
    return (int(min(max(a, 0), size - 1)), int(min(max(b, 0), size - 1)))


def _ps_pool_bins(boxes, input_shape, output_size, spatial_scale):
    """Per box, None (ignored) or ``(n, bins)`` with ``bins[ph][pw] =
    (h0, h1, w0, w1)``, half-open."""
    n_images, _, height, width = (int(v) for v in input_shape)
    pooled_h, pooled_w = _pair(output_size)
    s = float(spatial_scale)
    result = []
    for box in normalize_boxes(boxes):
        n = _batch_index(box, n_images)
        if n is None:
            result.append(None)
            continue
        _, x1, y1, x2, y2 = (float(v) for v in box)
        bins = [[_ps_pool_range(y1, y2, ph, pooled_h, height, s)
                 + _ps_pool_range(x1, x2, pw, pooled_w, width, s)
                 for pw in range(pooled_w)] for ph in range(pooled_h)]
        result.append((n, bins))
    return result


def ps_roi_pool(x, boxes, output_size, spatial_scale=1.0):
    """Position-sensitive RoI Pool forward (the mean of each bin, 0 for an
    empty bin), in float64. ``x`` is ``[N, C, H, W]``."""
    x = np.asarray(x).astype(np.float64)
    pooled_h, pooled_w = _pair(output_size)
    c_out = x.shape[1] // (pooled_h * pooled_w)
    entries = _ps_pool_bins(boxes, x.shape, output_size, spatial_scale)
    out = np.zeros((len(entries), c_out, pooled_h, pooled_w), np.float64)
    for k, entry in enumerate(entries):
        if entry is None:
            continue
        n, bins = entry
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                h0, h1, w0, w1 = bins[ph][pw]
                if h1 <= h0 or w1 <= w0:
                    continue
                for c in range(c_out):
                    ci = _ps_channel(c, ph, pw, pooled_h, pooled_w)
                    total = 0.0
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            total += x[n, ci, h, w]
                    out[k, c, ph, pw] = total / ((h1 - h0) * (w1 - w0))
    return out


def ps_roi_pool_backward(grad_output, boxes, input_shape, output_size,
                         spatial_scale=1.0):
    """The adjoint of :func:`ps_roi_pool`: each output gradient, over its
    bin's area, added to every pixel the forward averaged. (Not
    torchvision's backward, which clips bin ends to H and W instead of H-1
    and W-1 and so does not match its own forward at those edges.)"""
    g = np.asarray(grad_output).astype(np.float64)
    pooled_h, pooled_w = _pair(output_size)
    gx = np.zeros(tuple(int(v) for v in input_shape), np.float64)
    c_out = gx.shape[1] // (pooled_h * pooled_w)
    for k, entry in enumerate(_ps_pool_bins(boxes, input_shape, output_size,
                                            spatial_scale)):
        if entry is None:
            continue
        n, bins = entry
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                h0, h1, w0, w1 = bins[ph][pw]
                if h1 <= h0 or w1 <= w0:
                    continue
                area = (h1 - h0) * (w1 - w0)
                for c in range(c_out):
                    ci = _ps_channel(c, ph, pw, pooled_h, pooled_w)
                    gx[n, ci, h0:h1, w0:w1] += g[k, c, ph, pw] / area
    return gx


def ps_roi_align(x, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1):
    """Position-sensitive RoI Align forward, in float64: RoI Align with
    aligned=True (torchvision's ps_roi_align always shifts by half a pixel
    and has no minimum box size), bin (ph, pw) of output channel c reading
    its own input channel. A bin without samples (empty box, adaptive grid)
    gives 0 (torchvision: 0 / 0)."""
    x = np.asarray(x).astype(np.float64)
    pooled_h, pooled_w = _pair(output_size)
    c_out = x.shape[1] // (pooled_h * pooled_w)
    ops = roi_align_weights(boxes, x.shape, output_size, spatial_scale,
                            sampling_ratio, aligned=True)
    out = np.zeros((len(ops), c_out, pooled_h, pooled_w), np.float64)
    for k, op in enumerate(ops):
        if op is None:
            continue
        n, taps = op
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                channels = [_ps_channel(c, ph, pw, pooled_h, pooled_w)
                            for c in range(c_out)]
                acc = np.zeros(c_out, np.float64)
                for r, col, w in taps[ph][pw]:
                    acc += w * x[n, channels, r, col]
                out[k, :, ph, pw] = acc
    return out


def ps_roi_align_backward(grad_output, boxes, input_shape, output_size,
                          spatial_scale=1.0, sampling_ratio=-1):
    """Gradient of :func:`ps_roi_align` with respect to its input, in
    float64: the transpose of the same taps."""
    g = np.asarray(grad_output).astype(np.float64)
    pooled_h, pooled_w = _pair(output_size)
    gx = np.zeros(tuple(int(v) for v in input_shape), np.float64)
    c_out = gx.shape[1] // (pooled_h * pooled_w)
    ops = roi_align_weights(boxes, input_shape, output_size, spatial_scale,
                            sampling_ratio, aligned=True)
    for k, op in enumerate(ops):
        if op is None:
            continue
        n, taps = op
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                channels = [_ps_channel(c, ph, pw, pooled_h, pooled_w)
                            for c in range(c_out)]
                for r, col, w in taps[ph][pw]:
                    gx[n, channels, r, col] += w * g[k, :, ph, pw]
    return gx


# --------------------------------------------------------------------------
# Precise RoI Pooling (Jiang et al., ECCV 2018; mmcv's PrRoIPool)
# --------------------------------------------------------------------------
#
# The map is extended by zeros beyond its pixels and interpolated bilinearly
# everywhere: on the unit cell [i, i+1] x [j, j+1] the surface is bilinear
# between its four corner pixels, a corner off the map counting 0 (so the
# surface falls to 0 across the cells around the map, and is 0 beyond). A
# bin's value is the integral of that surface over the bin, summed cell by
# cell as mmcv's PrRoIPoolingMatCalculation does, divided by the bin's area.
# Corners are x * spatial_scale (no half-pixel shift); the box's size is
# max(x2 - x1, 0) * s split into equal bins: bin p spans [start + b * p,
# that + b]. A bin of zero width or height (or not finite edges) gives 0.


def _prroi_bin(lo_corner, hi_corner, p, pooled, s):
    """Bin p along one axis, as its (lo, hi) edges in float64, or None when
    it is empty."""
    start = lo_corner * s
    size = hi_corner * s - start
    size = size if size > 0 or math.isnan(size) else 0.0
    b = size / pooled
    lo = start + b * p
    hi = lo + b
    if not (math.isfinite(lo) and math.isfinite(hi) and hi - lo > 0
            and math.isfinite(1.0 / (hi - lo))):
        return None
    return lo, hi


def _prroi_cells(lo, hi, size):
    """The unit cells [c, c + 1] that [lo, hi] overlaps and that touch the
    map (c from -1 to size - 1), as (c, s, t): the overlap is [c + s, c + t].
    Cells further out have all four corners off the map."""
    cells = []
    for c in range(max(math.floor(lo), -1), min(math.ceil(hi), size)):
        s = max(lo, c) - c
        t = min(hi, c + 1) - c
        if t > s:
            cells.append((c, s, t))
    return cells


def _prroi_corner_weights(s, t):
    """The integrals over [s, t] (within one cell) of the linear weights of
    the cell's two corners, 1 - u and u, each written as the length times
    the mean weight (no cancellation for a narrow interval)."""
    return (t - s) * (1.0 - 0.5 * (s + t)), (t - s) * 0.5 * (s + t)


def _prroi_taps(lo, hi, size):
    """The (pixel, weight) pairs of one axis's integral over [lo, hi]: the
    corners of every cell, pixels off the map left out."""
    taps = []
    for c, s, t in _prroi_cells(lo, hi, size):
        for pixel, weight in zip((c, c + 1), _prroi_corner_weights(s, t)):
            if 0 <= pixel < size:
                taps.append((pixel, weight))
    return taps


def _prroi_boxes(boxes, input_shape, output_size, spatial_scale):
    """Per box, None (ignored) or ``(n, bins)``, ``bins[ph][pw]`` None
    (empty) or ``((y_lo, y_hi), (x_lo, x_hi))``."""
    n_images = int(input_shape[0])
    pooled_h, pooled_w = _pair(output_size)
    s = float(spatial_scale)
    result = []
    for box in normalize_boxes(boxes):
        n = _batch_index(box, n_images)
        if n is None:
            result.append(None)
            continue
        _, x1, y1, x2, y2 = (float(v) for v in box)
        bins = [[None] * pooled_w for _ in range(pooled_h)]
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                ey = _prroi_bin(y1, y2, ph, pooled_h, s)
                ex = _prroi_bin(x1, x2, pw, pooled_w, s)
                if ey is not None and ex is not None:
                    bins[ph][pw] = (ey, ex)
        result.append((n, bins))
    return result


def _prroi_bin_taps(ey, ex, height, width):
    """The (row, col, weight) taps of a bin's value: cell-corner
    coefficients over the area."""
    area = (ey[1] - ey[0]) * (ex[1] - ex[0])
    return [(r, c, wy * wx / area) for r, wy in _prroi_taps(*ey, height)
            for c, wx in _prroi_taps(*ex, width)]


def prroi_pool(x, boxes, output_size, spatial_scale=1.0):
    """Precise RoI Pooling forward, in float64. ``x`` is ``[N, C, H, W]``."""
    x = np.asarray(x).astype(np.float64)
    _, channels, height, width = x.shape
    pooled_h, pooled_w = _pair(output_size)
    entries = _prroi_boxes(boxes, x.shape, output_size, spatial_scale)
    out = np.zeros((len(entries), channels, pooled_h, pooled_w), np.float64)
    for k, entry in enumerate(entries):
        if entry is None:
            continue
        n, bins = entry
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                if bins[ph][pw] is None:
                    continue
                for r, c, w in _prroi_bin_taps(*bins[ph][pw], height, width):
                    out[k, :, ph, pw] += w * x[n, :, r, c]
    return out


def prroi_pool_backward(grad_output, boxes, input_shape, output_size,
                        spatial_scale=1.0):
    """Gradient of :func:`prroi_pool` with respect to its input, in float64:
    the transpose of the same taps."""
    g = np.asarray(grad_output).astype(np.float64)
    shape = tuple(int(v) for v in input_shape)
    _, _, height, width = shape
    gx = np.zeros(shape, np.float64)
    pooled_h, pooled_w = _pair(output_size)
    for k, entry in enumerate(_prroi_boxes(boxes, shape, output_size, spatial_scale)):
        if entry is None:
            continue
        n, bins = entry
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                if bins[ph][pw] is None:
                    continue
                for r, c, w in _prroi_bin_taps(*bins[ph][pw], height, width):
                    gx[n, :, r, c] += w * g[k, :, ph, pw]
    return gx


def _zero_padded_lerp(line, v):
    """Linear interpolation of a 1-D array of values (``[..., L]``) at v,
    with 0 for the positions off it: values at floor(v) and floor(v) + 1."""
    size = line.shape[-1]
    i = math.floor(v)
    t = v - i
    total = np.zeros(line.shape[:-1], np.float64)
    if 0 <= i < size:
        total = total + (1.0 - t) * line[..., i]
    if 0 <= i + 1 < size:
        total = total + t * line[..., i + 1]
    return total


def _prroi_line_integral(plane, lo, hi, at, along_rows):
    """The integral of the surface along a segment, channels at once:
    ``plane`` is ``[C, H, W]``; along_rows: x = at, y from lo to hi; else
    y = at, x from lo to hi. Cell by cell, as mmcv's
    PrRoIPoolingSingleCoorIntegral: the surface is linear on the segment's
    piece in a cell, between its values c1 and c2 on the cell's grid lines."""
    size = plane.shape[1] if along_rows else plane.shape[2]
    total = np.zeros(plane.shape[0], np.float64)
    for c, s, t in _prroi_cells(lo, hi, size):
        values = []
        for line in (c, c + 1):
            if not 0 <= line < size:
                values.append(np.zeros(plane.shape[0]))
            elif along_rows:
                values.append(_zero_padded_lerp(plane[:, line, :], at))
            else:
                values.append(_zero_padded_lerp(plane[:, :, line], at))
        c1, c2 = values
        total += (t - s) * (c1 + (c2 - c1) * 0.5 * (s + t))
    return total


def prroi_pool_boxes_backward(grad_output, x, boxes, output_size,
                              spatial_scale=1.0):
    """Gradient of :func:`prroi_pool` with respect to the boxes, ``[K, 5]``
    in float64 (0 in the batch-index column and for unusable boxes), as
    mmcv's prroi_pool_coor_backward: moving a bin's right edge changes its
    integral by the line integral along that edge, I_right, and its area by
    its height, so d value / d right = (I_right - height * value) / area;
    the left edge likewise with the opposite sign, and the same down.
    The edges move with the corners X1 = x1 * s, X2 = x2 * s as
    left = X1 + (X2 - X1) * pw / PW and right = X1 + (X2 - X1) * (pw + 1) / PW."""
    g = np.asarray(grad_output).astype(np.float64)
    x = np.asarray(x).astype(np.float64)
    pooled_h, pooled_w = _pair(output_size)
    s = float(spatial_scale)
    values = prroi_pool(x, boxes, output_size, spatial_scale)
    entries = _prroi_boxes(boxes, x.shape, output_size, spatial_scale)
    grad = np.zeros((len(entries), 5), np.float64)
    for k, entry in enumerate(entries):
        if entry is None:
            continue
        n, bins = entry
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                if bins[ph][pw] is None:
                    continue
                (y0, y1), (x0, x1) = bins[ph][pw]
                area = (y1 - y0) * (x1 - x0)
                value = values[k, :, ph, pw]
                left = _prroi_line_integral(x[n], y0, y1, x0, True)
                right = _prroi_line_integral(x[n], y0, y1, x1, True)
                top = _prroi_line_integral(x[n], x0, x1, y0, False)
                bottom = _prroi_line_integral(x[n], x0, x1, y1, False)
                d_left = (value * (y1 - y0) - left) / area
                d_right = (right - value * (y1 - y0)) / area
                d_top = (value * (x1 - x0) - top) / area
                d_bottom = (bottom - value * (x1 - x0)) / area
                gk = g[k, :, ph, pw]
                a, b = pw / pooled_w, (pw + 1) / pooled_w
                grad[k, 1] += s * np.sum(gk * (d_left * (1 - a) + d_right * (1 - b)))
                grad[k, 3] += s * np.sum(gk * (d_left * a + d_right * b))
                a, b = ph / pooled_h, (ph + 1) / pooled_h
                grad[k, 2] += s * np.sum(gk * (d_top * (1 - a) + d_bottom * (1 - b)))
                grad[k, 4] += s * np.sum(gk * (d_top * a + d_bottom * b))
    return grad


# Gauss-Legendre nodes and weights on [0, 1], 3 points: exact for
# polynomials of degree 5.
_GAUSS_NODES = 0.5 + 0.5 * np.array([-math.sqrt(0.6), 0.0, math.sqrt(0.6)])
_GAUSS_WEIGHTS = np.array([5.0, 8.0, 5.0]) / 18.0


def _bilinear_zero_padded(plane, y, x):
    """The surface at the points (y[a], x[b]) for all a, b: ``plane`` is
    ``[C, H, W]``, the result ``[C, len(y), len(x)]``. Four pixels around
    each point, those off the map reading 0."""
    _, height, width = plane.shape
    padded = np.zeros((plane.shape[0], height + 2, width + 2))
    padded[:, 1:-1, 1:-1] = plane  # pixel i at i + 1; -1 and H read 0
    inside_y = (y > -1) & (y < height)
    inside_x = (x > -1) & (x < width)
    yc = np.where(inside_y, y, -1.0)
    xc = np.where(inside_x, x, -1.0)
    i0, j0 = np.floor(yc).astype(np.int64), np.floor(xc).astype(np.int64)
    ty, tx = yc - i0, xc - j0
    wy = [(1 - ty) * inside_y, ty * inside_y]
    wx = [(1 - tx) * inside_x, tx * inside_x]
    out = np.zeros((plane.shape[0], len(y), len(x)))
    for dy in (0, 1):
        for dx in (0, 1):
            rows = padded[:, i0 + dy + 1, :][:, :, j0 + dx + 1]
            out += wy[dy][None, :, None] * wx[dx][None, None, :] * rows
    return out


def _quadrature_nodes(lo, hi):
    """Nodes and weights of Gauss-Legendre on every piece of [lo, hi]
    between integer lines (where the surface has kinks)."""
    cuts = [lo] + [float(c) for c in range(math.floor(lo) + 1, math.ceil(hi))] + [hi]
    nodes, weights = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b > a:
            nodes.append(a + (b - a) * _GAUSS_NODES)
            weights.append((b - a) * _GAUSS_WEIGHTS)
    return np.concatenate(nodes), np.concatenate(weights)


def prroi_pool_quadrature(x, boxes, output_size, spatial_scale=1.0):
    """:func:`prroi_pool` by numerical integration instead of the per-cell
    closed form: the surface evaluated point by point (zero-padded
    bilinear interpolation) at Gauss-Legendre nodes, on pieces split at the
    integer lines. The surface is a polynomial of degree 1 per axis on each
    piece, so this is exact up to rounding. For boxes of moderate size
    (the nodes cover the whole bin, on the map or not)."""
    x = np.asarray(x).astype(np.float64)
    pooled_h, pooled_w = _pair(output_size)
    entries = _prroi_boxes(boxes, x.shape, output_size, spatial_scale)
    out = np.zeros((len(entries), x.shape[1], pooled_h, pooled_w), np.float64)
    for k, entry in enumerate(entries):
        if entry is None:
            continue
        n, bins = entry
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                if bins[ph][pw] is None:
                    continue
                (y0, y1), (x0, x1) = bins[ph][pw]
                ny, wy = _quadrature_nodes(y0, y1)
                nx, wx = _quadrature_nodes(x0, x1)
                f = _bilinear_zero_padded(x[n], ny, nx)
                integral = np.einsum("cab,a,b->c", f, wy, wx)
                out[k, :, ph, pw] = integral / ((y1 - y0) * (x1 - x0))
    return out


# Crop and resize, TensorFlow's tf.image.crop_and_resize
# --------------------------------------------------------------------------

# Written from TensorFlow's CropAndResize, CropAndResizeGradImage and
# CropAndResizeGradBoxes kernels (tensorflow/core/kernels/image/
# crop_and_resize_op.cc). Images are channels-last [N, H, W, C] and crops
# [K, PH, PW, C] (TF's layout); boxes [K, 4] are normalised (y1, x1, y2, x2)
# on image box_indices[k]. A box index outside [0, N) (an error in TF) gives
# an all-extrapolation crop and no gradient; a NaN coordinate extrapolates.


def _crop_position(lo, hi, i, crop, size):
    """Image coordinate of crop row (column) i, as TF's forward computes it:
    lo*(size-1) + i*((hi-lo)*(size-1)/(crop-1)), or the box's centre
    0.5*(lo+hi)*(size-1) for a crop of one row."""
    if crop > 1:
        return lo * (size - 1) + i * ((hi - lo) * (size - 1) / (crop - 1))
    return 0.5 * (lo + hi) * (size - 1)


def _crop_grad_position(lo, hi, i, crop, size):
    """The coordinate in TF's box gradient: the step as (hi-lo)*ratio with
    ratio = (size-1)/(crop-1), which rounds differently from the forward's."""
    if crop > 1:
        return lo * (size - 1) + i * ((hi - lo) * ((size - 1) / (crop - 1)))
    return 0.5 * (lo + hi) * (size - 1)


def _crop_on_map(v, size):
    return bool(0 <= v <= size - 1)  # False for NaN


def _crop_box(boxes, box_indices, k, n_images):
    """(y1, x1, y2, x2) as Python floats and the image, or None."""
    b = int(box_indices[k])
    if not 0 <= b < n_images:
        return None
    return [float(v) for v in boxes[k]], b


def _crop_points(box, crop_size, height, width, position=_crop_position):
    """Yield (y, x, in_y, in_x) for every crop point on the map."""
    y1, x1, y2, x2 = (np.float64(v) for v in box)
    ph, pw = crop_size
    with np.errstate(all="ignore"):  # inf and NaN corners propagate
        ys = [float(position(y1, y2, y, ph, height)) for y in range(ph)]
        xs = [float(position(x1, x2, x, pw, width)) for x in range(pw)]
    for y, in_y in enumerate(ys):
        if not _crop_on_map(in_y, height):
            continue
        for x, in_x in enumerate(xs):
            if _crop_on_map(in_x, width):
                yield y, x, in_y, in_x


def _crop_taps(in_y, in_x):
    """((rows), (columns), yl, xl): floor and ceil, and the weights of ceil."""
    top, left = math.floor(in_y), math.floor(in_x)
    return ((top, math.ceil(in_y)), (left, math.ceil(in_x)),
            in_y - top, in_x - left)


def crop_and_resize(image, boxes, box_indices, crop_size, method="bilinear",
                    extrapolation_value=0.0):
    """``[K, PH, PW, C]`` crops of ``image[N, H, W, C]`` (float64)."""
    image = np.asarray(image, np.float64)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    n, h, w, c = image.shape
    ph, pw = _pair(crop_size)
    out = np.full((len(boxes), ph, pw, c), float(extrapolation_value))
    for k in range(len(boxes)):
        found = _crop_box(boxes, box_indices, k, n)
        if found is None:
            continue
        box, b = found
        for y, x, in_y, in_x in _crop_points(box, (ph, pw), h, w):
            if method == "nearest":
                out[k, y, x] = image[b, round_half_away(in_y), round_half_away(in_x)]
                continue
            (t, bt), (lf, rt), yl, xl = _crop_taps(in_y, in_x)
            top = image[b, t, lf] + (image[b, t, rt] - image[b, t, lf]) * xl
            bottom = image[b, bt, lf] + (image[b, bt, rt] - image[b, bt, lf]) * xl
            out[k, y, x] = top + (bottom - top) * yl
    return out


def crop_and_resize_backward(grad_output, boxes, box_indices, image_shape,
                             method="bilinear"):
    """Gradient of :func:`crop_and_resize` with respect to the image,
    ``[N, H, W, C]``: each crop point's gradient goes to the pixels it read,
    with their weights."""
    grad_output = np.asarray(grad_output, np.float64)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    n, h, w, c = image_shape
    ph, pw = grad_output.shape[1:3]
    grad = np.zeros((n, h, w, c))
    for k in range(len(boxes)):
        found = _crop_box(boxes, box_indices, k, n)
        if found is None:
            continue
        box, b = found
        for y, x, in_y, in_x in _crop_points(box, (ph, pw), h, w):
            g = grad_output[k, y, x]
            if method == "nearest":
                grad[b, round_half_away(in_y), round_half_away(in_x)] += g
                continue
            (t, bt), (lf, rt), yl, xl = _crop_taps(in_y, in_x)
            grad[b, t, lf] += (1 - xl) * (1 - yl) * g
            grad[b, t, rt] += xl * (1 - yl) * g
            grad[b, bt, lf] += (1 - xl) * yl * g
            grad[b, bt, rt] += xl * yl * g
    return grad


def crop_and_resize_boxes_backward(grad_output, image, boxes, box_indices):
    """Gradient of :func:`crop_and_resize` with respect to the boxes,
    ``[K, 4]`` as (dy1, dx1, dy2, dx2): TF's CropAndResizeGradBoxes, the
    derivative of bilinear interpolation (TF uses it for the nearest method
    too). At each point on the map, with the four corners,
    gy = (1-xl)*(bl-tl) + xl*(br-tr) and gx = (1-yl)*(tr-tl) + yl*(br-bl)
    times the output gradient, summed over channels, go to y1 and y2 with
    the derivatives of in_y: (H-1) - y*ratio and y*ratio (both 0.5*(H-1)
    for a crop of one row), and to x1, x2 likewise."""
    grad_output = np.asarray(grad_output, np.float64)
    image = np.asarray(image, np.float64)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    n, h, w, c = image.shape
    ph, pw = grad_output.shape[1:3]
    grad = np.zeros((len(boxes), 4))

    def ends(i, crop, size):
        if crop > 1:
            step = i * ((size - 1) / (crop - 1))
            return (size - 1) - step, step
        return 0.5 * (size - 1), 0.5 * (size - 1)

    for k in range(len(boxes)):
        found = _crop_box(boxes, box_indices, k, n)
        if found is None:
            continue
        box, b = found
        for y, x, in_y, in_x in _crop_points(box, (ph, pw), h, w,
                                             _crop_grad_position):
            (t, bt), (lf, rt), yl, xl = _crop_taps(in_y, in_x)
            tl, tr = image[b, t, lf], image[b, t, rt]
            bl, br = image[b, bt, lf], image[b, bt, rt]
            g = grad_output[k, y, x]
            gy = float(np.sum(((1 - xl) * (bl - tl) + xl * (br - tr)) * g))
            gx = float(np.sum(((1 - yl) * (tr - tl) + yl * (br - bl)) * g))
            y_lo, y_hi = ends(y, ph, h)
            x_lo, x_hi = ends(x, pw, w)
            grad[k] += (gy * y_lo, gx * x_lo, gy * y_hi, gx * x_hi)
    return grad


# Multiscale RoI Align (feature pyramids): torchvision's MultiScaleRoIAlign
# and detectron2's ROIPooler
# --------------------------------------------------------------------------
#
# Each box is pooled by RoI Align from one level of a pyramid of feature maps
# at spatial scales 2^-k_min .. 2^-k_max (finest first), the level given by
# eq. (1) of the FPN paper (Lin et al., 2017), k = floor(k0 + log2(sqrt(wh) /
# 224)), as the two libraries compute it (torchvision.ops.poolers.LevelMapper
# and detectron2.modeling.poolers.assign_boxes_to_levels), with s =
# sqrt((x2 - x1) * (y2 - y1)):
#
#   torchvision:  k = floor((canonical_level + log2(s / canonical_scale)) + eps)
#   detectron2:   k = floor(canonical_level + log2(s / canonical_scale + eps))
#
# then clamped to [k_min, k_max] (torch.clamp: NaN stays NaN), level k -
# k_min; a box whose k is NaN matches no level and keeps the zeros its
# output starts with. With one level both skip the rule.


def multiscale_level(boxes, spatial_scales, canonical_scale=224, canonical_level=4,
                     eps=1e-6, rule="torchvision", dtype=np.float32):
    """The pyramid level (index into ``spatial_scales``) of each box, -1 for
    none. Computed in ``dtype`` (float32: the libraries' arithmetic on
    float32 boxes), each operation rounded to it in the libraries' order;
    log2 is the correctly rounded one (float64's, rounded)."""
    boxes = normalize_boxes(boxes)
    num_levels = len(spatial_scales)
    if num_levels == 1:
        return np.zeros(len(boxes), np.int64)
    if num_levels == 0:
        return np.full(len(boxes), -1, np.int64)
    dt = np.dtype(dtype).type
    b = boxes.astype(dt)

    def log2(v):
        return np.log2(v.astype(np.float64)).astype(dt)

    k_min = int(-math.log2(float(dt(spatial_scales[0]))))
    k_max = int(-math.log2(float(dt(spatial_scales[-1]))))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        area = (b[:, 3] - b[:, 1]) * (b[:, 4] - b[:, 2])
        s = np.sqrt(area)
        if rule == "torchvision":
            v = (dt(canonical_level) + log2(s / dt(canonical_scale))) + dt(eps)
        elif rule == "detectron2":
            v = dt(canonical_level) + log2(s / dt(canonical_scale) + dt(eps))
        else:
            raise ValueError(rule)
        k = np.minimum(np.maximum(np.floor(v), k_min), k_max)
        index = k - k_min
        usable = (index >= 0) & (index < num_levels)  # False for NaN
    return np.where(usable, np.where(usable, index, 0).astype(np.int64), -1)


def multiscale_roi_align(features, boxes, output_size, spatial_scales,
                         sampling_ratio=-1, aligned=False, canonical_scale=224,
                         canonical_level=4, eps=1e-6, rule="torchvision",
                         level_dtype=np.float32):
    """Multiscale RoI Align forward, in float64: :func:`roi_align` of each
    level on the boxes :func:`multiscale_level` assigns to it (computed in
    ``level_dtype``), zeros for a box of no level or of a level without
    pixels. ``features`` are ``[N, C, H_l, W_l]`` arrays."""
    boxes = normalize_boxes(boxes)
    levels = multiscale_level(boxes, spatial_scales, canonical_scale, canonical_level,
                              eps, rule, level_dtype)
    pooled_h, pooled_w = _pair(output_size)
    channels = np.asarray(features[0]).shape[1]
    out = np.zeros((len(boxes), channels, pooled_h, pooled_w))
    for level, x in enumerate(features):
        chosen = np.nonzero(levels == level)[0]
        if len(chosen) and np.asarray(x).shape[2] * np.asarray(x).shape[3]:
            out[chosen] = roi_align(x, boxes[chosen], output_size,
                                    spatial_scales[level], sampling_ratio, aligned)
    return out


def multiscale_roi_align_backward(grad_output, boxes, input_shapes, output_size,
                                  spatial_scales, sampling_ratio=-1, aligned=False,
                                  canonical_scale=224, canonical_level=4, eps=1e-6,
                                  rule="torchvision", level_dtype=np.float32):
    """Gradient of :func:`multiscale_roi_align` with respect to each level,
    in float64: a list of arrays of ``input_shapes``."""
    boxes = normalize_boxes(boxes)
    g = np.asarray(grad_output).astype(np.float64)
    levels = multiscale_level(boxes, spatial_scales, canonical_scale, canonical_level,
                              eps, rule, level_dtype)
    grads = []
    for level, shape in enumerate(input_shapes):
        shape = tuple(int(v) for v in shape)
        chosen = np.nonzero(levels == level)[0]
        if len(chosen) and shape[2] * shape[3]:
            grads.append(roi_align_backward(g[chosen], boxes[chosen], shape, output_size,
                                            spatial_scales[level], sampling_ratio,
                                            aligned))
        else:
            grads.append(np.zeros(shape))
    return grads


# --------------------------------------------------------------------------
# random test inputs (shared by test_roi_align.py and test_roi_pool.py)
# --------------------------------------------------------------------------

BOX_KINDS = ("inside", "partly_out", "wholly_out", "tiny", "zero", "reversed")


def _random_interval(rng, extent, scale, kind):
    """One (lo, hi) box edge pair in box coordinates for a map ``extent``
    pixels long seen through ``spatial_scale = scale``."""
    e = extent / scale          # map extent in box coordinates
    px = 1.0 / scale            # one feature-map pixel in box coordinates
    if kind == "inside":
        lo = rng.uniform(0, e)
        hi = rng.uniform(lo, e)
    elif kind == "partly_out":
        if rng.random() < 0.5:
            lo = rng.uniform(-0.5 * e, 0)
            hi = rng.uniform(0, e)
        else:
            lo = rng.uniform(0, e)
            hi = rng.uniform(e, 1.5 * e)
    elif kind == "wholly_out":
        if rng.random() < 0.5:
            # at least 2 pixels before the map: past the -1 cut-off even
            # after the aligned half-pixel shift
            hi = -2 * px - rng.uniform(0, 0.5 * e + px)
            lo = hi - rng.uniform(0, 0.5 * e)
        else:
            lo = e + 2 * px + rng.uniform(0, 0.5 * e + px)
            hi = lo + rng.uniform(0, 0.5 * e)
    elif kind == "tiny":
        lo = rng.uniform(-px, e + px)
        hi = lo + rng.uniform(0, 0.3) * px
    elif kind == "zero":
        lo = hi = rng.uniform(-px, e + px)
    elif kind == "reversed":
        lo = rng.uniform(-px, e + px)
        hi = lo - rng.uniform(0, 2) * px
    else:
        raise ValueError(kind)
    return lo, hi


def random_boxes(rng, n_images, height, width, scale, k, kinds=BOX_KINDS,
                 dtype=np.float64):
    """``[k, 5]`` boxes mixing the kinds above independently in x and y."""
    boxes = np.empty((k, 5), np.float64)
    for i in range(k):
        kx = kinds[rng.integers(len(kinds))]
        ky = kinds[rng.integers(len(kinds))]
        x1, x2 = _random_interval(rng, width, scale, kx)
        y1, y2 = _random_interval(rng, height, scale, ky)
        boxes[i] = (rng.integers(n_images), x1, y1, x2, y2)
    return boxes.astype(dtype)


def permutation_map(rng, shape, dtype=np.float64):
    """Features without ties inside a plane: each ``H x W`` plane holds a
    permutation of small integers (exact in float16 and bfloat16 for planes of
    up to 256 pixels), centred on zero so that negative maxima occur too."""
    n, c, h, w = shape
    out = np.empty(shape, np.float64)
    for i in range(n):
        for j in range(c):
            out[i, j] = (rng.permutation(h * w) - (h * w) // 2).reshape(h, w)
    return out.astype(dtype)


def spoil_boxes(rng, boxes, n_images, probability=0.3):
    """With the given probability, make one box invalid in place: a batch
    index outside [0, N) or not finite, or a non-finite coordinate."""
    if len(boxes) == 0 or rng.random() >= probability:
        return boxes
    k = int(rng.integers(len(boxes)))
    bad = [n_images, n_images + 3, -1, np.nan, np.inf, -np.inf]
    if rng.random() < 0.5:
        boxes[k, 0] = bad[rng.integers(len(bad))]
    else:
        boxes[k, 1 + rng.integers(4)] = (np.nan, np.inf, -np.inf)[
            rng.integers(3)]
    return boxes
