"""Templates built from Dockerfiles with buildah: base images (mmdebstrap for Debian where no
registry answers), cellbox's kernel layer on top, the image exported as a template's root file
system. See :mod:`cellbox.build.builder` for the steps."""

from cellbox.build.base import BaseImageMissing, bootstrap_debian, ensure_base
from cellbox.build.buildah import Buildah, buildah_available
from cellbox.build.builder import BuildResult, build_rootfs_template, find_dockerfile
from cellbox.build.events import BuildEvent, OnEvent

__all__ = [
    "BaseImageMissing",
    "BuildEvent",
    "BuildResult",
    "Buildah",
    "OnEvent",
    "bootstrap_debian",
    "build_rootfs_template",
    "buildah_available",
    "ensure_base",
    "find_dockerfile",
]
