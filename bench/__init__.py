"""``make bench``: guestwarden measured against libvirt-guests.sh and the physical limit.

Every comparison row is measured in the same run as what it is compared with.
Timings are reported, never asserted (tests/ asserts behaviour only).
"""
