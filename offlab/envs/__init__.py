"""Simulators: the gymnasium env factory, dynamics variants and safety costs."""
