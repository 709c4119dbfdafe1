"""Line charts drawn with PIL (matplotlib is not among the requirements): panels of series of
(x, y) points, x on a log scale, one colour per series name across panels, one legend."""
import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from runtime.io import atomic_path

PANEL_SIZE = (420, 300)
MARGINS = (64, 34, 16, 46)  # left, top, right, bottom: room for tick labels and titles
LEGEND_ROW = 22
FONT_SIZE = 13
TICK = 4
POINT_RADIUS = 3
X_PADDING = 0.06  # of the log-x span on each side, so that end points stay inside the frame
Y_TICKS = 5
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127))
AXIS_COLOR, GRID_COLOR, TEXT_COLOR = (0, 0, 0), (225, 225, 225), (0, 0, 0)


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    series: dict  # name -> [(x, y), ...], x > 0


#################################################################################
#                                    Scales                                     #
#################################################################################

def nice_ticks(low, high, count=Y_TICKS):
    """About `count` round values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high == low:
        low, high = low - 1, high + 1
    raw = (high - low) / (count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(math.ceil((high - first) / step) + 1)]


def tick_label(value):
    return f"{value:.10g}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


#################################################################################
#                                   Drawing                                     #
#################################################################################

def draw_panel(draw, font, panel, origin, colors):
    left, top = origin[0] + MARGINS[0], origin[1] + MARGINS[1]
    right, bottom = origin[0] + PANEL_SIZE[0] - MARGINS[2], origin[1] + PANEL_SIZE[1] - MARGINS[3]
    points = [point for series in panel.series.values() for point in series]
    xs = sorted({x for x, _ in points})
    y_ticks = nice_ticks(min(y for _, y in points), max(y for _, y in points))
    log_span = (math.log(xs[-1]) - math.log(xs[0])) or 1.0
    log_low, log_high = math.log(xs[0]) - X_PADDING * log_span, math.log(xs[-1]) + X_PADDING * log_span

    def at(x, y):
        fx = (math.log(x) - log_low) / (log_high - log_low)
        fy = (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    for y in y_ticks:
        _, py = at(xs[0], y)
        draw.line([(left, py), (right, py)], fill=GRID_COLOR)
        draw.text((left - TICK - 2, py), tick_label(y), fill=TEXT_COLOR, font=font, anchor="rm")
    for x in xs:
        px, _ = at(x, y_ticks[0])
        draw.line([(px, bottom), (px, bottom + TICK)], fill=AXIS_COLOR)
        draw.text((px, bottom + TICK + 2), tick_label(x), fill=TEXT_COLOR, font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=AXIS_COLOR)
    draw.text(((left + right) / 2, origin[1] + MARGINS[1] / 2), panel.title, fill=TEXT_COLOR, font=font, anchor="mm")
    draw.text(((left + right) / 2, bottom + MARGINS[3] - 6), panel.x_label, fill=TEXT_COLOR, font=font, anchor="mb")
    draw.text((origin[0] + 4, top - 6), panel.y_label, fill=TEXT_COLOR, font=font, anchor="lb")

    for name, series in panel.series.items():
        pixels = [at(x, y) for x, y in sorted(series)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colors[name], width=2)
        for px, py in pixels:
            draw.ellipse([px - POINT_RADIUS, py - POINT_RADIUS, px + POINT_RADIUS, py + POINT_RADIUS],
                         fill=colors[name])


def save_chart(path, panels, columns=2):
    """Draws the panels row by row, `columns` per row, with a legend of every series below."""
    names = list(dict.fromkeys(name for panel in panels for name in panel.series))
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}
    rows = math.ceil(len(panels) / columns)
    width, height = columns * PANEL_SIZE[0], rows * PANEL_SIZE[1] + LEGEND_ROW * math.ceil(len(names) / columns)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(FONT_SIZE)
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        draw_panel(draw, font, panel, (column * PANEL_SIZE[0], row * PANEL_SIZE[1]), colors)
    for index, name in enumerate(names):
        row, column = divmod(index, columns)
        x, y = column * PANEL_SIZE[0] + MARGINS[0], rows * PANEL_SIZE[1] + row * LEGEND_ROW + LEGEND_ROW / 2
        draw.line([(x, y), (x + 24, y)], fill=colors[name], width=3)
        draw.text((x + 30, y), name, fill=TEXT_COLOR, font=font, anchor="lm")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
