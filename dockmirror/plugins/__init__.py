"""Upstream registry plugins.

Third parties add an upstream by dropping a module that defines an
``IUpstream`` provider into any ``dockmirror/plugins`` directory on
``sys.path``.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
