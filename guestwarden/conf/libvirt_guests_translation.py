"""The text of a libvirt-guests translation: which key each variable becomes, and why.

Split from libvirt_guests.py (the reader) because it is mostly prose: one comment per
key saying where its value comes from, and a ``NOTE:`` wherever guestwarden cannot do
exactly what libvirt-guests did. The rules, in short: keep what libvirt-guests does
when things go right (one save at a time, one start at a time, the same timeouts);
where it gives up (a save fails, a shutdown times out) guestwarden's fallback applies,
because the alternative is the host killing the guest.
"""

from __future__ import annotations

import textwrap

from guestwarden.conf.libvirt_guests import (
    LibvirtGuestsConfig,
    LibvirtGuestsError,
    defaults,
    sleep_seconds,
    whole_number,
)
from guestwarden.conf.render import toml_value


class _Toml:
    """TOML lines with comments wrapped to the width of the packaged config."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def comment(self, text: str, *, note: bool = False) -> None:
        self.lines += [f"# {line}" for line in textwrap.wrap(("NOTE: " if note else "") + text,
                                                             width=86, break_on_hyphens=False)]

    def key(self, name: str, value: object) -> None:
        self.lines.append(f"{name} = {toml_value(value)}")

    def section(self, name: str) -> None:
        self.lines += ["", "", f"[{name}]"]


class Translation:
    """One pass over a libvirt-guests config; see the module docstring for the rules."""

    def __init__(self, cfg: LibvirtGuestsConfig, uris: list[str],
                 default: tuple[str, str]) -> None:
        self.cfg = cfg
        self.uris = uris
        self.default = default
        self.out = _Toml()
        self.warnings: list[str] = []
        self.values = cfg.values
        self.suspending = self.values["ON_SHUTDOWN"] != "shutdown"
        self.persistent_only = self.values["PERSISTENT_ONLY"]
        if self.persistent_only not in ("true", "false", "default"):
            raise LibvirtGuestsError(f"{cfg.where('PERSISTENT_ONLY')}: expected true, false "
                                     "or default")

    def render(self) -> tuple[str, list[str]]:
        self._header()
        self._uris()
        self.out.section("shutdown")
        if self.suspending:
            self._suspend()
        else:
            self._shutdown()
        self._shutdown_timeout()
        self._bypass_cache()
        self.out.section("boot")
        self._boot()
        self._ignored()
        return "\n".join(self.out.lines) + "\n", self.warnings

    def _said(self, name: str) -> str:
        """``NAME='value' (line 3)`` or ``NAME='value' (unset: the debian default)``."""
        return f"{name}={self.values[name]!r} ({self.cfg.origin(name)})"

    def _odd(self, name: str, meaning: str) -> None:
        text = f"libvirt-guests treats {name}={self.values[name]!r} as {meaning}"
        self.warnings.append(f"{self.cfg.path} {self.cfg.origin(name)}: {text}")
        self.out.comment(text + ".", note=True)

    def _header(self) -> None:
        out, cfg = self.out, self.cfg
        unset = ", ".join(f"{k}={v}" for k, v in defaults(cfg.distro).items())
        out.comment(f"guestwarden configuration translated from the libvirt-guests config "
                    f"{cfg.path} by `guestwarden config import-libvirt-guests`. Variables "
                    f"that file leaves unset took the {cfg.distro} defaults of "
                    f"libvirt-guests.sh ({unset}).")
        out.comment("Each key says which variable it comes from; NOTE marks where guestwarden "
                    "cannot do exactly what libvirt-guests did. Keys not written here take "
                    "guestwarden's defaults: `guestwarden config check` prints every key. The "
                    "guests that libvirt-guests saved are taken over separately, with "
                    "`guestwarden config import-libvirt-guests --list`.")
        out.lines.append("")

    def _uris(self) -> None:
        out = self.out
        out.comment(f"From {self._said('URIS')}.")
        if "default" in self.values["URIS"].split():
            out.comment(f'"default" is the URI libvirt picks when virsh runs without -c: here '
                        f"{self.default[0]} ({self.default[1]}); a LIBVIRT_DEFAULT_URI in "
                        "libvirt-guests' environment would have picked another.", note=True)
        if len(self.uris) > 1:
            out.comment("libvirt-guests handles the URIs one after another; guestwarden "
                        "handles the guests of all of them at once, within the bounds below, "
                        "which they share.", note=True)
        written = self.values["URIS"].split()
        if len(self.uris) < len(written):
            out.comment("A URI written twice (or \"default\" and the URI it means) is "
                        "listed once: guestwarden handles each URI once.")
        out.key("uris", self.uris)

    def _suspend(self) -> None:
        out = self.out
        out.comment(f"From {self._said('ON_SHUTDOWN')}: libvirt-guests saves every running "
                    "persistent guest (virsh managedsave), one at a time.")
        if self.values["ON_SHUTDOWN"] != "suspend":
            self._odd("ON_SHUTDOWN", '"suspend" (every value but "shutdown" is)')
        out.comment("When a save fails, libvirt-guests tries nothing else: the guest runs "
                    "until the host kills it. guestwarden shuts it down gracefully instead "
                    "and powers it off only if that does not work; persistent = [\"save\"] "
                    "would leave it running as libvirt-guests does.", note=True)
        out.key("persistent", ["save", "shutdown", "poweroff"])
        if self.persistent_only == "false":
            out.comment("With PERSISTENT_ONLY='false' libvirt-guests also tries to save "
                        "transient guests, which libvirt refuses (there is no managed save "
                        "for them), so they run until the host kills them. guestwarden "
                        "cannot leave a guest alone: it shuts them down gracefully and powers "
                        "off what is left.", note=True)
        else:
            out.comment(f"With {self._said('PERSISTENT_ONLY')} libvirt-guests does not touch "
                        "transient guests when it suspends: they run until the host kills "
                        "them. guestwarden cannot leave a guest alone: it shuts them down "
                        "gracefully and powers off what is left.", note=True)
        out.key("transient", ["shutdown", "poweroff"])
        out.comment("libvirt-guests saves one guest at a time.")
        out.key("parallel_save", 1)
        out.comment("libvirt-guests waits for a save as long as it takes; guestwarden aborts a "
                    "save still running after save_timeout (900 s unless set) and moves the "
                    "guest on to its next action. Raise it if saving your largest guest (its "
                    "RAM in use divided by the disk's write speed) can take longer.", note=True)
        out.lines.append("# save_timeout = 900.0")
        out.comment("PARALLEL_SHUTDOWN is not used by libvirt-guests when it suspends; "
                    "parallel_shutdown keeps guestwarden's default (8) for the graceful "
                    "shutdowns above.")

    def _shutdown(self) -> None:
        out = self.out
        out.comment(f"From {self._said('ON_SHUTDOWN')}: libvirt-guests asks every running "
                    "guest to shut down (virsh shutdown) and waits for it.")
        out.comment("A guest still running when SHUTDOWN_TIMEOUT runs out is left to be "
                    "killed when the host goes down; guestwarden powers it off itself (the "
                    "same end, but recorded in its journal).", note=True)
        out.key("persistent", ["shutdown", "poweroff"])
        if self.persistent_only == "true":
            out.comment("With PERSISTENT_ONLY='true' libvirt-guests leaves transient guests "
                        "running until the host kills them; guestwarden cannot leave a guest "
                        "alone and shuts them down too.", note=True)
        else:
            out.comment(f"With {self._said('PERSISTENT_ONLY')} libvirt-guests shuts transient "
                        "guests down too.")
        out.key("transient", ["shutdown", "poweroff"])
        count = whole_number(self.cfg, "PARALLEL_SHUTDOWN", 4096)
        if count <= 1:
            out.comment(f"From {self._said('PARALLEL_SHUTDOWN')}: one guest at a time.")
            if count == 0:
                out.comment("0 means one at a time in libvirt-guests but no bound at all in "
                            "guestwarden, hence 1.", note=True)
        else:
            out.comment(f"From {self._said('PARALLEL_SHUTDOWN')}: at most {count} at once "
                        "(libvirt-guests counts per URI but handles the URIs one after "
                        "another, so it never had more at once either).")
        out.key("parallel_shutdown", max(1, count))
        out.comment("libvirt-guests runs virsh shutdown without --mode: libvirt then uses the "
                    "guest agent when one is connected and the ACPI power button otherwise, "
                    'which is "agent,acpi" here.')
        out.key("shutdown_mode", "agent,acpi")

    def _shutdown_timeout(self) -> None:
        out = self.out
        timeout = whole_number(self.cfg, "SHUTDOWN_TIMEOUT", 10**12)
        serial = self.suspending or whole_number(self.cfg, "PARALLEL_SHUTDOWN", 4096) <= 1
        scope = "per guest" if serial else "for all guests of a URI together"
        used = ("" if not self.suspending else " (libvirt-guests does not use it when it "
                "suspends; here it bounds the graceful shutdowns above)")
        out.comment(f"From {self._said('SHUTDOWN_TIMEOUT')}: seconds {scope}{used}.")
        if timeout == 0 or timeout > 86400:
            what = "waits forever" if timeout == 0 else f"waits {timeout} s"
            out.comment(f"libvirt-guests {what}; guestwarden's longest wait is 86400 s (a "
                        "day).", note=True)
        elif scope != "per guest":
            out.comment(f"guestwarden gives each guest {timeout} s from its own shutdown "
                        "request, so no guest gets less time than before; the whole takes "
                        "longer only when guests are slow.", note=True)
        out.key("shutdown_timeout", float(min(timeout, 86400) or 86400))

    def _bypass_cache(self) -> None:
        on = self.values["BYPASS_CACHE"] != "0"
        self.out.comment(f"From {self._said('BYPASS_CACHE')}: managed saves, and restores "
                         f"from them, {'bypass' if on else 'use'} the host's page cache.")
        if self.values["BYPASS_CACHE"] not in ("0", "1"):
            self._odd("BYPASS_CACHE", "on (every value but 0 is)")
        self.out.key("bypass_cache", on)

    def _boot(self) -> None:
        out, raw = self.out, self.values["ON_BOOT"]
        if raw == "start":
            out.comment(f"From {self._said('ON_BOOT')}: at boot libvirt-guests starts the "
                        "guests it listed at the last host shutdown; guestwarden restores the "
                        "guests its journal found running or paused then, once per boot "
                        "(paused ones come back paused).")
        else:
            out.comment(f"From {self._said('ON_BOOT')}: libvirt-guests starts nothing at "
                        "boot. Guests marked autostart are started by libvirt either way.")
            if raw != "ignore":
                self._odd("ON_BOOT", '"ignore" (every value but "start" is)')
            out.comment("libvirt-guests also deletes its list then, so the guests it saved "
                        "stay saved until someone starts them; guestwarden keeps its journal, "
                        "and `guestwarden restore` still brings them back.", note=True)
        out.key("on_boot", "restore" if raw == "start" else "ignore")
        out.comment(f"From {self._said('START_DELAY')}: seconds between two guest starts.")
        out.key("start_delay", sleep_seconds(self.cfg, "START_DELAY", 86400))
        out.comment("libvirt-guests starts guests one at a time, whatever START_DELAY is; "
                    "raise parallel_start for a faster boot.")
        out.key("parallel_start", 1)
        on = self.values["SYNC_TIME"] != "0"
        if on:
            out.comment(f"From {self._said('SYNC_TIME')}: set the clocks of restored guests "
                        "through their guest agent.")
            out.comment("libvirt-guests tries once, right after the start (when the agent is "
                        "rarely up yet), and ignores the result; guestwarden retries until the "
                        "agent answers or sync_time_timeout (60 s unless set) passes, and "
                        "reports a failure.", note=True)
        else:
            out.comment(f"From {self._said('SYNC_TIME')}: libvirt-guests leaves guest clocks "
                        "alone.")
            out.comment("guestwarden's own default is to set them (a guest restored from a "
                        "save keeps the time at which it was saved): sync_time = true.",
                        note=True)
        if self.values["SYNC_TIME"] not in ("0", "1"):
            self._odd("SYNC_TIME", "on (every value but 0 is)")
        out.key("sync_time", on)

    def _ignored(self) -> None:
        if not self.cfg.ignored:
            return
        self.out.lines.append("")
        self.out.comment("Not translated: variables that libvirt-guests does not read or that "
                         "have no equivalent here:")
        names = {item.name for item in self.cfg.ignored}
        if names & {"CONNECT_RETRIES", "RETRIES_SLEEP"}:
            self.out.comment("(instead of CONNECT_RETRIES and RETRIES_SLEEP, guestwarden's "
                             "workers retry connecting to libvirt for [advanced] "
                             "connect_timeout, 30 s unless set)")
        for item in self.cfg.ignored:
            self.out.lines.append(f"#   {item.name}={item.value!r} (line {item.line})")
            self.warnings.append(f"{self.cfg.path} line {item.line}: {item.name} is not "
                                 "translated (no equivalent in guestwarden)")
