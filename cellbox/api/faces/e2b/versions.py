"""The envd version the E2B face advertises (``envdVersion`` of every sandbox).

The SDKs switch features on it (``e2b/envd/versions.py``, and the same constants in the JS
SDK), so it must be the highest version whose features are all implemented here; the SDKs
then refuse the rest client-side with their own errors:

=========  ============================================================  ==========
version    feature the SDKs gate on it                                    here
=========  ============================================================  ==========
0.1.0      the oldest envd the SDKs accept                                yes
0.1.4      recursive ``watch_dir``                                        yes
0.1.5      ``get_metrics`` (0.2.4: disk metrics)                          yes
0.3.0      ``commands.run(stdin=...)``                                    yes
0.4.0      the default user (the SDK stops sending ``user``)              yes
0.5.2      ``close_stdin``                                                yes
0.5.7      octet-stream and gzip uploads                                  yes
0.6.2      file metadata (``X-Metadata-*`` as xattrs)                     no
0.6.3      entry info in watch events                                     no
0.6.4      watching network mounts                                        no
=========  ============================================================  ==========
"""

from __future__ import annotations

__all__ = ["ENVD_VERSION"]

ENVD_VERSION = "0.5.7"
