"""The RPM: build it on Debian, then check what is in it and how it is put together.

Debian's rpmbuild 4.18 lacks Fedora's python, pyproject and systemd macros, so the
build loads the test-only stand-ins of packaging/rpm/rpmmacros.test (TESTBED.md, "RPM
on Debian"). A green run proves the spec, the unit, the logind drop-in and the default
config are consistent with each other and with the Python package; it does not prove
that Fedora's own macros build the spec.

The tools are part of the test environment (`make deps`, the venv's test extra): a
missing rpmbuild, rpmlint or systemd-analyze fails these tests, it never skips them.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from guestwarden.conf.loading import parse_settings
from guestwarden.conf.settings import Settings

REPO = Path(__file__).resolve().parents[2]
RPM_DIR = REPO / "packaging" / "rpm"
SPEC = RPM_DIR / "guestwarden.spec"
UNIT = RPM_DIR / "guestwarden.service"
DROPIN = RPM_DIR / "50-guestwarden.conf"
CONFIG = RPM_DIR / "guestwarden.toml"
MACROS = RPM_DIR / "rpmmacros.test"
RPMLINT_CONFIG = RPM_DIR / "rpmlint.toml"

UNIT_PATH = "/usr/lib/systemd/system/guestwarden.service"
DROPIN_PATH = "/usr/lib/systemd/logind.conf.d/50-guestwarden.conf"
CONFIG_PATH = "/etc/guestwarden/guestwarden.toml"
STATE_DIR = "/var/lib/guestwarden"
ENTRY_POINT = "/usr/bin/guestwarden"
DIST_REQUIRES = (
    "python3-libvirt",
    "python3-pyzmq",
    "python3-msgspec",
    "python3-sdnotify",
    "python3-psutil",
    "python3-dbus-fast",
    # ships virt-guest-shutdown.target, which the unit Requires=
    "libvirt-daemon-common",
)
NOT_IN_TARBALL = {".git", ".venv"}


# ----------------------------------------------------------------------- helpers


def tool(name: str, how: str) -> str:
    """The path of a command-line tool, or a test failure saying how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: {how}", pytrace=False)
    return path


def venv_tool(name: str, how: str) -> str:
    """A console script of the running interpreter's environment, else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else tool(name, how)


def run(
    cmd: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment of a systemd unit file, in order."""
    entries, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(entries: list[tuple[str, str, str]], section: str, key: str) -> list[str]:
    """Every space-separated value given to KEY in SECTION (list-valued keys add up)."""
    return [v for s, k, line in entries if (s, k) == (section, key) for v in line.split()]


