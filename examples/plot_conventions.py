"""Draw where roi_pool's bins and roi_align's samples fall on the README's map.

Run: python examples/plot_conventions.py [OUTPUT.png]   (default docs/conventions.png)
Needs matplotlib: pip install -e ".[plot]" (in curoi's folder).

Four panels, one box, one 8x8 map (the worked example of the README's
Conventions section): roi_pool under convention="torchvision" and "mmcv",
and roi_align with aligned=False and aligned=True (sampling_ratio=2). Each
panel shades the 2x2 bins (overlaps show darker), marks roi_align's sample
points and roi_pool's maxima, and prints the 2x2 result beside the map.

The geometry is computed here from the formulas in the README's table; the
values come from curoi itself. `panels()` returns both, so that a test can
hold them against an independent reference.

Pixel (row r, column c) is drawn as the unit square centred on (c, r): the
coordinates in which roi_align's sampling formula and bilinear interpolation
place pixel centres.
"""

import argparse
import io
import math
from pathlib import Path

import numpy as np

import curoi

WORKED_MAP = np.array([
    [0.88, 0.44, 0.14, 0.16, 0.37, 0.77, 0.96, 0.27],
    [0.19, 0.45, 0.57, 0.16, 0.63, 0.29, 0.71, 0.70],
    [0.66, 0.26, 0.82, 0.64, 0.54, 0.73, 0.59, 0.26],
    [0.85, 0.34, 0.76, 0.84, 0.29, 0.75, 0.62, 0.25],
    [0.32, 0.74, 0.21, 0.39, 0.34, 0.03, 0.33, 0.48],
    [0.20, 0.14, 0.16, 0.13, 0.73, 0.65, 0.96, 0.32],
    [0.19, 0.69, 0.09, 0.86, 0.88, 0.07, 0.01, 0.48],
    [0.83, 0.24, 0.97, 0.04, 0.24, 0.35, 0.50, 0.91],
])
BOX = (0.0, 3.0, 6.0, 7.0)          # (x1, y1, x2, y2), spatial_scale 1
OUTPUT_SIZE = 2
SAMPLING_RATIO = 2
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "conventions.png"


def _round_half_away(v):
    # C's round(), which torchvision's kernel uses; Python's round() sends
    # halves to even and would move a box edge at x.5.
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def pool_bins(convention, box=BOX, pooled=OUTPUT_SIZE, height=8, width=8):
    """roi_pool's bins as half-open pixel ranges ``[(h0, h1, w0, w1)]`` in
    row-major bin order, and the box's extent ``(x0, y0, x1, y1)`` in pixel
    edges, per the README's table (spatial_scale 1)."""
    x1, y1, x2, y2 = box
    if convention == "torchvision":
        # Integer corners, the end pixel included, at least one pixel.
        start_w, start_h = _round_half_away(x1), _round_half_away(y1)
        roi_w = max(_round_half_away(x2) - start_w + 1, 1)
        roi_h = max(_round_half_away(y2) - start_h + 1, 1)

        def edges(p, start, size):
            return (math.floor(p * size / pooled) + start,
                    math.ceil((p + 1) * size / pooled) + start)
    elif convention == "mmcv":
        # Continuous corners x1 and x2 + 1: the box ends after pixel x2.
        start_w, start_h = x1, y1
        roi_w, roi_h = x2 + 1 - x1, y2 + 1 - y1

        def edges(p, start, size):
            return (math.floor(p * size / pooled + start),
                    math.ceil((p + 1) * size / pooled + start))
    else:
        raise ValueError(f"convention must be 'torchvision' or 'mmcv', got {convention!r}")
    bins = []
    for ph in range(pooled):
        h0, h1 = (min(max(v, 0), height) for v in edges(ph, start_h, roi_h))
        for pw in range(pooled):
            w0, w1 = (min(max(v, 0), width) for v in edges(pw, start_w, roi_w))
            bins.append((h0, h1, w0, w1))
    return bins, (start_w, start_h, start_w + roi_w, start_h + roi_h)


def align_geometry(aligned, box=BOX, pooled=OUTPUT_SIZE, grid=SAMPLING_RATIO):
    """roi_align's region ``(x0, y0, x1, y1)``, its bins ``[(y0, y1, x0, x1)]``
    and each bin's sample points ``[[(x, y), ...]]`` in row-major bin order,
    in the coordinates where pixel centres are integers (README's formula)."""
    x1, y1, x2, y2 = box
    offset = 0.5 if aligned else 0.0
    start_w, start_h = x1 - offset, y1 - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        # The legacy convention makes every box at least one pixel wide.
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / pooled, roi_h / pooled
    bins, samples = [], []
    for ph in range(pooled):
        for pw in range(pooled):
            top, left = start_h + ph * bin_h, start_w + pw * bin_w
            bins.append((top, top + bin_h, left, left + bin_w))
            samples.append([(left + (ix + 0.5) * bin_w / grid,
                             top + (iy + 0.5) * bin_h / grid)
                            for iy in range(grid) for ix in range(grid)])
    return (start_w, start_h, start_w + roi_w, start_h + roi_h), bins, samples


