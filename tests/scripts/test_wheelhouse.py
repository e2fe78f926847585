"""Chunked wheelhouse: split, manifest, reassembly and the checks that must catch a bad transfer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from install_wheelhouse import (  # noqa: E402
    MANIFEST,
    WheelhouseError,
    load_manifest,
    main,
    reassemble,
    split_into_chunks,
)

KIB = 1024


def _files(tmp_path: Path, sizes: dict[str, int]) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    out = []
    for name, size in sizes.items():
        p = src / name
        p.write_bytes(os.urandom(size))
        out.append(p)
    return out


@pytest.fixture
def built(tmp_path: Path):
    # one file larger than two chunks, one exactly a chunk, small ones, an empty one
    files = _files(tmp_path, {"big.whl": 25 * KIB + 7, "exact.whl": 10 * KIB, "a.whl": 3 * KIB,
                              "b.whl": 6 * KIB, "c.whl": 1, "empty.whl": 0})
    chunks = tmp_path / "chunks"
    manifest = split_into_chunks(files, chunks, 10 * KIB, meta={"python": "3.12"})
    return files, chunks, manifest


def test_chunks_respect_the_limit_and_hold_every_byte(built):
    files, chunks, manifest = built
    sizes = []
    for c in manifest["chunks"]:
        pieces = [p for p in (chunks / c).iterdir() if p.name != MANIFEST]
        sizes.append(sum(p.stat().st_size for p in pieces))
        assert (chunks / c / MANIFEST).is_file()
    assert max(sizes) <= 10 * KIB
    assert sum(sizes) == sum(f.stat().st_size for f in files) == manifest["total_bytes"]
    big = next(e for e in manifest["files"] if e["name"] == "big.whl")
    assert [p["index"] for p in big["pieces"]] == [0, 1, 2]
    assert [p["size"] for p in big["pieces"]] == [10 * KIB, 10 * KIB, 5 * KIB + 7]
    # first-fit decreasing fills 44 KiB into 5 chunks of 10 KiB (the least possible), not one per piece (8)
    assert len(manifest["chunks"]) == 5
    assert manifest["meta"] == {"python": "3.12"}


def test_reassembly_is_byte_exact(built, tmp_path):
    files, chunks, _ = built
    out = reassemble(chunks, tmp_path / "wheels")
    assert sorted(p.name for p in out) == sorted(f.name for f in files)
    for f in files:
        assert (tmp_path / "wheels" / f.name).read_bytes() == f.read_bytes()


def test_reassembly_from_chunks_copied_one_by_one(built, tmp_path):
    """The device receives chunk folders separately, without the top-level manifest copy."""
    files, chunks, manifest = built
    dest = tmp_path / "device"
    for c in manifest["chunks"]:
        shutil.copytree(chunks / c, dest / c)
    reassemble(dest, tmp_path / "wheels")
    digest = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert {e["name"]: e["sha256"] for e in load_manifest(dest)["files"]} == digest


def test_missing_chunk_is_named(built, tmp_path):
    _, chunks, manifest = built
    gone = manifest["chunks"][-1]
    shutil.rmtree(chunks / gone)
    with pytest.raises(WheelhouseError, match=f"missing chunk folders.*{gone}"):
        reassemble(chunks, tmp_path / "wheels")


def test_corrupt_piece_is_caught_and_leaves_no_file(built, tmp_path):
    _, chunks, manifest = built
    big = next(e for e in manifest["files"] if e["name"] == "big.whl")
    piece = chunks / big["pieces"][1]["chunk"] / big["pieces"][1]["path"]
    data = bytearray(piece.read_bytes())
    data[100] ^= 0xFF  # same size, one flipped byte
    piece.write_bytes(bytes(data))
    with pytest.raises(WheelhouseError, match="corrupt"):
        reassemble(chunks, tmp_path / "wheels")
    assert not (tmp_path / "wheels" / "big.whl").exists()


def test_truncated_piece_is_caught(built, tmp_path):
    _, chunks, manifest = built
    entry = next(e for e in manifest["files"] if e["name"] == "b.whl")
    piece = chunks / entry["pieces"][0]["chunk"] / entry["pieces"][0]["path"]
    piece.write_bytes(piece.read_bytes()[:-1])
    with pytest.raises(WheelhouseError, match="corrupt"):
        reassemble(chunks, tmp_path / "wheels")


def test_mixed_manifests_are_refused(built, tmp_path):
    _, chunks, manifest = built
    m = json.loads((chunks / manifest["chunks"][0] / MANIFEST).read_text())
    m["files"][0]["sha256"] = "0" * 64
    (chunks / manifest["chunks"][0] / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(WheelhouseError, match="different manifests"):
        reassemble(chunks, tmp_path / "wheels")


def test_bad_inputs_fail_clearly(tmp_path):
    files = _files(tmp_path, {"x.whl": 10})
    with pytest.raises(ValueError, match="positive"):
        split_into_chunks(files, tmp_path / "c", 0)
    twin = tmp_path / "other" / "x.whl"
    twin.parent.mkdir()
    twin.write_bytes(b"y")
    with pytest.raises(ValueError, match="share a name"):
        split_into_chunks([files[0], twin], tmp_path / "c", 100)
    with pytest.raises(WheelhouseError, match="no manifest.json"):
        reassemble(tmp_path / "src", tmp_path / "w")


def test_verify_command_exit_codes(built, tmp_path, capsys):
    _, chunks, manifest = built
    assert main(["verify", "--chunks", str(chunks), "--dest", str(tmp_path / "w")]) == 0
    assert "reassembled and verified 6 files" in capsys.readouterr().out
    shutil.rmtree(chunks / manifest["chunks"][0])
    assert main(["verify", "--chunks", str(chunks), "--dest", str(tmp_path / "w2")]) == 2


# --- resolution (scripts/wheelhouse.py), against a local stand-in for the index --------------------

wheelhouse = pytest.importorskip("wheelhouse", reason="needs the packaging library")


class LocalResolver(wheelhouse.Resolver):
    """Resolver whose downloads come from an in-memory index instead of PyPI."""

    def __init__(self, index: dict[str, dict[str, list[str]]], **kw):
        super().__init__(**kw)
        self.index = index
        self.downloads: list[str] = []

    def _download(self, name, spec):
        from packaging.version import Version

        versions = [v for v in self.index.get(name, {}) if spec.contains(v, prereleases=True)]
        if not versions:
            raise RuntimeError(f"no {name}{spec}")
        v = max(versions, key=Version)
        wheel = self.wheels / f"{name.replace('-', '_')}-{v}-py3-none-any.whl"
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {v}\n"
        meta += "".join(f"Requires-Dist: {r}\n" for r in self.index[name][v]) + "\nbody\n"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"{name.replace('-', '_')}-{v}.dist-info/METADATA", meta)
        self.downloads.append(f"{name}=={v}")
        return wheel


def _resolver(tmp_path, index, host, skip=None):
    target = wheelhouse.Target("3.12.3", "2.39", 13)
    (tmp_path / "w").mkdir()
    return LocalResolver(index, target=target, host=host, skip=skip or {}, wheels=tmp_path / "w")


def test_resolver_uses_host_skips_markers_and_backtracks_off_protected(tmp_path):
    index = {
        "app": {"1.0": ["lib>=1", "torch==2.11.0", "numpy", "big; extra == 'x'",
                        "winonly; sys_platform == 'win32'", "skipme"]},
        "lib": {"2.0": ["torch==2.14.1"], "1.5": ["torch>=2.4"]},
        "big": {"0.1": []},
    }
    r = _resolver(tmp_path, index, {"torch": "2.11.0", "numpy": "2.5.2"}, {"skipme": "not needed"})
    r.resolve(["app[x]==1.0"])
    assert {n: str(p.version) for n, p in r.picks.items()} == {"app": "1.0", "lib": "1.5", "big": "0.1"}
    assert r.from_host == {"torch": "2.11.0", "numpy": "2.5.2"}
    assert list(r.skipped) == ["skipme"]
    on_disk = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert on_disk == sorted(p.wheel.name for p in r.picks.values())


def test_resolver_repicks_on_a_narrower_need_and_drops_orphans(tmp_path):
    index = {
        "a": {"1": ["dep", "b"]},
        "b": {"1": ["dep<3"]},
        "dep": {"3.0": ["only-in-dep3"], "2.0": []},
        "only-in-dep3": {"1": []},
    }
    r = _resolver(tmp_path, index, {})
    r.resolve(["a"])
    assert {n: str(p.version) for n, p in r.picks.items()} == {"a": "1", "b": "1", "dep": "2.0"}
    assert not list((tmp_path / "w").glob("only_in_dep3*")) and not list((tmp_path / "w").glob("dep-3.0*"))


def test_resolver_refuses_to_replace_protected_host_packages(tmp_path):
    r = _resolver(tmp_path, {"app": {"1": ["torch==2.14.1"]}}, {"torch": "2.11.0"})
    with pytest.raises(RuntimeError, match="no version of app fits.*torch==2.11.0 and it must stay"):
        r.resolve(["app"])


def test_freeze_parsing_and_target_tags(tmp_path):
    f = tmp_path / "freeze.txt"
    f.write_text("# comment\nTorch==2.11.0\nmy_pkg @ file:///x\n\nnumpy==2.5.2\n")
    assert wheelhouse.read_freeze(f) == {"torch": "2.11.0", "my-pkg": "", "numpy": "2.5.2"}
    f.write_text("torch>=2\n")
    with pytest.raises(ValueError, match="not a freeze line"):
        wheelhouse.read_freeze(f)
    args = wheelhouse.Target("3.12.3", "2.39", 13).pip_args()
    assert "manylinux_2_34_x86_64" in args and "manylinux_2_17_x86_64" in args  # sglang 0.5.17 is 2_34
    assert "manylinux_2_40_x86_64" not in args
    for bad in ("2.5", "glibc-2.39", ""):
        with pytest.raises(ValueError, match="glibc"):
            wheelhouse.Target("3.12", bad, 13).pip_args()
