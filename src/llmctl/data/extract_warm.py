"""Imported by extract's forkserver: load the language model and warm trafilatura once there, so
every worker forked from it (including replacements after a timeout) starts ready in milliseconds."""

from .extract import warm

warm()
