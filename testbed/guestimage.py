"""Tiny diskless test guests for real QEMU/libvirt tests, built from Debian packages.

:func:`build_guest_image` produces a kernel and an initramfs (newc cpio, gzip) for a
direct-kernel-boot guest that needs no disk and no network:

* the kernel of ``linux-image-cloud-amd64`` (its versioned dependency is looked up with
  ``apt-cache depends``, so a kernel update is picked up by the next rebuild);
* ``busybox-static`` as ``/bin/busybox`` plus a symlink for each applet;
* the kernel modules ``virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev
  virtio_pci virtio_console button evdev`` (those built into the kernel are skipped),
  loaded in that order by ``/init``;
* busybox ``acpid`` with the handler ``/etc/acpi/PWRF/00000080`` for the ACPI power
  button (``button`` + ``evdev`` give a "Power Button" input device; busybox acpid maps
  its KEY_POWER press to ``PWRF/00000080``);
* ``qemu-ga`` from ``qemu-guest-agent`` with the shared libraries the dynamic loader
  lists for it (taken from the downloaded library packages, not from the host), running
  on the virtio serial port named ``org.qemu.guest_agent.0``; ``/sbin/shutdown`` (used by
  guest-shutdown) powers off, ``/sbin/hwclock`` (used by guest-set-time) is busybox's.

Everything comes from ``apt-get download`` + ``dpkg-deb`` and the cpio archive (with its
``/dev/console`` node) is written in Python, so building needs no root and, on the host,
only apt, dpkg and an x86-64 CPU (the unpacked dynamic loader lists qemu-ga's libraries).
Nothing needs to be installed: the .deb files are kept in ``<cache>/debs``. The image is
cached in ``$GUESTWARDEN_IMAGE_CACHE`` or ``/var/cache/guestwarden-test-images``, in a
directory named after :data:`RECIPE_VERSION` (bump it whenever the recipe changes), built
in a temporary directory and renamed into place; ``BUILDINFO`` there lists the package
versions used.

Kernel command-line switches read by ``/init`` (pass them with ``cmdline_extra``):

``gw.poweroff_delay=N``
    Wait N seconds (a whole number) after a power-button press or a guest-agent
    shutdown request before powering off.
``gw.ignore_acpi=1``
    Ignore the power button: the guest prints :data:`ACPI_IGNORED_MARKER` on its
    console and keeps running.
``gw.no_agent=1``
    Do not start qemu-ga; agent calls then fail at once.
``gw.dirty_mib=N``
    Before READY, fill N MiB of guest memory (a tmpfs of its own) with non-zero data,
    so that a managed save has that much to write: QEMU skips zero pages, so an idle
    guest saves in a fraction of a second whatever its size. Give the guest at least
    N + 96 MiB of memory.

Lines the guest prints on its serial console (ttyS0), for :func:`wait_for_console`:
:data:`READY_MARKER` once modules, acpid and qemu-ga are up (qemu-ga has its port open),
:data:`POWEROFF_MARKER` when a power-off was requested (before the delay),
:data:`ACPI_IGNORED_MARKER` when the power button was pressed and ignored, and
:data:`ERROR_MARKER` followed by a reason when something in ``/init`` failed. The
console log is truncated whenever QEMU starts (also on a restore from a managed save).

Worth knowing when driving these guests through libvirt (measured, libvirt 9.0):

* ``dom.shutdown()`` without flags uses the agent when it is connected and falls back
  to the power button otherwise; use ``shutdownFlags(VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)``
  to test ACPI alone.
* ``setTime(flags=VIR_DOMAIN_TIME_SYNC)`` sends guest-set-time without a time: qemu-ga
  runs ``hwclock -s``, i.e. the guest clock is set from its RTC, which QEMU keeps on host
  time (the clock falls behind by the downtime of a save/restore; the RTC does not).
  ``setTime`` with an explicit time also writes the RTC (``hwclock -w``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from xml.sax.saxutils import escape, quoteattr

RECIPE_VERSION = 3
"""Bump whenever anything that ends up in the image changes: forces a rebuild."""

CACHE_ENV = "GUESTWARDEN_IMAGE_CACHE"
DEFAULT_CACHE_DIR = Path("/var/cache/guestwarden-test-images")

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"

MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
    "button",
    "evdev",
)
"""Kernel modules the guest loads, in this order (built-in ones are skipped)."""

AGENT_CHANNEL = "org.qemu.guest_agent.0"
READY_MARKER = "GUESTWARDEN-READY"
POWEROFF_MARKER = "GUESTWARDEN-POWEROFF"
ACPI_IGNORED_MARKER = "GUESTWARDEN-ACPI-IGNORED"
ERROR_MARKER = "GUESTWARDEN-ERROR"

MIN_MEMORY_MIB = 96
DEFAULT_MEMORY_MIB = 128

_GUEST_AGENT_PATH = "/usr/sbin/qemu-ga"
_BUSYBOX_PATH = "/bin/busybox"


class GuestImageError(RuntimeError):
    """The guest image could not be built."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A kernel and an initramfs for direct kernel boot."""

    kernel: Path
    initramfs: Path


