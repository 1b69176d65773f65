"""`python -m tf_proxynorm.info`: what this installation can run.

An entry point only, kept at the top level for the command's short name: the report is
`tf_proxynorm.fused.info`.
"""

import sys

from tf_proxynorm.fused.info import main, report  # noqa: F401 - `report` for callers

if __name__ == "__main__":
    sys.exit(main())
