"""Privacy around the graph: noise (optimizer.py), Poisson sampling (sampling.py), accounting (accounting.py)."""
