"""The sinks (where a streamed artifact's bytes go) live in worker/sinks.py, next to
worker/shards.py (see worker/stream/shards.py). Their old names stay importable here."""

from worker.sinks import ZIP_EPOCH, DirSink, FileSink, ZipSink

__all__ = ["ZIP_EPOCH", "DirSink", "FileSink", "ZipSink"]