def source_files() -> list[str]:
    """Files of the working tree that belong in a source tarball: tracked ones and new
    ones that .gitignore does not exclude (so the test sees uncommitted work)."""
    git = tool("git", "apt-get install git")
    out = run(
        [git, "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    ).stdout
    names = sorted({n for n in out.split("\0") if n})
    return [n for n in names if n.split("/", 1)[0] not in NOT_IN_TARBALL and (REPO / n).is_file()]


# ----------------------------------------------------------------------- the build


@dataclass(frozen=True)
class Build:
    rpm: Path
    srpm: Path
    log: str
    seconds: float


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    rpmbuild = tool("rpmbuild", "apt-get install rpm (make deps)")
    # The build uses this interpreter's setuptools without build isolation (as Fedora
    # builds with what BuildRequires installed); setuptools < 70.1 also needs `wheel`.
    try:
        setuptools_version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("setuptools is not installed in the test's environment", pytrace=False)
    major_minor = tuple(int(p) for p in setuptools_version.split(".")[:2])
    if major_minor < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.fail(
            f"setuptools {setuptools_version} needs the `wheel` package to build "
            "the RPM: pip install wheel (test extra)",
            pytrace=False,
        )

    version = project_version()
    spec_version = re.search(r"(?m)^Version:\s*(\S+)$", SPEC.read_text())
    if not spec_version or spec_version[1] != version:
        pytest.fail(
            f"{SPEC.name} Version: must be pyproject.toml's version {version}", pytrace=False
        )

    top = tmp_path_factory.mktemp("rpmbuild")
    tarball = top / "SOURCES" / f"guestwarden-{version}.tar.gz"
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz", compresslevel=1) as tar:
        for name in source_files():
            tar.add(REPO / name, arcname=f"guestwarden-{version}/{name}", recursive=False)

    # HOME: no ~/.rpmmacros of the person running the tests leaks into the build.
    env = {**os.environ, "HOME": str(top)}
    cmd = [
        rpmbuild,
        "--define",
        f"_topdir {top}",
        "--define",
        f"__python3 {sys.executable}",
        "--load",
        str(MACROS),
        "--nodeps",
        "-ba",
        str(SPEC),
    ]
    started = time.monotonic()
    proc = run(cmd, env=env, check=False)
    seconds = time.monotonic() - started
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(log.splitlines()[-60:])
        pytest.fail(
            f"rpmbuild exited {proc.returncode}; the end of its output:\n{tail}", pytrace=False
        )
    rpms = sorted((top / "RPMS" / "noarch").glob("guestwarden-*.noarch.rpm"))
    srpms = sorted((top / "SRPMS").glob("guestwarden-*.src.rpm"))
    assert len(rpms) == 1 and len(srpms) == 1, (rpms, srpms)
    return Build(rpm=rpms[0], srpm=srpms[0], log=log, seconds=seconds)


@pytest.fixture(scope="module")
def payload(build: Build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The RPM's files unpacked under a fresh directory, as they would be installed."""
    rpm2archive = tool("rpm2archive", "apt-get install rpm2cpio (comes with rpm)")
    root = tmp_path_factory.mktemp("payload")
    with build.rpm.open("rb") as f:
        proc = subprocess.run(
            [rpm2archive, "-"], stdin=f, capture_output=True, timeout=60, check=False
        )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r:gz") as tar:
        tar.extractall(root)
    return root


def query(build: Build, *args: str) -> str:
    return run([tool("rpm", "apt-get install rpm"), "-qp", *args, str(build.rpm)]).stdout


# ------------------------------------------------------------------------- tests


def test_spec_builds_a_noarch_rpm_of_the_project_version(build: Build) -> None:
    version = project_version()
    assert query(build, "--qf", "%{NAME} %{VERSION} %{ARCH}") == f"guestwarden {version} noarch"
    # %check ran %pyproject_check_import against the buildroot
    assert "Check import: guestwarden.conf.settings" in build.log
    assert build.seconds < 30, f"the RPM build took {build.seconds:.1f} s"


def test_rpm_holds_unit_dropin_config_package_and_entry_point(build: Build) -> None:
    files = query(build, "--list").splitlines()
    for path in (UNIT_PATH, DROPIN_PATH, CONFIG_PATH, STATE_DIR, ENTRY_POINT):
        assert path in files
    site = [
        f
        for f in files
        if re.fullmatch(
            r"/usr/lib/python3\.\d+/site-packages/guestwarden/"
            r"__init__\.py",
            f,
        )
    ]
    assert site, "guestwarden/__init__.py is not under site-packages"
    assert any(
        re.search(r"/site-packages/guestwarden-[^/]+\.dist-info/METADATA$", f) for f in files
    )
    assert query(build, "--configfiles").split() == [CONFIG_PATH]
    # %license: the MIT text of pyproject.toml's license travels with the package.
    licenses = query(build, "--qf", "[%{FILEFLAGS:fflags}|%{FILENAMES}\n]").splitlines()
    assert "l|/usr/share/licenses/guestwarden/LICENSE" in licenses


MANPAGE = REPO / "packaging" / "guestwarden.1"
COMPLETION = REPO / "packaging" / "guestwarden.bash-completion"
MANPAGE_PATH = re.compile(r"/usr/share/man/man1/guestwarden\.1(\.gz)?")
"""Fedora's brp-compress gzips man pages; Debian's rpmbuild leaves them as they are."""
COMPLETION_PATH = "/usr/share/bash-completion/completions/guestwarden"


def test_rpm_holds_man_page_and_bash_completion(build: Build, payload: Path) -> None:
    rows = query(build, "--qf", "[%{FILEMODES:perms}|%{FILENAMES}\n]").splitlines()
    modes = {name: perms for perms, name in (row.split("|", 1) for row in rows)}
    manpages = [name for name in modes if MANPAGE_PATH.fullmatch(name)]
    assert len(manpages) == 1, "the man page is not in the RPM"
    assert COMPLETION_PATH in modes, "the bash completion is not in the RPM"
    assert modes[manpages[0]] == modes[COMPLETION_PATH] == "-rw-r--r--"
    raw = (payload / manpages[0].lstrip("/")).read_bytes()
    assert (gzip.decompress(raw) if manpages[0].endswith(".gz") else raw) == MANPAGE.read_bytes()
    assert (payload / COMPLETION_PATH.lstrip("/")).read_bytes() == COMPLETION.read_bytes()


def test_rpm_holds_every_module_of_the_package(build: Build) -> None:
    """A subpackage without __init__.py is silently left out of the wheel."""
    packaged = {f.split("/site-packages/", 1)[1] for f in query(build, "--list").splitlines()
                if "/site-packages/guestwarden/" in f and f.endswith(".py")}
    source = {str(p.relative_to(REPO)) for p in (REPO / "guestwarden").rglob("*.py")}
    assert source <= packaged, f"not in the RPM: {sorted(source - packaged)}"


def test_file_modes_and_flags(build: Build) -> None:
    rows = query(build, "--qf", "[%{FILEFLAGS:fflags}|%{FILEMODES:perms}|%{FILENAMES}\n]")
    table = {
        name: (flags, perms) for flags, perms, name in (row.split("|") for row in rows.splitlines())
    }
    assert table[CONFIG_PATH] == ("cn", "-rw-r--r--")  # %config(noreplace)
    assert table[STATE_DIR][1] == "drwx------"  # the journal is root's only
    assert table[ENTRY_POINT][1] == "-rwxr-xr-x"
    assert table[UNIT_PATH][1] == table[DROPIN_PATH][1] == "-rw-r--r--"


def test_packaged_files_are_the_repository_files(payload: Path) -> None:
    for repo_file, path in ((UNIT, UNIT_PATH), (DROPIN, DROPIN_PATH), (CONFIG, CONFIG_PATH)):
        assert (payload / path.lstrip("/")).read_bytes() == repo_file.read_bytes(), path
    script = (payload / ENTRY_POINT.lstrip("/")).read_text()
    # the system python, never the build venv's, and the console script of pyproject.toml
    assert script.splitlines()[0] == "#!/usr/bin/python3 -sP"
    assert "from guestwarden.cli import main" in script


def test_requires_the_distribution_packages(build: Build) -> None:
    requires = {line.split()[0] for line in query(build, "--requires").splitlines()}
    missing = [name for name in DIST_REQUIRES if name not in requires]
    assert not missing, f"Requires missing: {missing}; has {sorted(requires)}"


def test_scriptlets_enable_stop_on_removal_and_restart_on_upgrade(build: Build) -> None:
    scripts = query(build, "--scripts")
    parts = dict(
        re.findall(
            r"^(\w+) scriptlet \(using [^)]*\):\n(.*?)(?=^\w+ scriptlet|\Z)",
            scripts,
            flags=re.MULTILINE | re.DOTALL,
        )
    )
    helper = "/usr/lib/systemd/systemd-update-helper"
    assert f"{helper} install-system-units guestwarden.service" in parts["postinstall"]
    assert f"{helper} remove-system-units guestwarden.service" in parts["preuninstall"]
    assert f"{helper} mark-restart-system-units guestwarden.service" in parts["postuninstall"]
    assert "systemctl reload systemd-logind.service" in parts["postinstall"]


def test_rpmlint_reports_no_errors(build: Build) -> None:
    rpmlint = venv_tool("rpmlint", "pip install rpmlint (test extra)")
    version = run([rpmlint, "--version"], check=False)
    if version.returncode != 0:
        pytest.fail(
            "rpmlint does not run (it needs Debian's python3-rpm and a venv made "
            f"with --system-site-packages):\n{version.stderr[-2000:]}",
            pytrace=False,
        )
    proc = run(
        [rpmlint, "-c", str(RPMLINT_CONFIG), str(SPEC), str(build.srpm), str(build.rpm)],
        check=False,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    summary = re.search(r"(\d+) errors, (\d+) warnings", report)
    assert summary and summary[1] == "0", report


def test_systemd_analyze_verify_accepts_the_unit(payload: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` on the unit exactly as the RPM installs it.

    The root is the RPM's payload (so ExecStart's /usr/bin/guestwarden exists, as on a
    host where the package is installed) plus this machine's own units (sysinit.target
    and the other units every service depends on by default) plus a stand-in for
    virt-guest-shutdown.target, which libvirt-daemon-common ships on Fedora and which
    the unit Requires=. The units it is only ordered after (libvirtd, virtqemud and
    their sockets) may be missing: ordering against a missing unit is no error.
    verify exits 0 even for unknown keys or bad values (it only logs them), so the
    test also requires it to print nothing.
    """
    analyze = tool("systemd-analyze", "apt-get install systemd (it runs without systemd as PID 1)")
    root = tmp_path / "root"
    shutil.copytree(payload, root, symlinks=True)
    unitdir = root / "usr/lib/systemd/system"
    host_units = Path("/usr/lib/systemd/system")
    assert (host_units / "sysinit.target").is_file(), "no systemd units on this machine"
    shutil.copytree(host_units, unitdir, symlinks=True, dirs_exist_ok=True)
    (unitdir / "virt-guest-shutdown.target").write_text(
        "[Unit]\nDescription=Stand-in for libvirt's virt-guest-shutdown.target\n"
    )
    proc = run([analyze, "verify", f"--root={root}", "guestwarden.service"], check=False)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not output, output


def test_unit_is_ordered_and_configured_like_a_libvirt_guests_replacement() -> None:
    entries = unit_entries(UNIT.read_text())
    unit, service = "Unit", "Service"
    assert values(entries, unit, "Requires") == ["virt-guest-shutdown.target"]
    after = set(values(entries, unit, "After"))
    assert {
        "virt-guest-shutdown.target",
        "libvirtd.service",
        "libvirtd.socket",
        "virtqemud.service",
        "virtqemud.socket",
        "network.target",
        "time-sync.target",
    } <= after
    # pulling in libvirtd would stop the modular daemons it conflicts with
    assert values(entries, unit, "Wants") == []
    assert values(entries, unit, "Conflicts") == ["libvirt-guests.service"]
    single = {
        key: values(entries, service, key)
        for key in (
            "Type",
            "NotifyAccess",
            "WatchdogSec",
            "Restart",
            "KillMode",
            "TimeoutStopSec",
            "RuntimeDirectory",
            "RuntimeDirectoryMode",
            "StateDirectory",
            "StateDirectoryMode",
        )
    }
    assert single == {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "WatchdogSec": ["30"],
        "Restart": ["on-failure"],
        "KillMode": ["mixed"],
        "TimeoutStopSec": ["120"],
        "RuntimeDirectory": ["guestwarden"],
        "RuntimeDirectoryMode": ["0755"],
        "StateDirectory": ["guestwarden"],
        "StateDirectoryMode": ["0700"],
    }
    assert values(entries, service, "ExecStart") == ["/usr/bin/guestwarden", "daemon"]
    assert values(entries, service, "ExecReload") == ["/usr/bin/guestwarden", "reload"]
    assert values(entries, "Install", "WantedBy") == ["multi-user.target"]
    # the directories systemd creates are the ones the default config uses
    defaults = Settings()
    assert defaults.state_dir == "/var/lib/" + values(entries, service, "StateDirectory")[0]
    assert defaults.runtime_dir == "/run/" + values(entries, service, "RuntimeDirectory")[0]


def test_logind_dropin_raises_the_inhibit_delay() -> None:
    entries = unit_entries(DROPIN.read_text())
    assert [(s, k) for s, k, _ in entries] == [("Login", "InhibitDelayMaxSec")]
    seconds = int(entries[0][2])
    assert seconds >= 600, "must cover a preserve, far beyond logind's default of 5 s"


def test_default_config_decodes_to_the_defaults() -> None:
    assert parse_settings(CONFIG.read_bytes(), Path(CONFIG_PATH)) == Settings()


def schema_keys(struct: type[msgspec.Struct], section: str = "") -> list[tuple[str, str]]:
    """(section, key) for every leaf key of the config schema."""
    keys = []
    for field in msgspec.structs.fields(struct):
        kind = field.type
        if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
            keys += schema_keys(kind, field.name)
        else:
            keys.append((section, field.name))
    return keys


def test_default_config_documents_every_key_with_its_default() -> None:
    text = CONFIG.read_text()
    lines = text.splitlines()
    documented, section = {}, ""
    for number, line in enumerate(lines):
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            section = header[1]
        shown = re.fullmatch(r"# (\w+) = .+", line)
        if shown:
            documented[(section, shown[1])] = number
    expected = schema_keys(Settings)
    assert sorted(documented) == sorted(expected), (
        "keys shown in guestwarden.toml differ from guestwarden/conf/settings.py"
    )
    for (section, key), number in documented.items():
        above = lines[number - 1]
        assert re.match(r"# \S", above) and not re.fullmatch(r"# \w+ = .+", above), (
            f"[{section}] {key}: no comment saying what it does right above it"
        )
    # uncommented, every shown value must still give exactly the defaults
    uncommented = re.sub(r"(?m)^# (\w+ = .+)$", r"\1", text)
    assert parse_settings(uncommented.encode(), Path(CONFIG_PATH)) == Settings()
    assert len(tomllib.loads(uncommented)) > 0
