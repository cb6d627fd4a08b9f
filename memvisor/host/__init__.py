"""The host side: runtime directories, the VMM backends, the control channel, one sandbox's lifecycle."""
