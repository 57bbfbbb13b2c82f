"""Two captioned sets of drawings that Debian ships: Tux Paint's stamps and the Open Clip Art Library.

These are drawings and clip art (flat colours, outlines, on a white background), not photos: a model
trained on them meets a domain far from CLIP's pre-training photos. Both keep their images in sorted
relative-path order, so a contiguous slice of images follows the category folders (animals, then
buildings, ...): consecutive slices are a domain shift. Their train/test split is fixed per image and
does not depend on the run seed: an image is in ``test`` when the blake2b digest of its relative path
(without suffix) is 0 modulo 5 (about 20%).

Every image is fitted into a white ``image_size`` square (aspect kept) and returned as RGB. SVG files
are rendered with ``resvg_py`` (cairosvg as a per-file fallback when importable) and the renders kept
in a disk cache (see :class:`SvgRenderCache`).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from clipcl.data.base import DataError, files_fingerprint, files_stamp
from clipcl.data.captions import SPLITS, CaptionPairs, text_digest

DEBIAN_ROOTS = {"tuxpaint": Path("/usr/share/tuxpaint/stamps"), "openclipart": Path("/usr/share/openclipart/svg")}
DEBIAN_PACKAGES = {"tuxpaint": "tuxpaint-stamps-default", "openclipart": "openclipart-svg"}
TEST_MODULUS = 5
RENDER_VERSION = "resvg-dpi96-white-v1"
"""Part of every render-cache key: change it when the rendering changes, so old renders are not reused."""


def debian_drawings_root(name: str, root: str | Path | None = None) -> Path:
    """Where set ``name`` (``tuxpaint`` or ``openclipart``) lives: ``<root>/<name>`` when given and present
    (for openclipart its ``svg/`` or ``png/`` folder when it has one), else the Debian location."""
    candidates = []
    if root is not None:
        local = Path(root) / name
        candidates += [local / "svg", local / "png", local] if name == "openclipart" else [local]
    candidates.append(DEBIAN_ROOTS[name])
    if name == "openclipart":
        candidates.append(DEBIAN_ROOTS[name].parent / "png")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(f"{name}: no drawings at {DEBIAN_ROOTS[name]}"
                    + (f" or {Path(root) / name}" if root is not None else "")
                    + f"; install them with: sudo apt-get install {DEBIAN_PACKAGES[name]}")


def in_test_split(relative_stem: str) -> bool:
    """The fixed split rule: test when blake2b(relative path without suffix) % 5 == 0."""
    digest = hashlib.blake2b(relative_stem.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % TEST_MODULUS == 0


def keep_split(relative_stem: str, split: str) -> bool:
    """Whether an image of that relative path belongs to ``split`` (``train``, ``test`` or ``all``)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split == "all" or in_test_split(relative_stem) == (split == "test")


