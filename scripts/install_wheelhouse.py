"""Chunked wheelhouse format, and its installer for an offline host.

The build side (``scripts/wheelhouse.py``) calls :func:`split_into_chunks` to cut a set of wheels into
folders of at most N bytes each, so that they fit a size-limited transfer. On the offline host this
file, run with the host's own Python (standard library only), puts the wheels back together, checks
every piece and every whole file against the manifest's sha256, and installs them with
``pip --no-index --no-deps``: the build side already resolved the dependencies explicitly.

Usage on the host::

    python3 scripts/install_wheelhouse.py install --chunks /root/wh [--target DIR] [--editable .]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
_BUF = 1 << 20


class WheelhouseError(RuntimeError):
    """A chunk set that is incomplete, corrupt or inconsistent."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BUF):
            h.update(block)
    return h.hexdigest()


def _copy_range(src: Path, offset: int, size: int, dst: Path) -> str:
    """Copy ``size`` bytes of ``src`` from ``offset`` into ``dst``; return their sha256."""
    h = hashlib.sha256()
    with src.open("rb") as fin, dst.open("wb") as fout:
        fin.seek(offset)
        left = size
        while left:
            block = fin.read(min(_BUF, left))
            if not block:
                raise WheelhouseError(f"{src} ended early while cutting a piece")
            h.update(block)
            fout.write(block)
            left -= len(block)
    return h.hexdigest()


