"""Build an offline wheelhouse for a GPU host that has no internet.

Resolution is explicit: every wheel is fetched with ``pip download --no-deps`` for the target's
Python and platform tags, its ``Requires-Dist`` lines are evaluated against the target's markers,
and each requirement is either met by the host (its ``pip freeze``, given as a file), left out on
purpose (``--skip``), or fetched in turn. Nothing is left to pip's resolver on either machine, so the
plan printed here is exactly what the host gets. ``--chunk-mb`` then cuts the set into folders of at
most N MiB with a sha256 manifest (see ``install_wheelhouse.py``, which installs them on the host).

Example (the GPU machine of this project)::

    python3 scripts/wheelhouse.py --host-freeze scripts/gpu_host_freeze.txt --profile serve \\
        --out .wheelhouse --chunk-mb 58
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parent))
from install_wheelhouse import split_into_chunks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Packages the host's CUDA stack is built from: replacing them offline would break torch, so a
# requirement they do not meet is an error, not a download.
PROTECTED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")

# What the serving smoke test needs whatever the profile: sglang pins the exact versions of the rest.
ESSENTIAL = ("sglang", "sglang-kernel", "flashinfer-python")

# Declared by sglang 0.5.17 but not imported at module level on the serving path (sglang.launch_server,
# http_server, scheduler, model_runner, models.llama, the triton and flashinfer backends, flashinfer):
# found by walking those modules' unguarded imports. Each is a large kernel or media library, or an
# entry point, that other backends, quantisation schemes or model families import when chosen.
SERVE_SKIP = {
    "flash-attn-4": "FA3/FA4 attention backends only",
    "helion": "experimental kernels, imported lazily",
    "humming-kernels": "quantised GEMM kernels",
    "nvidia-cutlass-dsl": "CuTe DSL kernels (FA4, some MoE/quant paths)",
    "nvidia-mathdx": "cuBLASDx for CuTe DSL kernels",
    "quack-kernels": "CuTe DSL kernels",
    "sgl-deep-gemm": "FP8 DeepGEMM for DeepSeek-style models",
    "tilelang": "NSA/DSA sparse attention kernels",
    "tokenspeed-mla": "MLA decode kernels",
    "torchao": "torchao quantisation",
    "torchcodec": "video/audio decoding for multimodal inputs",
    "modelscope": "model downloads from ModelScope",
    "py-spy": "profiling helpers",
    "smg-grpc-servicer": "gRPC entry point",
    "checkpoint-engine": "weight-update service",
    "mistral-common": "Mistral tokenizers",
    "openai-harmony": "gpt-oss format; without it sglang disables /v1/responses at start-up",
    "anthropic": "Anthropic-compatible API endpoint",
    "torch-memory-saver": "RL weight offloading",
    "numba": "pin 0.65.1 would downgrade the host's numba and llvmlite; one image processor imports it",
    "kernels": "HF kernel hub loader",
    "cuda-python": "metapackage: the host's cuda-bindings provides the modules, and no release fits "
    "the host's cuda-core 1.2 with cuda-bindings 13.3",
}


# Imported unconditionally on the serving path but not declared by sglang 0.5.17, which gets it only
# through datasets (sampling imports dill).
UNDECLARED = ("dill",)


@dataclass(frozen=True)
class Target:
    """The host a wheelhouse is built for."""

    python: str  # "3.12" or "3.12.3"
    glibc: str  # "2.39": manylinux_2_N for every N down to 17 is accepted
    cuda_major: int
    machine: str = "x86_64"

    def markers(self, extra: str = "") -> dict[str, str]:
        full = self.python if self.python.count(".") == 2 else self.python + ".0"
        return {
            "python_version": ".".join(self.python.split(".")[:2]),
            "python_full_version": full,
            "implementation_name": "cpython",
            "implementation_version": full,
            "platform_python_implementation": "CPython",
            "sys_platform": "linux",
            "os_name": "posix",
            "platform_system": "Linux",
            "platform_machine": self.machine,
            "platform_release": "",
            "platform_version": "",
            "extra": extra,
        }

    def pip_args(self) -> list[str]:
        m = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", self.glibc)
        major, minor = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        if major != 2 or minor < 17:
            raise ValueError(f"glibc {self.glibc}: expected 2.17 or newer")
        plats = [f"manylinux_2_{n}_{self.machine}" for n in range(minor, 16, -1)]
        plats += [f"manylinux2014_{self.machine}", f"linux_{self.machine}"]
        py = "".join(self.python.split(".")[:2])
        args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", self.python]
        for abi in (f"cp{py}", "abi3", "none"):
            args += ["--abi", abi]
        for p in plats:
            args += ["--platform", p]
        return args


def read_freeze(path: Path) -> dict[str, str]:
    """Parse ``pip freeze`` / ``pip list --format=freeze`` output into {canonical name: version}."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*(\S+)|@\s*\S+)$", line)
        if not m:
            raise ValueError(f"{path}:{n}: not a freeze line: {line!r}")
        out[canonicalize_name(m.group(1))] = m.group(2) or ""
    if not out:
        raise ValueError(f"{path}: no packages in this freeze")
    return out