# --------------------------------------------------------------------------- public API


def default_cache_dir() -> Path:
    """``$GUESTWARDEN_IMAGE_CACHE`` if set and not empty, else the system cache dir."""
    env = os.environ.get(CACHE_ENV, "")
    return Path(env) if env else DEFAULT_CACHE_DIR


def image_paths(cache_dir: Path) -> GuestImage:
    """Where the image of the current recipe lives (or will live) under ``cache_dir``."""
    tag = f"gw-guest-v{RECIPE_VERSION}"
    return GuestImage(
        kernel=cache_dir / tag / f"{tag}.vmlinuz",
        initramfs=cache_dir / tag / f"{tag}.initramfs.gz",
    )


def build_guest_image(cache_dir: Path | None = None) -> GuestImage:
    """Return the cached guest image, building it first if missing.

    Safe to call from several processes at once: one builds (under a lock file) in a
    temporary directory that is renamed into place, the others wait and reuse it.
    """
    cache = (cache_dir if cache_dir is not None else default_cache_dir()).absolute()
    image = image_paths(cache)
    if _complete(image):
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        if _complete(image):
            return image
        build_dir = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            out = build_dir / "out"
            out.mkdir()
            _build(cache / "debs", build_dir, out, image)
            out.chmod(0o755)
            shutil.rmtree(image.kernel.parent, ignore_errors=True)  # an incomplete one
            os.rename(out, image.kernel.parent)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    return image