def split_into_chunks(files: list[Path], out_dir: Path, chunk_bytes: int, meta: dict | None = None) -> dict:
    """Cut ``files`` into pieces and pack them into chunk folders of at most ``chunk_bytes`` each.

    A file larger than a chunk is cut into consecutive pieces; pieces are packed first-fit
    decreasing, so small wheels fill the gaps that big ones leave. Every chunk folder gets a copy of
    the manifest, so any one of them tells the installer what the whole set must be.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_bytes}")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError("two files share a name; a wheelhouse holds one file per name")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise WheelhouseError(f"{out_dir} is not empty; chunks are written into a fresh folder")

    pieces = []  # (size, file index, piece index, offset)
    for i, f in enumerate(files):
        size = f.stat().st_size
        n = max(1, -(-size // chunk_bytes))
        for k in range(n):
            off = k * chunk_bytes
            pieces.append((min(chunk_bytes, size - off), i, k, off))
    pieces.sort(key=lambda p: (-p[0], names[p[1]], p[2]))

    bins: list[list[tuple[int, int, int, int]]] = []
    free: list[int] = []
    for p in pieces:
        for b, room in enumerate(free):
            if p[0] <= room:
                bins[b].append(p)
                free[b] -= p[0]
                break
        else:
            bins.append([p])
            free.append(chunk_bytes - p[0])

    width = max(3, len(str(len(bins))))
    entries = [
        {"name": f.name, "size": f.stat().st_size, "sha256": _sha256_file(f), "pieces": []} for f in files
    ]
    for b, content in enumerate(bins):
        chunk = f"c{b + 1:0{width}d}"
        (out_dir / chunk).mkdir(parents=True)
        for size, i, k, off in content:
            piece = f"{names[i]}.{k:03d}"
            digest = _copy_range(files[i], off, size, out_dir / chunk / piece)
            entries[i]["pieces"].append(
                {"index": k, "chunk": chunk, "path": piece, "offset": off, "size": size, "sha256": digest}
            )
    for e in entries:
        e["pieces"].sort(key=lambda p: p["index"])

    manifest = {
        "format": FORMAT,
        "chunk_bytes": chunk_bytes,
        "chunks": [f"c{b + 1:0{width}d}" for b in range(len(bins))],
        "total_bytes": sum(e["size"] for e in entries),
        "meta": meta or {},
        "files": entries,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True)
    for chunk in manifest["chunks"]:
        (out_dir / chunk / MANIFEST).write_text(text)
    (out_dir / MANIFEST).write_text(text)
    return manifest


def load_manifest(root: Path) -> dict:
    """Read the manifest that the chunk folders under ``root`` carry, and check they all agree."""
    copies = sorted(root.glob(f"*/{MANIFEST}")) + sorted(root.glob(MANIFEST))
    if not copies:
        raise WheelhouseError(f"no {MANIFEST} under {root}: is this a chunk folder?")
    texts = {p.read_text() for p in copies}
    if len(texts) != 1:
        raise WheelhouseError(f"chunk folders under {root} carry different manifests: mixed builds")
    manifest = json.loads(texts.pop())
    if manifest.get("format") != FORMAT:
        raise WheelhouseError(f"manifest format {manifest.get('format')!r}, this installer reads {FORMAT}")
    return manifest


def reassemble(root: Path, dest: Path) -> list[Path]:
    """Join the pieces under ``root`` into whole files in ``dest``, checking every sha256.

    Raises :class:`WheelhouseError` naming the missing chunks, or the piece or file that differs.
    """
    manifest = load_manifest(root)
    missing = [c for c in manifest["chunks"] if not (root / c).is_dir()]
    if missing:
        raise WheelhouseError(f"missing chunk folders under {root}: {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for entry in manifest["files"]:
        target = dest / entry["name"]
        tmp = target.with_name(target.name + ".part")
        whole = hashlib.sha256()
        with tmp.open("wb") as fout:
            for p in entry["pieces"]:
                src = root / p["chunk"] / p["path"]
                if not src.is_file():
                    raise WheelhouseError(f"piece {p['path']} is missing from chunk {p['chunk']}")
                h = hashlib.sha256()
                n = 0
                with src.open("rb") as fin:
                    while block := fin.read(_BUF):
                        h.update(block)
                        whole.update(block)
                        fout.write(block)
                        n += len(block)
                if n != p["size"] or h.hexdigest() != p["sha256"]:
                    raise WheelhouseError(f"piece {p['path']} in chunk {p['chunk']} is corrupt (size/sha256)")
        if whole.hexdigest() != entry["sha256"] or tmp.stat().st_size != entry["size"]:
            tmp.unlink()
            raise WheelhouseError(f"{entry['name']} does not match its sha256 after reassembly")
        tmp.replace(target)
        out.append(target)
    return out


def pip_install(wheels: list[Path], target: Path | None, editable: Path | None) -> None:
    """Install the wheels offline and without resolution, then optionally a source tree as editable."""
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile"]
    if target is not None:
        base += ["--target", str(target), "--upgrade"]
    cmd = base + [str(w) for w in wheels]
    print("+", " ".join(cmd[:8]), f"... ({len(wheels)} wheels)", flush=True)
    subprocess.run(cmd, check=True)
    if editable is not None:
        # --no-build-isolation: the host's setuptools builds it, nothing is fetched.
        cmd = base + ["--no-build-isolation", "-e", str(editable)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    modes = (("verify", "reassemble and check hashes only"), ("install", "reassemble, check, install"))
    for name, help_ in modes:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--chunks", type=Path, required=True, help="folder holding chunk folders c001, ...")
        p.add_argument("--dest", type=Path, help="where whole wheels go (default: CHUNKS/wheels)")
        if name == "install":
            p.add_argument("--target", type=Path, help="pip --target folder instead of site-packages")
            p.add_argument("--editable", type=Path, help="source tree to install -e afterwards")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    try:
        wheels = reassemble(args.chunks, args.dest or args.chunks / "wheels")
    except WheelhouseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t1 = time.monotonic()
    size = sum(w.stat().st_size for w in wheels)
    mib = size / 2**20
    print(f"reassembled and verified {len(wheels)} files, {mib:.1f} MiB in {t1 - t0:.1f} s", flush=True)
    if args.cmd == "install":
        pip_install(sorted(wheels), args.target, args.editable)
        print(f"pip install took {time.monotonic() - t1:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
