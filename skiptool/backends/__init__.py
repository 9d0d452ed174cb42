"""Decode backends behind one small protocol (see :mod:`skiptool.backends.base`)."""
