"""Chain of Merges (CoM) for mergekit: ``merge_method: chain_of_merges``.

Importing this package makes the method available to mergekit (it is also
made available automatically at start-up by ``mergekit_com_autoload.pth``
unless ``MERGEKIT_COM_AUTOLOAD=0``). The method itself is in ``method/``;
``integration/`` connects it to mergekit; ``docs/architecture.md`` has the map.
"""

from mergekit_com.integration import autoload as _autoload
from mergekit_com.version import __version__

_autoload.install()

__all__ = ["__version__"]
