"""The simulator: a digital forearm scanned by a tracked curvilinear probe (SIMULATOR.md)."""
