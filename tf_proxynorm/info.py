"""`python -m tf_proxynorm.info`: what this installation can run (see `tf_proxynorm.fused.info`)."""

import sys

from tf_proxynorm.fused.info import main, report  # noqa: F401 - `report` for callers

if __name__ == "__main__":
    sys.exit(main())
