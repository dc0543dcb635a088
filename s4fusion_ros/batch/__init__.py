"""s4fusion-batch: many bags fused on Ray (cluster.py), in units that need no Ray (work.py)."""
