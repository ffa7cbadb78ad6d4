"""The overfit set: 10 high-resolution images rendered locally and deterministically, with the text they show.

4 receipts (dense small monospace text, long and narrow), 3 charts (matplotlib: fine tick labels, legends;
wide) and 3 scene-text images (signs on brick, stucco or wood, in perspective). Paper texture, slight rotation,
sensor noise and JPEG compression make them look photographed. Sizes are fixed so that, in Gundam mode, they
cover nine different crop grids (1x2 .. 1x5 receipts, 3x2 / 2x1 / 3x1 charts, 2x2 / 2x3 / 3x2 scenes).

Fonts are the DejaVu faces matplotlib ships and Pillow's built-in default font: nothing from the system, nothing
downloaded. Each image draws from its own generator seeded by (seed, index), so rendering the first n images
gives the same first n images as rendering all ten. Pixels depend on the Pillow and matplotlib versions; the
records (text, sizes, grids) do not.

    gundam make-overfit-set DIR [--seed 0]       # DIR/records.jsonl + DIR/images/*.jpg
"""
from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from gundam.config import check_int
from gundam.data.records import Record, write_records

PROMPT = "<image>\nFree OCR."   # the same for every image: only the vision tokens tell the images apart
SOURCE = "gundam.data.overfit"
# (kind, width, height), interleaved so that the first three records are one of each kind
SPECS = [
    ("receipt", 1100, 2200), ("chart", 3000, 2000), ("scene", 2200, 2200),
    ("receipt", 1000, 3000), ("chart", 3200, 1600), ("scene", 1600, 2400),
    ("receipt", 900, 3600), ("chart", 3600, 1200), ("scene", 2400, 1600),
    ("receipt", 800, 4000),
]
TYPES = {"receipt": "receipt_ocr", "chart": "chart_ocr", "scene": "scene_text_ocr"}


def make_overfit_set(out_dir, seed: int = 0, n: int = len(SPECS)) -> list[Record]:
    """Render the first `n` images into out_dir/images and write out_dir/records.jsonl; returns the records."""
    check_int(n, "n", 1, len(SPECS))
    check_int(seed, "seed", lo=0)
    if not isinstance(out_dir, (str, os.PathLike)) or not isinstance(os.fspath(out_dir), str):
        raise TypeError(f"out_dir of type {type(out_dir).__name__}: expected a directory path (str or os.PathLike)")
    out_dir = os.fspath(out_dir)
    if not out_dir:
        raise ValueError("out_dir '': expected a directory path")
    # what would fail only after the rendering (seconds of work), checked first
    for path, kind in ((out_dir, "a directory"), (os.path.join(out_dir, "images"), "a directory"),
                       (os.path.join(out_dir, "records.jsonl"), "a file")):
        if os.path.exists(path) and os.path.isdir(path) != (kind == "a directory"):
            raise ValueError(f"{path!r} is {'a directory' if os.path.isdir(path) else 'a file'}: expected {kind} "
                             f"(or a path to create one at)")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records, counts = [], dict.fromkeys(TYPES, 0)
    for index, (kind, w, h) in enumerate(SPECS[:n]):
        image, answer = render(index, seed)
        name = f"gundam_{kind}_{counts[kind]:03d}"
        counts[kind] += 1
        path = f"images/{name}.jpg"
        image.save(os.path.join(out_dir, path), quality=90)
        records.append(Record(name, path, SOURCE, TYPES[kind], PROMPT, answer, w, h))
    write_records(os.path.join(out_dir, "records.jsonl"), records)
    return records


def render(index: int, seed: int = 0) -> tuple[Image.Image, str]:
    """Image `index` of the set: (RGB image of the spec's size, the text it shows)."""
    kind, w, h = SPECS[index]
    rng = np.random.default_rng([seed, index])
    image, answer = {"receipt": receipt, "chart": chart, "scene": scene}[kind](w, h, rng)
    assert image.size == (w, h), (image.size, (w, h))
    return photographed(image, rng), answer


