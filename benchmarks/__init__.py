"""cellbox benchmarks: one command measures cellbox side by side with its peers.

``python -m benchmarks`` (``--quick`` for the CI smoke run) starts everything it measures
itself, on 127.0.0.1 and free ports, and stops it by pid at the end:

* ``raw``: jupyter_client's ``AsyncKernelClient`` on a local ipykernel (the physical limit);
* ``kg``: Jupyter Kernel Gateway, installed in its own venv under /tmp, spoken to over its
  websocket;
* ``http``: a ``cellbox serve`` subprocess over HTTP NDJSON (httpx);
* ``sdk``: the same server through ``cellbox.client``.

It prints a table with the design targets (met / missed), and writes
``benchmarks/results/<timestamp>.json`` and ``.png``. Timings are never asserted.
"""
