"""Network egress for sandboxes: the policy (what a sandbox may reach), the proxy that enforces
it, the decision log, the in-sandbox bridge, and what a sandbox inherits to trust the host.

* :mod:`cellbox.egress.policy`: parse and validate ``network`` specs; decide (host, ip, port).
* :mod:`cellbox.egress.proxy`: one sandbox's HTTP CONNECT / HTTP / SOCKS5 proxy on a unix socket.
* :mod:`cellbox.egress.log`: the bounded per-sandbox ring of decisions.
* :mod:`cellbox.egress.bridge`: stdlib-only loopback-TCP → unix-socket relay run by the agent.
* :mod:`cellbox.egress.hosttrust`: the env vars and read-only binds that make pip, npm, git and
  apt use the proxy and trust the host's CA bundle and package indexes.
* :mod:`cellbox.egress.cache`: the pip pull-through cache, served by the proxy as a local site
  (and :class:`~cellbox.egress.cache.VerifiedFiles`, the digest-keyed store under both caches).
* :mod:`cellbox.egress.npm`: the npm pull-through cache (packuments and sha512-verified tarballs).
* :mod:`cellbox.egress.service`: :class:`~cellbox.egress.service.Egress`, the one object the
  manager and the runtime call (validate a spec, open/close a sandbox's egress, read its log).

Service side only: nothing here imports FastAPI, and nothing in ``cellbox.interpreter`` needs it.
"""
