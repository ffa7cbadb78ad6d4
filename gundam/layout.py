"""The output layout of an image: its crop grid, its views and where each output token goes. One home for it:
preprocessing, both encoder paths, the layout kernel's row map and the cost model all call this module.

Output rows of one image, in the vendor's order, by the mode's family:
- DeepSeek-OCR: the local grid when there are crops (`h*qi` rows of `w*qi` tokens, crops placed by tile, each
  row followed by `image_newline`), then `qb` global rows of `qb` tokens each followed by `image_newline`,
  then `view_seperator`.
- DeepSeek-OCR 2: each crop's `qi*qi` tokens, crop by crop in row-major tile order (no 2-D stitching), then the
  global view's `qb*qb`, then `view_seperator`; no newlines.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from gundam.config import Mode, check_int, resolve_mode


def candidate_grids(min_crops: int, max_crops: int) -> list[tuple[int, int]]:
    # The vendor builds a set and sorts it by tile count; among equal counts the set's iteration order
    # decides, and that order decides exact ties. Built by the same expression, the order is the same.
    grids = set((i, j) for n in range(min_crops, max_crops + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                if min_crops <= i * j <= max_crops)
    return sorted(grids, key=lambda g: g[0] * g[1])


def _closest_grid(width: int, height: int, mode: Mode) -> tuple[int, int]:
    """The vendor's rule: the candidate whose w/h is closest to width/height; on a tie, the later candidate if
    width*height > 0.5 * image_size^2 * w*h.

    Distances are compared exactly, as fractions: floats lose them at large sizes (10^20 x 1 came out 3x2) and
    cannot divide a 400-digit width at all. Where two candidates are exactly equally close, the vendor's floats
    still decide first: `abs(width / height - w / h)` rounds differently on the two sides of a midpoint
    (1500x1800 lies exactly between 2/3 and 1, and the vendor's floats put it nearer 1), and the model was
    trained on those choices. At a tie the floats depend only on the small exact ratio, so they are defined at
    any size; for every size with sides below ~10^12 the result is the vendor's.
    """
    aspect = Fraction(width, height)
    best, best_diff = None, None
    for w, h in candidate_grids(mode.min_crops, mode.max_crops):
        diff = abs(aspect - Fraction(w, h))
        if best is None or diff < best_diff:
            best, best_diff = (w, h), diff
        elif diff == best_diff:
            # equal ratios (2/1, 4/2) give equal floats; two ratios either side of the image's are a midpoint
            # (at most 9), so width / height is a small float here
            v_new = v_best = 0.0
            if w * best[1] != h * best[0]:
                v_new, v_best = abs(width / height - w / h), abs(width / height - best[0] / best[1])
            if v_new < v_best or (v_new == v_best and 2 * width * height > mode.image_size ** 2 * w * h):
                best = (w, h)
    return best


def crop_grid(width: int, height: int, mode: str | Mode = "gundam", max_crops: int | None = None) -> tuple[int, int]:
    """(w_tiles, h_tiles) of the crop grid; (1, 1) means no crops."""
    width, height = check_int(width, "image width"), check_int(height, "image height")
    mode = resolve_mode(mode, max_crops)
    if not mode.crop_mode or (width <= mode.small_image and height <= mode.small_image):
        return (1, 1)
    return _closest_grid(width, height, mode)


@dataclass(frozen=True)
class ImageLayout:
    """Views and output tokens of one image. Tokens: DeepSeek-OCR `qb*(qb+1)` global + `(h*qi)*(w*qi+1)` local
    + 1 separator; DeepSeek-OCR 2 `qb*qb` global + `n_crops*qi*qi` local + 1."""
    width: int
    height: int
    mode: Mode
    grid: tuple[int, int]       # (w_tiles, h_tiles); (1, 1) = no crops
    n_crops: int                # 0 when the grid is 1x1
    qb: int                     # tokens per side of the global view
    qi: int                     # tokens per side of a crop
    global_tokens: int
    local_tokens: int
    tokens: int


def grid_layout(mode: Mode, grid: tuple[int, int], width: int = 0, height: int = 0) -> ImageLayout:
    """The layout of an image whose crop grid is already known (width, height 0: unknown)."""
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2):
        raise ValueError(f"grid={grid!r}: expected (w_tiles, h_tiles)")
    w, h = check_int(grid[0], "grid w_tiles"), check_int(grid[1], "grid h_tiles")
    width, height = check_int(width, "image width", 0), check_int(height, "image height", 0)
    qb, qi = mode.qb, mode.qi
    n_crops = 0 if (w, h) == (1, 1) else w * h
    if has_newlines(mode):
        global_tokens, local_tokens = qb * (qb + 1), (h * qi) * (w * qi + 1) if n_crops else 0
    else:
        global_tokens, local_tokens = qb * qb, n_crops * qi * qi
    return ImageLayout(width, height, mode, (w, h), n_crops, qb, qi, global_tokens, local_tokens,
                       global_tokens + local_tokens + 1)


def has_newlines(mode: Mode) -> bool:
    """DeepSeek-OCR ends every row of tokens with `image_newline`; DeepSeek-OCR 2 has none."""
    return mode.family == "deepseek-ocr"


def image_layout(width: int, height: int, mode: str | Mode = "gundam", max_crops: int | None = None) -> ImageLayout:
    mode = resolve_mode(mode, max_crops)
    return grid_layout(mode, crop_grid(width, height, mode), width, height)


def count_image_tokens(width: int, height: int, mode: str | Mode = "gundam", max_crops: int | None = None) -> int:
    """Number of vision tokens the language model sees for one image (newlines and separator included)."""
    return image_layout(width, height, mode, max_crops).tokens


def layout_tokens(layout: ImageLayout, global_tokens: torch.Tensor, local_tokens: torch.Tensor | None,
                  newline: torch.Tensor, separator: torch.Tensor) -> torch.Tensor:
    """One image's output rows [layout.tokens, D] in the vendor's order.

    global_tokens [qb*qb, D] row-major; local_tokens [n_crops, qi*qi, D] in row-major tile order (None without
    crops); newline [D] (None for a family without newlines), separator [D]. Any dtype: the Triton path runs it
    on index rows to build its row map.
    """
    D = global_tokens.shape[-1]
    (w, h), qb, qi = layout.grid, layout.qb, layout.qi
    if not has_newlines(layout.mode):
        rows = [local_tokens.reshape(-1, D)] if layout.n_crops else []
        return torch.cat(rows + [global_tokens.reshape(-1, D), separator.view(1, D)])

    def with_newlines(grid):  # [R, C, D] -> [R * (C + 1), D]
        R = grid.shape[0]
        return torch.cat([grid, newline.view(1, 1, D).expand(R, 1, D)], dim=1).reshape(-1, D)

    rows = []
    if layout.n_crops:
        tiles = local_tokens.reshape(h, w, qi, qi, D)                          # [tile row, tile col, y, x, D]
        rows.append(with_newlines(tiles.permute(0, 2, 1, 3, 4).reshape(h * qi, w * qi, D)))
    rows.append(with_newlines(global_tokens.reshape(qb, qb, D)))
    rows.append(separator.view(1, D))
    return torch.cat(rows)


def layout_batch(layouts, global_tokens: torch.Tensor, local_tokens: torch.Tensor | None,
                 newline: torch.Tensor, separator: torch.Tensor) -> torch.Tensor:
    """Every image's output rows, packed in image order [sum of tokens, D]: global_tokens [n_images, qb*qb, D],
    local_tokens [all crops, qi*qi, D] (images' crops in order; None without any). Both encoder paths lay out
    through here: the torch path on embeddings, the Triton path on index rows to build its row map."""
    out, start = [], 0
    for i, lay in enumerate(layouts):
        crops = local_tokens[start:start + lay.n_crops] if lay.n_crops else None   # [n_crops, qi*qi, D]
        start += lay.n_crops
        out.append(layout_tokens(lay, global_tokens[i], crops, newline, separator))
    return torch.cat(out)