def domain_xml(
    name: str,
    image: GuestImage,
    *,
    memory_mib: int = DEFAULT_MEMORY_MIB,
    cmdline_extra: str = "",
    console_log: Path,
    kvm: bool = False,
) -> str:
    """A libvirt domain for ``image``: direct kernel boot, no disk, no network.

    The serial console (ttyS0) is written to ``console_log``; the guest agent listens on
    a virtio-serial channel named :data:`AGENT_CHANNEL`. Software emulation (TCG) unless
    ``kvm`` is true: KVM must be opt-in (see TESTBED.md).
    """
    if memory_mib < MIN_MEMORY_MIB:
        raise ValueError(f"memory_mib={memory_mib}: the guest needs at least {MIN_MEMORY_MIB}")
    cmdline = " ".join(["console=ttyS0", *cmdline_extra.split()])
    domain_type = "kvm" if kvm else "qemu"
    cpu = "  <cpu mode='host-passthrough'/>\n" if kvm else ""
    return f"""<domain type='{domain_type}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initramfs))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
{cpu}  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <target type='virtio' name='{AGENT_CHANNEL}'/>
    </channel>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def wait_for_console(console_log: Path, marker: str, timeout_s: float) -> None:
    """Poll ``console_log`` until it contains ``marker``.

    Raises :class:`TimeoutError` with the end of the log when ``timeout_s`` passes first.
    """
    deadline = time.monotonic() + timeout_s
    text = ""
    while True:
        try:
            text = console_log.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        if marker in text:
            return
        if time.monotonic() >= deadline:
            tail = "\n".join(text.splitlines()[-25:])
            raise TimeoutError(
                f"{marker!r} not in {console_log} after {timeout_s:g} s; its end:\n{tail}"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------- building


def _complete(image: GuestImage) -> bool:
    return image.kernel.is_file() and image.initramfs.is_file()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(args: Sequence[str | Path], *, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LD_")}
    env["LC_ALL"] = "C"
    try:
        proc = subprocess.run(
            [str(a) for a in args],
            cwd=cwd,
            env=env,
            check=False,
            capture_output=True,
            text=True,
        )
    except OSError as e:
        raise GuestImageError(f"cannot run {args[0]}: {e}") from e
    if proc.returncode != 0:
        raise GuestImageError(
            f"{' '.join(str(a) for a in args)} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def _kernel_package() -> str:
    """The versioned kernel package the meta package currently depends on."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    found = re.findall(r"^\s+\|?Depends:\s+(linux-image-\S+)\s*$", out, re.MULTILINE)
    if not found:
        raise GuestImageError(
            f"no linux-image-* dependency of {KERNEL_META_PACKAGE} (did `apt-get update` run?)"
        )
    return str(found[0])


def _dependency_closure(package: str) -> list[str]:
    """``package`` and everything it depends on, recursively (Depends/PreDepends)."""
    out = _run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            "--no-pre-depends",
            package,
        ]
    )
    names = {line.strip() for line in out.splitlines() if line and not line[0].isspace()}
    return sorted(n for n in names if not n.startswith("<"))


def _download(packages: Sequence[str], debs: Path, scratch: Path) -> list[Path]:
    """Download the candidate .deb of each package into ``debs``, kept between builds:
    a file already there with the right size and SHA256 is not downloaded again."""
    debs.mkdir(parents=True, exist_ok=True)
    scratch.mkdir()  # apt prints no URI for a file already in the current directory
    out = _run(["apt-get", "download", "--print-uris", *packages], cwd=scratch)
    wanted: dict[str, tuple[str, int, str]] = {}  # file name -> package, size, hash
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1].endswith(".deb"):
            digest = fields[3].partition("SHA256:")[2].lower()
            wanted[fields[1]] = (fields[1].split("_", 1)[0], int(fields[2]), digest)
    missing = sorted(set(packages) - {pkg for pkg, _, _ in wanted.values()})
    if missing:
        raise GuestImageError(f"apt cannot download {missing} (did `apt-get update` run?)")

    def good(fname: str) -> bool:
        path = debs / fname
        _, size, digest = wanted[fname]
        if not path.is_file() or path.stat().st_size != size:
            return False
        with path.open("rb") as f:
            return not digest or hashlib.file_digest(f, "sha256").hexdigest() == digest

    for stale in debs.iterdir():
        if stale.name not in wanted or not good(stale.name):
            stale.unlink()
    to_fetch = [pkg for fname, (pkg, _, _) in wanted.items() if not (debs / fname).is_file()]
    if to_fetch:
        _run(["apt-get", "download", *to_fetch], cwd=debs)
    for fname in wanted:
        if not good(fname):
            raise GuestImageError(f"apt-get download did not produce a good {debs / fname}")
    return [debs / fname for fname in sorted(wanted)]


