"""The read-only status page: a Starlette application with Jinja2 templates, served by uvicorn in the
supervisor's process (a thread, on a socket bound at start-up so a port in use fails ``serve``).

:mod:`.app` builds the application (routes, the token check), :mod:`.pictures` reads derived objects from the
outbox (Secondary Capture thumbnails as PNG, the SEG's segments, the SR's volumes), :mod:`.server` binds and
runs it. Reads the state store and the outbox only; every action stays in the CLI. Part of :mod:`dicomnode.ops`:
may import what ops may import.
"""
