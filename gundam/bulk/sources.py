"""Inputs of bulk encoding: image files, folders, globs, PDFs and JSONL manifests -> a flat list of `Item`s (one
per image or PDF page) in input order, and each item's pixels.

    items = expand_inputs(["scans/", "report.pdf", "extra/*.png", "records.jsonl"])
    image = load_item(items[0])        # a path (an image file) or a rendered PIL image (a PDF page)

Ids are deterministic: the path as given or found (folders: joined with the folder argument), a PDF page
`path#N` (N from 0), a manifest line its "id" when it has one. An input that cannot be listed (a missing file, a
PDF that does not open, a glob that matches nothing, an unreadable folder or manifest, a bad manifest line) is
still an item, with its `error`, so a run records it and goes on.
"""
from __future__ import annotations

import glob
import math
import os
import warnings
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


def text(s: str) -> str:
    """`s` as text every writer takes: characters UTF-8 cannot encode (a file name's undecodable bytes, which
    Python keeps as lone surrogates; a lone surrogate from a JSON escape) become backslash escapes. Ids are made
    with it, so the id a run writes is the id a rerun skips."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(e: BaseException) -> str:
    """An exception's message as one line (its first), for an error that is one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_inputs(inputs) -> list[str]:
    """`inputs` (a path, or a list of paths) as a list of path strings, or a TypeError / ValueError naming it."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if isinstance(inputs, (bytes, bytearray)) or not hasattr(inputs, "__iter__"):
        raise TypeError(f"inputs of type {type(inputs).__name__}: expected a path (str or os.PathLike) or a list "
                        f"of paths")
    paths = []
    for i, arg in enumerate(inputs):
        if not isinstance(arg, (str, os.PathLike)):
            raise TypeError(f"inputs[{i}] of type {type(arg).__name__}: expected a path (str or os.PathLike)")
        path = os.fspath(arg)
        if not isinstance(path, str):
            raise TypeError(f"inputs[{i}] is a bytes path: expected a str or os.PathLike of str")
        if not path:
            raise ValueError(f"inputs[{i}] is an empty path: expected an image, PDF, folder, glob or .jsonl manifest")
        paths.append(path)
    if not paths:
        raise ValueError("inputs: got none, expected at least one image, PDF, folder, glob or .jsonl manifest")
    return paths


def expand_inputs(inputs, dpi: float = PDF_DPI) -> list[Item]:
    """Inputs -> items in input order (folders and globs sorted), each id once (the first wins)."""
    paths = check_inputs(inputs)
    dpi = check_positive(dpi, "dpi")
    items, seen = [], set()
    for arg in paths:
        for item in _expand(arg, dpi):
            if item.id not in seen:
                seen.add(item.id)
                items.append(item)
    return items


def _expand(arg: str, dpi: float, item_id: str | None = None) -> list[Item]:
    if os.path.isdir(arg):
        return [it for path, error in _folder_files(arg) for it in
                ([Item(text(path), os.path.abspath(path), error=error)] if error else _expand(path, dpi))]
    if not os.path.lexists(arg) and glob.has_magic(arg):
        matches = sorted(glob.glob(arg, recursive=True))
        if not matches:
            return [Item(text(arg), os.path.abspath(arg), error=f"{arg!r}: no file matches this pattern")]
        return [it for path in matches for it in _expand(path, dpi)]
    item_id, source = item_id or text(os.path.normpath(arg)), os.path.abspath(arg)
    try:
        check_image_file(arg)
    except ValueError as e:
        return [Item(item_id, source, error=str(e))]
    if arg.lower().endswith(".jsonl"):
        return _manifest_items(arg, dpi)
    if is_pdf(arg):
        return _pdf_items(source, item_id, dpi)
    return [Item(item_id, source, size=_image_size(source))]


def _folder_files(folder: str) -> list[tuple[str, str | None]]:
    """(path, None) for the image and PDF files under `folder` (recursively, hidden names skipped), sorted by
    name, a folder's files before its subfolders; (path, error) for a folder that cannot be listed."""
    found = []

    def unlisted(e: OSError):
        path = e.filename or folder
        found.append((path, f"folder {path!r}: cannot be listed ({e.strerror or e})"))

    for root, dirs, files in os.walk(folder, onerror=unlisted):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            ext = os.path.splitext(name)[1].lower()
            if not name.startswith(".") and (ext == ".pdf" or ext in IMAGE_EXTENSIONS):
                found.append((os.path.join(root, name), None))
    return found