def _inside(root: Path, guest_path: str) -> Path:
    """The host path of ``guest_path`` in the unpacked tree ``root``, symlinks followed
    as the guest would follow them (absolute targets stay inside ``root``)."""
    parts = list(PurePosixPath(guest_path).parts[1:])
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise GuestImageError(f"symlink loop at {guest_path} in {root}")
            target = PurePosixPath(os.readlink(candidate))
            if target.is_absolute():
                resolved = []
                parts = list(target.parts[1:]) + parts
            else:
                parts = list(target.parts) + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def _elf_sections(data: bytes) -> dict[str, bytes]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestImageError("not a little-endian 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        return name, offset, size

    _, strtab, _ = header(shstrndx)
    sections: dict[str, bytes] = {}
    for i in range(shnum):
        name_off, offset, size = header(i)
        start = strtab + name_off
        name = data[start : data.index(b"\0", start)].decode()
        sections[name] = data[offset : offset + size]
    return sections


def _elf_interpreter(data: bytes) -> str:
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 3:  # PT_INTERP
            return data[offset : offset + filesz].rstrip(b"\0").decode()
    raise GuestImageError("no PT_INTERP: not a dynamically linked executable")


def _module_depends(ko: bytes) -> list[str]:
    modinfo = _elf_sections(ko).get(".modinfo", b"")
    for entry in modinfo.split(b"\0"):
        if entry.startswith(b"depends="):
            return [d.replace("-", "_") for d in entry[8:].decode().split(",") if d]
    return []


def _module_name(path: str | Path) -> str:
    """``.../virtio-pci.ko.xz`` -> ``virtio_pci`` (the kernel treats - and _ alike)."""
    return PurePosixPath(path).name.split(".ko")[0].replace("-", "_")


def _read_module(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".ko"):
        return raw
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".ko.zst"):
        proc = subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True)
        return proc.stdout
    raise GuestImageError(f"unknown module format: {path}")


def _kernel_modules(moddir: Path) -> list[tuple[str, bytes]]:
    """The (name, uncompressed .ko) of each module of :data:`MODULES` that is not built
    in, in load order; checks that every dependency is loaded earlier or built in."""
    builtin = {
        _module_name(line.strip())
        for line in (moddir / "modules.builtin").read_text().splitlines()
        if line.strip()
    }
    files: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        files.setdefault(_module_name(path), path)
    loaded: list[tuple[str, bytes]] = []
    for name in MODULES:
        if name in builtin:
            continue
        if name not in files:
            raise GuestImageError(f"kernel module {name} is neither built in nor in {moddir}")
        ko = _read_module(files[name])
        ready = builtin | {n for n, _ in loaded}
        for dep in _module_depends(ko):
            if dep not in ready:
                raise GuestImageError(f"module {name} needs {dep}, which is not loaded before it")
        loaded.append((name, ko))
    return loaded


def _agent_libraries(root: Path) -> tuple[str, list[str]]:
    """The dynamic loader and the libraries qemu-ga needs, as guest paths, resolved with
    the unpacked loader itself (what ``ldd`` does) against the unpacked library packages
    only: a library that only the host has is an error."""
    agent = _inside(root, _GUEST_AGENT_PATH)
    interp = _elf_interpreter(agent.read_bytes())
    loader = _inside(root, interp)
    if not loader.is_file():
        raise GuestImageError(f"the dynamic loader {interp} is not in the unpacked packages")
    lib_dirs = [
        str(_inside(root, d))
        for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib")
        if _inside(root, d).is_dir()
    ]
    out = _run([loader, "--library-path", ":".join(lib_dirs), "--list", agent])
    libs: list[str] = []
    root_prefix = str(root) + os.sep
    for line in out.splitlines():
        line = line.strip()
        if "=>" not in line:
            continue  # linux-vdso.so.1 and the like
        soname, _, rest = line.partition("=>")
        host_path = rest.strip().split(" (")[0].strip()
        if host_path == "not found" or not host_path.startswith(root_prefix):
            raise GuestImageError(
                f"{soname.strip()} (needed by qemu-ga) is not in the downloaded packages"
            )
        guest = "/" + os.path.relpath(host_path, root)
        if soname.strip() == interp or guest == interp:
            continue
        # keep the directory the loader found it in, named by its soname
        libs.append(str(PurePosixPath(guest).parent / soname.strip()))
    return interp, libs


