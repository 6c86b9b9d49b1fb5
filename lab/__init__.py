"""lab: a real cluster of a CoreOS-style container OS on one machine, and the faults to test it."""

__version__ = "0.1.0"
