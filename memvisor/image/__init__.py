"""The guest image: a kernel and a newc initramfs built from Debian packages, cached by content."""
