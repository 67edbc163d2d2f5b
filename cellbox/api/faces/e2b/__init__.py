"""The E2B face: the official E2B SDKs (Python ``e2b`` / ``e2b-code-interpreter``,
JavaScript ``e2b`` / ``@e2b/code-interpreter``) work against cellbox unchanged, with
``E2B_API_URL`` and ``E2B_SANDBOX_URL`` set to cellbox's URL and ``E2B_API_KEY`` to a key.

The SDKs speak three protocols, all served here on cellbox's own port and mapped onto the
core (no second implementation of sandboxes, kernels, files or commands):

* the control plane's REST API (``/v2/sandboxes``, ``/sandboxes/{id}``...; :mod:`.models`);
* envd, port 49983 inside an E2B sandbox: ``/health``, ``/files`` and Connect-RPC
  ``process.Process/*`` and ``filesystem.Filesystem/*`` (:mod:`.connect`);
* the code-interpreter server, port 49999: ``/execute`` NDJSON and ``/contexts``
  (:mod:`.translate`).

With one sandbox URL for all sandboxes, requests name their sandbox and port in the
``E2b-Sandbox-Id`` / ``E2b-Sandbox-Port`` headers; errors are E2B's (:mod:`.errors`).
"""