class _Cpio:
    """A newc ("070701") cpio archive built in memory; parents are added automatically."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._paths: set[str] = set()
        self._ino = 300000

    def _entry(
        self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        path = path.strip("/")
        if path in self._paths:
            raise GuestImageError(f"duplicate initramfs entry /{path}")
        parent = str(PurePosixPath(path).parent)
        if parent != "." and parent not in self._paths:
            self.directory(parent)
        self._paths.add(path)
        self._ino += 1
        name = path.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._chunks += [header, name, b"\0" * (-(len(header) + len(name)) % 4)]
        self._chunks += [data, b"\0" * (-len(data) % 4)]

    def directory(self, path: str, mode: int = 0o755) -> None:
        if path.strip("/") not in self._paths:
            self._entry(path, 0o040000 | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self._entry(path, 0o120777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(path, 0o020000 | mode, rdev=(major, minor))

    def has(self, path: str) -> bool:
        return path.strip("/") in self._paths

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def _extract_kernel(deb: Path, root: Path) -> None:
    """Unpack only the kernel image, modules.builtin and the modules of :data:`MODULES`
    (all of the kernel package takes over 2 s to write out, this about 0.7 s)."""
    wanted = re.compile(r"\./boot/vmlinuz-[^/]+|\./lib/modules/[^/]+/modules\.builtin")
    module_re = re.compile(r"\./lib/modules/[^/]+/kernel/.*\.ko(\.xz|\.gz|\.zst)?")
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name if member.name.startswith("./") else "./" + member.name
                if not member.isfile():
                    continue
                if not wanted.fullmatch(name) and not (
                    module_re.fullmatch(name) and _module_name(name) in MODULES
                ):
                    continue
                src = tar.extractfile(member)
                assert src is not None
                dest = root / name[2:]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(src.read())
    if proc.returncode != 0:
        raise GuestImageError(f"dpkg-deb --fsys-tarfile {deb} failed ({proc.returncode})")


def _build(debs: Path, build_dir: Path, out: Path, image: GuestImage) -> None:
    with concurrent.futures.ThreadPoolExecutor() as pool:  # each apt-cache takes ~0.5 s
        kernel_future = pool.submit(_kernel_package)
        closure_future = pool.submit(_dependency_closure, AGENT_PACKAGE)
        kernel_pkg, closure = kernel_future.result(), closure_future.result()
    kver = kernel_pkg.removeprefix("linux-image-")
    packages = sorted({kernel_pkg, BUSYBOX_PACKAGE, *closure})
    deb_files = _download(packages, debs, build_dir / "apt")
    root = build_dir / "root"
    root.mkdir()
    for deb in deb_files:
        if deb.name.startswith(kernel_pkg + "_"):
            _extract_kernel(deb, root)
        else:
            _run(["dpkg-deb", "-x", deb, root])

    vmlinuz = root / "boot" / f"vmlinuz-{kver}"
    if not vmlinuz.is_file():
        raise GuestImageError(f"{kernel_pkg} has no /boot/vmlinuz-{kver}")
    modules = _kernel_modules(root / "lib" / "modules" / kver)

    cpio = _Cpio()
    for d in ("dev", "proc", "sys", "run", "tmp", "etc", "root", "var", "var/lib", "lib"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.symlink("var/run", "/run")
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")

    busybox = _inside(root, _BUSYBOX_PATH)
    cpio.file(_BUSYBOX_PATH, busybox.read_bytes(), 0o755)
    scripts = _scripts([name for name, _ in modules])
    for applet in sorted(_run([busybox, "--list-full"]).split()):
        if "/" in applet and "/" + applet != _BUSYBOX_PATH and "/" + applet not in scripts:
            cpio.symlink(applet, _BUSYBOX_PATH)
    for path, text in scripts.items():
        cpio.file(path, text.encode(), 0o755)
    if not cpio.has("sbin/hwclock"):
        raise GuestImageError("busybox has no hwclock applet, which qemu-ga's guest-set-time runs")

    for name, ko in modules:
        cpio.file(f"lib/modules/{name}.ko", ko)

    interp, libs = _agent_libraries(root)
    cpio.file(_GUEST_AGENT_PATH, _inside(root, _GUEST_AGENT_PATH).read_bytes(), 0o755)
    cpio.file(interp, _inside(root, interp).read_bytes(), 0o755)
    for lib in libs:
        cpio.file(lib, _inside(root, lib).read_bytes(), 0o644)

    initramfs = out / image.initramfs.name
    initramfs.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    shutil.copyfile(vmlinuz, out / image.kernel.name)
    versions = {deb.name.split("_")[0]: deb.name.split("_")[1] for deb in deb_files}
    (out / "BUILDINFO").write_text(
        f"recipe {RECIPE_VERSION}\nkernel {kver}\n"
        f"modules {' '.join(n for n, _ in modules)}\n"
        f"builtin {' '.join(n for n in MODULES if n not in dict(modules))}\n"
        + "".join(f"package {p} {v.replace('%3a', ':')}\n" for p, v in sorted(versions.items()))
    )
    for f in out.iterdir():
        f.chmod(0o644)


# --------------------------------------------------------------------------- guest side


def _scripts(modules: Sequence[str]) -> dict[str, str]:
    """The guest's own scripts, by absolute path."""
    init = _INIT_SCRIPT.replace("@MODULES@", " ".join(modules))
    init = init.replace("@RECIPE@", str(RECIPE_VERSION)).replace("@CHANNEL@", AGENT_CHANNEL)
    for name, marker in (
        ("@READY@", READY_MARKER),
        ("@POWEROFF@", POWEROFF_MARKER),
        ("@IGNORED@", ACPI_IGNORED_MARKER),
        ("@ERROR@", ERROR_MARKER),
    ):
        init = init.replace(name, marker)
    return {
        "/init": init,
        "/sbin/gw-poweroff": _POWEROFF_SCRIPT.replace("@POWEROFF@", POWEROFF_MARKER),
        "/sbin/shutdown": _SHUTDOWN_SCRIPT,
        "/etc/acpi/PWRF/00000080": _ACPI_POWER_SCRIPT.replace("@IGNORED@", ACPI_IGNORED_MARKER),
    }


