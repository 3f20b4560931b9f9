"""imagebuild: bootable, boot-tested QCOW2 disk images of Gentoo Linux."""

__version__ = "0.1.0"
