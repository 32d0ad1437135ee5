"""The read side: ``auditpipe serve`` (OpenAI's stored chat completions API and the web viewer)
and ``auditpipe export`` (JSONL datasets), over the PostgreSQL sink's tables.

Modules: ``app`` (the ASGI app, ``create_app``), ``store`` (the queries; ``delete_completion``
is the one place a record is deleted), ``completions`` (OpenAI objects), ``auth`` (API keys),
``viewer`` (HTML), ``export``, ``serve`` (the commands), ``timeparse``. Nothing is imported
here, so ``auditpipe export`` needs no web server packages. This package imports the postgres
sink's public read interface (``auditpipe.sinks.postgres``: table names, the migration, column
expressions), never the producer or the processors.
"""

__all__: list[str] = []  # nothing is imported here (see above); use the modules
