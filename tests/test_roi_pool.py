"""Correctness of curoi.roi_pool and curoi.roi_pool_backward on the CPU.

Expected values come from hand computation or from the independent NumPy
reference in tests/reference.py (written from DESIGN.md section 3, not from
the kernels); never from curoi itself.
"""


import numpy as np
import pytest

import curoi

import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")

CONVENTIONS = ["torchvision", "mmcv"]

WORKED_MAP = ref.WORKED_EXAMPLE_MAP


def _worked(dtype=np.float64):
    return WORKED_MAP.reshape(1, 1, 8, 8).astype(dtype)


# --------------------------------------------------------------------------
# the worked example
# --------------------------------------------------------------------------

# Hand derivation, torchvision convention, box (0, 3, 6, 7), s = 1, 2 x 2:
#   start_w = round(0) = 0, end_w = round(6) = 6, roi_w = 6 - 0 + 1 = 7
#   start_h = round(3) = 3, end_h = round(7) = 7, roi_h = 7 - 3 + 1 = 5
#   bin_w = 3.5: pw=0 -> cols floor(0)..ceil(3.5) = [0, 4)  = cols 0-3
#                pw=1 -> cols floor(3.5)..ceil(7) = [3, 7)  = cols 3-6
#   bin_h = 2.5: ph=0 -> rows 3 + [0, 3) = rows 3-5
#                ph=1 -> rows 3 + [floor(2.5), ceil(5)) = 3 + [2, 5) = rows 5-7
# The bins overlap by one column (3) and one row (5), because 7 and 5 are odd.
#   bin (0,0) rows 3-5, cols 0-3: max 0.85 at (3,0) -> flat 3*8+0 = 24
#   bin (0,1) rows 3-5, cols 3-6: max 0.96 at (5,6) -> flat 46
#   bin (1,0) rows 5-7, cols 0-3: max 0.97 at (7,2) -> flat 58
#   bin (1,1) rows 5-7, cols 3-6: max 0.96 at (5,6) -> flat 46
#
# mmcv convention: the box is continuous, [x1*s, (x2+1)*s) x [y1*s, (y2+1)*s),
# so the pixel columns 0-6 and rows 3-7 are again x1=0, x2=6, y1=3, y2=7:
# the same box (0, 3, 6, 7) (the blog's corner (7, 8) is the exclusive end
# x2+1, y2+1). Then roi_w = 7 - 0 = 7, roi_h = 8 - 3 = 5, bin 3.5 x 2.5:
#   pw=0 -> cols floor(0 + 0)..ceil(3.5 + 0) = [0, 4); pw=1 -> [3, 7)
#   ph=0 -> rows floor(0 + 3)..ceil(2.5 + 3) = [3, 6); ph=1 -> [5, 8)
# the same bins as above, hence the same values and argmax.
WORKED_BOX = [0.0, 0.0, 3.0, 6.0, 7.0]
WORKED_EXPECTED = [[0.85, 0.96], [0.97, 0.96]]
WORKED_ARGMAX = [[24, 46], [58, 46]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_worked_example(convention, dtype):
    x = _worked(dtype)
    y, arg = curoi.roi_pool(x, np.array([WORKED_BOX], dtype), 2,
                            convention=convention, return_argmax=True)
    assert y.dtype == dtype and arg.dtype == np.int64
    assert y.shape == arg.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(
        y[0, 0], np.array(WORKED_EXPECTED, dtype))
    np.testing.assert_array_equal(arg[0, 0], WORKED_ARGMAX)
    # the reference agrees with the hand derivation too
    y_ref, arg_ref = ref.roi_pool(x, [WORKED_BOX[1:]], 2, 1.0, convention)
    np.testing.assert_array_equal(y_ref[0, 0],
                                  np.array(WORKED_EXPECTED, dtype))
    np.testing.assert_array_equal(arg_ref[0, 0], WORKED_ARGMAX)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_worked_example_blog_split_is_not_what_we_compute(convention):
    """The blog post splits the 7 x 5 region into non-overlapping bins, cols
    0-2 | 3-6 and rows 3-4 | 5-7, which gives [[0.85, 0.84], [0.97, 0.96]]
    (verified below by slicing the map). Neither convention does that: their
    top-right bin also covers row 5 (bins overlap when the size does not
    divide), which holds 0.96 at (5, 6), so both give [[0.85, 0.96],
    [0.97, 0.96]]. Users porting from that post should expect the 0.96."""
    m = WORKED_MAP
    blog = [[m[3:5, 0:3].max(), m[3:5, 3:7].max()],
            [m[5:8, 0:3].max(), m[5:8, 3:7].max()]]
    np.testing.assert_array_equal(blog, [[0.85, 0.84], [0.97, 0.96]])

    y = curoi.roi_pool(_worked(), np.array([WORKED_BOX]), 2,
                       convention=convention)
    assert not np.array_equal(y[0, 0], blog)
    assert y[0, 0, 0, 1] == 0.96 and blog[0][1] == 0.84

    # Each of the blog's bins is reachable as a 1 x 1 pool over its own box
    # (torchvision corners are inclusive pixel indices).
    blog_bins = np.array([[0, 0, 3, 2, 4], [0, 3, 3, 6, 4],
                          [0, 0, 5, 2, 7], [0, 3, 5, 6, 7]], np.float64)
    y1 = curoi.roi_pool(_worked(), blog_bins, 1)
    np.testing.assert_array_equal(y1.ravel(), np.ravel(blog))


# --------------------------------------------------------------------------
# other hand-computed cases
# --------------------------------------------------------------------------


def test_torchvision_rounds_half_away_from_zero():
    """round() in the torchvision convention is C's (2.5 -> 3, 4.5 -> 5),
    not banker's rounding (2.5 -> 2, 4.5 -> 4).

    Row 2 of the worked map: cols 2..6 = .82 .64 .54 .73 .59. Box x in
    [2.5, 4.5] on row 2: C rounding -> cols 3..5 -> max .73 at (2, 5) = 21.
    Banker's rounding would take cols 2..4 -> .82. The same box at
    spatial_scale 0.5 is (5, 4, 9, 4) -> 2.5, 2, 4.5, 2."""
    x = _worked()
    for boxes, s in (([[0, 2.5, 2.0, 4.5, 2.0]], 1.0),
                     ([[0, 5.0, 4.0, 9.0, 4.0]], 0.5)):
        y, arg = curoi.roi_pool(x, np.array(boxes), 1, spatial_scale=s,
                                return_argmax=True)
        assert y.ravel().tolist() == [0.73]
        assert arg.ravel().tolist() == [21]


def test_torchvision_reversed_box_is_one_pixel_wide():
    """Box (5, 3, 2, 7): round gives start_w 5, end_w 2, so roi_w =
    max(2 - 5 + 1, 1) = 1, bin_w = 0.5, and both column bins are col 5
    ([floor(0), ceil(0.5)) and [floor(0.5), ceil(1)), offset by 5).
    Rows as in the worked example: 3-5 and 5-7. Col 5: rows 3-5 = .75 .03
    .65 -> .75 at (3, 5) = 29; rows 5-7 = .65 .07 .35 -> .65 at (5, 5) = 45.
    """
    y, arg = curoi.roi_pool(_worked(), np.array([[0, 5.0, 3.0, 2.0, 7.0]]), 2,
                            return_argmax=True)
    np.testing.assert_array_equal(y[0, 0], [[0.75, 0.75], [0.65, 0.65]])
    np.testing.assert_array_equal(arg[0, 0], [[29, 29], [45, 45]])


def test_mmcv_degenerate_and_thin_boxes():
    """mmcv: a box of no positive extent gives zeros and argmax -1 (mmcv
    itself leaves argmax 0 there; DESIGN.md says not to copy that).

    (2, 3, 1, 7): roi_w = (1 + 1) - 2 = 0 -> degenerate.
    (2, 3, 0.5, 7): roi_w = 1.5 - 2 = -0.5 -> degenerate.
    (2, 3, 1.5, 7): roi_w = 2.5 - 2 = 0.5 > 0, bin_w 0.25: pw=0 -> cols
    floor(2)..ceil(2.25) = [2, 3), pw=1 -> floor(2.25)..ceil(2.5) = [2, 3):
    col 2 only. Rows 3-5 = .76 .21 .16 -> .76 at (3, 2) = 26; rows 5-7 = .16
    .09 .97 -> .97 at (7, 2) = 58.
    """
    boxes = np.array([[0, 2.0, 3.0, 1.0, 7.0], [0, 2.0, 3.0, 0.5, 7.0],
                      [0, 2.0, 3.0, 1.5, 7.0], [0, 2.0, 3.0, 6.0, 2.0]])
    y, arg = curoi.roi_pool(_worked(), boxes, 2, convention="mmcv",
                            return_argmax=True)
    for k in (0, 1, 3):   # box 3: roi_h = (2 + 1) - 3 = 0
        np.testing.assert_array_equal(y[k], 0.0)
        np.testing.assert_array_equal(arg[k], -1)
    np.testing.assert_array_equal(y[2, 0], [[0.76, 0.76], [0.97, 0.97]])
    np.testing.assert_array_equal(arg[2, 0], [[26, 26], [58, 58]])


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_empty_bins_give_zero_and_minus_one(convention):
    """A box wholly outside the map (all bins clipped to nothing) and a box
    half outside (its outer bins empty after clipping to [0, W))."""
    x = _worked() + 1.0   # all values > 0, so a 0 can only mean "empty"
    boxes = np.array([[0, 20.0, 20.0, 30.0, 30.0],   # far right/bottom
                      [0, -9.0, -9.0, -3.0, -3.0],   # far left/top
                      [0, -8.0, 0.0, 7.0, 7.0]])     # left half outside
    y, arg = curoi.roi_pool(x, boxes, 2, convention=convention,
                            return_argmax=True)
    np.testing.assert_array_equal(y[:2], 0.0)
    np.testing.assert_array_equal(arg[:2], -1)
    # box 2: roi_w 16 (both conventions), bin_w 8: column bin 0 is [-8, 0)
    # -> empty; column bin 1 is [0, 8) -> the whole rows.
    np.testing.assert_array_equal(y[2, 0, :, 0], 0.0)
    np.testing.assert_array_equal(arg[2, 0, :, 0], -1)
    np.testing.assert_array_equal(y[2, 0, :, 1],
                                  [x[0, 0, 0:4].max(), x[0, 0, 4:8].max()])


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_ties_take_first_in_row_major_order(convention):
    """On a constant map every bin's first pixel (row-major) is the argmax.
    Worked-example bins: rows 3-5 | 5-7, cols 0-3 | 3-6 -> first pixels
    (3,0), (3,3), (5,0), (5,3) -> 24, 27, 40, 43."""
    x = np.full((1, 2, 8, 8), 0.5)
    y, arg = curoi.roi_pool(x, np.array([WORKED_BOX]), 2,
                            convention=convention, return_argmax=True)
    np.testing.assert_array_equal(y, 0.5)
    for c in range(2):
        np.testing.assert_array_equal(arg[0, c], [[24, 27], [40, 43]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("seed", range(4))
def test_ties_random_against_reference(convention, dtype, seed):
    """Maps with only three distinct values: many ties in every bin."""
    rng = np.random.default_rng(300 + seed)
    n, c, h, w = 2, 2, 10, 9
    x = rng.integers(0, 3, (n, c, h, w)).astype(dtype)
    boxes = ref.random_boxes(rng, n, h, w, 1.0, 6, dtype=dtype)
    y, arg = curoi.roi_pool(x, boxes, (3, 2), convention=convention,
                            return_argmax=True)
    y_ref, arg_ref = ref.roi_pool(x, boxes, (3, 2), 1.0, convention)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(arg, arg_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_nan_is_larger_than_any_number(convention, dtype):
    """NaN wins a bin even after a larger number; the first NaN (row-major)
    is the argmax. NaNs at (4,1), (5,0) and (3,4) of the worked map:
      bin (0,0) rows 3-5 cols 0-3: 0.85 at (3,0) comes first, but NaN at
        (4,1) = 33 wins (before (5,0) = 40)
      bin (0,1) rows 3-5 cols 3-6: NaN at (3,4) = 28
      bin (1,0) rows 5-7 cols 0-3: NaN at (5,0) = 40
      bin (1,1) rows 5-7 cols 3-6: no NaN -> 0.96 at (5,6) = 46
    """
    x = _worked(dtype)
    for r, c in ((4, 1), (5, 0), (3, 4)):
        x[0, 0, r, c] = np.nan
    y, arg = curoi.roi_pool(x, np.array([WORKED_BOX], dtype), 2,
                            convention=convention, return_argmax=True)
    np.testing.assert_array_equal(arg[0, 0], [[33, 28], [40, 46]])
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[0, 0, 0, 1])
    assert np.isnan(y[0, 0, 1, 0]) and y[0, 0, 1, 1] == dtype(0.96)
    y_ref, arg_ref = ref.roi_pool(x, [WORKED_BOX[1:]], 2, 1.0, convention)
    np.testing.assert_array_equal(arg_ref, arg)
    np.testing.assert_array_equal(y_ref, y.astype(np.float64))


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_very_negative_values_float64(convention):
    """A non-empty bin always has a maximum inside it, even when every value
    is below -FLT_MAX (a kernel seeded with -FLT_MAX would return -FLT_MAX
    and argmax -1 here). Constant map -> first pixel of each bin."""
    x = np.full((1, 1, 8, 8), -1e300)
    x[0, 0, 6, 5] = -1e299      # the maximum of bin (1,1) (rows 5-7 cols 3-6)
    y, arg = curoi.roi_pool(x, np.array([WORKED_BOX]), 2,
                            convention=convention, return_argmax=True)
    np.testing.assert_array_equal(y[0, 0], [[-1e300, -1e300],
                                            [-1e300, -1e299]])
    np.testing.assert_array_equal(arg[0, 0], [[24, 27], [40, 53]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_all_minus_inf_bin(convention, dtype):
    """A bin of -inf values is not empty: its max is -inf, at its first
    pixel (ties rule), not 0 / -1 (those mean an empty bin)."""
    x = np.full((1, 1, 8, 8), -np.inf, dtype)
    x[0, 0, 7, 2] = 1.0     # bin (1,0): rows 5-7, cols 0-3
    y, arg = curoi.roi_pool(x, np.array([WORKED_BOX], dtype), 2,
                            convention=convention, return_argmax=True)
    np.testing.assert_array_equal(y[0, 0], [[-np.inf, -np.inf],
                                            [1.0, -np.inf]])
    np.testing.assert_array_equal(arg[0, 0], [[24, 27], [58, 43]])


@pytest.mark.parametrize("channels", [2, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_special_values_in_every_channel_position(convention, dtype, channels):
    """The CPU scans channels in pairs (and a last one alone): NaN, inf,
    -inf and ties must follow the rules in either position of a pair. Small
    integers make ties common; special values land in random channels."""
    rng = np.random.default_rng(channels)
    x = rng.integers(-3, 4, (2, channels, 9, 11)).astype(dtype)
    special = rng.random(x.shape)
    x[special < 0.03] = np.nan
    x[(special >= 0.03) & (special < 0.06)] = np.inf
    x[(special >= 0.06) & (special < 0.3)] = -np.inf
    x[1, 0] = -np.inf     # whole planes of -inf, first of a pair and not
    x[1, -1] = -np.inf
    boxes = ref.random_boxes(rng, 2, 9, 11, 1.0, 40).astype(dtype)
    y, arg = curoi.roi_pool(x, boxes, (3, 2), 1.0, convention=convention,
                            return_argmax=True)
    y_ref, arg_ref = ref.roi_pool(x, boxes, (3, 2), 1.0, convention)
    np.testing.assert_array_equal(arg, arg_ref)
    np.testing.assert_array_equal(y, y_ref.astype(dtype))


# --------------------------------------------------------------------------
# random cases against the reference
# --------------------------------------------------------------------------

SCALES = [1.0, 0.5, 0.25, 1.0 / 3.0]
# PH, PW at most 5: with integer roi sizes below 80, p * (roi / P) then rounds
# to the exact floor/ceil in both float32 and float64 (P = 7 does not, e.g.
# 7 * (29 / 7) > 29 in float64), so the bins do not depend on the precision.
OUTPUT_SIZES = [1, 2, (2, 3), (3, 1), (4, 5)]


def _random_case(seed, dtype):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3))
    c = int(rng.integers(1, 4))
    h = int(rng.integers(1, 17))
    w = int(rng.integers(1, 17))
    if rng.random() < 0.8:
        h, w = max(h, 4), max(w, 4)
    k = int(rng.integers(1, 7))
    scale = SCALES[rng.integers(len(SCALES))]
    output_size = OUTPUT_SIZES[rng.integers(len(OUTPUT_SIZES))]
    x = ref.permutation_map(rng, (n, c, h, w), dtype)   # no ties
    boxes = ref.random_boxes(rng, n, h, w, scale, k, dtype=dtype)
    ref.spoil_boxes(rng, boxes, n)   # sometimes one invalid box
    return rng, x, boxes, scale, output_size


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("seed", range(24))
def test_forward_backward_vs_reference(convention, dtype, seed):
    rng, x, boxes, scale, output_size = _random_case(
        100 * seed + (convention == "mmcv"), dtype)
    y, arg = curoi.roi_pool(x, boxes, output_size, scale,
                            convention=convention, return_argmax=True)
    y_ref, arg_ref = ref.roi_pool(x, boxes, output_size, scale, convention)
    assert y.dtype == dtype and arg.dtype == np.int64
    # max pooling does no arithmetic: values and argmax are exact
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(arg, arg_ref)
    # return_argmax=False gives the same values
    np.testing.assert_array_equal(
        curoi.roi_pool(x, boxes, output_size, scale, convention=convention),
        y_ref)

    g = rng.standard_normal(y.shape).astype(dtype)
    gx = curoi.roi_pool_backward(g, arg_ref, boxes, x.shape)
    gx_ref = ref.roi_pool_backward(g, arg_ref, boxes, x.shape)
    assert gx.dtype == dtype and gx.shape == x.shape
    tol = (dict(rtol=1e-10, atol=1e-12) if dtype == np.float64
           else dict(rtol=1e-5, atol=1e-5))
    np.testing.assert_allclose(gx, gx_ref, **tol)


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("seed", range(4))
def test_int32_argmax(convention, data_format, seed):
    # int32 argmax: the reference's positions, and the same gradient as the
    # reference computes from them; the backward reads int32 in place.
    rng, x, boxes, scale, output_size = _random_case(7000 + seed, np.float32)
    y_ref, arg_ref = ref.roi_pool(x, boxes, output_size, scale, convention)
    g = rng.standard_normal(y_ref.shape).astype(np.float32)
    gx_ref = ref.roi_pool_backward(g, arg_ref, boxes, x.shape)
    nhwc = data_format == "NHWC"
    to = (lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))) if nhwc else (lambda a: a)
    for dtype in ("int32", np.int32, np.dtype(np.int32)):
        y, arg = curoi.roi_pool(to(x), boxes, output_size, scale, convention=convention,
                                return_argmax=True, argmax_dtype=dtype,
                                data_format=data_format)
        assert arg.dtype == np.int32
        np.testing.assert_array_equal(y, to(y_ref))
        np.testing.assert_array_equal(arg, to(arg_ref))
    gx = curoi.roi_pool_backward(to(g), arg, boxes, to(x).shape,
                                 data_format=data_format)
    np.testing.assert_allclose(gx, to(gx_ref), rtol=1e-5, atol=1e-5)
    # int32 and int64 positions give the same sums, bit for bit
    np.testing.assert_array_equal(
        gx, curoi.roi_pool_backward(to(g), arg.astype(np.int64), boxes, to(x).shape,
                                    data_format=data_format))


def test_other_integer_argmax_is_converted():
    rng, x, boxes, scale, output_size = _random_case(7100, np.float64)
    y_ref, arg_ref = ref.roi_pool(x, boxes, output_size, scale, "torchvision")
    g = rng.standard_normal(y_ref.shape)
    expected = ref.roi_pool_backward(g, arg_ref, boxes, x.shape)
    for dtype in (np.int16, np.uint16, np.dtype(">i8"), np.dtype(">i4")):
        np.testing.assert_allclose(
            curoi.roi_pool_backward(g, arg_ref.astype(dtype), boxes, x.shape),
            expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", ["float32", np.uint32, "int8", None, "longest"])
def test_argmax_dtype_must_be_int32_or_int64(bad):
    x = np.zeros((1, 1, 4, 4), np.float32)
    boxes = np.array([[0, 0, 0, 3, 3]], np.float32)
    with pytest.raises(TypeError, match="argmax_dtype"):
        curoi.roi_pool(x, boxes, 2, return_argmax=True, argmax_dtype=bad)


def test_int32_argmax_needs_planes_below_2_31():
    from curoi import _validate
    _validate.argmax_fits(2**31 - 1, "int32")
    _validate.argmax_fits(2**40, "int64")
    with pytest.raises(ValueError, match="argmax_dtype=int32"):
        _validate.argmax_fits(2**31, "int32")


# --------------------------------------------------------------------------
# backward scatter
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_overlapping_boxes_by_hand(dtype):
    """Two images with the worked map; the worked box twice on image 0 and
    once on image 1. Argmax per box: [[24, 46], [58, 46]] (bins (0,1) and
    (1,1) share pixel 46). Gradients g_k = [[a, b], [c, d]] accumulate:
    image 0: 24 <- 1 + 10, 46 <- 2 + 4 + 20 + 40, 58 <- 3 + 30;
    image 1: 24 <- 100, 46 <- 200 + 400, 58 <- 300; all else 0."""
    x = np.concatenate([_worked(dtype)] * 2)
    boxes = np.array([WORKED_BOX, WORKED_BOX, [1] + WORKED_BOX[1:]], dtype)
    y, arg = curoi.roi_pool(x, boxes, 2, return_argmax=True)
    g = np.array([[[[1, 2], [3, 4]]], [[[10, 20], [30, 40]]],
                  [[[100, 200], [300, 400]]]], dtype)
    gx = curoi.roi_pool_backward(g, arg, boxes, x.shape)
    exp = np.zeros((2, 1, 64), dtype)
    exp[0, 0, [24, 46, 58]] = [11, 66, 33]
    exp[1, 0, [24, 46, 58]] = [100, 600, 300]
    np.testing.assert_array_equal(gx, exp.reshape(x.shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_many_writers_to_one_pixel(dtype):
    """Many boxes whose bins all pick the same pixels: the scatter must not
    lose updates. Unit gradients, so every sum is an exact small integer."""
    rng = np.random.default_rng(5)
    n, c, h, w = 2, 3, 12, 12
    x = ref.permutation_map(rng, (n, c, h, w), dtype)
    k = 200
    boxes = np.empty((k, 5), dtype)
    boxes[:, 0] = rng.integers(0, n, k)
    boxes[:, 1:3] = rng.uniform(-1.0, 2.0, (k, 2))     # all cover most of
    boxes[:, 3:5] = rng.uniform(9.0, 13.0, (k, 2))     # the map
    _, arg_ref = ref.roi_pool(x, boxes, (3, 3), 1.0, "torchvision")
    g = np.ones((k, c, 3, 3), dtype)
    gx = curoi.roi_pool_backward(g, arg_ref, boxes, x.shape)
    gx_ref = ref.roi_pool_backward(g, arg_ref, boxes, x.shape)
    assert gx_ref.max() >= 50     # really many writers per pixel
    np.testing.assert_array_equal(gx, gx_ref)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_invalid_boxes(convention):
    """Batch index outside [0, N) or not finite, or a non-finite coordinate:
    output 0 and argmax -1; in backward such boxes give no gradient even if
    handed an argmax that points inside the map."""
    rng = np.random.default_rng(9)
    n, c, h, w = 2, 2, 8, 8
    x = ref.permutation_map(rng, (n, c, h, w)) + 100.0   # all positive
    nan, inf = np.nan, np.inf
    boxes = np.array([
        [0, 1.0, 1.0, 6.0, 7.0],      # valid
        [2, 1.0, 1.0, 6.0, 7.0],      # index == N
        [-1, 1.0, 1.0, 6.0, 7.0],
        [1e9, 1.0, 1.0, 6.0, 7.0],
        [nan, 1.0, 1.0, 6.0, 7.0],
        [inf, 1.0, 1.0, 6.0, 7.0],
        [1, nan, 1.0, 6.0, 7.0],
        [1, 1.0, 1.0, 6.0, nan],
        [0, 1.0, -inf, 6.0, 7.0],
        [0, 1.0, 1.0, inf, 7.0],
        [1, 0.5, 2.0, 7.5, 6.0],      # valid
    ])
    valid = np.zeros(len(boxes), bool)
    valid[[0, -1]] = True
    y, arg = curoi.roi_pool(x, boxes, (2, 3), convention=convention,
                            return_argmax=True)
    np.testing.assert_array_equal(y[~valid], 0.0)
    np.testing.assert_array_equal(arg[~valid], -1)
    y_ref, arg_ref = ref.roi_pool(x, boxes, (2, 3), 1.0, convention)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(arg, arg_ref)

    g = rng.standard_normal(y.shape)
    # forward's own argmax
    gx = curoi.roi_pool_backward(g, arg_ref, boxes, x.shape)
    np.testing.assert_allclose(
        gx, ref.roi_pool_backward(g[valid], arg_ref[valid], boxes[valid],
                                  x.shape), rtol=1e-12, atol=1e-14)
    # Boxes with a bad batch index handed an argmax that points inside the
    # map (0) must still not write: there is no image to write to.
    bad_index = ~np.isfinite(boxes[:, 0]) | (boxes[:, 0] < 0) | \
        (boxes[:, 0] >= n)
    arg0 = arg_ref.copy()
    arg0[bad_index] = 0
    gx0 = curoi.roi_pool_backward(g, arg0, boxes, x.shape)
    np.testing.assert_allclose(gx0, gx, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_list_of_boxes_equals_k5(convention, dtype):
    rng = np.random.default_rng(21)
    n, c, h, w = 3, 2, 10, 12
    x = ref.permutation_map(rng, (n, c, h, w), dtype)
    per_image = [ref.random_boxes(rng, 1, h, w, 0.5, L, dtype=dtype)[:, 1:]
                 for L in (3, 0, 2)]
    k5 = np.concatenate([
        np.concatenate([np.full((len(b), 1), i, dtype), b], axis=1)
        for i, b in enumerate(per_image)])
    y_l, arg_l = curoi.roi_pool(x, per_image, (2, 3), 0.5,
                                convention=convention, return_argmax=True)
    y_ref, arg_ref = ref.roi_pool(x, k5, (2, 3), 0.5, convention)
    np.testing.assert_array_equal(y_l, y_ref)
    np.testing.assert_array_equal(arg_l, arg_ref)
    g = rng.standard_normal(y_l.shape).astype(dtype)
    np.testing.assert_array_equal(
        curoi.roi_pool_backward(g, arg_l, per_image, x.shape),
        curoi.roi_pool_backward(g, arg_l, k5, x.shape))
    np.testing.assert_allclose(
        curoi.roi_pool_backward(g, arg_l, per_image, x.shape),
        ref.roi_pool_backward(g, arg_ref, k5, x.shape), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# half precision on the CPU
# --------------------------------------------------------------------------


@pytest.mark.parametrize("half", [np.float16, ml_dtypes.bfloat16],
                         ids=["float16", "bfloat16"])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("seed", range(3))
def test_half_precision(half, convention, seed):
    """Half features (values exact in the dtype, no ties), float32 boxes.
    Max pooling is exact, so the result equals the float32 computation
    rounded, which equals the reference. The backward sums small integers
    (exact in float32, and in the half dtype up to 256) before one
    rounding."""
    rng, x32, boxes, scale, output_size = _random_case(700 + seed,
                                                       np.float32)
    x = x32.astype(half)
    assert np.array_equal(x.astype(np.float32), x32)   # no rounding
    y, arg = curoi.roi_pool(x, boxes, output_size, scale,
                            convention=convention, return_argmax=True)
    assert y.dtype == half and arg.dtype == np.int64
    y_ref, arg_ref = ref.roi_pool(x32, boxes, output_size, scale, convention)
    np.testing.assert_array_equal(y.astype(np.float64), y_ref)
    np.testing.assert_array_equal(arg, arg_ref)

    g = rng.integers(-3, 4, y.shape).astype(half)
    gx = curoi.roi_pool_backward(g, arg, boxes, x.shape)
    assert gx.dtype == half and gx.shape == x.shape
    np.testing.assert_array_equal(
        gx.astype(np.float64),
        ref.roi_pool_backward(g.astype(np.float32), arg_ref, boxes, x.shape))


# --------------------------------------------------------------------------
# empty input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16,
                                   ml_dtypes.bfloat16])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_no_boxes(dtype, convention):
    x = np.ones((2, 3, 5, 6), dtype)
    for boxes in (np.zeros((0, 5), np.float32), [np.zeros((0, 4))] * 2):
        y, arg = curoi.roi_pool(x, boxes, (2, 4), convention=convention,
                                return_argmax=True)
        assert y.shape == arg.shape == (0, 3, 2, 4)
        assert y.dtype == dtype and arg.dtype == np.int64
    gx = curoi.roi_pool_backward(np.zeros((0, 3, 2, 4), dtype),
                                 np.zeros((0, 3, 2, 4), np.int64),
                                 np.zeros((0, 5), np.float32), x.shape)
    assert gx.shape == x.shape and gx.dtype == dtype
    np.testing.assert_array_equal(gx.astype(np.float64), 0.0)


# --------------------------------------------------------------------------
# the CPU's loop structures
# --------------------------------------------------------------------------


def _special_map(rng, shape, dtype):
    """Ties (few distinct values), NaNs, an all -inf channel and signed
    zeros: the cases where the first maximum and the NaN rule decide."""
    x = np.round(rng.standard_normal(shape) * 2) / 2
    x[x == 0] = -0.0
    x = x.astype(dtype)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, 4)] = np.nan
    x[:, 1] = -np.inf
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("many", [False, True], ids=["few boxes", "many boxes"])
@pytest.mark.parametrize("special", [False, True], ids=["distinct", "special"])
def test_cpu_paths_vs_reference(convention, dtype, many, special):
    """The CPU forward scans NCHW planes a channel or two at a time with few
    boxes, and a channels-last copy of 16 channels at a time once the boxes'
    bins outnumber the pixels; the backward adds two planes at once and an
    odd one alone. Both forward paths, with 19 channels (a partial block of
    each kind), NCHW and NHWC, against the reference; the same bits at 1
    and 3 threads."""
    rng = np.random.default_rng(40 + 2 * many + special + 4 * (convention == "mmcv"))
    n, c, h, w = 2, 19, 9, 11
    # 40 boxes x 9 bins > 2 x 9 x 11 pixels > 3 boxes x 9 bins
    k = 40 if many else 3
    x = (_special_map(rng, (n, c, h, w), dtype) if special
         else ref.permutation_map(rng, (n, c, h, w), dtype))
    boxes = ref.random_boxes(rng, n, h, w, 1.0, k, dtype=dtype)
    ref.spoil_boxes(rng, boxes, n, probability=1.0)
    y_ref, arg_ref = ref.roi_pool(x, boxes, 3, 1.0, convention)
    g = rng.standard_normal(y_ref.shape).astype(dtype)
    gx_ref = ref.roi_pool_backward(g, arg_ref, boxes, x.shape)
    to_nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    before = curoi.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            curoi.set_num_threads(threads)
            got = []
            for argmax_dtype in ("int64", "int32"):
                y, arg = curoi.roi_pool(x, boxes, 3, 1.0, convention=convention,
                                        return_argmax=True, argmax_dtype=argmax_dtype)
                np.testing.assert_array_equal(y, y_ref)
                np.testing.assert_array_equal(arg, arg_ref)
                yn, argn = curoi.roi_pool(to_nhwc(x), boxes, 3, 1.0, convention=convention,
                                          return_argmax=True, argmax_dtype=argmax_dtype,
                                          data_format="NHWC")
                np.testing.assert_array_equal(yn, to_nhwc(y_ref))
                np.testing.assert_array_equal(argn, to_nhwc(arg_ref))
                gx = curoi.roi_pool_backward(g, arg, boxes, x.shape)
                np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
                got += [y, arg, yn, argn, gx]
            results.append(got)
    finally:
        curoi.set_num_threads(before)
    for one, three in zip(*results):
        assert one.tobytes() == three.tobytes()
