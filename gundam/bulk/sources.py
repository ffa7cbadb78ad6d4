"""Inputs of bulk encoding: image files, folders, globs, PDFs and JSONL manifests -> a flat list of `Item`s (one
per image or PDF page) in input order, and each item's pixels.

    items = expand_inputs(["scans/", "report.pdf", "extra/*.png", "records.jsonl"])
    image = load_item(items[0])        # a path (an image file) or a rendered PIL image (a PDF page)

Ids are deterministic: the path as given or found (folders: joined with the folder argument), a PDF page
`path#N` (N from 0), a manifest line its "id" when it has one. An input that cannot be listed (a missing file, a
PDF that does not open, a glob that matches nothing) is still an item, with its `error`, so a run records it.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from PIL import Image

from gundam.config import MAX_IMAGE_PIXELS, check_positive
from gundam.images import check_image_file
from gundam.inputs import jsonl_lines

PDF_DPI = 144  # the vendor's PDF script renders pages at 144 dpi
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass(frozen=True)
class Item:
    """One image or PDF page to encode."""
    id: str
    source: str                                # the file's absolute path (the same on every node of a cluster)
    page: int | None = None                    # PDF page index (from 0); None for an image
    size: tuple[int, int] | None = None        # (width, height) read without decoding: plans batches only
    error: str | None = None                   # why the input could not even be listed

    def to_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "page": self.page,
                "size": list(self.size) if self.size else None, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> "Item":
        return cls(d["id"], d["source"], d["page"], tuple(d["size"]) if d["size"] else None, d["error"])


def is_pdf(path: str) -> bool:
    return path.lower().endswith(".pdf")


def expand_inputs(inputs, dpi: float = PDF_DPI) -> list[Item]:
    """Inputs -> items in input order (folders and globs sorted), each id once (the first wins)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    dpi = check_positive(dpi, "dpi")
    items, seen = [], set()
    for arg in inputs:
        for item in _expand(os.fspath(arg), dpi):
            if item.id not in seen:
                seen.add(item.id)
                items.append(item)
    return items


def _expand(arg: str, dpi: float, item_id: str | None = None) -> list[Item]:
    if os.path.isdir(arg):
        return [it for path in _folder_files(arg) for it in _expand(path, dpi)]
    if not os.path.lexists(arg) and glob.has_magic(arg):
        matches = sorted(glob.glob(arg, recursive=True))
        if not matches:
            return [Item(arg, os.path.abspath(arg), error=f"{arg!r}: no file matches this pattern")]
        return [it for path in matches for it in _expand(path, dpi)]
    item_id, source = item_id or os.path.normpath(arg), os.path.abspath(arg)
    try:
        check_image_file(arg)
    except ValueError as e:
        return [Item(item_id, source, error=str(e))]
    if arg.lower().endswith(".jsonl"):
        return _manifest_items(arg, dpi)
    if is_pdf(arg):
        return _pdf_items(source, item_id, dpi)
    return [Item(item_id, source, size=_image_size(source))]


def _folder_files(folder: str) -> list[str]:
    """Image and PDF files under `folder` (recursively, hidden names skipped), sorted by name, a folder's files
    before its subfolders."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            ext = os.path.splitext(name)[1].lower()
            if not name.startswith(".") and (ext == ".pdf" or ext in IMAGE_EXTENSIONS):
                found.append(os.path.join(root, name))
    return found


def _manifest_items(path: str, dpi: float) -> list[Item]:
    """A JSONL manifest: one object per line with "image" (a path, relative to the manifest) and optionally "id"
    (training records of gundam.data qualify). A bad line is an item with its error."""
    folder, source, items = os.path.dirname(path), os.path.abspath(path), []
    for where, obj, error in jsonl_lines(path):
        if error:
            items.append(Item(where, source, error=error))
            continue
        image = obj.get("image") if isinstance(obj, dict) else None
        item_id = obj.get("id") if isinstance(obj, dict) else None
        if not isinstance(image, str) or not image or not isinstance(item_id, (str, type(None))):
            items.append(Item(where, source, error=f"{where}: expected an object with \"image\" (a path) and "
                                                 f"optionally \"id\" (a string)"))
            continue
        image = os.path.join(folder, image)
        if image.lower().endswith(".jsonl") or os.path.isdir(image):
            items.append(Item(where, source, error=f"{where}: image {image!r}: expected an image or PDF file"))
            continue
        items += _expand(image, dpi, item_id)
    return items


def _pdf_items(path: str, item_id: str, dpi: float) -> list[Item]:
    import pypdfium2 as pdfium
    try:
        pdf = pdfium.PdfDocument(path)
    except (pdfium.PdfiumError, OSError) as e:
        return [Item(item_id, path, error=f"pdf {path!r}: cannot open ({e})")]
    try:
        sizes = [pdf.get_page_size(i) for i in range(len(pdf))]
    finally:
        pdf.close()
    if not sizes:
        return [Item(item_id, path, error=f"pdf {path!r}: has no pages")]
    return [Item(f"{item_id}#{i}", path, i, _pixels(w, h, dpi)) for i, (w, h) in enumerate(sizes)]


def _pixels(width_pt: float, height_pt: float, dpi: float) -> tuple[int, int]:
    """A page's size in pixels at `dpi` (PDF units are 1/72 inch), at least 1x1."""
    return max(1, round(width_pt * dpi / 72)), max(1, round(height_pt * dpi / 72))


def _image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding; None when it cannot be read (the item then
    fails when it is loaded, with the reason)."""
    try:
        with Image.open(path) as f:
            return f.size
    except Exception:  # noqa: BLE001 - any unreadable file: load_item says why
        return None


def load_item(item: Item, dpi: float = PDF_DPI):
    """The item's image: its path (gundam.images.load_image opens it) or, for a PDF page, the page rendered at
    `dpi` on white, as a PIL RGB image. Errors are ValueErrors naming the file and page."""
    if item.error:
        raise ValueError(item.error)
    if item.page is None:
        return item.source
    import pypdfium2 as pdfium
    name = f"pdf {item.source!r} page {item.page}"
    try:
        pdf = pdfium.PdfDocument(item.source)
    except (pdfium.PdfiumError, OSError) as e:
        raise ValueError(f"{name}: cannot open ({e})") from None
    try:
        if not 0 <= item.page < len(pdf):
            raise ValueError(f"{name}: the document has {len(pdf)} pages")
        w, h = _pixels(*pdf.get_page_size(item.page), dpi)
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError(f"{name}: {w}x{h} = {w * h} pixels at {dpi:g} dpi: expected at most {MAX_IMAGE_PIXELS}")
        return pdf[item.page].render(scale=dpi / 72).to_pil().copy()   # copy: the bitmap's buffer is pdfium's
    except pdfium.PdfiumError as e:
        raise ValueError(f"{name}: cannot render ({e})") from None
    finally:
        pdf.close()
