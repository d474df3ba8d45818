"""xend's relocation: live migration between xend daemons over TCP (SPEC §6).

Three modules, one concept each: :mod:`.protocol` (the messages, framing,
limits and TLS both ends share), :mod:`.server` (the receiving end, the
daemon's relocation server) and :mod:`.client` (the sending end,
``xm migrate``). Import from the module that holds a name; nothing is
re-exported here.
"""