def panels():
    """What each panel shows, computed: a list of dicts with ``title``,
    ``op``, ``values`` (the 2x2 result, from curoi), ``bins`` (in pixel
    edges: ``(top, bottom, left, right)``), ``region`` (``(left, top, right,
    bottom)`` in pixel edges), and ``samples`` (roi_align) or ``argmax``
    (roi_pool, flat indices)."""
    features = WORKED_MAP[None, None]
    boxes = np.array([(0.0,) + BOX])
    result = []
    for convention in ("torchvision", "mmcv"):
        values, argmax = curoi.roi_pool(features, boxes, OUTPUT_SIZE,
                                        convention=convention, return_argmax=True)
        bins, region = pool_bins(convention)
        # Pixel p spans p - 0.5 .. p + 0.5 in the drawing.
        result.append(dict(
            title=f'roi_pool, convention="{convention}"', op="roi_pool",
            values=np.asarray(values)[0, 0],
            argmax=np.asarray(argmax)[0, 0],
            bins=[(h0 - 0.5, h1 - 0.5, w0 - 0.5, w1 - 0.5) for h0, h1, w0, w1 in bins],
            region=tuple(v - 0.5 for v in region)))
    for aligned in (False, True):
        values = curoi.roi_align(features, boxes, OUTPUT_SIZE,
                                 sampling_ratio=SAMPLING_RATIO, aligned=aligned)
        region, bins, samples = align_geometry(aligned)
        result.append(dict(
            title=f"roi_align, aligned={aligned}", op="roi_align",
            values=np.asarray(values)[0, 0], bins=bins, region=region,
            samples=samples))
    return result


# What each panel's convention does with BOX, in one or two lines.
SUBTITLES = {
    'roi_pool, convention="torchvision"':
        "box round(x1)..round(x2), end pixel included: 7 x 5 px;\n"
        "bins floor(p*bin)..ceil((p+1)*bin), bin 3.5 x 2.5: they overlap",
    'roi_pool, convention="mmcv"':
        "box x1..x2+1, continuous: 7 x 5 px;\n"
        "with integer corners, the same bins as torchvision",
    "roi_align, aligned=False":
        "box x1..x2 from pixel centre to pixel centre: 6 x 4;\n"
        "2x2 bilinear samples per bin, averaged",
    "roi_align, aligned=True":
        "box x1-0.5..x2-0.5: half a pixel up and left: 6 x 4;\n"
        "2x2 bilinear samples per bin, averaged",
}
BIN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def _value_text(op, v):
    # roi_pool returns a map value (two decimals); roi_align an average.
    return f"{v:.2f}" if op == "roi_pool" else f"{v:.3f}"


