"""The local provider: Debian images built with mmdebstrap + chroot + mkfs.ext4 -d, booted under QEMU.

Pipeline order of the modules: tools (host programs) → base (mmdebstrap cache) → layers (one overlay per step)
→ generalise → initrd → disk (mkfs, qcow2, image store) → qemu (boot, readiness, checks) → provider (ties them).
"""
