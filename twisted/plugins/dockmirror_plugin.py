"""twistd plugin: ``twistd dockmirror --config FILE``."""

from twisted.application.service import ServiceMaker

dockmirror = ServiceMaker(
    "dockmirror",
    "dockmirror.tap",
    "A pull-through caching mirror for container registries",
    "dockmirror",
)