def draw(output=DEFAULT_OUTPUT, computed=None):
    """Draw the four panels (``computed``, default ``panels()``) into
    ``output`` (PNG; None writes nothing); return the Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patheffects
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    height, width = WORKED_MAP.shape
    fig = plt.figure(figsize=(10, 9.9), dpi=90)
    outer = fig.add_gridspec(2, 2, left=0.01, right=0.99, top=0.835, bottom=0.01,
                             wspace=0.06, hspace=0.3)
    for index, panel in enumerate(computed if computed is not None else panels()):
        cell = outer[index // 2, index % 2].subgridspec(1, 2, width_ratios=(8, 2.6),
                                                          wspace=0.03)
        ax = fig.add_subplot(cell[0])
        ax.imshow(np.zeros_like(WORKED_MAP), cmap="Greys", vmin=0, vmax=1,
                  extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        # roi_align's samples sit on or near pixel centres: its panels move
        # the map's numbers to the lower part of each pixel to keep them clear,
        # and a white halo keeps a number legible where a bin edge crosses it.
        text_dy = 0.28 if panel["op"] == "roi_align" else 0.0
        halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]
        for r in range(height):
            for c in range(width):
                ax.text(c, r + text_dy, f"{WORKED_MAP[r, c]:.2f}", ha="center",
                        va="center", fontsize=7.5, color="#222222", path_effects=halo)
        ax.set_xticks(range(width))
        ax.set_yticks(range(height))
        ax.set_xticks(np.arange(-0.5, width), minor=True)
        ax.set_yticks(np.arange(-0.5, height), minor=True)
        ax.grid(which="minor", color="#bbbbbb", linewidth=0.6)
        ax.tick_params(which="both", length=0, labelsize=8, pad=2)
        ax.xaxis.tick_top()
        ax.set_xlim(-0.75, width - 0.4)
        ax.set_ylim(height - 0.4, -0.75)

        for (top, bottom, left, right), colour in zip(panel["bins"], BIN_COLOURS):
            ax.add_patch(Rectangle((left, top), right - left, bottom - top,
                                   facecolor=colour, alpha=0.22, edgecolor="none"))
            # Outlines inset a little so that two bins sharing an edge or a
            # row stay distinguishable.
            ax.add_patch(Rectangle((left + 0.07, top + 0.07), right - left - 0.14,
                                   bottom - top - 0.14, facecolor="none",
                                   edgecolor=colour, linewidth=1.4))
        left, top, right, bottom = panel["region"]
        ax.add_patch(Rectangle((left, top), right - left, bottom - top, facecolor="none",
                               edgecolor="black", linewidth=2.0, linestyle="--"))
        if panel["op"] == "roi_align":
            for points, colour in zip(panel["samples"], BIN_COLOURS):
                xs, ys = zip(*points)
                ax.plot(xs, ys, "o", color=colour, markersize=5.5,
                        markeredgecolor="black", markeredgewidth=0.8)
            how = "mean of each\nbin's 4 samples"
        else:
            for flat in panel["argmax"].ravel():
                r, c = divmod(int(flat), width)
                ax.add_patch(Rectangle((c - 0.4, r - 0.3), 0.8, 0.6, facecolor="none",
                                       edgecolor="black", linewidth=1.6))
            how = "max of each bin"
        ax.annotate(SUBTITLES[panel["title"]], (0, 1), xycoords="axes fraction",
                    xytext=(0, 16), textcoords="offset points", fontsize=8.5,
                    va="bottom", ha="left", linespacing=1.3)
        ax.annotate(panel["title"], (0, 1), xycoords="axes fraction",
                    xytext=(0, 44), textcoords="offset points", fontsize=10,
                    fontweight="bold", va="bottom", ha="left")

        table = fig.add_subplot(cell[1])
        table.set_xlim(-0.05, 2.05)
        table.set_ylim(2.4, -1.0)
        table.set_aspect("equal")
        table.axis("off")
        table.text(1, -0.3, "result", ha="center", va="center", fontsize=9.5,
                   fontweight="bold")
        table.text(1, 2.15, how, ha="center", va="top", fontsize=8, color="#444444")
        for (ph, pw), colour in zip(np.ndindex(OUTPUT_SIZE, OUTPUT_SIZE), BIN_COLOURS):
            table.add_patch(Rectangle((pw, ph), 1, 1, facecolor=colour, alpha=0.35,
                                      edgecolor="white", linewidth=2))
            table.text(pw + 0.5, ph + 0.5, _value_text(panel["op"], panel["values"][ph, pw]),
                       ha="center", va="center", fontsize=9, gid="result")

    legend = [
        Patch(facecolor="#888888", alpha=0.35, edgecolor="#444444",
              label="one bin of the 2x2 output (its colour = its result cell)"),
        Line2D([], [], color="black", linestyle="--", linewidth=2,
               label=f"box ({', '.join(f'{v:g}' for v in BOX)}) as the convention reads it"),
        Line2D([], [], marker="o", linestyle="none", color="#888888",
               markeredgecolor="black", label="roi_align sample point (sampling_ratio=2)"),
        Patch(facecolor="none", edgecolor="black", linewidth=1.6,
              label="roi_pool: the pixel each bin's maximum comes from"),
    ]
    fig.legend(handles=legend, loc="upper center", ncol=2, fontsize=8.5, frameon=False,
               bbox_to_anchor=(0.5, 1.0), handlelength=2.5, columnspacing=2.5)
    fig.text(0.5, 0.933, "Pixel (row r, column c) is the square centred on (c, r), "
             "the coordinates of roi_align's sampling formula.",
             ha="center", fontsize=8.5, style="italic")
    if output is None:
        return fig
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # A palette of 256 colours is indistinguishable here from full RGB and
    # keeps the committed PNG small.
    from PIL import Image
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    Image.open(buffer).convert("RGB").quantize(256).save(output, optimize=True)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", default=str(DEFAULT_OUTPUT),
                        help="PNG to write (default: docs/conventions.png)")
    args = parser.parse_args(argv)
    computed = panels()
    draw(args.output, computed)
    for panel in computed:
        rows = [[_value_text(panel["op"], v) for v in row] for row in panel["values"]]
        print(f"{panel['title']}: {rows}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