_INIT_SCRIPT = r"""#!/bin/sh
# guestwarden test guest, recipe @RECIPE@ (built by testbed/guestimage.py)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/gw /run/qemu-ga
say() { echo "$*" > /dev/console; }
# wait_until TENTHS COMMAND...: retry COMMAND every 0.1 s, at most TENTHS times
wait_until() {
    n=$1; shift
    until "$@"; do
        n=$((n - 1)); [ "$n" -gt 0 ] || return 1
        usleep 100000
    done
}

delay=0; ignore_acpi=0; no_agent=0; dirty_mib=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        gw.poweroff_delay=*) delay=${arg#*=} ;;
        gw.ignore_acpi=*) ignore_acpi=${arg#*=} ;;
        gw.no_agent=*) no_agent=${arg#*=} ;;
        gw.dirty_mib=*) dirty_mib=${arg#*=} ;;
    esac
done
case "$delay" in
    ''|*[!0-9]*) say "@ERROR@ bad gw.poweroff_delay=$delay, using 0"; delay=0 ;;
esac
echo "$delay" > /run/gw/poweroff_delay
case "$dirty_mib" in
    ''|*[!0-9]*) say "@ERROR@ bad gw.dirty_mib=$dirty_mib, using 0"; dirty_mib=0 ;;
esac
[ "$ignore_acpi" = 1 ] && : > /run/gw/ignore_acpi

for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || say "@ERROR@ insmod $m failed"
done

power_button() { grep -qx "Power Button" /sys/class/input/event*/device/name 2>/dev/null; }
if wait_until 50 power_button; then
    # acpid goes to the background before it opens the input devices and writes its
    # pid file after: a power button pressed before that is lost (seen under load with
    # gw.no_agent=1, where nothing else delays READY), so READY waits for the file
    acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid || say "@ERROR@ acpid failed"
    wait_until 100 test -s /run/acpid.pid || say "@ERROR@ acpid is not listening"
else
    say "@ERROR@ no Power Button input device: acpid not started"
fi

agent=off
find_port() {
    for p in /sys/class/virtio-ports/*; do
        if [ "$(cat "$p/name" 2>/dev/null)" = @CHANNEL@ ] && [ -c "/dev/${p##*/}" ]; then
            port=/dev/${p##*/}
            return 0
        fi
    done
    return 1
}
agent_open() {
    for fd in /proc/$agent_pid/fd/*; do
        [ "$(readlink "$fd")" = "$port" ] && return 0
    done
    return 1
}
if [ "$no_agent" = 1 ]; then
    agent=disabled
elif wait_until 100 find_port; then
    qemu-ga -m virtio-serial -p "$port" -f /run/qemu-ga.pid -t /run/qemu-ga \
        </dev/null >/dev/console 2>&1 &
    agent_pid=$!
    if wait_until 100 agent_open; then
        agent=$port
    else
        say "@ERROR@ qemu-ga did not open $port"
    fi
else
    say "@ERROR@ no virtio port named @CHANNEL@"
fi

if [ "$dirty_mib" -gt 0 ]; then
    # memory a managed save must really write: 1 MiB of random bytes, copied N times
    mkdir -p /run/gw/dirty
    mount -t tmpfs -o size=$((dirty_mib + 1))m tmpfs /run/gw/dirty
    head -c 1048576 /dev/urandom > /run/gw/seed
    n=0
    while [ "$n" -lt "$dirty_mib" ]; do
        cat /run/gw/seed || break
        n=$((n + 1))
    done > /run/gw/dirty/fill
    [ "$n" -eq "$dirty_mib" ] || say "@ERROR@ only $n of gw.dirty_mib=$dirty_mib MiB filled"
fi

read -r uptime _ < /proc/uptime
say "@READY@ agent=$agent poweroff_delay=$delay ignore_acpi=$ignore_acpi" \
    "dirty_mib=$dirty_mib uptime=$uptime"
# PID 1 must never exit; busybox sh reaps every child (orphans too) while it waits.
while :; do
    sleep 3600
done
"""

