"""Assemble the built-in prior's training photographs: scikit-image's plus Debian wallpaper photos.

    python bench/prior_data.py -o /tmp/prior-data --curation bench/prior_data_curation.json

For each Debian package (``apt-get download``, the ordinary client; ``dpkg-deb -x`` unpacks it
into a scratch folder, nothing is installed) every JPEG / PNG under ``usr/share/{wallpapers,
backgrounds}`` is a candidate. Its licence comes from the package's machine-readable copyright
file (``usr/share/doc/<pkg>/copyright``, DEP-5): the ``Files:`` stanza whose pattern matches the
file (by path tail or name), else the ``Files: *`` stanza. A file is kept only when that licence
is on :data:`ALLOWED` (free licences that allow redistribution and derivative works; anything
NC / ND / unknown is skipped and listed as such). Photographs are downscaled (Pillow, bicubic,
antialiased) to a short side of at most ``--short`` px and written as PNG.

Photographs are held out by name (never trained on): scikit-image's ``chelsea`` and ``coffee``
(the shipped prior's held-out pair) and every wallpaper whose name hashes to 0 mod
``--holdout-every``, or, with ``--curation FILE``, the wallpapers that file names (its
``not_photographs`` are dropped: renders and illustrations are not what the prior should learn). The manifest (``manifest.json``) records, per file: name, split, source
(package, version, path inside it, or scikit-image), licence, the copyright file's sha256,
original and stored size, sha256 of the stored PNG. The model card cites it.

Which packages hold photographs (``apt-cache search wallpaper`` / ``backgrounds``, Debian 12):
plasma-workspace-wallpapers (94 MB), gnome-backgrounds (33 MB), mate-backgrounds (47 MB),
ukui-wallpapers (21 MB), lomiri-wallpapers (2.7 MB); desktop-base is Debian artwork, mostly
not photographs. Many of these are renders or illustrations, not photos: the manifest keeps
them all with their licence, and ``--exclude`` drops names by substring.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from deqir_dist.data.photos import HELDOUT_IMAGES, TRAIN_IMAGES, load_skimage_photo

ALLOWED = ("cc0", "cc-by-3", "cc-by-4", "cc-by-sa", "cc-by-2", "public-domain", "public domain", "gpl", "lgpl",
           "bsd", "mit", "expat", "apache", "artistic", "free-art", "ofl")
REFUSED = ("nc", "nd", "noncommercial", "no-deriv", "proprietary", "non-free")
PHOTO_DIRS = ("usr/share/wallpapers", "usr/share/backgrounds")
SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_copyright(text: str) -> list[tuple[list[str], str]]:
    """DEP-5 stanzas as (file patterns, licence short name), in file order."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:\s*(.+(?:\n[ \t].+)*)", para, re.MULTILINE)
        lic = re.search(r"^License:\s*(\S.*)$", para, re.MULTILINE)
        if files and lic:
            out.append((files.group(1).split(), lic.group(1).strip()))
    return out


def licence_of(path: str, stanzas) -> str | None:
    """The licence of the last stanza whose pattern matches ``path`` (DEP-5: later wins)."""
    found = None
    for patterns, lic in stanzas:
        for pat in patterns:
            # a pattern names the file by its path in the upstream tree ("16.04/x.jpg"), which need not be
            # where the package installs it: the whole path, its tail, or the file name may match
            if pat == "*" or fnmatch.fnmatch(path, "*" + pat.lstrip("*")) or fnmatch.fnmatch(Path(path).name, pat) \
                    or ("/" in pat and not any(c in pat for c in "*?[") and Path(path).name == Path(pat).name):
                found = lic
    return found


def licence_ok(lic: str | None) -> bool:
    if not lic:
        return False
    low = lic.lower()
    if any(re.search(rf"(^|[-_ ]){r}($|[-_ ])", low) for r in REFUSED):
        return False
    return any(a in low for a in ALLOWED)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def store(img: np.ndarray, short: int, dest: Path) -> dict:
    im = Image.fromarray(img).convert("RGB")
    w, h = im.size
    if min(w, h) > short:
        s = short / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    im.save(dest)
    return {"original_size": [h, w], "stored_size": [im.size[1], im.size[0]], "sha256_png": _sha(dest.read_bytes())}


def held_out(name: str, every: int) -> bool:
    return every > 0 and int(_sha(name.encode())[:8], 16) % every == 0


def _thumb(arr: np.ndarray) -> np.ndarray:
    """A 16 x 16 grey thumbnail, zero mean and unit norm: the same picture at two resolutions (or a
    wallpaper's preview screenshot) correlates above 0.97 with it."""
    t = np.asarray(Image.fromarray(arr).convert("L").resize((16, 16), Image.BILINEAR), np.float64).ravel()
    t = t - t.mean()
    return t / (np.linalg.norm(t) + 1e-9)


def _photo_name(pkg: str, rel_under_photo_dir: str) -> str:
    """pkg + the path under usr/share/{wallpapers,backgrounds} without Plasma's contents/images and
    the resolution-only file names (``Altai/contents/images/5120x2880.png`` -> ``..._altai``)."""
    parts = [q for q in Path(rel_under_photo_dir).with_suffix("").parts if q not in ("contents", "images")]
    if len(parts) > 1 and re.fullmatch(r"(dark_?)?\d+x\d+", parts[-1].lower()):
        parts = parts[:-1] + (["dark"] if parts[-1].lower().startswith("dark") else [])
    return re.sub(r"[^A-Za-z0-9]+", "_", "_".join([pkg, *parts])).strip("_").lower()


