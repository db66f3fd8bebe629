"""Build the Lambda deployment zip and the profile.json Terraform reads beside it.

    python scripts/package.py [--profile hermes-v1 | path/to/vendor.toml] [--out build/lambda.zip]

The profile (pipeline/profile.py) is validated first: a bad one fails the build with its
one-line error. The zip ships `profiles/` and the chosen profile (one from elsewhere as
`profiles/<its file name>`); `profile.json` beside the zip is `Profile.describe()` plus
`"file"`, the profile's path inside the zip, which Terraform reads for the stages, the
Glue columns and every function's HARVEST_PROFILE.

The dependencies are `[project] dependencies` of pyproject.toml minus what the Lambda
Python runtime already provides (boto3, botocore), installed as manylinux x86_64 wheels
for CPython 3.12. The zip is reproducible: sorted entries, fixed timestamps and fixed
permissions, no bytecode, no pip RECORD files, so the same inputs give the same sha256
(and Terraform's source_code_hash only changes when the code, a profile or a dependency
does).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import profile as vendor_profile
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# The project's packages that ship, each without its subpackages: the handlers, the core and
# the two backends with the vendor client. pipeline/dev/ (the CLI, its display, the
# simulator) is for people at a terminal and stays out; tests/test_layout.py checks both.
PROJECT_PACKAGES = ("pipeline", "pipeline/aws", "pipeline/local", "pipeline/vendor_api", "workers")

# What the python3.12 Lambda runtime ships; bundling them would only shadow it.
RUNTIME_PROVIDED = frozenset({"boto3", "botocore"})
# Top-level names of those distributions and of their own dependencies that pip may still
# pull in through another requirement; never bundled.
RUNTIME_TOP_LEVEL = frozenset({"boto3", "botocore", "s3transfer"})

# The packaged profiles, shipped under this name; the Lambda's working directory is the
# zip's root, so HARVEST_PROFILE = "profiles/<file>" finds them.
PROFILES = "profiles"
# What Terraform reads (its profile_json_path), written beside the zip.
PROFILE_JSON = "profile.json"

PLATFORM = "manylinux2014_x86_64"
PYTHON_VERSION = "3.12"

FIXED_DATE = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644
EXEC_MODE = 0o755
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024


def requirement_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a distribution name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def runtime_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """pyproject's `[project] dependencies`, less those the Lambda runtime provides."""
    with pyproject.open("rb") as f:
        dependencies: list[str] = tomllib.load(f)["project"]["dependencies"]
    return [r for r in dependencies if requirement_name(r) not in RUNTIME_PROVIDED]


def install_dependencies(requirements: list[str], target: Path, wheelhouse: Path) -> None:
    """pip-install Lambda-platform wheels (no builds for the target) into `target`.

    A dependency published only as an sdist is first built into a
    wheel here; a pure-Python one comes out as py3-none-any and so installs for the
    Lambda platform too, while a compiled one stays tagged for this machine and fails
    the install below instead of shipping a binary for the wrong platform.
    """
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--wheel-dir", str(wheelhouse), *requirements], check=True)
    subprocess.run(
        [
            *pip,
            "install",
            "--target",
            str(target),
            "--platform",
            PLATFORM,
            "--implementation",
            "cp",
            "--python-version",
            PYTHON_VERSION,
            "--only-binary=:all:",
            "--find-links",
            str(wheelhouse),
            "--no-compile",
            *requirements,
        ],
        check=True,
    )


def _is_noise(relative: Path) -> bool:
    parts = relative.parts
    if "__pycache__" in parts or relative.suffix in (".pyc", ".pyo"):
        return True
    if parts[0] == "bin":  # console scripts with this machine's interpreter in the shebang
        return True
    if parts[0].split("-")[0].lower() in RUNTIME_TOP_LEVEL:
        return True
    return len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "RECORD"


def dependency_files(site: Path) -> Iterator[tuple[str, Path]]:
    """(archive name, file) for everything pip installed, less noise."""
    for path in site.rglob("*"):
        if path.is_file() and not path.is_symlink():
            relative = path.relative_to(site)
            if not _is_noise(relative):
                yield relative.as_posix(), path


def project_files(root: Path = ROOT) -> Iterator[tuple[str, Path]]:
    """(archive name, file) for the project's packages that ship (PROJECT_PACKAGES)."""
    for package in PROJECT_PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            yield path.relative_to(root).as_posix(), path


