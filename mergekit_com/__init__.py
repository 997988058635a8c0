"""Chain of Merges (CoM) for mergekit: ``merge_method: chain_of_merges``.

Importing this package makes the method available to mergekit (it is also
made available automatically at start-up by ``mergekit_com_autoload.pth``
unless ``MERGEKIT_COM_AUTOLOAD=0``).
"""

__version__ = "0.1.0"

from mergekit_com import _autoload

_autoload.install()
