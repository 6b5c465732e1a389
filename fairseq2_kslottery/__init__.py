"""fairseq2-kslottery: KS-Lottery ticket selection and training as a fairseq2 extension.

The public entry points are re-exported here; fairseq2 itself is imported only by the modules that need it.
"""

from fairseq2_kslottery.ks import KSInputError, KSResult, ks_2samp_rows
from fairseq2_kslottery.tickets import TicketSet

__all__ = ["KSInputError", "KSResult", "TicketSet", "ks_2samp_rows", "__version__"]

__version__ = "0.1.0"
