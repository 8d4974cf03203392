"""The dataset layer: the trajectory table, its store, names, and the ways in and out."""
