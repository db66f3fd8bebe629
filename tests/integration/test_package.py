"""scripts/package.py builds a reproducible zip that imports in a Lambda-like python3.12,
with the vendor profile it is given, and beside it the profile.json Terraform reads.

"Lambda-like": a fresh interpreter (-I -S: no site-packages, no PYTHONPATH, no user site)
whose path holds only the unpacked zip and what the python3.12 Lambda runtime ships
outside the zip: boto3 and botocore with their own dependencies, taken from this
interpreter's site-packages.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline import profile as vendor_profile

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024
# boto3, botocore and their dependencies: what the Lambda runtime provides.
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "six", "urllib3")
HANDLER_MODULES = ("workers.kickoff", "workers.drain", "workers.replay")
FOUR_LEVELS = ROOT / "tests" / "profiles" / "fleet-4-levels.toml"


def run_package(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "package.py"), "--out", str(out), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def build(out: Path, *args: str) -> Path:
    result = run_package(out, *args)
    assert result.returncode == 0, result.stderr
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def python312() -> str | None:
    """A CPython 3.12 to import the cp312 package with, like the Lambda runtime."""
    candidates: list[str | None] = [os.environ.get("HARVEST_LAMBDA_PYTHON")]
    if sys.version_info[:2] == (3, 12):
        candidates.append(sys.executable)
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    candidates += ["/usr/bin/python3.12", "/usr/local/bin/python3.12", shutil.which("python3.12")]
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("first") / "lambda.zip")


@pytest.fixture(scope="module")
def unpacked(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("task")  # Lambda's /var/task
    with zipfile.ZipFile(package) as zf:
        zf.extractall(target)
    return target


def test_building_twice_gives_the_same_sha256(
    package: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    again = build(tmp_path_factory.mktemp("second") / "lambda.zip")
    assert sha256(again) == sha256(package)
    assert sha256(again.parent / "profile.json") == sha256(package.parent / "profile.json")


def test_entries_are_sorted_with_fixed_dates_and_modes(package: Path) -> None:
    with zipfile.ZipFile(package) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names)
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {(i.external_attr >> 16) & 0o777 for i in infos} <= {0o644, 0o755}


def test_package_holds_the_project_and_its_dependencies_but_no_noise(package: Path) -> None:
    with zipfile.ZipFile(package) as zf:
        names = zf.namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {"pipeline", "workers", "requests", "aws_lambda_powertools", "tenacity"} <= top
    # The runtime provides these; a bundled copy would shadow it.
    assert not {"boto3", "botocore", "s3transfer"} & top
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    assert not [n for n in names if n.endswith(".dist-info/RECORD")]
    assert not [n for n in names if n.startswith("bin/")]


def test_package_holds_no_terminal_tool(package: Path) -> None:
    # The CLI, its display (rich) and the simulator are for people at a terminal.
    with zipfile.ZipFile(package) as zf:
        names = zf.namelist()
    assert not [n for n in names if n.startswith("pipeline/dev/")]
    assert "rich" not in {n.split("/", 1)[0] for n in names}


def test_unpacked_size_is_under_the_lambda_limit(package: Path) -> None:
    with zipfile.ZipFile(package) as zf:
        unpacked = sum(i.file_size for i in zf.infolist())
    assert unpacked < LAMBDA_UNZIPPED_LIMIT


def test_the_default_build_ships_the_profiles_and_describes_hermes_beside_the_zip(
    package: Path,
) -> None:
    with zipfile.ZipFile(package) as zf:
        names = zf.namelist()
    packaged = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "profiles").rglob("*.toml"))
    assert [n for n in names if n.startswith("profiles/")] == packaged
    described = json.loads((package.parent / "profile.json").read_text())
    assert described == {**vendor_profile.load().describe(), "file": "profiles/hermes-v1.toml"}


def test_a_profile_from_elsewhere_ships_as_profiles_its_file_name(
    package: Path, tmp_path: Path
) -> None:
    # WHEN the zip is built for the four-level test profile, which lives under tests/
    out = build(tmp_path / "lambda.zip", "--profile", str(FOUR_LEVELS.relative_to(ROOT)))

    # THEN it ships as profiles/fleet-4-levels.toml beside the packaged ones, unchanged
    with zipfile.ZipFile(out) as zf:
        assert zf.read("profiles/fleet-4-levels.toml") == FOUR_LEVELS.read_bytes()
        profiles = {n for n in zf.namelist() if n.startswith("profiles/")}
    with zipfile.ZipFile(package) as zf:
        default = {n for n in zf.namelist() if n.startswith("profiles/")}
    assert profiles == default | {"profiles/fleet-4-levels.toml"}
    # AND profile.json names its levels, keys and that file
    described = json.loads((tmp_path / "profile.json").read_text())
    assert [s["name"] for s in described["stages"]] == ["regions", "sites", "devices", "channels"]
    assert described["keys"] == ["region_id", "site_id", "device_id", "channel_id"]
    assert described["file"] == "profiles/fleet-4-levels.toml"


def test_a_bad_profile_fails_the_build_with_its_one_line_error(tmp_path: Path) -> None:
    # GIVEN a profile whose second level does not expand its parent's id
    bad = tmp_path / "vendor.toml"
    bad.write_text(
        FOUR_LEVELS.read_text().replace('"/api/regions/{region_id}/sites"', '"/api/sites"')
    )

    # WHEN the zip is built for it
    result = run_package(tmp_path / "lambda.zip", "--profile", str(bad))

    # THEN the build fails at once with the profile's error, naming the key, and writes nothing
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"profile {bad}: levels[1].path: missing path parameter {{region_id}}")
    assert list(tmp_path.iterdir()) == [bad]


def test_every_shipped_module_imports_in_a_lambda_like_interpreter(
    package: Path, unpacked: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    interpreter = python312()
    if interpreter is None:
        pytest.skip("no CPython 3.12 found (set HARVEST_LAMBDA_PYTHON) to import the cp312 zip")
    # GIVEN a runtime directory holding only what Lambda ships beside the zip
    runtime = tmp_path_factory.mktemp("runtime")
    import boto3

    site = Path(str(boto3.__file__)).resolve().parents[1]
    for name in RUNTIME_PACKAGES:
        source = site / name if (site / name).exists() else site / f"{name}.py"
        assert source.exists(), f"{name} missing from {site}"
        (runtime / source.name).symlink_to(source)
    shipped = sorted(
        ".".join(p.relative_to(unpacked).with_suffix("").parts).removesuffix(".__init__")
        for top in ("pipeline", "workers")
        for p in (unpacked / top).rglob("*.py")
    )
    script = (
        "import importlib, json, sys\n"
        f"sys.path[:0] = [{str(unpacked)!r}, {str(runtime)!r}]\n"
        f"for module in {shipped!r}:\n"
        "    importlib.import_module(module)\n"
        f"modules = {list(HANDLER_MODULES)!r}\n"
        "handlers = [callable(importlib.import_module(m).handler) for m in modules]\n"
        "import boto3, requests, aws_lambda_powertools\n"
        "from pipeline import profile\n"
        "print(json.dumps({'handlers': handlers, 'files': {\n"
        "    'boto3': boto3.__file__, 'requests': requests.__file__,\n"
        "    'powertools': aws_lambda_powertools.__file__,\n"
        "    'profile': profile.from_env().source}}))\n"
    )
    # Lambda's own variables: Powertools sees it is in Lambda (the tracer patches boto3).
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AWS_LAMBDA_FUNCTION_NAME": "harvest-import-check",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LAMBDA_TASK_ROOT": str(unpacked),
        "POWERTOOLS_SERVICE_NAME": "harvest",
        "POWERTOOLS_METRICS_NAMESPACE": "Harvest",
        # What Terraform sets on every function: profile.json's "file".
        "HARVEST_PROFILE": json.loads((package.parent / "profile.json").read_text())["file"],
    }

    # WHEN every module of the zip is imported, the three handler modules among them
    result = subprocess.run(
        [interpreter, "-I", "-S", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=unpacked,
        check=False,
        timeout=120,
    )

    # THEN they import from the zip, with boto3 from the runtime, and read the profile
    # HARVEST_PROFILE names from the zip too
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["handlers"] == [True, True, True]
    assert report["files"]["boto3"].startswith(str(runtime))
    assert report["files"]["requests"].startswith(str(unpacked))
    assert report["files"]["powertools"].startswith(str(unpacked))
    assert report["files"]["profile"] == str(unpacked / "profiles" / "hermes-v1.toml")
