"""The durable state that links every stage: spool files, the SQLite store, jobs and crash recovery.

:mod:`.spool` keeps received instances and produced outputs on disk, :mod:`.store` is the SQLite state store
(WAL; its rows and states in :mod:`.rows`, its schema version and migrations in :mod:`.schema`), :mod:`.jobs`
the job and series lifecycle on top of it, :mod:`.owners` the workers' liveness locks, :mod:`.recovery`
reconciles spool and store at start-up. Receiving, working and the CLI talk to each other only through this
package. May import: ``config`` and ``errors`` only.
"""