def _manifest_items(path: str, dpi: float) -> list[Item]:
    """A JSONL manifest: one object per line with "image" (a path, relative to the manifest) and optionally "id"
    (training records of gundam.data qualify). A bad line, or a manifest that cannot be read, is an item with its
    error."""
    folder, source, items = os.path.dirname(path), os.path.abspath(path), []
    try:
        lines = jsonl_lines(path)
    except OSError as e:
        return [Item(text(os.path.normpath(path)), source, error=f"manifest {path!r}: cannot read ({e.strerror or e})")]
    for where, obj, error in lines:
        where = text(where)
        if error:
            items.append(Item(where, source, error=text(error)))
            continue
        image = obj.get("image") if isinstance(obj, dict) else None
        item_id = obj.get("id") if isinstance(obj, dict) else None
        if not isinstance(image, str) or not image or not (item_id is None or isinstance(item_id, str) and item_id):
            items.append(Item(where, source, error=f"{where}: expected an object with \"image\" (a path) and "
                                                 f"optionally \"id\" (a non-empty string)"))
            continue
        image = os.path.join(folder, image)
        if image.lower().endswith(".jsonl") or os.path.isdir(image):
            items.append(Item(where, source, error=f"{where}: image {image!r}: expected an image or PDF file"))
            continue
        items += _expand(image, dpi, None if item_id is None else text(item_id))
    return items


def open_pdf(path: str, name: str):
    """pdfium.PdfDocument(path), or a ValueError "{name}: cannot open (why)".

    PDFium sets its last error code on some failures only (not for a document without pages, say) and never
    clears it, so the code after a failure may be an earlier file's ("Incorrect password" after an encrypted
    PDF). A failed load is therefore tried twice more, after two loads that fail with known, different codes:
    the code is this file's only if both tries end with the same one."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c
    try:
        return pdfium.PdfDocument(path)
    except OSError as e:
        raise ValueError(f"{name}: cannot open ({e.strerror or e})") from None
    except pdfium.PdfiumError:
        pass
    codes = []
    for prime in (lambda: pdfium_c.FPDF_LoadDocument(b"\0", None),                # no path: "File access error"
                  lambda: pdfium_c.FPDF_LoadMemDocument64(b"no pdf", 6, None)):   # "Data format error"
        prime()   # both fail (no document is returned, so there is nothing to close)
        try:
            return pdfium.PdfDocument(path)   # (it opens after all: a file that changed meanwhile)
        except pdfium.PdfiumError as e:
            codes.append(e.err_code)
    from pypdfium2.internal import ErrorToStr
    why = f"PDFium: {ErrorToStr.get(codes[0], codes[0])}" if codes[0] == codes[1] else \
        "PDFium gives no reason; a document without pages is one"
    raise ValueError(f"{name}: cannot open ({why})")


def _pdf_items(path: str, item_id: str, dpi: float) -> list[Item]:
    try:
        pdf = open_pdf(path, f"pdf {path!r}")
    except ValueError as e:
        return [Item(item_id, path, error=text(str(e)))]
    try:
        sizes = [pdf.get_page_size(i) for i in range(len(pdf))]
    finally:
        pdf.close()
    if not sizes:
        return [Item(item_id, path, error=f"pdf {path!r}: has no pages")]
    items = []
    for i, (w, h) in enumerate(sizes):
        pixels = _pixels(w, h, dpi)
        error = None if pixels else _too_large(f"pdf {path!r} page {i}", w, h, dpi)
        items.append(Item(f"{item_id}#{i}", path, i, pixels, error))
    return items


def _pixels(width_pt: float, height_pt: float, dpi: float) -> tuple[int, int] | None:
    """A page's size in pixels at `dpi` (PDF units are 1/72 inch), at least 1x1; None when that is more than
    MAX_IMAGE_PIXELS (or more than a float holds: a huge dpi)."""
    w, h = width_pt * dpi / 72, height_pt * dpi / 72
    if not (math.isfinite(w) and math.isfinite(h)) or max(1, round(w)) * max(1, round(h)) > MAX_IMAGE_PIXELS:
        return None
    return max(1, round(w)), max(1, round(h))


def _too_large(name: str, width_pt: float, height_pt: float, dpi: float) -> str:
    return (f"{name}: {width_pt:g}x{height_pt:g} pt at {dpi:g} dpi is more than {MAX_IMAGE_PIXELS} pixels: "
            f"expected a lower --dpi")


def _image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding; None when it cannot be read (the item then
    fails when it is loaded, with the reason)."""
    try:
        with warnings.catch_warnings():   # a large image warns here; it is refused with the reason when loaded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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
    pdf = open_pdf(item.source, name)
    try:
        if not 0 <= item.page < len(pdf):
            raise ValueError(f"{name}: the document has {len(pdf)} pages")
        size = pdf.get_page_size(item.page)
        if _pixels(*size, dpi) is None:
            raise ValueError(_too_large(name, *size, dpi))
        return pdf[item.page].render(scale=dpi / 72).to_pil().copy()   # copy: the bitmap's buffer is pdfium's
    except pdfium.PdfiumError as e:
        raise ValueError(f"{name}: cannot render ({e})") from None
    finally:
        pdf.close()
