"""xend-tmem: carry Xen transcendent memory through xend's save, restore and migration."""

__version__ = "0.1.0"
