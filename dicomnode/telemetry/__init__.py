"""Metric instruments that any stage records into (Prometheus counters and histograms).

Beside the data path rather than on it: it imports nothing of the node but ``config``, so the receiver and the
workers can count without depending on the ops layer that serves the numbers (:mod:`dicomnode.ops.http`).
"""
