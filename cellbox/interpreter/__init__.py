"""The core of cellbox: sandboxes, their contexts, executions, commands, files and artifacts,
with no HTTP in it (a structure test enforces that).

Faces (``cellbox.api``) call the :class:`~cellbox.interpreter.manager.SandboxManager` for
lifecycle, ownership and capacity, and a sandbox's objects (``sbx.executions``,
``sbx.commands``, ``sbx.files``, ``sbx.contexts``, ``sbx.artifacts``) for the work; the core
reaches kernels and processes only through a runtime's ``SandboxBackend``
(``cellbox.runtimes.base``). ``models``, ``errors`` and ``messages`` are the bottom layer that
the runtimes and the SDK share. Importing the manager needs the ``server`` extra
(pydantic-settings for the settings).
"""

__all__ = ["errors", "messages", "models"]
