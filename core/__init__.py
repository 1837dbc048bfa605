"""What the API (app) and the workers (worker) share: settings, the database, tables, storage, the
queue, repositories and every method's parameter model. Imports neither side, nor torch
(docs/ARCHITECTURE.md).
"""

__version__ = "0.1.0"
