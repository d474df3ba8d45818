"""The pluggy layer of xend-tmem: hook specifications and the tmem plugin.

Installed as ``xend_tmem.hooks``; plugins mark their implementations with
:data:`hookimpl`.
"""
import pluggy

PROJECT = "xend_tmem"

hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marker for checkpoint hook implementations (``@hookimpl``)."""
