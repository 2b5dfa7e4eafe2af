"""The reconstruction methods fastquant ships, one file each, registered on import
(``fastquant.recon.registry``), in this order: ``brecq``, ``qdrop``, ``pfcr``, ``mgrq``."""
from . import brecq  # noqa: F401  (registers; the order of these lines is the registry's)
from . import qdrop  # noqa: F401,I001
from . import pfcr  # noqa: F401,I001
from . import mgrq  # noqa: F401,I001
