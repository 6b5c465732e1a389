"""``python -m fairseq2_kslottery`` — the same as the ``fairseq2-kslottery`` command."""

import sys

from fairseq2_kslottery.cli import main

if __name__ == "__main__":
    sys.exit(main())