@dataclass(frozen=True)
class ChosenProfile:
    """The profile a build ships as the default of its functions."""

    profile: vendor_profile.Profile
    path: Path  # the file it was read from
    file: str  # its archive name, profiles/<...>: every function's HARVEST_PROFILE

    def describe(self) -> dict[str, Any]:
        """profile.json: the stages, their keys, and where the zip holds the file."""
        return {**self.profile.describe(), "file": self.file}


def choose_profile(name_or_path: str, root: Path = ROOT) -> ChosenProfile:
    """The profile `name_or_path` names (pipeline.profile.load); ConfigError if invalid, or
    if it would replace a different packaged profile of the same file name."""
    chosen = vendor_profile.load(name_or_path)
    path = Path(chosen.source).resolve()
    packaged = (root / PROFILES).resolve()
    if path.is_relative_to(packaged):
        return ChosenProfile(chosen, path, f"{PROFILES}/{path.relative_to(packaged).as_posix()}")
    file = f"{PROFILES}/{path.name}"
    clash = root / file
    if clash.is_file() and clash.read_bytes() != path.read_bytes():
        raise ConfigError(
            f"profile {path}: its zip name {file} is a different packaged profile; rename it"
        )
    return ChosenProfile(chosen, path, file)


def profile_files(chosen: ChosenProfile, root: Path = ROOT) -> Iterator[tuple[str, Path]]:
    """(archive name, file) for every packaged profile and the chosen one."""
    for path in sorted((root / PROFILES).rglob("*.toml")):
        yield path.relative_to(root).as_posix(), path
    yield chosen.file, chosen.path


def write_profile_json(chosen: ChosenProfile, out: Path) -> Path:
    """Write `chosen.describe()` to `out` (atomically), stably formatted."""
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(chosen.describe(), indent=2) + "\n")
    tmp.replace(out)
    return out


def write_zip(entries: Iterable[tuple[str, Path]], out: Path) -> None:
    """Write `entries` sorted, with fixed dates and modes, to `out` (atomically)."""
    by_name = dict(entries)  # the project's own files win over a same-named dependency
    tmp = out.with_suffix(out.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(by_name):
            path = by_name[name]
            info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
            info.create_system = 3  # Unix, so external_attr carries the mode
            # Shared libraries keep an executable mode; everything else is plain data.
            mode = EXEC_MODE if ".so" in path.suffixes else FILE_MODE
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes(), compresslevel=9)
    tmp.replace(out)


def build(
    out: Path,
    *,
    requirements: list[str] | None = None,
    chosen: ChosenProfile | None = None,
) -> Path:
    """Build the zip at `out`, and profile.json beside it; return the zip."""
    requirements = runtime_requirements() if requirements is None else requirements
    chosen = choose_profile(vendor_profile.DEFAULT_PROFILE) if chosen is None else chosen
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="harvest-package-") as tmp:
        site = Path(tmp) / "site"
        if requirements:
            install_dependencies(requirements, site, Path(tmp) / "wheelhouse")
        else:
            site.mkdir()
        # Project files are listed last so they override any same-named dependency file.
        write_zip([*dependency_files(site), *project_files(), *profile_files(chosen)], out)
    write_profile_json(chosen, out.parent / PROFILE_JSON)
    return out


def describe(zip_path: Path) -> dict[str, str | int]:
    """Path, zipped and unpacked size, and sha256 (hex and base64, as Lambda shows it)."""
    digest = hashlib.sha256(zip_path.read_bytes()).digest()
    with zipfile.ZipFile(zip_path) as zf:
        unpacked = sum(i.file_size for i in zf.infolist())
        count = len(zf.infolist())
    return {
        "path": str(zip_path),
        "size": zip_path.stat().st_size,
        "unpacked_size": unpacked,
        "files": count,
        "sha256": digest.hex(),
        "sha256_base64": base64.b64encode(digest).decode(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "build" / "lambda.zip",
        help="zip to write (default: build/lambda.zip); profile.json is written beside it",
    )
    parser.add_argument(
        "--profile",
        default=vendor_profile.DEFAULT_PROFILE,
        help="vendor profile: a name in profiles/ or a TOML file"
        f" (default: {vendor_profile.DEFAULT_PROFILE})",
    )
    args = parser.parse_args(argv)
    try:
        chosen = choose_profile(args.profile)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    zip_path = build(args.out.resolve(), chosen=chosen)
    info: dict[str, str | int] = {**describe(zip_path), "profile": chosen.file}
    info["profile_json"] = str(zip_path.parent / PROFILE_JSON)
    for key, value in info.items():
        print(f"{key:14} {value}")
    if int(info["unpacked_size"]) >= LAMBDA_UNZIPPED_LIMIT:
        print("unpacked size exceeds Lambda's 250 MB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
