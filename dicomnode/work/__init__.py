"""Stage 2, working: turn complete series into jobs and run each job's pipeline.

:mod:`.worker` promotes quiet series, claims jobs under a lease and runs :mod:`.pipeline`, which reads top to
bottom as the data path (produce outputs into the outbox, then deliver them); :mod:`.routing` picks pipelines
for a series, :mod:`.segment` is the segment pipeline's glue (volume -> segmenter -> encoded outputs) and
:mod:`.offline` runs a pipeline on a folder. May import: :mod:`dicomnode.state`, :mod:`dicomnode.imaging`,
:mod:`dicomnode.inference`, :mod:`dicomnode.outputs`, :mod:`dicomnode.telemetry`, ``config``, ``errors``.
"""
