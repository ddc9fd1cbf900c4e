"""The node daemon (``dataplane serve``): an HTTP/JSON API on a unix socket, with server-sent
events and Prometheus metrics, over the node's migrations.

- :mod:`.jobs`: the jobs, their numbered events and the per-kind limit (no I/O);
- :mod:`.openapi`: the OpenAPI document (the contract) and request validation;
- :mod:`.metrics`: the Prometheus series;
- :mod:`.storage_jobs`: a storage-migration job, run;
- :mod:`.server`: the aiohttp application and the jobs' tasks.

Served so far: storage live migrations. Receivers and cross-cluster migrations are not yet.
"""
