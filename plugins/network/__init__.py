"""The network probe plugin: not built yet (see the CPU/memory/disk/network issue). Nothing registers from here."""