_POWEROFF_SCRIPT = r"""#!/bin/sh
# gw-poweroff SOURCE [poweroff|reboot|halt]: power off after gw.poweroff_delay seconds
action=${2:-poweroff}
delay=$(cat /run/gw/poweroff_delay 2>/dev/null)
echo "@POWEROFF@ source=$1 action=$action delay=${delay:-0}" > /dev/console
[ "${delay:-0}" -gt 0 ] && sleep "$delay"
sync
exec "$action" -f
"""

_SHUTDOWN_SCRIPT = r"""#!/bin/sh
# Called by qemu-ga (guest-shutdown) as: shutdown -h -P|-H|-r +0 "message".
# It waits for us, so power off in the background and report success at once.
action=poweroff
for arg in "$@"; do
    case "$arg" in
        -r) action=reboot ;;
        -H) action=halt ;;
    esac
done
setsid /sbin/gw-poweroff agent "$action" </dev/null >/dev/null 2>&1 &
exit 0
"""

_ACPI_POWER_SCRIPT = r"""#!/bin/sh
# busybox acpid runs this for the ACPI power button (event "PWRF/00000080").
if [ -e /run/gw/ignore_acpi ]; then
    echo "@IGNORED@" > /dev/console
    exit 0
fi
setsid /sbin/gw-poweroff acpi poweroff </dev/null >/dev/null 2>&1 &
exit 0
"""
