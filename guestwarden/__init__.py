"""guestwarden: keeps libvirt guests safe across host shutdown and boot."""

__version__ = "0.1.0"