# ----------------------------------------------------------------------------------------------------------
# shared pieces: fonts, textures, the camera

@functools.lru_cache(maxsize=None)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A DejaVu face that matplotlib ships (e.g. "DejaVuSansMono.ttf"); "default" is Pillow's built-in font."""
    if name == "default":
        return ImageFont.load_default(size=size)
    import matplotlib
    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)


def field(rng, w: int, h: int, cell, lo: float, hi: float) -> Image.Image:
    """An "L" image of a smooth random field with values lo..hi (as fractions of 255), varying over `cell`
    pixels (an int, or (cell_x, cell_y)): random values upsampled bilinearly."""
    cx, cy = (cell, cell) if isinstance(cell, int) else cell
    small = (lo + (hi - lo) * rng.random((h // cy + 2, w // cx + 2), dtype=np.float32)) * 255
    return Image.fromarray(small, mode="F").resize((w, h), Image.Resampling.BILINEAR).convert("L")


def tinted(image: Image.Image, *fields: Image.Image) -> Image.Image:
    """`image` multiplied by the product of "L" fields (255 = unchanged)."""
    shade = fields[0]
    for f in fields[1:]:
        shade = ImageChops.multiply(shade, f)
    return ImageChops.multiply(image, shade.convert(image.mode))


def paper(rng, w: int, h: int, color=(246, 244, 236)) -> Image.Image:
    """Off-white paper with uneven shading and a fine grain."""
    return tinted(Image.new("RGB", (w, h), color), field(rng, w, h, 300, 0.95, 1), field(rng, w, h, 6, 0.96, 1))


def photographed(image: Image.Image, rng) -> Image.Image:
    """Uneven light and sensor noise (JPEG compression comes when the image is saved)."""
    w, h = image.size
    image = tinted(image, field(rng, w, h, max(w, h) // 2, 0.88, 1))
    noise = Image.fromarray(rng.integers(0, 9, (h, w), dtype=np.uint8))      # uniform, zero mean after -4
    return ImageChops.add(image, noise.convert("RGB"), offset=-4)


def shadow_of(layer: Image.Image, strength: float, radius: int) -> Image.Image:
    """A soft dark shadow of an RGBA layer (blurred at 1/8 size: the blur is what costs)."""
    alpha = layer.getchannel("A").point(lambda a: int(a * strength))
    small = alpha.reduce(8).filter(ImageFilter.GaussianBlur(radius / 8))
    shadow = Image.new("RGBA", layer.size, (0, 0, 0, 0))
    shadow.putalpha(small.resize(layer.size, Image.Resampling.BILINEAR))
    return shadow


def rotated_onto(layer: Image.Image, background: Image.Image, angle: float, center) -> Image.Image:
    """Paste an RGBA layer, rotated by `angle` degrees, centred at `center`, with a soft shadow."""
    layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    x, y = center[0] - layer.width // 2, center[1] - layer.height // 2
    out = background.convert("RGBA")
    out.alpha_composite(shadow_of(layer, 0.45, 12), (x + 10, y + 14))
    out.alpha_composite(layer, (x, y))
    return out.convert("RGB")


# ----------------------------------------------------------------------------------------------------------
# receipts

STORES = [
    ("GREENLEAF MARKET", "1280 HARBOR BLVD STE 4", "PORTLAND OR 97205", "(503) 555-0142"),
    ("CORNER HARDWARE CO", "77 MILL STREET", "BURLINGTON VT 05401", "(802) 555-0199"),
    ("SUNRISE PHARMACY", "4410 W ALAMEDA AVE", "DENVER CO 80219", "(303) 555-0176"),
    ("BLUE DOOR BAKERY", "9 CANAL ROAD", "SAVANNAH GA 31401", "(912) 555-0123"),
    ("NORTHSIDE GROCERS", "2301 LAKE SHORE DR", "DULUTH MN 55803", "(218) 555-0167"),
    ("PACIFIC OFFICE SUPPLY", "615 MISSION ST", "SAN FRANCISCO CA 94105", "(415) 555-0110"),
]
ITEMS = [
    "ORGANIC BANANAS", "WHOLE MILK 1GAL", "SOURDOUGH LOAF", "EGGS LARGE 12CT", "CHEDDAR 8OZ", "BABY SPINACH",
    "GREEK YOGURT", "COFFEE BEANS 12OZ", "PENNE PASTA 1LB", "TOMATO SAUCE", "OLIVE OIL 500ML", "JASMINE RICE 2LB",
    "CHICKEN THIGHS", "GROUND BEEF 1LB", "GALA APPLES", "HASS AVOCADO", "LEMONS", "GARLIC BULB", "YELLOW ONIONS",
    "BUTTER UNSALTED", "ORANGE JUICE", "SPARKLING WATER", "TORTILLA CHIPS", "SALSA MEDIUM", "DARK CHOCOLATE",
    "PAPER TOWELS 6PK", "DISH SOAP", "TOOTHPASTE", "AA BATTERIES 4PK", "TRASH BAGS 30CT", "WOOD SCREWS #8",
    "DUCT TAPE", "LED BULB 60W", "SANDPAPER 120", "PAINT ROLLER", "MASKING TAPE", "VITAMIN D3", "BANDAGES 30CT",
    "COUGH SYRUP", "SUNSCREEN SPF50", "CROISSANT", "BAGUETTE", "CINNAMON ROLL", "RYE BREAD", "PRINTER PAPER",
    "GEL PENS 12PK", "STAPLES 5000", "FILE FOLDERS", "STICKY NOTES", "BINDER 2IN", "MAPLE SYRUP", "OAT MILK",
]


def receipt(w: int, h: int, rng) -> tuple[Image.Image, str]:
    cols = int(rng.integers(34, 41))                       # characters per line, as on a thermal printer
    pw, ph = int(w * 0.78), int(h * 0.94)
    margin = int(pw * 0.06)
    mono, bold = "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"
    size = int((pw - 2 * margin) / font(mono, 100).getlength("0" * cols) * 100)
    step = int(size * 1.28)
    n_lines = (ph - 2 * margin) // step

    store, street, city, phone = STORES[int(rng.integers(len(STORES)))]
    day, month, hour, minute = int(rng.integers(1, 29)), int(rng.integers(1, 13)), int(rng.integers(8, 21)), \
        int(rng.integers(60))
    head = [(store.center(cols), True), (street.center(cols), False), (city.center(cols), False),
            (f"TEL {phone}".center(cols), False), ("-" * cols, False),
            (_two(f"{month:02d}/{day:02d}/2024 {hour:02d}:{minute:02d}", f"REG {rng.integers(1, 9)}", cols), False),
            (_two(f"TRANS {rng.integers(1000, 9999)}", f"CASHIER {rng.integers(10, 99)}", cols), False),
            ("-" * cols, False)]
    tail_len = 13                                           # the lines after the items, below
    body, total, count = [], 0.0, 0
    while len(head) + len(body) + tail_len + 2 <= n_lines:  # room for one more item (up to two lines)
        name = ITEMS[int(rng.integers(len(ITEMS)))]
        qty, price = int(rng.choice([1, 1, 1, 2, 3])), round(float(rng.uniform(0.5, 24)), 2)
        amount = round(qty * price, 2)
        if qty > 1:
            body.append((f"  {qty} @ {price:.2f}", False))
        body.append((_two(name, f"{amount:.2f}", cols), False))
        total, count = total + amount, count + qty
    rate = float(rng.choice([0.0625, 0.07, 0.0825, 0.09]))
    tax = round(total * rate, 2)
    paid = "VISA" if rng.random() < 0.6 else "CASH"
    tendered = float(np.ceil(total + tax + 0.01)) if paid == "CASH" else round(total + tax, 2)
    tail = [("-" * cols, False), (_two("SUBTOTAL", f"{total:.2f}", cols), False),
            (_two(f"TAX {rate * 100:.2f}%", f"{tax:.2f}", cols), False),
            (_two("TOTAL", f"{total + tax:.2f}", cols), True),
            (_two(paid if paid == "CASH" else f"VISA ****{rng.integers(1000, 9999)}", f"{tendered:.2f}", cols), False),
            (_two("CHANGE", f"{tendered - total - tax:.2f}", cols), False), ("-" * cols, False),
            (f"ITEMS SOLD {count}", False), ("", False), ("THANK YOU FOR SHOPPING!".center(cols), True),
            ("RETURNS WITHIN 30 DAYS".center(cols), False), ("WITH RECEIPT".center(cols), False),
            (f"#{rng.integers(10**11, 10**12)}".center(cols), False)]
    lines = head + body + tail
    assert len(tail) == tail_len and len(lines) <= n_lines

    layer = paper(rng, pw, ph).convert("RGBA")
    draw = ImageDraw.Draw(layer)
    for i, (text, strong) in enumerate(lines):
        ink = int(rng.integers(25, 70))                 # thermal print fades unevenly from line to line
        face = font(bold if strong else mono, size)
        draw.text((margin, margin + i * step), text, font=face, fill=(ink, ink, ink + 5))
    # a torn bottom edge: up to 8 px cut away, varying along the edge
    tear = ph - 1 - rng.integers(0, 9, pw // 12 + 2).repeat(12)[:pw]
    ImageDraw.Draw(layer).point([(x, y) for x in range(pw) for y in range(tear[x] + 1, ph)], fill=(0, 0, 0, 0))

    table = tinted(Image.new("RGB", (w, h), (92, 74, 58)), field(rng, w, h, 40, 0.75, 1))
    image = rotated_onto(layer, table, float(rng.uniform(-1.2, 1.2)), (w // 2, h // 2))
    answer = "\n".join(" ".join(text.split()) for text, _ in lines)
    return image, answer


def _two(left: str, right: str, cols: int) -> str:
    """A receipt line: `left` flush left, `right` flush right."""
    return left + " " * max(1, cols - len(left) - len(right)) + right


# ----------------------------------------------------------------------------------------------------------
# charts

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def chart(w: int, h: int, rng) -> tuple[Image.Image, str]:
    """A printed chart: line, grouped bar or stacked bar (by aspect), its text listed in reading order."""
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 200
    style = "line" if w / h < 1.75 else "bar" if w / h < 2.5 else "stacked"
    with rc_context({"font.family": "DejaVu Sans", "font.size": 11, "axes.titlesize": 15}):
        fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.08, 0.2, 0.7, 0.68))
        texts = CHART_STYLES[style](ax, rng)
        ax.set_title(texts["title"])
        ax.set_xlabel(texts["xlabel"])
        ax.set_ylabel(texts["ylabel"])
        fig.text(0.08, 0.03, texts["note"], fontsize=8, color="0.35")
        fig.canvas.draw()
        printed = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    # printed on paper: the white of the figure takes the paper's colour and grain
    page = ImageChops.multiply(printed, paper(rng, w, h))
    image = page.rotate(float(rng.uniform(-0.6, 0.6)), resample=Image.Resampling.BILINEAR, fillcolor=(70, 70, 72))
    answer = "\n".join([texts["title"], *texts["legend"], texts["ylabel"], " ".join(texts["yticks"][::-1]),
                        " ".join(texts["xticks"]), texts["xlabel"], *texts.get("values", []), texts["note"]])
    return image, answer


def _ticks(ax, axis: str, values, labels):
    getattr(ax, f"set_{axis}ticks")(values, labels)
    return list(labels)


def _y_axis(ax, top: float, unit: str):
    step = float(10 ** np.floor(np.log10(top / 4)))
    step *= 2 if top / step > 8 else 1
    values = np.arange(0, np.ceil(top / step) + 1) * step            # 0 .. the first tick above the data
    ax.set_ylim(0, values[-1] * 1.05)
    return _ticks(ax, "y", values, [f"{v:,.0f}{unit}" for v in values])


def line_chart(ax, rng):
    series = rng.choice(["Widgets", "Gadgets", "Sprockets", "Gizmos", "Doohickeys", "Thingamajigs"], 4,
                        replace=False).tolist()
    months = 24
    x = np.arange(months)
    for name in series:
        start, growth = rng.uniform(200, 900), rng.uniform(-8, 30)
        y = start + growth * x + 60 * np.sin(x / 2 + rng.uniform(0, 6)) + rng.normal(0, 25, months)
        ax.plot(x, np.maximum(y, 10), marker="o", markersize=3, linewidth=1.4, label=name)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=10)
    ax.grid(True, linewidth=0.4, alpha=0.6)
    year = int(rng.integers(2015, 2023))
    xt = _ticks(ax, "x", x[::2], [f"{MONTHS[i % 12]} {year + i // 12}" for i in x[::2]])
    for label in ax.get_xticklabels():
        label.set_rotation(45)
        label.set_fontsize(8)
    top = float(max(line.get_ydata().max() for line in ax.get_lines()))
    texts = dict(title=f"Monthly units shipped by product line, {year}-{year + 1}", legend=series,
                 ylabel="Units shipped", xlabel="Month", yticks=_y_axis(ax, top, ""), xticks=xt,
                 note=f"Source: internal sales ledger, export of {MONTHS[int(rng.integers(12))]} {year + 2}. "
                      f"Preliminary figures.")
    return texts


def bar_chart(ax, rng):
    regions = ["North", "South", "East", "West", "Central"]
    quarters = rng.choice(["Q1", "Q2", "Q3", "Q4"], 3, replace=False).tolist()
    year = int(rng.integers(2016, 2024))
    quarters = [f"{q} {year}" for q in sorted(quarters)]
    x = np.arange(len(regions))
    width = 0.8 / len(quarters)
    values = []
    for j, q in enumerate(quarters):
        v = np.round(rng.uniform(12, 95, len(regions)), 1)
        bars = ax.bar(x + (j - (len(quarters) - 1) / 2) * width, v, width * 0.95, label=q)
        ax.bar_label(bars, labels=[f"{a:.1f}" for a in v], fontsize=7, padding=2)
        values.append(" ".join(f"{a:.1f}" for a in v))
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=10)
    ax.grid(True, axis="y", linewidth=0.4, alpha=0.6)
    texts = dict(title=f"Revenue by region and quarter, {year} (USD millions)", legend=quarters,
                 ylabel="Revenue (USD m)", xlabel="Sales region", yticks=_y_axis(ax, 100, ""),
                 xticks=_ticks(ax, "x", x, regions), values=values,
                 note="Figures are unaudited. Bars labelled with revenue in USD millions.")
    return texts


def stacked_chart(ax, rng):
    sources = ["Coal", "Natural gas", "Nuclear", "Hydro", "Wind", "Solar"]
    start = int(rng.integers(2000, 2010))
    years = np.arange(start, start + 14)
    # each source's weight drifts linearly over the years (coal down, wind and solar up), plus noise
    trend = np.linspace(0, 1, len(years))[:, None] * np.array([-0.6, 0.1, -0.1, 0, 0.5, 0.6])
    weights = np.maximum(rng.uniform(0.3, 1, len(sources)) + trend + rng.normal(0, 0.04, trend.shape), 0.02)
    shares = weights / weights.sum(1, keepdims=True) * 100
    bottom = np.zeros(len(years))
    for k, name in enumerate(sources):
        ax.bar(years, shares[:, k], 0.7, bottom=bottom, label=name)
        bottom += shares[:, k]
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, ncol=2)
    texts = dict(title=f"Electricity generation mix, {years[0]}-{years[-1]} (% of total)", legend=sources,
                 ylabel="Share of generation", xlabel="Year", yticks=_y_axis(ax, 100, "%"),
                 xticks=_ticks(ax, "x", years, [str(y) for y in years]),
                 note=f"Shares may not sum to 100% due to rounding. Grid operator annual report {years[-1] + 1}.")
    return texts


CHART_STYLES = {"line": line_chart, "bar": bar_chart, "stacked": stacked_chart}


# ----------------------------------------------------------------------------------------------------------
# scene text

STREETS = ["ELM", "MAPLE", "HARBOR", "CEDAR", "JUNIPER", "WILLOW", "LINCOLN", "MARKET"]
SHOPS = ["LUNA COFFEE", "ATLAS BOOKS", "PIXEL REPAIR", "ROSE & THYME", "BIG SKY DINER", "ORBIT CYCLES"]
TAGLINES = ["FRESH ROASTED DAILY", "NEW & USED SINCE 1987", "PHONES - LAPTOPS - TABLETS", "FLOWERS FOR EVERY DAY",
            "BREAKFAST ALL DAY", "SALES - SERVICE - RENTALS"]


def sign_texts(kind: str, rng) -> list[str]:
    if kind == "street":
        return [f"{STREETS[int(rng.integers(len(STREETS)))]} ST", f"{int(rng.integers(1, 40)) * 100} BLOCK"]
    if kind == "shop":
        k = int(rng.integers(len(SHOPS)))
        return [SHOPS[k], TAGLINES[k], f"OPEN {int(rng.integers(6, 10))}AM - {int(rng.integers(5, 11))}PM"]
    if kind == "parking":
        return ["NO PARKING", f"{int(rng.integers(7, 10))}AM - {int(rng.integers(4, 7))}PM", "MON - FRI",
                "TOW-AWAY ZONE"]
    prices = rng.integers(150, 650, 3) / 100
    return ["TODAY", f"ESPRESSO {prices[0]:.2f}", f"LATTE {prices[1]:.2f}", f"CHAI {prices[2]:.2f}"]


# sign kind -> (board colour, ink colour, font of the first line, font of the others)
SIGN_STYLES = {
    "street": ((22, 104, 62), (245, 245, 240), "DejaVuSans-Bold.ttf", "DejaVuSans.ttf"),
    "shop": ((150, 30, 35), (250, 236, 200), "DejaVuSerif-Bold.ttf", "DejaVuSans-Bold.ttf"),
    "parking": ((240, 240, 235), (190, 20, 25), "DejaVuSans-Bold.ttf", "default"),
    "menu": ((30, 34, 32), (235, 235, 225), "DejaVuSans-Bold.ttf", "DejaVuSansMono-Bold.ttf"),
}


def sign(texts: list[str], kind: str, width: int, height: int) -> Image.Image:
    """A board with a border and centred lines of text, as RGBA."""
    board, ink, first, rest = SIGN_STYLES[kind]
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    r = height // 14
    draw.rounded_rectangle((0, 0, width - 1, height - 1), radius=r, fill=board + (255,))
    draw.rounded_rectangle((r // 2, r // 2, width - 1 - r // 2, height - 1 - r // 2), radius=r // 2, outline=ink,
                           width=max(3, r // 4))
    weights = [1.6] + [1.0] * (len(texts) - 1)            # the first line is the headline
    line_h = (height - 3 * r) / sum(weights)
    y = 1.5 * r
    for text, weight in zip(texts, weights):
        face = first if weight > 1 else rest
        size = int(line_h * weight * 0.72)
        size = min(size, int(size * (width - 4 * r) / max(1, font(face, size).getlength(text))))
        draw.text((width / 2, y + line_h * weight / 2), text, font=font(face, size), fill=ink, anchor="mm")
        y += line_h * weight
    return layer


def perspective_coeffs(dst, src) -> list[float]:
    """PIL's PERSPECTIVE data: the map from output points `dst` to input points `src` (4 corners each)."""
    a, b = [], []
    for (x, y), (u, v) in zip(dst, src):
        a += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        b += [u, v]
    return np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64)).tolist()


def wall(kind: str, w: int, h: int, rng) -> Image.Image:
    if kind == "brick":
        image = Image.new("RGB", (w, h), (172, 168, 160))                     # mortar
        draw = ImageDraw.Draw(image)
        bw, bh, gap = 150, 56, 8
        for row in range(h // bh + 1):
            shift = (row % 2) * bw // 2
            for col in range(-1, w // bw + 1):
                c = rng.integers(-22, 22)
                x0, y0 = col * bw + shift, row * bh
                draw.rectangle((x0 + gap, y0 + gap, x0 + bw, y0 + bh), fill=(int(148 + c), int(64 + c // 2), 48))
        return tinted(image, field(rng, w, h, 5, 0.8, 1), field(rng, w, h, 200, 0.7, 1))
    if kind == "wood":
        image = tinted(Image.new("RGB", (w, h), (170, 118, 70)), field(rng, w, h, (180, 3), 0.65, 1))  # grain along x
        draw = ImageDraw.Draw(image)
        for x in range(0, w, 260):                                            # dark joints between planks
            draw.rectangle((x, 0, x + 5, h), fill=(60, 40, 25))
        return image
    stucco = Image.new("RGB", (w, h), (220, 206, 176))
    return tinted(stucco, field(rng, w, h, 4, 0.85, 1), field(rng, w, h, 90, 0.85, 1))


def scene(w: int, h: int, rng) -> tuple[Image.Image, str]:
    """Three signs in perspective on a wall, placed along the longer side (reading order = that order)."""
    image = wall(["brick", "stucco", "wood"][int(rng.integers(3))], w, h, rng).convert("RGBA")
    kinds = rng.choice(list(SIGN_STYLES), 3, replace=False).tolist()
    along_x = w > h
    slot = (w if along_x else h) // 3
    answer = []
    for i, kind in enumerate(kinds):
        texts = sign_texts(kind, rng)
        sw, sh = (int(slot * 0.8), int(h * 0.45)) if along_x else (int(w * 0.7), int(slot * 0.72))
        sw, sh = min(sw, int(sh * 2.2)), min(sh, int(sw * 0.8))                 # keep boards sign-shaped
        board = sign(texts, kind, sw, sh)
        cx = (i + 0.5) * slot if along_x else w / 2 + rng.uniform(-0.1, 0.1) * w
        cy = h / 2 + rng.uniform(-0.1, 0.1) * h if along_x else (i + 0.5) * slot
        # perspective: one vertical edge shorter than the other, corners jittered
        squeeze, jitter = rng.uniform(0.1, 0.25) * sh, lambda: rng.uniform(-0.03, 0.03) * sw
        left_far = rng.random() < 0.5
        dst = [(-sw / 2 + jitter(), -sh / 2 + (squeeze if left_far else 0)),
               (sw / 2 + jitter(), -sh / 2 + (0 if left_far else squeeze)),
               (sw / 2 + jitter(), sh / 2 - (0 if left_far else squeeze)),
               (-sw / 2 + jitter(), sh / 2 - (squeeze if left_far else 0))]
        x0, y0 = int(cx + min(p[0] for p in dst)), int(cy + min(p[1] for p in dst))
        x1, y1 = int(cx + max(p[0] for p in dst)) + 1, int(cy + max(p[1] for p in dst)) + 1
        local = [(cx + px - x0, cy + py - y0) for px, py in dst]
        warped = board.transform((x1 - x0, y1 - y0), Image.Transform.PERSPECTIVE,
                                 perspective_coeffs(local, [(0, 0), (sw, 0), (sw, sh), (0, sh)]),
                                 Image.Resampling.BILINEAR)
        image.alpha_composite(shadow_of(warped, 0.5, 14), (x0 + 16, y0 + 22))
        image.alpha_composite(warped, (x0, y0))
        answer += texts
    return image.convert("RGB"), "\n".join(answer)
