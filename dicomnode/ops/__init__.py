"""Operating the node: the ``serve`` supervisor, the admin CLI, logging set-up and the HTTP endpoints.

:mod:`.service` starts receiver and worker processes and supervises them, :mod:`.cli`, :mod:`.admin` and
:mod:`.retention` are thin verbs over the state store (they never import torch: the image stages are imported
lazily, only by the verbs that run them), :mod:`.logs` configures handlers (only entry points do), :mod:`.http`
serves ``/metrics`` and ``/health``. The top of the import graph: may import every other package; nothing
imports it.
"""