def project_requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """Runtime requirements of our own package (and the chosen extras) from its pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for e in extras:
        if e not in optional:
            raise ValueError(f"{pyproject}: no extra {e!r} (have: {', '.join(optional)})")
        reqs += optional[e]
    return reqs


def wheel_requires(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode()
    head = text.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith("Requires-Dist:")]


@dataclass
class Pick:
    """One wheel chosen for download and why."""

    wheel: Path
    version: Version
    spec: SpecifierSet
    extras: set[str] = field(default_factory=set)
    wanted_by: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Need:
    """A requirement in the queue, with the pick that declared it (None for the roots)."""

    req: Requirement
    parent: str | None = None
    parent_version: Version | None = None

    @property
    def who(self) -> str:
        return f"{self.parent}=={self.parent_version}" if self.parent else "root"


class Conflict(RuntimeError):
    """A need that cannot be met next to what is already fixed (the host's CUDA stack, earlier picks)."""

    def __init__(self, need: Need, why: str):
        super().__init__(f"{need.who} needs {need.req}, but {why}")
        self.need = need


class Resolver:
    """Walk the requirement graph for a target, fetching each missing wheel with ``--no-deps``.

    Versions are taken newest first. When a fetched wheel needs what cannot be had (a protected host
    package such as torch at another version, or a version that clashes with an earlier pick), that
    version of the wheel is excluded and an older one tried: the host's CUDA stack and the pins of the
    roots are the fixed points everything else must fit.
    """

    MAX_BACKTRACK = 25

    def __init__(self, target: Target, host: dict[str, str], skip: dict[str, str], wheels: Path):
        self.target, self.host, self.skip, self.wheels = target, host, skip, wheels
        self.picks: dict[str, Pick] = {}
        self.from_host: dict[str, str] = {}
        self.skipped: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self._excluded: dict[str, list[Version]] = {}
        self._why: dict[str, str] = {}  # why the last excluded version of a package failed

    def _applies(self, req: Requirement, extras: set[str] = frozenset()) -> bool:
        """Whether ``req`` holds on the target, with or without the given extras."""
        if req.marker is None:
            return True
        return any(req.marker.evaluate(self.target.markers(e)) for e in ({""} | set(extras)))

    def _download(self, name: str, spec: SpecifierSet) -> Path:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
            cmd += self.target.pip_args() + [f"{name}{spec}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = list(Path(tmp).glob("*.whl"))
            if r.returncode or len(got) != 1:
                got = self._build_pure(name, spec, Path(tmp))
            if len(got) != 1:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"no wheel of {name}{spec} for this target:\n  " + "\n  ".join(tail))
            dest = self.wheels / got[0].name
            shutil.move(str(got[0]), dest)
            return dest

    def _build_pure(self, name: str, spec: SpecifierSet, tmp: Path) -> list[Path]:
        """A package that publishes only an sdist (sqlitedict, word2number, ...): build its wheel
        here, and keep it only if it is pure Python (`none-any`), which installs on any target."""
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp), f"{name}{spec}"]
        if subprocess.run(cmd, capture_output=True, text=True).returncode:
            return []
        got = [w for w in tmp.glob("*.whl") if w.name.endswith("-none-any.whl")]
        if got:
            self.notes.append(f"{got[0].name}: built here from the sdist (pure Python, no wheel published)")
        return got

    def _check_cuda(self, wheel: Path, need: Need) -> None:
        """Note a wheel built for another CUDA major: legal when declared, but worth seeing."""
        for m in re.finditer(r"(?:^|[-_+.])cu(?:da)?(\d{2,3})(?:x|\b)", wheel.name.lower()):
            digits = m.group(1)
            major = int(digits[:2]) if len(digits) == 3 else int(digits)
            if major != self.target.cuda_major:
                self.notes.append(f"{wheel.name}: CUDA {major}, not {self.target.cuda_major} ({need.who})")

    def _say(self, line: str) -> None:
        print(line, flush=True)

    def _deps(self, pick: Pick, name: str, extras: set[str], base: bool) -> list[Need]:
        """The needs a pick declares: its base needs if ``base``, and those of ``extras``."""
        out = []
        for line in wheel_requires(pick.wheel):
            dep = Requirement(line)
            is_extra = dep.marker is not None and "extra" in str(dep.marker)
            if is_extra and extras and any(dep.marker.evaluate(self.target.markers(e)) for e in extras):
                out.append(Need(dep, name, pick.version))
            elif not is_extra and base and self._applies(dep):
                out.append(Need(dep, name, pick.version))
        return out

    def _visit(self, need: Need) -> list[Need]:
        req = need.req
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in self.skip:
            self.skipped.setdefault(name, []).append(f"{need.who}: {req}")
            return []
        have = self.host.get(name)
        if name not in self.picks and have is not None:
            if req.specifier.contains(have, prereleases=True) if have else not req.specifier:
                self.from_host[name] = have
                if extras:
                    self.notes.append(f"{name}[{','.join(sorted(extras))}] is the host's: extras unchecked")
                return []
            if PROTECTED.match(name):
                raise Conflict(need, f"the host has {name}=={have} and it must stay")
            self.notes.append(f"{name}: host has {have}, {need.who} needs {req.specifier or 'it'}: replaced")
        pick = self.picks.get(name)
        if pick is not None and pick.version in req.specifier:
            pick.spec &= req.specifier
            pick.wanted_by.append(need.who)
            new = extras - pick.extras
            pick.extras |= new
            return self._deps(pick, name, new, base=False)
        spec = (pick.spec if pick else SpecifierSet()) & req.specifier
        for v in self._excluded.get(name, []):
            spec &= SpecifierSet(f"!={v}")
        try:
            wheel = self._download(name, spec)
        except RuntimeError as e:
            if pick is not None:
                raise Conflict(need, f"{name}{spec} (with earlier needs) has no wheel") from e
            if name in self._why:
                raise RuntimeError(f"no version of {name} fits; the last one tried: {self._why[name]}") from e
            raise
        if pick is not None:
            self._say(f"re-pick {name}: {pick.version} fails {req.specifier} ({need.who})")
            if pick.wheel != wheel:
                pick.wheel.unlink()
            extras |= pick.extras
        self._check_cuda(wheel, need)
        version = parse_wheel_filename(wheel.name)[1]
        pick = Pick(wheel, version, spec, extras, (pick.wanted_by if pick else []) + [need.who])
        self.picks[name] = pick
        self._say(f"fetch {name}=={version}  <- {need.who} [{req}]")
        return self._deps(pick, name, extras, base=True)

    def _backtrack(self, conflict: Conflict) -> Need:
        """Drop the pick whose need cannot be met, and ask for an older version of it."""
        need = conflict.need
        if need.parent is None or need.parent not in self.picks:
            raise conflict
        bad = self.picks.pop(need.parent)
        bad.wheel.unlink()
        excluded = self._excluded.setdefault(need.parent, [])
        excluded.append(bad.version)
        self._why[need.parent] = str(conflict)
        if len(excluded) > self.MAX_BACKTRACK:
            raise RuntimeError(f"gave up on {need.parent} after {len(excluded)} versions: {conflict}")
        self._say(f"backtrack: {conflict}; trying {need.parent}!={bad.version}")
        extras = f"[{','.join(sorted(bad.extras))}]" if bad.extras else ""
        return Need(Requirement(f"{need.parent}{extras}{bad.spec}"), None, None)

    def resolve(self, roots: list[str]) -> None:
        """Resolve the root requirements into picks, host hits and skips; then drop orphans."""
        queue = deque(Need(Requirement(r)) for r in roots)
        queue = deque(n for n in queue if self._applies(n.req))
        while queue:
            need = queue.popleft()
            if need.parent is not None and (
                need.parent not in self.picks or self.picks[need.parent].version != need.parent_version
            ):
                continue  # declared by a version that has since been replaced
            try:
                queue.extend(self._visit(need))
            except Conflict as c:
                queue.append(self._backtrack(c))
        self._prune(roots)

    def _prune(self, roots: list[str]) -> None:
        """Remove picks that only versions since replaced wanted."""
        seen: set[str] = set()
        stack = [Requirement(r) for r in roots]
        while stack:
            req = stack.pop()
            name = canonicalize_name(req.name)
            if name in seen or name not in self.picks:
                continue
            seen.add(name)
            pick = self.picks[name]
            stack += [n.req for n in self._deps(pick, name, pick.extras, base=True)]
        for name in set(self.picks) - seen:
            self._say(f"drop {name}=={self.picks[name].version}: nothing needs it any more")
            self.picks.pop(name).wheel.unlink()

    def report(self) -> str:
        """A readable plan: what is fetched and for whom, what the host has, what is left out."""
        lines = ["== fetched (not on the host, or the host's version does not fit) =="]
        for p in sorted(self.picks.values(), key=lambda p: p.wheel.name.lower()):
            mb = p.wheel.stat().st_size / 2**20
            lines.append(f"  {p.wheel.name:<72} {mb:8.1f} MiB  <- {p.wanted_by[0]}")
        lines.append(f"== met by the host: {len(self.from_host)} ==")
        lines.append("  " + " ".join(f"{n}=={v}" for n, v in sorted(self.from_host.items())))
        lines.append(f"== left out on purpose: {len(self.skipped)} ==")
        for name, who in sorted(self.skipped.items()):
            lines.append(f"  {name:<22} {self.skip[name]}  (wanted by {who[0]})")
        if self.notes:
            lines.append("== notes ==")
            lines += [f"  {c}" for c in dict.fromkeys(self.notes)]
        total = sum(p.wheel.stat().st_size for p in self.picks.values())
        lines.append(f"== {len(self.picks)} wheels, {total / 2**20:.1f} MiB ==")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host-freeze", type=Path, required=True, help="`pip freeze` of the target host")
    ap.add_argument("--python", default="3.12.3", help="target Python version (default 3.12.3)")
    ap.add_argument("--glibc", default="2.39", help="target glibc, sets the manylinux tags (default 2.39)")
    ap.add_argument("--cuda", type=int, default=13, help="target CUDA major; wheels for another are refused")
    ap.add_argument("--sglang", default="0.5.17", help="sglang version (must pin the host's torch)")
    ap.add_argument("--profile", choices=("serve", "full"), default="serve",
                    help="serve: leave out what the triton/flashinfer serving path never imports; full: all")
    ap.add_argument("--skip", action="append", default=[], metavar="NAME", help="also leave out NAME")
    ap.add_argument("--project-extra", action="append", default=[], metavar="EXTRA",
                    help="also take this extra of our package's dependencies (e.g. hf)")
    ap.add_argument("--out", type=Path, default=REPO / ".wheelhouse", help="output folder")
    ap.add_argument("--chunk-mb", type=int, help="cut the set into chunk folders of at most N MiB")
    args = ap.parse_args(argv)

    target = Target(args.python, args.glibc, args.cuda)
    host = read_freeze(args.host_freeze)
    skip = dict(SERVE_SKIP) if args.profile == "serve" else {}
    skip.update({canonicalize_name(s): "--skip" for s in args.skip})
    wheels = args.out / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)

    roots = [f"sglang=={args.sglang}", *UNDECLARED]
    extras = project_requirements(REPO / "pyproject.toml", args.project_extra)
    roots += extras
    # What our own extras ask for by name (e.g. datasets for the harness) is not left out.
    for requirement in extras:
        name = canonicalize_name(Requirement(requirement).name)
        if skip.get(name) != "--skip":
            skip.pop(name, None)
    resolver = Resolver(target, host, skip, wheels)
    try:
        resolver.resolve(roots)
        lacking = [n for n in ESSENTIAL if n not in resolver.picks and n not in resolver.from_host]
        if lacking:
            raise RuntimeError(f"the plan lacks {', '.join(lacking)}: check --skip and the sglang version")
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(resolver.report())
    picks = resolver.picks
    plan = {
        "target": vars(target) | {"profile": args.profile},
        "wheels": {n: {"file": p.wheel.name, "wanted_by": p.wanted_by} for n, p in sorted(picks.items())},
        "from_host": resolver.from_host,
        "skipped": {n: resolver.skip[n] for n in sorted(resolver.skipped)},
        "notes": resolver.notes,
    }
    (args.out / "plan.json").write_text(json.dumps(plan, indent=1))

    if args.chunk_mb:
        chunks = args.out / "chunks"
        if chunks.exists():
            shutil.rmtree(chunks)
        files = sorted(p.wheel for p in resolver.picks.values())
        manifest = split_into_chunks(files, chunks, args.chunk_mb * 2**20, meta=plan["target"])
        for c in manifest["chunks"]:
            mb = sum(f.stat().st_size for f in (chunks / c).iterdir()) / 2**20
            print(f"  {chunks / c}  {mb:6.1f} MiB")
        print(f"== {len(manifest['chunks'])} chunks of <= {args.chunk_mb} MiB under {chunks} ==")
    return 0


if __name__ == "__main__":
    sys.exit(main())