def debian_photos(pkg: str, scratch: Path, out: Path, short: int, every: int, exclude, curation=None) -> list[dict]:
    work = scratch / pkg
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", pkg], cwd=work, check=True, capture_output=True)
    deb = next(work.glob("*.deb"))
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                             text=True).stdout.strip()
    root = work / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    cfile = root / "usr/share/doc" / pkg / "copyright"
    ctext = cfile.read_text(errors="replace") if cfile.is_file() else ""
    stanzas = parse_copyright(ctext)
    rows = []
    seen = set()
    thumbs: list[np.ndarray] = []
    files = []
    for d in PHOTO_DIRS:
        for f in sorted((root / d).rglob("*")) if (root / d).is_dir() else []:
            if f.suffix.lower() in SUFFIXES and not f.is_symlink() and f.is_file():
                try:
                    with Image.open(f) as im:
                        area = im.size[0] * im.size[1]
                except Exception:  # noqa: BLE001 - listed as unreadable below
                    area = 0
                files.append((-area, str(f), f, d))
    for _, _, f, d in sorted(files):        # largest first: a smaller copy of a picture is the duplicate
        rel = str(f.relative_to(root))
        lic = licence_of(rel, stanzas)
        name = _photo_name(pkg, str(f.relative_to(root / d)))
        row = {"name": name, "source": {"debian_package": pkg, "version": version, "path": rel,
                                        "copyright_sha256": _sha(ctext.encode())}, "licence": lic}
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - a broken file is listed, not fatal
            rows.append({**row, "split": "skipped", "why": f"unreadable: {type(e).__name__}"})
            continue
        digest = _sha(arr.tobytes())
        th = _thumb(arr)
        if digest in seen or name in seen or any(float(th @ o) > 0.97 for o in thumbs):
            # the same picture at several resolutions, or its preview: keep the largest
            rows.append({**row, "split": "skipped", "why": "duplicate of a larger file"})
            continue
        seen.update((digest, name))
        thumbs.append(th)
        if not licence_ok(lic):
            rows.append({**row, "split": "skipped", "why": f"licence not on the allowed list: {lic!r}"})
        elif min(arr.shape[:2]) < 128 or any(x in name for x in exclude):
            rows.append({**row, "split": "skipped", "why": "smaller than 128 px or excluded by name"})
        elif curation and name in curation["not_photographs"]:
            rows.append({**row, "split": "skipped", "why": "not a photograph (render, illustration, gradient or "
                                                           "logo; --curation)"})
        else:
            if curation:
                split = "heldout" if name in curation["heldout"] else "train"
            else:
                split = "heldout" if held_out(name, every) else "train"
            rows.append({**row, "split": split, **store(arr, short, out / split / f"{name}.png")})
    return rows


def skimage_photos(out: Path, short: int, curation=None) -> list[dict]:
    import skimage
    rows = []
    for names, listed in ((TRAIN_IMAGES, "train"), (HELDOUT_IMAGES, "heldout")):
        for n in names:
            split = "heldout" if curation and n in curation["heldout"] else listed
            img = load_skimage_photo(n)
            rows.append({"name": n, "split": split, "source": {"scikit-image": skimage.__version__, "function":
                                                               f"skimage.data.{n}"},
                         "licence": "see skimage/data/README.txt (CC0 / public domain / CC-BY per image)",
                         **store(img, short, out / split / f"{n}.png")})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-o", "--out", required=True, help="folder: train/, heldout/, manifest.json")
    p.add_argument("--packages", default="lomiri-wallpapers,lomiri-wallpapers-16.04,mate-backgrounds,ukui-wallpapers,"
                                         "plasma-workspace-wallpapers,sway-backgrounds")
    p.add_argument("--short", type=int, default=512, help="largest stored short side (default 512)")
    p.add_argument("--holdout-every", type=int, default=5, help="hold out wallpapers whose name hash is 0 mod this")
    p.add_argument("--exclude", default="", help="comma list of name substrings to drop (renders, logos)")
    p.add_argument("--curation", help="JSON with 'not_photographs' (names dropped) and 'heldout' (names held out, "
                                      "instead of the hash rule), e.g. bench/prior_data_curation.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    exclude = [e for e in args.exclude.split(",") if e]
    curation = json.loads(Path(args.curation).read_text()) if args.curation else None
    rows = skimage_photos(out, args.short, curation)
    with tempfile.TemporaryDirectory() as scratch:
        for pkg in [q for q in args.packages.split(",") if q]:
            try:
                rows += debian_photos(pkg, Path(scratch), out, args.short, args.holdout_every, exclude, curation)
            except (subprocess.CalledProcessError, StopIteration) as e:
                rows.append({"name": pkg, "split": "skipped", "why": f"package not available: {e}"})
    manifest = {"format": "deqir-prior-data/1", "curation": curation, "command": "python bench/prior_data.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "allowed_licences": list(ALLOWED), "refused": list(REFUSED),
        "counts": {s: sum(r["split"] == s for r in rows) for s in ("train", "heldout", "skipped")}, "files": rows}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