def fit_on_white(image: Image.Image, size: int) -> Image.Image:
    """The image scaled to fit a ``size`` square (aspect kept), centred on white, as RGB; transparent
    pixels become white (converting RGBA straight to RGB would show whatever colour they hold)."""
    image = image.convert("RGBA")
    scale = size / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    image = image.resize((width, height), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(image, ((size - width) // 2, (size - height) // 2))
    return canvas.convert("RGB")


def render_svg(path: Path, size: int) -> Image.Image:
    """Render an SVG file to fit a ``size`` square: resvg_py, else cairosvg when importable, else one
    DataError line naming the file."""
    try:
        import resvg_py

        # dpi 96 (the CSS one): with resvg_py's default of 0, sizes in mm or pt become 0 and fail.
        data = resvg_py.svg_to_bytes(svg_path=str(path), background="#ffffff", width=size, height=size,
                                     dpi=96.0)
        return fit_on_white(Image.open(io.BytesIO(bytes(data))), size)
    except (ValueError, OSError, ImportError) as error:
        first_error = str(error).splitlines()[0] if str(error) else type(error).__name__
    try:
        import cairosvg

        data = cairosvg.svg2png(url=str(path), output_width=size)
        return fit_on_white(Image.open(io.BytesIO(data)), size)
    except ImportError:
        pass  # no cairosvg, or no libcairo for it: report resvg's reason
    except Exception as error:  # noqa: BLE001 - cairosvg raises many kinds; each means "cannot render"
        first_error += f"; cairosvg: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    raise DataError(f"cannot render drawing {path}: {first_error}")


def default_cache_dir(name: str, size: int) -> Path:
    """``$CLIPCL_DATA/cache/<name>-<size>``, else ``~/.cache/clipcl/cache/<name>-<size>``."""
    top = Path(os.environ["CLIPCL_DATA"]) if os.environ.get("CLIPCL_DATA") else Path.home() / ".cache" / "clipcl"
    return top / "cache" / f"{name}-{size}"


class SvgRenderCache:
    """Renders kept on disk as PNG, keyed by the SVG's content digest, the size and :data:`RENDER_VERSION`.

    A render is written to a temporary file in the cache folder and moved into place with
    ``os.replace``, so a crash never leaves a half-written render under a real key. An unreadable
    cached file is rendered again; a cache folder that cannot be written only warns (renders then
    happen on every read).
    """

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size = Path(folder), size
        self._warned = False

    def key(self, path: Path) -> str:
        digest = hashlib.sha256(path.read_bytes())
        digest.update(f"|{self.size}|{RENDER_VERSION}".encode())
        return digest.hexdigest()[:32]

    def image(self, path: Path) -> Image.Image:
        cached = self.folder / f"{self.key(path)}.png"
        if cached.is_file():
            try:
                with Image.open(cached) as image:
                    return image.convert("RGB")
            except (UnidentifiedImageError, OSError):
                pass  # damaged (e.g. a full disk): render it again below
        image = render_svg(path, self.size)
        self._store(image, cached)
        return image

    def _store(self, image: Image.Image, cached: Path) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as file:
                    image.save(file, format="PNG")
                os.chmod(temporary, 0o644)  # mkstemp makes it owner-only; a render is no secret
                os.replace(temporary, cached)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as error:
            if not self._warned:
                warnings.warn(f"render cache {self.folder} not writable ({error}); rendering on every read",
                              stacklevel=3)
                self._warned = True


class _DrawingSet(CaptionPairs):
    """One row per drawing file: ``paths`` (one per image), loaded through the render cache."""

    paths: list[Path]
    root: Path
    image_size: int
    cache: SvgRenderCache

    def _set_up(self, name: str, what: str, split: str, image_size: int, cache_dir: str | Path | None) -> None:
        """Check the tree and the split name (before the tree is read), then name the set and its cache."""
        if not self.root.is_dir():
            raise DataError(f"{name}: no {what} at {self.root}; install them with: "
                            f"sudo apt-get install {DEBIAN_PACKAGES[name]}")
        keep_split("", split)
        self.name, self.split, self.image_size = name, split, image_size
        self.cache = SvgRenderCache(Path(cache_dir) if cache_dir else default_cache_dir(name, image_size), image_size)

    def load_image(self, image_id: int) -> Image.Image:
        path = self.paths[image_id]
        if path.suffix.lower() == ".svg":
            return self.cache.image(path)
        try:
            with Image.open(path) as image:
                return fit_on_white(image, self.image_size)
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise DataError(f"{self.name}: cannot read image {path}: "
                            f"{str(error).splitlines()[0] if str(error) else 'corrupt'}") from None

    def _content_fingerprint(self) -> str:
        files = files_fingerprint(self.paths, self.root)
        return (f"{self.name}/{self.split}/size={self.image_size}/n={len(self)}/files={files}/"
                f"captions={text_digest(self.captions)}")

    def local_stamp(self) -> str:
        if getattr(self, "_stamp", None) is None:
            self._stamp = files_stamp(self.paths)
        return self._stamp


class TuxPaintStamps(_DrawingSet):
    """Tux Paint's stamps (Debian ``tuxpaint-stamps-default``): one row per stamp, drawings not photos.

    A stamp is ``<category>/.../NAME.txt`` whose first line is its English description (the caption,
    stripped) and whose further lines are ``<language>.utf8=<translation>``; its image is ``NAME.png``,
    else ``NAME.svg`` (rendered). ``category`` per image is the first folder under ``root``;
    ``translations`` maps a language code to each row's translation (None where a stamp has none).
    Images without a description (e.g. ``*_mirror.png`` variants) are not stamps. Stamps whose
    description is empty or that have no image are skipped and counted in ``skipped`` (reason -> count).
    A corrupt image raises :class:`DataError` naming it when its row is read.
    """

    def __init__(self, root: str | Path = DEBIAN_ROOTS["tuxpaint"], split: str = "all", image_size: int = 224,
                 cache_dir: str | Path | None = None) -> None:
        from clipcl.data.captions import read_caption_text

        self.root = Path(root)
        self._set_up("tuxpaint", "stamps", split, image_size, cache_dir)
        self.skipped = {"empty description": 0, "no image": 0}
        self.paths, self.captions, self.image_keys, self.categories = [], [], [], []
        rows_translations: list[dict[str, str]] = []
        for description in sorted(self.root.rglob("*.txt")):
            stem = description.relative_to(self.root).with_suffix("").as_posix()
            if not keep_split(stem, split):
                continue
            lines = read_caption_text(description).splitlines()
            caption = lines[0].strip() if lines else ""
            image = next((candidate for candidate in (description.with_suffix(".png"), description.with_suffix(".svg"))
                          if candidate.is_file()), None)
            if not caption:
                self.skipped["empty description"] += 1
                continue
            if image is None:
                self.skipped["no image"] += 1
                continue
            self.paths.append(image)
            self.captions.append(caption)
            self.image_keys.append(image.relative_to(self.root).as_posix())
            self.categories.append(stem.split("/")[0])
            rows_translations.append(_translations(lines[1:]))
        if not self.paths:
            raise DataError(f"tuxpaint: no stamps with a description and an image under {self.root} ({split})")
        self.image_ids = list(range(len(self.paths)))
        languages = sorted({language for row in rows_translations for language in row})
        self.translations = {language: [row.get(language) for row in rows_translations] for language in languages}


def _translations(lines: list[str]) -> dict[str, str]:
    """``xx.utf8=text`` lines as ``{"xx": "text"}``; other lines (and empty texts) are ignored."""
    found = {}
    for line in lines:
        head, separator, text = line.partition("=")
        if separator and head.strip().endswith(".utf8") and text.strip():
            found[head.strip()[: -len(".utf8")]] = text.strip()
    return found


class OpenClipart(_DrawingSet):
    """The Open Clip Art Library (Debian ``openclipart-svg``; or ``openclipart-png``): clip art, not photos.

    One row per drawing; a drawing listed in two categories (a symlink) counts once, under its real
    file. The caption comes from the SVG's RDF metadata by :func:`clipcl.data.clipart_captions.caption`
    (title, up to 3 keywords, a short description); a drawing without a title gets its file name with
    ``_`` as spaces, counted in ``untitled`` (and one whose title names a collection, counted in
    ``collection_titled``; both over the whole tree, whatever the split). With the PNG layout (``.../openclipart/png``) the metadata
    is read from the matching file of the sibling ``svg/`` tree when present, else the file name is used.
    SVGs are rendered on first read and cached under ``cache_dir`` (default ``$CLIPCL_DATA/cache/
    openclipart-<size>``, else ``~/.cache/clipcl/cache/openclipart-<size>``).
    """

    def __init__(self, root: str | Path = DEBIAN_ROOTS["openclipart"], split: str = "all", image_size: int = 224,
                 cache_dir: str | Path | None = None) -> None:
        from clipcl.data.clipart_captions import read_metadata_captions

        self.root = Path(root).resolve()  # symlinks resolve to real files: relative paths need a real root
        self._set_up("openclipart", "drawings", split, image_size, cache_dir)
        svgs = sorted(self.root.rglob("*.svg"))
        files = svgs or sorted(self.root.rglob("*.png"))
        real: dict[Path, Path] = {}  # resolved file -> the listed path naming it (its real place if inside)
        for path in files:
            resolved = path.resolve()
            if not path.is_symlink() or resolved not in real:
                real[resolved] = resolved if resolved.is_relative_to(self.root) else path
        chosen = sorted((listed.relative_to(self.root).as_posix(), resolved) for resolved, listed in real.items())
        # Captions of the whole tree (a collection title is one many drawings share), then the split.
        metadata_files = [path for _, path in chosen] if svgs else [_sibling_svg(self.root, key) for key, _ in chosen]
        captions, self.untitled, self.collection_titled = read_metadata_captions(
            metadata_files, [relative for relative, _ in chosen])
        kept = [index for index, (relative, _) in enumerate(chosen) if keep_split(relative.rsplit(".", 1)[0], split)]
        if not kept:
            raise DataError(f"openclipart: no drawings under {self.root} ({split})")
        self.paths = [chosen[index][1] for index in kept]
        self.image_keys = [chosen[index][0] for index in kept]
        self.captions = [captions[index] for index in kept]
        self.categories = [relative.split("/")[0] for relative in self.image_keys]
        self.image_ids = list(range(len(self.paths)))
        self.translations = {}


def _sibling_svg(png_root: Path, relative: str) -> Path | None:
    candidate = png_root.parent / "svg" / Path(relative).with_suffix(".svg")
    return candidate if candidate.is_file() else None
