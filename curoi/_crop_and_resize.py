"""TensorFlow's crop_and_resize, forward and gradients: the public
NumPy/CuPy functions, built from ``curoi._operators.CROP_AND_RESIZE``."""

from . import _frontend, _validate
from ._operators import CROP_AND_RESIZE


def crop_and_resize(image, boxes, box_indices, crop_size, method="bilinear",
                    extrapolation_value=0.0, *, data_format="NHWC"):
    """``tf.image.crop_and_resize``: crops of ``image`` resized to
    ``crop_size``, with TensorFlow's numbers.

    Args:
        image: ``[N, H, W, C]`` (TensorFlow's layout, the default) or, with
            ``data_format="NCHW"``, ``[N, C, H, W]``; any array curoi takes.
        boxes: ``[K, 4]`` normalised ``(y1, x1, y2, x2)``: ``y`` maps to
            ``y * (H - 1)`` on the image, so 0 and 1 are the first and last
            pixel centres; ``y1 > y2`` flips the crop. Used in float32
            (float64 for a float64 image).
        box_indices: ``[K]`` integers, the image of each box. One outside
            ``[0, N)`` gives a crop of ``extrapolation_value`` and no
            gradient (TensorFlow raises an error instead).
        crop_size: ``(crop_height, crop_width)`` or an int for both. A crop
            of height 1 samples the box's vertical centre (width likewise).
        method: ``"bilinear"`` or ``"nearest"`` (halves rounded away from 0).
        extrapolation_value: the value of points outside the image.
        data_format: ``"NHWC"`` or ``"NCHW"``.

    Returns:
        ``[K, crop_height, crop_width, C]`` (NCHW: ``[K, C, crop_height,
        crop_width]``) of the image's dtype. (TensorFlow returns float32
        whatever the image's dtype; float64 images are computed in float64
        here, in float32 by TensorFlow.)
    """
    ph, pw = _validate.output_size(crop_size, "crop_size")
    values = CROP_AND_RESIZE.values(method, extrapolation_value)
    return _frontend.forward(CROP_AND_RESIZE, image, (boxes, box_indices), ph, pw,
                             values, _validate.data_format(data_format))


def crop_and_resize_backward(grad_output, image, boxes, box_indices, crop_size,
                             method="bilinear", *, deterministic=False,
                             data_format="NHWC"):
    """The gradients of :func:`crop_and_resize` with respect to the image
    and to the boxes, as TensorFlow computes them.

    Args:
        grad_output: ``[K, crop_height, crop_width, C]`` (NCHW:
            ``[K, C, crop_height, crop_width]``).
        image, boxes, box_indices, crop_size, method, data_format: as in the
            forward.
        deterministic: bitwise reproducible sums for the image's gradient,
            as in :func:`curoi.roi_align_backward` (the boxes' gradient is
            always summed in a fixed order).

    Returns:
        ``(grad_image, grad_boxes)``: the image's shape (grad_output's
        dtype) and ``[K, 4]`` (the boxes' dtype). The boxes' gradient is
        TensorFlow's, the derivative of the bilinear interpolation, for
        ``method="nearest"`` too (as TensorFlow, so that ported models
        train the same).
    """
    crop_size = _validate.output_size(crop_size, "crop_size")
    values = CROP_AND_RESIZE.values(method)
    deterministic = _validate.flag(deterministic, "deterministic")
    channels_last = _validate.data_format(data_format)
    shape = getattr(image, "shape", None)
    if shape is None:
        raise TypeError(f"image must be an array, got {type(image).__name__}")
    grad_image = _frontend.backward(CROP_AND_RESIZE, grad_output, (boxes, box_indices),
                                    tuple(shape), crop_size, values, deterministic,
                                    channels_last)
    grad_boxes = _frontend.boxes_backward(CROP_AND_RESIZE, grad_output, image,
                                          (boxes, box_indices), *crop_size, values,
                                          channels_last)
    return grad_image, grad_boxes
